"""Tests of the BYOL objective and collapse signals against float64 NumPy formulas."""

import jax
import jax.numpy as jnp
import numpy as np

from byol_jax import losses


def _np_byol(p1, p2, z1, z2):
  def norm(x):
    return x / np.sqrt(np.maximum(np.sum(x * x, -1, keepdims=True), 1e-12))

  def term(p, z):
    return 2.0 - 2.0 * np.sum(norm(p) * norm(z), -1)

  return np.mean(term(p1, z2) + term(p2, z1))


def test_byol_loss_matches_float64_formula():
  """A wrong normalisation, averaged (not summed) terms or swapped targets would break this."""
  rng = np.random.default_rng(0)
  p1, p2, z1, z2 = (rng.normal(size=(16, 8)) for _ in range(4))
  got = losses.byol_loss(*(jnp.asarray(x, jnp.float32) for x in (p1, p2, z1, z2)))
  np.testing.assert_allclose(float(got), _np_byol(p1, p2, z1, z2), rtol=1e-5)


def test_byol_loss_bounds_and_stop_gradient():
  """Identical vectors give 0, opposite give 4 (sum of two terms); no gradient to targets."""
  x = jnp.ones((4, 3))
  assert float(losses.byol_loss(x, x, x, x)) == 0.0
  np.testing.assert_allclose(float(losses.byol_loss(x, x, -x, -x)), 8.0, rtol=1e-6)
  grad_t = jax.grad(lambda t: losses.byol_loss(x, x * 2, t, t + 1))(x + 0.5)
  assert float(jnp.abs(grad_t).sum()) == 0.0


def test_l2_normalize_guards_zero_vector():
  """rsqrt(max(., 1e-12)) must keep a zero vector finite (zero), not NaN."""
  out = losses.l2_normalize(jnp.zeros((2, 3)))
  assert np.all(np.isfinite(out)) and float(jnp.abs(out).sum()) == 0.0


def test_collapse_signals_healthy_and_collapsed():
  """std ~ 1/sqrt(d) and rank near d for random projections; both ~0/1 when collapsed."""
  rng = np.random.default_rng(1)
  z = jnp.asarray(rng.normal(size=(4096, 64)), jnp.float32)
  healthy = losses.collapse_signals(z)
  np.testing.assert_allclose(float(healthy['proj_std']), 1 / np.sqrt(64), rtol=0.05)
  assert float(healthy['proj_rank']) > 55
  collapsed = losses.collapse_signals(jnp.ones((256, 64)) + 1e-7 * z[:256])
  assert float(collapsed['proj_std']) < 1e-4
  assert float(collapsed['proj_rank']) < 1.5


def test_collapse_message_only_for_collapsed_projections():
  """The trainer's warning: silent for healthy projections and for the NaN of a step
  without signals, and for the ablation's weakest healthy runs (0.22 of 1/sqrt(d)); it
  speaks for collapsed ones, names how far from healthy and where to read on."""
  rng = np.random.default_rng(1)
  z = jnp.asarray(rng.normal(size=(1024, 256)), jnp.float32)
  healthy = losses.collapse_signals(z)
  assert losses.collapse_message(float(healthy['proj_std']), float(healthy['proj_rank']),
                                 256) is None
  assert losses.collapse_message(0.22 / 16, 12.0, 256) is None
  assert losses.collapse_message(float('nan'), float('nan'), 256) is None
  collapsed = losses.collapse_signals(jnp.ones((256, 256)) + 1e-7 * z[:256])
  message = losses.collapse_message(float(collapsed['proj_std']),
                                    float(collapsed['proj_rank']), 256)
  assert message and 'of a healthy 0.0625 (1/sqrt(256))' in message
  assert 'Troubleshooting: collapse' in message
  assert losses.collapse_message(0.09 / 16, 3.0, 256) and losses.collapse_message(
    0.11 / 16, 3.0, 256) is None  # the threshold: 0.1 of healthy


