"""Dataset names, split definitions, image-folder scanning and whole-dataset decoding.

Why this module exists: every entry point (training, evaluation, benchmarks) must agree on
what a dataset name means and which examples form 'train', 'valid' and 'test', or results
are silently computed on the wrong split. It also decodes small datasets into memory for the
device-resident path, which runs on machines without TensorFlow: TensorFlow and TFDS are
imported only inside the functions that read TFDS datasets, never at import time.

Dataset names (`parse_dataset`):
- 'demo': the generated dataset of `demo_data` (no files, no download);
- 'folder:/path/to/root': an image folder, root/<split>/<class_name>/<image>.{jpg,jpeg,png}
  with split folders 'train', 'test' and optionally 'valid' (or 'val', 'validation'), in any
  case (Val/ too, as a macOS filesystem finds it; one folder per split);
- anything else: a TFDS name such as 'cifar10', 'imagenet2012' or 'oxford_flowers102',
  optionally with a config and version ('name/config:1.2.3'). It must already be prepared
  under data_dir: nothing here downloads.

Logical splits (`resolve_tfds_split`, `scan_folder`):
- 'valid' is held out of 'train', so hyperparameters chosen on it are not chosen on data the
  model was trained on. Where a dataset has an official validation split next to its test
  split (dtd, oxford_flowers102) that split is 'valid'; otherwise the first VALID_PERCENT %
  of TFDS 'train' (TFDS shuffles records when it prepares a dataset), and for image folders
  without a valid/ folder every 10th file of each class (sorted by file name), none of a
  class with a single file (it stays in 'train').
- 'trainval' is 'train' plus 'valid': all labelled training data, for pretraining and for
  final runs once hyperparameters are fixed (the BYOL release pretrains on it).
- 'test' is the split results are reported on: 'test' where the dataset has one, else the
  official 'validation' split (ImageNet reports on its validation set).
- ImageNet follows the paper: valid is the first 10,009 train images.
TFDS datasets also accept any raw TFDS split expression (e.g. 'unlabelled' or 'train[:1%]').
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import io
import logging as std_logging
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging

from byol_jax import cli

KINDS = ('demo', 'tfds', 'folder')
LOGICAL_SPLITS = ('train', 'valid', 'trainval', 'test')
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')
VALID_PERCENT = 10  # Held out of train where a dataset has no official validation split.
IMAGENET_VALID_EXAMPLES = 10_009  # The paper's held-out ImageNet validation set.

# The fixed order in which `load_arrays` returns a folder's images (see `_load_folder`).
FOLDER_ORDER_SEED = 0
# Examples per split of the demo dataset when it is loaded through `load_arrays`.
DEMO_SIZES = {'train': 5000, 'valid': 500, 'trainval': 5000, 'test': 1000}

_HELD_OUT = f'train[:{VALID_PERCENT}%]'
_REST = f'train[{VALID_PERCENT}%:]'
_HELD_OUT_SPLITS = dict(train=_REST, valid=_HELD_OUT, trainval='train', test='test')
_OFFICIAL_VALID_SPLITS = dict(train='train', valid='validation', trainval='train+validation',
                              test='test')

# The one table of logical -> TFDS splits. Datasets not listed follow `_derived_splits`, the
# same rule applied to the split names the prepared dataset reports.
TFDS_SPLITS: dict[str, dict[str, str]] = {
  'imagenet2012': dict(train=f'train[{IMAGENET_VALID_EXAMPLES}:]',
                       valid=f'train[:{IMAGENET_VALID_EXAMPLES}]', trainval='train',
                       test='validation'),
  'cifar10': _HELD_OUT_SPLITS,
  'cifar100': _HELD_OUT_SPLITS,
  'stl10': _HELD_OUT_SPLITS,  # Its 100k 'unlabelled' images are a raw split name.
  'caltech101': _HELD_OUT_SPLITS,
  'oxford_iiit_pet': _HELD_OUT_SPLITS,
  'food101': dict(_HELD_OUT_SPLITS, test='validation'),
  'imagenette': dict(_HELD_OUT_SPLITS, test='validation'),
  'dtd': _OFFICIAL_VALID_SPLITS,
  'oxford_flowers102': _OFFICIAL_VALID_SPLITS,
}

_TFDS_NAME = re.compile(r'^[a-z][a-z0-9_]*(/[A-Za-z0-9_.\-]+)?(:\d+\.\d+\.\d+)?$')
_VALID_FORMS = ("valid forms: 'demo', 'folder:/path/to/root' (root/train/<class>/*.jpg), or a "
                "TFDS name such as 'cifar10' or 'imagenet2012'")
# Folder names of the splits of an image folder, matched in any case (see `_split_dir`).
_SPLIT_DIRS = dict(train=('train',), test=('test',), valid=('valid', 'val', 'validation'))
_READABLE_FORMATS = ('JPEG', 'MPO', 'PNG', 'GIF', 'BMP')  # What tf.io.decode_image reads.
_UNREADABLE = 'damaged, or not JPEG, PNG, GIF or BMP inside whatever the extension says'


class DataError(ValueError):
  """A problem with the user's data or its location, explained in one line.

  The command line prints str(error) without a traceback, so the message names the path or
  dataset and says what to do.
  """


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """A parsed dataset name: kind is 'demo', 'tfds' or 'folder'; root is set for folders."""
  kind: str
  name: str
  root: str | None = None


@dataclasses.dataclass(frozen=True)
class FolderSplit:
  """The files of one split of an image folder, in a fixed order (class, then file name)."""
  paths: list[str]
  labels: np.ndarray  # int32 [N]
  class_names: list[str]
  skipped: int  # Files with an image extension that could not be read (validate=True only).


def parse_dataset(name: str) -> DatasetSpec:
  """Turns a --config.dataset value into a DatasetSpec, rejecting malformed names early."""
  text = (name or '').strip()
  if text == 'demo':
    return DatasetSpec('demo', 'demo')
  if text.startswith('folder:'):
    root = text[len('folder:'):].strip()
    if not root:
      raise DataError(f"dataset {name!r} names no folder; {_VALID_FORMS}")
    if message := cli.remote_path_error(root, 'dataset folder'):
      raise DataError(message)
    return DatasetSpec('folder', text, os.path.abspath(os.path.expanduser(root)))
  if _TFDS_NAME.match(text):
    return DatasetSpec('tfds', text)
  raise DataError(f'dataset {name!r} is not a dataset name; {_VALID_FORMS}')


def _check_split(split: str) -> None:
  """Rejects names other than the logical splits (for datasets without raw split names)."""
  if split not in LOGICAL_SPLITS:
    raise DataError(f"split {split!r} is not one of {', '.join(LOGICAL_SPLITS)}")


# ------------------------------------------------------------------------------------------
# TensorFlow / TFDS (imported lazily).
# ------------------------------------------------------------------------------------------


def import_tensorflow(purpose: str = 'the tf.data input pipeline') -> Any:
  """Imports TensorFlow with accelerators hidden from it, or raises DataError."""
  with cli.tensorflow_start_up_filtered():
    try:
      import tensorflow as tf
    except ImportError as e:
      raise DataError(f'{purpose} needs TensorFlow ({e}); install tensorflow-cpu and '
                      "tensorflow-datasets, or use --config.dataset=demo or folder:/path with "
                      '--config.input_mode=device') from None
    _hide_accelerators(tf)
  return tf


@functools.cache
def _hide_accelerators(tf: Any) -> None:
  """Keeps TensorFlow on the CPU, once per process.

  TensorFlow only decodes images on the host here; if it saw the GPUs or TPUs it would
  reserve their memory, which belongs to JAX.
  """
  for kind in ('GPU', 'TPU'):
    try:
      tf.config.set_visible_devices([], kind)
    except (RuntimeError, ValueError):  # Already initialised, or no such device type.
      pass


def import_tfds(spec: DatasetSpec) -> Any:
  """Imports tensorflow_datasets, or raises DataError saying what is missing."""
  import_tensorflow(f'TFDS dataset {spec.name!r}')
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise DataError(f'TFDS dataset {spec.name!r} needs tensorflow-datasets ({e}); pip install '
                    'tensorflow-datasets, or use --config.dataset=folder:/path') from None
  return tfds


def tfds_builder(spec: DatasetSpec, data_dir: str | None = None) -> Any:
  """Returns the TFDS builder of a dataset that is prepared under data_dir.

  Checks preparation before anything reads data: TFDS would otherwise try to download and
  prepare (or hang waiting for the network). Never calls download_and_prepare.
  """
  tfds = import_tfds(spec)
  with _without_variant_folder_warnings():
    try:
      builder = tfds.builder(spec.name, data_dir=data_dir)
    except (tfds.core.DatasetNotFoundError, ValueError, KeyError) as e:
      where = f'data_dir={data_dir}' if data_dir else (
        "TFDS's default data_dir, $TFDS_DATA_DIR or ~/tensorflow_datasets")
      raise DataError(f'TFDS has no dataset {spec.name!r} (and none is prepared under '
                      f'{where}): {one_line(e).rstrip(".")}; {_VALID_FORMS}') from None
    if not builder.is_prepared():
      raise DataError(_not_prepared_message(spec, builder, data_dir))
  return builder


@contextlib.contextmanager
def _without_variant_folder_warnings():
  """TFDS warns 'Variant folder ... has no dataset_info.json' for a half-prepared dataset
  while it looks for one; the not-prepared error below says the same with what to do, so
  the warning would only double it."""
  def keep(record: std_logging.LogRecord) -> bool:
    return not str(record.msg).startswith('Variant folder')

  logger = std_logging.getLogger('absl')
  logger.addFilter(keep)
  try:
    yield
  finally:
    logger.removeFilter(keep)


def _not_prepared_message(spec: DatasetSpec, builder: Any, data_dir: str | None) -> str:
  """One line that says where TFDS looked and how to prepare the dataset there."""
  root = str(data_dir or builder.data_dir_root)
  where = f'TFDS dataset {spec.name!r} is not prepared under data_dir={root} ' \
          f'(looked for {builder.data_dir}/dataset_info.json)'
  build = f'`tfds build {spec.name} --data_dir={root}`'
  if tfds_base_name(spec.name) == 'imagenet2012':
    return (f'{where}: put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar (from '
            f'image-net.org) in {root}/downloads/manual and run {build}')
  if getattr(builder, 'MANUAL_DOWNLOAD_INSTRUCTIONS', None):
    return (f"{where}: put the files from the dataset's manual download instructions in "
            f'{root}/downloads/manual and run {build}')
  return (f'{where}: run {build} on a machine with internet access, then copy the folder '
          f'here or point --config.data_dir at it')


def _derived_splits(available: Sequence[str]) -> dict[str, str]:
  """The split rule for datasets missing from TFDS_SPLITS, from their split names."""
  if 'test' in available and 'validation' in available:
    return _OFFICIAL_VALID_SPLITS
  if 'test' in available:
    return _HELD_OUT_SPLITS
  return dict(_HELD_OUT_SPLITS, test='validation')


def tfds_base_name(name: str) -> str:
  """A TFDS name without its config and version ('voc/2007:5.0.0' -> 'voc')."""
  return name.split('/')[0].split(':')[0]


def tfds_split_table(name: str, available: Sequence[str] = ()) -> dict[str, str]:
  """Logical -> TFDS split expressions for a TFDS dataset name (config/version ignored)."""
  return TFDS_SPLITS.get(tfds_base_name(name)) or _derived_splits(available)


def includes_test_split(spec: DatasetSpec, split: str) -> bool:
  """Whether a pretraining split takes images of the evaluation test split: logical 'test',
  or a TFDS expression with a part named after the test split ('train+test',
  'validation[:50%]' for ImageNet, whose test split is TFDS 'validation')."""
  if split == 'test':
    return True
  if spec.kind != 'tfds':
    return False
  names = {'test', TFDS_SPLITS.get(tfds_base_name(spec.name), {}).get('test', 'test')}
  return any(part.split('[')[0].strip() in names for part in split.split('+'))


def resolve_tfds_split(builder: Any, spec: DatasetSpec, split: str) -> str:
  """The TFDS split expression of a logical split, checked against the prepared dataset."""
  available = list(builder.info.splits.keys())
  expr = tfds_split_table(spec.name, available).get(split, split)
  try:
    builder.info.splits[expr]  # Raises for unknown names and bad slices.
  except (KeyError, ValueError, AssertionError) as e:
    raise DataError(f'TFDS dataset {spec.name!r} has no split {expr!r} (for {split!r}); '
                    f'it has {", ".join(available) or "none"} ({one_line(e)})') from None
  return expr


def tfds_process_split(builder: Any, spec: DatasetSpec, split: str, process_index: int = 0,
                       process_count: int = 1) -> str:
  """This process's disjoint part of a split (TFDS even_splits: contiguous, covering)."""
  tfds = import_tfds(spec)
  expr = resolve_tfds_split(builder, spec, split)
  if process_count == 1:
    return expr
  return tfds.even_splits(expr, n=process_count)[process_index]


