"""Tests of the host training loop's own judgements (train.py); resume, checkpoints and
faults are in checkpointing_test.py."""

import contextlib
import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

from byol_jax import checkpointing, data, datasets, losses, train
from byol_jax.evaluators import knn as knn_lib


def _metrics(std: float) -> dict:
  return dict(proj_std=std, proj_rank=1.0 if std < 1e-3 else 40.0)


def test_collapse_warning_needs_two_logged_steps_and_comes_once(caplog):
  """One odd batch is not a collapse; a warning on every log line would bury the rest."""
  watch = train._CollapseWatch(projection_dim=256)
  with caplog.at_level('WARNING'):
    for std in (0.06, 1e-5, 0.06, 1e-5):  # never twice in a row
      watch.update(_metrics(std))
    assert 'collapsing' not in caplog.text
    for std in (1e-5, 1e-5, 1e-5, 0.06, 1e-5, 1e-5):
      watch.update(_metrics(std))
  assert caplog.text.count('the projections are collapsing') == 1


@pytest.mark.slow
def test_a_collapsing_run_warns(tmp_path, caplog, monkeypatch):
  """The loop hands its logged signals to the watch: with the step's collapse signals made
  those of a collapsed batch (a real collapse takes far longer than a test), the log says
  so once, with the causes, and training carries on to its end."""
  def collapsed(projections, axis_name=None):
    return dict(proj_std=jnp.float32(0.0) * jnp.sum(projections), proj_rank=jnp.float32(1.0))

  monkeypatch.setattr(losses, 'collapse_signals', collapsed)
  with caplog.at_level('WARNING'):
    result = train.train_and_evaluate(tiny_config(steps=6), str(tmp_path))
  assert result['train']['proj_std'] == 0.0 and result['train']['step'] == 6
  assert caplog.text.count('the projections are collapsing') == 1, caplog.text[-3000:]
  assert 'Adam or a much too high learning rate' in caplog.text


@pytest.mark.parametrize('field, value, says', [
  ('model.width', 0.0, 'model.width=0.0 must be positive'),
  ('model.projection_dim', 0, 'model.projection_dim=0 must be positive'),
  ('image_size', 4, 'image_size=4 must be at least 8'),
  ('knn.k', 0, 'knn.k=0 must be positive'),
  ('model.bn_decay', 1.5, 'model.bn_decay=1.5 must be in [0, 1)'),  # statistics diverged
  ('model.bn_eps', 0.0, 'model.bn_eps=0.0 must be positive'),  # NaN on a constant channel
  ('tau_base', 1.5, 'tau_base=1.5 must be in [0, 1]'),
  ('optimizer.weight_decay', -1.0, 'optimizer.weight_decay=-1.0'),
  ('optimizer.momentum', 1.0, 'optimizer.momentum=1.0 must be in [0, 1)'),
  ('augment.mean', (0.5, 0.5), 'augment.mean=(0.5, 0.5) must hold 3 numbers'),
  ('pretrain_split', 'unlabelled', "pretrain_split='unlabelled': demo datasets have the splits"),
  ('pretrain_split', 'valid', "pretrain_split='valid': the demo pretrains on"),  # traceback
  ('steps', -3, 'steps=-3 must be >= 0'),  # it trained nothing and said a checkpoint was final
  ('input_mode', 'gpu', "input_mode='gpu'; valid: auto, device, stream"),  # demo ignored it
  ('eval_every_steps', -1, 'eval_every_steps=-1 must be >= 0'),  # kNN after every step
  ('log_every_steps', 0, 'log_every_steps=0 must be >= 1'),  # logged every step
  # A traceback once the data was loaded (an unknown init), a ZeroDivisionError, or
  # silently cropping past the image / a zero softmax temperature.
  ('model.weight_init', 'torch', "model.weight_init='torch'; valid: release, he_fan_out"),
  ('target_init', 'cpy', "target_init='cpy'; valid: random, copy"),
  ('eval_crop_fraction', 0.0, 'eval_crop_fraction=0.0 must be in (0, 1]'),
  ('eval_crop_fraction', 1.5, 'eval_crop_fraction=1.5 must be in (0, 1]'),
  ('infonce_temperature', 0.0, 'infonce_temperature=0.0 must be positive'),
  ('knn.train_examples', -3, 'knn.train_examples=-3 must be >= 0'),  # dropped the last 3
  ('knn.batch_size', 0, 'knn.batch_size=0 must be positive'),  # embedded one image a call
])
def test_nonsense_values_are_config_errors(field, value, says):
  """Each of these either failed deep in tracing with a traceback (a zero projection
  size, a tiny image) or trained silently on nonsense (tau above 1 extrapolates the EMA,
  negative weight decay grows the weights, k=0 neighbours)."""
  with pytest.raises(train.ConfigError) as e:
    train.validate(tiny_config(**{field: value}), 1)
  assert says in str(e.value)


