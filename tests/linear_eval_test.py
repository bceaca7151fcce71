"""Tests of the linear_eval worker: checkpoint in, provenance-rich record out, LR chosen on
validation only, and the augmented protocol sharing the evaluator's SGD."""

import json
import os
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import pytest
from conftest import REPO, tiny_config

import byol_jax
from byol_jax import finetune, linear_eval, metric_writers, networks, train
from byol_jax.evaluators import common
from byol_jax.evaluators import linear as linear_lib
from configs import linear_eval as eval_configs

RECORD_FIELDS = ('step', 'checkpoint_step', 'weights', 'bn_statistics', 'dataset', 'split',
                 'pretrain_dataset', 'splits', 'protocol', 'network', 'best_lr', 'best_index',
                 'val_top1', 'test_top1', 'test_top5', 'per_lr', 'learning_rates', 'epochs',
                 'num_classes')


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
  """Breaks if the worker stops reading the checkpoint or drops a provenance field, or if a
  refit record's `splits.train` describes the sweep's training set (1000 images) beside the
  test figure of the head refit on train + validation (1500): the sweep's is `sweep`."""
  before = len(records(workdir))
  assert linear_eval.run(eval_config(), workdir) == 0
  rec = records(workdir)[before]
  assert set(RECORD_FIELDS) <= set(rec)
  assert rec['step'] == rec['checkpoint_step'] == 4 and rec['weights'] == 'checkpoint'
  assert rec['protocol'] == 'linear_cached' and rec['network'] == 'online'
  assert rec['split'] == 'test' and rec['bn_statistics'] == 'checkpoint'
  assert rec['dataset'] == rec['pretrain_dataset'] == 'demo' and rec['num_classes'] == 10
  assert rec['refit'] and {k: (v['split'], v['size']) for k, v in rec['splits'].items()} == {
    'train': ('train+valid', 1500), 'val': ('valid', 500), 'test': ('test', 1000)}
  assert (rec['sweep']['train']['split'], rec['sweep']['train']['size']) == ('train', 1000)
  assert rec['sweep']['batch_size'] == rec['batch_size'] == 256
  assert all(v['definition'].startswith('demo[') for v in rec['splits'].values())
  assert ' + demo[valid]' in rec['splits']['train']['definition']
  assert [r['lr'] for r in rec['per_lr']] == [0.01, 0.1, 1.0]
  assert 0.0 <= rec['test_top1'] <= rec['test_top5'] <= 1.0


def test_best_lr_is_validation_argmax_and_test_comes_from_that_head(workdir, monkeypatch,
                                                                     caplog):
  """Breaks if the worker picks the LR on test, reports another head's test accuracy, or
  (refit, the default) does not retrain the chosen LR's head on train + validation (1000 +
  500 rows) and report that head's test score."""
  real = linear_lib.evaluate_heads
  val_top1, test_top1 = np.array([0.2, 0.6, 0.4]), np.array([0.9, 0.1, 0.8])

  def fake(params, x, y, chunk_size=4096):
    out = real(params, x, y, chunk_size)
    if params['w'].shape[0] == 1:  # the refit head
      return dict(out, top1=np.array([0.55]))
    table = val_top1 if len(y) == 500 else test_top1  # val has 500 rows, test 1000
    return dict(out, top1=table)

  fits = []
  for module, name, lr_arg in ((linear_lib, 'train_linear_heads', 3),
                               (linear_eval, 'train_heads_on_views', 5)):
    def spy(*args, _real=getattr(module, name), _lr_arg=lr_arg, **kw):
      fits.append((len(args[1]), tuple(args[_lr_arg])))
      return _real(*args, **kw)
    monkeypatch.setattr(module, name, spy)
  monkeypatch.setattr(linear_lib, 'evaluate_heads', fake)
  for mode in ('cached', 'augmented'):
    for refit in (False, True):
      fits.clear()
      caplog.clear()
      with caplog.at_level('INFO'):
        rec = linear_eval.evaluate(eval_config(mode=mode, epochs=1, refit=refit),
                                   _pretrained(workdir), workdir)
      said = 'refit on train + validation' if refit else "of the sweep's head"
      assert f'test top-1 {rec["test_top1"]:.4f}' in caplog.text and said in caplog.text
      assert rec['best_index'] == int(np.argmax([r['val_top1'] for r in rec['per_lr']])) == 1
      assert rec['best_lr'] == 0.1 and rec['val_top1'] == 0.6
      assert rec['per_lr'][1]['test_top1'] == 0.1 and rec['refit'] is refit
      assert rec['test_top1'] == (0.55 if refit else 0.1), (mode, refit)
      assert fits == [(1000, (0.01, 0.1, 1.0))] + ([(1500, (0.1,))] if refit else []), mode


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
  assert (rec['splits']['train']['size'], rec['splits']['val']['size']) == (1000, 200)
  assert rec['sweep']['train']['size'] == 800  # refit: train + the held-out validation
  assert 'held out' in rec['splits']['val']['definition']
  assert 'hold-out included' in rec['splits']['train']['definition']


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


