"""Tests of the finetune worker: 10% subset end to end with its record, the encoder loaded
from the checkpoint, BN and encoder trained, and the LR chosen on validation only."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

from byol_jax import finetune, linear_eval, metric_writers, subsets, train
from byol_jax.evaluators import linear as linear_lib
from configs import linear_eval as eval_configs


@pytest.fixture(scope='module')
def workdir(pretrained_workdir):
  """The shared tiny pretraining workdir (tests/conftest.py)."""
  return pretrained_workdir


def ft_config(**overrides):
  """The demo preset with a 10% subset held apart from a 10% validation hold-out of train."""
  cfg = eval_configs.get_config('demo')
  cfg.update(subset_fraction=0.1, val_split='', val_size=0.1, max_examples=0)
  cfg.finetune.update(epochs=1, batch_size=64, learning_rates=(0.01, 0.1))
  cfg.update(overrides)
  return cfg


def test_ten_percent_subset_end_to_end(workdir):
  """Breaks if the 10% run, its recorded subset file or its jsonl record go missing or wrong."""
  assert finetune.run(ft_config(), workdir) == 0
  rec = metric_writers.read_jsonl(os.path.join(workdir, 'metrics', 'finetune.jsonl'))[-1]
  assert rec['protocol'] == 'finetune' and rec['network'] == 'online'
  assert rec['step'] == rec['checkpoint_step'] == 4 and rec['subset_fraction'] == 0.1
  assert (rec['dataset'], rec['split'], rec['weights'], rec['bn_statistics']) == (
    'demo', 'test', 'checkpoint', 'checkpoint')
  assert {k: v['size'] for k, v in rec['splits'].items()} == dict(train=450, val=500, test=1000)
  assert [r['lr'] for r in rec['per_lr']] == [0.01, 0.1]
  best = int(np.argmax([r['val_top1'] for r in rec['per_lr']]))
  assert rec['best_index'] == best and rec['test_top1'] == rec['per_lr'][best]['test_top1']

  indices, meta = subsets.load_subset(rec['subset']['file'])
  assert os.path.dirname(rec['subset']['file']) == os.path.join(workdir, 'subsets')
  assert len(indices) == rec['subset']['size'] == 450
  labels = linear_eval.load_split(linear_eval.resolve_config(ft_config(), tiny_config()),
                                  'train', seed=0).labels
  held_out = linear_lib.split_validation(len(labels), 0.1, seed=0)[1]
  np.testing.assert_array_equal(meta['held_out_indices'], held_out)
  assert not set(indices.tolist()) & set(held_out.tolist())  # disjoint from validation
  eligible = np.bincount(np.delete(labels, held_out), minlength=10)
  np.testing.assert_array_equal(np.bincount(labels[indices], minlength=10),
                                np.floor(0.1 * eligible + 0.5))  # balanced per class
  np.testing.assert_array_equal(  # deterministic: the same seed draws the same subset
    indices, subsets.balanced_subset(labels, 0.1, seed=0, exclude=held_out))
  assert meta['seed'] == 0 and meta['fraction'] == 0.1 and meta['split'] == 'train'


@pytest.mark.slow
def test_all_labels_refit_the_chosen_lr_on_train_and_validation_a_subset_does_not(
    workdir, monkeypatch):
  """With all labels validation only chooses the LR, as in SimCLR's transfer fine-tuning that
  BYOL follows (and linear_eval's refit): one more run at that LR trains on train +
  validation and its test scores are reported, the sweep's kept in per_lr. A label subset is
  the semi-supervised protocol's labelled set, which validation images would enlarge
  (ImageNet's 10,009 beside 1%'s 12,811): it reports the sweep's run. Breaks if finetune
  reports the sweep's run where the protocol refits, refits at another LR or on other
  images, or refits a subset."""
  runs, tests = [], []
  train, evaluate = finetune.Finetuner.train, finetune.Finetuner.evaluate
  monkeypatch.setattr(finetune.Finetuner, 'train', lambda self, lr: runs.append(
    (lr, len(self.labels))) or train(self, lr))
  monkeypatch.setattr(finetune.Finetuner, 'evaluate', lambda self, p, s, split: tests.append(
    evaluate(self, p, s, split)) or tests[-1])
  cfg = ft_config(subset_fraction=0.0, max_examples=600)
  cfg.finetune.batch_size = 600  # at most the training images: the sweep's 540, the refit's 600
  rec = finetune.evaluate(cfg, linear_eval.load_pretrained(cfg, workdir), workdir)
  # The record describes the run whose test figure it reports (the refit's 600 images, at
  # its batch), the sweep's under `sweep`.
  assert {k: v['size'] for k, v in rec['splits'].items()} == dict(train=600, val=60, test=600)
  assert rec['sweep']['train']['size'] == 540
  whole = jax.device_count()  # batches are multiples of the device count
  assert (rec['sweep']['batch_size'], rec['batch_size']) == (540 - 540 % whole, 600 - 600 % whole)
  assert runs == [(0.01, 540), (0.1, 540), (rec['best_lr'], 600)]
  assert rec['refit'] and rec['test_top1'] == tests[-1]['top1']
  assert [r['test_top1'] for r in rec['per_lr']] == [t['top1'] for t in tests[1:4:2]]
  runs.clear()
  subset = finetune.evaluate(ft_config(max_examples=600), linear_eval.load_pretrained(
    cfg, workdir), workdir)
  assert [n for _, n in runs] == [54, 54] and not subset['refit']
  assert subset['test_top1'] == subset['per_lr'][subset['best_index']]['test_top1']


def test_lr_is_chosen_on_validation_only():
  """Breaks if fine-tuning picks its LR on test or reports another run's test accuracy."""
  table = {(0.01, 'val'): 0.3, (0.01, 'test'): 0.9, (0.1, 'val'): 0.5, (0.1, 'test'): 0.2,
           (1.0, 'val'): 0.5, (1.0, 'test'): 0.95}

  class FakeTuner:
    def train(self, lr):
      return lr, None, {}

    def evaluate(self, lr, state, split):
      return dict(top1=table[(lr, split)], top5=1.0)

  cfg = ft_config()
  cfg.finetune.learning_rates = (0.01, 0.1, 1.0)
  out = finetune.sweep(cfg, FakeTuner(), 'val', 'test')
  assert out['best_lr'] == 0.1 and out['val_top1'] == 0.5 and out['test_top1'] == 0.2


def test_encoder_loads_from_checkpoint_and_trains_with_batch_statistics(workdir):
  """Breaks if the encoder is not the checkpoint's, BN is frozen, or the encoder never moves."""
  pre = linear_eval.load_pretrained(ft_config(), workdir)
  enc_params, enc_state = linear_eval.encoder_weights(pre.state, 'online')
  net = finetune.build_classifier(pre.config.model, 10)
  size = pre.config.image_size
  params, state = finetune.init_from_pretrained(net, (enc_params, enc_state), size, seed=0)
  for key in enc_params:
    for name in enc_params[key]:
      np.testing.assert_array_equal(params[key][name], enc_params[key][name])
  assert not np.any(params['head']['w'])

  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ('data',))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  tx = finetune.make_optimizer(1e-4, 0.9)
  step = finetune.make_train_step(net, tx, pre.config.augment, size, 10, sharding)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.integers(0, 256, (16, size, size, 3), dtype=np.uint8))
  labels = jnp.asarray(rng.integers(0, 10, 16), jnp.int32)
  copy = lambda tree: jax.tree.map(jnp.array, tree)
  new_params, new_state = copy(params), copy(state)
  opt_state = tx.init(new_params)
  for t in range(2):  # the zero head passes no gradient to the encoder in the first step
    new_params, new_state, opt_state, metrics = step(
      new_params, new_state, opt_state, jnp.int32(t), jnp.float32(0.1), images, labels,
      np.arange(8) + 8 * t, jax.random.PRNGKey(t))
  assert np.isfinite(float(metrics['loss']))
  enc_key = 'encoder/stem_conv'
  assert not np.allclose(new_params[enc_key]['w'], params[enc_key]['w'])
  ema = 'encoder/~_bn/stem_bn/~/mean_ema'
  assert not np.allclose(new_state[ema]['average'], state[ema]['average'])


