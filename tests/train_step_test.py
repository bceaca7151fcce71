"""Tests of the training state and the data-parallel step."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from conftest import FAST_COMPILE, REPO, tiny_config

from byol_jax import optim, train_step


def _setup(cfg, devices=None):
  mesh = train_step.make_mesh(devices or jax.devices()[:1])
  fns = train_step.make_step_fns(cfg, 10, num_steps=10, steps_per_epoch=5)
  state = train_step.replicate(
    train_step.init_state(fns, jax.random.PRNGKey(0), (16, 16, 3)), mesh)
  return mesh, fns, state


def _views(seed=0, n=16):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(n, 16, 16, 3)).astype(np.float32),
          rng.normal(size=(n, 16, 16, 3)).astype(np.float32),
          rng.integers(0, 10, size=n).astype(np.int32))


def test_eight_devices_match_one_device():
  """Sharding the same global batch over 8 devices must not change params, BN stats or metrics.

  Breaks if gradients or metrics are not pmean-ed, BN statistics are per-device (the
  InfoNCE runs check the fused views' per-view statistics), or the collapse signals /
  InfoNCE negatives only see the local shard, or the online probe averages per device
  (a shard without labelled images pulled its loss and gradient towards 0).
  """
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8 '
             + FAST_COMPILE,
             JAX_PLATFORMS='cpu')
  out = subprocess.run([sys.executable, os.path.join(REPO, 'tests', 'scripts',
                                                     'step_equivalence.py')],
                       env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result['num_devices'] == 8
  for loss in ('byol', 'infonce'):
    r = result[loss]
    assert r['moved'] > 1e-4, 'the step did not change the params at all'
    for key in ('params', 'target', 'bn_state', 'opt', 'metrics'):
      assert r[key] < 2e-4, (loss, key, r[key])
    assert {'loss', 'lr', 'tau', 'probe_top1', 'proj_std', 'proj_rank'} <= set(r['metric_names'])
    assert np.isnan(r['rank_by_step'][0]) and r['rank_by_step'][1] > 1, r['rank_by_step']


def test_collapse_signals_only_on_logged_steps():
  """The step computes proj_std/proj_rank on the steps the trainer logs (every
  log_every_steps and the last) and NaN elsewhere; on a logged step they equal
  losses.collapse_signals of the same projections. Breaks if the condition drifts from the
  trainer's (train.py logs step % log_every_steps == 0 or the last step)."""
  from byol_jax import losses
  fns = train_step.make_step_fns(tiny_config(), 10, num_steps=10, steps_per_epoch=5)
  logged = [s for s in range(1, 13) if bool(train_step.is_logged_step(jnp.int32(s), fns))]
  assert logged == [2, 4, 6, 8, 10, 12]
  fns5 = fns._replace(log_every=4, num_steps=10)
  assert [s for s in range(1, 11) if bool(train_step.is_logged_step(jnp.int32(s), fns5))] \
    == [4, 8, 10]
  z = jax.random.normal(jax.random.PRNGKey(1), (32, 16))
  skipped = train_step.collapse_metrics(z, jnp.int32(3), fns, None)
  computed = train_step.collapse_metrics(z, jnp.int32(4), fns, None)
  want = losses.collapse_signals(z)
  assert np.isnan(float(skipped['proj_rank'])) and np.isnan(float(skipped['proj_std']))
  for k in ('proj_std', 'proj_rank'):
    np.testing.assert_allclose(float(computed[k]), float(want[k]), rtol=1e-6)
  # The step itself (NaN at step 1, computed at step 2, on 1 and 8 devices) is checked in
  # test_eight_devices_match_one_device.


def test_target_ema_uses_online_params_after_the_update():
  """target_new = tau * target + (1 - tau) * online_new (not the pre-update online params)."""
  cfg = tiny_config(**{'optimizer.warmup_epochs': 0})  # a non-zero LR at step 0
  mesh, fns, state = _setup(cfg)
  before = jax.device_get(state)
  step = train_step.make_views_step(fns, mesh)
  new, metrics = step(state, *train_step.shard_batch(_views(), mesh))
  new = jax.device_get(new)
  tau = float(fns.tau_fn(0))
  want = optim.ema_update(tau, before.target_params, new.online_params)
  stale = optim.ema_update(tau, before.target_params, before.online_params)
  diff = lambda a, b: max(jax.tree_util.tree_leaves(jax.tree_util.tree_map(
    lambda x, y: float(np.abs(np.asarray(x) - np.asarray(y)).max()), a, b)))
  assert diff(new.target_params, want) < 1e-6
  assert diff(new.target_params, stale) > 1e-6
  assert int(new.step) == 1 and float(metrics['tau']) == tau


def _is_count(path) -> bool:
  return str(getattr(path[-1], 'name', '')) == 'count'


def test_nonfinite_batch_leaves_state_unchanged():
  """A NaN in the batch must skip the update: params, opt state, target and BN stats unchanged,
  but the optimiser's schedule count advances with the step (it stayed behind, so every
  later step ran at an earlier step's LR: not the logged one, and not 0 at the end)."""
  cfg = tiny_config()
  mesh, fns, state = _setup(cfg)
  before = jax.device_get(state)
  v1, v2, labels = _views()
  v1[3, 2, 2, 1] = np.nan
  step = train_step.make_views_step(fns, mesh)
  new, metrics = step(state, *train_step.shard_batch((v1, v2, labels), mesh))
  new = jax.device_get(new)
  assert float(metrics['nonfinite']) == 1.0
  for field in ('online_params', 'online_state', 'target_params', 'target_state', 'opt_state'):
    same = jax.tree_util.tree_map_with_path(
      lambda p, a, b: bool(np.array_equal(a, b)) != _is_count(p),
      getattr(before, field), getattr(new, field))
    assert all(jax.tree_util.tree_leaves(same)), field
  assert int(new.step) == 1
  counts = [int(x) for p, x in jax.tree_util.tree_flatten_with_path(new.opt_state)[0]
            if _is_count(p)]
  assert counts == [1]


def test_steps_do_not_recompile():
  """Repeated steps reuse one executable (a retrace per step would be a silent slowdown)."""
  cfg = tiny_config()
  mesh, fns, state = _setup(cfg)
  step = train_step.make_views_step(fns, mesh)
  for seed in range(3):
    state, _ = step(state, *train_step.shard_batch(_views(seed), mesh))
  assert step._cache_size() == 1


def test_resident_step_trains_from_device_data():
  """The device-resident step samples, augments and updates; loss is finite and params move."""
  cfg = tiny_config()
  mesh, fns, state = _setup(cfg)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 255, size=(64, 16, 16, 3), dtype=np.uint8)
  labels = rng.integers(0, 10, size=64).astype(np.int32)
  data = train_step.shard_batch((images, labels), mesh)
  step = train_step.make_resident_step(fns, mesh, cfg.augment, cfg.batch_size, cfg.image_size)
  p0 = jax.device_get(state.online_params)
  state, metrics = step(state, *data)
  state, metrics = step(state, *data)
  assert np.isfinite(float(metrics['loss'])) and float(metrics['nonfinite']) == 0.0
  moved = jax.tree_util.tree_map(lambda a, b: float(jnp.abs(a - b).max()), p0,
                                 jax.device_get(state.online_params))
  assert max(jax.tree_util.tree_leaves(moved)) > 0