def test_pretraining_on_test_images_is_allowed_with_a_warning(caplog):
  """Transductive pretraining is a choice some make, so it is not refused, but a user who
  typed 'train+test' must learn that the evaluation is no longer held out."""
  with caplog.at_level('WARNING'):
    train.validate(tiny_config(pretrain_split='test'), 1)
  assert "pretrain_split='test' takes images of demo's test split" in caplog.text
  caplog.clear()
  with caplog.at_level('WARNING'):
    train.validate(tiny_config(), 1)
  assert 'test split' not in caplog.text


def test_an_evaluation_config_given_to_the_trainer_or_eval_worker_is_one_line(tmp_path):
  """configs/linear_eval.py passed to --worker_mode=train or eval failed on its first
  missing field with a traceback; the converse case already said which config to use."""
  from byol_jax import eval_worker
  from configs import linear_eval as linear_configs
  cfg = linear_configs.get_config('demo')
  for run in (train.train_and_evaluate, eval_worker.run):
    with pytest.raises(train.ConfigError, match='needs a pretraining config: --config=configs/'
                       'byol.py:PRESET'):
      run(cfg, str(tmp_path / 'w'))
  assert not os.path.exists(tmp_path / 'w')


def test_every_preset_passes_validation():
  """The checks must not reject what the presets ship."""
  from configs import ablation, byol
  for name in byol.PRESETS:
    train.validate(byol.get_config(name), 1)
  for name in ablation.VARIANTS:
    train.validate(ablation.get_config(name), 1)


def test_resident_data_smaller_than_a_batch_is_a_data_error(tmp_path):
  """A small image folder (or demo size) below one batch failed inside the traced sampler.
  A start that fails on its data must not leave a config.json that reads as a run."""
  cfg = tiny_config(**{'demo.train_examples': 10})
  with pytest.raises(datasets.DataError, match='10 training images, fewer than one batch of 16'):
    data.make_train_data(cfg)
  with pytest.raises(datasets.DataError):
    train.train_and_evaluate(cfg, str(tmp_path))
  assert not os.path.exists(tmp_path / 'config.json')


@pytest.mark.slow
def test_init_from_starts_a_new_schedule_from_an_earlier_runs_networks(pretrained_workdir,
                                                                          tmp_path):
  """`init_from` must hand the earlier run's networks to a new run: its first kNN is the
  earlier run's last, and with tau held at 1 its target stays the earlier target. The new
  run counts its own steps, and once it has checkpoints it resumes from them, whatever
  init_from then says. Breaks if the fresh init were kept, or a resume reloaded the source."""
  cfg = tiny_config(init_from=pretrained_workdir, steps=2, eval_at_init=True, tau_base=1.0,
                    tau_schedule='constant')
  result = train.train_and_evaluate(cfg, str(tmp_path))
  with open(f'{pretrained_workdir}/metrics/eval.jsonl') as f:
    source_knn = [json.loads(line) for line in f][-1]['knn_top1']
  assert result['eval']['knn_top1_init'] == source_knn
  new, _, step = checkpointing.load_state(str(tmp_path))
  old, _, old_step = checkpointing.load_state(pretrained_workdir)
  assert (step, old_step) == (2, 4)
  for module, values in old.target_params.items():
    if module != 'probe':
      for name, value in values.items():
        np.testing.assert_array_equal(new.target_params[module][name], value)
  cfg.init_from = str(tmp_path / 'gone')
  assert train.train_and_evaluate(cfg, str(tmp_path))['start_step'] == 2


