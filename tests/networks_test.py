"""Tests of the Haiku networks: parameter counts against torchvision's, shapes, options."""

import math
import re

import chex
import haiku as hk
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from byol_jax import networks


def _encoder_params(depth, width=1, cifar_stem=False, size=32):
  fwd = hk.transform_with_state(
    lambda x: networks.ResNet(depth, width, cifar_stem)(x, is_training=True))
  x = jnp.zeros((1, size, size, 3))
  return jax.eval_shape(lambda: fwd.init(jax.random.PRNGKey(0), x))[0], fwd, x


@pytest.mark.parametrize('depth,count', [(18, 11_176_512), (50, 23_508_032)])
def test_resnet_parameter_count_matches_torchvision(depth, count):
  """torchvision resnet18/50 minus the fc layer: a wrong block layout changes the count."""
  params, _, _ = _encoder_params(depth)
  assert networks.count_params(params) == count


def test_width_multiplier_scales_channels():
  """ResNet-50 x2 has 2048*2 output features and about 4x the parameters (the paper's 94M)."""
  params, fwd, x = _encoder_params(50, 2)
  assert 93e6 < networks.count_params(params) < 95e6
  out, _ = jax.eval_shape(lambda: fwd.apply(*fwd.init(jax.random.PRNGKey(0), x), None, x))
  assert out.shape == (1, 4096)


def test_cifar_stem_replaces_7x7_conv_and_max_pool():
  """The CIFAR stem is a 3x3 conv; the output's dependence on resolution shows no downsampling."""
  for cifar, kernel in ((True, 3), (False, 7)):
    params, _, _ = _encoder_params(10, 0.25, cifar)
    conv = [k for k in params if k.endswith('stem_conv')][0]
    assert params[conv]['w'].shape[0] == kernel
  # With the CIFAR stem an 8 px input reaches the last stage at 1x1 and still runs; the
  # ImageNet stem (x4 extra downsampling) at 8 px would also run, so compare FLOPs instead.
  flops = {}
  for cifar in (True, False):
    _, fwd, x = _encoder_params(10, 0.125, cifar)
    p, s = jax.jit(lambda x, f=fwd: f.init(jax.random.PRNGKey(0), x))(x)
    apply = jax.jit(lambda p, s, x, f=fwd: f.apply(p, s, None, x)[0])
    flops[cifar] = apply.lower(p, s, x).compile().cost_analysis()['flops']
  assert flops[True] > 5 * flops[False]  # 4x more resolution per side after the stem


def test_zero_init_last_bn_makes_blocks_identity_residuals():
  """With zero-init the last BN scale of each block is 0 (and 1 without it)."""
  for zero, value in ((True, 0.0), (False, 1.0)):
    fwd = hk.transform_with_state(lambda x, z=zero: networks.ResNet(10, 0.25, True, z)(x, True))
    params = jax.jit(lambda f=fwd: f.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))[0])()
    last = [v['scale'] for k, v in params.items() if k.endswith('_bn_1')]
    assert last and all(float(jnp.abs(s - value).max()) == 0.0 for s in last)


def _init_params(weight_init):
  cfg = _model_cfg()
  cfg.width, cfg.projector_hidden, cfg.predictor_hidden = 0.5, 512, 512
  cfg.weight_init = weight_init
  net = networks.build_network(cfg, num_classes=3)
  return jax.jit(lambda: net.init(jax.random.PRNGKey(0), jnp.zeros((2, 16, 16, 3)), True)[0])()


def _truncated_std() -> float:
  """Std of a standard normal cut at +-2 (Haiku's TruncatedNormal), from the formula."""
  density, mass = math.exp(-2.0) / math.sqrt(2 * math.pi), math.erf(2 / math.sqrt(2))
  return math.sqrt(1 - 2 * 2 * density / mass)


