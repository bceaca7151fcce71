"""Tests of the linear_eval worker: checkpoint in, provenance-rich record out, LR chosen on
validation only, and the augmented protocol sharing the evaluator's SGD."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import REPO, tiny_config

from byol_jax import linear_eval, metric_writers, networks, train
from byol_jax.evaluators import linear as linear_lib
from configs import linear_eval as eval_configs

RECORD_FIELDS = ('step', 'checkpoint_step', 'weights', 'dataset', 'pretrain_dataset', 'splits',
                 'protocol', 'network', 'best_lr', 'best_index', 'val_top1', 'test_top1',
                 'test_top5', 'per_lr', 'learning_rates', 'epochs', 'num_classes')


@pytest.fixture(scope='module')
def workdir(pretrained_workdir):
  """The shared tiny pretraining workdir (tests/conftest.py)."""
  return pretrained_workdir


def eval_config(**overrides):
  """The demo preset, shrunk: 1000 train / 500 valid / 1000 test examples, few epochs."""
  cfg = eval_configs.get_config('demo')
  cfg.max_examples = 1000
  cfg.epochs = 5
  cfg.learning_rates = (0.01, 0.1, 1.0)
  cfg.update(overrides)
  return cfg


def records(workdir, name='linear_eval'):
  return metric_writers.read_jsonl(os.path.join(workdir, 'metrics', f'{name}.jsonl'))


def test_run_writes_record_with_provenance(workdir):
  """Breaks if the worker stops reading the checkpoint or drops a provenance field."""
  before = len(records(workdir))
  assert linear_eval.run(eval_config(), workdir) == 0
  rec = records(workdir)[before]
  assert set(RECORD_FIELDS) <= set(rec)
  assert rec['step'] == rec['checkpoint_step'] == 4 and rec['weights'] == 'checkpoint'
  assert rec['protocol'] == 'linear_cached' and rec['network'] == 'online'
  assert rec['dataset'] == rec['pretrain_dataset'] == 'demo' and rec['num_classes'] == 10
  assert {k: (v['split'], v['size']) for k, v in rec['splits'].items()} == {
    'train': ('train', 1000), 'val': ('valid', 500), 'test': ('test', 1000)}
  assert all(v['definition'].startswith('demo[') for v in rec['splits'].values())
  assert [r['lr'] for r in rec['per_lr']] == [0.01, 0.1, 1.0]
  assert 0.0 <= rec['test_top1'] <= rec['test_top5'] <= 1.0


def test_best_lr_is_validation_argmax_and_test_comes_from_that_head(workdir, monkeypatch):
  """Breaks if the worker picks the LR on test or reports another head's test accuracy."""
  real = linear_lib.evaluate_heads
  val_top1, test_top1 = np.array([0.2, 0.6, 0.4]), np.array([0.9, 0.1, 0.8])

  def fake(params, x, y, chunk_size=4096):
    out = real(params, x, y, chunk_size)
    table = val_top1 if len(y) == 500 else test_top1  # val has 500 rows, test 1000
    return dict(out, top1=table)

  monkeypatch.setattr(linear_lib, 'evaluate_heads', fake)
  for mode in ('cached', 'augmented'):
    rec = linear_eval.evaluate(eval_config(mode=mode, epochs=1), _pretrained(workdir), workdir)
    assert rec['best_index'] == int(np.argmax([r['val_top1'] for r in rec['per_lr']])) == 1
    assert rec['best_lr'] == 0.1 and rec['val_top1'] == 0.6
    assert rec['test_top1'] == rec['per_lr'][1]['test_top1'] == 0.1


def _pretrained(workdir):
  cfg = eval_config()
  return linear_eval.load_pretrained(cfg, workdir)