def test_init_from_without_a_checkpoint_fails_before_loading_data(tmp_path, monkeypatch):
  """A wrong init_from path must be a one-line config error before any data is read."""
  monkeypatch.setattr(data, 'make_train_data', lambda *a, **k: pytest.fail('data was loaded'))
  cfg = tiny_config(init_from=str(tmp_path / 'nothing'))
  with pytest.raises(train.ConfigError, match=r'^init_from=.*nothing: no finalised checkpoint'):
    train.train_and_evaluate(cfg, str(tmp_path / 'run'))
  # A checkpoint's own folder (what `ls checkpoints/` shows) is named for what it is.
  cfg.init_from = str(tmp_path / 'old' / 'checkpoints' / '300')
  with pytest.raises(train.ConfigError,
                     match=rf'is checkpoint step 300 of the run {tmp_path}/old: pass the run '
                           rf'and the step, --config.init_from={tmp_path}/old '
                           rf'--config.init_from_step=300\)$'):
    train.train_and_evaluate(cfg, str(tmp_path / 'run'))


def test_init_from_another_network_fails_before_loading_data_naming_its_model(
    pretrained_workdir, tmp_path, monkeypatch):
  """A source whose network does not fit (here its heads have no last bias, where this run's
  do) must fail before data is loaded, which can take minutes on a real dataset, and name
  the source's model flags that would fit."""
  monkeypatch.setattr(data, 'make_train_data', lambda *a, **k: pytest.fail('data was loaded'))
  cfg = tiny_config(init_from=pretrained_workdir, **{'model.head_output_bias': True})
  with pytest.raises(train.ConfigError) as e:
    train.train_and_evaluate(cfg, str(tmp_path / 'run'))
  message = str(e.value)
  assert message.startswith(f'init_from={pretrained_workdir}: its online_params do not fit')
  assert 'projector/linear_1/b missing there' in message
  assert message.endswith('; its model: --config.model.head_output_bias=False'), message


@pytest.mark.parametrize('field', ['workdir', 'init_from'])
def test_a_url_workdir_or_init_from_is_refused_from_python_too(field, tmp_path, monkeypatch):
  """A notebook calling train_and_evaluate with gs://... must get the CLI's one-line error,
  not a local folder named 'gs:' (makedirs takes the URL as a relative path)."""
  monkeypatch.chdir(tmp_path)
  cfg = tiny_config(init_from='gs://bucket/old' if field == 'init_from' else '')
  workdir = 'gs://bucket/run' if field == 'workdir' else str(tmp_path / 'run')
  with pytest.raises(train.ConfigError, match=r"'gs://bucket/\w+' is a URL"):
    train.train_and_evaluate(cfg, workdir)
  assert not (tmp_path / 'gs:').exists()


def test_a_second_trainer_in_the_same_workdir_stops_at_once_naming_the_first(tmp_path,
                                                                              monkeypatch):
  """While one trainer holds a workdir, another must stop before touching it (its resume
  would set aside or truncate what the first writes), naming the holder; the lock must be
  free again once the holder is done. Breaks without the lock, or if it were never released."""
  monkeypatch.setattr(data, 'make_train_data', lambda *a, **k: pytest.fail('data was loaded'))
  with train._trainer_lock(str(tmp_path)):
    with pytest.raises(train.WorkdirBusy, match=rf'in use by another trainer \(host .+, pid '
                       rf'{os.getpid()}, since .+\); stop it first'):
      train.train_and_evaluate(tiny_config(), str(tmp_path))
  with train._trainer_lock(str(tmp_path)):
    pass


def test_a_streamed_run_trains_evaluates_and_resumes(png_folder, tmp_path, monkeypatch):
  """The ImageNet path end to end on a small folder: tf.data batches into the streaming step,
  kNN read through tf.data (never a decoded split), checkpoints, and a resume that goes on
  from the saved step to the end of the schedule."""
  def no_decoding(*args, **kwargs):
    raise AssertionError('a streamed run decoded a whole split')
  monkeypatch.setattr(data, 'load_split', no_decoding)
  cfg = tiny_config(dataset=png_folder, input_mode='stream', steps=4, batch_size=4,
                    eval_every_steps=2, eval_crop_fraction=1.0)
  cfg.checkpoint.every_steps = 2
  result = train.train_and_evaluate(cfg, str(tmp_path))
  assert result['start_step'] == 0 and 0.0 <= result['eval']['knn_top1'] <= 1.0
  assert np.isfinite(result['train']['loss']) and 'knn_top1_init' in result['eval']
  evals = [json.loads(line) for line in open(tmp_path / 'metrics' / 'eval.jsonl')]
  assert [r['step'] for r in evals] == [2, 4]
  import shutil  # resume from step 2: the run goes on to its end from there
  for step in checkpointing.scan(str(tmp_path)).finalised:
    if step > 2:
      shutil.rmtree(os.path.join(checkpointing.checkpoint_dir(str(tmp_path)), str(step)))
  again = train.train_and_evaluate(cfg, str(tmp_path))
  assert again['start_step'] == 2 and again['eval']['knn_top1'] == result['eval']['knn_top1']