def tfds_num_examples(builder: Any, expr: str) -> int:
  """Examples in a TFDS split expression, from the prepared metadata (no reading)."""
  return int(builder.info.splits[expr].num_examples)


def one_line(error: BaseException) -> str:
  """The first line of an exception message, for messages that must stay on one line."""
  lines = str(error).strip().splitlines()
  return lines[0][:200] if lines else type(error).__name__


# ------------------------------------------------------------------------------------------
# Image folders.
# ------------------------------------------------------------------------------------------


def _entries(path: str) -> list[os.DirEntry]:
  """Visible entries of a folder; one that cannot be listed (permissions) is a DataError."""
  try:
    with os.scandir(path) as entries:
      return [e for e in entries if not e.name.startswith('.')]
  except OSError as e:
    raise DataError(f'cannot list {path}: {e.strerror or one_line(e)}') from None


def _subdirs(path: str) -> list[str]:
  """Sorted names of visible subdirectories."""
  return sorted(e.name for e in _entries(path) if e.is_dir())


def _image_files(path: str) -> list[str]:
  """Sorted names of visible files with an image extension (case-insensitive)."""
  return _sorted_entries(path)[0]


def _sorted_entries(path: str) -> tuple[list[str], list[str]]:
  """Sorted names of a folder's visible image files, and of its other visible entries
  (files of other formats, subfolders, broken links), from one listing: a class folder of
  ImageNet holds about 1,300 files."""
  images, others = [], []
  for e in _entries(path):
    is_image = e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)
    (images if is_image else others).append(e.name)
  return sorted(images), sorted(others)


