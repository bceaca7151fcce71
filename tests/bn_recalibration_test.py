"""Tests of the BatchNorm recalibration that makes the encoder at initialisation a fair
baseline (byol_jax/evaluators/common.py), checked against references computed without it."""

import haiku as hk
import jax
import numpy as np
import pytest
from conftest import tiny_config

from byol_jax import augment, networks, train_step
from byol_jax.evaluators import common

BATCH = 16


@pytest.fixture(scope='module')
def setup():
  """The tiny run's initial state, its config, a mesh and 3 batches of random images."""
  cfg = tiny_config()
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (3 * BATCH, cfg.image_size, cfg.image_size, 3), np.uint8)
  return cfg, common.initial_state(cfg), train_step.make_mesh(), images


def _random_norm_params(params, seed):
  """Encoder params whose BN scales/offsets are random and non-zero.

  At initialisation each block's last BN scale is zero (zero_init_last_bn), which would hide
  those layers' statistics from any output; random values make every layer count.
  """
  rng = np.random.default_rng(seed)
  out = {}
  for module, leaves in networks.encoder_subtree(params).items():
    out[module] = dict(leaves)
    if module.split('/')[-1].endswith('bn'):
      out[module]['scale'] = rng.uniform(0.5, 1.5, leaves['scale'].shape).astype(np.float32)
      out[module]['offset'] = rng.normal(0.0, 0.2, leaves['offset'].shape).astype(np.float32)
  return out


