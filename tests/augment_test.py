"""Tests for byol_jax.augment against independent references.

The colour ops and the resampler are checked against TensorFlow (skipped where it is not
installed, e.g. on the accelerator machines), the blur against a float64 direct convolution, and
the crop sampler against the paper's distributions and a NumPy version of torchvision's loop.
"""

import colorsys
import functools
import itertools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from byol_jax import augment

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

# XLA:CPU spends seconds optimising each threefry-heavy program; these tests check numerics, not
# speed, so compile without backend optimisation (about 10x faster to compile here).
_jit = functools.partial(jax.jit, compiler_options={'xla_backend_optimization_level': 0})


@pytest.fixture(scope='module')
def tf():
  """TensorFlow as the reference implementation; its tests skip where it is missing."""
  tf = pytest.importorskip('tensorflow')
  tf.config.set_visible_devices([], 'GPU')
  return tf


def _images(seed: int, shape=(24, 20, 3)) -> np.ndarray:
  """Random float images in [0, 1], plus gray, tied-channel and extreme pixels (edge cases)."""
  x = np.random.default_rng(seed).uniform(size=shape).astype(np.float32)
  x[0, :6] = [[0.5] * 3, [0.2, 0.2, 0.7], [0.9, 0.9, 0.1], [0, 0, 0], [1, 1, 1], [1, 0, 0.5]]
  return x


def _uint8(seed: int, shape) -> np.ndarray:
  """Random uint8 images."""
  return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def _quiet_config(**overrides):
  """The default config with every per-view op off (probability 0), then overrides applied."""
  cfg = augment.default_augment_config()
  cfg.flip_prob = 0.0
  cfg.color_jitter_prob = 0.0
  cfg.grayscale_prob = 0.0
  cfg.view1.blur_prob = cfg.view2.blur_prob = 0.0
  cfg.view1.solarize_prob = cfg.view2.solarize_prob = 0.0
  for key, value in overrides.items():
    target = cfg
    *path, name = key.split('__')
    for part in path:
      target = target[part]
    target[name] = value
  return cfg


def _unnormalize(x, cfg) -> np.ndarray:
  """Inverse of augment.normalize."""
  return np.asarray(x) * np.array(cfg.std) + np.array(cfg.mean)


def _max_abs(a, b) -> float:
  """Largest absolute difference, computed in float64."""
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# ---------------------------------------------------------------------------------------------
# Config.
# ---------------------------------------------------------------------------------------------


def test_default_config_has_paper_values():
  """Fails if a BYOL augmentation number (paper appendix B) drifts in the one config table."""
  cfg = augment.default_augment_config()
  assert (cfg.crop_area_min, cfg.crop_area_max) == (0.08, 1.0)
  assert (cfg.crop_aspect_min, cfg.crop_aspect_max) == (3 / 4, 4 / 3)
  assert (cfg.flip_prob, cfg.color_jitter_prob, cfg.grayscale_prob) == (0.5, 0.8, 0.2)
  assert (cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue) == (0.4, 0.4, 0.2, 0.1)
  assert cfg.blur and (cfg.blur_sigma_min, cfg.blur_sigma_max) == (0.1, 2.0)
  assert (cfg.view1.blur_prob, cfg.view1.solarize_prob) == (1.0, 0.0)
  assert (cfg.view2.blur_prob, cfg.view2.solarize_prob) == (0.1, 0.2)
  assert cfg.mean == (0.485, 0.456, 0.406) and cfg.std == (0.229, 0.224, 0.225)


@pytest.mark.parametrize('size, expected', [(224, 23), (32, 3), (64, 7), (96, 9), (256, 25),
                                            (160, 17), (5, 1)])
def test_blur_kernel_size(size, expected):
  """Fails if the kernel side stops being the release's: a kernel of size / 10 px whose
  blur takes radius int(kernel / 2), so 2 * radius + 1 taps (23 at 224 px; 9 at STL-10's
  96 px and 25 at 256 px, where rounding to the nearest odd side gave 11 and 27)."""
  assert augment.blur_kernel_size(size, augment.default_augment_config()) == expected


# ---------------------------------------------------------------------------------------------
# Colour ops against tf.image.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize('delta', [-0.4, -0.1, 0.0, 0.25, 0.4])
def test_adjust_brightness_matches_tf(tf, delta):
  """Fails if brightness stops being tf.image.adjust_brightness's additive shift."""
  x = _images(0)
  got = _jit(augment.adjust_brightness)(x, delta)
  assert _max_abs(got, tf.image.adjust_brightness(x, delta)) < 1e-4


