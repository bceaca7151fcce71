"""Tests of the Haiku networks: parameter counts against torchvision's, shapes, options."""

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
