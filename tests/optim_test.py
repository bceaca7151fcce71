"""Tests of schedules, LARS with its exclusion masks, and the EMA update (float64 references)."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from byol_jax import optim


def test_learning_rate_schedule_endpoints_and_midpoints():
  """Warmup must start at 0 and be linear; cosine must hit peak/2 halfway and 0 at the end."""
  fn = optim.learning_rate_schedule(peak_lr=4.0, warmup_steps=10, num_steps=110)
  assert float(fn(0)) == 0.0
  np.testing.assert_allclose(float(fn(5)), 2.0, rtol=1e-6)
  np.testing.assert_allclose(float(fn(10)), 4.0, rtol=1e-6)
  np.testing.assert_allclose(float(fn(60)), 2.0, rtol=1e-6)
  np.testing.assert_allclose(float(fn(85)), 2.0 * (1 + math.cos(math.pi * 0.75)), rtol=1e-5)
  np.testing.assert_allclose(float(fn(110)), 0.0, atol=1e-7)


def test_scaled_lr_rule():
  """LR = base * batch / 256: the paper's 0.2 at batch 4096 is 3.2."""
  assert optim.scaled_lr(0.2, 4096) == 0.2 * 16


def test_tau_schedule_formula():
  """tau goes from tau_base to 1 along 1 - (1 - tau_base)(cos(pi k/K) + 1)/2."""
  fn = optim.tau_schedule(0.996, 1000)
  np.testing.assert_allclose(float(fn(0)), 0.996, rtol=1e-7)
  np.testing.assert_allclose(float(fn(500)), 1 - 0.004 * 0.5, rtol=1e-7)
  np.testing.assert_allclose(float(fn(1000)), 1.0, rtol=1e-7)
  k = 250
  np.testing.assert_allclose(float(fn(k)), 1 - 0.004 * (math.cos(math.pi * k / 1000) + 1) / 2,
                             rtol=1e-7)


def test_constant_tau_schedule_stays_at_tau_base():
  """'constant' keeps tau_base at every step (lightly's fixed 0.99); an unknown kind is refused.
  Breaks if the kind is ignored (the cosine would reach 1 at the end)."""
  fn = optim.tau_schedule(0.99, 1000, 'constant')
  for step in (0, 500, 1000, 5000):
    np.testing.assert_allclose(float(fn(step)), 0.99, rtol=1e-7)
  with pytest.raises(ValueError, match="tau_schedule='linear'"):
    optim.tau_schedule(0.99, 1000, 'linear')


def _opt_cfg(wd=0.1, tc=1e-3, clip=False):
  return ml_collections.ConfigDict(dict(name='lars', weight_decay=wd, momentum=0.9,
                                        trust_coefficient=tc, trust_clip=clip,
                                        momentum_before_lr=True))


def _lars_reference(params, grads, lr, wd, tc, excluded, clip=False):
  """Hand-written float64 LARS step from zero momentum: update = -lr * trust * (g + wd w).

  With clip (LARC): update = -min(trust, lr) * (g + wd w).
  """
  out = {}
  for key, w in params.items():
    g = np.asarray(grads[key], np.float64)
    w = np.asarray(w, np.float64)
    if excluded[key]:
      out[key] = w - lr * g
      continue
    g = g + wd * w
    trust = tc * np.linalg.norm(w) / np.linalg.norm(g)
    out[key] = w - (min(trust, lr) if clip else lr * trust) * g
  return out


def _one_update(cfg, lr, scale=1.0):
  rng = np.random.default_rng(0)
  params = {'conv': {'w': rng.normal(size=(3, 3, 2, 4))}, 'linear': {'w': rng.normal(size=(5, 3)),
            'b': rng.normal(size=(3,))}, 'bn': {'scale': rng.normal(size=(4,)),
            'offset': rng.normal(size=(4,))}}
  grads = jax.tree_util.tree_map(lambda p: scale * rng.normal(size=p.shape), params)
  to32 = lambda t: jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), t)
  opt = optim.make_optimizer(cfg, lambda step: lr)
  state = opt.init(to32(params))
  updates, state = opt.update(to32(grads), state, to32(params))
  new = jax.tree_util.tree_map(lambda p, u: p + u, to32(params), updates)
  flat = lambda t: {'/'.join(str(k.key) for k in path): v for path, v in
                    jax.tree_util.tree_flatten_with_path(t)[0]}
  excluded = {k: k.endswith(('/b', '/scale', '/offset')) for k in flat(params)}
  want = _lars_reference(flat(params), flat(grads), lr, cfg.weight_decay, cfg.trust_coefficient,
                         excluded, clip=cfg.trust_clip)
  for key, value in flat(new).items():
    np.testing.assert_allclose(np.asarray(value), want[key], rtol=2e-5, atol=1e-6, err_msg=key)
  return flat(params), flat(new)