def test_streamed_batches_reach_the_devices_one_step_ahead():
  """Issue 6: input prefetched to the devices ahead of the step. The step's inputs must be
  device arrays sharded over the data axis, in stream order, with the next batch already
  taken from the stream (its copy overlapping the current step), and no further."""
  from byol_jax import train_step
  consumed = []

  def stream():
    for i in range(5):
      consumed.append(i)
      yield {'views': np.full((8, 2, 4, 4, 3), i, np.uint8), 'labels': np.full((8,), i)}

  mesh = train_step.make_mesh()
  inputs = train._input_fn(data.TrainData('stream', 40, 10, None, stream()), mesh)
  assert consumed == []  # nothing is read before the first step asks
  for step in range(1, 4):
    views, labels = inputs(step)
    assert isinstance(views, jax.Array) and tuple(views.sharding.spec) == (train_step.AXIS,)
    assert int(views[0, 0, 0, 0, 0]) == int(labels[0]) == step - 1
    assert len(consumed) == step - 1 + train.STREAM_PREFETCH


@pytest.mark.slow
def test_unlabelled_images_train_byol_but_stay_out_of_knn(stl10_dir, tmp_path):
  """STL-10's protocol: pretrain on 'unlabelled+train', kNN against the labelled train
  images. Breaks if the pretraining split is not the configured one, or label -1 enters the
  kNN reference set (resident or streamed) or crashes it."""
  from byol_jax import train_step
  cfg = tiny_config(dataset='stl10', data_dir=stl10_dir, pretrain_split='unlabelled+train',
                    batch_size=8, eval_crop_fraction=1.0)
  result = train.train_and_evaluate(cfg, str(tmp_path))
  assert checkpointing.read_metadata(str(tmp_path), 4)['num_examples'] == 32
  assert 0.0 <= result['eval']['knn_top1'] <= 1.0 and np.isfinite(result['train']['probe_loss'])
  mesh = train_step.make_mesh()
  for streamed in (False, True):
    knn = knn_lib.KnnEval(cfg, mesh, None, streamed=streamed)
    knn.features(result['state'].online_params, result['state'].online_state)
    assert sorted(knn.train_labels) == [0] * 4 + [1] * 4 + [2] * 4, streamed
    assert len(knn.test_labels) == 6 and not knn.unavailable
  # The 20 unlabelled images come first: a first-N kNN subset counts labelled images only
  # (streamed, it used to take the first 6 images, all unlabelled, and turn kNN off).
  cfg.knn.train_examples = 6
  firsts = []
  for streamed in (False, True):
    knn = knn_lib.KnnEval(cfg, mesh, None, streamed=streamed)
    features, _ = knn.features(result['state'].online_params, result['state'].online_state)
    assert len(features) == len(knn.train_labels) == 6 and not knn.unavailable, streamed
    firsts.append(list(knn.train_labels))
  assert firsts[0] == firsts[1]


@pytest.mark.parametrize('input_mode', [
  'device', pytest.param('stream', marks=pytest.mark.slow)])
def test_a_dataset_without_labels_trains_without_knn(stl10_dir, tmp_path, caplog, input_mode):
  """Pretraining on images without classes (STL-10's 'unlabelled' alone, VOC): BYOL needs
  no labels, so the run must train and checkpoint, say once why kNN is off and write no
  kNN record, where it used to stop at the first evaluation with a traceback. (Streamed, the
  missing labels show only when the first kNN pass has read the split.)"""
  cfg = tiny_config(dataset='stl10', data_dir=stl10_dir, pretrain_split='unlabelled',
                    batch_size=8, eval_every_steps=2, input_mode=input_mode)
  with caplog.at_level(logging.WARNING):
    result = train.train_and_evaluate(cfg, str(tmp_path))
  assert result['eval'] == {} and np.isfinite(result['train']['loss'])
  assert checkpointing.scan(str(tmp_path)).finalised == [4]
  assert not os.path.exists(tmp_path / 'metrics' / 'eval.jsonl')
  said = [r.getMessage() for r in caplog.records if 'kNN evaluation is off' in r.getMessage()]
  assert len(said) == 1 and 'stl10[unlabelled]' in said[0] and 'linear_eval' in said[0]