def test_copied_target_starts_as_the_online_network_in_buffers_of_its_own():
  """target_init='copy' must start the target equal to the online network (PyTorch
  implementations) yet in buffers of its own: the step donates the state, and a buffer
  donated twice fails ("Attempt to donate the same buffer twice", as it did with eager
  init). 'random' (the release) gives different weights."""
  def init(cfg, jit):
    fns = train_step.make_step_fns(cfg, 10, num_steps=10, steps_per_epoch=5)
    fn = lambda rng: train_step.init_state(fns, rng, (16, 16, 3))
    return (jax.jit(fn) if jit else fn)(jax.random.PRNGKey(0))

  leaves = lambda s, tree: jax.tree_util.tree_leaves(getattr(s, tree))
  copied = init(tiny_config(target_init='copy'), jit=False)
  for online, target in (('online_params', 'target_params'), ('online_state', 'target_state')):
    for a, b in zip(leaves(copied, online), leaves(copied, target), strict=True):
      assert np.array_equal(a, b) and a.unsafe_buffer_pointer() != b.unsafe_buffer_pointer()
  fresh = init(tiny_config(), jit=True)
  equal = [np.array_equal(fresh.online_params[m]['w'], fresh.target_params[m]['w'])
           for m in fresh.online_params if 'w' in fresh.online_params[m]]
  assert equal and not any(equal)