@pytest.mark.parametrize('factor', [0.0, 0.6, 1.0, 1.4, 2.5])
def test_adjust_contrast_matches_tf(tf, factor):
  """Fails if contrast stops scaling about the per-channel image mean as tf.image does."""
  x = _images(1)
  got = _jit(augment.adjust_contrast)(x, factor)
  assert _max_abs(got, tf.image.adjust_contrast(x, factor)) < 1e-4


@pytest.mark.parametrize('shape', [(7, 5, 3), (2, 9, 4, 3), (3, 6, 6, 1)])
def test_masked_row_mean_matches_float64_mean(shape):
  """The accelerators' contrast mean (one masked sum per channel over the flattened image)
  must equal the float64 per-channel spatial mean, batched or not, and under vmap. Breaks
  if the channel mask is misaligned with the HWC layout (channels mixed) or the count is
  wrong; CPU runs the plain mean, so only this test covers the GPU/TPU path."""
  x = np.random.RandomState(3).uniform(0, 1, shape).astype(np.float32)
  want = x.astype(np.float64).mean(axis=(-3, -2), keepdims=True)
  assert _max_abs(jax.jit(augment._masked_row_mean)(x), want) < 1e-6
  assert _max_abs(jax.vmap(augment._masked_row_mean)(x[None])[0], want) < 1e-6
  assert _max_abs(augment.spatial_mean(x), want) < 1e-6


@pytest.mark.parametrize('factor', [0.0, 0.5, 0.8, 1.2, 3.0])
def test_adjust_saturation_matches_tf(tf, factor):
  """Fails if the RGB-space saturation differs from tf's HSV scale-and-clip of S."""
  x = _images(2)
  got = _jit(augment.adjust_saturation)(x, factor)
  assert _max_abs(got, tf.image.adjust_saturation(x, factor)) < 1e-4


@pytest.mark.parametrize('delta', [-0.5, -0.1, -0.03, 0.0, 0.07, 0.1, 0.9])
def test_adjust_hue_matches_tf(tf, delta):
  """Fails if the hue rotation (incl. negative deltas and wrap-around) differs from tf's."""
  x = _images(3)
  assert _max_abs(_jit(augment.adjust_hue)(x, delta), tf.image.adjust_hue(x, delta)) < 1e-4


def test_rgb_to_grayscale_matches_tf(tf):
  """Fails if the grayscale weights or output shape differ from tf.image.rgb_to_grayscale."""
  x = _images(4)
  got = _jit(augment.rgb_to_grayscale)(x)
  assert got.shape == (24, 20, 1)
  assert _max_abs(got, tf.image.rgb_to_grayscale(x)) < 1e-4


def test_color_jitter_in_every_order_matches_sequential_tf(tf):
  """Fails if the slot-based jitter differs from applying the tf ops in order, clipping each."""
  x = _images(5, (12, 10, 3))
  params = dict(brightness=0.13, contrast=1.3, saturation=0.75, hue=-0.08)
  tf_ops = dict(
      brightness=tf.image.adjust_brightness,
      contrast=tf.image.adjust_contrast,
      saturation=tf.image.adjust_saturation,
      hue=tf.image.adjust_hue,
  )
  orders = np.array(list(itertools.permutations(range(4))), np.int32)
  jitter = lambda order: augment.apply_color_jitter(x, order, *params.values())
  got = _jit(jax.vmap(jitter))(orders)
  for order, got_one in zip(orders, got, strict=True):
    want = tf.constant(x)
    for op in order:
      name = augment.JITTER_OPS[op]
      want = tf.clip_by_value(tf_ops[name](want, params[name]), 0.0, 1.0)
    assert _max_abs(got_one, want) < 1e-4, order


# ---------------------------------------------------------------------------------------------
# Gaussian blur against a direct float64 2-D convolution.
# ---------------------------------------------------------------------------------------------