def _train_dir(spec: DatasetSpec) -> str:
  """The train/ folder of a folder dataset, which every folder dataset must have."""
  root = spec.root or ''
  if os.path.isfile(root):
    raise DataError(f'dataset folder {root} is a file: folder: takes the folder that holds '
                    'train/<class_name>/ (and test/)')
  if not os.path.isdir(root):
    raise DataError(f'dataset folder {root} does not exist: create {root}/train/<class_name>/'
                    '<image>.jpg (and test/) or fix the path after folder:')
  train_dir = _split_dir(root, 'train')
  if train_dir is None:
    raise DataError(f'{root}/train is missing: a folder dataset needs '
                    f'{root}/train/<class_name>/<image>.jpg (class names come from train/)')
  _warn_other_folders(root)
  return train_dir


def _warn_other_folders(root: str) -> None:
  """Warns of folders beside train/ that name no split (dev/, eval/, holdout/): their
  images are in no split, and without test/ the trainer skips kNN as if there were none."""
  known = {n for names in _SPLIT_DIRS.values() for n in names}
  other = sorted(e.name + '/' for e in _entries(root)
                 if e.is_dir() and not e.name.startswith('.') and e.name.lower() not in known)
  if other:
    _warn_once(f'ignored folders {", ".join(other[:3])}{" ..." if len(other) > 3 else ""} in '
               f'{root}: split folders are train/, test/ and {_split_names("valid")}; '
               'rename one to use its images')


def _no_test_split(root: str) -> str:
  return f'{root}/test is missing: add test/<class_name>/ folders like train/'


def missing_split(spec: DatasetSpec, split: str) -> str:
  """Why a folder dataset lacks `split` ('' when it has it, or is no folder). Only test/
  can be missing: a missing valid/ is held out of train/. Lets the trainer pretrain on a
  folder of training images alone, without kNN, instead of stopping at its first evaluation."""
  if spec.kind != 'folder' or split != 'test':
    return ''
  root = os.path.dirname(_train_dir(spec))
  return '' if _split_dir(root, 'test') else _no_test_split(root)