def test_a_negative_max_examples_is_refused():
  """--config.max_examples=-5 sliced every split as [:-5]: the test top-1 of 995 of the
  1000 test images was reported, silently."""
  with pytest.raises(train.ConfigError, match=r'^max_examples=-5 must be >= 0'):
    linear_eval.resolve_config(eval_config(max_examples=-5), tiny_config())


def test_random_init_baseline_and_missing_checkpoint(workdir, tmp_path):
  """Breaks if the untrained baseline is mislabelled, keeps the never-updated BN statistics
  (mean 0, variance 0) of either network instead of recalibrated ones, or is not the run's
  own initialisation; or if a missing checkpoint is not a one-line error."""
  pre = linear_eval.load_pretrained(eval_config(random_init=True, bn_calibration_examples=300),
                                    workdir)
  for bn_state in (pre.state.online_state, pre.state.target_state):
    assert not common.bn_statistics_missing(bn_state)
  fresh = common.initial_state(pre.config)
  np.testing.assert_array_equal(jax.tree.leaves(pre.state.online_params)[0],
                                jax.tree.leaves(fresh.online_params)[0])
  rec = linear_eval.evaluate(eval_config(epochs=1), pre, workdir)
  assert rec['weights'] == 'random_init' and rec['checkpoint_step'] == 0
  assert rec['bn_statistics'] == 'recalibrated on 300 training images of demo/train'
  with pytest.raises(train.ConfigError, match='bn_calibration_examples'):
    linear_eval.resolve_config(eval_config(random_init=True, bn_calibration_examples=0),
                               pre.config)
  with pytest.raises(train.ConfigError, match='image_size=3 must be at least 8'):
    linear_eval.resolve_config(eval_config(image_size=3), pre.config)  # ran on 3 px images
  with pytest.raises(train.ConfigError, match='no finalised checkpoint'):
    linear_eval.run(eval_config(), str(tmp_path))
  with pytest.raises(train.ConfigError, match='no checkpoint at step 3'):
    linear_eval.run(eval_config(step=3), workdir)
  with pytest.raises(train.ConfigError, match='configs/linear_eval.py'):
    linear_eval.run(tiny_config(), workdir)


def test_streamed_calibration_batches_spread_over_the_split(monkeypatch):
  """Breaks if BN recalibration on a streamed split reads only its first batches (a split
  stored class by class would then calibrate on a few classes), exceeds
  bn_calibration_examples, or lets a padded batch (mask False rows) into the statistics."""
  batches = [dict(images=np.full((4, 2, 2, 3), i, np.uint8), mask=np.ones(4, bool))
             for i in range(10)]
  batches[9]['mask'][-1] = False  # the padded last batch of a pass

  class FakeStream:
    def __iter__(self):
      return iter(batches)

    def __len__(self):
      return len(batches)

  fake = types.SimpleNamespace(eval_stream=lambda *args, **kwargs: FakeStream())
  monkeypatch.setitem(sys.modules, 'byol_jax.input_pipeline', fake)
  monkeypatch.setattr(byol_jax, 'input_pipeline', fake, raising=False)
  cfg = eval_config(embed_batch_size=4, bn_calibration_examples=12)
  got = [int(b[0, 0, 0, 0]) for b in linear_eval._streamed_calibration_batches(cfg, 1)()]
  assert got == [0, 3, 6]  # 3 batches of 4, every 10 // 3 = 3rd
  cfg = eval_config(embed_batch_size=4, bn_calibration_examples=1000)
  got = [int(b[0, 0, 0, 0]) for b in linear_eval._streamed_calibration_batches(cfg, 1)()]
  assert got == list(range(9))  # all but the padded one


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
              dict(val_split='', val_size=0), dict(normalize_features=True, mode='augmented'),
              dict(seed=-1), dict(learning_rates=(0.1, -1.0)), dict(learning_rates=(0.0,)),
              dict(finetune=dict(learning_rates=(0.1, -0.1)))):
    with pytest.raises(train.ConfigError):
      linear_eval.resolve_config(eval_config(**bad), pre)


def test_a_validation_hold_out_that_cannot_be_taken_is_one_line():
  """With val_split='' the validation set is val_size of train_split: a fraction in (0, 1)
  or a whole count. 1.5 held out one image and -0.1 ended in ValueError's traceback once
  the split was decoded, as did a count as large as the split (finetune too). Each is now
  a ConfigError naming val_size; breaks if one passes or is a traceback."""
  pre = tiny_config()
  for ok in (0.2, 3, 3.0):
    linear_eval.resolve_config(eval_config(val_split='', val_size=ok), pre)
  for bad in (1.5, -0.1, -3):
    with pytest.raises(train.ConfigError, match=f'got {bad}'):
      linear_eval.resolve_config(eval_config(val_split='', val_size=bad), pre)
  resolved = linear_eval.resolve_config(eval_config(val_split='', val_size=500), pre)
  with pytest.raises(train.ConfigError,
                     match=r'val_size=500 cannot be held out of the 100 images of demo/train'):
    linear_eval.hold_out(resolved, 100)