def _reference_blur(image: np.ndarray, sigma: float, kernel_size: int, mode: str) -> np.ndarray:
  """Direct (non-separable) 2-D correlation with a normalised 2-D Gaussian, in float64."""
  r = kernel_size // 2
  offsets = np.arange(-r, r + 1, dtype=np.float64)
  g = np.exp(-0.5 * (offsets / sigma) ** 2)
  kernel = np.outer(g, g) / np.sum(g) ** 2
  padded = np.pad(image.astype(np.float64), ((r, r), (r, r), (0, 0)), mode=mode)
  height, width = image.shape[:2]
  out = np.zeros(image.shape, np.float64)
  for dy, dx in itertools.product(range(kernel_size), repeat=2):
    out += kernel[dy, dx] * padded[dy : dy + height, dx : dx + width]
  return out


@pytest.mark.parametrize(
    'sigma, kernel_size, padding',
    [
        (0.1, 3, 'zero'),
        (1.0, 5, 'zero'),
        (2.0, 7, 'zero'),
        (1.5, 7, 'reflect'),
        (0.7, 3, 'reflect'),
    ],
)
def test_gaussian_blur_matches_direct_convolution(sigma, kernel_size, padding):
  """Fails if the separable blur's weights, centring or border padding are wrong."""
  x = _images(6, (17, 13, 3))
  want = _reference_blur(x, sigma, kernel_size, 'constant' if padding == 'zero' else 'reflect')
  blur = _jit(augment.gaussian_blur, static_argnums=(2, 3))
  got = blur(jnp.asarray(x), sigma, kernel_size, padding)
  assert _max_abs(got, want) < 1e-5


def test_gaussian_blur_rejects_even_kernel():
  """Fails if an even kernel (which would shift the image) is silently accepted."""
  with pytest.raises(ValueError):
    augment.gaussian_blur(jnp.zeros((8, 8, 3)), 1.0, 4)


# ---------------------------------------------------------------------------------------------
# Random resized crop.
# ---------------------------------------------------------------------------------------------


def _sample_boxes(seed: int, n: int, height: int, width: int, cfg=None) -> np.ndarray:
  """n boxes (y0, x0, h, w) from augment.sample_crop_box."""
  cfg = augment.default_augment_config() if cfg is None else cfg
  keys = jax.random.split(jax.random.key(seed), n)
  sample = _jit(jax.vmap(lambda k: augment.sample_crop_box(k, height, width, cfg)))
  return np.asarray(sample(keys), np.float64)


def _ks_uniform(samples: np.ndarray, lo: float, hi: float) -> float:
  """One-sample Kolmogorov-Smirnov statistic against U(lo, hi)."""
  x = np.sort(samples)
  cdf = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
  n = len(x)
  return max(np.max(np.arange(1, n + 1) / n - cdf), np.max(cdf - np.arange(n) / n))


def _ks_two_sample(a: np.ndarray, b: np.ndarray) -> float:
  """Two-sample Kolmogorov-Smirnov statistic."""
  grid = np.concatenate([a, b])
  cdf_a = np.searchsorted(np.sort(a), grid, side='right') / len(a)
  cdf_b = np.searchsorted(np.sort(b), grid, side='right') / len(b)
  return float(np.max(np.abs(cdf_a - cdf_b)))


def _assert_inside(boxes: np.ndarray, height: int, width: int):
  """All boxes have positive size and lie within the image (float tolerance)."""
  y0, x0, h, w = boxes.T
  tol = 1e-3
  assert np.all(h > 0) and np.all(w > 0)
  assert np.all(y0 >= -tol) and np.all(x0 >= -tol)
  assert np.all(y0 + h <= height + tol) and np.all(x0 + w <= width + tol)


def test_crop_boxes_follow_paper_distributions():
  """Fails if crop area is not U(0.08, 1) or log-aspect not U(log 3/4, log 4/3), or boxes spill.

  On a square image every box with area fraction <= 3/4 fits whatever its aspect, so the first
  accepted candidate, conditioned on that area range, is exactly uniform in area and log aspect.
  """
  size, n = 512, 20000
  boxes = _sample_boxes(0, n, size, size)
  _assert_inside(boxes, size, size)
  area = boxes[:, 2] * boxes[:, 3] / size**2
  log_aspect = np.log(boxes[:, 3] / boxes[:, 2])
  assert area.min() >= 0.08 - 1e-5 and area.max() <= 1.0 + 1e-5
  assert np.all(np.abs(log_aspect) <= math.log(4 / 3) + 1e-5)
  small = area <= 0.75
  # Critical value for alpha = 0.001 is about 1.95 / sqrt(n).
  threshold = 1.95 / math.sqrt(small.sum())
  assert small.mean() > 0.65
  assert _ks_uniform(area[small], 0.08, 0.75) < threshold
  assert _ks_uniform(log_aspect[small], math.log(3 / 4), math.log(4 / 3)) < threshold
  # Position is uniform over the room left by the box.
  room = size - boxes[small, 2]
  assert _ks_uniform(boxes[small, 0] / room, 0.0, 1.0) < threshold