def _split_dir(root: str, split: str) -> str | None:
  """The folder of 'train', 'test' or 'valid' under root (a name of _SPLIT_DIRS in any case),
  or None. Any case, because a macOS or Windows filesystem finds Val/ when asked for val/:
  on Linux the same copied dataset lost its validation folder (held out of train instead,
  without a word). Two matching folders (val/ and Val/, or valid/ and val/) are refused:
  one would be used and the other's images would be in no split."""
  names = _SPLIT_DIRS[split]
  found = sorted((e.name for e in _entries(root) if e.is_dir() and e.name.lower() in names),
                 key=lambda n: (names.index(n.lower()), n))
  if len(found) > 1:
    kind = 'validation' if split == 'valid' else split
    raise DataError(f'{root} holds both {" and ".join(n + "/" for n in found)}: keep one '
                    f'{kind} folder ({_split_names(split)})')
  return os.path.join(root, found[0]) if found else None


def _split_names(split: str) -> str:
  """'valid/, val/ or validation/, in any case', say: the folder names a split is found by."""
  names = [n + '/' for n in _SPLIT_DIRS[split]]
  listed = names[0] if len(names) == 1 else f'{", ".join(names[:-1])} or {names[-1]}'
  return f'{listed}, in any case'


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
  """Logs a warning the first time this process says it: a folder is scanned again for each
  split's size, load and evaluation, and one problem said many times reads as many."""
  if message not in _WARNED:
    _WARNED.add(message)
    logging.warning('%s', message)


def _class_dirs(split_dir: str) -> list[str]:
  """Sorted class folder names of a split folder. Image files beside them have no class, so
  no split holds them: a one-line warning (the no-class-folder error says so itself). A
  broken link is refused: the class it names vanished without a word, and every later
  class's label moved down by one."""
  entries = _entries(split_dir)
  if broken := sorted(e.path for e in entries if e.is_symlink() and not os.path.exists(e.path)):
    more = f' (and {len(broken) - 1} more broken links there)' if len(broken) > 1 else ''
    raise DataError(f'{broken[0]} is a link to {os.readlink(broken[0])}, which does not '
                    f'exist: fix or remove it{more}')
  dirs = sorted(e.name for e in entries if e.is_dir())
  loose = sorted(e.name for e in entries
                 if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS))
  if loose and dirs:
    _warn_once(f'ignored {len(loose)} image files directly in {split_dir} (first: '
               f'{loose[0]}): only images in its class folders <class_name>/ are used')
  return dirs


def _class_files(split_dir: str, class_names: list[str]) -> list[list[str]]:
  """Image paths per class; the split's classes must equal train's and none may be empty."""
  found = _class_dirs(split_dir)
  if found != class_names:
    missing = sorted(set(class_names) - set(found))[:3]
    extra = sorted(set(found) - set(class_names))[:3]
    raise DataError(f'class folders of {split_dir} differ from train/: missing {missing}, '
                    f'extra {extra}; every split needs the same <class_name> folders')
  files, ignored = [], []
  for name in class_names:
    class_dir = os.path.join(split_dir, name)
    names, others = _sorted_entries(class_dir)
    ignored += [os.path.join(name, o) for o in others]
    if not names:
      nested = _subdirs(class_dir)[:2]  # Tiny-ImageNet's <class>/images/, say
      where = (f' (its images must lie in it, not in subfolders such as {nested[0]}/)'
               if nested else '')
      raise DataError(f'class folder {class_dir} has no .jpg/.jpeg/.png files{where}: add '
                      'images or remove the folder from every split')
    files.append([os.path.join(class_dir, n) for n in names])
  _warn_ignored(split_dir, ignored)
  return files


def _warn_ignored(split_dir: str, ignored: list[str]) -> None:
  """Warns of entries of class folders that are not .jpg/.jpeg/.png files (a .webp, .gif or
  .tif, a subfolder): no split holds them, and some are images the user meant to use."""
  if ignored:
    _warn_once(f'ignored {len(ignored)} entries of the class folders of {split_dir} (first: '
               f'{ignored[0]}): only .jpg/.jpeg/.png files directly in <class_name>/ are used')


def _held_out(files: list[list[str]], valid: bool) -> list[list[str]]:
  """Every VALID_PERCENT-th file of each class is 'valid'; the rest is 'train'.

  A class with a single file keeps it in 'train': holding it out would take the class out
  of training altogether (a linear head that never sees it), for one validation image.
  """
  step = 100 // VALID_PERCENT
  return [[p for i, p in enumerate(fs) if (i % step == 0 and len(fs) > 1) == valid]
          for fs in files]


def _split_files(train_dir: str, split: str, class_names: list[str]) -> list[list[str]]:
  """Per-class file lists of a logical split of an image folder."""
  root = os.path.dirname(train_dir)
  if split == 'test':
    if (test_dir := _split_dir(root, 'test')) is None:
      raise DataError(f'{_no_test_split(root)}, or evaluate on split valid (linear_eval: '
                      '--config.test_split=valid)')
    return _class_files(test_dir, class_names)
  valid_dir = _split_dir(root, 'valid')
  train = _class_files(train_dir, class_names)
  if valid_dir is None:
    files = train if split == 'trainval' else _held_out(train, split == 'valid')
    if not any(files):  # only 'valid', when every class has a single image
      raise DataError(f'{root} has no valid/ folder, and no class folder of {train_dir} has '
                      'a second image to hold out for validation: add '
                      f'{root}/valid/<class_name>/ folders, or more images')
    return files
  if split == 'train':
    return train
  valid = _class_files(valid_dir, class_names)
  return valid if split == 'valid' else [t + v for t, v in zip(train, valid, strict=True)]