def test_weight_inits_follow_the_release_he_and_pytorch():
  """'pytorch' must give PyTorch's layer defaults, U(+-1/sqrt(fan_in)) for conv and linear
  weights and linear biases; 'release' the release's Haiku defaults, a normal cut at 2 std
  of std 1/sqrt(fan_in) (0.88/sqrt(fan_in) after the cut), zero biases; 'he_fan_out' He
  normal (fan_out) convolutions. A wrong fan or distribution moves the std or the bound
  (each layer checked)."""
  torch_like, release, he = (_init_params(k) for k in ('pytorch', 'release', 'he_fan_out'))
  checked = 0
  for name, leaves in torch_like.items():
    if name.endswith('probe') or 'w' not in leaves:
      continue
    w = np.asarray(leaves['w'], np.float64)
    fan_in = int(np.prod(w.shape[:-1]))
    bound = 1 / np.sqrt(fan_in)
    assert np.abs(w).max() <= bound, name
    if w.size >= 4096:
      assert np.std(w) == pytest.approx(bound / np.sqrt(3), rel=0.08), name
      ours = np.asarray(release[name]['w'], np.float64)
      assert np.std(ours) == pytest.approx(_truncated_std() * bound, rel=0.08), name
      assert np.abs(ours).max() <= 2 * bound, name
      if w.ndim == 4:
        fan_out = int(np.prod(w.shape[:2])) * w.shape[-1]
        he_std = np.std(np.asarray(he[name]['w'], np.float64))
        assert he_std == pytest.approx(np.sqrt(2 / fan_out), rel=0.08), name
      checked += 1
    if 'b' in leaves:
      b = np.asarray(leaves['b'])
      assert np.abs(b).max() <= bound and np.abs(b).max() > 0.5 * bound, name
      assert not np.any(np.asarray(release[name]['b'])), name
  assert checked >= 8


@pytest.mark.parametrize('bias', [False, True, None])
def test_head_output_bias_follows_the_config(bias):
  """The release's projector and predictor end in a Linear without bias (every preset but
  cifar10_lightly); a config saved before the option (None: no field) had one, and must
  rebuild it, or its checkpoints would no longer restore."""
  cfg = _model_cfg()
  if bias is not None:
    cfg.head_output_bias = bias
  net = networks.build_network(cfg, num_classes=3)
  params = jax.eval_shape(lambda: net.init(jax.random.PRNGKey(0), jnp.zeros((2, 16, 16, 3)),
                                           True)[0])
  expected = {'w', 'b'} if bias in (True, None) else {'w'}
  for head in ('projector', 'predictor'):
    assert set(params[f'{head}/linear_1']) == expected
    assert set(params[f'{head}/linear_0']) == {'w', 'b'}


def test_presets_follow_the_release_heads_except_lightlys():
  """Every preset builds the release's heads except cifar10_lightly, which follows lightly's
  PyTorch heads; breaks if a preset silently takes the other kind."""
  from configs import byol as byol_configs
  presets = {name: byol_configs.get_config(name).model.head_output_bias
             for name in byol_configs.PRESETS}
  assert presets.pop('cifar10_lightly') is True
  assert not any(presets.values()), presets


def test_unknown_weight_init_is_refused():
  with pytest.raises(ValueError, match="unknown weight_init 'xavier'"):
    _init_params('xavier')


def _model_cfg(norm='batchnorm'):
  return ml_collections.ConfigDict(dict(
    depth=10, width=0.125, cifar_stem=True, zero_init_last_bn=True, bn_decay=0.9, bn_eps=1e-5,
    projector_hidden=32, predictor_hidden=32, projection_dim=16, projector_norm=norm,
    predictor_norm=norm))


@pytest.mark.parametrize('norm', networks.NORM_KINDS)
def test_network_outputs_and_norm_choice(norm):
  """Each head norm (batchnorm | layernorm | none) builds, with the right output shapes."""
  net = networks.build_network(_model_cfg(norm), num_classes=7)
  x = jnp.ones((4, 16, 16, 3))
  params, state = jax.jit(lambda x: net.init(jax.random.PRNGKey(0), x, is_training=True))(x)
  out, _ = jax.jit(lambda p, s: net.apply(p, s, None, x, is_training=True))(params, state)
  assert out['projection'].shape == (4, 16) and out['prediction'].shape == (4, 16)
  assert out['logits'].shape == (4, 7) and out['embedding'].shape == (4, 64)
  has_ln = any('layer_norm' in k for k in params)
  has_bn_head = any(k.startswith('projector') and 'batch_norm' in k for k in params)
  assert has_ln == (norm == 'layernorm') and has_bn_head == (norm == 'batchnorm')