@pytest.mark.slow
def test_voc2007_preset_reports_map_from_the_validation_choice(workdir, voc_dir):
  """The paper's VOC2007 transfer protocol end to end on TFDS-shaped data; breaks if the
  multi-label targets do not reach the heads (top-k instead of mAP), a split is misnamed,
  or the reported row is not the validation choice (refit=False) or its head retrained on
  train + validation (multi-label rows concatenated), in either mode."""
  for mode, refit in (('cached', False), ('cached', True), ('augmented', True)):
    cfg = eval_configs.get_config('voc2007')
    cfg.update(data_dir=voc_dir, epochs=2, batch_size=8, learning_rates=(0.01, 0.1), mode=mode,
               refit=refit)
    rec = linear_eval.evaluate(cfg, _pretrained(workdir), workdir)
    assert rec['dataset'] == 'voc/2007' and rec['num_classes'] == 20
    train = ('voc/2007[train] + voc/2007[validation]', 36) if refit else ('voc/2007[train]', 24)
    assert {k: (v['definition'], v['size']) for k, v in rec['splits'].items()} == {
      'train': train, 'val': ('voc/2007[validation]', 12), 'test': ('voc/2007[test]', 16)}
    assert 'test_top1' not in rec and 0.0 < rec['test_map'] <= 1.0
    assert rec['best_index'] == int(np.argmax([r['val_map'] for r in rec['per_lr']]))
    assert (rec['test_map'] == rec['per_lr'][rec['best_index']]['test_map']) is not refit


def test_voc2007_refusals_name_what_to_do(workdir, voc_dir):
  """Breaks if a multi-label dataset reaches finetune's softmax, or is streamed (whose
  batches carry single labels), instead of stopping with a one-line reason."""
  cfg = eval_configs.get_config('voc2007')
  cfg.update(data_dir=voc_dir, epochs=1, batch_size=8)
  with pytest.raises(train.ConfigError, match='linear_eval'):
    finetune.evaluate(cfg, _pretrained(workdir), workdir)
  cfg.input_mode = 'stream'
  with pytest.raises(train.ConfigError, match='input_mode=device'):
    linear_eval.evaluate(cfg, _pretrained(workdir), workdir)


def test_images_without_a_class_stay_out_of_linear_evaluation(workdir, stl10_dir):
  """Breaks if label -1 (STL-10's 'unlabelled' images) reaches the heads, where it used to
  stop the worker with a traceback, or a split with no labelled image is not one line."""
  cfg = eval_config(dataset='stl10', data_dir=stl10_dir, train_split='unlabelled+train',
                    val_split='', val_size=3, max_examples=0)
  rec = linear_eval.evaluate(cfg, _pretrained(workdir), workdir)
  assert (rec['sweep']['train']['size'], rec['splits']['val']['size']) == (9, 3)
  assert rec['splits']['train']['size'] == 12 and rec['splits']['test']['size'] == 6
  assert 0.0 <= rec['test_top1'] <= 1.0
  cfg.train_split = 'unlabelled'
  with pytest.raises(train.ConfigError, match=r'stl10/unlabelled has no labelled images'):
    linear_eval.evaluate(cfg, _pretrained(workdir), workdir)


@pytest.mark.slow
def test_pretraining_beats_the_initial_encoder(tmp_path):
  """On the demo data, a shortened pretraining run followed by an eval worker and linear_eval
  of the same checkpoint; breaks if BYOL pretraining stops improving on the encoder at
  initialisation, by kNN (the eval worker's final checkpoint vs. its step-0 record) or by
  linear accuracy (linear_eval of the checkpoint vs. random_init).

  Both encoders go through the same protocol with raw features: the initial encoder's BN
  statistics are recalibrated (evaluators.common.ensure_bn_statistics), so its features are
  sane and no feature standardisation is needed to make the baseline fair. The margins are
  about a third of what was measured (see SLOW_MARGINS). About 5 minutes on 2 busy CPU cores,
  most of it the 100 training steps.
  """
  code = f"""
import json, sys
from byol_jax import eval_worker, linear_eval, metric_writers, train
from configs import byol, linear_eval as presets
workdir = sys.argv[1]
cfg = byol.get_config('demo')
cfg.steps, cfg.eval_at_init, cfg.checkpoint.every_steps = {SLOW_STEPS}, False, {SLOW_STEPS}
train.train_and_evaluate(cfg, workdir)
worker = byol.get_config('demo')
worker.eval_at_init, worker.eval_poll_secs, worker.eval_idle_timeout_secs = True, 0.1, 5.0
assert eval_worker.run(worker, workdir) == 0
records = metric_writers.read_jsonl(workdir + '/metrics/eval_worker.jsonl')
out = dict(knn={{r['weights'] + str(r['step']): r['knn_top1'] for r in records}},
           knn_bn={{r['step']: r['bn_statistics'] for r in records}}, linear={{}})
for init in (False, True):
  ecfg = presets.get_config('demo')
  ecfg.random_init = init
  pre = linear_eval.load_pretrained(ecfg, workdir)
  rec = linear_eval.evaluate(ecfg, pre, workdir)
  out['linear'][pre.weights] = rec['test_top1']
  out['linear_bn_' + pre.weights] = rec['bn_statistics']
print('RESULT', json.dumps(out))
"""
  # Optimised executables (this run is compute-bound), kept in a persistent compilation cache:
  # a cached executable is the binary a fresh compile would give, so only the time changes.
  env = dict(os.environ, XLA_FLAGS='', JAX_COMPILATION_CACHE_DIR=SLOW_COMPILE_CACHE,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0.5')
  start = time.time()
  proc = subprocess.run([sys.executable, '-c', code, str(tmp_path)], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=1800)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.split('RESULT', 1)[1])
  print(f'{time.time() - start:.0f} s:', result)
  knn, linear = result['knn'], result['linear']
  assert set(knn) == {'random_init0', f'checkpoint{SLOW_STEPS}'}
  assert result['knn_bn']['0'].startswith('recalibrated on ')
  assert result['linear_bn_random_init'].startswith('recalibrated on ')
  assert knn[f'checkpoint{SLOW_STEPS}'] >= knn['random_init0'] + SLOW_MARGINS['knn'], result
  assert linear['checkpoint'] >= linear['random_init'] + SLOW_MARGINS['linear'], result


