"""Importing the original release's checkpoints, checked against Haiku's own ResNet.

The stand-in checkpoint (tests/scripts/release_standin.py) is built from Haiku's modules as
the release builds its network, and pickled as the release's dill pickle is laid out, in a
process of its own that has fake `byol` and `dill` modules; this process has neither. The
real files (570 MB and 4.6 GB) cannot be downloaded here.
"""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import REPO

from byol_jax import checkpointing, import_release, networks, train_step

STANDIN = os.path.join(REPO, 'tests', 'scripts', 'release_standin.py')
sys.path.insert(0, os.path.dirname(STANDIN))
import release_standin  # noqa: E402


@pytest.fixture(scope='module')
def release(tmp_path_factory):
  """(stand-in release.pkl of a ResNet-50, its reference features, imported workdir)."""
  out = tmp_path_factory.mktemp('release')
  subprocess.run([sys.executable, STANDIN, '50', str(out)], check=True, timeout=300,
                 capture_output=True)
  workdir = str(out / 'run')
  preset, step, model = import_release.import_release(str(out / 'release.pkl'), workdir)
  assert (preset, model['depth'], model['width']) == ('r50', 50, 1.0)
  return str(out / 'release.pkl'), np.load(out / 'reference.npz'), workdir


def test_imported_encoder_computes_what_haikus_release_network_computes(release):
  """The imported online encoder and probe must give Haiku's features and logits on the same
  images, its BatchNorm in inference mode with randomised statistics. Breaks on any
  misplaced layer, a BN's scale and offset or mean and variance swapped, a wrong block
  order or a stride on the wrong conv."""
  _, ref, workdir = release
  state, cfg, _ = checkpointing.load_state(workdir)
  encoder = networks.build_encoder(cfg.model)
  features, _ = encoder.apply(networks.encoder_subtree(state.online_params),
                              networks.encoder_subtree(state.online_state), None, ref['images'])
  np.testing.assert_allclose(features, ref['embedding'], rtol=1e-5, atol=1e-5)
  probe = state.online_params['probe']
  np.testing.assert_allclose(features @ probe['w'] + probe['b'], ref['logits'], rtol=1e-4,
                             atol=1e-4)


