"""Prints a run's results table from its metrics: epochs, wall time, images/s, kNN top-1.

  python experiments/results_table.py --workdir runs/cifar10 [--markdown]

Why: the reproduction scripts print the same table that goes into the README, straight
from metrics/eval.jsonl and metrics/train.jsonl, so no figure is copied by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys


def _read(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def rows(workdir: str) -> list[dict]:
  """One row per eval record, with the median train throughput logged since the eval before
  (a median, so the log interval holding the compilation or an evaluation does not count).
  The wall time is the training loop's since the run began, summed over its resumes."""
  train = _read(os.path.join(workdir, 'metrics', 'train.jsonl'))
  evals = _read(os.path.join(workdir, 'metrics', 'eval.jsonl'))
  out, previous = [], -1
  for record in evals:
    rates = [float(t['images_per_sec']) for t in train
             if previous < t['step'] <= record['step'] and 'images_per_sec' in t]
    rate = statistics.median(rates) if rates else float('nan')
    previous = record['step']
    out.append(dict(step=record['step'], epoch=record.get('epoch', float('nan')),
                    wall_sec=record.get('elapsed_sec', float('nan')), images_per_sec=rate,
                    knn_top1=record.get('knn_top1'), knn_top1_init=record.get('knn_top1_init')))
  return out


def format_table(table: list[dict], markdown: bool = False) -> str:
  head = ['epoch', 'step', 'wall time (s)', 'images/s', 'kNN top-1']
  lines = [[f"{r['epoch']:.1f}", str(r['step']), f"{r['wall_sec']:.0f}",
            f"{r['images_per_sec']:.0f}", f"{r['knn_top1']:.4f}"] for r in table]
  if table and table[0].get('knn_top1_init') is not None:
    lines.insert(0, ['0 (init)', '0', '-', '-', f"{table[0]['knn_top1_init']:.4f}"])
  if markdown:
    return '\n'.join(['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
                     + ['| ' + ' | '.join(line) + ' |' for line in lines])
  widths = [max(len(x) for x in col) for col in zip(head, *lines, strict=False)]
  fmt = lambda row: '  '.join(x.rjust(w) for x, w in zip(row, widths, strict=True))
  return '\n'.join([fmt(head)] + [fmt(line) for line in lines])


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--markdown', action='store_true')
  args = parser.parse_args(argv)
  table = rows(args.workdir)
  if not table:
    print(f'error: no eval records in {args.workdir}/metrics/eval.jsonl', file=sys.stderr)
    return 2
  print(format_table(table, args.markdown))
  return 0


if __name__ == '__main__':
  sys.exit(main())
