"""Command line: `python -m byol_jax.main --config=configs/byol.py:PRESET --workdir=DIR`.

    python -m byol_jax.main --config=configs/byol.py:demo --workdir=runs/demo
    python -m byol_jax.main --config=configs/byol.py:demo --workdir=runs/demo --worker_mode=eval
    python -m byol_jax.main --config=configs/linear_eval.py:demo --workdir=runs/demo \\
        --worker_mode=linear_eval
    python -m byol_jax.main --config=configs/byol.py:r50,epochs=300 --config.batch_size=512

Presets (README "Presets"):
  configs/byol.py         demo, cifar10, cifar10_lightly, r18, r50, r101, r152, r50x2,
                          r50x4, r200x2; `,epochs=N` after one sets its schedule. The file
                          alone (`--config=configs/byol.py`) is r50; without --config, demo.
  configs/ablation.py     bn_both, bn_projector, bn_predictor, ln_both, none, contrastive;
                          the file alone is bn_both.
  configs/linear_eval.py  demo, imagenet, cifar10, cifar100, food101, sun397, cars196, dtd,
                          oxford_iiit_pet, caltech101, oxford_flowers102, voc2007; the file
                          alone is demo.
Any field is overridden as --config.FIELD=VALUE (e.g. --config.model.depth=18);
--show_config lists them all with a preset's values and their comments, e.g.
`python -m byol_jax.main --config=configs/byol.py:cifar10 --show_config`.
--worker_mode picks what this process does: train (pretraining with inline kNN
evaluation), eval (follows the trainer's checkpoints), linear_eval or finetune (paper
protocols on a run's checkpoint, with a configs/linear_eval.py preset).
"""

from __future__ import annotations

import importlib
import os
import re
import sys

from absl import app, flags, logging

from byol_jax import cli

_REPO_CONFIGS = os.path.join(cli.REPO, 'configs')
# --worker_mode -> module whose `run(cfg, workdir) -> int` does the work (imported lazily).
WORKERS = {
  'train': 'byol_jax.train',
  'eval': 'byol_jax.eval_worker',
  'linear_eval': 'byol_jax.linear_eval',
  'finetune': 'byol_jax.finetune',
}
WORKER_MODES = tuple(WORKERS)

# The training CLI's flags are defined on import of this module, the entry point; plot,
# export and benchmark define theirs inside their main(), so importing them defines none.
_CONFIG = cli.define_config_flag(
  os.path.join(_REPO_CONFIGS, 'byol.py') + ':demo',
  'Config file and preset, e.g. configs/byol.py:r50 or configs/byol.py:r50,epochs=300; '
  'any field overridden as --config.FIELD=VALUE (presets and fields: configs/byol.py).')
flags.declare_key_flag('config')  # defined inside ml_collections: list it in --help too
_WORKDIR = flags.DEFINE_string(
  'workdir', None, 'The run\'s folder: metrics, checkpoints, evaluations. Default: '
  'runs/<preset> for a pretraining config (runs/demo, runs/cifar10, ...; with the preset\'s '
  'arguments: r50,epochs=300 -> runs/r50_epochs300; a config file of your own, outside '
  'configs/: runs/<file name>); evaluation configs '
  '(configs/linear_eval.py) name the pretraining run they read, runs/demo for their demo.')
cli.validate_path_flag('workdir')
_MODE = flags.DEFINE_enum('worker_mode', 'train', WORKER_MODES, 'What this process does.')
_SHOW_CONFIG = flags.DEFINE_bool(
  'show_config', False, "Print every field of --config (the preset's values, with the "
  '--config.FIELD=VALUE overrides given) as the flag that sets it, with its comment in the '
  'config file, and exit.')
# Several processes (hosts) in one run; see README "Multi-host".
_MULTIHOST = flags.DEFINE_enum(
  'multihost', 'auto', ('auto', 'on', 'off'),
  'auto: join a multi-process run when --coordinator_address, --num_processes and '
  '--process_id or SLURM / Open MPI / Cloud TPU '
  'variables say so; on: always call jax.distributed.initialize (TPU pod slices); off: never.')
