"""Unpacks the shared CIFAR-10 JPEG copy into an image folder: <out>/<split>/<class>/<i>.jpg.

Why: the image-folder path (`--dataset=folder:<out>`) and the streaming benchmark need real
images on disk, and the shared copy (shared/datasets/cifar10/cifar10_jpeg_bytes.npz) is one
file of concatenated JPEGs. The JPEG bytes are written unchanged (no re-encoding). The data
must not be committed, so the script refuses to write inside a git work tree.

  python experiments/cifar10_to_folder.py --out /tmp/cifar10_folder
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SPLITS = ('train', 'test')


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
                class_names: list[str], per_class: int = 0) -> int:
  """Writes one split's JPEGs (the first `per_class` of each class when > 0). Returns the count."""
  blob, offsets = data[f'{split}_jpeg'], data[f'{split}_offsets']
  labels = data[f'{split}_labels']
  keep = np.ones(len(labels), bool)
  if per_class > 0:  # rows are sorted by class: keep each class's first per_class rows
    rank = np.arange(len(labels)) - np.searchsorted(labels, labels, side='left')
    keep = rank < per_class
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
  args = parser.parse_args(argv)
  tree = enclosing_git_tree(args.out)
  if tree is not None:
    print(f'error: {args.out} is inside the git work tree {tree}; CIFAR-10 must not be '
          'committed, choose an --out outside it', file=sys.stderr)
    return 2
  if not os.path.isfile(args.src):
    print(f'error: {args.src} not found; pass --src or set BYOL_SHARED', file=sys.stderr)
    return 2
  with np.load(args.src, allow_pickle=False) as data:
    class_names = [str(n) for n in data['class_names']]
    limits = {'train': args.train_per_class, 'test': args.test_per_class}
    counts = {split: write_split(data, split, args.out, class_names, limits[split])
              for split in _SPLITS}
  print(f'wrote {counts} images of {len(class_names)} classes to {args.out}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