def _torchvision_reference(rng, n: int, height: int, width: int, cfg, attempts=10) -> np.ndarray:
  """NumPy transcription of torchvision's RandomResizedCrop.get_params, without rounding."""
  boxes = np.zeros((n, 4))
  log_lo, log_hi = math.log(cfg.crop_aspect_min), math.log(cfg.crop_aspect_max)
  for i in range(n):
    for _ in range(attempts):
      area = height * width * rng.uniform(cfg.crop_area_min, cfg.crop_area_max)
      aspect = math.exp(rng.uniform(log_lo, log_hi))
      w, h = math.sqrt(area * aspect), math.sqrt(area / aspect)
      if 0 < w <= width and 0 < h <= height:
        boxes[i] = rng.uniform(0, height - h), rng.uniform(0, width - w), h, w
        break
    else:
      ratio = width / height
      if ratio < cfg.crop_aspect_min:
        w, h = width, width / cfg.crop_aspect_min
      elif ratio > cfg.crop_aspect_max:
        w, h = height * cfg.crop_aspect_max, height
      else:
        w, h = width, height
      boxes[i] = (height - h) / 2, (width - w) / 2, h, w
  return boxes


@pytest.mark.parametrize('height, width', [(300, 400), (400, 150)])
def test_crop_boxes_match_torchvision_reference(height, width):
  """Fails if the vectorised first-fit sampling departs from torchvision's rejection loop."""
  cfg = augment.default_augment_config()
  n = 8000
  got = _sample_boxes(1, n, height, width)
  want = _torchvision_reference(np.random.default_rng(1), n, height, width, cfg)
  _assert_inside(got, height, width)
  # Critical value for alpha = 0.001 with two samples of n is about 1.95 * sqrt(2 / n).
  threshold = 1.95 * math.sqrt(2 / n)
  stats = lambda b: (b[:, 2] * b[:, 3], b[:, 3] / b[:, 2], b[:, 0], b[:, 1])
  for got_stat, want_stat in zip(stats(got), stats(want), strict=True):
    assert _ks_two_sample(got_stat, want_stat) < threshold


@pytest.mark.parametrize('height, width', [(6, 900), (900, 6), (40, 41)])
def test_crop_boxes_stay_inside_elongated_images(height, width):
  """Fails if the fallback (no candidate fits) leaves the image or ignores the aspect clamp."""
  cfg = augment.default_augment_config()
  boxes = _sample_boxes(2, 500, height, width)
  _assert_inside(boxes, height, width)
  if height * 4 / 3 < width:  # Far too wide: every draw falls back to a centred 4:3 crop.
    np.testing.assert_allclose(boxes[0], [0, (width - 8) / 2, 6, 8], rtol=1e-5)
  if width * 4 / 3 < height:
    np.testing.assert_allclose(boxes[0], [(height - 8) / 2, 0, 8, 6], rtol=1e-5)
  assert np.all(boxes[:, 3] / boxes[:, 2] <= cfg.crop_aspect_max + 1e-4)
  assert np.all(boxes[:, 3] / boxes[:, 2] >= cfg.crop_aspect_min - 1e-4)


def test_crop_and_resize_matches_tf(tf):
  """Fails if the resample is not TF's antialiased Keys-cubic with pixel-edge box coordinates."""
  x = _images(7, (32, 28, 3))
  crop_and_resize = _jit(augment.crop_and_resize, static_argnums=2)
  for out in (16, 28, 45):  # Down, equal and up for the width.
    got = crop_and_resize(x, jnp.array([0.0, 0.0, 32.0, 28.0]), out)
    assert _max_abs(got, tf.image.resize(x, [out, out], method='bicubic', antialias=True)) < 1e-4
  for box, out in [((3.0, 5.0, 20.0, 21.0), 16), ((1.5, 2.25, 10.5, 7.0), 24)]:
    scale = np.array([out / box[2], out / box[3]], np.float32)
    want = tf.raw_ops.ScaleAndTranslate(
        images=x[None],
        size=[out, out],
        scale=scale,
        translation=-np.array(box[:2], np.float32) * scale,
        kernel_type='keyscubic',
        antialias=True,
    )[0]
    assert _max_abs(crop_and_resize(x, jnp.array(box), out), want) < 1e-4