def _check_readable(path: str) -> bool:
  """Cheap check that a file is a complete image: header parse plus end-of-image marker.

  Reading the header catches non-images; the trailer check catches truncated JPEG/PNG files
  without decoding. Only files that fail the trailer check are fully decoded to decide.
  """
  from PIL import Image
  try:
    with Image.open(path) as img:
      if img.format not in _READABLE_FORMATS:
        return False
      fmt = img.format
    with open(path, 'rb') as f:
      f.seek(0, os.SEEK_END)
      f.seek(max(0, f.tell() - 16))
      tail = f.read().rstrip(b'\x00\r\n ')
    if (fmt in ('JPEG', 'MPO') and tail.endswith(b'\xff\xd9')) or \
       (fmt == 'PNG' and tail.endswith(b'IEND\xaeB`\x82')):
      return True
    with Image.open(path) as img:
      img.load()
    return True
  except Exception:  # Pillow raises many exception types for corrupt files.
    return False


def _report_skipped(where: str, skipped: list[str], total: int, strict: bool,
                    whole_split: bool = True) -> None:
  """Logs unreadable files once, or raises DataError for them in strict mode, or when no
  file is readable: an empty split surfaced later as a misleading error (kNN: 'label -1
  throughout') or a traceback (linear evaluation: 'cannot evaluate on an empty set').

  whole_split=False: the files are one process's shard of a multi-process run. A shard
  without a readable file is no empty split (the others may hold the readable ones), and
  one process stopping alone would leave the others waiting in their collectives; it is
  logged, and the process goes on empty (its evaluation batches all masked).
  """
  if not skipped:
    return
  if len(skipped) == total and whole_split:
    raise DataError(f'none of the {total} files under {where} is a readable image '
                    f'({_UNREADABLE}; first: {skipped[0]})')
  if strict:
    raise DataError(f'{len(skipped)} of {total} files under {where} are not readable images '
                    f'({_UNREADABLE}; first: {skipped[0]}); remove them or run without '
                    'strict_data')
  logging.warning('skipped %d of %d unreadable image files under %s (%s; first: %s)',
                  len(skipped), total, where, _UNREADABLE, skipped[0])


# Items timed one by one before choosing threads, and the per-item time from which they pay.
_PROBE_ITEMS = 64
_THREADS_FROM_SEC = 1e-3
# Long decodes (a large folder on a few cores) report progress this often, in chunks of items.
_PROGRESS_EVERY_SEC = 30.0
_CHUNK_ITEMS = 4096


def _parallel_map(fn: Callable[[Any], Any], items: Sequence[Any], what: str = '') -> list[Any]:
  """Maps fn over items in order; in threads only when one call is slow enough to gain.

  Pillow releases the GIL while it decodes, so threads speed up large images (224 px
  ImageNet-sized JPEGs: 3.6 ms each in threads vs 6.6 ms in a row on 2 cores). A 32 px
  CIFAR image decodes in about 0.2 ms, nearly all of it Python holding the GIL, and there
  threads only contend (0.30 ms vs 0.18 ms each); so the first items are timed in a row,
  and the rest go to threads only if those took at least _THREADS_FROM_SEC each. With
  `what` (e.g. 'decoding /data/x (train)'), a map that runs for minutes says how far it is
  every _PROGRESS_EVERY_SEC, and how long it took at the end.
  """
  items = list(items)
  start = time.perf_counter()
  out = [fn(item) for item in items[:_PROBE_ITEMS]]
  rest = items[_PROBE_ITEMS:]
  threaded = bool(rest) and (time.perf_counter() - start) / len(out) >= _THREADS_FROM_SEC
  pool = (concurrent.futures.ThreadPoolExecutor(min(32, (os.cpu_count() or 1) * 2))
          if threaded else None)
  last_report = start
  try:
    for i in range(0, len(rest), _CHUNK_ITEMS):
      chunk = rest[i:i + _CHUNK_ITEMS]
      out += list(pool.map(fn, chunk)) if pool else [fn(item) for item in chunk]
      now = time.perf_counter()
      if what and now - last_report >= _PROGRESS_EVERY_SEC and len(out) < len(items):
        rate = len(out) / (now - start)
        logging.info('%s: %d of %d images (%.0f/s, about %.0f s left)', what, len(out),
                     len(items), rate, (len(items) - len(out)) / rate)
        last_report = now
  finally:
    if pool is not None:
      pool.shutdown()
  if what and last_report > start:  # it reported progress, so it was long: say when done
    logging.info('%s: %d images in %.0f s', what, len(items), time.perf_counter() - start)
  return out


def readable_subset(paths: Sequence[str], labels: np.ndarray, where: str,
                    strict: bool = False,
                    whole_split: bool = True) -> tuple[list[str], np.ndarray, int]:
  """Drops files that are not complete images (`_check_readable`), counting them.

  Unreadable files are logged once; strict=True raises DataError instead, and so does a
  split without one readable file. Streaming pipelines call this on their own shard only,
  so the cost is shared between processes (whole_split=False for a shard of several
  processes: see `_report_skipped`).
  """
  ok = np.asarray(_parallel_map(_check_readable, paths, f'checking {where}'),
                  bool).reshape(-1)
  _report_skipped(where, [p for p, good in zip(paths, ok, strict=True) if not good],
                  len(paths), strict, whole_split)
  kept = [p for p, good in zip(paths, ok, strict=True) if good]
  return kept, np.asarray(labels)[ok], int((~ok).sum())


