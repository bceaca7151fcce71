"""PNG plots of a run's metrics, for people without TensorBoard (CI artefacts, papers, email).

    python -m byol_jax.plot --workdir=runs/demo [--output=DIR] [--figures=knn,loss]
    python -m byol_jax.plot --workdir=runs/cifar10 --figures=knn --output=docs/knn.png

Reads `metrics/*.jsonl` (train.jsonl from the trainer; eval.jsonl and any evaluation
worker's file, e.g. linear_eval.jsonl) and writes into WORKDIR/plots by default (or into
--output: a folder, or a .png path when --figures names one figure):
  loss.png      BYOL loss
  schedule.png  learning rate and target EMA rate tau
  knn.png       kNN top-1 per evaluation file over epochs (over steps when a record has no
                epoch, as the eval worker's); dashed: the encoder at initialisation
  collapse.png  proj_std with its healthy value 1/sqrt(projection_dim), and proj_rank
  accuracy.png  online probe top-1, and linear-evaluation top-1 where present
Each figure needs only its own metrics; figures without data are skipped. Imports neither
JAX nor pyplot (no global backend), so it is quick and safe to run beside training.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from byol_jax import cli
from byol_jax.metric_writers import read_jsonl

Records = list[dict[str, Any]]
Series = tuple[list[float], list[float]]
# Keys of evaluation files that are a linear-evaluation score (test split preferred): top-1,
# or mean average precision for a multi-label dataset (VOC2007).
LINEAR_KEYS = ('linear_top1', 'test_top1', 'top1', 'test_map')


def load_metrics(workdir: str) -> dict[str, Records]:
  """{file stem: records} of every non-empty metrics/*.jsonl."""
  folder = os.path.join(workdir, 'metrics')
  if not os.path.isdir(folder):
    return {}
  names = sorted(n for n in os.listdir(folder) if n.endswith('.jsonl'))
  metrics = {os.path.splitext(n)[0]: read_jsonl(os.path.join(folder, n)) for n in names}
  return {name: records for name, records in metrics.items() if records}


def series(records: Records, key: str, x: str = 'step') -> Series:
  """(x values, values) of the records that have finite numbers under `x` and `key`."""
  xs, values = [], []
  for record in records:
    value, position = _number(record.get(key)), _number(record.get(x))
    if value is not None and position is not None:
      xs.append(position)
      values.append(value)
  return xs, values


def _number(value: Any) -> float | None:
  if isinstance(value, bool) or value is None:
    return None
  try:
    value = float(value)  # the writer stores NaN/inf as text
  except (TypeError, ValueError):
    return None
  return value if math.isfinite(value) else None


def first_value(records: Records, key: str) -> float | None:
  for record in records:
    value = _number(record.get(key))
    if value is not None:
      return value
  return None


def projection_dim(workdir: str) -> int | None:
  """The run's projection size from config.json, for the proj_std reference line."""
  try:
    with open(os.path.join(workdir, 'config.json')) as f:
      return int(json.load(f)['model']['projection_dim'])
  except (OSError, ValueError, KeyError, TypeError):
    return None


# ---------------------------------------------------------------------------------------------
# Figures: each returns False when it has nothing to draw.
# ---------------------------------------------------------------------------------------------


def _plot_loss(fig, metrics, workdir) -> bool:
  steps, loss = series(metrics.get('train', []), 'loss')
  if not steps:
    return False
  ax = fig.add_subplot()
  ax.plot(steps, loss, label='BYOL loss')
  _finish(ax, 'loss', 'Training loss')
  return True


def _plot_schedule(fig, metrics, workdir) -> bool:
  train = metrics.get('train', [])
  panels = [(k, series(train, k)) for k in ('lr', 'tau')]
  panels = [(k, s) for k, s in panels if s[0]]
  for i, (key, (steps, values)) in enumerate(panels):
    ax = fig.add_subplot(len(panels), 1, i + 1)
    ax.plot(steps, values, color=f'C{i}')
    _finish(ax, key, {'lr': 'Learning rate', 'tau': 'Target EMA rate tau'}[key], legend=False)
  return bool(panels)


def knn_axis(metrics: dict[str, Records]) -> str:
  """'epoch' when every kNN record carries its epoch (the trainer's do), else 'step'."""
  scored = [r for _, records in _eval_files(metrics) for r in records
            if _number(r.get('knn_top1')) is not None]
  return 'epoch' if scored and all(_number(r.get('epoch')) is not None for r in scored) else 'step'


def _plot_knn(fig, metrics, workdir) -> bool:
  ax = fig.add_subplot()
  drawn, init, x = False, None, knn_axis(metrics)
  for name, records in _eval_files(metrics):
    xs, values = series(records, 'knn_top1', x)
    if xs:
      ax.plot(xs, values, marker='o', markersize=3, label=f'{name} kNN top-1')
      drawn = True
    init = init if init is not None else first_value(records, 'knn_top1_init')
  if init is not None:
    ax.axhline(init, linestyle='--', color='gray', label=f'at initialisation ({init:.3f})')
  if drawn:
    ax.set_xlim(left=0)  # training starts at 0, where the dashed line was measured
  _finish(ax, 'top-1', 'kNN top-1 (test split)', xlabel=x)
  return drawn


def _plot_collapse(fig, metrics, workdir) -> bool:
  train = metrics.get('train', [])
  std, rank = series(train, 'proj_std'), series(train, 'proj_rank')
  if not std[0] and not rank[0]:
    return False
  ax = fig.add_subplot(2, 1, 1)
  ax.plot(*std, label='proj_std')
  dim = projection_dim(workdir)
  if dim:
    ax.axhline(1 / math.sqrt(dim), linestyle='--', color='green',
               label=f'healthy: 1/sqrt({dim}) = {1 / math.sqrt(dim):.3f}')
  ax.set_ylim(bottom=0)
  _finish(ax, 'std', 'Collapse signals: per-dimension std of normalised projections')
  ax = fig.add_subplot(2, 1, 2)
  ax.plot(*rank, color='C1', label='proj_rank')
  ax.set_ylim(bottom=0)
  _finish(ax, 'effective rank', 'Effective rank of the projections (drops on collapse)')
  return True


def _plot_accuracy(fig, metrics, workdir) -> bool:
  ax = fig.add_subplot()
  drawn = False
  steps, values = series(metrics.get('train', []), 'probe_top1')
  if steps:
    ax.plot(steps, values, alpha=0.8, label='online probe top-1 (train batches)')
    drawn = True
  for name, records in _eval_files(metrics):
    key = next((k for k in LINEAR_KEYS if series(records, k)[0]), None)
    if key is not None:
      ax.plot(*series(records, key), marker='s', label=f'{name} {key}')
      drawn = True
  _finish(ax, 'top-1 (mAP for VOC)', 'Classification accuracy')
  return drawn


# Record fields that make two evaluations of one file different measurements, with the value
# a record written before the field existed stands for (linear_eval reported the sweep's head).
_SETTINGS = {'network': None, 'dataset': None, 'protocol': None, 'refit': False}


def _setting(record: dict[str, Any], field: str) -> str:
  value = str(record.get(field, _SETTINGS[field]))
  # The eval worker's step 0 (random init, no probe) says 'knn', its checkpoints
  # 'knn+online_probe': the same kNN measurement, one line.
  return 'knn' if field == 'protocol' and value == 'knn+online_probe' else value


def _eval_files(metrics: dict[str, Records]) -> list[tuple[str, Records]]:
  """(label, records) per evaluation file and per setting that varies inside it (network,
  dataset, protocol, refit), so that online and target, or a refit head and a sweep's, never
  share a line. The label names the network, then each other setting that varies."""
  groups = []
  for name, records in metrics.items():
    if name == 'train':
      continue
    varying = [f for f in _SETTINGS if len({_setting(r, f) for r in records}) > 1]
    key = lambda r, varying=varying: tuple(_setting(r, f) for f in varying)
    for value in sorted({key(r) for r in records}):
      members = [r for r in records if key(r) == value]
      parts = [name] + ([str(members[0]['network'])] if 'network' in members[0] else [])
      parts += [f'{f}={_setting(members[0], f)}' for f in varying if f != 'network']
      groups.append((' '.join(parts), members))
  return groups


def _finish(ax, ylabel: str, title: str, legend: bool = True, xlabel: str = 'step') -> None:
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title, fontsize=10)
  ax.grid(alpha=0.3)
  if legend and ax.get_legend_handles_labels()[0]:
    ax.legend(fontsize=8)


FIGURES: Sequence[tuple[str, Callable[..., bool], tuple[float, float]]] = (
  ('loss', _plot_loss, (7, 4)),
  ('schedule', _plot_schedule, (7, 5)),
  ('knn', _plot_knn, (7, 4)),
  ('collapse', _plot_collapse, (7, 6)),
  ('accuracy', _plot_accuracy, (7, 4)),
)


FIGURE_NAMES = tuple(name for name, _, _ in FIGURES)


class NoMetricsError(ValueError):
  """The workdir has nothing to plot."""


class UsageError(ValueError):
  """Figures or output that cannot be honoured (unknown name, .png path for several)."""


def make_plots(workdir: str, output: str | None = None,
               figures: Sequence[str] | None = None) -> list[str]:
  """Writes each figure (all by default) that has data; returns the PNG paths.

  `output` is a folder (default WORKDIR/plots), or the PNG's path when `figures` names one.
  """
  from matplotlib.figure import Figure  # no pyplot: no global backend, Agg via savefig

  figures = list(figures or FIGURE_NAMES)
  unknown = [f for f in figures if f not in FIGURE_NAMES]
  if unknown:
    raise UsageError(f'unknown figure {unknown[0]!r}; valid: {", ".join(FIGURE_NAMES)}')
  single_file = bool(output) and output.lower().endswith('.png')
  if single_file and len(figures) != 1:
    raise UsageError(f'--output={output} is one PNG: name one figure with --figures')
  if message := cli.missing_dir_error(workdir):
    raise NoMetricsError(message)
  metrics = load_metrics(workdir)
  if not metrics:
    raise NoMetricsError(f'no metrics in {os.path.join(workdir, "metrics")} (expected '
                         'train.jsonl or eval.jsonl; has the run logged a step yet?)')
  output = output or os.path.join(workdir, 'plots')
  os.makedirs(os.path.dirname(output) if single_file else output, exist_ok=True)
  paths = []
  for name, draw, size in FIGURES:
    if name not in figures:
      continue
    fig = Figure(figsize=size, dpi=100, layout='constrained')
    if draw(fig, metrics, workdir):
      path = output if single_file else os.path.join(output, f'{name}.png')
      fig.savefig(path)
      paths.append(path)
  if single_file and not paths:
    raise NoMetricsError(f'no data for the {figures[0]} figure in {workdir}')
  return paths


def main() -> None:
  """`python -m byol_jax.plot`; flags are defined here, so importing defines none."""
  from absl import app, flags
  flags.DEFINE_string('workdir', None, 'Run directory (with metrics/*.jsonl).')
  flags.DEFINE_string('output', None, 'Folder for the PNGs (default WORKDIR/plots), or a .png '
                      'path when --figures names one figure.')
  cli.validate_path_flag('workdir')
  cli.validate_path_flag('output', 'output')
  flags.DEFINE_list('figures', None, f'Which figures (default all): {",".join(FIGURE_NAMES)}.')
  cli.quiet_startup_logs()
  app.run(lambda argv: sys.exit(_run(flags.FLAGS.workdir, flags.FLAGS.output,
                                     flags.FLAGS.figures)), flags_parser=cli.parse_flags)


def _run(workdir: str | None, output: str | None, figures: Sequence[str] | None = None) -> int:
  if not workdir:
    print('error: --workdir is required', file=sys.stderr)
    return 2
  try:
    paths = make_plots(workdir, output, figures)
  except (NoMetricsError, UsageError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  except OSError as e:  # an --output that cannot be written (read-only, a file in the way)
    print(f'error: cannot write the plots: {e.strerror or e}'
          + (f': {e.filename}' if e.filename else ''), file=sys.stderr)
    return 2
  print('\n'.join(paths))
  return 0


if __name__ == '__main__':
  main()
