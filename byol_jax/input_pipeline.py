"""Host-side streaming input (tf.data) for datasets too large to keep on the accelerators.

Why: ImageNet-sized data cannot be decoded into device memory, so the host decodes JPEGs and
takes BYOL's two random-resized crops, as the released BYOL code does; flips, colour, blur
and solarisation then run on the accelerator (`augment`). Crops are taken on the host because
they shrink the data: two 224 px uint8 views are smaller than most decoded ImageNet images.

Choices:
- Each image is read and decoded once (tf.io.decode_image: JPEG, PNG, GIF, BMP) and both
  crops are sliced from it. Two tf.io.decode_and_crop_jpeg calls were measured slower: the
  two crops cover about 1.1 images on average, and the decoder still reads the rows above.
- The crop sampler is written here in TF ops with the same distribution as the device path
  (`augment.sample_crop_box`): area fraction U(area_min, area_max), log-uniform aspect ratio,
  up to 10 candidates, the first that fits at a uniform position, else a centred crop with
  the aspect clamped to the range. tf.image.sample_distorted_bounding_box samples a
  different distribution, so it is not used. Boxes are whole pixels (rounded like
  torchvision), the device path's are fractional; the distributions agree.
- Resizing is bicubic, clipped and rounded to uint8 so host batches stay small. Antialiasing
  is off by default, as in the released BYOL input pipeline: it halves the throughput (TF's
  antialiased kernel is slow) and only matters for crops more than 2x the output size. The
  device path antialiases; pass antialias=True to match it exactly.
- Determinism: every random number comes from stateless ops seeded by (seed, process, element
  index) and tf.data runs in deterministic mode, so a seed fixes the stream.
- Epochs: every epoch of a process is `steps_per_epoch` whole batches of its shard, in a new
  order (the remainder differs per epoch). Image folders get a full per-epoch permutation
  inside the graph, so resuming at `start_step` costs nothing. TFDS datasets are read in file
  order with seeded file shuffling plus a seeded shuffle buffer, rebuilt every few epochs;
  resuming re-reads (without decoding) at most one epoch of records.
- Corrupt files in folders are dropped before streaming (`datasets.readable_subset`); any
  file that still fails to decode is skipped by tf.data and counted (this shifts later
  batches, so a resume is only exact when no such file was met).

TensorFlow is imported on first use, never at import time, so `prefetch_to_device` works on
machines without it; TF is kept off the GPUs and TPUs.
"""

from __future__ import annotations

import collections
import functools
import itertools
import math
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import numpy as np
from absl import logging

from byol_jax import datasets

DEFAULT_CROP_ATTEMPTS = 10
# TFDS pipelines are rebuilt per group of epochs: a group holds up to 8 epochs and about this
# many examples, so small datasets do not pay a rebuild (about 0.1 s) every few batches.
_TFDS_EXAMPLES_PER_PIPELINE = 10_000


def _tf() -> Any:
  """TensorFlow, imported on first use with the accelerators hidden from it."""
  return datasets.import_tensorflow()


def _tfds() -> Any:
  """tensorflow_datasets; only called once `datasets.tfds_builder` has succeeded."""
  import tensorflow_datasets as tfds
  return tfds


def _seed_pair(*entropy: int) -> tuple[int, int]:
  """Two non-negative int64-safe seed words derived from the given integers."""
  words = np.random.SeedSequence([int(e) for e in entropy]).generate_state(2, np.uint32)
  return int(words[0] >> 1), int(words[1] >> 1)


# ------------------------------------------------------------------------------------------
# Per-image ops (TF graph code).
# ------------------------------------------------------------------------------------------