def test_fused_views_step_equals_one_call_per_view():
  """fuse_views=True (both views in one network call, per-view BN statistics) must give the
  update that one call per view gives: params, target, BN moving averages, optimiser state
  and metrics. Breaks if the stacked outputs are split at the wrong row (the views swapped:
  the probe then learns from view2) or the BN statistics are pooled over the views."""
  views = _views(seed=3)
  results = []
  for fuse in (True, False):
    mesh, fns, state = _setup(tiny_config(fuse_views=fuse, **{'optimizer.warmup_epochs': 0}))
    assert fns.fuse_views is fuse
    step = train_step.make_views_step(fns, mesh)
    results.append(jax.device_get(step(state, *train_step.shard_batch(views, mesh))))
  (fused, m_fused), (separate, m_separate) = results
  for a, b in zip(jax.tree_util.tree_leaves(fused), jax.tree_util.tree_leaves(separate),
                  strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-5)
  for k in ('loss', 'probe_loss', 'probe_top1', 'grad_norm'):
    np.testing.assert_allclose(float(m_fused[k]), float(m_separate[k]), rtol=1e-4, err_msg=k)


def test_warm_start_takes_the_networks_and_keeps_the_rest_fresh():
  """A warm start must take both networks' parameters and BN statistics from the source and
  keep its own step, key, optimiser state and probe. Breaks if the probe (another dataset's
  classes) or the old schedule's momentum were carried over, or a network left fresh."""
  init = lambda cfg, seed: train_step.init_state(
    train_step.make_step_fns(cfg, 10, num_steps=10, steps_per_epoch=5),
    jax.random.PRNGKey(seed), (16, 16, 3))
  source, fresh = init(tiny_config(), 1), init(tiny_config(), 2)
  source = source._replace(  # BN statistics and momentum as after training
    online_state=jax.tree_util.tree_map(lambda x: x + 1, source.online_state),
    opt_state=jax.tree_util.tree_map(lambda x: x + 1, source.opt_state))
  out = train_step.warm_start_state(fresh, source)
  same = lambda a, b: all(np.array_equal(x, y) for x, y in zip(
    jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True))
  drop_probe = lambda p: {m: v for m, v in p.items() if m != 'probe'}
  for field in ('online_params', 'target_params'):
    assert same(drop_probe(getattr(out, field)), drop_probe(getattr(source, field)))
    assert not same(drop_probe(getattr(out, field)), drop_probe(getattr(fresh, field)))
  for field in ('online_state', 'target_state'):
    assert same(getattr(out, field), getattr(source, field))
  assert same(out.online_params['probe'], fresh.online_params['probe'])
  assert not same(out.online_params['probe'], source.online_params['probe'])
  assert same((out.step, out.rng, out.opt_state), (fresh.step, fresh.rng, fresh.opt_state))


def test_warm_start_refuses_another_architecture_in_one_line():
  """Another width, or a head norm the source lacks, must be refused naming the parameters,
  not half-loaded: a silent mix of old and fresh layers would train a different model."""
  init = lambda cfg: jax.eval_shape(lambda: train_step.init_state(
    train_step.make_step_fns(cfg, 10, num_steps=10, steps_per_epoch=5),
    jax.random.PRNGKey(0), (16, 16, 3)))
  source = init(tiny_config())
  for overrides, says in (({'model.width': 0.25}, 'encoder/stem_conv/w float32[3, 3, 3, 8] '
                           'there, float32[3, 3, 3, 16] here'),
                          ({'model.projector_norm': 'none'}, 'projector/batch_norm/scale only '
                           'there')):
    try:
      train_step.warm_start_state(init(tiny_config(**overrides)), source)
    except ValueError as e:
      assert says in str(e) and '\n' not in str(e), e
    else:
      raise AssertionError(f'{overrides} was accepted')
