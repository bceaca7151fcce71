"""BYOL's objective, the contrastive ablation's, and collapse signals.

Every function here works on one device's share of the batch. Where a quantity is a
statistic of the whole global batch (collapse signals, InfoNCE negatives) the reduction
goes through `axis_name`, so N devices compute exactly what one device would on the
concatenated batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  """x / ||x|| with the release's rsqrt(max(sum x^2, eps)) guard."""
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=axis, keepdims=True), eps))


def regression_loss(prediction: jax.Array, target: jax.Array) -> jax.Array:
  """Per-example squared distance of normalised vectors, i.e. 2 - 2 cos(p, z)."""
  p, z = l2_normalize(prediction), l2_normalize(jax.lax.stop_gradient(target))
  return jnp.sum((p - z) ** 2, axis=-1)


def byol_loss(pred1: jax.Array, pred2: jax.Array, target1: jax.Array,
              target2: jax.Array) -> jax.Array:
  """Symmetrised BYOL loss: view1 predicts view2's target and back, the terms SUMMED.

  Averaging the two terms instead halves the gradient and costs accuracy (see facts file).
  """
  return jnp.mean(regression_loss(pred1, target2) + regression_loss(pred2, target1))


def _all_gather(x: jax.Array, axis_name: str | None) -> jax.Array:
  if axis_name is None:
    return x
  return jax.lax.all_gather(x, axis_name, tiled=True)


def infonce_loss(pred1: jax.Array, pred2: jax.Array, target1: jax.Array, target2: jax.Array,
                 temperature: float, axis_name: str | None = None) -> jax.Array:
  """Contrastive variant for the normalisation ablation: in-batch negatives over all devices.

  Each prediction must pick its own other-view target among every target of the global
  batch; the two directions are summed like BYOL's terms.
  """

  def one_way(pred, target):
    p = l2_normalize(pred)
    t = l2_normalize(_all_gather(jax.lax.stop_gradient(target), axis_name))
    logits = p @ t.T / temperature
    offset = jax.lax.axis_index(axis_name) * p.shape[0] if axis_name else 0
    labels = offset + jnp.arange(p.shape[0])
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=-1))

  return one_way(pred1, target2) + one_way(pred2, target1)


def _byol_objective(pred1: jax.Array, pred2: jax.Array, target1: jax.Array,
                    target2: jax.Array, temperature: float,
                    axis_name: str | None = None) -> jax.Array:
  """byol_loss with the table's arguments: no temperature, no cross-device term."""
  del temperature, axis_name
  return byol_loss(pred1, pred2, target1, target2)


# Training objectives by the config's `loss`: fn(pred1, pred2, target1, target2, temperature,
# axis_name) -> scalar, with the online predictions and the target projections of both views
# (targets already stop-gradient) and `infonce_temperature`. The step, its check and
# train.validate all read this table, so a new loss is one function and one entry here.
LOSSES = {'byol': _byol_objective, 'infonce': infonce_loss}


def _psum(x: jax.Array, axis_name: str | None) -> jax.Array:
  return x if axis_name is None else jax.lax.psum(x, axis_name)


def collapse_signals(projections: jax.Array, axis_name: str | None = None) -> dict[str, jax.Array]:
  """Two collapse signals of the global batch's projections.

  `proj_std`: mean over dimensions of the per-dimension std of the L2-normalised
  projections; about 1/sqrt(dim) when healthy, 0 when every example maps to one point.
  `proj_rank`: effective rank (exp of the entropy of the normalised singular values) of the
  projections; it also drops when the batch collapses onto a low-dimensional subspace,
  which the std misses. Both reduce through `axis_name` so they describe the whole batch.
  """
  z = l2_normalize(projections.astype(jnp.float32))
  n = _psum(jnp.asarray(z.shape[0], jnp.float32), axis_name)
  mean = _psum(jnp.sum(z, axis=0), axis_name) / n
  sq = _psum(jnp.sum(z * z, axis=0), axis_name) / n
  std = jnp.mean(jnp.sqrt(jnp.maximum(sq - mean**2, 0.0)))
  gram = _psum(z.T @ z, axis_name)  # [dim, dim]; its eigenvalues are the squared singular values
  eig = jnp.linalg.eigvalsh(gram)
  # float32 eigenvalues of a rank-deficient gram carry ~1e-6 relative noise, which sqrt
  # would turn into spurious singular values; treat those as the zeros they are.
  eig = jnp.where(eig > 1e-5 * jnp.max(eig), eig, 0.0)
  sv = jnp.sqrt(eig)
  p = sv / jnp.maximum(jnp.sum(sv), 1e-12)
  entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
  return dict(proj_std=std, proj_rank=jnp.exp(entropy))


# Projections whose std falls below this fraction of a healthy 1/sqrt(dim) have collapsed.
# Every healthy run recorded here stayed above 0.2 of it (the normalisation ablation's
# variants without batch norm included, 30 epochs, docs/cifar10.md); a collapsed one is
# near 0.
COLLAPSE_STD_FRACTION = 0.1


def collapse_message(proj_std: float, proj_rank: float, projection_dim: int) -> str | None:
  """What to tell the user when the logged collapse signals say the projections collapsed,
  or None while they look healthy. The causes are the ones BYOL users hit in practice."""
  healthy = projection_dim ** -0.5
  if not proj_std < COLLAPSE_STD_FRACTION * healthy:  # NaN (a skipped step) is not collapse
    return None
  return (f'the projections are collapsing: std {proj_std:.4f}, {proj_std / healthy:.0%} of '
          f'a healthy {healthy:.4f} (1/sqrt({projection_dim})), effective rank '
          f'{proj_rank:.1f}. Usual causes: Adam or a much too high learning rate (use LARS as '
          'configured), tau too low, no norm layer in the projector and predictor, or '
          "augmentations too weak for the data. See the README's 'Troubleshooting: collapse'.")


def probe_loss_and_accuracy(logits: jax.Array, labels: jax.Array,
                            axis_name: str | None = None) -> tuple[jax.Array, jax.Array]:
  """Softmax cross-entropy and top-1 accuracy of the online linear probe, over the labelled
  images of the whole batch.

  Label -1 marks an image without a class (STL-10's 'unlabelled' split, a TFDS dataset with
  no label feature): BYOL trains on it, the probe leaves it out. Without the mask, index -1
  would select the last class, and the probe would learn to predict it. A batch with no
  labelled image gives loss and accuracy 0.

  Under `axis_name` the labelled images are counted over all devices, and each device's sum
  is scaled by the device count, so that the step's pmean of gradients and metrics gives
  the mean over the global batch's labelled images. Dividing by each device's own count
  instead weighted a device holding 1 labelled image like one holding 100, and a device
  holding none pulled the mean towards 0 (halving the probe's loss and learning rate on 2
  devices when one shard is unlabelled, as STL-10's unlabelled-first order makes it).
  """
  labelled = labels >= 0
  logp = jax.nn.log_softmax(logits)
  picked = jnp.take_along_axis(logp, jnp.maximum(labels, 0)[:, None], axis=-1)[:, 0]
  loss_sum = -jnp.sum(jnp.where(labelled, picked, 0.0))
  hits = jnp.sum(labelled & (jnp.argmax(logits, axis=-1) == labels))
  devices = 1 if axis_name is None else jax.lax.psum(1, axis_name)
  scale = devices / jnp.maximum(_psum(jnp.sum(labelled), axis_name), 1)
  return loss_sum * scale, hits * scale
