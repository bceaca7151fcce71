"""Tests of the built-in demo dataset: determinism, format, balance, that shape, not colour,
carries the label, and the properties that make it learnable in the demo's budget."""

import time

import numpy as np
import pytest

from byol_jax import demo_data


def _nearest_class_mean(train_f, train_y, test_f, test_y):
  means = np.stack([train_f[train_y == c].mean(0) for c in range(demo_data.NUM_CLASSES)])
  dist = ((test_f[:, None, :] - means[None]) ** 2).sum(-1)
  return np.mean(dist.argmin(1) == test_y)


def _one_nn(train_f, train_y, test_f, test_y):
  def unit(f):
    f = f - f.mean(1, keepdims=True)
    return f / np.linalg.norm(f, axis=1, keepdims=True)

  return np.mean(train_y[(unit(test_f) @ unit(train_f).T).argmax(1)] == test_y)


def _spectrum(images):
  """Per-image |FFT| summed over channels: invariant to translation and colour sign."""
  x = images.astype(np.float64) / 255.0
  x = x - x.mean((1, 2), keepdims=True)
  mag = np.abs(np.fft.fft2(x, axes=(1, 2))).sum(-1).reshape(len(x), -1)
  return np.log1p(10.0 * mag / np.linalg.norm(mag, axis=1, keepdims=True))


@pytest.fixture(scope="module")
def splits():
  return (demo_data.make_demo_dataset("train", 2000, seed=3),
          demo_data.make_demo_dataset("test", 500, seed=3))


def test_deterministic_by_seed_and_split():
  """Breaks if generation uses global RNG state or train and test share a random stream."""
  a_x, a_y = demo_data.make_demo_dataset("train", 50, seed=1)
  b_x, b_y = demo_data.make_demo_dataset("train", 50, seed=1)
  assert a_x.tobytes() == b_x.tobytes() and a_y.tobytes() == b_y.tobytes()
  t_x, _ = demo_data.make_demo_dataset("test", 50, seed=1)
  o_x, _ = demo_data.make_demo_dataset("train", 50, seed=2)
  assert not np.array_equal(a_x, t_x) and not np.array_equal(a_x, o_x)
  with pytest.raises(ValueError):
    demo_data.make_demo_dataset("validation", 10)


def test_shapes_dtypes_and_balance():
  """Breaks if the format drifts from uint8 NHWC / int32 or classes become unbalanced."""
  x, y = demo_data.make_demo_dataset("train", 105, image_size=24)
  assert x.shape == (105, 24, 24, 3) and x.dtype == np.uint8
  assert y.shape == (105,) and y.dtype == np.int32
  counts = np.bincount(y, minlength=demo_data.NUM_CLASSES)
  assert counts.max() - counts.min() <= 1 and counts.sum() == 105
  assert len(demo_data.CLASS_NAMES) == demo_data.NUM_CLASSES == 10
  assert x.std() > 20  # Not blank: shapes and colours vary.


def test_generation_is_fast():
  """Breaks if generation stops being vectorised (10k images must take seconds, not minutes)."""
  start = time.perf_counter()
  demo_data.make_demo_dataset("train", 10_000)
  assert time.perf_counter() - start < 10.0  # About 1 s on 2 CPU cores; loose for CI noise.


def test_colour_does_not_carry_the_label(splits):
  """Breaks if colour correlates with class, which would let an encoder skip shape."""
  (tr_x, tr_y), (te_x, te_y) = splits
  pixels = lambda x: x.reshape(len(x), -1, 3).astype(np.float64)
  # The 5th and 95th percentiles per channel estimate the background and foreground
  # colours themselves: close to chance (0.1; about 0.14 measured).
  def colours(x):
    return np.concatenate([np.percentile(pixels(x), 5, axis=1),
                           np.percentile(pixels(x), 95, axis=1)], 1)
  assert _nearest_class_mean(colours(tr_x), tr_y, colours(te_x), te_y) < 0.2
  # Mean and std also reflect how much of the image the shape covers, which is a property of
  # the shape (a filled square covers more than a ring), hence the looser bound (about 0.27).
  def stats(x):
    return np.concatenate([pixels(x).mean(1), pixels(x).std(1)], 1)
  assert _nearest_class_mean(stats(tr_x), tr_y, stats(te_x), te_y) < 0.3


def test_light_shapes_on_dark_backgrounds_near_the_centre(splits):
  """Breaks if the contrast sign becomes random again (BYOL then learns colour, not shape, in
  the demo's budget) or shapes drift off-centre or shrink (crops would then miss them)."""
  fg, bg = demo_data._colours(np.random.default_rng(0), 1000)
  assert (fg.min(1) > bg.max(1)).all()  # Every channel of the shape is the lighter one.
  (x, _), _ = splits
  size = x.shape[1]
  lum = x.astype(np.float64).mean(-1) / 255.0
  border = np.concatenate([lum[:, 0], lum[:, -1], lum[:, :, 0], lum[:, :, -1]], 1)
  assert border.mean(1).max() < 0.4  # The image edge is background.
  light = lum > 0.45
  grid = np.arange(size) + 0.5
  count = light.sum((1, 2))
  cy = (light * grid[None, :, None]).sum((1, 2)) / count
  cx = (light * grid[None, None, :]).sum((1, 2)) / count
  assert np.maximum(abs(cy - size / 2), abs(cx - size / 2)).max() < 0.15 * size
  extent = np.maximum(light.any(2).sum(1), light.any(1).sum(1)) / size
  assert extent.mean() > 0.7 and extent.min() > 0.25  # About 0.78 and 0.28 measured.


def test_shape_carries_the_label(splits):
  """Breaks if the shapes are not drawn or classes are indistinguishable."""
  (tr_x, tr_y), (te_x, te_y) = splits
  flat = lambda x: x.reshape(len(x), -1).astype(np.float64)
  assert _one_nn(flat(tr_x), tr_y, flat(te_x), te_y) > 0.2  # Chance is 0.1.
  # Translation- and colour-invariant features separate the classes almost perfectly.
  assert _one_nn(_spectrum(tr_x), tr_y, _spectrum(te_x), te_y) > 0.9