def test_bfloat16_compute_keeps_float32_params_and_outputs():
  """bf16 casts conv/linear weights at use; stored params, BN stats and outputs stay float32."""
  net = networks.build_network(_model_cfg(), num_classes=3, dtype=jnp.bfloat16)
  x = jnp.ones((2, 16, 16, 3))
  params, state = net.init(jax.random.PRNGKey(0), x, is_training=True)
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))
  out, new_state = jax.jit(lambda p, s: net.apply(p, s, None, x, is_training=True))(params, state)
  assert all(v.dtype == jnp.float32 for v in out.values())
  leaves = jax.tree_util.tree_leaves(new_state)
  floats = [s for s in leaves if jnp.issubdtype(s.dtype, jnp.floating)]
  assert floats and all(s.dtype == jnp.float32 for s in floats)


def test_encoder_alone_matches_network_embedding():
  """build_encoder with the encoder subtree gives the network's embedding (inference mode)."""
  cfg = _model_cfg()
  net = networks.build_network(cfg, num_classes=3)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 3))
  params, state = net.init(jax.random.PRNGKey(0), x, is_training=True)
  full, _ = net.apply(params, state, None, x, is_training=False)
  enc = networks.build_encoder(cfg)
  feats, _ = enc.apply(networks.encoder_subtree(params), networks.encoder_subtree(state), None, x)
  np.testing.assert_allclose(np.asarray(feats), np.asarray(full['embedding']), rtol=1e-5)


def test_resnet_from_config_reads_every_model_option_and_takes_overrides():
  """Training, evaluation, fine-tuning and export all build the encoder through
  ResNet.from_config: an option it dropped (here each is set away from the constructor's
  default) or an override it ignored would make them build different networks."""
  cfg = _model_cfg()
  cfg.update(dict(width=0.25, cifar_stem=False, zero_init_last_bn=False, bn_decay=0.5,
                  bn_eps=1e-3, weight_init='pytorch', stem_relu=False))
  enc = hk.transform_with_state(lambda: vars(networks.ResNet.from_config(cfg, bn_decay=0.0)))
  attrs = enc.apply(*enc.init(jax.random.PRNGKey(0)), None)[0]
  assert (attrs['blocks'], attrs['width'], attrs['cifar_stem'], attrs['zero_init_last_bn'],
          attrs['weight_init'], attrs['stem_relu']) == (
            networks.RESNET_LAYOUTS[10][0], 0.25, False, False, 'pytorch', False)
  assert (attrs['bn']['decay'], attrs['bn']['eps']) == (0.0, 1e-3)
  del cfg.weight_init, cfg.stem_relu  # a config saved before the options
  old = hk.transform_with_state(lambda: vars(networks.ResNet.from_config(cfg)))
  attrs = old.apply(*old.init(jax.random.PRNGKey(0)), None)[0]
  assert (attrs['weight_init'], attrs['stem_relu']) == ('release', True)


@pytest.mark.parametrize('cifar_stem', [True, False])
def test_stem_relu_false_drops_only_the_stem_relu(cifar_stem):
  """stem_relu=False (lightly's backbone) must remove the ReLU after the stem's BN and
  nothing else: with a large positive stem BN offset that ReLU is the identity, so both
  settings give the same features; at the initial offset (zero) the stem output is signed,
  so they must differ. Ignoring the option, or dropping another ReLU, fails one of the two."""
  def features(stem_relu, params, x):
    # zero_init_last_bn=False: with zero-initialised residual branches the first block's
    # relu(x + 0) would restore the stem's ReLU and hide the option.
    fwd = hk.transform_with_state(lambda x: networks.ResNet(
      10, 0.25, cifar_stem, zero_init_last_bn=False, stem_relu=stem_relu)(x, is_training=True))
    if params is None:
      return fwd.init(jax.random.PRNGKey(0), x)
    return np.asarray(fwd.apply(*params, None, x)[0])

  x = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
  params, state = features(True, None, x)
  with_relu, without = features(True, (params, state), x), features(False, (params, state), x)
  assert np.abs(with_relu - without).max() > 1e-3
  shifted = {k: dict(v, offset=v['offset'] + 100.0) if k.endswith('stem_bn') else v
             for k, v in params.items()}
  np.testing.assert_allclose(features(False, (shifted, state), x),
                             features(True, (shifted, state), x), rtol=1e-5, atol=1e-5)


