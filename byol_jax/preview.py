"""Pictures of augmented view pairs, to check the augmentations by eye.

Why: a wrong mean/std, swapped channels or a crop that is always the whole image are easy to
miss in the loss curve and obvious in a picture. Each row shows one image's two views side
by side, denormalised back to pixels. Pillow and numpy only, so it runs anywhere.

Layout: rows of [view1 | view2] with a PAD-pixel grey border around and between tiles, so a
grid of n pairs of S px views is (n * S + (n + 1) * PAD) x (2 * S + 3 * PAD) pixels.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

PAD = 2
_BORDER = 128  # Mid grey: visible against both dark and bright views.


def denormalise(views: np.ndarray, mean: Sequence[float] | np.ndarray,
                std: Sequence[float] | np.ndarray) -> np.ndarray:
  """Float views normalised as (x - mean) / std with x in [0, 1] -> uint8 pixels.

  uint8 input is returned unchanged (already pixels). Values are clipped, since colour
  augmentation can leave [0, 1].
  """
  views = np.asarray(views)
  if views.dtype == np.uint8:
    return views
  mean = np.asarray(mean, np.float32).reshape(-1)
  std = np.asarray(std, np.float32).reshape(-1)
  pixels = (views.astype(np.float32) * std + mean) * 255.0
  return np.clip(np.round(pixels), 0, 255).astype(np.uint8)


def view_grid_array(view1: np.ndarray, view2: np.ndarray, mean: Sequence[float] | np.ndarray,
                    std: Sequence[float] | np.ndarray, max_pairs: int = 8) -> np.ndarray:
  """A uint8 [H, W, 3] grid of up to max_pairs rows of (view1, view2), e.g. for TensorBoard."""
  first, second = denormalise(view1, mean, std), denormalise(view2, mean, std)
  if first.shape != second.shape or first.ndim != 4 or first.shape[-1] not in (1, 3):
    raise ValueError(f'views must both be [B, S, S, 3]; got {first.shape} and {second.shape}')
  n, height, width = min(len(first), max_pairs), first.shape[1], first.shape[2]
  grid = np.full((n * height + (n + 1) * PAD, 2 * width + 3 * PAD, 3), _BORDER, np.uint8)
  for row in range(n):
    top = PAD + row * (height + PAD)
    for col, views in enumerate((first, second)):
      left = PAD + col * (width + PAD)
      grid[top:top + height, left:left + width] = views[row]  # Broadcasts greyscale.
  return grid


def save_view_grid(path: str, view1: np.ndarray, view2: np.ndarray,
                   mean: Sequence[float] | np.ndarray, std: Sequence[float] | np.ndarray,
                   max_pairs: int = 8) -> str:
  """Writes `view_grid_array` as a PNG (creating the folder) and returns the path."""
  from PIL import Image
  grid = view_grid_array(view1, view2, mean, std, max_pairs)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  Image.fromarray(grid).save(path, format='PNG')
  return path
