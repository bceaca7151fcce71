"""Embedding whole datasets with a frozen encoder, shared by every evaluator.

Evaluation always uses eval preprocessing (centre crop, no augmentation) and the encoder in
inference mode (BN moving averages), on whichever network the caller passes: the online
encoder by default.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import haiku as hk
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from byol_jax import augment, networks


def make_embed_fn(model_cfg: Any, image_size: int, crop_fraction: float,
                  mesh: Mesh) -> Callable[[hk.Params, hk.State, np.ndarray], jax.Array]:
  """embed(params, state, uint8 images [B, H, W, 3]) -> features [B, D], sharded over mesh.

  `params`/`state` may be the full network's; only the encoder subtree is used. B must be
  a multiple of the mesh size (see `embed_arrays`, which pads).
  """
  encoder = networks.build_encoder(model_cfg)

  @jax.jit
  def embed(params, state, images):
    x = augment.eval_view(images, image_size, crop_fraction)
    feats, _ = encoder.apply(networks.encoder_subtree(params), networks.encoder_subtree(state),
                             None, x)
    return feats

  data_sharding = NamedSharding(mesh, P(mesh.axis_names[0]))

  def run(params, state, images):
    return embed(params, state, jax.device_put(images, data_sharding))

  return run


def embed_arrays(embed: Callable, params: hk.Params, state: hk.State, images: np.ndarray,
                 batch_size: int, num_devices: int) -> np.ndarray:
  """Features of every image, in order, with a fixed batch shape (no recompiles)."""
  batch_size = max(num_devices, batch_size - batch_size % num_devices)
  return embed_batches(embed, params, state, _chunks(images, batch_size))


def _chunks(images: np.ndarray, batch_size: int) -> Iterable[tuple[np.ndarray, int]]:
  for start in range(0, len(images), batch_size):
    chunk = images[start:start + batch_size]
    valid = len(chunk)
    if valid < batch_size:
      pad = np.zeros((batch_size - valid, *chunk.shape[1:]), chunk.dtype)
      chunk = np.concatenate([chunk, pad])
    yield chunk, valid


def embed_batches(embed: Callable, params: hk.Params, state: hk.State,
                  batches: Iterable[tuple[np.ndarray, int]]) -> np.ndarray:
  """Concatenated features of (padded batch, number of valid rows) pairs."""
  out = [np.asarray(embed(params, state, batch))[:valid] for batch, valid in batches]
  return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