def _bn_loss_and_grads(use_haiku, dtype, axis_name=None):
  """Loss, new state and gradients (params, input) of one BatchNorm, ours or Haiku's own."""

  def forward(x):
    if use_haiku:
      bn = hk.BatchNorm(True, True, 0.9, eps=1e-5, name='batch_norm',
                        cross_replica_axis=axis_name)
      return bn(x.astype(jnp.float32), is_training=True).astype(x.dtype)
    return networks._batch_norm(x, True, axis_name, 0.9, 1e-5)

  net = hk.transform_with_state(forward)
  rng = np.random.RandomState(0)
  x = jnp.asarray(rng.normal(2.0, 3.0, (16, 5, 5, 7)), dtype)
  weights = jnp.asarray(rng.normal(0.0, 1.0, (16, 5, 5, 7)), jnp.float32)
  params, state = net.init(jax.random.PRNGKey(0), x)
  params = {'batch_norm': {'scale': params['batch_norm']['scale'] + 0.3,
                           'offset': params['batch_norm']['offset'] - 0.2}}

  def loss(p, x):
    y, new_state = net.apply(p, state, None, x)
    return jnp.sum(y.astype(jnp.float32) * weights), new_state

  (value, new_state), grads = jax.value_and_grad(loss, (0, 1), has_aux=True)(params, x)
  return value, new_state, grads, params


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_batch_norm_matches_haiku_batch_norm_and_its_gradient(dtype):
  """Our training-mode BN (closed-form backward from the input in its own dtype) must give
  Haiku's BatchNorm-on-float32 output, moving averages, parameter names and gradients (the
  library's autodiff is the reference). Breaks on a wrong backward formula (e.g. a missing
  E[dy * xhat] term), swapped scale/offset gradients or renamed parameters or state, which
  would also break every existing checkpoint."""
  want = _bn_loss_and_grads(True, dtype)
  got = _bn_loss_and_grads(False, dtype)
  assert jax.tree_util.tree_structure(got[1]) == jax.tree_util.tree_structure(want[1])
  assert jax.tree_util.tree_structure(got[2]) == jax.tree_util.tree_structure(want[2])
  assert float(got[0]) == pytest.approx(float(want[0]), rel=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves(got[1:3]), jax.tree_util.tree_leaves(want[1:3]),
                  strict=True):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    tol = 1e-4 * max(1.0, float(np.max(np.abs(b))))
    if dtype == jnp.bfloat16 and a.shape == (16, 5, 5, 7):  # the input gradient is bf16
      tol = 2 ** -7 * float(np.max(np.abs(b)))
    np.testing.assert_allclose(a, b, atol=tol)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_grouped_batch_norm_equals_one_haiku_call_per_group(dtype):
  """BN with groups=2 on two stacked views must give what Haiku's BatchNorm gives called
  once per view: outputs, moving averages (updated in view order, counters included) and
  gradients. Breaks if statistics are pooled over the views (byol-pytorch's choice, not
  the release's), the groups are split along the wrong axis, the moving averages see only
  one group or the parameter gradients are not summed over groups."""
  rng = np.random.RandomState(1)
  x = jnp.asarray(rng.normal(0.0, 1.0, (2, 8, 4, 4, 5)) * [[[[[1.0]]]], [[[[3.0]]]]] + 1.5,
                  dtype)  # the two views differ in scale, so pooled stats would differ
  weights = jnp.asarray(rng.normal(0.0, 1.0, (16, 4, 4, 5)), jnp.float32)

  def run(grouped):
    def forward(x):
      if grouped:
        return networks._batch_norm(x, True, None, 0.9, 1e-5, groups=2)
      bn = hk.BatchNorm(True, True, 0.9, eps=1e-5, name='batch_norm')
      ys = [bn(v.astype(jnp.float32), is_training=True).astype(x.dtype) for v in (x[:8], x[8:])]
      return jnp.concatenate(ys)

    net = hk.transform_with_state(forward)
    flat = x.reshape(16, 4, 4, 5)
    params, state = net.init(jax.random.PRNGKey(0), flat)
    params = jax.tree_util.tree_map(lambda p: p + 0.3, params)

    def loss(p, x):
      y, new_state = net.apply(p, state, None, x)
      return jnp.sum(y.astype(jnp.float32) * weights), (y, new_state)

    (_, (y, new_state)), grads = jax.value_and_grad(loss, (0, 1), has_aux=True)(params, flat)
    return y, new_state, grads

  got, want = run(True), run(False)
  assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
  for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    rel = 2 ** -7 if (dtype == jnp.bfloat16 and a.shape[:1] == (16,)) else 1e-4
    np.testing.assert_allclose(a, b, atol=rel * max(1.0, float(np.abs(b).max())))


