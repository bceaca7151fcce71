"""The BYOL training state and the data-parallel update step.

The step is written for one device with a named axis (`AXIS`): gradients and metrics are
averaged with `pmean`, BatchNorm statistics are synchronised inside the network, and
`jax.shard_map` over a 1-D mesh maps it over every device under `jax.jit`. The same code
runs on one device and on many; the batch is sharded on its leading axis and the state is
replicated and donated.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from byol_jax import augment, config_compat, losses, networks, optim

AXIS = 'data'
TARGET_INITS = ('random', 'copy')


class TrainState(NamedTuple):
  """Everything that defines a run at a step; checkpointing saves exactly this."""
  step: jax.Array
  rng: jax.Array
  online_params: hk.Params
  online_state: hk.State
  target_params: hk.Params
  target_state: hk.State
  opt_state: optax.OptState


class StepFns(NamedTuple):
  """The pieces of one experiment that the step closes over (all pure)."""
  network: hk.TransformedWithState
  init_network: hk.TransformedWithState  # same params, no mesh axis: init runs outside it
  optimizer: optax.GradientTransformation
  lr_fn: optax.Schedule
  tau_fn: optax.Schedule
  loss: str
  infonce_temperature: float
  # Steps whose metrics the trainer reads (step % log_every == 0, and the last one): only
  # they pay for the collapse signals' eigendecomposition (see collapse_metrics).
  log_every: int = 1
  num_steps: int = 0
  target_init: str = 'random'  # or 'copy' (see init_state)
  fuse_views: bool = False  # one network call on both views (see _forward_views)


def precision_dtype(name: str) -> jnp.dtype:
  """Compute dtype of a `precision` config value."""
  valid = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
  if name not in valid:
    raise ValueError(f'unknown precision {name!r}; valid: {", ".join(valid)}')
  return valid[name]


def make_step_fns(cfg: Any, num_classes: int, num_steps: int, steps_per_epoch: int,
                  axis_name: str | None = AXIS) -> StepFns:
  """Builds network, optimiser and schedules from the config."""
  dtype = precision_dtype(cfg.precision)
  network = networks.build_network(cfg.model, num_classes, axis_name=axis_name, dtype=dtype)
  init_network = networks.build_network(cfg.model, num_classes, axis_name=None, dtype=dtype)
  warmup = min(int(round(cfg.optimizer.warmup_epochs * steps_per_epoch)), num_steps)
  peak = optim.scaled_lr(cfg.optimizer.base_lr, cfg.batch_size)
  lr_fn = optim.learning_rate_schedule(peak, warmup, num_steps)
  tau_fn = optim.tau_schedule(cfg.tau_base, num_steps, config_compat.setting(cfg, 'tau_schedule'))
  optimizer = optim.make_optimizer(cfg.optimizer, lr_fn)
  if cfg.loss not in losses.LOSSES:
    raise ValueError(f'unknown loss {cfg.loss!r}; valid: {", ".join(losses.LOSSES)}')
  target_init = config_compat.setting(cfg, 'target_init')
  if target_init not in TARGET_INITS:
    raise ValueError(f'unknown target_init {target_init!r}; valid: {", ".join(TARGET_INITS)}')
  return StepFns(network, init_network, optimizer, lr_fn, tau_fn, cfg.loss,
                 cfg.infonce_temperature, max(1, int(cfg.log_every_steps)), num_steps,
                 target_init, bool(cfg.get('fuse_views', False)))


def is_logged_step(step: int | jax.Array, fns: StepFns) -> bool | jax.Array:
  """True on the steps (counted from 1) whose metrics the trainer fetches and writes; the
  trainer's loop (Python ints) and the step (traced) both ask here."""
  return (step % fns.log_every == 0) | (step == fns.num_steps)


def collapse_metrics(projection: jax.Array, step: jax.Array, fns: StepFns,
                     axis_name: str | None) -> dict[str, jax.Array]:
  """The collapse signals on logged steps, NaN on the others.

  Why: their eigendecomposition of a [dim, dim] gram is a chain of small solver kernels, a
  fixed cost per step that the trainer only reads every `log_every` steps; lax.cond runs
  one branch, so the other steps skip it. The predicate is the replicated step counter, so
  every device takes the same branch and the collectives inside stay matched.
  """
  def skipped(_):
    return dict(proj_std=jnp.float32(jnp.nan), proj_rank=jnp.float32(jnp.nan))

  return jax.lax.cond(is_logged_step(step, fns),
                      lambda z: losses.collapse_signals(z, axis_name), skipped, projection)