def test_a_stop_signal_is_acknowledged_at_once(capfd):
  """Ctrl-C during the first step's compilation (seconds on the demo, minutes for big models
  on a CPU) was answered only once the step had run: the terminal looked frozen. The handler
  says at once what will happen."""
  import signal
  with train._Preemption() as preemption:
    os.kill(os.getpid(), signal.SIGINT)
    assert preemption.signal_name == 'SIGINT'
  err = capfd.readouterr().err
  assert err.startswith('SIGINT: stopping after the steps already queued (at most one log '
                        'interval), then saving'), err


@pytest.mark.parametrize('signum, reason', [('SIGINT', 'interrupted'),
                                             ('SIGTERM', 'preemption')])
def test_the_checkpoint_line_says_why_the_run_stopped(signum, reason, capfd):
  """After Ctrl-C the log said 'checkpoint of step N started (preemption)': a user's own
  interruption is said as such, and SIGTERM (a scheduler's) stays a preemption."""
  import signal

  from ml_collections import ConfigDict
  with train._Preemption() as preemption:
    assert preemption.reason == 'preemption'  # no signal: another process's, via JAX
    os.kill(os.getpid(), getattr(signal, signum))
    assert preemption.reason == reason
  capfd.readouterr()
  clock = train._SaveClock(ConfigDict(dict(every_steps=0, every_secs=0)), 10, 5)
  assert clock.reason(3, preemption.reason) == reason
  assert clock.reason(3, None) is None and clock.reason(10, None) == 'end of training'


def test_the_metrics_are_awaited_where_a_signal_is_handled(monkeypatch):
  """The trainer waits for a logged step's metrics, up to a log interval of queued steps. In
  jax.device_get's wait Python ran no signal handler: Ctrl-C right after the demo's step-10
  line (log_every_steps=5) was answered 3.8 s later, and a second one in the wait was lost.
  `fetch` waits in short sleeps and hands device_get only finished arrays. Breaks if it
  calls device_get on arrays still being computed (the CPU computes asynchronously)."""
  @jax.jit
  def slow(x):
    y = jax.lax.fori_loop(0, 20, lambda i, y: jnp.tanh(y @ y), x)
    return {'loss': jnp.sum(y), 'steps': jnp.int32(3)}

  x = jnp.full((1000, 1000), 1e-3)
  expected = jax.device_get(slow(x))  # also compiles it
  ready_when_read, device_get = [], jax.device_get

  def recording_device_get(tree):
    ready_when_read.append(all(a.is_ready() for a in jax.tree.leaves(tree)))
    return device_get(tree)

  monkeypatch.setattr(jax, 'device_get', recording_device_get)
  assert train.fetch(slow(x)) == expected
  assert ready_when_read == [True]


@pytest.mark.slow
def test_a_resumed_run_keeps_the_encoder_at_initialisation_beside_its_evaluations(tmp_path):
  """The `*_init` kNN figures were measured at the start and written only beside later
  evaluations: a run stopped before its first one (the demo evaluates at its end only, so
  any Ctrl-C) lost the baseline for good, in eval.jsonl, the plots and results_table."""
  import shutil
  cfg = tiny_config(steps=4, eval_every_steps=0)
  cfg.checkpoint.every_steps = 2
  first = train.train_and_evaluate(cfg, str(tmp_path))
  init = {k: v for k, v in first['eval'].items() if k.endswith('_init')}
  assert init, first['eval']
  # As if stopped after the save of step 2: the resume's evaluation is the only one.
  shutil.rmtree(os.path.join(checkpointing.checkpoint_dir(str(tmp_path)), '4'))
  os.remove(tmp_path / 'metrics' / 'eval.jsonl')
  again = train.train_and_evaluate(cfg, str(tmp_path))
  assert again['start_step'] == 2
  assert {k: again['eval'].get(k) for k in init} == init
  (record,) = [json.loads(line) for line in open(tmp_path / 'metrics' / 'eval.jsonl')]
  assert record['step'] == 4 and record['knn_top1_init'] == init['knn_top1_init']