def test_network_on_stacked_views_equals_one_call_per_view():
  """apply(..., views=2) on [view1; view2] must equal two training-mode calls (outputs and
  every BN moving average). Breaks if a BatchNorm (encoder, projector or predictor) misses
  the grouping or the state update order differs from consecutive calls."""
  cfg = _model_cfg()
  net = networks.build_network(cfg, num_classes=3)
  rng = jax.random.split(jax.random.PRNGKey(2), 2)
  v1 = jax.random.normal(rng[0], (4, 16, 16, 3))
  v2 = 2.0 * jax.random.normal(rng[1], (4, 16, 16, 3)) + 0.5
  params, state = net.init(jax.random.PRNGKey(0), v1, is_training=True)
  out1, s = net.apply(params, state, None, v1, is_training=True)
  out2, want_state = net.apply(params, s, None, v2, is_training=True)
  both, got_state = net.apply(params, state, None, jnp.concatenate([v1, v2]),
                              is_training=True, views=2)
  for k in out1:
    np.testing.assert_allclose(np.asarray(both[k]),
                               np.concatenate([np.asarray(out1[k]), np.asarray(out2[k])]),
                               rtol=1e-4, atol=1e-4, err_msg=k)
  for a, b in zip(jax.tree_util.tree_leaves(got_state), jax.tree_util.tree_leaves(want_state),
                  strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match='does not split into 2 equal groups'):
    net.apply(params, state, None, v1[:3], is_training=True, views=2)


def test_batch_norm_gradient_with_a_named_axis_matches_haiku():
  """The cross-replica path (pmean of the statistics and of the backward's means) on a
  one-device mesh: the same numbers as Haiku's cross-replica BatchNorm. The 8-device step
  equivalence test (train_step_test) checks that the statistics span all devices."""
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ('batch',))
  specs = jax.sharding.PartitionSpec()

  def run(use_haiku):
    fn = jax.shard_map(lambda: _bn_loss_and_grads(use_haiku, jnp.float32, 'batch')[2],
                       mesh=mesh, in_specs=(), out_specs=specs, check_vma=False)
    return jax.jit(fn)()

  for a, b in zip(jax.tree_util.tree_leaves(run(False)), jax.tree_util.tree_leaves(run(True)),
                  strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


def test_bfloat16_network_saves_no_float32_activations_for_backward():
  """The point of the custom BatchNorm backward: a bf16 network keeps no float32 copy of
  its activations between the forward and backward passes (hk.BatchNorm on the float32
  cast saved one per BN layer: twice the bf16 activation's bytes, written and read back).
  Breaks if the normalisation is differentiated by autodiff again."""
  import contextlib
  import io

  from jax.ad_checkpoint import print_saved_residuals
  net = networks.build_network(_model_cfg(), 10, dtype=jnp.bfloat16)
  x = jnp.zeros((4, 16, 16, 3), jnp.float32)
  params, state = net.init(jax.random.PRNGKey(0), x, is_training=True)

  def loss(p):
    return jnp.sum(net.apply(p, state, None, x, is_training=True)[0]['prediction'])

  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):  # lines like 'bf16[4,16,16,8] output of ...'
    print_saved_residuals(loss, params)
  types = [line.split(' ')[0] for line in printed.getvalue().splitlines()]
  activations = [t for t in types if t.count(',') == 3 and '[4,' in t]
  assert any(t.startswith('bf16[') for t in activations), types
  assert not [t for t in activations if t.startswith('f32[')], activations