_COORDINATOR = flags.DEFINE_string(
  'coordinator_address', None, 'HOST:PORT of process 0, the same on every process.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in the run.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process, 0..num_processes-1.')


def _folder_name(text: str) -> str:
  """`text` as one folder name: a path character in a preset argument (`/`, `\\`, `:`, a
  space, `..`) made nested folders, or one outside runs/."""
  return re.sub(r'(\.{2,}|[^\w.,+-]|_)+', '_', text).strip('._') or 'run'


def default_workdir(cfg, preset_arg: str = '', config_file: str = '') -> str:
  """runs/<preset> for a pretraining config, so that two presets run without --workdir do
  not meet in one folder (the second was refused as another preset's run). The preset's
  arguments, `preset_arg` being what followed the config file's ':' (`r50,epochs=300`), are
  part of its name: runs/r50_epochs300, where they once shared runs/r50 with `r50` and the
  second was refused as a changed schedule. A user's own config file (any outside this
  checkout's configs/, with a `preset` field or not) is named after `config_file`'s stem,
  where it took the demo's runs/demo. An
  evaluation config reads a pretraining run, which only its demo preset can guess."""
  stem = os.path.splitext(os.path.basename(config_file))[0]
  preset = str(cfg.get('preset') or '')
  if 'learning_rates' not in cfg:
    if not is_repository_config(config_file):
      preset = ''  # a preset it built on (demo) names that preset's run, not this file's
    parts = [p.strip().replace('=', '') for p in preset_arg.split(',') if p.strip()]
    if preset:
      parts = [preset, *parts[1:]]
    else:
      parts = [stem or 'run', *parts]
    return os.path.join('runs', _folder_name('_'.join(parts)))
  if preset == 'demo':
    return os.path.join('runs', 'demo')
  from byol_jax import train
  raise train.ConfigError(f'--workdir: name the pretraining run that '
                          f'{"preset " + preset if preset else "config " + (stem or "file")} '
                          'evaluates, e.g. --workdir=runs/r50')


def is_repository_config(config_file: str) -> bool:
  """True for one of this checkout's configs/ files (or no file: the default, byol.py).

  Why: a user's own file that starts from `byol.get_config('demo')` keeps the field
  `preset='demo'`, and its runs went to runs/demo, the demo's folder (refused there as
  another run, or resuming the demo's checkpoints when the fields matched).
  """
  if not config_file:
    return True
  path = config_file
  if not os.path.isabs(path) and not os.path.exists(path):
    path = os.path.join(cli.REPO, path)  # as cli.config_path_fallback reads it
  return os.path.dirname(os.path.realpath(path)) == os.path.realpath(_REPO_CONFIGS)


