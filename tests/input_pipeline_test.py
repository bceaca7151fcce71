"""Tests of the tf.data streaming input: crop sampler, determinism, sharding, TFDS, eval."""

import math
import os

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from byol_jax import datasets, input_pipeline

tf = pytest.importorskip('tensorflow')
tfds = pytest.importorskip('tensorflow_datasets')

KS_C_001 = 1.949  # Kolmogorov-Smirnov critical constant for alpha = 0.001.
TINY = 'byol_tiny_images'


@pytest.fixture(scope='module')
def aug_cfg():
  try:
    from byol_jax import augment
    return augment.default_augment_config()
  except ImportError:
    return ml_collections.ConfigDict(dict(crop_area_min=0.08, crop_area_max=1.0,
                                          crop_aspect_min=3 / 4, crop_aspect_max=4 / 3))


def _noise_image(seed: int, size=(24, 20)) -> Image.Image:
  return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size[::-1], 3),
                                                                np.uint8))


@pytest.fixture(scope='module')
def unique_folder(tmp_path_factory) -> datasets.DatasetSpec:
  """12 classes with one noise image each, so a label identifies an image."""
  root = tmp_path_factory.mktemp('unique')
  for i in range(12):
    for split in ('train', 'test'):
      os.makedirs(root / split / f'c{i:02d}')
      _noise_image(i).save(root / split / f'c{i:02d}' / ('x.jpg' if i % 3 else 'x.png'))
  return datasets.parse_dataset(f'folder:{root}')


@pytest.fixture(scope='module')
def tiny_tfds(tmp_path_factory) -> str:
  """A real prepared TFDS dataset (24 train, 10 test records, a unique label each)."""
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  features = tfds.features.FeaturesDict({
    'image': tfds.features.Image(shape=(None, None, 3)),
    'label': tfds.features.ClassLabel(num_classes=24)})

  def split(n, seed):
    images = np.random.default_rng(seed).integers(0, 256, (n, 18, 22, 3), np.uint8)
    return tf.data.Dataset.from_tensor_slices({'image': images, 'label': np.arange(n)})

  tfds.dataset_builders.store_as_tfds_dataset(
    name=TINY, version='1.0.0', features=features, data_dir=data_dir,
    split_datasets={'train': split(24, 0), 'test': split(10, 1)})
  return data_dir


def _windows(shape, count, aug_cfg, seed=0):
  """count crop windows (y, x, h, w) for an image of shape (H, W), as numpy."""
  height, width = shape
  ds = tf.data.Dataset.range(count).map(lambda i: input_pipeline.sample_crop_window(
    tf.stack([tf.constant(seed, tf.int64), i]), height, width, aug_cfg))
  return next(iter(ds.batch(count))).numpy().astype(np.int64)


def _ks_uniform(samples, lo, hi):
  """One-sample KS statistic of samples against U(lo, hi)."""
  x = np.sort((np.asarray(samples) - lo) / (hi - lo))
  n = len(x)
  return max(np.max(np.arange(1, n + 1) / n - x), np.max(x - np.arange(n) / n))


def _ks_two_sample(a, b):
  grid = np.sort(np.concatenate([a, b]))
  cdf = lambda s: np.searchsorted(np.sort(s), grid, side='right') / len(s)
  return np.max(np.abs(cdf(a) - cdf(b)))


def _reference_windows(rng, count, height, width, aug_cfg, attempts=10):
  """Torchvision's rejection sampler in numpy: area and log-aspect of accepted crops."""
  area = height * width * rng.uniform(aug_cfg.crop_area_min, aug_cfg.crop_area_max,
                                      (count, attempts))
  log_aspect = rng.uniform(math.log(aug_cfg.crop_aspect_min), math.log(aug_cfg.crop_aspect_max),
                           (count, attempts))
  w = np.round(np.sqrt(area * np.exp(log_aspect)))
  h = np.round(np.sqrt(area / np.exp(log_aspect)))
  fits = (w <= width) & (h <= height)
  first = np.argmax(fits, axis=1)
  rows = np.arange(count)
  assert fits.any(axis=1).all()
  return h[rows, first] * w[rows, first] / (height * width), np.log(w / h)[rows, first]