def sample_crop_window(seed: Any, height: Any, width: Any, aug_cfg: Any) -> Any:
  """A random-resized-crop window, int32 [4] = (y, x, h, w), inside a height x width image.

  Same distribution as the device path: candidates with area fraction U(area_min, area_max)
  and log-uniform aspect (w / h); the first that fits, at a uniform whole-pixel position;
  else the largest centred box with the aspect clamped to the range.
  """
  tf = _tf()
  attempts = int(aug_cfg.get('crop_attempts', DEFAULT_CROP_ATTEMPTS))
  h_img, w_img = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
  u = tf.random.stateless_uniform([4, attempts], seed=seed, dtype=tf.float32)
  area = h_img * w_img * _lerp(aug_cfg.crop_area_min, aug_cfg.crop_area_max, u[0])
  log_min, log_max = math.log(aug_cfg.crop_aspect_min), math.log(aug_cfg.crop_aspect_max)
  aspect = tf.exp(_lerp(log_min, log_max, u[1]))
  w = tf.round(tf.sqrt(area * aspect))
  h = tf.round(tf.sqrt(area / aspect))
  fits = (h >= 1) & (w >= 1) & (h <= h_img) & (w <= w_img)
  y = tf.minimum(tf.floor(u[2] * (h_img - h + 1)), h_img - h)
  x = tf.minimum(tf.floor(u[3] * (w_img - w + 1)), w_img - w)
  first = tf.argmax(tf.cast(fits, tf.int32))
  sampled = tf.stack([y, x, h, w])[:, first]
  window = tf.where(tf.reduce_any(fits), sampled, _fallback_window(h_img, w_img, aug_cfg))
  return tf.cast(window, tf.int32)


def _lerp(lo: float, hi: float, u: Any) -> Any:
  """Maps uniforms in [0, 1) to [lo, hi)."""
  return lo + (hi - lo) * u


def _fallback_window(h_img: Any, w_img: Any, aug_cfg: Any) -> Any:
  """Torchvision's fallback: the largest centred box with the aspect clamped to the range."""
  tf = _tf()
  aspect = tf.clip_by_value(w_img / h_img, aug_cfg.crop_aspect_min, aug_cfg.crop_aspect_max)
  h = tf.clip_by_value(tf.round(tf.minimum(h_img, w_img / aspect)), 1.0, h_img)
  w = tf.clip_by_value(tf.round(tf.minimum(w_img, h_img * aspect)), 1.0, w_img)
  return tf.stack([tf.floor((h_img - h) / 2), tf.floor((w_img - w) / 2), h, w])


def _resize_uint8(image: Any, size: int, antialias: bool) -> Any:
  """Bicubic resize of an HWC image to size x size, clipped and rounded to uint8."""
  tf = _tf()
  out = tf.image.resize(image, [size, size], method='bicubic', antialias=antialias)
  out = tf.cast(tf.round(tf.clip_by_value(out, 0.0, 255.0)), tf.uint8)
  return tf.ensure_shape(out, [size, size, 3])


def _decode_windows(encoded: Any, windows_fn: Callable[[Any, Any], list[Any]], size: int,
                    antialias: bool) -> Any:
  """Decodes one image once and resizes the windows windows_fn(height, width): [V, S, S, 3]."""
  tf = _tf()
  image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
  shape = tf.shape(image)
  crops = [image[win[0]:win[0] + win[2], win[1]:win[1] + win[3]]
           for win in windows_fn(shape[0], shape[1])]
  return tf.stack([_resize_uint8(c, size, antialias) for c in crops])


def random_crops(encoded: Any, seed: Any, image_size: int, aug_cfg: Any, num_views: int = 2,
                 antialias: bool = False) -> Any:
  """Random-resized crops of one encoded image, uint8 [num_views, S, S, 3]: BYOL's two
  views, or the one view a linear head trains on (`linear_eval`'s streamed protocol)."""
  tf = _tf()
  seeds = tf.random.experimental.stateless_split(seed, num_views)
  windows = lambda h, w: [sample_crop_window(seeds[i], h, w, aug_cfg) for i in range(num_views)]
  return _decode_windows(encoded, windows, image_size, antialias)