def scan_folder(root: str, split: str, *, validate: bool = False,
                strict: bool = False) -> FolderSplit:
  """Lists the images of a logical split of root/<split>/<class>/ with their labels.

  Class names are the sorted folder names of train/ (links to folders too; a broken link is
  a DataError); image files beside the class folders have no label and are left out with a
  warning, as are entries of class folders that are not .jpg/.jpeg/.png files (hidden
  files, such as .DS_Store, silently). Only the extension (in any case) is checked unless
  validate=True, which drops unreadable files (see `readable_subset`).
  """
  _check_split(split)
  train_dir = _train_dir(DatasetSpec('folder', root, root))
  class_names = _class_dirs(train_dir)
  if not class_names:
    loose = len(_image_files(train_dir))
    raise DataError(f'{train_dir} has no class folders' + (
      f' (it holds {loose} image files directly)' if loose else '') + ': expected '
                    f'{train_dir}/<class_name>/<image>.jpg')
  files = _split_files(train_dir, split, class_names)
  paths = [p for fs in files for p in fs]
  labels = np.concatenate([np.full(len(fs), i, np.int32) for i, fs in enumerate(files)])
  if not validate:
    return FolderSplit(paths, labels, class_names, 0)
  kept, labels, skipped = readable_subset(paths, labels, f'{root} ({split})', strict)
  return FolderSplit(kept, labels, class_names, skipped)


# ------------------------------------------------------------------------------------------
# Decoding with Pillow (folders and TFDS image bytes alike, so both give the same pixels).
# ------------------------------------------------------------------------------------------


def _to_rgb(img: Any) -> Any:
  """Converts any Pillow mode to 8-bit RGB, dropping alpha as tf.io.decode_image does.

  16-bit greyscale ('I;16*', 'I') is scaled by 255/65535; Pillow's own conversion would clip
  it to white. Palette images go through RGBA so transparency does not warn.
  """
  from PIL import Image
  mode = img.mode
  if mode.startswith('I;16') or mode in ('I', 'F'):
    grey = np.asarray(img, dtype=np.float64) * (255.0 / 65535.0)
    grey = np.clip(np.round(grey), 0, 255).astype(np.uint8)
    return Image.fromarray(np.repeat(grey[..., None], 3, axis=-1))
  if mode in ('P', 'PA'):
    img = img.convert('RGBA')
  return img if img.mode == 'RGB' else img.convert('RGB')


def resize_short_side_and_centre_crop(img: Any, size: int) -> Any:
  """Bicubic resize so the shorter side is `size`, then a centred size x size crop."""
  from PIL import Image
  width, height = img.size
  if (width, height) == (size, size):
    return img
  scale = size / min(width, height)
  new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
  img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
  left, top = (new_w - size) // 2, (new_h - size) // 2
  return img.crop((left, top, left + size, top + size))


def decode_image(source: str | bytes, image_size: int | None = None) -> np.ndarray | None:
  """Decodes a file path or encoded bytes to uint8 RGB [H, W, 3]; None if unreadable."""
  return _decode_and_area(source, image_size)[0]


def _decode_and_area(source: str | bytes, image_size: int | None) -> tuple[np.ndarray | None,
                                                                          float]:
  """`decode_image` and the share of the image's area that its centre square keeps (1 for a
  square image or without image_size)."""
  from PIL import Image
  try:
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
      if img.format not in _READABLE_FORMATS:  # as streamed: tf.data could not decode it
        return None, 1.0
      img.load()
      rgb = _to_rgb(img)
      area = 1.0
      if image_size:
        area = min(rgb.size) / max(rgb.size)
        rgb = resize_short_side_and_centre_crop(rgb, image_size)
      return np.asarray(rgb, dtype=np.uint8), area
  except Exception:  # Pillow raises many exception types for corrupt files.
    return None, 1.0


def centre_square_warning(info: dict[str, Any], where: str, remedy: str) -> str:
  """A warning for data decoded into memory as centre squares that random crops will sample
  ('' when the images were square enough to lose under 5% of their area).

  Why: the release's crops (and the streamed path's) sample the whole image; a crop of the
  resident copy never reaches the part of a wide or tall image outside its centre square.
  """
  area = info.get('centre_square_area', 1.0)
  if area >= 0.95:
    return ''
  return (f'{where}: images are held in memory as their centre squares, on average '
          f'{area:.0%} of each image, so random crops never see the rest; the release crops '
          f'from whole images{remedy}')


def _decode_all(sources: Sequence[Any], names: Sequence[str], image_size: int | None,
                where: str, strict: bool,
                whole_split: bool = True) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
  """Decodes sources in parallel; returns stacked images, kept indices and info's counts:
  skipped (unreadable) and centre_square_area (the mean share of an image that its centre
  square holds, see `centre_square_warning`). whole_split: see `_report_skipped`."""
  results = _parallel_map(lambda s: _decode_and_area(s, image_size), sources,
                          f'decoding {where}')
  decoded = [img for img, _ in results]
  keep = [i for i, img in enumerate(decoded) if img is not None]
  _report_skipped(where, [names[i] for i, img in enumerate(decoded) if img is None],
                  len(sources), strict, whole_split)
  shapes = {decoded[i].shape for i in keep}
  if len(shapes) > 1:
    raise DataError(f'images under {where} have different sizes (e.g. '
                    f'{sorted(shapes)[:2]}): pass image_size to resize them')
  counts = dict(skipped=len(decoded) - len(keep),
                centre_square_area=float(np.mean([results[i][1] for i in keep])) if keep else 1.0)
  if not keep:
    size = image_size or 0
    return np.zeros((0, size, size, 3), np.uint8), np.zeros(0, np.int64), counts
  return np.stack([decoded[i] for i in keep]), np.asarray(keep, np.int64), counts