def init_state(fns: StepFns, rng: jax.Array, image_shape: tuple[int, int, int]) -> TrainState:
  """Fresh state. The target gets its own random init, as in the original release, or with
  `target_init='copy'` starts equal to the online network (PyTorch implementations)."""
  online_rng, target_rng, state_rng = jax.random.split(rng, 3)
  dummy = jnp.zeros((2, *image_shape), jnp.float32)
  online_params, online_state = fns.init_network.init(online_rng, dummy, is_training=True)
  if fns.target_init == 'copy':  # own buffers: the step donates the state, each once
    target_params, target_state = jax.tree_util.tree_map(jnp.copy, (online_params, online_state))
  else:
    target_params, target_state = fns.init_network.init(target_rng, dummy, is_training=True)
  return TrainState(step=jnp.zeros((), jnp.int32), rng=state_rng,
                    online_params=online_params, online_state=online_state,
                    target_params=target_params, target_state=target_state,
                    opt_state=fns.optimizer.init(online_params))


FRESH_MODULES = ('probe',)  # what a warm start never takes over (see warm_start_state)


def warm_start_state(fresh: TrainState, source: TrainState) -> TrainState:
  """`fresh` with the networks of `source`: a new run that starts from an earlier one.

  Taken over: the online and target networks' parameters and BatchNorm statistics
  (encoder, projector, predictor). Kept fresh: the step, the random key, the optimiser
  state (momentum belongs to the old schedule) and the linear probe (its classes may be
  another dataset's; it tracks the encoder anyway). Raises ValueError, in one line, when
  the two networks differ in a parameter's name, shape or dtype: a silent mix of carried
  and fresh layers would train another model than either.
  """
  trees = {}
  for field in ('online_params', 'online_state', 'target_params', 'target_state'):
    trees[field] = _take_over(getattr(fresh, field), getattr(source, field), field)
  return fresh._replace(**trees)


def _take_over(fresh: Any, source: Any, field: str) -> Any:
  out, wrong = {}, []
  for module, values in fresh.items():
    if module in FRESH_MODULES:
      out[module] = values
      continue
    out[module] = {}
    for name, value in values.items():
      old = source.get(module, {}).get(name)
      if old is None:
        wrong.append(f'{module}/{name} missing there')
      elif np.shape(old) != np.shape(value) or np.dtype(old.dtype) != np.dtype(value.dtype):
        wrong.append(f'{module}/{name} {old.dtype}{list(np.shape(old))} there, '
                     f'{value.dtype}{list(np.shape(value))} here')
      else:
        out[module][name] = old
  for module, values in source.items():
    if module not in FRESH_MODULES:
      wrong += [f'{module}/{name} only there' for name in values
                if name not in fresh.get(module, {})]
  if wrong:
    more = f' (and {len(wrong) - 3} more)' if len(wrong) > 3 else ''
    raise ValueError(f'its {field} do not fit this network: {"; ".join(wrong[:3])}{more}')
  return out


def _forward_views(fns: StepFns, params: hk.Params, state: hk.State, view1: jax.Array,
                   view2: jax.Array) -> tuple[dict, dict, hk.State]:
  """One network on both views: (outputs on view1, outputs on view2, new state).

  Fused (`fuse_views`), the views go through one call as a stacked batch whose BatchNorm
  statistics stay per view, so it computes what two calls compute, with half the kernel
  launches and convolutions twice as large: meant for small images on a GPU, where
  launches count. Measured on an H200, that bought 1.5% for ResNet-18 at 32 px and nothing
  for ResNet-50; on a 2-core CPU it is slower (docs/performance.md, "Fused views measured").
  """
  apply = fns.network.apply
  if not fns.fuse_views:
    out1, state = apply(params, state, None, view1, is_training=True)
    out2, state = apply(params, state, None, view2, is_training=True)
    return out1, out2, state
  both, state = apply(params, state, None, jnp.concatenate([view1, view2]), is_training=True,
                      views=2)
  n = view1.shape[0]
  return ({k: v[:n] for k, v in both.items()}, {k: v[n:] for k, v in both.items()}, state)