def test_crop_and_resize_takes_traced_boxes():
  """Fails if crop_and_resize needs concrete boxes (it must work under jit and vmap)."""
  x = jnp.asarray(_images(8, (20, 20, 3)))
  boxes = jnp.array([[0.0, 0.0, 20.0, 20.0], [2.5, 1.0, 9.0, 12.0]])
  got = _jit(jax.vmap(lambda b: augment.crop_and_resize(x, b, 10)))(boxes)
  assert got.shape == (2, 10, 10, 3)
  want = _jit(augment.crop_and_resize, static_argnums=2)(x, np.asarray(boxes[1]), 10)
  assert _max_abs(got[1], want) < 1e-5


# ---------------------------------------------------------------------------------------------
# Views.
# ---------------------------------------------------------------------------------------------

CFG = augment.default_augment_config()
OUT = 16


@functools.cache
def _make_views_fn(cfg_key: str):
  """A jitted make_views for a named config (cached: compiling is the slow part)."""
  cfg = _CONFIGS[cfg_key]()
  return _jit(lambda rng, images: augment.make_views(rng, images, cfg, OUT))


@functools.cache
def _finish_views_fn(cfg_key: str):
  """A jitted finish_views for a named config."""
  cfg = _CONFIGS[cfg_key]()
  return _jit(lambda rng, crops: augment.finish_views(rng, crops, cfg))


_CONFIGS = {
    'default': augment.default_augment_config,
    'quiet': _quiet_config,
    'quiet_full_crop': functools.partial(
        _quiet_config, crop_area_min=1.0, crop_aspect_min=1.0, crop_aspect_max=1.0
    ),
    'solarize2': functools.partial(_quiet_config, view2__solarize_prob=1.0),
}


def test_make_views_shapes_dtypes_and_normalisation():
  """Fails if views have wrong shape/dtype, are non-finite or leave [0, 1] before normalising."""
  images = _uint8(0, (4, 30, 22, 3))
  views = _make_views_fn('default')(jax.random.key(0), images)
  for view in views:
    assert view.shape == (4, OUT, OUT, 3) and view.dtype == jnp.float32
    assert np.all(np.isfinite(view))
    raw = _unnormalize(view, CFG)
    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5
  assert _max_abs(views[0], views[1]) > 0.1  # Independent crops and ops per view.


def test_finish_views_shapes_dtypes_and_normalisation():
  """Fails if finish_views gives the wrong shape/dtype or leaves [0, 1] before normalising."""
  crops = _uint8(1, (3, 2, OUT, OUT, 3))
  views = _finish_views_fn('default')(jax.random.key(0), crops)
  for view in views:
    assert view.shape == (3, OUT, OUT, 3) and view.dtype == jnp.float32
    raw = _unnormalize(view, CFG)
    assert np.all(np.isfinite(raw)) and raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5


def test_views_are_deterministic_per_rng():
  """Fails if the same key gives different views or different keys give the same views."""
  images = _uint8(2, (3, 24, 24, 3))
  make = _make_views_fn('default')
  a, b, c = (make(k, images) for k in (jax.random.key(5), jax.random.key(5), jax.random.key(6)))
  for i in range(2):
    np.testing.assert_array_equal(a[i], b[i])
    assert _max_abs(a[i], c[i]) > 0.1
  crops = _uint8(3, (3, 2, OUT, OUT, 3))
  finish = _finish_views_fn('default')
  d, e, f = (finish(k, crops) for k in (jax.random.key(1), jax.random.key(1), jax.random.key(2)))
  np.testing.assert_array_equal(d[1], e[1])
  assert _max_abs(d[1], f[1]) > 0.1


def test_each_image_gets_its_own_randomness():
  """Fails if one key is shared by the batch (identical images would get identical views)."""
  image = _uint8(4, (1, 24, 24, 3))
  views = _make_views_fn('default')(jax.random.key(0), np.repeat(image, 3, axis=0))
  assert _max_abs(views[0][0], views[0][1]) > 0.1
  assert _max_abs(views[1][1], views[1][2]) > 0.1