def test_lars_one_update_with_exclusion_masks():
  """Weights get decay + trust ratio; biases and norm scale/offset get plain SGD-momentum."""
  _one_update(_opt_cfg(0.1), 0.5)


@pytest.mark.parametrize('scale', [1.0, 1e-3])
def test_clipped_lars_matches_reference_on_both_sides_of_the_clip(scale):
  """trust_clip: a weight moves by min(tc |w| / |g|, lr) * g. With unit gradients and tc 0.02
  the trust ratio (about 0.02) is below lr 0.5 (LARS side); with gradients 1000x smaller it is
  about 20, above lr, so the step must be plain SGD's (clipped side)."""
  params, new = _one_update(_opt_cfg(0.0, tc=0.02, clip=True), 0.5, scale)
  w, moved = np.asarray(params['linear/w']), np.asarray(new['linear/w']) - params['linear/w']
  relative = np.linalg.norm(moved) / np.linalg.norm(w)
  if scale == 1.0:
    np.testing.assert_allclose(relative, 0.02, rtol=1e-4)  # the trust ratio bounds the step
  else:
    assert 2e-4 < relative < 1e-3  # plain SGD: lr |g| / |w| = 0.5 * ~1e-3, not the 0.02 bound


def test_lars_momentum_accumulates_scaled_updates():
  """Second step at a constant LR: v = 0.9 v + trust * g, step -lr * v."""
  w = {'lin': {'b': jnp.asarray([1.0, -2.0])}}
  g = {'lin': {'b': jnp.asarray([0.5, 0.5])}}
  opt = optim.make_optimizer(_opt_cfg(0.0), lambda step: 0.1)
  state = opt.init(w)
  u1, state = opt.update(g, state, w)
  u2, state = opt.update(g, state, w)
  np.testing.assert_allclose(np.asarray(u1['lin']['b']), [-0.05, -0.05], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(u2['lin']['b']), [-0.095, -0.095], rtol=1e-6)


def _lars_over_steps(momentum_before_lr, lrs, params, grads, wd=0.1, tc=1e-3):
  cfg = _opt_cfg(wd, tc)
  cfg.momentum_before_lr = momentum_before_lr
  opt = optim.make_optimizer(cfg, lambda step: jnp.asarray(lrs, jnp.float32)[step])
  w = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), params)
  state = opt.init(w)
  for g in grads:
    updates, state = opt.update(jax.tree_util.tree_map(jnp.float32, g), state, w)
    w = optax.apply_updates(w, updates)
  return w


def test_lars_momentum_comes_before_the_lr_as_in_the_release():
  """The release's scale_by_lars: mu = 0.9 mu + trust * (g + wd w), then w -= lr_t * mu with
  the current LR. Float64 reference over four steps of a moving LR (warmup, then decay);
  optax.lars's order (v = 0.9 v + lr_t * trust * d) differs there, and must stay
  reproducible for runs saved before momentum_before_lr existed."""
  rng = np.random.default_rng(2)
  params = {'conv': {'w': rng.normal(size=(3, 3, 2, 4))}, 'linear': {'b': rng.normal(size=3)}}
  grads = [jax.tree_util.tree_map(lambda p: rng.normal(size=p.shape), params) for _ in range(4)]
  lrs, wd, tc = (0.0, 0.5, 2.0, 0.3), 0.1, 1e-3

  def reference(before):
    out = {}
    for layer, name in (('conv', 'w'), ('linear', 'b')):
      w, mu = np.asarray(params[layer][name], np.float64), 0.0
      for lr, g in zip(lrs, grads, strict=True):
        d = g[layer][name] + (wd * w if name == 'w' else 0.0)
        if name == 'w':
          d = d * tc * np.linalg.norm(w) / np.linalg.norm(d)
        mu = 0.9 * mu + (d if before else lr * d)
        w = w - (lr * mu if before else mu)
      out[layer] = w
    return out

  for before in (True, False):
    got, want = _lars_over_steps(before, lrs, params, grads, wd, tc), reference(before)
    for layer, name in (('conv', 'w'), ('linear', 'b')):
      np.testing.assert_allclose(np.asarray(got[layer][name]), want[layer], rtol=2e-5,
                                 atol=1e-6, err_msg=f'{before} {layer}')
  assert np.abs(reference(True)['conv'] - reference(False)['conv']).max() > 1e-3


