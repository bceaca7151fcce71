"""Command line: `python -m byol_jax.main --config=configs/byol.py:PRESET --workdir=DIR`.

The training CLI's flags live here (plot, export and benchmark define their own inside
their `main()`, so importing any module defines none). `--worker_mode` picks what this
process does: `train` (pretraining with inline kNN evaluation), `eval` (follows the
trainer's checkpoints), `linear_eval` or `finetune` (paper protocols on a checkpoint).
"""

from __future__ import annotations

import importlib
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_REPO_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             'configs')
# --worker_mode -> module whose `run(cfg, workdir) -> int` does the work (imported lazily).
WORKERS = {
  'train': 'byol_jax.train',
  'eval': 'byol_jax.eval_worker',
  'linear_eval': 'byol_jax.linear_eval',
  'finetune': 'byol_jax.finetune',
}
WORKER_MODES = tuple(WORKERS)

_CONFIG = config_flags.DEFINE_config_file(
  'config', os.path.join(_REPO_CONFIGS, 'byol.py') + ':demo',
  'Config file and preset, e.g. configs/byol.py:r50 or configs/byol.py:r50,epochs=300.',
  lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', 'runs/demo', 'Where metrics, checkpoints go.')
_MODE = flags.DEFINE_enum('worker_mode', 'train', WORKER_MODES, 'What this process does.')


def _quiet_logs() -> None:
  """No TensorFlow or XLA start-up chatter unless the user asked for it."""
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')


def run(argv: list[str]) -> int:
  del argv
  from byol_jax import datasets, train  # after flag parsing: keeps --help fast
  cfg = _CONFIG.value
  try:
    return importlib.import_module(WORKERS[_MODE.value]).run(cfg, _WORKDIR.value)
  except (train.ConfigError, datasets.DataError) as e:
    logging.error('%s', e)
    print(f'error: {e}', file=sys.stderr)
    return 2


def main() -> None:
  _quiet_logs()
  app.run(lambda argv: sys.exit(run(argv)))


if __name__ == '__main__':
  main()