SLOW_STEPS = 100
# Measured with SLOW_STEPS = 100 (seed 0, 2 shared CPU cores, 2026-11-26; the same figures in
# two runs): kNN top-1 0.343 -> 0.484, linear top-1 0.351 -> 0.800. The margins are about a
# third of those gains: room for other hardware's rounding, while a run that learns (nearly)
# nothing, or collapses, fails.
SLOW_MARGINS = dict(knn=0.05, linear=0.15)
SLOW_COMPILE_CACHE = os.path.join(tempfile.gettempdir(), 'byol_jax_slow_test_compile_cache')


def test_every_split_of_an_evaluation_takes_one_input_path(monkeypatch):
  """The head must be trained on features from the same preprocessing as the val/test
  features it is chosen and reported on. On an 80 GiB accelerator the imagenet preset's
  train split must stream (host crop, TF bicubic: the release's recipe) while valid and test
  would fit in memory (PIL's antialiased resize, then a device crop: 2 grey levels apart on
  average); so all three stream. Breaks if split_features picks a path per split again."""
  from byol_jax import data as data_lib
  from byol_jax import datasets
  sizes = {'train': 1281167 - 10009, 'valid': 10009, 'test': 50000}
  monkeypatch.setattr(data_lib, 'device_memory_bytes', lambda: 80 * 2**30)
  monkeypatch.setattr(datasets, 'dataset_size', lambda spec, split, data_dir=None: sizes[split])
  monkeypatch.setattr(linear_eval, 'multilabel', lambda cfg: False)
  pre_cfg = tiny_config(dataset='imagenet2012', image_size=224, eval_crop_fraction=0.875)
  cfg = linear_eval.resolve_config(eval_configs.get_config('imagenet'), pre_cfg)
  modes = {s: linear_eval.input_mode(cfg, s) for s in ('train', 'valid', 'test')}
  assert modes == {'train': 'stream', 'valid': 'device', 'test': 'device'}  # the premise
  assert linear_eval.evaluation_input_mode(cfg) == 'stream'
  embedded = []
  fake = types.SimpleNamespace(stream=lambda split: embedded.append(split) or (
    np.zeros((2, 4), np.float32), np.zeros(2, np.int64)))
  monkeypatch.setattr(linear_eval, 'labelled', lambda cfg, split, x, y: (x, y))
  linear_eval.split_features(cfg, fake, 'test', 0, linear_eval.evaluation_input_mode(cfg))
  assert embedded == ['test']
  monkeypatch.setattr(data_lib, 'device_memory_bytes', lambda: 10**15)  # all fit: resident
  assert linear_eval.evaluation_input_mode(cfg) == 'device'


def test_random_init_calibrates_bn_on_the_evaluations_input_path(monkeypatch):
  """The random-init baseline re-estimates BN statistics from the train split through the
  same path its features are then embedded with: streamed here because test must stream,
  though train alone would fit. Breaks if it goes back to choosing by the train split."""
  from byol_jax import data as data_lib
  from byol_jax import datasets
  sizes = {'train': 1000, 'valid': 1000, 'test': 10**8}
  monkeypatch.setattr(data_lib, 'device_memory_bytes', lambda: 80 * 2**30)
  monkeypatch.setattr(datasets, 'dataset_size', lambda spec, split, data_dir=None: sizes[split])
  monkeypatch.setattr(linear_eval, 'multilabel', lambda cfg: False)
  pre_cfg = tiny_config(dataset='imagenet2012', image_size=224, eval_crop_fraction=0.875)
  cfg = linear_eval.resolve_config(eval_configs.get_config('imagenet'), pre_cfg)
  assert linear_eval.input_mode(cfg, 'train') == 'device'  # the premise
  monkeypatch.setattr(linear_eval, '_streamed_calibration_batches', lambda cfg, n: 'streamed')
  seen = {}
  monkeypatch.setattr(common, 'calibrated_initial_state',
                      lambda pre, images, mesh, crop, *a: seen.update(images=images, crop=crop))
  linear_eval.initial_encoder(cfg, pre_cfg)
  assert seen == {'images': 'streamed', 'crop': 1.0}


def _whole_image_views(pre):
  """The pretraining augmentation made the identity: whole-image crops, no flips."""
  aug = pre.config.augment
  aug.crop_area_min = aug.crop_area_max = aug.crop_aspect_min = aug.crop_aspect_max = 1.0
  aug.flip_prob = 0.0
  return pre