def _load_config_module(path: str):
  import importlib.util
  spec = importlib.util.spec_from_file_location('_byol_jax_resume_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def resuming_config(config_file: str, saved) -> str | None:
  """The --config (with any --config.FIELD flags) that resumes a run saved with config
  `saved`, built from that run's own preset: a refusal listed the differing fields but not
  that plain `r50`, the preset recorded in the run's config.json, resumes it (the user had
  typed `r50,epochs=300`). Only a preset of `config_file` whose config (with those flags)
  matches the saved trajectory is named; None when there is none or it cannot be loaded."""
  from byol_jax import checkpointing
  saved_preset = saved.get('preset') if hasattr(saved, 'get') else None
  if not saved_preset or not os.path.isfile(config_file):
    return None
  arg = str(saved_preset).rpartition(':')[2]  # ablation presets are saved as ablation:NAME
  candidates = [arg]
  if saved.get('epochs'):
    candidates.append(f'{arg},epochs={saved["epochs"]}')
  try:
    get_config = _load_config_module(config_file).get_config
  except Exception:  # a config file that no longer loads: say nothing rather than guess
    return None
  best = None
  for candidate in candidates:
    try:
      cfg = get_config(candidate)
      trajectory, _ = checkpointing.config_differences(saved, cfg)
      fixes = checkpointing.saved_value_flags(saved, cfg)
    except Exception:  # not a preset of this file
      continue
    if len(fixes) != len(trajectory):
      continue  # a field the flags cannot set back: this preset does not resume it
    if best is None or len(fixes) < len(best[1]):
      best = candidate, fixes
  if best is None:
    return None
  shown = config_file
  if config_file.startswith(cli.REPO + os.sep):  # the repository's file, as the README says
    shown = os.path.relpath(config_file, cli.REPO)
  return ' '.join([f'--config={shown}:{best[0]}', *best[1]])


def _join(cfg, workdir: str) -> float:
  """Joins a multi-process run when asked to and checks that all processes agree; returns
  the silence after which a process counts as lost (0: single process, nothing to watch)."""
  from byol_jax import checkpointing, multihost
  launch = multihost.plan(_MULTIHOST.value, _COORDINATOR.value, _NUM_PROCESSES.value,
                          _PROCESS_ID.value)
  if launch is None:
    return 0.0
  if _MODE.value != 'train':
    raise multihost.LaunchError(f'--worker_mode={_MODE.value} runs on one process; start it '
                                'on a single host with --multihost=off')
  timeouts = cfg.multihost
  multihost.initialize(launch, timeouts.join_timeout_secs, timeouts.peer_timeout_secs)
  import jax
  if jax.process_index() != 0:
    logging.set_verbosity(logging.WARNING)  # process 0 reports progress for the run

  def describe(ref, mine):
    trajectory, other = checkpointing.config_differences(ref['config'], mine['config'])
    return trajectory + other + [f'{k} ({ref[k]!r} -> {mine[k]!r})' for k in sorted(ref)
                                 if k != 'config' and ref[k] != mine.get(k)]

  facts = dict(config=checkpointing.config_to_dict(cfg), workdir=os.path.abspath(workdir),
               worker_mode=_MODE.value, local_devices=jax.local_device_count(),
               platform=jax.default_backend())
  multihost.check_agreement(facts, timeouts.join_timeout_secs, describe)
  return timeouts.peer_timeout_secs


# JAX's GPU memory settings; a user who set any of them has chosen.
_GPU_MEMORY_VARS = ('XLA_PYTHON_CLIENT_PREALLOCATE', 'XLA_PYTHON_CLIENT_MEM_FRACTION',
                    'XLA_PYTHON_CLIENT_ALLOCATOR')


def share_accelerator_memory(mode: str, environ: dict | None = None) -> None:
  """The eval worker allocates GPU memory as it needs it instead of JAX's default 75% up
  front: it is meant to run beside the trainer, often on the same GPU, where taking 75%
  would leave the trainer (or itself, started second) out of memory. Must run before JAX
  creates its GPU client."""
  environ = os.environ if environ is None else environ
  if mode == 'eval' and not any(var in environ for var in _GPU_MEMORY_VARS):
    environ['XLA_PYTHON_CLIENT_PREALLOCATE'] = 'false'


def resolve_default_workdir(cfg, preset_arg: str = '', config_file: str = '') -> str:
  """The workdir of a run started without --workdir: `default_workdir`, or runs/<preset>
  where this preset with arguments (`r50,epochs=300`) trained before the default held them
  and the run there is this one (a checkpoint of the same trajectory).

  Why: the command that started such a run is the one that resumes it; with the new
  default it started the run afresh in runs/r50_epochs300 (days of ImageNet training lost)
  and said so in one INFO line. A folder that holds another run (plain `r50`) is left to it.
  """
  workdir = default_workdir(cfg, preset_arg, config_file)
  # Where earlier versions put it: without the preset's arguments, or (a user's own file)
  # in the folder of the preset it built on.
  for earlier in (default_workdir(cfg, '', config_file), default_workdir(cfg)):
    if earlier != workdir and not os.path.exists(workdir) and _holds_this_run(earlier, cfg):
      logging.warning('workdir %s: this run started there, before the default workdir was '
                      '%s; it resumes there (--workdir sets another)', earlier, workdir)
      return earlier
  logging.info('workdir %s (the default for this preset; --workdir sets another)', workdir)
  return workdir


def _holds_this_run(workdir: str, cfg) -> bool:
  """True when `workdir` holds a checkpoint of the same trajectory as `cfg`."""
  if not os.path.isdir(workdir):
    return False
  from byol_jax import checkpointing
  try:
    saved = checkpointing.load_config(workdir)
  except checkpointing.CheckpointError:  # none there, or unreadable: not this run's
    return False
  return not checkpointing.config_differences(saved, cfg)[0]


# Config fields that hold a local path. A folder dataset's path is expanded where it is
# parsed (datasets.parse_dataset).
PATH_FIELDS = ('init_from', 'data_dir')


def expand_user_paths(cfg) -> None:
  """A leading ~ of a path field is the home folder, as for the path flags (cli): the
  shell leaves the ~ of --config.init_from=~/runs/demo alone, and it was looked for under a
  folder named '~' in the working directory."""
  for name in PATH_FIELDS:
    value = cfg.get(name)
    if isinstance(value, str) and value.startswith('~'):
      cfg[name] = os.path.expanduser(value)


INTERRUPTED = 130  # the shell's code for a process ended by SIGINT


def run(argv: list[str]) -> int:
  del argv
  cfg = _CONFIG.value
  if _SHOW_CONFIG.value:
    print(cli.describe_config(cfg, flags.FLAGS['config'].config_filename))
    return 0
  from byol_jax import checkpointing, datasets, multihost, networks, train  # after parsing
  checkpointing.quiet_orbax_logs()
  expand_user_paths(cfg)
  share_accelerator_memory(_MODE.value)
  try:
    workdir = _WORKDIR.value
    if workdir is None:
      config_file, _, preset_arg = flags.FLAGS['config'].config_filename.partition(':')
      workdir = resolve_default_workdir(cfg, preset_arg, config_file)
    if os.path.exists(workdir) and not os.path.isdir(workdir):
      print(f'error: {cli.missing_dir_error(workdir)}', file=sys.stderr)
      return 2
    peer_timeout = _join(cfg, workdir)
    with multihost.PeerWatch(peer_timeout) as watch:
      watch.exit_code = importlib.import_module(WORKERS[_MODE.value]).run(cfg, workdir)
    return watch.exit_code
  except (train.ConfigError, datasets.DataError, multihost.LaunchError,
          networks.UnknownEncoder) as e:
    message = str(e)
    if isinstance(e, train.SetupMismatch):
      resume = resuming_config(flags.FLAGS['config'].config_filename.partition(':')[0], e.saved)
      if resume:
        message += f' The run\'s own preset resumes it: {resume}'
    print(f'error: {message}', file=sys.stderr)  # one line, no log prefix: a user's mistake
    return 2
  except KeyboardInterrupt:  # outside the trainer's step loop (set-up, waiting, evaluating)
    print(f'interrupted: the {_MODE.value} worker stopped; what it had saved (checkpoints, '
          'metric records) is intact', file=sys.stderr)
    return INTERRUPTED


def exit_process(code: int) -> None:
  """Ends the process with `code`. After a Ctrl-C, without Python's finalisation: an
  interrupt that lands in XLA's compiler (the set-up's jits, an evaluator's first call)
  leaves the compilation running on a native thread, and an ordinary exit then ends in
  'Fatal Python error: Segmentation fault' (exit -11) under the one-line message. What the
  worker wrote is on disk already (JSONL records are appended and closed one by one,
  checkpoints are closed by the trainer, the eval worker closes its writer)."""
  if code != INTERRUPTED:
    sys.exit(code)
  logging.flush()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)


def main() -> None:
  cli.quiet_startup_logs()
  app.run(lambda argv: exit_process(run(argv)), flags_parser=cli.parse_flags)


if __name__ == '__main__':
  main()