def _stem_conv_float64(params, views):
  """The CIFAR stem's 3x3/1 SAME convolution (no bias) in float64 NumPy: stem_bn's input."""
  w = np.asarray(params['encoder/stem_conv']['w'], np.float64)  # [3, 3, Cin, Cout]
  x = np.pad(np.asarray(views, np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
  h, wd = views.shape[1:3]
  return sum(np.einsum('nhwc,cd->nhwd', x[:, i:i + h, j:j + wd], w[i, j])
             for i in range(3) for j in range(3))


def test_fresh_statistics_are_missing_and_break_inference(setup):
  """Breaks if a never-trained state is not detected, or if the problem it guards against
  (inference-mode BN with variance 0 dividing by sqrt(eps) at every layer) went away
  silently, which would make the recalibration pointless."""
  cfg, state, mesh, images = setup
  assert common.bn_statistics_missing(state.online_state)
  assert common.bn_statistics_missing(state.target_state)
  embed = common.make_embed_fn(cfg.model, cfg.image_size, cfg.eval_crop_fraction, mesh)
  raw = np.asarray(embed(state.online_params, state.online_state, images[:BATCH]))
  calibrated, _ = common.recalibrate_batch_norm(
    cfg.model, state.online_params, state.online_state, [images[:BATCH]], cfg.image_size,
    cfg.eval_crop_fraction, mesh)
  assert not common.bn_statistics_missing(calibrated)
  fixed = np.asarray(embed(state.online_params, calibrated, images[:BATCH]))
  assert np.abs(raw).max() > 1e6  # 4 BN layers on the path, x316 each
  assert 1e-2 < np.abs(fixed).max() < 1e2


def test_stem_statistics_equal_float64_batch_moments(setup):
  """Breaks if the recalibrated moving mean/variance of a layer is not, per channel, the
  mean over batches of its input's batch mean / biased batch variance (float64 reference of
  the stem convolution, computed without Haiku or BatchNorm), or if the EMA state is not
  self-consistent (counter = batches, hidden = average x (1 - decay^counter))."""
  cfg, state, mesh, images = setup
  batches = common.calibration_batches(images, BATCH, mesh.size, max_examples=0)
  assert [len(b) for b in batches] == [BATCH] * 3
  calibrated, num = common.recalibrate_batch_norm(
    cfg.model, state.online_params, state.online_state, batches, cfg.image_size,
    cfg.eval_crop_fraction, mesh)
  assert num == 3 * BATCH
  stem = [_stem_conv_float64(state.online_params, augment.eval_view(
    b, cfg.image_size, cfg.eval_crop_fraction)) for b in batches]
  want_mean = np.mean([s.mean(axis=(0, 1, 2)) for s in stem], axis=0)
  want_var = np.mean([s.var(axis=(0, 1, 2)) for s in stem], axis=0)
  np.testing.assert_allclose(want_mean, np.concatenate(stem).mean(axis=(0, 1, 2)), rtol=1e-12)
  got = {k.split('/')[-1]: calibrated[k] for k in calibrated if '/stem_bn/' in k}
  scale = np.abs(want_mean).max()
  np.testing.assert_allclose(got['mean_ema']['average'].ravel(), want_mean, rtol=1e-4,
                             atol=1e-5 * scale)
  np.testing.assert_allclose(got['var_ema']['average'].ravel(), want_var, rtol=1e-4)
  assert not np.allclose(want_var, np.var(np.concatenate(stem), axis=(0, 1, 2)), rtol=1e-6)
  for ema in got.values():
    assert int(ema['counter']) == 3
    np.testing.assert_allclose(ema['hidden'], ema['average'] * (1 - cfg.model.bn_decay ** 3),
                               rtol=1e-6)
  for k, v in state.online_state.items():  # nothing outside the encoder changes
    if not k.startswith('encoder'):
      assert calibrated[k] is v


def test_one_batch_makes_inference_equal_training_mode(setup):
  """Breaks if any BN layer's recalibrated statistics differ from the batch statistics that
  training mode uses (every layer, scales made non-zero), or if calibration and embedding
  preprocess differently: calibrated on one batch, inference-mode features of that batch
  must equal training-mode features of it, computed by a plain Haiku forward."""
  cfg, state, mesh, images = setup
  params = _random_norm_params(state.online_params, seed=1)
  batch = images[:BATCH]
  calibrated, _ = common.recalibrate_batch_norm(
    cfg.model, params, state.online_state, [batch], cfg.image_size, cfg.eval_crop_fraction,
    mesh, cfg.augment)
  embed = common.make_embed_fn(cfg.model, cfg.image_size, cfg.eval_crop_fraction, mesh,
                               cfg.augment)
  got = np.asarray(embed(params, calibrated, batch))
  m = cfg.model
  train_mode = hk.transform_with_state(lambda x: networks.ResNet(
    m.depth, m.width, m.cifar_stem, m.zero_init_last_bn, m.bn_decay, m.bn_eps)(x, True))
  views = augment.eval_view(batch, cfg.image_size, cfg.eval_crop_fraction, cfg.augment)
  want, _ = train_mode.apply(params, networks.encoder_subtree(state.online_state), None, views)
  np.testing.assert_allclose(got, np.asarray(want), rtol=2e-3, atol=2e-4 * np.abs(want).max())
  assert np.std(got) > 1e-3  # not a trivially constant output


def test_ensure_leaves_trained_statistics_and_recalibrates_initial_ones(setup):
  """Breaks if statistics that training updated are overwritten (or images are even read
  for them), or if the initial state's online and target networks are not both fixed."""
  cfg, state, mesh, images = setup

  def must_not_read():
    raise AssertionError('images read for a state that has statistics')

  trained, _ = common.recalibrate_batch_norm(
    cfg.model, state.online_params, state.online_state, [images[:BATCH]], cfg.image_size,
    cfg.eval_crop_fraction, mesh)
  same, note = common.ensure_bn_statistics(cfg.model, state.online_params, trained,
                                           must_not_read, cfg.image_size,
                                           cfg.eval_crop_fraction, mesh)
  assert same is trained and note == 'checkpoint'
  calls = []

  def batches():
    calls.append(1)
    return common.calibration_batches(images, BATCH, mesh.size, seed=0)

  init, note = common.calibrated_initial_state(cfg, batches, mesh, cfg.eval_crop_fraction,
                                               cfg.image_size, source='demo/train')
  assert note == 'recalibrated on 48 training images of demo/train' and len(calls) == 2
  assert not common.bn_statistics_missing(init.online_state)
  assert not common.bn_statistics_missing(init.target_state)
  np.testing.assert_array_equal(  # the weights are the run's initialisation
    jax.tree.leaves(init.online_params)[0], jax.tree.leaves(state.online_params)[0])


def test_calibration_batches_sample_equal_batches():
  """Breaks if calibration batches differ in size (the mean of batch means would then not be
  the mean over images), repeat images, ignore the cap, or accept too few images."""
  images = np.arange(100, dtype=np.uint8).reshape(100, 1, 1, 1) * np.ones((1, 2, 2, 3), np.uint8)
  batches = common.calibration_batches(images, 16, 2, max_examples=70, seed=3)
  assert [len(b) for b in batches] == [16] * 4
  seen = np.concatenate([b[:, 0, 0, 0] for b in batches])
  assert len(set(seen.tolist())) == 64 and seen.max() > 70  # a sample, not the first rows
  again = common.calibration_batches(images, 16, 2, max_examples=70, seed=3)
  np.testing.assert_array_equal(np.concatenate(batches), np.concatenate(again))
  assert [len(b) for b in common.calibration_batches(images[:10], 16, 2)] == [10]
  with pytest.raises(ValueError):
    common.calibration_batches(images[:1], 16, 2)


class _Stream(list):
  """An eval stream's shape: a sized iterable of {'images', 'mask'} batches."""


def _batch(valid: int, size: int) -> dict:
  images = np.arange(size, dtype=np.uint8).reshape(size, 1, 1, 1) * np.ones((1, 2, 2, 3),
                                                                            np.uint8)
  return dict(images=images, mask=np.arange(size) < valid)


def test_spread_batches_of_a_split_smaller_than_a_batch_are_its_real_images():
  """A streamed split with no full batch (smaller than the batch, or one unreadable file in
  a folder of fewer images than knn.batch_size) gave no batch at all: the trainer's kNN at
  initialisation and linear_eval's random_init baseline then failed in a traceback
  ('BN recalibration got no images')."""
  (only,) = list(common.spread_batches(_Stream([_batch(74, 75)]), 75, 10_000, num_devices=4))
  np.testing.assert_array_equal(only[:, 0, 0, 0], np.arange(72))  # a multiple of 4 devices
  full = list(common.spread_batches(_Stream([_batch(8, 8), _batch(3, 8)]), 8, 10_000))
  assert [len(b) for b in full] == [8]  # full batches exist: padded ones stay out