def test_streamed_augmented_heads_equal_cached_heads_when_views_are_whole_images(
    workdir, png_folder):
  """ImageNet's train split does not fit in memory, so mode='augmented' (the paper's
  protocol) streams it: tf.data crops, the device flips and runs the encoder every step.
  With whole-image crops and no flips its views are the cached centre crops (fraction 1,
  the same TF decode), and with the whole split as one batch the order cannot matter: the
  two protocols must then train the same heads. Breaks if the streamed trainer pairs images
  with the wrong labels, takes a different number of steps or another LR schedule."""
  if 9 % jax.device_count():  # the streamed batch is a multiple of the device count
    pytest.skip(f'the 9 training images are not one batch over {jax.device_count()} devices')
  base = dict(dataset=png_folder, image_size=16, crop_fraction=1.0, max_examples=0,
              input_mode='stream', val_split='valid', epochs=3, batch_size=9,
              learning_rates=(0.3, 3.0), refit=False)
  pre = _whole_image_views(_pretrained(workdir))
  cached = linear_eval.evaluate(eval_config(mode='cached', **base), pre, workdir)
  streamed = linear_eval.evaluate(eval_config(mode='augmented', **base), pre, workdir)
  assert streamed['protocol'] == 'linear_augmented' and cached['protocol'] == 'linear_cached'
  assert streamed['splits']['train']['size'] == 9
  for got, want in zip(streamed['per_lr'], cached['per_lr'], strict=True):
    assert got == pytest.approx(want, abs=1e-6)


def test_streamed_augmented_mode_trains_on_new_crops_and_refits(workdir, png_folder,
                                                                  monkeypatch):
  """The streamed protocol's heads see a new random crop of every image in every epoch and
  the refit streams 'trainval' (train + valid). Breaks if the stream repeats one crop, or
  the refit reads the train split alone."""
  seen, streams = [], []
  flip = linear_eval.random_flip
  monkeypatch.setattr(linear_eval, 'random_flip',
                      lambda key, crops, aug: jax.debug.callback(
                        lambda c: seen.append(np.asarray(c)), crops) or flip(key, crops, aug))
  from byol_jax import input_pipeline
  train_stream = input_pipeline.train_stream
  monkeypatch.setattr(input_pipeline, 'train_stream',
                      lambda spec, **kw: streams.append(kw['split']) or train_stream(spec, **kw))
  cfg = eval_config(mode='augmented', dataset=png_folder, image_size=16, max_examples=0,
                    input_mode='stream', val_split='valid', epochs=2, batch_size=9)
  rec = linear_eval.evaluate(cfg, _pretrained(workdir), workdir)
  assert rec['refit'] and streams == ['train', 'trainval']
  assert (rec['splits']['train']['split'], rec['splits']['train']['size']) == ('trainval', 12)
  assert rec['sweep']['train']['size'] == 9
  assert len(seen) == 2 + 2 * 12 // 9  # two epochs of the sweep, two of the refit
  assert not np.array_equal(seen[0], seen[1])  # epoch 2 crops differ from epoch 1's
  assert np.isfinite(rec['test_top1'])


def test_streamed_augmented_mode_refuses_what_a_stream_cannot_do(workdir, png_folder):
  """A stream has no rows to hold out, no first-N cut of its epochs and no union of two
  arbitrary splits: each is one line naming the fix, before any image is decoded."""
  base = dict(mode='augmented', dataset=png_folder, image_size=16, input_mode='stream',
              max_examples=0)
  for overrides, message in ((dict(val_split='', val_size=0.2), 'set --config.val_split'),
                             (dict(val_split='valid', max_examples=5), 'max_examples=5'),
                             (dict(val_split='test', refit=True), 'refit=False')):
    with pytest.raises(train.ConfigError, match=message):
      linear_eval.evaluate(eval_config(**{**base, **overrides}), _pretrained(workdir), workdir)


class _Stop(Exception):
  """An evaluation stopped right after a progress save, as a Ctrl-C or a preemption."""


def _stop_after_save(monkeypatch, evaluate: Callable[[], Any],
                     stop_when: Callable[[Any, Any], bool] = lambda progress, carry: True,
                     on_save: Callable[[], None] = lambda: None) -> None:
  """Runs `evaluate` and stops it after the first progress save for which
  stop_when(progress, carry) holds; that save is kept, as an interrupted run's is."""
  save = linear_eval._HeadProgress.save

  def save_then_stop(self, carry):
    on_save()
    save(self, carry)
    if stop_when(self, carry):
      raise _Stop

  with monkeypatch.context() as m:
    m.setattr(linear_eval._HeadProgress, 'save', save_then_stop)
    with pytest.raises(_Stop):
      evaluate()