def _loss_fn(online_params, online_state, target_params, target_state, view1, view2, labels,
             fns: StepFns, axis_name):
  """Online forward on both views, target forward on both views, BYOL loss + probe loss."""
  on1, on2, online_state = _forward_views(fns, online_params, online_state, view1, view2)
  tg1, tg2, target_state = _forward_views(fns, target_params, target_state, view1, view2)
  tg1, tg2 = jax.lax.stop_gradient(tg1), jax.lax.stop_gradient(tg2)
  byol = losses.LOSSES[fns.loss](on1['prediction'], on2['prediction'], tg1['projection'],
                                 tg2['projection'], fns.infonce_temperature, axis_name)
  probe_loss, probe_acc = losses.probe_loss_and_accuracy(on1['logits'], labels, axis_name)
  aux = dict(online_state=online_state, target_state=target_state, byol_loss=byol,
             probe_loss=probe_loss, probe_top1=probe_acc, projection=on1['projection'])
  return byol + probe_loss, aux


def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]
  return jnp.all(jnp.stack(leaves))


def _unless_finite(finite: jax.Array, new: Any, old: Any) -> Any:
  """`new` where the step was finite, else `old`, leaf by leaf; schedule counts inside
  optimiser states always advance, as `state.step` does, so that the LR applied after a
  skipped step is the schedule's at that step (and the one logged)."""
  def pick(path, n, o):
    if str(getattr(path[-1], 'name', '')) == 'count':
      return n
    return jnp.where(finite, n, o)
  return jax.tree_util.tree_map_with_path(pick, new, old)


def byol_update(state: TrainState, view1: jax.Array, view2: jax.Array, labels: jax.Array,
                fns: StepFns, axis_name: str | None = AXIS) -> tuple[TrainState, dict]:
  """One BYOL update on this device's share of the batch.

  The EMA target moves towards the online weights AFTER the optimiser step. A step whose
  loss or gradients are not finite changes nothing but the step counter (and reports it),
  so one bad batch cannot poison params, optimiser state, target or BN statistics.
  """
  pmean = (lambda x: jax.lax.pmean(x, axis_name)) if axis_name else (lambda x: x)
  grad_fn = jax.grad(_loss_fn, has_aux=True)
  grads, aux = grad_fn(state.online_params, state.online_state, state.target_params,
                       state.target_state, view1, view2, labels, fns, axis_name)
  grads = pmean(grads)
  updates, opt_state = fns.optimizer.update(grads, state.opt_state, state.online_params)
  online_params = optax.apply_updates(state.online_params, updates)
  tau = fns.tau_fn(state.step)
  target_params = optim.ema_update(tau, state.target_params, online_params)
  metrics = dict(loss=aux['byol_loss'], probe_loss=aux['probe_loss'],
                 probe_top1=aux['probe_top1'])
  metrics = pmean(metrics)
  finite = _all_finite(grads) & jnp.isfinite(metrics['loss'])
  new = TrainState(state.step + 1, state.rng, online_params, aux['online_state'],
                   target_params, aux['target_state'], opt_state)
  new = new._replace(**{f: _unless_finite(finite, getattr(new, f), getattr(state, f))
                        for f in TrainState._fields if f not in ('step', 'rng')})
  metrics.update(collapse_metrics(aux['projection'], state.step + 1, fns, axis_name))
  metrics.update(lr=fns.lr_fn(state.step), tau=tau, nonfinite=1.0 - finite.astype(jnp.float32),
                 grad_norm=optax.tree.norm(grads),
                 param_norm=optax.tree.norm(state.online_params))
  return new, metrics


def make_mesh(devices: list | None = None) -> Mesh:
  """A 1-D data-parallel mesh over all (or the given) devices."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (AXIS,))


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places a pytree fully replicated on the mesh."""
  return jax.device_put(tree, NamedSharding(mesh, P()))


def shard_batch(tree: Any, mesh: Mesh) -> Any:
  """Places host arrays on the mesh, split along their leading axis.

  The arrays are the global value: with several processes each passes the same arrays
  and keeps only the rows of its own devices (the device-resident dataset).
  """
  return jax.device_put(tree, NamedSharding(mesh, P(AXIS)))


