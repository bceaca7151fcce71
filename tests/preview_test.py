"""Tests of the augmentation preview grid."""

import numpy as np
from PIL import Image

from byol_jax import preview

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def _normalise(pixels: np.ndarray) -> np.ndarray:
  return (pixels.astype(np.float32) / 255.0 - np.asarray(MEAN, np.float32)) / np.asarray(STD)


def test_save_view_grid_writes_png_of_expected_size(tmp_path):
  """A wrong layout or a broken PNG writer would make the preview unreadable."""
  rng = np.random.default_rng(0)
  views = [_normalise(rng.integers(0, 256, (10, 12, 12, 3), dtype=np.uint8)) for _ in range(2)]
  path = preview.save_view_grid(str(tmp_path / 'sub' / 'grid.png'), *views, MEAN, STD,
                                max_pairs=3)
  with Image.open(path) as img:
    assert img.format == 'PNG'
    assert img.size == (2 * 12 + 3 * preview.PAD, 3 * 12 + 4 * preview.PAD)
    assert img.mode == 'RGB'


def test_denormalisation_inverts_normalisation():
  """Wrong mean/std handling would show views with shifted colours."""
  rng = np.random.default_rng(1)
  pixels1, pixels2 = (rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8) for _ in range(2))
  grid = preview.view_grid_array(_normalise(pixels1), _normalise(pixels2), MEAN, STD)
  pad = preview.PAD
  for row in range(4):
    top = pad + row * (8 + pad)
    np.testing.assert_array_equal(grid[top:top + 8, pad:pad + 8], pixels1[row])
    np.testing.assert_array_equal(grid[top:top + 8, 2 * pad + 8:2 * pad + 16], pixels2[row])


def test_uint8_views_and_out_of_range_values():
  """uint8 views must pass through; colour-jittered values outside [0, 1] must clip."""
  views = np.full((2, 4, 4, 3), 7, np.uint8)
  grid = preview.view_grid_array(views, views, MEAN, STD)
  assert grid[preview.PAD, preview.PAD].tolist() == [7, 7, 7]
  hot = np.full((1, 4, 4, 3), 50.0, np.float32)
  assert preview.view_grid_array(hot, -hot, MEAN, STD)[preview.PAD, preview.PAD].tolist() \
    == [255, 255, 255]