def test_lars_before_momentum_before_lr_is_optax_lars_state_and_all():
  """Runs saved before `momentum_before_lr` (config_compat: False) restore into the same
  optimiser state layout and continue with the same updates as optax.lars."""
  w = {'conv': {'w': jnp.ones((3, 3)), 'b': jnp.ones(3)}}
  g = {'conv': {'w': jnp.full((3, 3), 0.3), 'b': jnp.full(3, 0.2)}}
  cfg = _opt_cfg(0.1)
  old_cfg = ml_collections.ConfigDict({k: v for k, v in cfg.items()
                                       if k != 'momentum_before_lr'})  # an old run's
  schedule = lambda count: 0.1 * (count + 1.0)
  ours = optim.make_optimizer(old_cfg, schedule)
  theirs = optax.lars(schedule, weight_decay=0.1, weight_decay_mask=optim.lars_mask,
                      trust_coefficient=1e-3, eps=0.0, trust_ratio_mask=optim.lars_mask,
                      momentum=0.9)
  s1, s2 = ours.init(w), theirs.init(w)
  assert jax.tree_util.tree_structure(s1) == jax.tree_util.tree_structure(s2)
  for _ in range(3):
    (u1, s1), (u2, s2) = ours.update(g, s1, w), theirs.update(g, s2, w)
    for a, b in zip(jax.tree_util.tree_leaves(u1), jax.tree_util.tree_leaves(u2), strict=True):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sgd_matches_pytorch_momentum_sgd_over_two_steps():
  """optimizer.name='sgd' is PyTorch's momentum SGD (buffer = m * buffer + g + wd w; step
  -lr * buffer), with decay skipping biases and norm parameters. Float64 reference, two
  steps with a changing LR, so a momentum applied before or after the LR (as LARS does)
  would fail here."""
  rng = np.random.default_rng(1)
  params = {'conv': {'w': rng.normal(size=(3, 3, 2, 4))}, 'bn': {'scale': rng.normal(size=(4,))},
            'linear': {'b': rng.normal(size=(3,))}}
  grads = [jax.tree_util.tree_map(lambda p: rng.normal(size=p.shape), params) for _ in range(2)]
  lrs, wd, m = (0.5, 0.2), 0.1, 0.9
  cfg = ml_collections.ConfigDict(dict(name='sgd', weight_decay=wd, momentum=m))
  opt = optim.make_optimizer(cfg, lambda step: jnp.asarray(lrs)[step])
  to32 = lambda t: jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), t)
  w, state = to32(params), None
  state = opt.init(w)
  for g in grads:
    updates, state = opt.update(to32(g), state, w)
    w = jax.tree_util.tree_map(lambda p, u: p + u, w, updates)
  cases = ((('conv', 'w'), True), (('bn', 'scale'), False), (('linear', 'b'), False))
  for path, decayed in cases:
    ref, buf = np.asarray(params[path[0]][path[1]], np.float64), 0.0
    for lr, g in zip(lrs, grads, strict=True):
      d = g[path[0]][path[1]] + (wd * ref if decayed else 0.0)
      buf = m * buf + d
      ref = ref - lr * buf
    np.testing.assert_allclose(np.asarray(w[path[0]][path[1]]), ref, rtol=2e-5, atol=1e-6,
                               err_msg='/'.join(path))


def test_unknown_optimizer_is_refused():
  """A typo in optimizer.name fails before anything is built, naming the valid ones."""
  with pytest.raises(ValueError, match='lars, sgd'):
    optim.make_optimizer(ml_collections.ConfigDict(dict(name='adam')), lambda step: 0.1)
  from byol_jax import train
  from configs import byol
  cfg = byol.get_config('demo')
  cfg.optimizer.name = 'adam'
  with pytest.raises(train.ConfigError, match="optimizer.name='adam'; valid: lars, sgd"):
    train.validate(cfg, 1)
  cfg = byol.get_config('demo')
  cfg.tau_schedule = 'linear'
  with pytest.raises(train.ConfigError, match="tau_schedule='linear'; valid: cosine, constant"):
    train.validate(cfg, 1)


def test_ema_update():
  """target <- tau target + (1 - tau) online."""
  t = {'a': jnp.asarray([1.0, 2.0])}
  o = {'a': jnp.asarray([3.0, -2.0])}
  np.testing.assert_allclose(np.asarray(optim.ema_update(0.75, t, o)['a']), [1.5, 1.0])


def test_total_steps_and_steps_per_epoch():
  """epochs * floor(N / B), or an explicit step count."""
  cfg = ml_collections.ConfigDict(dict(steps=0, epochs=3, batch_size=100))
  assert optim.total_steps(cfg, 1050) == 30
  cfg.steps = 7
  assert optim.total_steps(cfg, 1050) == 7


def test_cifar10_preset_uses_the_clipped_trust_ratio():
  """The CIFAR recipe's LARS is the clipped one at 0.02; ImageNet presets keep the paper's."""
  from configs import byol
  cifar = byol.get_config('cifar10').optimizer
  _one_update(_opt_cfg(cifar.weight_decay, cifar.trust_coefficient, cifar.trust_clip), 0.5, 1e-3)
  assert (cifar.trust_coefficient, cifar.trust_clip) == (0.02, True)
  paper = byol.get_config('r50').optimizer
  assert (paper.trust_coefficient, paper.trust_clip) == (1e-3, False)