# ------------------------------------------------------------------------------------------
# Whole-dataset loading and sizes.
# ------------------------------------------------------------------------------------------


def _shard(n: int, process_index: int, process_count: int) -> np.ndarray:
  """Strided indices of this process: disjoint across processes, covering all n."""
  if not 0 <= process_index < process_count:
    raise DataError(f'process_index={process_index} is outside [0, {process_count})')
  return np.arange(process_index, n, process_count)


def _load_demo(split: str, image_size: int | None, seed: int) -> tuple[Any, Any, dict]:
  """The demo dataset; 'valid' is an independent draw from the train distribution."""
  from byol_jax import demo_data
  _check_split(split)
  source, draw_seed = ('test', seed) if split == 'test' else ('train', seed)
  if split == 'valid':
    draw_seed = seed + 1_000_003  # Fresh images from the train distribution.
  images, labels = demo_data.make_demo_dataset(source, DEMO_SIZES[split], image_size or 32,
                                               draw_seed)
  names = list(getattr(demo_data, 'CLASS_NAMES', range(demo_data.NUM_CLASSES)))
  return images, labels, dict(num_classes=demo_data.NUM_CLASSES,
                              class_names=[str(n) for n in names], skipped=0)


def _load_folder(spec: DatasetSpec, split: str, image_size: int | None, strict: bool,
                 shard: Callable[[int], np.ndarray],
                 whole_split: bool = True) -> tuple[Any, Any, dict]:
  """Decodes this process's part of an image-folder split with Pillow, in a shuffled order.

  A folder lists its files class by class; TFDS shuffles records once when it prepares a
  dataset, and this does the same (a fixed permutation, not the run's seed), so that a
  first-N subset (`knn.train_examples`, linear evaluation's `max_examples`) and each
  device's contiguous shard of the resident data hold every class, not the first few.
  """
  found = scan_folder(spec.root or '', split)
  idx = shard(len(found.paths))
  idx = idx[folder_order(len(idx))]  # before decoding: no second copy of the images
  paths = [found.paths[i] for i in idx]
  images, kept, counts = _decode_all(paths, paths, image_size, f'{spec.root} ({split})', strict,
                                     whole_split)
  return images, found.labels[idx][kept], dict(num_classes=len(found.class_names),
                                               class_names=found.class_names, **counts)


def folder_order(n: int) -> np.ndarray:
  """The fixed permutation `load_arrays` applies to a process's n files of a folder split,
  in `scan_folder`'s order; unreadable files are then left out."""
  return np.random.default_rng(FOLDER_ORDER_SEED).permutation(n)


def _tfds_label_names(builder: Any) -> list[str]:
  """Class names of a TFDS dataset's 'label' feature (empty when it has none)."""
  features = builder.info.features
  label = features['label'] if 'label' in features else None
  return list(getattr(label, 'names', None) or [])


def _multilabel_names(builder: Any) -> list[str]:
  """Class names of a TFDS dataset annotated with a set of classes per image and no single
  label (VOC: 'labels', a sequence of class labels); empty for any other dataset."""
  features = builder.info.features
  if 'label' in features or 'labels' not in features:
    return []
  return list(getattr(getattr(features['labels'], 'feature', None), 'names', None) or [])


@functools.cache
def is_multilabel(spec: DatasetSpec, data_dir: str | None = None) -> bool:
  """Whether a dataset labels each image with a set of classes (VOC), not with one (asked
  once per dataset: every split an evaluation loads asks again)."""
  return spec.kind == 'tfds' and bool(_multilabel_names(tfds_builder(spec, data_dir)))


def multilabel_row(example: Mapping[str, Any], num_classes: int) -> np.ndarray:
  """One image's targets [C]: 1 for a class it shows, 0 for one it does not, -1 for a class
  shown only by objects marked difficult ('labels' less 'labels_no_difficult'), which VOC's
  classification protocol leaves out of the score."""
  row = np.zeros(num_classes, np.int8)
  present = np.asarray(example['labels'], np.int64)
  row[present] = -1
  row[np.asarray(example.get('labels_no_difficult', present), np.int64)] = 1
  return row


