"""A built-in, download-free image dataset with structure worth learning.

Why it exists: tests, CI and a first run on a laptop need a dataset that is generated in a
second, identical on every machine, and on which self-supervised learning has something to
find. Ten classes of shapes and textures are drawn in a random light colour on a random dark
background, at a random scale and position around the centre and with a small rotation, plus
pixel noise. Colour is drawn per image, independently of the label, so only shape carries
the class: a representation that is invariant to BYOL's colour augmentations and sensitive to
shape does well, one that keeps colour does not.

Two choices make the shapes learnable in a few hundred CPU steps (see configs/byol.py:demo),
and both keep colour free of the label:
- The foreground is always lighter than the background. With a random contrast sign per
  channel (the first version), a shape and its negative look unrelated to a CNN and no
  colour augmentation maps one onto the other, so BYOL latched onto colour and learnt
  nothing about shape in that budget (kNN top-1 stayed at chance).
- Shapes are large (they span 60-90% of the image side) and near the centre, so two
  random-resized crops of one image usually both contain most of the shape.

Everything is vectorised over a coordinate grid. Each shape is a signed distance function
(SDF) in the shape's own unit frame; the SDF is converted to pixels and clipped to give an
anti-aliased coverage mask.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

CLASS_NAMES: tuple[str, ...] = (
  "filled_circle",
  "ring",
  "square_outline",
  "filled_square",
  "triangle",
  "plus",
  "horizontal_stripes",
  "vertical_stripes",
  "checkerboard",
  "dots",
)
NUM_CLASSES = len(CLASS_NAMES)

# Split names map to distinct SeedSequence streams, so train and test draws never share
# random numbers although both derive from the same `seed` argument.
_SPLIT_IDS = {"train": 0, "test": 1}
_MAX_ROTATION = np.pi / 8  # Small enough that horizontal and vertical stripes stay distinct.
_NOISE_AMPLITUDE = 0.05  # Uniform pixel noise in [-a, a], std about 0.03.
_FOREGROUND_RANGE = (0.6, 1.0)  # Per channel.
_BACKGROUND_RANGE = (0.0, 0.3)
_SCALE_RANGE = (0.3, 0.45)  # Half-extent of the shape's unit frame, fraction of the image side.
_CENTRE_JITTER = 0.5  # Fraction of the room the shape has left to move (1 = anywhere inside).


def _box(x: np.ndarray, y: np.ndarray, half_x: float, half_y: float) -> np.ndarray:
  """SDF of an axis-aligned box (exact outside, approximate inside, which is enough here)."""
  return np.maximum(np.abs(x) - half_x, np.abs(y) - half_y)


def _band(t: np.ndarray, period: np.ndarray) -> np.ndarray:
  """Signed distance to a band pattern: negative on half of every period along t."""
  phase = t / period - np.floor(t / period) - 0.5
  return (np.abs(phase) - 0.25) * period


def _filled_circle(x, y, p):
  return np.hypot(x, y) - 1.0


def _ring(x, y, p):
  return np.abs(np.hypot(x, y) - 0.75) - 0.25


def _square_outline(x, y, p):
  return np.abs(_box(x, y, 0.8, 0.8)) - 0.2


def _filled_square(x, y, p):
  return _box(x, y, 0.85, 0.85)


def _triangle(x, y, p):
  # Equilateral, pointing up (image rows grow downwards), centroid at the origin.
  s = np.sqrt(3.0) / 2.0
  edges = (y - 0.5, s * x - 0.5 * y - 0.5, -s * x - 0.5 * y - 0.5)
  return np.maximum.reduce(edges)


def _plus(x, y, p):
  return np.minimum(_box(x, y, 0.3, 1.0), _box(x, y, 1.0, 0.3))


def _horizontal_stripes(x, y, p):
  return np.maximum(_box(x, y, 1.0, 1.0), _band(y, p))


def _vertical_stripes(x, y, p):
  return np.maximum(_box(x, y, 1.0, 1.0), _band(x, p))


def _checkerboard(x, y, p):
  dx, dy = _band(x, p), _band(y, p)
  checker = np.where(dx * dy < 0, -1.0, 1.0) * np.minimum(np.abs(dx), np.abs(dy))
  return np.maximum(_box(x, y, 1.0, 1.0), checker)


def _dots(x, y, p):
  fx = (x / p - np.floor(x / p) - 0.5) * p
  fy = (y / p - np.floor(y / p) - 0.5) * p
  return np.maximum(_box(x, y, 1.0, 1.0), np.hypot(fx, fy) - 0.27 * p)


_SDFS: tuple[Callable[..., np.ndarray], ...] = (
  _filled_circle, _ring, _square_outline, _filled_square, _triangle, _plus,
  _horizontal_stripes, _vertical_stripes, _checkerboard, _dots,
)


def _balanced_labels(rng: np.random.Generator, num_examples: int) -> np.ndarray:
  """Class counts differ by at most one; the order is shuffled."""
  return rng.permutation(np.arange(num_examples) % NUM_CLASSES).astype(np.int32)


def _colours(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
  """A random light foreground on a random dark background, neither depending on the label.

  Every channel of the foreground is in [0.6, 1] and of the background in [0, 0.3], so the
  shape is always visible and always lighter than its background (same contrast sign).
  """
  bg = rng.uniform(*_BACKGROUND_RANGE, size=(n, 3))
  fg = rng.uniform(*_FOREGROUND_RANGE, size=(n, 3))
  return fg.astype(np.float32), bg.astype(np.float32)


def _local_coords(rng: np.random.Generator, n: int, size: int):
  """Per-image shape frames: pixel grid -> rotated unit coordinates, plus scale in px.

  The centre moves by up to `_CENTRE_JITTER` of the room the shape leaves inside the image
  (at most 0.115 of the side for the smallest shapes), so shapes stay whole and near the
  middle.
  """
  scale = (rng.uniform(*_SCALE_RANGE, size=n) * size).astype(np.float32)  # Half-extent, px.
  room = _CENTRE_JITTER * (size / 2 - 0.9 * scale)
  cx = (size / 2 + rng.uniform(-room, room)).astype(np.float32)
  cy = (size / 2 + rng.uniform(-room, room)).astype(np.float32)
  theta = rng.uniform(-_MAX_ROTATION, _MAX_ROTATION, size=n).astype(np.float32)
  grid = np.arange(size, dtype=np.float32) + 0.5
  gx = (grid[None, None, :] - cx[:, None, None]) / scale[:, None, None]
  gy = (grid[None, :, None] - cy[:, None, None]) / scale[:, None, None]
  cos, sin = np.cos(theta)[:, None, None], np.sin(theta)[:, None, None]
  return cos * gx + sin * gy, cos * gy - sin * gx, scale


def _coverage(rng: np.random.Generator, labels: np.ndarray, size: int) -> np.ndarray:
  """Anti-aliased foreground coverage in [0, 1], shape [N, S, S]."""
  n = labels.shape[0]
  x, y, scale = _local_coords(rng, n, size)
  period = rng.uniform(0.55, 0.8, size=n).astype(np.float32)  # Texture period, unit frame.
  alpha = np.empty((n, size, size), np.float32)
  for c, sdf in enumerate(_SDFS):
    idx = np.flatnonzero(labels == c)
    if idx.size:
      dist_px = sdf(x[idx], y[idx], period[idx, None, None]) * scale[idx, None, None]
      alpha[idx] = np.clip(0.5 - dist_px, 0.0, 1.0)
  return alpha


def make_demo_dataset(split: str, num_examples: int, image_size: int = 32,
                      seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Generates `num_examples` images and labels for `split` ('train' or 'test').

  Returns uint8 images [N, S, S, 3] and int32 labels [N]. The result is a pure function of
  (split, num_examples, image_size, seed); train and test use separate random streams.
  """
  if split not in _SPLIT_IDS:
    raise ValueError(f"split must be one of {sorted(_SPLIT_IDS)}, got {split!r}")
  if num_examples < 0 or image_size < 8:
    raise ValueError(f"need num_examples >= 0 and image_size >= 8, got "
                     f"{num_examples}, {image_size}")
  rng = np.random.default_rng([seed, _SPLIT_IDS[split]])
  labels = _balanced_labels(rng, num_examples)
  fg, bg = _colours(rng, num_examples)
  alpha = _coverage(rng, labels, image_size)
  return _render(rng, alpha, fg, bg), labels


def _render(rng: np.random.Generator, alpha: np.ndarray, fg: np.ndarray,
            bg: np.ndarray) -> np.ndarray:
  """Blends colours by coverage, adds noise and quantises; in place, as it dominates runtime.

  The noise is uniform (cheaper to draw than Gaussian) with half-width `_NOISE_AMPLITUDE`.
  """
  images = np.multiply(alpha[..., None], (fg - bg)[:, None, None, :])
  images += bg[:, None, None, :]
  noise = rng.random(images.shape, dtype=np.float32)
  noise -= 0.5
  noise *= 2.0 * _NOISE_AMPLITUDE
  images += noise
  np.clip(images, 0.0, 1.0, out=images)
  images *= 255.0
  images += 0.5  # Round half up when truncating to uint8.
  return images.astype(np.uint8)