def test_cifar10_lightly_preset_makes_lightlys_sgd_update():
  """Our summed 2 - 2cos loss has 4x the gradient of lightly's mean -cos loss, so the preset's
  (LR, weight decay) must turn 4g into lightly's PyTorch SGD step with LR 0.06 x 512/128 and
  weight decay 5e-4 on every parameter (a weight, a bias, a BN scale), momentum included
  (two steps, float64 reference)."""
  from configs import byol
  cfg = byol.get_config('cifar10_lightly')
  lr = optim.scaled_lr(cfg.optimizer.base_lr, cfg.batch_size)
  opt = optim.make_optimizer(cfg.optimizer, optax.constant_schedule(lr))
  start = {'conv': {'w': np.array([1.0, -2.0, 0.5])}, 'linear': {'b': np.array([0.2, -0.4])},
           'bn': {'scale': np.array([1.5])}}
  grads = [{'conv': {'w': np.array([0.3, 0.1, -0.2])}, 'linear': {'b': np.array([0.1, 0.0])},
            'bn': {'scale': np.array([-0.3])}}] * 2
  tree = jax.tree_util.tree_map
  params = tree(lambda x: jnp.asarray(x, jnp.float32), start)
  state, want, buf = opt.init(params), start, tree(np.zeros_like, start)
  for g in grads:  # torch.optim.SGD: buf = 0.9 buf + (g + wd w); w -= lr buf
    updates, state = opt.update(tree(lambda x: jnp.asarray(4 * x, jnp.float32), g), state,
                                params)
    params = optax.apply_updates(params, updates)
    buf = tree(lambda b, x, w: 0.9 * b + (x + 5e-4 * w), buf, g, want)
    want = tree(lambda w, b: w - 0.06 * 512 / 128 * b, want, buf)
  tree(lambda got, w: np.testing.assert_allclose(np.asarray(got), w, rtol=1e-6), params, want)
  assert (cfg.tau_schedule, cfg.tau_base, cfg.optimizer.warmup_epochs) == ('constant', 0.99, 0)
  assert cfg.target_init == 'copy'
  default = byol.get_config('cifar10')
  assert (default.optimizer.decay_all_params, default.target_init) == (False, 'random')
  assert (cfg.model.weight_init, cfg.model.zero_init_last_bn) == ('pytorch', False)
  assert (cfg.model.projector_hidden, cfg.model.predictor_hidden) == (1024, 1024)
  aug = cfg.augment
  assert (aug.jitter_style, aug.saturation, aug.view2.solarize_prob, aug.blur) == (
    'torchvision', 0.4, 0.0, False)


# The paper's and the release's optimisation facts (reference/byol_facts.md), written out
# here independently of configs/byol.py: epochs -> (base LR, weight decay, tau_base).
RELEASE_SCHEDULES = {40: (0.45, 1e-6, 0.97), 100: (0.45, 1e-6, 0.99),
                     300: (0.3, 1e-6, 0.99), 1000: (0.2, 1.5e-6, 0.996)}


@pytest.mark.parametrize('epochs', [None, 40, 100, 300, 1000])
def test_imagenet_presets_follow_the_release_per_schedule_length(epochs):
  """A wrong entry in the preset's table would train every ImageNet run with another
  schedule's LR, weight decay or tau; the rest of the recipe must not depend on it."""
  from configs import byol
  cfg = byol.get_config('r50' if epochs is None else f'r50,epochs={epochs}')
  want = RELEASE_SCHEDULES[epochs or 1000]
  opt = cfg.optimizer
  assert (cfg.epochs, opt.base_lr, opt.weight_decay, cfg.tau_base) == (epochs or 1000, *want)
  assert (cfg.batch_size, opt.name, opt.momentum, opt.trust_coefficient, opt.warmup_epochs,
          cfg.tau_schedule) == (4096, 'lars', 0.9, 1e-3, 10, 'cosine')


def test_other_schedule_lengths_take_the_nearest_release_entry():
  """`r50,epochs=N` for an N the release did not train keeps N epochs with the settings of
  the nearest length it did (ties: the shorter), as the presets' docstring says."""
  from configs import byol
  for epochs, nearest in ((60, 40), (70, 40), (200, 100), (500, 300), (800, 1000)):
    cfg = byol.get_config(f'r50x2,epochs={epochs}')
    assert cfg.epochs == epochs and cfg.model.width == 2
    assert (cfg.optimizer.base_lr, cfg.optimizer.weight_decay,
            cfg.tau_base) == RELEASE_SCHEDULES[nearest]