def test_imported_run_holds_both_networks_and_is_finished(release):
  """Target and heads must come across (heads without a last bias, as the release's), and the
  step must be the preset's last, so a trainer would not continue it with a fresh
  optimiser as if resuming. Breaks if the target were the online network or fresh."""
  pkl, _, workdir = release
  raw = import_release.read_release_pickle(pkl)
  state, cfg, step = checkpointing.load_state(workdir)
  meta = checkpointing.read_metadata(workdir, step)
  assert step == meta['num_steps'] and meta['release_step'] == 1234
  np.testing.assert_array_equal(state.target_params['projector/linear_0']['w'],
                                raw['target_params']['projector/linear']['w'])
  assert not np.array_equal(state.target_params['encoder/stem_conv']['w'],
                            state.online_params['encoder/stem_conv']['w'])
  np.testing.assert_array_equal(state.target_params['encoder/stem_conv']['w'],
                                raw['target_params']['res_net50/~/initial_conv']['w'])
  assert set(state.online_params['predictor/linear_1']) == {'w'}
  assert cfg.model.head_output_bias is False
  fns = train_step.make_step_fns(cfg, import_release.NUM_CLASSES, num_steps=step,
                                 steps_per_epoch=1)
  fresh_opt = fns.optimizer.init(state.online_params)  # what a new run's optimiser starts at
  for a, b in zip(jax.tree_util.tree_leaves(state.opt_state),
                  jax.tree_util.tree_leaves(fresh_opt), strict=True):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_command_line_errors_are_one_line_and_success_says_what_came_in(release, tmp_path):
  """Not a release pickle, a missing file, and a workdir that already holds a run: each one
  line and exit 2, with nothing written; then a good import names network and steps."""
  pkl, _, workdir = release
  not_release = tmp_path / 'other.pkl'
  not_release.write_bytes(b'\x80\x02}q\x00.')  # a pickled empty dict
  for args, says in (([f'--pkl={not_release}'], 'holds no experiment_state'),
                     ([f'--pkl={tmp_path}/missing.pkl'], 'cannot read'),
                     ([f'--pkl={pkl}', f'--workdir={workdir}'], 'already holds checkpoints')):
    argv = [sys.executable, '-m', 'byol_jax.import_release', f'--workdir={tmp_path}/new', *args]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith('error: ') and says in proc.stderr
  assert not os.path.exists(tmp_path / 'new')
  proc = subprocess.run([sys.executable, '-m', 'byol_jax.import_release', f'--pkl={pkl}',
                         f'--workdir={tmp_path}/new'], cwd=REPO, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0 and "ResNet-50 x1 (r50 preset), saved at the release's step " \
    '1234 as checkpoint step' in proc.stdout, proc.stderr[-2000:]


def test_release_names_map_to_ours():
  """Both of Haiku's spellings (`a/~/b` for a sub-module made in __init__, `a/b` in a
  method) map alike; unknown modules are not guessed at."""
  ours = import_release.our_module
  assert ours('res_net50/~/block_group_2/~/block_5/~/batchnorm_2/~/var_ema',
              'res_net50') == 'encoder/~_bn/stage_2_block_5_bn_2/~/var_ema'
  assert ours('res_net50/block_group_0/block_0/shortcut_conv',
              'res_net50') == 'encoder/~_block/stage_0_block_0_shortcut_conv'
  assert ours('projector/~/linear', 'res_net50') == 'projector/linear_0'
  assert ours('predictor/batch_norm/~/mean_ema', 'x') == 'predictor/batch_norm/~/mean_ema'
  assert ours('classifier', 'x') == 'probe'
  assert ours('res_net50/~/logits', 'res_net50') is None


@pytest.mark.parametrize('depth, width, preset', [(50, 2, 'r50x2'), (200, 2, 'r200x2')])
def test_wider_and_deeper_release_networks_fit_ours(depth, width, preset):
  """The release's other published network (ResNet-200 x2) and a width multiplier must map
  onto this code's preset of that shape, every parameter and statistic, shapes only (no
  arrays: their pickles would be hundreds of MB). Breaks if width scaled other channels
  than the release's, or a deep layout were read as another depth."""
  images = np.zeros((1, 32, 32, 3), np.float32)
  params, state = jax.eval_shape(lambda: release_standin.build(depth, width).init(
    jax.random.PRNGKey(0), images, is_training=True))
  model = import_release.model_of(params)
  assert (model['depth'], model['width']) == (depth, width)
  cfg = import_release.config_for(model)
  assert cfg.preset == preset
  fresh = checkpointing.state_template(cfg, import_release.NUM_CLASSES)
  prefix = f'res_net{depth}'
  renamed = {name: import_release._rename(tree, prefix) for name, tree in
             (('online_params', params), ('online_state', state))}
  source = fresh._replace(online_params=renamed['online_params'],
                          online_state=renamed['online_state'])
  train_step.warm_start_state(fresh, source)  # raises, naming them, if any shape differs


def test_dill_reconstructors_rebuild_what_numpy_reduced():
  """dill names its own reconstructors in its pickles; without dill, the stand-ins must
  rebuild the same array and dtype class from what numpy's reduce gives (dill's
  signatures). Breaks if an argument order differs."""
  array = np.arange(6, dtype=np.float32).reshape(2, 3)
  rebuilt = import_release._create_array(*array.__reduce__())
  np.testing.assert_array_equal(rebuilt, array)
  assert rebuilt.dtype == array.dtype
  assert import_release._create_dtypemeta(np.float32) is type(np.dtype(np.float32))
  point = import_release._create_namedtuple('Point', ('x', 'y'), 'byol.somewhere', None)
  assert point(1, 2).y == 2


def test_old_haiku_containers_read_even_without_haikus_own_class(release, monkeypatch):
  """The release's trees are pickled as old Haiku's FlatMapping(dict). Should Haiku drop the
  class, the reader must still get the same dicts. Breaks if it then failed to load."""
  from haiku._src import data_structures
  pkl, _, _ = release
  with_haiku = import_release.read_release_pickle(pkl)
  monkeypatch.delattr(data_structures, 'FlatMapping')
  without = import_release.read_release_pickle(pkl)
  assert without.keys() == with_haiku.keys() and without['step'] == with_haiku['step']
  for name in ('online_params', 'target_state'):
    assert without[name].keys() == with_haiku[name].keys()
    for module, values in with_haiku[name].items():
      for key, value in values.items():
        np.testing.assert_array_equal(without[name][module][key], value)


def test_a_file_that_is_no_pickle_is_a_format_error(tmp_path):
  """A file that is no pickle ended in a traceback when its first bytes read as a pickle
  opcode that fails with another error: a text file starting with 'g' (ValueError)."""
  path = tmp_path / 'notes.txt'
  path.write_bytes(b'garbage\n')
  with pytest.raises(import_release.ReleaseFormatError, match='not a readable release'):
    import_release.read_release_pickle(str(path))


@pytest.mark.parametrize('experiment_state', [
  {'online_params': {}},  # a dict: neither the release's NamedTuple nor its stand-in
  import_release._ReleaseTuple({'a': {}}, {'b': {}}),  # too few fields
  import_release._ReleaseTuple(1, 2, 3, 4, 5),  # fields that are not trees
])
def test_an_experiment_state_of_another_layout_is_a_format_error(experiment_state, tmp_path):
  """A pickle with an `experiment_state` of another layout (another experiment's, or a
  hand-made one) ended in a traceback (`zip() argument 2 is shorter than argument 1`)."""
  import pickle
  path = tmp_path / 'other.pkl'
  path.write_bytes(pickle.dumps({'experiment_state': experiment_state}))
  with pytest.raises(import_release.ReleaseFormatError, match='not the release'):
    import_release.read_release_pickle(str(path))