def test_all_labels_excludes_the_hold_out_and_tfds_subsets_are_checked(tmp_path):
  """Breaks if 'all labels' trains on validation rows or an impossible TFDS subset is accepted."""
  labels = np.repeat(np.arange(4), 25)
  held_out = np.arange(0, 100, 10)
  rows, info = finetune.choose_rows(ft_config(subset_fraction=0.0), labels, held_out, 0,
                                    str(tmp_path))
  assert len(rows) == 90 and not set(rows) & set(held_out) and info['source'] == 'all'
  assert not os.path.exists(tmp_path / 'subsets')
  resolved = linear_eval.resolve_config(
    ft_config(subset_source='tfds', subset_fraction=0.01, dataset='imagenet2012'), tiny_config())
  sub = finetune._tfds_subset_config(resolved)
  assert (sub.dataset, sub.train_split) == ('imagenet2012_subset/1pct', 'train[:100%]')
  with pytest.raises(train.ConfigError, match='imagenet2012'):
    finetune._tfds_subset_config(linear_eval.resolve_config(
      ft_config(subset_source='tfds'), tiny_config()))
  assert json.loads(json.dumps(info))  # the subset description is JSON-ready


@pytest.mark.parametrize('field, value, message', [
  ('log_every_epochs', 0, 'log_every_epochs=0 must be >= 1'),
  ('weight_decay', -1e-4, 'weight_decay=-0.0001 must be >= 0'),
  ('momentum', 1.0, r'momentum=1.0 must be in \[0, 1\)'),
])
def test_bad_finetune_fields_are_one_line_before_any_image_is_decoded(field, value, message):
  """finetune.log_every_epochs=0 trained a whole epoch (an hour of ImageNet 10%) and then
  ended in ZeroDivisionError's traceback; a negative weight decay or a momentum of 1 or more
  trained without a word, away from the weights or without a bound. Each is one line naming
  the field, raised before any data is read (no checkpoint state is needed to get there)."""
  cfg = ft_config()
  cfg.finetune[field] = value
  pre = linear_eval.Pretrained(tiny_config(), state=None, step=0, weights='checkpoint')
  with pytest.raises(train.ConfigError, match=f'finetune.{message}'):
    finetune.evaluate(cfg, pre, '/nonexistent')