def test_an_interrupted_streamed_evaluation_resumes_from_its_last_epoch(workdir, png_folder,
                                                                        tmp_path, monkeypatch):
  """ImageNet's streamed protocol is 80 epochs of forward passes, and the refit's 80: hours.
  Stopped after an epoch, the same command goes on from there, and ends with the heads an
  uninterrupted run trains (same batches, crops and updates). Breaks if the progress is not
  kept, resumed at another step, or the stream restarts from its first batch; or if it is
  removed before the evaluation's record is written."""
  import shutil
  cfg = eval_config(mode='augmented', dataset=png_folder, image_size=16, max_examples=0,
                    input_mode='stream', val_split='valid', epochs=3, batch_size=4,
                    refit=False)
  runs = {name: str(shutil.copytree(workdir, tmp_path / name)) for name in ('whole', 'stopped')}
  whole = linear_eval.evaluate(cfg, _pretrained(runs['whole']), runs['whole'])
  _stop_after_save(  # after epoch 2 of 3 (2 steps per epoch)
    monkeypatch, lambda: linear_eval.evaluate(cfg, _pretrained(runs['stopped']), runs['stopped']),
    stop_when=lambda progress, carry: int(carry[2]) == 4)
  folder = os.path.join(runs['stopped'], 'linear_eval_progress')
  progress = os.listdir(folder)
  assert len(progress) == 1, progress
  # The resumed run trains epoch 3, then cannot write its record (a full disk: the progress
  # files are the large thing written there). Its heads stay on disk, trained to the end,
  # so the rerun trains nothing again; they go once a record is written (the refit test).
  resumed = {}

  def full_disk(workdir, name, step, record):
    resumed.update(record)
    raise OSError(28, 'No space left on device')

  with monkeypatch.context() as m:
    m.setattr(linear_eval, 'write_record', full_disk)
    with pytest.raises(OSError, match='No space left'):
      linear_eval.evaluate(cfg, _pretrained(runs['stopped']), runs['stopped'])
  assert resumed['per_lr'] == whole['per_lr']
  assert os.listdir(folder) == progress
  with np.load(os.path.join(folder, progress[0])) as saved:
    leaves = [name for name in saved.files if name.startswith('leaf')]
    assert int(saved[f'leaf{len(leaves) - 1}']) == 3 * 2  # all 3 epochs of 2 steps


def test_a_resumed_evaluation_records_the_time_of_every_invocation(workdir, png_folder,
                                                                   tmp_path, monkeypatch):
  """The record's elapsed_sec of a stopped and resumed streamed evaluation counts the stopped
  invocation's time up to its last kept epoch, not the last invocation's alone (an ImageNet
  evaluation stopped at epoch 70 of 80 recorded the time of 10). linear_eval's clock jumps
  1000 s before each of the stopped invocation's two saves, so the record must hold at
  least 2000 s. Breaks if the progress file does not keep the elapsed time or the resume
  does not carry it into the record."""
  import shutil
  cfg = eval_config(mode='augmented', dataset=png_folder, image_size=16, max_examples=0,
                    input_mode='stream', val_split='valid', epochs=3, batch_size=4,
                    refit=False)
  run = str(shutil.copytree(workdir, tmp_path / 'run'))
  jump = [0.0]
  monkeypatch.setattr(linear_eval, 'time',
                      types.SimpleNamespace(time=lambda: time.time() + jump[0]))
  start = time.time()
  _stop_after_save(  # after epoch 2 of 3 (2 steps per epoch), each 1000 s slower
    monkeypatch, lambda: linear_eval.evaluate(cfg, _pretrained(run), run),
    stop_when=lambda progress, carry: int(carry[2]) == 4,
    on_save=lambda: jump.__setitem__(0, jump[0] + 1000.0))
  record = linear_eval.evaluate(cfg, _pretrained(run), run)
  assert 2000.0 <= record['elapsed_sec'] <= 2000.0 + time.time() - start