def test_zero_probabilities_are_identity():
  """Fails if any op leaks through when every probability is zero (views = normalised input)."""
  crops = _uint8(7, (3, 2, OUT, OUT, 3))
  cfg = _quiet_config()
  views = _finish_views_fn('quiet')(jax.random.key(0), crops)
  for i in range(2):
    want = augment.normalize(crops[:, i].astype(np.float32) / 255, cfg)
    assert _max_abs(views[i], want) < 1e-6
  # A crop pinned to the whole square image at its own size is the identity too.
  images = _uint8(8, (2, OUT, OUT, 3))
  views = _make_views_fn('quiet_full_crop')(jax.random.key(1), images)
  for view in views:
    assert _max_abs(view, augment.normalize(images.astype(np.float32) / 255, cfg)) < 1e-5


def test_make_views_crops_differ_between_views():
  """Fails if the two views share one crop, or if raw uint32 PRNGKey keys are not accepted."""
  images = _uint8(9, (2, 40, 40, 3))
  view1, view2 = _make_views_fn('quiet')(jax.random.PRNGKey(2), images)
  assert _max_abs(view1, view2) > 0.1


def test_solarize_with_probability_one():
  """Fails if solarize (view2 only here) does not map x >= 0.5 to 1 - x, or touches view1."""
  crops = _uint8(10, (2, 2, OUT, OUT, 3))
  cfg = _CONFIGS['solarize2']()
  view1, view2 = _finish_views_fn('solarize2')(jax.random.key(0), crops)
  x = crops.astype(np.float32) / 255
  assert _max_abs(view1, augment.normalize(x[:, 0], cfg)) < 1e-6
  want = np.where(x[:, 1] >= 0.5, 1 - x[:, 1], x[:, 1])
  assert _max_abs(view2, augment.normalize(want, cfg)) < 1e-6


@pytest.mark.parametrize('op', ['flip', 'grayscale', 'blur'])
def test_single_op_with_probability_one(op):
  """Fails if flip, grayscale or blur is wired wrongly into the view pipeline."""
  overrides = dict(
      flip=dict(flip_prob=1.0),
      grayscale=dict(grayscale_prob=1.0),
      blur=dict(view1__blur_prob=1.0, blur_sigma_min=1.3, blur_sigma_max=1.3),
  )[op]
  cfg = _quiet_config(**overrides)
  crops = _uint8(11, (2, 2, OUT, OUT, 3))
  x = crops[:, 0].astype(np.float32) / 255
  view1, _ = _jit(lambda r, c: augment.finish_views(r, c, cfg))(jax.random.key(0), crops)
  if op == 'flip':
    want = x[:, :, ::-1]
  elif op == 'grayscale':
    want = np.repeat(augment.rgb_to_grayscale(x), 3, axis=-1)
  else:
    kernel = augment.blur_kernel_size(OUT, cfg)
    want = _jit(jax.vmap(lambda im: augment.gaussian_blur(im, 1.3, kernel)))(x)
  assert _max_abs(view1, augment.normalize(want, cfg)) < 1e-5


def test_op_rates_follow_view_probabilities():
  """Fails if flip/grayscale/solarize fire at rates other than cfg's (and view1 vs view2's)."""
  n = 3000
  cfg = _quiet_config(flip_prob=0.5, grayscale_prob=0.2, view2__solarize_prob=0.2)
  # Colourful, left-right asymmetric images with every value >= 0.6, so each op is detectable.
  base = np.random.default_rng(12).uniform(0.6, 1.0, size=(n, 2, 4, 4, 3)).astype(np.float32)
  crops = np.round(base * 255).astype(np.uint8)
  views = _jit(lambda r, c: augment.finish_views(r, c, cfg))(jax.random.key(7), crops)
  for i, solarize_rate in ((0, 0.0), (1, 0.2)):
    raw = _unnormalize(views[i], cfg) * 255
    solarized = raw.max(axis=(1, 2, 3)) < 0.5 * 255
    raw = np.where(solarized[:, None, None, None], 255 - raw, raw)
    gray = np.all(np.abs(raw - raw[..., :1]) < 1e-2, axis=(1, 2, 3))
    flipped = np.all(np.abs(raw[:, :, ::-1] - crops[:, i]) < 1e-2, axis=(1, 2, 3))
    tol = 4 * math.sqrt(0.25 / n)
    assert abs(solarized.mean() - solarize_rate) < tol
    assert abs(gray.mean() - 0.2) < tol
    assert abs(flipped[~gray].mean() - 0.5) < tol * 1.2