def test_view_trainer_with_identity_features_equals_cached_sweep():
  """Breaks if the augmented protocol's SGD (update, order, schedule) drifts from linear.py's."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(203, 12)).astype(np.float32)
  y = rng.integers(0, 5, 203).astype(np.int32)
  lrs = (0.05, 0.5)
  want = linear_lib.train_linear_heads(x, y, 5, lrs, epochs=3, batch_size=32, seed=7)
  got = linear_eval.train_heads_on_views(jax.numpy.asarray(x), jax.numpy.asarray(y),
                                         lambda w, batch, key: batch, (), 5, lrs, epochs=3,
                                         batch_size=32, seed=7)
  for k in ('w', 'b'):
    np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6)


def test_augmented_target_network_with_held_out_validation(workdir):
  """Breaks if mode='augmented', network='target' or a train hold-out is ignored or mislabelled."""
  cfg = eval_config(mode='augmented', epochs=1, network='target', val_split='', val_size=0.2)
  rec = linear_eval.evaluate(cfg, _pretrained(workdir), workdir)
  assert rec['protocol'] == 'linear_augmented' and rec['network'] == 'target'
  assert (rec['splits']['train']['size'], rec['splits']['val']['size']) == (800, 200)
  assert 'held out' in rec['splits']['val']['definition']


def test_encoder_weights_picks_the_requested_network(workdir):
  """Breaks if 'target' silently evaluates the online encoder (or vice versa)."""
  state = _pretrained(workdir).state
  online = linear_eval.encoder_weights(state, 'online')[0]
  target = linear_eval.encoder_weights(state, 'target')[0]
  assert set(online) == set(target) and all(k.startswith('encoder') for k in online)
  leaf = lambda tree: np.asarray(jax.tree.leaves(tree)[0])
  np.testing.assert_array_equal(leaf(target), leaf(networks.encoder_subtree(state.target_params)))
  assert not np.array_equal(leaf(online), leaf(target))
  with pytest.raises(train.ConfigError):
    linear_eval.encoder_weights(state, 'projector')


def test_random_init_baseline_and_missing_checkpoint(workdir, tmp_path):
  """Breaks if the untrained baseline is mislabelled or a missing checkpoint is not one line."""
  rec = linear_eval.evaluate(eval_config(epochs=1), linear_eval.load_pretrained(
    eval_config(random_init=True), workdir), workdir)
  assert rec['weights'] == 'random_init' and rec['checkpoint_step'] == 0
  with pytest.raises(train.ConfigError, match='no finalised checkpoint'):
    linear_eval.run(eval_config(), str(tmp_path))
  with pytest.raises(train.ConfigError, match='no checkpoint at step 3'):
    linear_eval.run(eval_config(step=3), workdir)
  with pytest.raises(train.ConfigError, match='configs/linear_eval.py'):
    linear_eval.run(tiny_config(), workdir)


def test_presets_and_bad_fields():
  """Breaks if a preset stops building, an unsupported dataset is accepted or a typo passes."""
  for name in eval_configs.PRESETS:
    cfg = eval_configs.get_config(name)
    assert cfg.preset == name and cfg.learning_rates and cfg.mode in linear_eval.MODES
  assert eval_configs.get_config('imagenet').epochs == 80
  for name in eval_configs.UNSUPPORTED:
    with pytest.raises(ValueError, match='not supported'):
      eval_configs.get_config(name)
  pre = tiny_config()
  resolved = linear_eval.resolve_config(eval_configs.get_config('cifar10'), pre)
  assert (resolved.image_size, resolved.crop_fraction) == (pre.image_size,
                                                           pre.eval_crop_fraction)
  for bad in (dict(mode='online'), dict(network='predictor'), dict(crop_fraction=1.5),
              dict(val_split='', val_size=0), dict(normalize_features=True, mode='augmented')):
    with pytest.raises(train.ConfigError):
      linear_eval.resolve_config(eval_config(**bad), pre)


@pytest.mark.slow
def test_pretraining_beats_the_initial_encoder(tmp_path):
  """Breaks if BYOL pretraining (demo preset, shortened) stops improving linear accuracy.

  Features are standardised for both encoders: a fresh encoder's BN moving variances are
  zero, so its raw features are ~1e9 and an SGD head on them says nothing about content.
  """
  code = (
    'import json, sys\n'
    'from byol_jax import linear_eval, train\n'
    'from configs import byol, linear_eval as presets\n'
    'cfg = byol.get_config("demo")\n'
    f'cfg.steps, cfg.eval_at_init = {SLOW_STEPS}, False\n'
    'train.train_and_evaluate(cfg, sys.argv[1])\n'
    'out = {}\n'
    'for init in (False, True):\n'
    '  ecfg = presets.get_config("demo")\n'
    '  ecfg.random_init, ecfg.normalize_features = init, True\n'
    '  pre = linear_eval.load_pretrained(ecfg, sys.argv[1])\n'
    '  out[pre.weights] = linear_eval.evaluate(ecfg, pre, sys.argv[1])["test_top1"]\n'
    'print("RESULT", json.dumps(out))\n')
  env = dict(os.environ, XLA_FLAGS='')  # optimised executables: this run is compute-bound
  proc = subprocess.run([sys.executable, '-c', code, str(tmp_path)], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=1800)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.split('RESULT', 1)[1])
  assert result['checkpoint'] >= result['random_init'] + SLOW_MARGIN, result


SLOW_STEPS = 400
SLOW_MARGIN = 0.03