def test_crop_sampler_follows_the_paper_distributions(aug_cfg):
  """A biased crop sampler would change what BYOL learns without any error."""
  height = width = 2000
  y, x, h, w = _windows((height, width), 10_000, aug_cfg).T
  assert (y >= 0).all() and (x >= 0).all() and (y + h <= height).all() and (x + w <= width).all()
  area, log_aspect = h * w / (height * width), np.log(w / h)
  small = area < 0.5  # No candidate of this area can be rejected, so these are exact.
  crit = KS_C_001 / math.sqrt(small.sum())
  assert _ks_uniform(area[small], aug_cfg.crop_area_min, 0.5) < crit
  assert _ks_uniform(log_aspect[small], math.log(3 / 4), math.log(4 / 3)) < crit
  assert _ks_uniform(y[h < height] / (height - h[h < height]), 0, 1) < KS_C_001 / 90
  ref_area, ref_aspect = _reference_windows(np.random.default_rng(0), 100_000, height, width,
                                            aug_cfg)
  crit2 = KS_C_001 * math.sqrt(1 / 10_000 + 1 / 100_000)
  assert _ks_two_sample(area, ref_area) < crit2
  assert _ks_two_sample(log_aspect, ref_aspect) < crit2


@pytest.mark.parametrize('shape', [(1, 1), (3, 500), (500, 3), (7, 9), (64, 48)])
def test_crop_windows_stay_inside_the_image(aug_cfg, shape):
  """A window outside the image would crash decoding or read garbage."""
  y, x, h, w = _windows(shape, 300, aug_cfg).T
  assert (h >= 1).all() and (w >= 1).all() and (y >= 0).all() and (x >= 0).all()
  assert (y + h <= shape[0]).all() and (x + w <= shape[1]).all()


def test_crop_fallback_is_centred_with_clamped_aspect(aug_cfg):
  """Without a fitting candidate the crop must be torchvision's centred fallback."""
  assert _windows((10, 500), 5, aug_cfg).tolist() == [[0, 243, 10, 13]] * 5
  assert _windows((500, 10), 5, aug_cfg).tolist() == [[243, 0, 13, 10]] * 5


def _stream(spec, aug_cfg, **kwargs):
  kwargs = dict(dict(batch_size_per_process=4, image_size=8, aug_cfg=aug_cfg,
                     split='trainval'), **kwargs)
  return input_pipeline.train_stream(spec, **kwargs)


def _take(stream, n):
  return [next(stream) for _ in range(n)]


def test_stream_is_deterministic_and_resumable(unique_folder, aug_cfg):
  """Resuming a run must continue the exact stream an uninterrupted run would have seen."""
  full = _take(_stream(unique_folder, aug_cfg), 7)
  assert full[0]['views'].shape == (4, 2, 8, 8, 3) and full[0]['views'].dtype == np.uint8
  assert full[0]['labels'].dtype == np.int32
  epoch0 = np.concatenate([b['labels'] for b in full[:3]])
  assert sorted(epoch0.tolist()) == list(range(12))  # An epoch is a permutation.
  assert not np.array_equal(full[0]['views'][:, 0], full[0]['views'][:, 1])
  again = _take(_stream(unique_folder, aug_cfg), 3)
  for a, b in zip(full[:3], again, strict=True):
    np.testing.assert_array_equal(a['views'], b['views'])
  other = next(_stream(unique_folder, aug_cfg, seed=1))
  assert not np.array_equal(other['views'], full[0]['views'])
  for start in (2, 4):  # Inside the first epoch and across an epoch boundary.
    resumed = _take(_stream(unique_folder, aug_cfg, start_step=start), 7 - start)
    for a, b in zip(full[start:], resumed, strict=True):
      np.testing.assert_array_equal(a['labels'], b['labels'])
      np.testing.assert_array_equal(a['views'], b['views'])


def test_process_shards_are_disjoint_and_cover(unique_folder, aug_cfg):
  """Processes that read overlapping shards would see some images twice per epoch."""
  for count in (2, 3):
    seen = [next(_stream(unique_folder, aug_cfg, batch_size_per_process=12 // count,
                         process_index=i, process_count=count))['labels'] for i in range(count)]
    flat = np.concatenate(seen)
    assert len(flat) == len(set(flat.tolist())) == 12


def test_mixed_formats_and_corrupt_files_stream(tmp_path, aug_cfg):
  """Odd colour modes must stream in the right colours; corrupt files must be skipped."""
  from datasets_test import write_corrupt_images, write_mixed_images
  expected = write_mixed_images(tmp_path / 'train' / 'a')
  write_corrupt_images(tmp_path / 'train' / 'a')
  spec = datasets.parse_dataset(f'folder:{tmp_path}')
  stream = _stream(spec, aug_cfg, batch_size_per_process=6, split='trainval')
  assert stream.skipped == 3
  batch = next(stream)
  assert sorted(batch['labels'].tolist()) == [0] * 6
  colours = {tuple(np.round(v.reshape(-1, 3).mean(0))) for v in batch['views']}
  for colour in expected.values():
    if colour is not None:
      assert any(np.abs(np.subtract(c, colour)).max() <= 4 for c in colours), colour
  with pytest.raises(datasets.DataError, match='z_t'):
    _stream(spec, aug_cfg, strict=True)