def test_color_jitter_rate_and_zero_strength():
  """Fails if jitter fires at a rate other than its probability, or zero strengths change pixels."""
  crops = _uint8(13, (800, 2, 4, 4, 3))
  x = crops.astype(np.float32) / 255
  cfg = _quiet_config(color_jitter_prob=0.8)
  view1, _ = _jit(lambda r, c: augment.finish_views(r, c, cfg))(jax.random.key(8), crops)
  changed = np.abs(_unnormalize(view1, cfg) - x[:, 0]).max(axis=(1, 2, 3)) > 1e-4
  assert abs(changed.mean() - 0.8) < 4 * math.sqrt(0.16 / 800)
  cfg = _quiet_config(color_jitter_prob=1.0, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0)
  view1, _ = _jit(lambda r, c: augment.finish_views(r, c, cfg))(jax.random.key(8), crops[:50])
  assert _max_abs(_unnormalize(view1, cfg), x[:50, 0]) < 1e-5


# ---------------------------------------------------------------------------------------------
# Eval view.
# ---------------------------------------------------------------------------------------------


def _gradient_image(height: int, width: int) -> np.ndarray:
  """uint8 image: red = 4 * column, green = 4 * row, blue constant."""
  rows, cols = np.mgrid[:height, :width]
  return np.stack([4 * cols, 4 * rows, np.full_like(rows, 100)], axis=-1).astype(np.uint8)


def test_eval_view_centre_crop():
  """Fails if eval cropping is off-centre, uses the wrong fraction, or the resize shifts pixels."""
  cfg = augment.default_augment_config()
  image = _gradient_image(64, 48)  # Shorter side 48, crop side 42, offsets (11, 3).
  eval_view = _jit(augment.eval_view, static_argnums=1)
  got = eval_view(image[None], 42)
  assert got.shape == (1, 42, 42, 3) and got.dtype == jnp.float32
  want = augment.normalize(image[11:53, 3:45].astype(np.float32) / 255, cfg)
  assert _max_abs(got[0], want) < 1e-5
  # Upsampling a linear ramp keeps it linear away from the borders (Keys cubic is exact there).
  out = 56
  raw = _unnormalize(eval_view(image[None], out)[0], cfg) * 255
  centres = np.arange(out) + 0.5
  want_red = 4 * (3 + centres * 42 / out - 0.5)
  want_green = 4 * (11 + centres * 42 / out - 0.5)
  assert _max_abs(raw[3:-3, 3:-3, 0], np.broadcast_to(want_red[3:-3], (out - 6, out - 6))) < 1e-2
  assert _max_abs(raw[3:-3, 3:-3, 1], want_green[3:-3, None]) < 1e-2
  assert _max_abs(raw[..., 2], 100.0) < 1e-2


# ---------------------------------------------------------------------------------------------
# Jitter styles: torchvision's ColorJitter against float64 formulas and colorsys.
# ---------------------------------------------------------------------------------------------


def _torchvision_op(name: str, x: np.ndarray, p: float) -> np.ndarray:
  """torchvision.transforms.functional's op on a float64 HWC image, clamped as it does.

  Written from torchvision's definitions (blends with black, the grayscale mean and the
  grayscale image; hue through the standard library's colorsys), not from our code.
  """
  gray = (0.2989 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2])[..., None]
  if name == 'brightness':
    out = p * x
  elif name == 'contrast':
    out = p * x + (1 - p) * gray.mean()
  elif name == 'saturation':
    out = p * x + (1 - p) * gray
  else:
    hsv = np.array([colorsys.rgb_to_hsv(*px) for px in x.reshape(-1, 3)])
    hsv[:, 0] = np.mod(hsv[:, 0] + p, 1.0)
    out = np.array([colorsys.hsv_to_rgb(*px) for px in hsv]).reshape(x.shape)
  return np.clip(out, 0.0, 1.0)