def _load_tfds(spec: DatasetSpec, split: str, data_dir: str | None, image_size: int | None,
               strict: bool, process_index: int, process_count: int,
               multilabel: bool = False) -> tuple[Any, Any, dict]:
  """Reads this process's part of a TFDS split and decodes it with Pillow."""
  tfds = import_tfds(spec)
  builder = tfds_builder(spec, data_dir)
  if 'image' not in builder.info.features:
    raise DataError(f'TFDS dataset {spec.name!r} has no image feature; it has '
                    f'{", ".join(builder.info.features.keys())}')
  class_names = _multilabel_names(builder) if multilabel else _tfds_label_names(builder)
  if multilabel and not class_names:
    raise DataError(f'TFDS dataset {spec.name!r} has no multi-label \'labels\' feature; it '
                    f'has {", ".join(builder.info.features.keys())}')
  target = ((lambda ex: multilabel_row(ex, len(class_names))) if multilabel
            else (lambda ex: int(ex.get('label', -1))))
  expr = tfds_process_split(builder, spec, split, process_index, process_count)
  ds = builder.as_dataset(split=expr, shuffle_files=False,
                          decoders={'image': tfds.decode.SkipDecoding()})
  encoded, labels = [], []
  for example in tfds.as_numpy(ds):
    encoded.append(bytes(example['image']))
    labels.append(target(example))
  names = [f'{spec.name}[{expr}] #{i}' for i in range(len(encoded))]
  images, kept, counts = _decode_all(encoded, names, image_size, f'{spec.name} ({expr})',
                                     strict, process_count == 1)
  empty = np.zeros((0, len(class_names)) if multilabel else 0, np.int64)
  labels = np.asarray(labels, np.int64)[kept] if labels else empty
  return images, labels, dict(num_classes=len(class_names), class_names=class_names, **counts)


def load_arrays(spec: DatasetSpec, split: str, *, data_dir: str | None = None,
                image_size: int | None = None, strict: bool = False, seed: int = 0,
                process_index: int = 0, process_count: int = 1,
                multilabel: bool = False) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
  """Decodes this process's part of a split into memory, for the device-resident path.

  Returns images uint8 [N, S, S, 3], labels int32 [N] and info dict(num_classes,
  class_names, skipped, centre_square_area). With image_size, images are resized (bicubic)
  so the shorter side is image_size and centre-cropped square (the mean share of an image's
  area kept: centre_square_area); without it all images must share one size. Folders
  are split between processes by stride (every process sees every class), TFDS splits by
  tfds.even_splits. `seed` only changes the demo dataset. Unreadable files are skipped,
  counted in info['skipped'] and logged once; strict=True raises DataError instead.
  multilabel=True (a TFDS dataset where `is_multilabel`) returns targets int32 [N, C] of 1 /
  0 / -1 (`multilabel_row`) instead of labels.
  """
  if multilabel and spec.kind != 'tfds':
    raise DataError(f'multi-label targets come from TFDS datasets (VOC), not {spec.name!r}')
  if spec.kind == 'demo':
    images, labels, info = _load_demo(split, image_size, seed)
    idx = _shard(len(labels), process_index, process_count)
    images, labels = images[idx], labels[idx]
  elif spec.kind == 'folder':
    shard = lambda n: _shard(n, process_index, process_count)
    images, labels, info = _load_folder(spec, split, image_size, strict, shard,
                                        process_count == 1)
  elif spec.kind == 'tfds':
    _shard(0, process_index, process_count)  # Validates the process arguments.
    images, labels, info = _load_tfds(spec, split, data_dir, image_size, strict,
                                      process_index, process_count, multilabel)
  else:
    raise DataError(f'unknown dataset kind {spec.kind!r}; {_VALID_FORMS}')
  return np.ascontiguousarray(images, np.uint8), labels.astype(np.int32), info


def dataset_size(spec: DatasetSpec, split: str, data_dir: str | None = None) -> int:
  """Examples in a split (all processes together), without decoding any image."""
  if spec.kind == 'demo':
    _check_split(split)
    return DEMO_SIZES[split]
  if spec.kind == 'folder':
    return len(scan_folder(spec.root or '', split).paths)
  builder = tfds_builder(spec, data_dir)
  return tfds_num_examples(builder, resolve_tfds_split(builder, spec, split))


def class_names(spec: DatasetSpec, data_dir: str | None = None) -> list[str]:
  """Class names in label order, without decoding any image."""
  if spec.kind == 'demo':
    from byol_jax import demo_data
    return [str(n) for n in getattr(demo_data, 'CLASS_NAMES', range(demo_data.NUM_CLASSES))]
  if spec.kind == 'folder':
    return _class_dirs(_train_dir(spec))
  return _tfds_label_names(tfds_builder(spec, data_dir))


def num_classes(spec: DatasetSpec, data_dir: str | None = None) -> int:
  """Number of classes (label values), without decoding any image."""
  return len(class_names(spec, data_dir))


def decoded_size_bytes(num_examples: int, image_size: int) -> int:
  """Bytes of a decoded uint8 [N, S, S, 3] dataset."""
  return int(num_examples) * int(image_size) ** 2 * 3


INPUT_MODES = ('auto', 'device', 'stream')


def choose_input_mode(num_examples: int, image_size: int, device_memory_bytes: int,
                      override: str = 'auto', max_fraction: float = 0.25) -> tuple[str, str]:
  """'device' when the decoded dataset fits comfortably in one device's memory, else 'stream'.

  Device-resident data skips host decoding after the first load, which is what makes small
  datasets fast; `max_fraction` leaves the rest of the memory for the model and activations.
  Every device holds a full copy, so the per-device memory is what counts. An override of
  'device' or 'stream' wins. Returns the mode and a one-line reason for the log.
  """
  need = decoded_size_bytes(num_examples, image_size)
  sizes = f'{num_examples} images at {image_size} px = {need / 2**30:.2f} GiB decoded'
  budget = f'{max_fraction:.0%} of {device_memory_bytes / 2**30:.1f} GiB device memory'
  if override in ('device', 'stream'):
    return override, f'input_mode={override} was requested ({sizes})'
  if override not in INPUT_MODES:
    raise DataError(f"input_mode={override!r}; valid: {', '.join(INPUT_MODES)}")
  if need <= max_fraction * device_memory_bytes:
    return 'device', f'{sizes} fits in {budget}'
  return 'stream', f'{sizes} exceeds {budget}'
