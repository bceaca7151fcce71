"""Encoder export: npz round trip, torchvision names and an exact PyTorch port."""

import functools
import json
import os
import subprocess
import sys

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, tiny_config

from byol_jax import checkpointing, export, networks, train_step

# (name, depth, width, cifar_stem, input height, input width, stem_relu). Even sizes make
# Haiku's SAME padding asymmetric at every stride-2 layer; odd sizes keep it symmetric.
CASES = [
  ('basic', 10, 0.125, False, 48, 33, True),
  ('bottleneck', 50, 0.0625, False, 48, 33, True),
  ('basic_cifar', 10, 0.125, True, 20, 20, True),
  ('basic_cifar_no_stem_relu', 10, 0.125, True, 20, 20, False),
]


def _model_cfg(depth, width, cifar_stem, stem_relu=True):
  return tiny_config(**{'model.depth': depth, 'model.width': width,
                        'model.cifar_stem': cifar_stem, 'model.stem_relu': stem_relu}).model


@functools.cache
def _random_encoder(depth, width, cifar_stem, seed=0, stem_relu=True):
  """Initialised conv weights, randomised BN scales, offsets and moving averages.

  Random BN values exercise what trained weights have and init lacks: non-unit statistics,
  signed stem outputs, and non-zero last-BN scales (zero-init would hide the residual
  branches).
  """
  model_cfg = _model_cfg(depth, width, cifar_stem, stem_relu)

  def forward(x):
    return networks.ResNet.from_config(model_cfg)(x, is_training=True)

  init = jax.jit(hk.transform_with_state(forward).init)
  params, state = init(jax.random.PRNGKey(seed), jnp.zeros((1, 16, 16, 3)))
  rng = np.random.default_rng(seed)
  params, state = networks.numpy_tree(params), networks.numpy_tree(state)
  for leaves in params.values():
    if 'scale' in leaves:
      leaves['scale'] = rng.uniform(0.5, 1.5, leaves['scale'].shape).astype(np.float32)
      leaves['offset'] = rng.normal(0, 0.2, leaves['offset'].shape).astype(np.float32)
  for module, leaves in state.items():
    shape = leaves['average'].shape
    mean = module.endswith('mean_ema')
    average = rng.normal(0, 0.2, shape) if mean else rng.uniform(0.5, 2.0, shape)
    leaves['average'] = average.astype(np.float32)
    leaves['hidden'] = (average * 0.5).astype(np.float32)
    leaves['counter'] = np.asarray(7, np.int32)
  return model_cfg, params, state


def _jax_features(model_cfg, params, state, images):
  apply = jax.jit(networks.build_encoder(model_cfg).apply)
  feats, _ = apply(params, state, None, jnp.asarray(images))
  return np.asarray(feats)


def _rel_error(a, b):
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def test_npz_round_trips_exactly(tmp_path):
  """A lossy or mislabelled npz (params/state mix-up, dtype change) would break this."""
  _, params, state = _random_encoder(10, 0.125, False)
  path = export.save_npz(str(tmp_path / 'enc.npz'), params, state, {'format': 'npz'})
  loaded_params, loaded_state, meta = export.load_npz(path)
  assert meta['weights'] == 'enc.npz'
  for original, loaded in ((params, loaded_params), (state, loaded_state)):
    assert jax.tree_util.tree_structure(original) == jax.tree_util.tree_structure(loaded)
    for a, b in zip(jax.tree_util.tree_leaves(original), jax.tree_util.tree_leaves(loaded),
                    strict=True):
      assert a.dtype == b.dtype and np.array_equal(a, b)
  with np.load(path) as data:
    assert 'encoder/stem_conv/w' in data.files
    assert 'encoder/~_bn/stem_bn/~/mean_ema/average' in data.files


def test_torchvision_names():
  """A wrong Haiku -> torchvision mapping (stage/block/index offsets, shortcut) breaks this."""
  names = {export.torch_module_name(m) for m in _random_encoder(10, 0.125, False)[1]}
  assert {'conv1', 'bn1', 'layer1.0.conv1', 'layer1.0.bn2', 'layer2.0.downsample.0',
          'layer2.0.downsample.1', 'layer4.0.conv2'} <= names
  assert 'layer1.0.downsample.0' not in names  # stem width == stage-1 width: no projection
  assert export.same_padding(224, 7, 2) == (2, 3)
  assert export.same_padding(33, 3, 2) == (1, 1)
  assert export.same_padding(32, 1, 2) == (0, 0)