def test_torchvision_style_in_every_order_matches_sequential_reference():
  """Fails if a torchvision-style op has the wrong formula (e.g. contrast about each channel's
  mean, saturation in HSV, brightness added) or the slots misplace an op in some order."""
  x = _images(6, (10, 9, 3))
  params = dict(brightness=1.3, contrast=0.7, saturation=1.35, hue=0.07)
  orders = np.array(list(itertools.permutations(range(4))), np.int32)
  jitter = lambda order: augment.apply_color_jitter(x, order, *params.values(),
                                                    style='torchvision')
  got = _jit(jax.vmap(jitter))(orders)
  for order, got_one in zip(orders, got, strict=True):
    want = x.astype(np.float64)
    for op in order:
      name = augment.JITTER_OPS[op]
      want = _torchvision_op(name, want, params[name])
    assert _max_abs(got_one, want) < 1e-5, order


@pytest.mark.parametrize('style', augment.JITTER_STYLES)
def test_jitter_style_routes_the_brightness(style):
  """Black crops with brightness jitter alone: torchvision's scaling keeps them black, the
  release's added delta lifts about half of them. Breaks if the config's style is ignored."""
  crops = np.zeros((64, 2, 4, 4, 3), np.uint8)
  cfg = _quiet_config(color_jitter_prob=1.0, contrast=0.0, saturation=0.0, hue=0.0,
                      jitter_style=style)
  view1, _ = _jit(lambda r, c: augment.finish_views(r, c, cfg))(jax.random.key(3), crops)
  lifted = _unnormalize(view1, cfg).max(axis=(1, 2, 3)) > 1e-4
  if style == 'torchvision':
    assert not lifted.any()
  else:
    assert 0.3 < lifted.mean() < 0.7


def test_unknown_jitter_style_is_a_config_error():
  """Fails if a mistyped style reaches compilation instead of stopping with one line."""
  from byol_jax import train
  from configs import byol
  cfg = byol.get_config('demo')
  cfg.augment.jitter_style = 'pil'
  with pytest.raises(train.ConfigError, match="jitter_style='pil'; valid: tf, torchvision"):
    train.validate(cfg, 1)
  with pytest.raises(ValueError, match='jitter_style'):
    augment.finish_views(jax.random.key(0), np.zeros((1, 2, 4, 4, 3), np.uint8),
                         _quiet_config(color_jitter_prob=1.0, jitter_style='pil'))


@pytest.mark.parametrize('field, value, says', [
  ('mean', (0.5, 0.5), 'augment.mean=(0.5, 0.5) must hold 3 numbers'),
  ('std', (0.2, 0.0, 0.2), 'augment.std=(0.2, 0.0, 0.2) must be positive'),
  ('crop_area_min', 0.0, 'crop_area_min=0.0 and crop_area_max=1.0 must satisfy'),
  ('crop_area_max', 1.5, 'crop_area_min=0.08 and crop_area_max=1.5'),
  ('crop_aspect_min', 2.0, 'crop_aspect_min=2.0 and crop_aspect_max=1.33'),
  ('view2.solarize_prob', 1.5, 'augment.view2.solarize_prob=1.5 must be a probability'),
  ('grayscale_prob', -0.1, 'augment.grayscale_prob=-0.1 must be a probability'),
  ('saturation', -0.2, 'augment.saturation=-0.2 must be >= 0'),
  ('hue', 0.7, 'augment.hue=0.7 must be in [0, 0.5]'),
  ('blur_sigma_min', 3.0, 'blur_sigma_min=3.0 and blur_sigma_max=2.0'),
  ('blur_kernel_fraction', 0.0, 'augment.blur_kernel_fraction=0.0 must be in (0, 1]'),
])
def test_bad_augment_values_are_named_before_tracing(field, value, says):
  """A wrong-length mean failed deep inside the traced step as a broadcasting traceback; an
  out-of-range probability or crop range silently made other views. Each must be one line
  that names the field."""
  cfg = augment.default_augment_config()
  *path, leaf = field.split('.')
  target = cfg
  for p in path:
    target = target[p]
  target[leaf] = value
  with pytest.raises(ValueError) as e:
    augment.check_config(cfg)
  assert says in str(e.value) and '\n' not in str(e.value)


def test_every_preset_has_valid_augment_values():
  """The check must not reject what the presets ship."""
  from configs import ablation, byol
  for name in byol.PRESETS:
    augment.check_config(byol.get_config(name).augment)
  for name in ablation.VARIANTS:
    augment.check_config(ablation.get_config(name).augment)
