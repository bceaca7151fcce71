"""The downstream feature API: same features as the evaluators, one compile, clear errors."""

import jax
import numpy as np
import pytest
from conftest import tiny_config

from byol_jax import checkpointing, export, features, train_step
from byol_jax.evaluators.common import embed_arrays, embed_batches, make_embed_fn


@pytest.fixture(scope='module')
def trained():
  """A tiny run's config and a fresh TrainState (no training needed)."""
  cfg = tiny_config()
  cfg.eval_crop_fraction = 0.875  # a real crop, so preprocessing differences show
  fns = train_step.make_step_fns(cfg, num_classes=4, num_steps=4, steps_per_epoch=4)
  state = jax.jit(lambda rng: train_step.init_state(fns, rng, (16, 16, 3)))(
    jax.random.PRNGKey(0))
  return cfg, jax.device_get(state)


def test_from_workdir_loads_the_checkpoint(trained, tmp_path):
  """Loading another step, network or config than the checkpoint's would break this."""
  cfg, state = trained
  ckpt = checkpointing.Checkpointer(str(tmp_path), keep=2, keep_every_steps=0)
  for step in (2, 5):
    ckpt.save(state._replace(step=np.int32(step)),
              dict(config=checkpointing.config_to_dict(cfg), num_classes=4, num_examples=64,
                   num_steps=5))
  ckpt.close()
  images = _images(5)
  expected = features.Encoder.from_train_state(state, cfg, 'target').embed(images)
  encoder = features.Encoder.from_workdir(str(tmp_path), network='target')
  assert (encoder.step, encoder.network, encoder.image_size) == (5, 'target', 16)
  assert encoder.config.eval_crop_fraction == 0.875
  np.testing.assert_array_equal(encoder.embed(images), expected)
  assert features.Encoder.from_workdir(str(tmp_path), step=2).step == 2


def _images(n, height=20, width=26, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, height, width, 3), dtype=np.uint8)


def test_embed_matches_the_evaluators(trained):
  """Preprocessing or network drifting from what kNN/linear eval use would break this."""
  cfg, state = trained
  encoder = features.Encoder.from_train_state(state, cfg, batch_size=8)
  images = _images(11)
  got = encoder.embed(images)
  mesh = train_step.make_mesh()
  embed = make_embed_fn(cfg.model, cfg.image_size, cfg.eval_crop_fraction, mesh)
  expected = embed_arrays(embed, state.online_params, state.online_state, images, 8, mesh.size)
  assert got.shape == (11, encoder.feature_dim) and got.dtype == np.float32
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_float_images_match_uint8(trained):
  """Float [0, 1] input preprocessed differently from uint8 would break this. (The fresh
  state's BatchNorm statistics do not normalise, so features reach 1e9 and float32
  rounding of the two inputs grows with depth: the tolerance is relative to that scale.)"""
  cfg, state = trained
  encoder = features.Encoder.from_train_state(state, cfg, batch_size=8)
  images = _images(5)
  expected = encoder.embed(images)
  np.testing.assert_allclose(encoder.embed(images.astype(np.float64) / 255), expected,
                             rtol=0, atol=1e-5 * np.abs(expected).max())


def test_fixed_batch_shape_compiles_once(trained, monkeypatch):
  """Recompiling per call or per remainder batch would break this."""
  cfg, state = trained
  traces = []
  original = features.preprocess
  monkeypatch.setattr(features, 'preprocess', lambda *a: traces.append(1) or original(*a))
  encoder = features.Encoder.from_train_state(state, cfg, batch_size=8)
  for n in (3, 8, 19):
    assert encoder.embed(_images(n, seed=n)).shape == (n, encoder.feature_dim)
  assert len(traces) == 1
  assert encoder.embed(_images(0)).shape == (0, encoder.feature_dim)


def test_online_and_target_differ(trained):
  """Ignoring `network` (always the online encoder) would break this."""
  cfg, state = trained
  images = _images(4)
  online = features.Encoder.from_train_state(state, cfg, 'online', batch_size=4)
  target = features.Encoder.from_train_state(state, cfg, 'target', batch_size=4)
  assert online.network == 'online' and target.network == 'target'
  assert not np.allclose(online.embed(images), target.embed(images))


def test_from_export_matches(trained, tmp_path):
  """An npz export that does not reproduce the checkpoint's features would break this."""
  cfg, state = trained
  params, bn_state = export.encoder_of(state, 'online')
  path = export.save_npz(str(tmp_path / 'enc.npz'), params, bn_state,
                         export.sidecar(cfg, 'npz', 'online', 0))
  from_export = features.Encoder.from_export(path, batch_size=8)
  direct = features.Encoder.from_train_state(state, cfg, batch_size=8)
  images = _images(6)
  assert from_export.feature_dim == direct.feature_dim and from_export.image_size == 16
  np.testing.assert_array_equal(from_export.embed(images), direct.embed(images))


@pytest.mark.parametrize('images, message', [
  (np.full((2, 16, 16, 3), 200.0), 'must be in \\[0, 1\\]'),
  (np.zeros((16, 16, 3), np.uint8), 'expected images'),
  (np.zeros((2, 16, 16, 3), np.int32), 'uint8'),
])
def test_bad_images_are_rejected(trained, images, message):
  """Silently embedding 0..255 floats or unbatched images would break this."""
  cfg, state = trained
  encoder = features.Encoder.from_train_state(state, cfg)
  with pytest.raises(ValueError, match=message):
    encoder.embed(images)


def test_embed_batches_keeps_order_and_drops_padding_with_a_batch_in_flight():
  """With one batch in flight, features must still come back in order, each batch cut to
  its valid rows. Breaks if the lookahead dropped the last batch or paired a batch with
  another's valid count."""
  batches = [(np.full((4, 2), i, np.float32), valid) for i, valid in enumerate((4, 4, 1))]
  out = embed_batches(lambda p, s, b: jax.numpy.asarray(b) * 2, None, None, iter(batches))
  np.testing.assert_array_equal(out[:, 0], [0, 0, 0, 0, 2, 2, 2, 2, 4])
  assert embed_batches(lambda p, s, b: b, None, None, iter([])).shape == (0, 0)