@pytest.mark.parametrize('case', CASES, ids=[c[0] for c in CASES])
def test_torch_port_matches_jax(case):
  """The torch module drifting from the Haiku ResNet (padding, layout, BN) breaks this."""
  torch = pytest.importorskip('torch')
  _, depth, width, cifar_stem, height, width_px, stem_relu = case
  model_cfg, params, state = _random_encoder(depth, width, cifar_stem, stem_relu=stem_relu)
  images = np.random.default_rng(1).normal(size=(4, height, width_px, 3)).astype(np.float32)
  expected = _jax_features(model_cfg, params, state, images)

  state_dict = export.torch_state_dict(params, state)
  errors = {}
  for exact in (True, False):
    module = export.torch_resnet(model_cfg, exact_padding=exact).eval()
    module.load_state_dict(state_dict, strict=True)  # same keys as torchvision, no extras
    with torch.no_grad():
      got = module(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
    assert got.shape == expected.shape == (4, module.feature_dim)
    errors[exact] = _rel_error(got, expected)
  print(f'{case[0]}: exact rel. error {errors[True]:.2e}, torchvision padding {errors[False]:.2e}')
  assert errors[True] < 1e-4
  assert errors[False] > 1e-2  # the test can tell symmetric from SAME padding
  assert int(state_dict['bn1.num_batches_tracked']) == 7
  assert module.feature_dim == networks.resnet_output_dim(networks.RESNET_LAYOUTS[depth][1], width)


@pytest.mark.parametrize('depth', sorted(networks.RESNET_LAYOUTS))
def test_torch_layout_every_depth(depth):
  """A depth whose torch blocks, strides or projections differ from Haiku's breaks this."""
  pytest.importorskip('torch')
  model_cfg = _model_cfg(depth, 0.25, False)

  def forward(x):
    return networks.ResNet(depth, 0.25)(x, is_training=True)

  shapes = jax.eval_shape(hk.transform_with_state(forward).init, jax.random.PRNGKey(0),
                          jnp.zeros((1, 32, 32, 3)))
  params, state = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  exported = export.torchvision_arrays(params, state)
  module = export.torch_resnet(model_cfg)
  expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
  assert {k: v.shape for k, v in exported.items()} == expected


@pytest.mark.parametrize('depth, count', [(18, 11_176_512), (50, 23_508_032)])
def test_torch_matches_torchvision_param_count(depth, count):
  """Not torchvision's ResNet at width 1 (its published size minus the fc) breaks this."""
  pytest.importorskip('torch')
  module = export.torch_resnet(_model_cfg(depth, 1, False))
  assert sum(p.numel() for p in module.parameters()) == count


def test_torch_export_file_loads(tmp_path):
  """A saved .pt or sidecar that `load_torch_export` cannot rebuild would break this."""
  torch = pytest.importorskip('torch')
  cfg = tiny_config()
  _, params, state = _random_encoder(cfg.model.depth, cfg.model.width, cfg.model.cifar_stem)
  meta = export.sidecar(cfg, 'torch', 'online', 3)
  path = export.save_torch(str(tmp_path / 'enc.pt'), params, state, meta)
  module = export.load_torch_export(path)
  side = json.loads(open(export.sidecar_path(path)).read())
  assert side['feature_dim'] == module.feature_dim and side['image_size'] == cfg.image_size
  images = np.random.default_rng(2).normal(size=(2, 16, 16, 3)).astype(np.float32)
  with torch.no_grad():
    got = module(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
  assert _rel_error(got, _jax_features(cfg.model, params, state, images)) < 1e-4


@pytest.fixture(scope='module')
def checkpointed(tmp_path_factory):
  """A workdir with one finalised checkpoint (step 3) of a fresh tiny state; no training."""
  cfg = tiny_config()
  workdir = str(tmp_path_factory.mktemp('run'))
  fns = train_step.make_step_fns(cfg, num_classes=4, num_steps=4, steps_per_epoch=4)
  state = jax.jit(lambda rng: train_step.init_state(fns, rng, (16, 16, 3)))(
    jax.random.PRNGKey(0))
  ckpt = checkpointing.Checkpointer(workdir, keep=1, keep_every_steps=0)
  ckpt.save(state._replace(step=state.step + 3),
            dict(config=checkpointing.config_to_dict(cfg), num_classes=4, num_examples=64,
                 num_steps=4))
  ckpt.close()
  return workdir, cfg, jax.device_get(state)


def _cli(*args):
  return subprocess.run([sys.executable, '-m', 'byol_jax.export', *args], cwd=REPO,
                        capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS='cpu'))


def test_cli_npz_is_the_checkpoint_encoder(checkpointed):
  """Exporting the wrong network, step or subtree from a workdir would break this."""
  workdir, cfg, state = checkpointed
  result = _cli(f'--workdir={workdir}', '--network=target')
  assert result.returncode == 0, result.stderr
  path = os.path.join(workdir, 'export', 'encoder_target_step3.npz')
  assert path in result.stdout and not result.stderr.strip()
  params, bn_state, meta = export.load_npz(path)
  assert (meta['network'], meta['step'], meta['feature_dim']) == ('target', 3, 64)
  assert meta['image_size'] == cfg.image_size
  assert meta['model']['cifar_stem'] == cfg.model.cifar_stem
  expected = networks.encoder_subtree(state.target_params)
  assert params.keys() == expected.keys()
  for module, leaves in expected.items():
    for name, value in leaves.items():
      np.testing.assert_array_equal(params[module][name], value)
  assert bn_state.keys() == networks.encoder_subtree(state.target_state).keys()


def test_cli_torch_export_loads(checkpointed, tmp_path):
  """A torch export from the CLI that `load_torch_export` cannot run would break this."""
  torch = pytest.importorskip('torch')
  workdir, cfg, state = checkpointed
  output = str(tmp_path / 'out' / 'model.pt')
  result = _cli(f'--workdir={workdir}', '--format=torch', '--step=3', f'--output={output}')
  assert result.returncode == 0, result.stderr
  module = export.load_torch_export(output)
  images = np.random.default_rng(3).normal(size=(2, 16, 16, 3)).astype(np.float32)
  with torch.no_grad():
    got = module(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
  params, bn_state = export.encoder_of(state, 'online')
  assert _rel_error(got, _jax_features(cfg.model, params, bn_state, images)) < 1e-4


@pytest.mark.parametrize('args, message', [
  (['--step=7'], 'no finalised checkpoint for step 7'),
  (['--format=onnx'], 'format'),
])
def test_cli_bad_requests_are_one_line(checkpointed, args, message):
  """A traceback or a silent fallback for a missing step or bad format would break this."""
  result = _cli(f'--workdir={checkpointed[0]}', *args)
  assert result.returncode != 0 and message in result.stderr
  assert 'Traceback' not in result.stderr


def test_cli_unwritable_output_is_one_line(checkpointed, tmp_path):
  """An output under a regular file: one line naming the path, not a traceback or a
  message with its quotes chipped off."""
  (tmp_path / 'a_file').write_text('')
  output = tmp_path / 'a_file' / 'weights.npz'
  result = _cli(f'--workdir={checkpointed[0]}', f'--output={output}')
  assert result.returncode == 2 and 'Traceback' not in result.stderr
  assert f'error: cannot write {output}: ' in result.stderr, result.stderr


def test_cli_missing_workdir_is_one_line(tmp_path):
  """A traceback or exit code other than 2 for a missing workdir breaks this."""
  result = _cli(f'--workdir={tmp_path / "nope"}')
  assert result.returncode == 2
  assert result.stderr.strip().count('\n') == 0 and 'does not exist' in result.stderr


def test_an_output_folder_gets_the_default_file_name(checkpointed, tmp_path):
  """`--output=new_dir/` made the folder, then failed with 'Is a directory'; an existing
  folder did the same. Breaks if a folder is taken for the weights file's own path."""
  for folder in (str(tmp_path / 'new') + os.sep, str(tmp_path)):
    path = export.export(checkpointed[0], 'npz', output=folder)
    assert os.path.dirname(path) == os.path.normpath(folder)
    assert os.path.basename(path).startswith('encoder_online_step') and os.path.isfile(path)
