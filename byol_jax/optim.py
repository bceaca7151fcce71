"""LARS (with BYOL's exclusion masks) or momentum SGD, and the LR and EMA (tau) schedules.

All schedules are functions of the integer step so that a resumed run recomputes them
exactly rather than carrying them in state.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from byol_jax import config_compat
from byol_jax.networks import NORM_PARAM_NAMES


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  """Whole steps per pass over the training set (the last partial batch is dropped)."""
  return max(1, num_examples // batch_size)


def total_steps(cfg: Any, num_examples: int) -> int:
  """Training length: `cfg.steps` when positive, else epochs * steps_per_epoch."""
  if cfg.get('steps', 0):
    return int(cfg.steps)
  return int(round(cfg.epochs * steps_per_epoch(num_examples, cfg.batch_size)))


def scaled_lr(base_lr: float, batch_size: int) -> float:
  """The paper's linear scaling rule: LR = base * batch / 256."""
  return base_lr * batch_size / 256.0


def learning_rate_schedule(peak_lr: float, warmup_steps: int, num_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to `peak_lr`, then cosine decay to 0 at `num_steps`."""

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = peak_lr * step / max(warmup_steps, 1)
    progress = (step - warmup_steps) / max(num_steps - warmup_steps, 1)
    cosine = 0.5 * peak_lr * (1.0 + jnp.cos(jnp.pi * jnp.clip(progress, 0.0, 1.0)))
    return jnp.where(step < warmup_steps, warm, cosine)

  return schedule


TAU_SCHEDULES = ('cosine', 'constant')


def tau_schedule(tau_base: float, num_steps: int, kind: str = 'cosine') -> optax.Schedule:
  """The EMA rate: 'cosine' (the paper) rises from tau_base to 1 along
  tau_k = 1 - (1 - tau_base) * (cos(pi k / K) + 1) / 2; 'constant' stays at tau_base.

  'constant' is what PyTorch CIFAR-10 benchmarks use (lightly: 0.99). In a short schedule the
  cosine one leaves the target nearly frozen for the last part of training (0.9994 at 90%).
  """
  if kind not in TAU_SCHEDULES:
    raise ValueError(f'tau_schedule={kind!r}; valid: {", ".join(TAU_SCHEDULES)}')
  if kind == 'constant':
    return lambda step: jnp.full((), tau_base, jnp.float32)

  def schedule(step):
    progress = jnp.clip(jnp.asarray(step, jnp.float32) / max(num_steps, 1), 0.0, 1.0)
    return 1.0 - (1.0 - tau_base) * (jnp.cos(jnp.pi * progress) + 1.0) / 2.0

  return schedule


def is_excluded(path: tuple[Any, ...]) -> bool:
  """Biases and every norm parameter are exempt from weight decay and the trust ratio."""
  name = str(getattr(path[-1], 'key', path[-1]))
  return name == 'b' or name in NORM_PARAM_NAMES


def lars_mask(params: Any) -> Any:
  """True where LARS applies (weights), False for biases and norm parameters."""
  return jax.tree_util.tree_map_with_path(lambda p, _: not is_excluded(p), params)


class _ClipState(NamedTuple):
  count: jax.Array


def _scale_by_clipped_trust_ratio(trust_coefficient: float,
                                  learning_rate: optax.Schedule) -> optax.GradientTransformation:
  """LARC-style trust ratio: the LARS step of a layer never exceeds plain SGD's at the same LR.

  Scales each update u by min(tc * |w| / |u|, lr) / lr, so that after the LR a layer moves by
  min(tc * |w| / |u|, lr) * u. Public CIFAR recipes (e.g. solo-learn's `clip_lr`) pair this with
  a trust coefficient of 0.02: large early gradients are bounded by the trust ratio, small
  later ones get plain SGD instead of an ever-growing relative step.
  """
  def init(params):
    del params
    return _ClipState(count=jnp.zeros([], jnp.int32))

  def update(updates, state, params):
    lr = learning_rate(state.count)

    def scale(u, w):
      u_norm, w_norm = jnp.linalg.norm(u), jnp.linalg.norm(w)
      ratio = trust_coefficient * w_norm / jnp.where(u_norm > 0, u_norm, 1.0)
      ratio = jnp.where((u_norm > 0) & (w_norm > 0), ratio, 1.0)
      factor = jnp.minimum(ratio / jnp.maximum(lr, 1e-12), 1.0)
      return (u * factor).astype(u.dtype)

    return (jax.tree_util.tree_map(scale, updates, params),
            _ClipState(count=optax.safe_increment(state.count)))

  return optax.GradientTransformation(init, update)


OPTIMIZERS = ('lars', 'sgd')


def make_optimizer(opt_cfg: Any, learning_rate: optax.Schedule) -> optax.GradientTransformation:
  """LARS as in the release: g + wd * w, then the trust ratio, then momentum, then LR.

  The release's `scale_by_lars` accumulates momentum on the trust-scaled update and scales
  the sum by the current LR (mu = m * mu + u, step = -lr_t * mu), as PyTorch's SGD and
  solo-learn's LARS do. optax.lars applies the LR first and the momentum after
  (v = m * v + lr_t * u): the same while the LR is constant, a lagging step while it moves
  (warmup, cosine). `momentum_before_lr` (the release's order) is the default;
  False reproduces runs saved before it existed. Decay and trust ratio skip biases and norm
  parameters. With `trust_clip` the trust ratio is clipped LARC-style (see
  _scale_by_clipped_trust_ratio); the paper's LARS has no clipping, so it is off except in
  the CIFAR recipe.

  name='sgd' is the momentum SGD of PyTorch BYOL benchmarks (lightly's CIFAR-10 one):
  buffer = momentum * buffer + (g + wd * w), step = -LR * buffer. Weight decay skips norm
  parameters and biases, as in LARS, unless `decay_all_params` (PyTorch's SGD decays every
  parameter); the trust ratio always skips them.
  """
  if opt_cfg.name not in OPTIMIZERS:
    raise ValueError(f'unknown optimizer {opt_cfg.name!r}; valid: {", ".join(OPTIMIZERS)}')
  decay_mask = None if config_compat.setting(opt_cfg, 'optimizer.decay_all_params') else lars_mask
  decay = optax.add_decayed_weights(opt_cfg.weight_decay, decay_mask)
  momentum = optax.trace(decay=opt_cfg.momentum, nesterov=False)
  lr = optax.scale_by_learning_rate(learning_rate)
  if opt_cfg.name == 'sgd':
    return optax.chain(decay, momentum, lr)
  if config_compat.setting(opt_cfg, 'optimizer.trust_clip'):
    trust = _scale_by_clipped_trust_ratio(opt_cfg.trust_coefficient, learning_rate)
  else:
    trust = optax.scale_by_trust_ratio(trust_coefficient=opt_cfg.trust_coefficient, eps=0.0)
  trust = optax.masked(trust, lars_mask)
  if config_compat.setting(opt_cfg, 'optimizer.momentum_before_lr'):
    return optax.chain(decay, trust, momentum, lr)
  return optax.chain(decay, trust, lr, momentum)  # optax.lars's order and state layout


def ema_update(tau: jax.Array, target: Any, online: Any) -> Any:
  """target <- tau * target + (1 - tau) * online, leaf by leaf."""
  return jax.tree_util.tree_map(lambda t, o: tau * t + (1.0 - tau) * o, target, online)


def describe_mask(params: Any) -> dict[str, int]:
  """Counts of parameters inside and outside LARS, logged at start-up to show the mask."""
  mask = lars_mask(params)
  sizes = jax.tree_util.tree_map(lambda p: int(np.prod(p.shape)), params)
  inside = sum(s for s, m in zip(jax.tree_util.tree_leaves(sizes),
                                 jax.tree_util.tree_leaves(mask), strict=True) if m)
  total = sum(jax.tree_util.tree_leaves(sizes))
  return dict(lars_params=inside, excluded_params=total - inside)