def centre_window(height: Any, width: Any, crop_fraction: float) -> Any:
  """The eval window: a centred square, crop_fraction of the shorter side, int32 [4]."""
  tf = _tf()
  side = tf.maximum(1, tf.cast(crop_fraction * tf.cast(tf.minimum(height, width), tf.float32),
                               tf.int32))
  return tf.stack([(height - side + 1) // 2, (width - side + 1) // 2, side, side])


def centre_crop(encoded: Any, image_size: int, crop_fraction: float,
                antialias: bool = False) -> Any:
  """The eval view of one encoded image, uint8 [S, S, 3]."""
  windows = lambda h, w: [centre_window(h, w, crop_fraction)]
  return _decode_windows(encoded, windows, image_size, antialias)[0]


# ------------------------------------------------------------------------------------------
# Sources: (encoded bytes, label, element index) per example.
# ------------------------------------------------------------------------------------------


@functools.cache
def _dataset_options(threads: int | None) -> Any:
  """Deterministic tf.data options (and a thread count, when one is given)."""
  tf = _tf()
  options = tf.data.Options()
  options.deterministic = True
  if threads:
    options.threading.private_threadpool_size = threads
  return options


def _folder_shard(spec: datasets.DatasetSpec, split: str, process_index: int,
                  process_count: int, strict: bool,
                  fixed_order: bool = False) -> tuple[list[str], np.ndarray, int, int]:
  """This process's readable files of a folder split, its label array, skipped and total.

  fixed_order: in `datasets.load_arrays`'s fixed shuffled order instead of class by class, so
  that a first-N subset of an evaluation pass (`knn.train_examples`) holds every class.
  """
  found = datasets.scan_folder(spec.root or '', split)
  idx = np.arange(len(found.paths))[process_index::process_count]
  if fixed_order:
    idx = idx[datasets.folder_order(len(idx))]
  paths, labels, skipped = datasets.readable_subset(
    [found.paths[i] for i in idx], found.labels[idx],
    f'{spec.root} ({split}, process {process_index})', strict, process_count == 1)
  return paths, labels, skipped, len(found.paths)


def _path_bytes(paths: list[str]) -> list[bytes]:
  """File names as the bytes the OS uses: a name that is not UTF-8 lists as a str with
  surrogate escapes, which tf.constant cannot encode."""
  return [os.fsencode(p) for p in paths]


def _folder_train_source(paths: list[str], labels: np.ndarray, per_epoch: int, start: int,
                         shuffle_seed: int) -> Any:
  """Endless epochs, each a fresh stateless permutation truncated to per_epoch elements.

  Elements carry their index in the stream (epoch * per_epoch + position), which seeds the
  crops; the first epoch starts `start` elements in, so resuming is free.
  """
  tf = _tf()
  paths_t, labels_t = tf.constant(_path_bytes(paths)), tf.constant(labels, tf.int32)
  first_epoch, offset = divmod(start, per_epoch)

  def epoch(e):
    perm = tf.random.experimental.stateless_shuffle(
      tf.range(len(paths), dtype=tf.int64), seed=tf.stack([tf.constant(shuffle_seed,
                                                                        tf.int64), e]))
    index = e * per_epoch + tf.range(per_epoch, dtype=tf.int64)
    begin = tf.where(e == first_epoch, tf.constant(offset, tf.int64), 0)
    return tf.data.Dataset.from_tensor_slices((perm[begin:per_epoch], index[begin:]))

  ds = tf.data.Dataset.counter(first_epoch).flat_map(epoch)
  return ds.map(lambda i, g: dict(encoded=tf.io.read_file(tf.gather(paths_t, i)),
                                  label=tf.gather(labels_t, i), index=g))


def _tfds_epoch_source(builder: Any, expr: Any, epoch: int, per_epoch: int, begin: int,
                       seed_words: tuple[int, int], shuffle_buffer: int) -> Any:
  """One epoch of a TFDS split: seeded file order, seeded shuffle buffer, per_epoch records."""
  tf, tfds = _tf(), _tfds()
  epoch_seed = _seed_pair(*seed_words, epoch)[0]
  read_config = tfds.ReadConfig(shuffle_seed=epoch_seed, try_autocache=False)
  ds = builder.as_dataset(split=expr, shuffle_files=True, read_config=read_config,
                          decoders={'image': tfds.decode.SkipDecoding()})
  ds = ds.shuffle(shuffle_buffer, seed=epoch_seed).take(per_epoch).enumerate().skip(begin)
  return ds.map(lambda k, ex: dict(
    encoded=ex['image'], label=tf.cast(ex.get('label', -1), tf.int32),
    index=epoch * per_epoch + k))


# ------------------------------------------------------------------------------------------
# Train stream.
# ------------------------------------------------------------------------------------------


def _data_errors(batches: Iterator[Any]) -> Iterator[Any]:
  """Re-raises tf.data errors (strict mode: a file failed to decode) as one-line DataErrors."""
  tf = _tf()
  try:
    yield from batches
  except tf.errors.OpError as e:
    raise datasets.DataError(f'an image failed to decode in the input pipeline (strict '
                             f'mode): {datasets.one_line(e)}') from None


class TrainStream:
  """Endless iterator of dict(views=uint8 [B, V, S, S, 3], labels=int32 [B]) batches.

  Also says how the stream is laid out (steps_per_epoch; examples_per_epoch of this process)
  and how many files were skipped: `skipped` when scanning, `decode_failures` while streaming.
  """

  def __init__(self, batches: Iterator[dict[str, np.ndarray]], *, start_index: int,
               steps_per_epoch: int, examples_per_epoch: int, skipped: int):
    self._batches = _data_errors(batches)
    self._next_index = start_index
    self.steps_per_epoch = steps_per_epoch
    self.examples_per_epoch = examples_per_epoch
    self.skipped = skipped
    self.decode_failures = 0

  def __iter__(self) -> TrainStream:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._batches)
    self._count_gaps(batch.pop('index'))
    return batch

  def _count_gaps(self, index: np.ndarray) -> None:
    """Elements missing from the index sequence are files tf.data failed to decode."""
    gaps = int(index[-1]) + 1 - self._next_index - len(index)
    self._next_index = int(index[-1]) + 1
    if gaps > 0:
      if not self.decode_failures:
        logging.warning('input pipeline: %d image(s) failed to decode and were skipped '
                        '(counted in TrainStream.decode_failures; logged once)', gaps)
      self.decode_failures += gaps


def _train_batches(ds: Any, *, image_size: int, aug_cfg: Any, crop_key: int,
                   batch_size: int, strict: bool, threads: int | None, prefetch: int,
                   antialias: bool, num_views: int) -> Any:
  """Decodes num_views crops per element, batches and prefetches; output keeps the index."""
  tf = _tf()

  def decode(ex):
    seed = tf.stack([tf.constant(crop_key, tf.int64), ex['index']])
    views = random_crops(ex['encoded'], seed, image_size, aug_cfg, num_views, antialias)
    return dict(views=views, labels=ex['label'], index=ex['index'])

  ds = ds.map(decode, num_parallel_calls=threads or tf.data.AUTOTUNE)
  if not strict:
    ds = ds.ignore_errors()
  ds = ds.batch(batch_size, drop_remainder=True).prefetch(prefetch)
  return ds.with_options(_dataset_options(threads))


def _steps_per_epoch(total: int, process_count: int, batch_size: int, where: str) -> int:
  """Whole batches per epoch of the smallest shard; DataError when there is not one."""
  steps = (total // process_count) // batch_size
  if steps < 1:
    raise datasets.DataError(
      f'{where} has {total} examples, {total // process_count} per process: fewer than one '
      f'batch of {batch_size}; use a smaller batch or more data')
  return steps


def _folder_batches(spec: datasets.DatasetSpec, split: str, batch_size: int, start: int,
                    seed: int, process_index: int, process_count: int, strict: bool,
                    finish: Callable[[Any], Any]) -> tuple[Iterator[Any], int, int, int]:
  """Batches of an image folder; also steps and examples per epoch and the skipped count."""
  paths, labels, skipped, total = _folder_shard(spec, split, process_index, process_count,
                                                strict)
  steps = _steps_per_epoch(total, process_count, batch_size, spec.root or '')
  per_epoch = min(steps, len(paths) // batch_size) * batch_size  # Less if files were skipped.
  if not per_epoch:
    raise datasets.DataError(f'{spec.root}: only {len(paths)} readable images for process '
                             f'{process_index}, fewer than one batch of {batch_size}')
  shuffle_seed = _seed_pair(seed, process_index, 1)[0]
  source = _folder_train_source(paths, labels, per_epoch, start, shuffle_seed)
  return finish(source).as_numpy_iterator(), steps, per_epoch, skipped


def _tfds_batches(spec: datasets.DatasetSpec, split: str, data_dir: str | None,
                  batch_size: int, start: int, seed: int, process_index: int,
                  process_count: int, shuffle_buffer: int,
                  finish: Callable[[Any], Any]) -> tuple[Iterator[Any], int, int, int]:
  """Batches of consecutive TFDS epochs; one pipeline spans several epochs of small data."""
  builder = datasets.tfds_builder(spec, data_dir)
  expr = datasets.tfds_process_split(builder, spec, split, process_index, process_count)
  steps = _steps_per_epoch(datasets.dataset_size(spec, split, data_dir), process_count,
                           batch_size, spec.name)
  per_epoch = steps * batch_size
  group = max(1, min(8, _TFDS_EXAMPLES_PER_PIPELINE // per_epoch))
  first_epoch, offset = divmod(start, per_epoch)
  seed_words = _seed_pair(seed, process_index, 2)

  def batches():
    for epoch0 in itertools.count(first_epoch, group):
      epochs = [_tfds_epoch_source(builder, expr, e, per_epoch, offset if e == first_epoch
                                   else 0, seed_words, shuffle_buffer)
                for e in range(epoch0, epoch0 + group)]
      yield from finish(functools.reduce(lambda a, b: a.concatenate(b),
                                         epochs)).as_numpy_iterator()

  return batches(), steps, per_epoch, 0


def train_stream(spec: datasets.DatasetSpec, *, batch_size_per_process: int, image_size: int,
                 aug_cfg: Any, data_dir: str | None = None, seed: int = 0,
                 process_index: int = 0, process_count: int = 1, start_step: int = 0,
                 strict: bool = False, split: str = 'train', shuffle_buffer: int = 10_000,
                 threads: int | None = None, prefetch: int = 2,
                 antialias: bool = False, num_views: int = 2) -> TrainStream:
  """Endless, deterministic stream of training batches for this process: views uint8
  [B, num_views, S, S, 3] (BYOL's two; linear evaluation's one) and labels.

  The process reads a disjoint shard (folders: every process_count-th file; TFDS:
  even_splits). Batch t of a stream built with start_step=k equals batch k + t of one built
  with start_step=0 and otherwise the same arguments. `shuffle_buffer` applies to TFDS only
  (folders are permuted exactly); `threads` sets tf.data's private thread pool.
  """
  if spec.kind not in ('folder', 'tfds'):
    raise datasets.DataError(f"dataset {spec.name!r} cannot stream: use input_mode='device'")
  finish = functools.partial(_train_batches, image_size=image_size, aug_cfg=aug_cfg,
                             crop_key=_seed_pair(seed, process_index, 0)[0],
                             batch_size=batch_size_per_process, strict=strict, threads=threads,
                             prefetch=prefetch, antialias=antialias, num_views=num_views)
  start = start_step * batch_size_per_process
  common = dict(batch_size=batch_size_per_process, start=start, seed=seed,
                process_index=process_index, process_count=process_count, finish=finish)
  if spec.kind == 'folder':
    batches, steps, per_epoch, skipped = _folder_batches(spec, split, strict=strict, **common)
  else:
    batches, steps, per_epoch, skipped = _tfds_batches(spec, split, data_dir,
                                                       shuffle_buffer=shuffle_buffer, **common)
  return TrainStream(batches, start_index=start, steps_per_epoch=steps,
                     examples_per_epoch=per_epoch, skipped=skipped)


# ------------------------------------------------------------------------------------------
# Eval stream.
# ------------------------------------------------------------------------------------------


class EvalStream:
  """A finite pass over a split: dict(images uint8 [B, S, S, 3], labels int32 [B], mask bool).

  Iterable more than once (each iteration is a new pass). Every process yields num_batches
  batches, so collective evaluation steps line up; padding rows have mask False.
  """

  def __init__(self, make_dataset: Callable[[], Any], *, batch_size: int, image_size: int,
               num_batches: int, num_examples: int):
    self._make_dataset = make_dataset
    self.batch_size = batch_size
    self.image_size = image_size
    self.num_batches = num_batches
    self.num_examples = num_examples

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    produced = 0
    for batch in _data_errors(self._make_dataset().as_numpy_iterator()):
      yield self._pad(batch)
      produced += 1
    for _ in range(produced, self.num_batches):
      yield self._pad(dict(images=np.zeros((0, self.image_size, self.image_size, 3), np.uint8),
                           labels=np.zeros(0, np.int32)))

  def __len__(self) -> int:
    return self.num_batches

  def _pad(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Pads a batch to batch_size rows with zeros; mask marks the real rows."""
    n = len(batch['labels'])
    pad = self.batch_size - n
    out = {k: np.concatenate([v, np.zeros((pad, *v.shape[1:]), v.dtype)]) if pad else v
           for k, v in batch.items()}
    out['mask'] = np.arange(self.batch_size) < n
    return out


def _eval_dataset(source: Any, *, image_size: int, crop_fraction: float, batch_size: int,
                  strict: bool, threads: int | None, antialias: bool) -> Any:
  """Centre crops, batched without dropping the remainder."""
  tf = _tf()
  crop = lambda encoded: centre_crop(encoded, image_size, crop_fraction, antialias)
  ds = source.map(lambda ex: dict(images=crop(ex['encoded']), labels=ex['label']),
                  num_parallel_calls=threads or tf.data.AUTOTUNE)
  if not strict:
    ds = ds.ignore_errors()
  return ds.batch(batch_size).prefetch(2).with_options(_dataset_options(threads))


def _folder_eval_source(paths: list[str], labels: np.ndarray) -> Any:
  """Files in the order given (`eval_stream`: `datasets.load_arrays`'s fixed shuffled one)."""
  tf = _tf()
  ds = tf.data.Dataset.from_tensor_slices((_path_bytes(paths), labels.astype(np.int32)))
  return ds.map(lambda p, y: dict(encoded=tf.io.read_file(p), label=y))


def _tfds_eval_source(builder: Any, expr: Any) -> Any:
  """Records in file order, images left encoded."""
  tf, tfds = _tf(), _tfds()
  ds = builder.as_dataset(split=expr, shuffle_files=False,
                          decoders={'image': tfds.decode.SkipDecoding()})
  return ds.map(lambda ex: dict(encoded=ex['image'],
                                label=tf.cast(ex.get('label', -1), tf.int32)))


def eval_stream(spec: datasets.DatasetSpec, split: str, *, batch_size: int, image_size: int,
                data_dir: str | None = None, crop_fraction: float = 0.875,
                process_index: int = 0, process_count: int = 1, strict: bool = False,
                threads: int | None = None, antialias: bool = False) -> EvalStream:
  """One pass over this process's shard of a split with the eval preprocessing.

  Centre crop of crop_fraction of the shorter side, bicubic resize to image_size. The last
  batch is padded (mask False), and processes with fewer examples add fully masked batches.
  """
  if spec.kind not in ('folder', 'tfds'):
    raise datasets.DataError(f"dataset {spec.name!r} cannot stream: use input_mode='device'")
  if spec.kind == 'folder':
    paths, labels, _, total = _folder_shard(spec, split, process_index, process_count, strict,
                                            fixed_order=True)
    source_fn = lambda: _folder_eval_source(paths, labels)
    mine = len(paths)
  else:
    builder = datasets.tfds_builder(spec, data_dir)
    expr = datasets.tfds_process_split(builder, spec, split, process_index, process_count)
    total = datasets.dataset_size(spec, split, data_dir)
    mine = datasets.tfds_num_examples(builder, expr)
    source_fn = lambda: _tfds_eval_source(builder, expr)
  make = lambda: _eval_dataset(source_fn(), image_size=image_size, crop_fraction=crop_fraction,
                               batch_size=batch_size, strict=strict, threads=threads,
                               antialias=antialias)
  num_batches = math.ceil(math.ceil(total / process_count) / batch_size)
  return EvalStream(make, batch_size=batch_size, image_size=image_size,
                    num_batches=num_batches, num_examples=mine)


# ------------------------------------------------------------------------------------------
# Device prefetch (no TensorFlow).
# ------------------------------------------------------------------------------------------


def _put(batch: Any, sharding: jax.sharding.Sharding) -> Any:
  """Places a host batch on the devices; each process contributes its local rows."""
  if sharding.is_fully_addressable:
    return jax.tree.map(lambda x: jax.device_put(x, sharding), batch)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def prefetch_to_device(iterator: Iterable[Any], size: int,
                       sharding: jax.sharding.Sharding) -> Iterator[Any]:
  """Yields the batches of iterator as jax Arrays, keeping `size` transfers in flight.

  device_put is asynchronous, so the copies of the next batches overlap the current step.
  With a sharding that spans several processes each process passes its local rows.
  """
  queue: collections.deque[Any] = collections.deque()
  iterator = iter(iterator)

  def enqueue(n: int) -> None:
    for batch in itertools.islice(iterator, n):
      queue.append(_put(batch, sharding))

  enqueue(max(1, size))
  while queue:
    yield queue.popleft()
    enqueue(1)