def test_decode_failures_after_the_scan_are_skipped_and_counted(tmp_path, aug_cfg, monkeypatch):
  """A file that only fails in tf.data must not stop training (or must, in strict mode)."""
  from datasets_test import make_folder, write_corrupt_images
  root = make_folder(tmp_path, per_class=4, splits=('train',))
  write_corrupt_images(tmp_path / 'train' / 'cat')
  monkeypatch.setattr(datasets, '_check_readable', lambda path: True)
  stream = _stream(datasets.parse_dataset(f'folder:{root}'), aug_cfg)
  _take(stream, 4)  # 11 files, 8 per epoch: two epochs must meet a corrupt file.
  assert stream.skipped == 0 and stream.decode_failures >= 1
  strict = _stream(datasets.parse_dataset(f'folder:{root}'), aug_cfg, strict=True)
  with pytest.raises(datasets.DataError, match='decode'):
    _take(strict, 4)
  spec = datasets.parse_dataset(f'folder:{root}')
  evals = list(input_pipeline.eval_stream(spec, 'trainval', batch_size=4, image_size=8))
  assert sum(b['mask'].sum() for b in evals) == 8 and len(evals) == 3  # 11 listed, 8 decode.
  with pytest.raises(datasets.DataError, match='decode'):
    list(input_pipeline.eval_stream(spec, 'trainval', batch_size=4, image_size=8, strict=True))


def test_eval_stream_pads_and_masks(unique_folder):
  """Padded rows counted as real would bias accuracy; missing batches would hang pjit."""
  stream = input_pipeline.eval_stream(unique_folder, 'test', batch_size=5, image_size=8)
  batches = list(stream)
  assert len(batches) == len(stream) == 3
  assert [b['mask'].sum() for b in batches] == [5, 5, 2]
  assert batches[-1]['images'].shape == (5, 8, 8, 3) and batches[-1]['labels'].dtype == np.int32
  # The resident loader's fixed shuffled order, not class by class: a first-N subset of the
  # pass (knn.train_examples) then holds every class, as it does from decoded arrays.
  order = np.concatenate([b['labels'][b['mask']] for b in batches]).tolist()
  assert order == datasets.folder_order(12).tolist() != list(range(12))
  assert order == datasets.load_arrays(unique_folder, 'test')[1].tolist()
  assert not batches[-1]['images'][2:].any()
  parts = [list(input_pipeline.eval_stream(unique_folder, 'test', batch_size=4, image_size=8,
                                           process_index=i, process_count=5)) for i in range(5)]
  assert {len(p) for p in parts} == {1}  # 12 over 5 processes: 3 or 2 each, one batch.
  labels = [b['labels'][b['mask']] for p in parts for b in p]
  assert sorted(np.concatenate(labels).tolist()) == list(range(12))


def test_eval_centre_crop(tmp_path):
  """The eval crop must be the centred 0.875 of the shorter side, resized."""
  image = np.zeros((40, 80, 3), np.uint8)
  image[:, :] = (255, 0, 0)
  image[3:37, 23:57] = (0, 255, 0)  # The 35 px centre crop is 2.5:37.5 x 22.5:57.5.
  os.makedirs(tmp_path / 'train' / 'a')
  Image.fromarray(image).save(tmp_path / 'train' / 'a' / 'x.png')
  spec = datasets.parse_dataset(f'folder:{tmp_path}')
  batch = next(iter(input_pipeline.eval_stream(spec, 'trainval', batch_size=1, image_size=7)))
  crop = batch['images'][0].astype(int)
  assert crop[1:6, 1:6, 1].min() > 230 and crop[1:6, 1:6, 0].max() < 25


def _write_mock_metadata(data_dir: str, name: str, sizes: dict[str, int]) -> None:
  """dataset_info.json with split sizes, so the dataset counts as prepared for the mock."""
  builder = tfds.builder(name, data_dir=data_dir)
  template = tfds.core.ShardedFileTemplate(data_dir=builder.data_dir, dataset_name=name,
                                           filetype_suffix='tfrecord', split='train')
  builder.info.set_splits(tfds.core.SplitDict([
    tfds.core.SplitInfo(name=s, shard_lengths=[n], num_bytes=0,
                        filename_template=template.replace(split=s)) for s, n in sizes.items()]))
  os.makedirs(builder.data_dir, exist_ok=True)
  builder.info.write_to_directory(builder.data_dir)