@pytest.mark.slow
def test_a_resumed_run_counts_its_wall_time_from_the_checkpoint_not_from_zero(tmp_path):
  """`elapsed_sec` (results_table's wall time column) restarted at 0 with every resume, so a
  preempted run's table said it trained in a fraction of its time. The training time behind
  each checkpoint is kept in its metadata and the resumed run goes on from it."""
  import shutil
  cfg = tiny_config(steps=4, eval_every_steps=0)
  cfg.checkpoint.every_steps = 2
  train.train_and_evaluate(cfg, str(tmp_path))
  saved = {s: checkpointing.read_metadata(str(tmp_path), s)['train_sec'] for s in (2, 4)}
  assert 0 < saved[2] < saved[4], saved
  shutil.rmtree(os.path.join(checkpointing.checkpoint_dir(str(tmp_path)), '4'))
  os.remove(tmp_path / 'metrics' / 'eval.jsonl')
  time_before = time.time()
  again = train.train_and_evaluate(cfg, str(tmp_path))
  resumed_for = time.time() - time_before
  assert again['start_step'] == 2
  assert saved[2] < again['eval']['elapsed_sec'] < saved[2] + resumed_for
  assert checkpointing.read_metadata(str(tmp_path), 4)['train_sec'] > saved[2]


@pytest.mark.slow
def test_a_start_that_saved_no_checkpoint_leaves_no_records_behind(tmp_path):
  """A first start stopped before its first checkpoint (Ctrl-C twice, a crash, kill -9: the
  demo saves at step 100, the ImageNet presets after 10 minutes) left its records in
  train.jsonl and eval.jsonl, and the rerun appended its own: every step twice in the
  loss plot, results_table's images/s a median over both starts (two configs' if the rerun
  changed one). A rerun from step 0 starts the files afresh, as a resume cuts them at its
  step."""
  os.makedirs(tmp_path / 'metrics')
  for name in ('train', 'eval'):  # what a start killed before its first save left
    with open(tmp_path / 'metrics' / f'{name}.jsonl', 'w') as f:
      f.writelines(json.dumps({'step': s, 'dead_start': True}) + '\n' for s in (2, 4))
  train.train_and_evaluate(tiny_config(steps=4, eval_every_steps=2), str(tmp_path))
  for name in ('train', 'eval'):
    records = train._read_records(os.path.join(tmp_path, 'metrics', f'{name}.jsonl'))
    assert [r['step'] for r in records] == [2, 4] and not any('dead_start' in r
                                                              for r in records), records


def test_a_resume_on_another_dataset_is_refused_before_that_dataset_is_looked_up(
    pretrained_workdir, tmp_path):
  """The resume check needs the number of classes, which was looked up in the new dataset
  first: `--config.dataset=cifar10` on a demo run's workdir said 'cifar10 is not
  prepared, run tfds build', and once prepared, that the workdir holds another run."""
  import shutil
  run = shutil.copytree(pretrained_workdir, tmp_path / 'run')  # a demo run (conftest)
  other = tiny_config(dataset='cifar10', data_dir=str(tmp_path / 'no_tfds_here'),
                      eval_at_init=False)
  with pytest.raises(train.ConfigError, match=r"another setup.*dataset \('demo' -> 'cifar10'\)"):
    train.train_and_evaluate(other, str(run))


@pytest.mark.slow
def test_a_resumed_folder_with_another_number_of_classes_is_one_line(png_folder, tmp_path):
  """The restore template takes the checkpoint's class count; a folder that has gained a
  class since must not reach the step with a probe of the wrong shape."""
  import shutil
  root = tmp_path / 'images'
  shutil.copytree(png_folder[len('folder:'):], root)
  cfg = tiny_config(steps=2, dataset=f'folder:{root}', eval_at_init=False, eval_every_steps=0)
  cfg.batch_size = 8
  train.train_and_evaluate(cfg, str(tmp_path / 'run'))
  for split in ('train', 'test'):
    shutil.copytree(root / split / 'c0', root / split / 'c3')
  with pytest.raises(train.ConfigError, match='now has 4 classes.*trained on 3'):
    train.train_and_evaluate(cfg, str(tmp_path / 'run'))


