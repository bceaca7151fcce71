"""Unpacks the shared CIFAR-10 JPEG copy into an image folder: <out>/<split>/<class>/<i>.jpg.

Why: the image-folder path (`--dataset=folder:<out>`) and the streaming benchmark need real
images on disk, and the shared copy (shared/datasets/cifar10/cifar10_jpeg_bytes.npz) is one
file of concatenated JPEGs. The JPEG bytes are written unchanged (no re-encoding). The data
must not be committed, so the script refuses to write inside a git work tree.

  python experiments/cifar10_to_folder.py --out /tmp/cifar10_folder

`--holdout_per_class N` writes a validation copy for tuning: its 'test' split is the N
training images per class that follow the first `--train_per_class`, so hyperparameters are
chosen without looking at the test set.

A finished conversion leaves `<out>/CONVERTED.json` naming what it holds. With `--reuse` (as
the experiment scripts run it) a folder whose marker matches the request is kept; one made
for another request (the scripts' TINY=1 subset, say) is rewritten, and one without a marker
(a conversion that was stopped, or not this script's) is refused: a real run used to train
on whatever folder was there. Without `--reuse` a finished conversion there is rewritten
too, never written over: the files it did not replace used to stay under the new marker.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import numpy as np

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def default_src() -> str:
  """$BYOL_SHARED/datasets/cifar10/... if set, else ../shared/... beside the repository."""
  shared = os.environ.get('BYOL_SHARED') or os.path.join(os.path.dirname(_REPO), 'shared')
  return os.path.join(shared, 'datasets', 'cifar10', 'cifar10_jpeg_bytes.npz')


def enclosing_git_tree(path: str) -> str | None:
  """The git work tree that contains path (or would, once created), if any."""
  path = os.path.abspath(path)
  repo = os.path.realpath(_REPO)
  probe = path
  while True:
    real = os.path.realpath(probe)
    if os.path.exists(os.path.join(real, '.git')) or real == repo:
      return real
    parent = os.path.dirname(probe)
    if parent == probe:
      return None
    probe = parent


def write_split(data: np.lib.npyio.NpzFile, split: str, out: str,
                class_names: list[str], per_class: int = 0, skip_per_class: int = 0,
                source: str | None = None) -> int:
  """Writes one split's JPEGs. Returns the count.

  Per class, rows `skip_per_class .. skip_per_class + per_class` of the `source` split (the
  split itself by default) are kept; per_class 0 keeps all after the skipped ones.
  """
  source = source or split
  blob, offsets = data[f'{source}_jpeg'], data[f'{source}_offsets']
  labels = data[f'{source}_labels']
  # Rows are sorted by class: a row's rank is its position within its class.
  rank = np.arange(len(labels)) - np.searchsorted(labels, labels, side='left')
  keep = rank >= skip_per_class
  if per_class > 0:
    keep &= rank < skip_per_class + per_class
  for name in class_names:
    os.makedirs(os.path.join(out, split, name), exist_ok=True)
  start = time.perf_counter()
  written = 0
  for i, label in enumerate(labels):
    if not keep[i]:
      continue
    written += 1
    path = os.path.join(out, split, class_names[int(label)], f'{i:05d}.jpg')
    with open(path, 'wb') as f:
      f.write(blob[offsets[i]:offsets[i + 1]].tobytes())
    if written % 10_000 == 0:
      print(f'{split}: {written} images ({time.perf_counter() - start:.1f} s)', flush=True)
  print(f'{split}: {written} images ({time.perf_counter() - start:.1f} s)', flush=True)
  return written


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--src', default=default_src(), help='cifar10_jpeg_bytes.npz')
  parser.add_argument('--out', required=True, help='output root (outside any git repo)')
  parser.add_argument('--train_per_class', type=int, default=0,
                      help='keep only this many training images per class (0 = all)')
  parser.add_argument('--test_per_class', type=int, default=0,
                      help='keep only this many test images per class (0 = all)')
  parser.add_argument('--reuse', action='store_true',
                      help='keep --out if a finished conversion of the same request is there')
  parser.add_argument('--holdout_per_class', type=int, default=0,
                      help='validation copy: the test split is this many further training '
                           'images per class (needs --train_per_class), not the test set')
  args = parser.parse_args(argv)
  if args.holdout_per_class and not args.train_per_class:
    print('error: --holdout_per_class needs --train_per_class (the held-out images follow '
          'the kept ones)', file=sys.stderr)
    return 2
  tree = enclosing_git_tree(args.out)
  if tree is not None:
    print(f'error: {args.out} is inside the git work tree {tree}; CIFAR-10 must not be '
          'committed, choose an --out outside it', file=sys.stderr)
    return 2
  request = {k: getattr(args, k) for k in ('train_per_class', 'test_per_class',
                                            'holdout_per_class')}
  if (code := _reuse_or_clear(args.out, request, args.reuse)) is not None:
    return code
  if not os.path.isfile(args.src):
    print(f'error: {args.src} not found; pass --src or set BYOL_SHARED', file=sys.stderr)
    return 2
  with np.load(args.src, allow_pickle=False) as data:
    class_names = [str(n) for n in data['class_names']]
    counts = {'train': write_split(data, 'train', args.out, class_names, args.train_per_class)}
    if args.holdout_per_class:
      counts['test'] = write_split(data, 'test', args.out, class_names, args.holdout_per_class,
                                   skip_per_class=args.train_per_class, source='train')
    else:
      counts['test'] = write_split(data, 'test', args.out, class_names, args.test_per_class)
  with open(os.path.join(args.out, MARKER), 'w') as f:
    json.dump(dict(request, counts=counts), f)
  print(f'wrote {counts} images of {len(class_names)} classes to {args.out}')
  return 0


MARKER = 'CONVERTED.json'


def _reuse_or_clear(out: str, request: dict[str, int], reuse: bool = True) -> int | None:
  """0 when `out` holds a finished conversion of `request` (and `reuse`); 2 (and why) when
  it holds images of unknown origin; None, after clearing any other conversion there, or when
  there is nothing there, to convert. A conversion is never written over another one's files:
  those it does not rewrite would stay (held-out training images in the new test split, say)
  while its marker named only its own request."""
  splits = [os.path.join(out, s) for s in ('train', 'test')]
  marker = os.path.join(out, MARKER)
  try:
    with open(marker) as f:
      done = json.load(f)
  except (OSError, ValueError):
    done = None
  if done is None:
    if any(os.path.exists(p) for p in splits):
      print(f'error: {out} holds images without {MARKER} (a conversion that was stopped, or '
            'another one): remove it, or choose another folder', file=sys.stderr)
      return 2
    return None
  if reuse and {k: done.get(k) for k in request} == request:
    print(f'reusing {out}: {done.get("counts")} images')
    return 0
  print(f'{out} holds {"another" if reuse else "a"} conversion ({done}); rewriting it')
  os.remove(marker)
  for path in splits:
    shutil.rmtree(path, ignore_errors=True)
  return None


if __name__ == '__main__':
  sys.exit(main())
