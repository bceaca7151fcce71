"""Unpacks the shared CIFAR-10 JPEG copy into an image folder: <out>/<split>/<class>/<i>.jpg.

Why: the image-folder path (`--dataset=folder:<out>`) and the streaming benchmark need real
images on disk, and the shared copy (shared/datasets/cifar10/cifar10_jpeg_bytes.npz) is one
file of concatenated JPEGs. The JPEG bytes are written unchanged (no re-encoding). The data
must not be committed, so the script refuses to write inside a git work tree.

  python experiments/cifar10_to_folder.py --out /tmp/cifar10_folder

`--holdout_per_class N` writes a validation copy for tuning: its 'test' split is the N
training images per class that follow the first `--train_per_class`, so hyperparameters are
chosen without looking at the test set. Counts a class cannot fill (a holdout past its 5,000
training images, say) are refused before anything is written, as are negative ones.

A finished conversion leaves `<out>/CONVERTED.json` naming what it holds: the counts and the
real path of `--src`. With `--reuse` (as the experiment scripts run it) a folder whose
marker matches the request is kept; one made for another request (the scripts' TINY=1
subset, or another --src, say) is rewritten, and one without a marker
(a conversion that was stopped, or not this script's) is refused: a real run used to train
on whatever folder was there. Without `--reuse` a finished conversion there is rewritten
too, never written over: the files it did not replace used to stay under the new marker.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import time
import zipfile
from typing import Any

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


COUNT_FLAGS = ('train_per_class', 'test_per_class', 'holdout_per_class')
_KEYS = ('class_names', 'train_jpeg', 'train_offsets', 'train_labels', 'test_jpeg',
         'test_offsets', 'test_labels')


def flag_error(args: argparse.Namespace) -> str:
  """Why the per-class counts make no sense whatever the data holds ('' when they do).

  Why: a negative count kept every image (0 means all), and --test_per_class beside
  --holdout_per_class was ignored without a word (the test split is then the held-out
  training images).
  """
  negative = [f'--{k}' for k in COUNT_FLAGS if getattr(args, k) < 0]
  if negative:
    return f'{", ".join(negative)} must be 0 (all) or more'
  if args.holdout_per_class and not args.train_per_class:
    return ('--holdout_per_class needs --train_per_class (the held-out images follow the '
            'kept ones)')
  if args.holdout_per_class and args.test_per_class:
    return ('--test_per_class has no effect with --holdout_per_class (the test split is then '
            'the held-out training images): drop one')
  return ''


def source_error(data: Any) -> str:
  """Why an opened --src is not the CIFAR-10 JPEG copy `write_split` reads ('' when it is):
  keys missing, labels that are not indices of class_names (np.bincount's traceback), or
  rows not sorted by class (a row's rank within its class would be wrong)."""
  missing = [k for k in _KEYS if k not in data.files]
  if missing:
    return f'has no {", ".join(missing)}: it is not the CIFAR-10 JPEG copy (cifar10_jpeg_bytes.npz)'
  classes = len(data['class_names'])
  for split in ('train', 'test'):
    labels = data[f'{split}_labels']
    if labels.size and (labels.min() < 0 or labels.max() >= classes):
      return f'has {split}_labels outside 0..{classes - 1}, the indices of its class_names'
    if np.any(np.diff(labels) < 0):
      return f'has {split}_labels not sorted by class, as this script needs'
  return ''


def size_error(args: argparse.Namespace, data: Any) -> str:
  """Why the counts ask for more images than a class holds ('' when they do not).

  Why: `write_split` keeps what there is, so a holdout beyond the end of a class wrote a
  smaller validation split than asked for, without a word.
  """
  names = [str(n) for n in data['class_names']]
  asks = [('train', args.train_per_class + args.holdout_per_class,
           '--train_per_class + --holdout_per_class' if args.holdout_per_class
           else '--train_per_class')]
  if not args.holdout_per_class:
    asks.append(('test', args.test_per_class, '--test_per_class'))
  for split, wanted, flags in asks:
    sizes = np.bincount(data[f'{split}_labels'], minlength=len(names))
    smallest = int(np.argmin(sizes))
    if wanted > sizes[smallest]:
      return (f'{flags} = {wanted} exceeds the {sizes[smallest]} {split} images of class '
              f'{names[smallest]!r}')
  return ''


def _error(message: str) -> int:
  print(f'error: {message}', file=sys.stderr)
  return 2


def _parser() -> argparse.ArgumentParser:
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
  return parser


def _open_source(src: str) -> tuple[np.lib.npyio.NpzFile | None, str]:
  """The opened --src, or None and why it cannot be read (one line, not a traceback)."""
  if not os.path.isfile(src):
    return None, f'{src} not found; pass --src or set BYOL_SHARED'
  try:
    data = np.load(src, allow_pickle=False)
  except (OSError, ValueError, zipfile.BadZipFile):  # ValueError: not npz, npy or a zip
    return None, (f'--src {src} is not a readable .npz archive (the CIFAR-10 JPEG copy is '
                  'cifar10_jpeg_bytes.npz)')
  if not isinstance(data, np.lib.npyio.NpzFile):
    return None, f'--src {src} holds one array, not the CIFAR-10 JPEG copy'
  return data, ''


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  if message := flag_error(args):
    return _error(message)
  tree = enclosing_git_tree(args.out)
  if tree is not None:
    return _error(f'{args.out} is inside the git work tree {tree}; CIFAR-10 must not be '
                  'committed, choose an --out outside it')
  request = {k: getattr(args, k) for k in COUNT_FLAGS}
  request['src'] = os.path.realpath(args.src)
  if (code := _reusable(args.out, request, args.reuse)) is not None:
    return code
  data, message = _open_source(args.src)
  if data is None:
    return _error(message)
  with data:
    if message := source_error(data):
      return _error(f'--src {args.src} {message}')
    if message := size_error(args, data):
      return _error(message)
    _clear(args.out, args.reuse)
    counts = _write_splits(args, data)
    classes = len(data['class_names'])
  with open(os.path.join(args.out, MARKER), 'w') as f:
    json.dump(dict(request, counts=counts), f)
  print(f'wrote {counts} images of {classes} classes to {args.out}')
  return 0


def _write_splits(args: argparse.Namespace, data: np.lib.npyio.NpzFile) -> dict[str, int]:
  """Writes train/ and test/ (the held-out training images with --holdout_per_class)."""
  class_names = [str(n) for n in data['class_names']]
  counts = {'train': write_split(data, 'train', args.out, class_names, args.train_per_class)}
  if args.holdout_per_class:
    counts['test'] = write_split(data, 'test', args.out, class_names, args.holdout_per_class,
                                 skip_per_class=args.train_per_class, source='train')
  else:
    counts['test'] = write_split(data, 'test', args.out, class_names, args.test_per_class)
  return counts


MARKER = 'CONVERTED.json'
_SPLITS = ('train', 'test')


def _reusable(out: str, request: dict[str, Any], reuse: bool = True) -> int | None:
  """0 when `out` holds a finished conversion of `request` (and `reuse`); 2 (and why) when
  it holds images of unknown origin; None when there is something to convert (`_clear`
  then removes any other conversion there). The request names the source (its real path),
  so a conversion of another --src is not reused; markers written before it was recorded
  name none and are converted again."""
  done = _marker(out)
  if done is None:
    if any(os.path.exists(os.path.join(out, s)) for s in _SPLITS):
      return _error(f'{out} holds images without {MARKER} (a conversion that was stopped, or '
                    'another one): remove it, or choose another folder')
    return None
  if reuse and {k: done.get(k) for k in request} == request:
    print(f'reusing {out}: {done.get("counts")} images')
    return 0
  return None


def _marker(out: str) -> dict[str, Any] | None:
  """The request a finished conversion in `out` recorded, or None."""
  try:
    with open(os.path.join(out, MARKER)) as f:
      done = json.load(f)
  except (OSError, ValueError):
    return None
  return done if isinstance(done, dict) else None


def _clear(out: str, reuse: bool) -> None:
  """Removes a finished conversion's marker and splits, saying so. A conversion is never
  written over another one's files: those it does not rewrite would stay (held-out training
  images in the new test split, say) while its marker named only its own request."""
  if (done := _marker(out)) is not None:
    print(f'{out} holds {"another" if reuse else "a"} conversion ({done}); rewriting it')
  with contextlib.suppress(FileNotFoundError):
    os.remove(os.path.join(out, MARKER))
  for split in _SPLITS:
    shutil.rmtree(os.path.join(out, split), ignore_errors=True)


if __name__ == '__main__':
  sys.exit(main())