def test_a_start_refused_as_busy_leaves_the_holders_new_workdir(tmp_path, monkeypatch):
  """Two trainers started at once on a new workdir both find it missing; the second is
  refused by the first's lock. That refusal is no mistake of its own start: it must not
  remove the holder's lock file (a third trainer then got in) nor the folder the holder
  trains in (rmdir took it while the holder was still loading its data)."""
  monkeypatch.setattr(data, 'make_train_data', lambda *a, **k: pytest.fail('data was loaded'))
  workdir = tmp_path / 'runs' / 'new'
  prepare, holder = train.prepare_workdir, contextlib.ExitStack()

  def the_other_trainer_gets_in_first(path: str) -> None:
    prepare(path)
    holder.enter_context(train._trainer_lock(path))
  monkeypatch.setattr(train, 'prepare_workdir', the_other_trainer_gets_in_first)
  with holder, pytest.raises(train.WorkdirBusy):
    train.train_and_evaluate(tiny_config(), str(workdir))
  assert (workdir / '.trainer.lock.0').exists(), 'the holder lost its workdir or its lock'


@pytest.mark.parametrize('dataset', ['demo', 'imagenet2012', 'cifar10', 'cifar100:3.0.2',
                                     'voc/2007', 'stl10', 'folder:/data/flowers', 'voc/2012'])
def test_the_done_line_suggests_a_linear_eval_command_that_evaluates_the_runs_data(dataset):
  """The 'done:' line guessed the linear_eval preset from the dataset's name: a run on stl10
  or an image folder was told --config=configs/linear_eval.py:stl10 (or :PRESET), which
  linear_eval refuses ('unknown preset'). The suggested preset must load, and with its
  overrides evaluate the run's own data. Breaks if a dataset without a preset is named as
  one, or a preset of another dataset is suggested without `--config.dataset=`."""
  import re

  from configs import byol
  from configs import linear_eval as eval_configs
  cfg = byol.get_config('demo')
  cfg.dataset = dataset
  line = train.closing_line(cfg, 'runs/x', 5, {})
  match = re.search(r'--config=configs/linear_eval\.py:(\S+)((?: --config\.\S+=\S*)*) '
                    r'--worker_mode=linear_eval', line)
  assert match, line
  evaluation = eval_configs.get_config(match.group(1))  # ValueError: the command fails
  for override in match.group(2).split():
    key, value = override[len('--config.'):].split('=', 1)
    evaluation[key] = value
  evaluated = evaluation.dataset or dataset  # '' takes the run's
  same = (datasets.tfds_base_name(evaluated) == 'imagenet2012' if dataset == 'imagenet2012'
          else evaluated == dataset or evaluated == datasets.tfds_base_name(dataset))
  assert same, (line, evaluated)


def test_a_finished_run_ends_with_where_it_is_and_what_comes_next(monkeypatch, caplog,
                                                                    capfd):
  """The demo's last line was 'checkpoint of step 300 started (end of training)'. A run
  that finishes ends with one line: its folder, its final kNN and the next commands (eval
  worker, linear_eval, plot). A stopped run ends with its resume line instead."""
  from configs import byol
  cfg = byol.get_config('demo')
  result = dict(train={}, eval={'knn_top1': 0.4123}, state=None, preempted=None,
                start_step=0, signal=None, step=300)
  monkeypatch.setattr(train, 'train_and_evaluate', lambda cfg, workdir: result)
  with caplog.at_level(logging.INFO):
    assert train.run(cfg, 'runs/demo') == 0
  assert caplog.records[-1].getMessage() == (
    'done: runs/demo holds the final checkpoint (step 300), final kNN top-1 0.412. Next: this '
    'command with --worker_mode=eval, or --config=configs/linear_eval.py:demo '
    '--worker_mode=linear_eval; plots: python -m byol_jax.plot --workdir=runs/demo')
  assert train.closing_line(byol.get_config('r50'), 'runs/r50', 5, {}).startswith(
    'done: runs/r50 holds the final checkpoint (step 5). Next: this command with '
    '--worker_mode=eval, or --config=configs/linear_eval.py:imagenet ')
  caplog.clear()
  result.update(preempted=120, signal='SIGINT', step=120)
  with caplog.at_level(logging.INFO):
    assert train.run(cfg, 'runs/demo') == 0
  assert not [r for r in caplog.records if r.getMessage().startswith('done:')]
  assert capfd.readouterr().err.startswith('SIGINT: saved checkpoint step 120')