def test_effective_rank_sees_partial_collapse():
  """Projections on a 4-dim subspace: rank ~4 although std stays far from 0."""
  rng = np.random.default_rng(2)
  z = rng.normal(size=(2048, 4)) @ rng.normal(size=(4, 64))
  sig = losses.collapse_signals(jnp.asarray(z, jnp.float32))
  s = np.linalg.svd(z / np.linalg.norm(z, axis=1, keepdims=True), compute_uv=False)
  p = s / s.sum()
  np.testing.assert_allclose(float(sig['proj_rank']), np.exp(-(p * np.log(p)).sum()), rtol=1e-3)
  assert float(sig['proj_rank']) < 4.5 and float(sig['proj_std']) > 0.02


def test_infonce_matches_float64_cross_entropy():
  """The contrastive ablation's loss is the summed two-way in-batch cross-entropy."""
  rng = np.random.default_rng(3)
  p1, p2, z1, z2 = (rng.normal(size=(8, 5)) for _ in range(4))
  t = 0.1

  def one(p, z):
    p = p / np.linalg.norm(p, axis=1, keepdims=True)
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    logits = p @ z.T / t
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    return -np.mean(np.diag(logp))

  got = losses.infonce_loss(*(jnp.asarray(x, jnp.float32) for x in (p1, p2, z1, z2)), t)
  np.testing.assert_allclose(float(got), one(p1, z2) + one(p2, z1), rtol=1e-4)


def test_probe_leaves_unlabelled_images_out():
  """Breaks if label -1 (an image without a class) reaches the probe's loss or accuracy:
  as an index it would pick the last class and teach the probe to predict it."""
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(6, 4))
  labels = np.array([2, -1, 0, -1, 3, 3])
  loss, acc = losses.probe_loss_and_accuracy(jnp.asarray(logits, jnp.float32),
                                             jnp.asarray(labels))
  keep = labels >= 0
  logp = logits - np.log(np.sum(np.exp(logits), axis=1, keepdims=True))  # float64
  expected = -np.mean(logp[keep, labels[keep]])
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
  assert float(acc) == np.mean(np.argmax(logits[keep], axis=1) == labels[keep])
  none = losses.probe_loss_and_accuracy(jnp.asarray(logits, jnp.float32), jnp.full(6, -1))
  assert [float(v) for v in none] == [0.0, 0.0]
  # Fully labelled batches: the plain mean, as before.
  full = np.array([1, 0, 2, 3, 3, 1])
  loss, _ = losses.probe_loss_and_accuracy(jnp.asarray(logits, jnp.float32), jnp.asarray(full))
  np.testing.assert_allclose(float(loss), -np.mean(logp[np.arange(6), full]), rtol=1e-5)


def test_probe_averages_over_the_global_batch_across_devices():
  """Breaks if the probe divides by each device's own labelled count: a shard with 1
  labelled image then weighs as much as one with 3, and a shard with none pulls the pmean
  towards 0. vmap with an axis name stands in for the devices (same psum semantics)."""
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(3, 4, 5))  # 3 devices x 4 images x 5 classes
  labels = np.array([[-1, -1, -1, -1], [2, -1, -1, -1], [0, 4, 1, -1]])
  fn = jax.vmap(lambda x, y: losses.probe_loss_and_accuracy(x, y, 'd'), axis_name='d')
  loss, acc = fn(jnp.asarray(logits, jnp.float32), jnp.asarray(labels))
  flat, flat_labels = logits.reshape(12, 5), labels.reshape(12)
  keep = flat_labels >= 0
  logp = flat - np.log(np.sum(np.exp(flat), axis=1, keepdims=True))  # float64
  np.testing.assert_allclose(float(jnp.mean(loss)), -np.mean(logp[keep, flat_labels[keep]]),
                             rtol=1e-5)
  np.testing.assert_allclose(float(jnp.mean(acc)),
                             np.mean(np.argmax(flat[keep], 1) == flat_labels[keep]), rtol=1e-6)
