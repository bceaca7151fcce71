"""Features of a trained encoder for downstream code: images in, NumPy vectors out.

    encoder = Encoder.from_workdir('runs/demo')          # latest checkpoint, online network
    feats = encoder.embed(images)                        # uint8 [B, H, W, 3] -> [B, D]

Images get exactly the evaluation preprocessing of training (centre crop of
`eval_crop_fraction` of the shorter side, bicubic resize to the trained size, normalisation)
and the encoder runs in inference mode (BN moving averages). uint8 images are 0..255; float
images must already be in [0, 1]. Batches are padded to one fixed shape, so a given image
size and dtype compiles once.
"""

from __future__ import annotations

from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from byol_jax import augment, export, networks
from byol_jax.evaluators.common import bn_statistics_missing, embed_arrays

# Float images further than this outside [0, 1] are almost certainly 0..255 or normalised.
_FLOAT_RANGE_SLACK = 0.01


class Encoder:
  """A frozen BYOL encoder with its preprocessing; see the module docstring."""

  def __init__(self, params: hk.Params, state: hk.State, config: Any, batch_size: int = 128,
               network: str = 'online', step: int | None = None):
    """`config` is the run config (or any with model, image_size, eval_crop_fraction, augment)."""
    self.config = config
    self.network, self.step, self.batch_size = network, step, batch_size
    self._params = networks.encoder_subtree(params)
    self._state = networks.encoder_subtree(state)
    if bn_statistics_missing(self._state):
      logging.warning('this encoder\'s BatchNorm statistics were never updated (an untrained '
                      'state), so its features are not normalised; re-estimate them first '
                      'with byol_jax.evaluators.common.ensure_bn_statistics')
    self._embed = jax.jit(self._forward)
    self.feature_dim = networks.encoder_feature_dim(config.model)

  @classmethod
  def from_workdir(cls, workdir: str, step: int | None = None, network: str = 'online',
                   batch_size: int = 128) -> Encoder:
    """The encoder of a finalised checkpoint in a run directory (the latest by default)."""
    params, state, cfg, step = export.load_encoder(workdir, step, network)
    return cls(params, state, cfg, batch_size, network, step)

  @classmethod
  def from_train_state(cls, train_state: Any, config: Any, network: str = 'online',
                       batch_size: int = 128) -> Encoder:
    """The encoder of an in-memory TrainState, e.g. what `train_and_evaluate` returns."""
    params, state = export.encoder_of(train_state, network)
    return cls(params, state, config, batch_size, network, int(train_state.step))

  @classmethod
  def from_export(cls, path: str, batch_size: int = 128) -> Encoder:
    """The encoder of a `python -m byol_jax.export --format=npz` file (with its sidecar)."""
    params, state, meta = export.load_npz(path)
    return cls(params, state, config_from_sidecar(meta), batch_size, meta['network'],
               meta['step'])

  @property
  def image_size(self) -> int:
    return int(self.config.image_size)

  def embed(self, images: np.ndarray) -> np.ndarray:
    """float32 features [B, D] of uint8 [B, H, W, 3] (0..255) or float (0..1) images."""
    images = _check_images(images)
    if len(images) == 0:
      return np.zeros((0, self.feature_dim), np.float32)
    return embed_arrays(self._embed, self._params, self._state, images, self.batch_size, 1)

  def _forward(self, params: hk.Params, state: hk.State, images: jax.Array) -> jax.Array:
    x = preprocess(images, self.image_size, self.config.eval_crop_fraction,
                   self.config.augment)
    feats, _ = networks.build_encoder(self.config.model).apply(params, state, None, x)
    return feats


def preprocess(images: jax.Array, image_size: int, crop_fraction: float,
               aug_cfg: Any) -> jax.Array:
  """`augment.eval_view`, for uint8 (0..255) and float (0..1) images alike."""
  if images.dtype == jnp.uint8:
    return augment.eval_view(images, image_size, crop_fraction, aug_cfg)
  box = augment.centre_crop_box(images.shape[1], images.shape[2], crop_fraction)
  resize = lambda image: augment.crop_and_resize(image, box, image_size)
  return augment.normalize(jnp.clip(jax.vmap(resize)(images), 0.0, 1.0), aug_cfg)


def _check_images(images: Any) -> np.ndarray:
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f'expected images [B, H, W, 3], got shape {images.shape}')
  if images.dtype == np.uint8:
    return images
  if not np.issubdtype(images.dtype, np.floating):
    raise ValueError(f'expected uint8 (0..255) or float (0..1) images, got {images.dtype}')
  images = images.astype(np.float32)  # one dtype, one compilation
  if images.size:
    lo, hi = float(images.min()), float(images.max())
    if lo < -_FLOAT_RANGE_SLACK or hi > 1 + _FLOAT_RANGE_SLACK:
      raise ValueError(f'float images must be in [0, 1], got [{lo:.3g}, {hi:.3g}]; pass uint8 '
                       'for 0..255 (normalisation happens inside)')
  return images


def config_from_sidecar(meta: dict[str, Any]) -> ml_collections.ConfigDict:
  """The part of a run config that inference needs, rebuilt from an export's sidecar."""
  aug = augment.default_augment_config()
  aug.mean, aug.std = tuple(meta['mean']), tuple(meta['std'])
  return ml_collections.ConfigDict(dict(
    model=dict(meta['model']), image_size=meta['image_size'],
    eval_crop_fraction=meta['eval_crop_fraction'], augment=aug))