def shard_process_batch(tree: Any, mesh: Mesh) -> Any:
  """Places this process's rows of a global batch (a streamed batch) on its devices.

  The global batch is the processes' rows concatenated in process order, the same rows a
  single process holding all devices would get.
  """
  sharding = NamedSharding(mesh, P(AXIS))
  return jax.tree_util.tree_map(
    lambda x: jax.make_array_from_process_local_data(sharding, x), tree)


def _shard_map(fn: Callable, mesh: Mesh, in_specs, out_specs) -> Callable:
  return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


def make_views_step(fns: StepFns, mesh: Mesh) -> Callable:
  """step(state, view1, view2, labels) on ready-made normalised views (tests, benchmarks)."""

  def per_device(state, view1, view2, labels):
    return byol_update(state, view1, view2, labels, fns, AXIS)

  mapped = _shard_map(per_device, mesh, (P(), P(AXIS), P(AXIS), P(AXIS)), (P(), P()))
  return jax.jit(mapped, donate_argnums=0)


def _device_key(state: TrainState, salt: int) -> jax.Array:
  """One RNG per (step, device, purpose): derived, never stored, so resume is exact."""
  key = jax.random.fold_in(jax.random.fold_in(state.rng, salt), state.step)
  return jax.random.fold_in(key, jax.lax.axis_index(AXIS))


def _sample_indices(state: TrainState, num_local: int, batch_local: int) -> jax.Array:
  """This device's batch: a slice of a fresh permutation of its shard each epoch."""
  per_epoch = max(num_local // batch_local, 1)
  epoch, offset = state.step // per_epoch, state.step % per_epoch
  key = jax.random.fold_in(jax.random.fold_in(state.rng, 1), epoch)
  key = jax.random.fold_in(key, jax.lax.axis_index(AXIS))
  perm = jax.random.permutation(key, num_local)
  return jax.lax.dynamic_slice_in_dim(perm, offset * batch_local, batch_local)


def resident_views(state: TrainState, images: jax.Array, labels: jax.Array, aug_cfg: Any,
                   batch_local: int, image_size: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per device: this step's sample of the device's shard and its two augmented views.

  The input half of the resident step, public so that the benchmark times exactly it.
  """
  idx = _sample_indices(state, images.shape[0], batch_local)
  batch, batch_labels = jnp.take(images, idx, axis=0), jnp.take(labels, idx, axis=0)
  view1, view2 = augment.make_views(_device_key(state, 2), batch, aug_cfg, image_size)
  return view1, view2, batch_labels


def stream_views(state: TrainState, crops: jax.Array,
                 aug_cfg: Any) -> tuple[jax.Array, jax.Array]:
  """Per device: the two views of host-cropped uint8 pairs [B, 2, S, S, 3]."""
  return augment.finish_views(_device_key(state, 2), crops, aug_cfg)


def make_resident_step(fns: StepFns, mesh: Mesh, aug_cfg: Any, batch_size: int,
                       image_size: int) -> Callable:
  """step(state, images, labels) with the dataset resident on the devices.

  `images` (uint8 [N, H, W, 3]) and `labels` are sharded over the mesh once; each step
  every device samples its share of the batch from its shard and makes both views with the
  BYOL augmentations, so no host work sits on the critical path.
  """
  batch_local = batch_size // mesh.size

  def per_device(state, images, labels):
    view1, view2, batch_labels = resident_views(state, images, labels, aug_cfg, batch_local,
                                                image_size)
    return byol_update(state, view1, view2, batch_labels, fns, AXIS)

  mapped = _shard_map(per_device, mesh, (P(), P(AXIS), P(AXIS)), (P(), P()))
  return jax.jit(mapped, donate_argnums=0)


def make_stream_step(fns: StepFns, mesh: Mesh, aug_cfg: Any) -> Callable:
  """step(state, crops, labels) for host-cropped uint8 pairs [B, 2, S, S, 3] (streaming)."""

  def per_device(state, crops, labels):
    view1, view2 = stream_views(state, crops, aug_cfg)
    return byol_update(state, view1, view2, labels, fns, AXIS)

  mapped = _shard_map(per_device, mesh, (P(), P(AXIS), P(AXIS)), (P(), P()))
  return jax.jit(mapped, donate_argnums=0)