def test_tfds_cifar10_mock(tmp_path, aug_cfg):
  """The TFDS path (train_stream, eval_stream, load_arrays) must work on cifar10's features."""
  data_dir = str(tmp_path)
  _write_mock_metadata(data_dir, 'cifar10', dict(train=40, test=40))
  spec = datasets.parse_dataset('cifar10')
  with tfds.testing.mock_data(num_examples=40, data_dir=data_dir):
    assert datasets.dataset_size(spec, 'train', data_dir) == 36
    images, labels, info = datasets.load_arrays(spec, 'test', data_dir=data_dir)
    assert images.shape == (40, 32, 32, 3) and labels.dtype == np.int32
    assert info['num_classes'] == 10 and info['skipped'] == 0
    stream = input_pipeline.train_stream(spec, batch_size_per_process=8, image_size=16,
                                         aug_cfg=aug_cfg, data_dir=data_dir)
    batches = _take(stream, 5)  # Crosses the epoch boundary (4 steps per epoch).
    assert batches[4]['views'].shape == (8, 2, 16, 16, 3)
    assert stream.steps_per_epoch == 4 and stream.decode_failures == 0
    evals = list(input_pipeline.eval_stream(spec, 'test', batch_size=16, image_size=16,
                                            data_dir=data_dir))
    assert [b['mask'].sum() for b in evals] == [16, 16, 8]


def test_tfds_stream_shards_determinism_and_resume(tiny_tfds, aug_cfg):
  """Real TFDS reading: disjoint shards, same seed same stream, exact resume."""
  spec = datasets.parse_dataset(TINY)
  run = lambda **kw: input_pipeline.train_stream(
    spec, batch_size_per_process=4, image_size=8, aug_cfg=aug_cfg, data_dir=tiny_tfds,
    split='trainval', **kw)
  full = _take(run(), 13)  # 6 steps per epoch.
  assert sorted(np.concatenate([b['labels'] for b in full[:6]]).tolist()) == list(range(24))
  for a, b in zip(full[7:], _take(run(start_step=7), 6), strict=True):
    np.testing.assert_array_equal(a['views'], b['views'])
  seen = [np.concatenate([b['labels'] for b in _take(run(process_index=i, process_count=3), 2)])
          for i in range(3)]
  assert sorted(np.concatenate(seen).tolist()) == list(range(24))
  parts = [list(input_pipeline.eval_stream(spec, 'test', batch_size=4, image_size=8,
                                           data_dir=tiny_tfds, process_index=i, process_count=2))
           for i in range(2)]
  assert [len(p) for p in parts] == [2, 2]
  labels = np.concatenate([b['labels'][b['mask']] for p in parts for b in p])
  assert sorted(labels.tolist()) == list(range(10))


def test_tfds_load_arrays_shards(tiny_tfds):
  """load_arrays on TFDS must split the data between processes without overlap."""
  spec = datasets.parse_dataset(TINY)
  parts = [datasets.load_arrays(spec, 'trainval', data_dir=tiny_tfds, image_size=16,
                                process_index=i, process_count=3) for i in range(3)]
  assert parts[0][0].shape[1:] == (16, 16, 3)
  assert sorted(np.concatenate([p[1] for p in parts]).tolist()) == list(range(24))
  assert datasets.dataset_size(spec, 'valid', tiny_tfds) + \
    datasets.dataset_size(spec, 'train', tiny_tfds) == 24


def test_prefetch_to_device_keeps_order():
  """Prefetching must not drop, reorder or alter batches."""
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  batches = [dict(x=np.full((2, 3), i), y=np.arange(2) + i) for i in range(5)]
  out = list(input_pipeline.prefetch_to_device(iter(batches), 2, sharding))
  assert len(out) == 5 and isinstance(out[0]['x'], jax.Array)
  for a, b in zip(batches, out, strict=True):
    np.testing.assert_array_equal(a['x'], b['x'])
    np.testing.assert_array_equal(a['y'], b['y'])


def test_file_names_that_are_not_utf8_stream(tmp_path, aug_cfg):
  """Linux file names are bytes: one written by a Latin-1 tool (an unpacked zip, say) lists
  as a str with surrogate escapes, which Pillow opens but tf.constant refused ('Error
  converting unicode string'), so the stream and the eval pass stopped at their start."""
  class_dir = os.path.join(os.fsencode(tmp_path), b'train', b'a')
  os.makedirs(class_dir)
  for name in (b'caf\xe9.jpg', b'plain.png'):
    try:
      _noise_image(len(name)).save(os.path.join(class_dir, name))
    except OSError:  # A file system that only takes UTF-8 names (macOS).
      pytest.skip('file system refuses names that are not UTF-8')
  spec = datasets.parse_dataset(f'folder:{tmp_path}')
  batch = next(_stream(spec, aug_cfg, batch_size_per_process=2))
  assert batch['labels'].tolist() == [0, 0]
  evals = list(input_pipeline.eval_stream(spec, 'trainval', batch_size=2, image_size=8))
  assert [b['mask'].sum() for b in evals] == [2]