def test_an_evaluation_interrupted_in_its_refit_does_not_train_the_sweep_again(
    workdir, png_folder, tmp_path, monkeypatch):
  """The refit is the second half of ImageNet's streamed protocol (80 more epochs). Stopped
  there, the same command must go on with the refit, not retrain the sweep's 80 epochs
  from its first step; and a finished evaluation leaves no progress behind. Breaks if the
  sweep's progress is removed before the refit's heads are trained."""
  import shutil

  from byol_jax import input_pipeline
  cfg = eval_config(mode='augmented', dataset=png_folder, image_size=16, max_examples=0,
                    input_mode='stream', val_split='valid', epochs=3, batch_size=4)
  run = str(shutil.copytree(workdir, tmp_path / 'run'))
  _stop_after_save(  # in the refit
    monkeypatch, lambda: linear_eval.evaluate(cfg, _pretrained(run), run),
    stop_when=lambda progress, carry: '_trainval_' in os.path.basename(progress.path))
  starts = []
  train_stream = input_pipeline.train_stream
  monkeypatch.setattr(input_pipeline, 'train_stream', lambda spec, **kw: starts.append(
    (kw['split'], kw['start_step'])) or train_stream(spec, **kw))
  linear_eval.evaluate(cfg, _pretrained(run), run)
  assert starts == [('train', 3 * (9 // 4)), ('trainval', 12 // 4)], starts
  assert not os.path.exists(os.path.join(run, 'linear_eval_progress'))


@pytest.mark.slow
def test_a_rerun_after_a_stop_between_record_and_cleanup_writes_no_second_record(
    workdir, png_folder, tmp_path, monkeypatch, caplog):
  """An evaluation stopped after its record was written but before its progress files were
  removed left heads trained to the end; the same command then resumed them, trained
  nothing, and appended a second record of the same evaluation. The rerun must find the
  heads in the record (`heads_ids`), say so, remove their progress and write nothing; a
  later run trains afresh and records again. Breaks if the record does not carry the
  heads' ids, or the rerun does not check them."""
  import shutil

  from byol_jax import input_pipeline
  cfg = eval_config(mode='augmented', dataset=png_folder, image_size=16, max_examples=0,
                    input_mode='stream', val_split='valid', epochs=2, batch_size=4)
  run = str(shutil.copytree(workdir, tmp_path / 'run'))
  before = len(records(run))
  with monkeypatch.context() as m:  # stopped right after the record is written
    m.setattr(linear_eval._HeadProgress, 'done', lambda self: (_ for _ in ()).throw(_Stop()))
    with pytest.raises(_Stop):
      linear_eval.evaluate(cfg, _pretrained(run), run)
  first = records(run)[before:]
  assert len(first) == 1 and len(first[0]['heads_ids']) == 2  # the sweep's and the refit's
  folder = os.path.join(run, 'linear_eval_progress')
  assert len(os.listdir(folder)) == 2
  starts = []
  train_stream = input_pipeline.train_stream
  monkeypatch.setattr(input_pipeline, 'train_stream', lambda spec, **kw: starts.append(
    kw['split']) or train_stream(spec, **kw))
  with caplog.at_level('WARNING'):
    again = linear_eval.evaluate(cfg, _pretrained(run), run)
  assert records(run)[before:] == first and again == first[0]
  assert 'already recorded' in caplog.text and 'no second record' in caplog.text
  assert not os.path.exists(folder) and starts == []
  fresh = linear_eval.evaluate(cfg, _pretrained(run), run)  # nothing kept: a new evaluation
  assert len(records(run)) == before + 2 and fresh['heads_ids'] != first[0]['heads_ids']


def test_heads_of_a_changed_setting_are_named_and_kept_not_resumed(workdir, png_folder,
                                                                   tmp_path, monkeypatch,
                                                                   caplog):
  """A stopped evaluation's heads stay under linear_eval_progress/ for its command to resume.
  Run again with a setting changed (here the epochs), the evaluation says before training
  afresh which file it does not resume and what differs, and after its record names the
  file again with the command that removes it; the file stays, as its command still resumes
  it. Breaks if another setting's heads are resumed or removed, or left there without a
  word (they stayed for ever, unseen: 49 MB a file for ImageNet)."""
  import shutil
  run = str(shutil.copytree(workdir, tmp_path / 'run'))
  base = dict(mode='augmented', dataset=png_folder, image_size=16, max_examples=0,
              input_mode='stream', val_split='valid', batch_size=4, refit=False)
  _stop_after_save(monkeypatch, lambda: linear_eval.evaluate(eval_config(epochs=3, **base),
                                                             _pretrained(run), run))
  folder = os.path.join(run, 'linear_eval_progress')
  (stopped,) = os.listdir(folder)
  path = os.path.join(folder, stopped)
  with caplog.at_level('WARNING'):
    record = linear_eval.evaluate(eval_config(epochs=2, **base), _pretrained(run), run)
  assert record['epochs'] == 2 and os.listdir(folder) == [stopped]
  assert (f'not resuming {path}, heads of another setting (differs in epochs 3 there, 2 here)'
          in caplog.text), caplog.text
  assert f"{path}: checkpoint_step 4, weights 'checkpoint', network 'online', split 'train', "\
         "epochs 3, learning_rates [0.01, 0.1, 1.0]: 2 steps trained in " in caplog.text
  assert f'rm {path}' in caplog.text


@pytest.mark.slow
def test_a_streamed_evaluation_of_another_encoder_does_not_resume_these_heads(
    workdir, png_folder, tmp_path, monkeypatch):
  """Progress is keyed by what shapes the heads. The encoder is one of those things, and
  the checkpoint step does not pin it: the initial encoder's BN statistics are estimated on
  centre crops of crop_fraction (and bn_calibration_examples of them), and a run folder
  trained again holds other weights at the same steps. Heads of one encoder must never go
  on training on another's features; the same setting still resumes. Breaks if the
  progress file's identity leaves the encoder out."""
  import shutil

  from byol_jax import input_pipeline
  run = str(shutil.copytree(workdir, tmp_path / 'run'))
  base = dict(mode='augmented', dataset=png_folder, image_size=16, max_examples=0,
              input_mode='stream', val_split='valid', epochs=3, batch_size=4, refit=False,
              random_init=True, bn_calibration_examples=8)
  cfg = eval_config(crop_fraction=1.0, **base)
  _stop_after_save(monkeypatch,
                   lambda: linear_eval.evaluate(cfg, linear_eval.load_pretrained(cfg, run), run))
  starts = []
  train_stream = input_pipeline.train_stream
  monkeypatch.setattr(input_pipeline, 'train_stream', lambda spec, **kw: starts.append(
    kw['start_step']) or train_stream(spec, **kw))
  for crop_fraction in (0.5, 1.0):  # another encoder (BN statistics), then the same one
    cfg = eval_config(crop_fraction=crop_fraction, **base)
    linear_eval.evaluate(cfg, linear_eval.load_pretrained(cfg, run), run)
  assert starts == [0, 9 // 4], starts


def test_max_examples_does_not_make_a_split_too_large_for_memory_resident(
    workdir, png_folder, monkeypatch):
  """max_examples keeps the first N images of a split that `load_split` has decoded whole,
  so it cannot make that split fit: ImageNet with max_examples=1000 decoded all 1.28M
  training images into memory (233 GiB). A split that must stream streams (cached features
  stop after N images), and mode='augmented' refuses it in one line, as documented. Breaks
  if max_examples shrinks the size the input path is chosen by."""
  from byol_jax import data as data_lib
  from byol_jax import datasets
  monkeypatch.setattr(data_lib, 'device_memory_bytes', lambda: 12_000)  # 3 of 9 images fit
  decoded = []
  load_arrays = datasets.load_arrays
  monkeypatch.setattr(datasets, 'load_arrays', lambda spec, split, **kw: decoded.append(split)
                      or load_arrays(spec, split, **kw))
  base = dict(dataset=png_folder, image_size=16, input_mode='auto', val_split='valid',
              max_examples=2, refit=False, epochs=1, batch_size=2)
  with pytest.raises(train.ConfigError, match='max_examples=2 cannot shorten'):
    linear_eval.evaluate(eval_config(mode='augmented', **base), _pretrained(workdir), workdir)
  rec = linear_eval.evaluate(eval_config(mode='cached', **base), _pretrained(workdir), workdir)
  assert rec['splits']['train']['size'] == 2 and decoded == []


def test_streamed_heads_take_the_resident_steps_when_files_are_unreadable(
    workdir, png_folder, tmp_path, monkeypatch):
  """A folder's unreadable files are left out of both input paths. The stream's epoch is
  then its readable images' whole batches, as the resident path's is: the same number of
  steps (and cosine schedule), and the record's train size counts the images trained on.
  Breaks if the streamed heads count epochs by the files scanned (13 here: 3 steps an
  epoch, not 2) or the record says 13."""
  import shutil
  folder = tmp_path / 'folder'
  shutil.copytree(png_folder[len('folder:'):], folder)
  for i in range(4):
    (folder / 'train' / 'c0' / f'bad{i}.png').write_bytes(b'not an image' * 30)
  totals = []
  view_step = linear_eval._view_step
  monkeypatch.setattr(linear_eval, '_view_step',
                      lambda featurize, total: totals.append(total) or view_step(featurize,
                                                                                 total))
  sizes = []
  for input_mode in ('device', 'stream'):
    cfg = eval_config(mode='augmented', dataset=f'folder:{folder}', image_size=16,
                      max_examples=0, input_mode=input_mode, val_split='valid', epochs=3,
                      batch_size=4, refit=False)
    sizes.append(linear_eval.evaluate(cfg, _pretrained(workdir), workdir)['splits']['train']
                 ['size'])
  assert totals == [3 * (9 // 4)] * 2 and sizes == [9, 9], (totals, sizes)


def test_only_process_0_writes_the_streamed_heads_progress(tmp_path, monkeypatch):
  """Every process of a multi-host evaluation (a TPU pod slice, workdir on a shared file
  system as the README asks) holds the same replicated heads. If each one writes them to the
  same <file>.tmp and renames it, the first rename takes the others' file away and their
  os.replace fails (FileNotFoundError), one host dies and the rest wait on it; `done` races
  the same way. Process 0 writes and removes, as it alone writes metrics; every process
  reads. Breaks if another process writes or removes the progress file."""
  progress = linear_eval._HeadProgress(str(tmp_path), dict(checkpoint_step=4, split='train'))
  params, momentum, _ = linear_lib.init_heads(3, 2, 1)
  carry = (params, momentum, jax.numpy.int32(5))
  folder = tmp_path / 'linear_eval_progress'
  monkeypatch.setattr(jax, 'process_index', lambda: 1)
  progress.save(carry)
  assert not folder.exists()
  monkeypatch.setattr(jax, 'process_index', lambda: 0)
  progress.save(carry)
  assert os.listdir(folder) == [os.path.basename(progress.path)]
  monkeypatch.setattr(jax, 'process_index', lambda: 1)
  assert int(progress.load(linear_lib.init_heads(3, 2, 1))[2]) == 5  # every process resumes
  progress.done()
  assert os.path.exists(progress.path)
  monkeypatch.setattr(jax, 'process_index', lambda: 0)
  progress.done()
  assert not folder.exists()


def test_hosts_train_the_streamed_heads_for_the_same_steps(monkeypatch):
  """Each host counts its own stream's readable images; one whose shard holds an unreadable
  file has a step fewer per epoch, and hosts running different step counts hang in their
  collectives. Breaks if a host keeps its own count instead of the fewest."""
  from jax.experimental import multihost_utils
  monkeypatch.setattr(jax, 'process_count', lambda: 3)
  monkeypatch.setattr(multihost_utils, 'process_allgather',
                      lambda x: np.stack([np.asarray(x), np.asarray(x) - 1, np.asarray(x)]))
  assert linear_eval._fewest_across_processes(10) == 9
  monkeypatch.setattr(jax, 'process_count', lambda: 1)
  assert linear_eval._fewest_across_processes(10) == 10