def _haiku_max_pool(x):
  return hk.max_pool(x, window_shape=(1, 3, 3, 1), strides=(1, 2, 2, 1), padding='SAME')


@pytest.mark.parametrize('shape', [(2, 8, 8, 3), (2, 9, 7, 2), (1, 2, 3, 1), (1, 1, 1, 1)])
@pytest.mark.parametrize('values', ['normal', 'relu', 'ties'])
def test_stem_max_pool_matches_haiku_value_and_gradient(shape, values):
  """Reference: hk.max_pool and autodiff's select-and-scatter. Exact equality, ties
  included: after a ReLU, all-zero windows are common, and their gradient must go to the
  first element of the window, as XLA's rule sends it; odd sizes move SAME's padding to
  both sides. Integer cotangents keep the sums exact in any order."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=shape)
  x = {'normal': x, 'relu': np.maximum(x, 0), 'ties': rng.integers(0, 3, shape)}[values]
  x = jnp.asarray(x, jnp.float32)
  y, pullback = jax.vjp(networks.stem_max_pool, x)
  y_ref, pullback_ref = jax.vjp(_haiku_max_pool, x)
  dy = jnp.asarray(rng.integers(-4, 5, y_ref.shape), jnp.float32)
  np.testing.assert_array_equal(y, y_ref)
  np.testing.assert_array_equal(pullback(dy)[0], pullback_ref(dy)[0])


def test_stem_max_pool_gradient_compiles_without_a_scatter():
  """The custom gradient (used on CPUs, where it measured faster than autodiff's
  select-and-scatter) must stay element-wise, with the same values (bf16, as in training)."""
  x = jnp.asarray(np.maximum(np.random.default_rng(1).normal(size=(2, 16, 16, 8)), 0),
                  jnp.bfloat16)
  grad = jax.jit(jax.grad(lambda v: jnp.sum(networks.stem_max_pool(v).astype(jnp.float32)**2)))
  hlo = grad.lower(x).compile().as_text()
  assert not re.search(r'= \S+ (select-and-)?scatter\(', hlo)
  reference = jax.grad(lambda v: jnp.sum(_haiku_max_pool(v).astype(jnp.float32)**2))
  np.testing.assert_array_equal(grad(x), reference(x))


@pytest.mark.parametrize('backend, scatter', [('cpu', False), ('gpu', True), ('tpu', True)])
def test_stem_pool_gradient_is_chosen_by_backend(monkeypatch, backend, scatter):
  """The custom gradient was faster on a 2-core CPU and slower on an H200 than autodiff's
  select-and-scatter (docs/performance.md): each backend must get the one measured faster,
  with the same value either way. Fails if the dispatch is lost or inverted."""
  monkeypatch.setattr(networks.jax, 'default_backend', lambda: backend)
  cfg = _model_cfg()
  cfg.cifar_stem = False
  net = networks.build_network(cfg, num_classes=3)
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 16, 16, 3)), jnp.float32)
  params, state = net.init(jax.random.PRNGKey(0), x, is_training=True)

  def loss(p):
    out, _ = net.apply(p, state, None, x, is_training=True)
    return jnp.sum(out['embedding'] ** 2)

  grad = jax.jit(jax.grad(loss))
  assert ('select_and_scatter' in grad.lower(params).as_text()) == scatter
  chosen = grad(params)
  monkeypatch.undo()
  reference = jax.jit(jax.grad(loss))(params)  # Traced again on the real backend (CPU).
  chex.assert_trees_all_close(chosen, reference, rtol=1e-5, atol=1e-6)
