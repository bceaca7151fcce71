"""Tests of the evaluation worker that follows a trainer's checkpoints."""

import os
import shutil
import subprocess
import sys
import tempfile
import time

import orbax.checkpoint as ocp
import pytest
from checkpointing_test import (
  IGNORE_ORBAX_CLOSED_LOOP,
  NUM_STEPS,
  RUN_FLAGS,
  finish,
  run_flags,
  start,
  subprocess_env,
  wait_for,
)
from conftest import REPO, tiny_config

from byol_jax import checkpointing, eval_worker, train


def start_worker(workdir, **overrides):
  flags = {'eval_poll_secs': 0.2, 'eval_idle_timeout_secs': 300.0, **overrides}
  log = open(os.path.join(tempfile.mkdtemp(), 'stderr.txt'), 'w+')
  proc = subprocess.Popen(
    [sys.executable, '-m', 'byol_jax.main', '--config=configs/byol.py:demo',
     '--worker_mode=eval', *run_flags(workdir, **flags)],
    cwd=REPO, stdout=subprocess.DEVNULL, stderr=log, env=subprocess_env())
  proc.log = log
  return proc


def log_text(proc):
  proc.log.seek(0)
  return proc.log.read()


def records(workdir, name='eval_worker'):
  return train._read_records(os.path.join(workdir, 'metrics', f'{name}.jsonl'))


@pytest.fixture(scope='module')
def followed_run(tmp_path_factory):
  """A worker started on an empty workdir, then the trainer; returns the workdir and logs."""
  workdir = str(tmp_path_factory.mktemp('run'))
  worker = start_worker(workdir, eval_at_init=True)
  wait_for(lambda: 'eval worker: following' in log_text(worker), proc=worker)
  unfinished = os.path.join(workdir, 'checkpoints', '5' + ocp.path.step.TMP_DIR_SUFFIX)
  os.makedirs(os.path.join(unfinished, 'state'))
  wait_for(lambda: 'skipping unfinished checkpoint 5.orbax' in log_text(worker), proc=worker)
  trainer = start(workdir)
  trainer_code, trainer_log = finish(trainer)
  worker_code, worker_log = finish(worker)
  assert trainer_code == 0, trainer_log[-3000:]
  return workdir, worker_code, worker_log


def test_worker_started_first_evaluates_each_checkpoint_once(followed_run):
  """A worker started first must evaluate every finalised step once, then exit 0 at the end.

  It waits for the trainer, skips an unfinished save, records kNN and probe accuracy, and
  its final kNN equals the trainer's own evaluation of the same state. With eval_at_init it
  records the initial encoder first (step 0, BN statistics recalibrated, no probe). Every
  record names the checkpoint step, dataset, split, protocol and network it measured.
  """
  workdir, code, log = followed_run
  assert code == 0, log[-3000:]
  assert 'evaluated the final step 8; done' in log
  got = records(workdir)
  assert [r['step'] for r in got] == [0, 2, 4, 6, NUM_STEPS]
  for r in got:
    assert (r['checkpoint_step'], r['dataset'], r['split'], r['network']) == (
      r['step'], 'demo', 'test', 'online')
    assert (r['knn_k'], r['train_examples'], r['test_examples']) == (10, 64, 32)
    assert 0.0 <= r['knn_top1'] <= r['knn_top5'] <= 1.0
    # Its log line leads with the scores, as recorded (a user reads the line for them).
    assert f"eval worker: step {r['step']}: knn_top1 {r['knn_top1']:.4f}  knn_top5 " in log
  initial, *trained = got
  assert (initial['weights'], initial['protocol'], initial['probe_top1']) == (
    'random_init', 'knn', None)
  assert initial['bn_statistics'] == 'recalibrated on 64 training images of demo/train'
  for r in trained:
    assert (r['weights'], r['protocol'], r['bn_statistics']) == (
      'checkpoint', 'knn+online_probe', 'checkpoint')
    assert 0.0 <= r['probe_top1'] <= 1.0
  inline = records(workdir, 'eval')[-1]
  assert inline['step'] == NUM_STEPS
  assert got[-1]['knn_top1'] == pytest.approx(inline['knn_top1'])


def _worker_cfg(**overrides):
  return tiny_config(**{**RUN_FLAGS, 'eval_poll_secs': 0.05, 'eval_idle_timeout_secs': 1.0,
                        **overrides})


@IGNORE_ORBAX_CLOSED_LOOP
def test_worker_skips_damaged_and_vanishing_checkpoints_and_remembers(followed_run, tmp_path,
                                                                      monkeypatch, caplog):
  """Damaged or vanishing checkpoints must be skipped, not crash; a restart must not redo work.

  A truncated newest checkpoint and one deleted while being read are logged and skipped;
  without the final step the worker stops after the idle timeout; a restarted worker
  rereads its records and evaluates nothing twice.
  """
  workdir = str(tmp_path / 'run')
  shutil.copytree(followed_run[0], workdir)
  os.remove(os.path.join(workdir, 'metrics', 'eval_worker.jsonl'))
  state_dir = os.path.join(workdir, 'checkpoints', '8', 'state')
  data = max((os.path.join(d, f) for d, _, files in os.walk(state_dir) for f in files
              if f'{os.sep}d{os.sep}' in os.path.join(d, f)), key=os.path.getsize)
  with open(data, 'r+b') as f:
    f.truncate(os.path.getsize(data) // 2)
  read_state = checkpointing._read_state

  def deleted_while_reading(path, *args):
    if path.endswith(f'{os.sep}6'):
      shutil.rmtree(path)
    return read_state(path, *args)

  monkeypatch.setattr(checkpointing, '_read_state', deleted_while_reading)
  with caplog.at_level('INFO'):
    assert eval_worker.run(_worker_cfg(), workdir) == eval_worker.IDLE_EXIT
  assert [r['step'] for r in records(workdir)] == [2, 4]
  assert 'skipping checkpoint step 6: checkpoint step 6 was deleted while being read' in caplog.text
  assert 'skipping checkpoint step 8' in caplog.text

  caplog.clear()
  with caplog.at_level('INFO'):
    assert eval_worker.run(_worker_cfg(), workdir) == eval_worker.IDLE_EXIT
  assert 'already evaluated steps [2, 4]' in caplog.text
  assert [r['step'] for r in records(workdir)] == [2, 4]


def test_a_worker_started_again_on_an_evaluated_run_ends_at_once(followed_run, tmp_path,
                                                                   caplog):
  """Repeating the README's eval command on a finished, evaluated run used to wait the whole
  idle timeout (an hour by default) for a checkpoint that never comes, then exit 75. The
  final step comes from the newest checkpoint's metadata, and nothing is evaluated twice."""
  workdir = str(tmp_path / 'run')
  shutil.copytree(followed_run[0], workdir)
  before = records(workdir)
  with caplog.at_level('INFO'):
    assert eval_worker.run(_worker_cfg(eval_idle_timeout_secs=30.0), workdir) == 0
  assert f'evaluated the final step {NUM_STEPS}; done' in caplog.text
  assert records(workdir) == before


def test_target_network_gets_its_own_records(followed_run, tmp_path):
  """eval_network='target' must evaluate the target encoder into its own records (no probe).
  Its k (above the 64 reference images) is recorded as used: it said 100 while 64 voted."""
  workdir = str(tmp_path / 'run')
  shutil.copytree(followed_run[0], workdir)
  for step in (2, 4, 6):
    shutil.rmtree(os.path.join(workdir, 'checkpoints', str(step)))
  assert eval_worker.run(_worker_cfg(eval_network='target', **{'knn.k': 100}), workdir) == 0
  (record,) = records(workdir, 'eval_worker_target')
  assert (record['knn_k'], record['train_examples']) == (64, 64)
  assert record['step'] == record['checkpoint_step'] == NUM_STEPS
  assert (record['network'], record['protocol']) == ('target', 'knn')
  assert record['probe_top1'] is None and 0.0 <= record['knn_top1'] <= 1.0


def test_names_and_config_for_another_dataset():
  """A worker on another dataset must keep the run's model, use its data, name its file."""
  cfg = _worker_cfg(eval_dataset='tfds:cifar10', data_dir='/data', **{'knn.k': 7})
  assert eval_worker.metrics_name(cfg) == 'eval_worker_tfds_cifar10'
  assert eval_worker.metrics_name(_worker_cfg(eval_network='target')) == 'eval_worker_target'
  saved = tiny_config(**{'model.projection_dim': 12})
  out = eval_worker.eval_config(saved, cfg)
  assert (out.dataset, out.data_dir, out.knn.k) == ('tfds:cifar10', '/data', 7)
  assert out.model.projection_dim == 12 and out.image_size == saved.image_size


def test_a_dataset_without_labels_is_one_line_naming_linear_eval(followed_run, voc_dir,
                                                                 tmp_path):
  """The worker evaluates by kNN, which needs labels: pointed at VOC2007 (class sets, no
  single label) it must stop with what to use instead, where it used to raise a traceback
  from deep in the kNN code."""
  workdir = str(tmp_path / 'run')
  shutil.copytree(followed_run[0], workdir)
  cfg = _worker_cfg(eval_dataset='voc/2007', data_dir=voc_dir)
  with pytest.raises(train.ConfigError, match=r'no kNN evaluation: voc/2007\[trainval\] and '
                     r'voc/2007\[test\] have no labelled images.*linear_eval.py:voc2007'):
    eval_worker.run(cfg, workdir)
  assert eval_worker.eval_config(tiny_config(pretrain_split='unlabelled'),
                                 cfg).pretrain_split == 'trainval'


def test_bad_network_is_a_config_error(tmp_path):
  """An unknown eval_network must fail at once, listing the valid choices."""
  with pytest.raises(train.ConfigError, match='online, target'):
    eval_worker.run(_worker_cfg(eval_network='ema'), str(tmp_path))
  # It evaluated with them: a negative count left reference images out, k=0 had no neighbour.
  for knn, says in ((dict(train_examples=-3), 'knn.train_examples=-3 must be >= 0'),
                    (dict(k=0), 'knn.k=0 must be positive')):
    cfg = _worker_cfg()
    cfg.knn.update(knn)
    with pytest.raises(train.ConfigError, match=says):
      eval_worker.run(cfg, str(tmp_path))


def test_a_worker_waiting_for_a_mistyped_workdir_says_so_and_creates_nothing(
    tmp_path, monkeypatch, caplog):
  """A --workdir typo used to look like a trainer that had not saved yet: an hour of silence,
  and the mistyped folder created (metrics/, tensorboard/). Now the worker says what it
  waits for, repeats it while waiting, and leaves the path alone."""
  missing = str(tmp_path / 'runs' / 'typo')
  monkeypatch.setattr(eval_worker, 'WAITING_NOTICE_SECS', 0.3)
  with caplog.at_level('INFO'):
    assert eval_worker.run(_worker_cfg(eval_idle_timeout_secs=1.0), missing) == \
        eval_worker.IDLE_EXIT
  notices = [r.getMessage() for r in caplog.records if 'waiting for the trainer' in r.getMessage()]
  assert len(notices) >= 2, caplog.text  # said at once, then again while waiting
  assert f"{missing} does not exist yet (is --workdir the trainer's?)" in notices[0]
  assert 'stopping after 1 s without one (eval_idle_timeout_secs)' in notices[0]
  assert list(tmp_path.iterdir()) == []
  # An existing run folder without checkpoints: the other wording.
  os.makedirs(missing)
  assert 'no checkpoint in' in eval_worker.waiting_message(missing, 0)
  assert 'never stopping' in eval_worker.waiting_message(missing, 0)


def test_a_worker_waiting_between_checkpoints_says_where_it_stands(followed_run, tmp_path,
                                                                    monkeypatch, caplog):
  """After its first evaluation the worker said nothing until the next checkpoint or its
  idle timeout (an hour by default), so a worker between two checkpoints 5000 steps apart
  looked hung. It now says, as often as before the first one, the last step it evaluated,
  the run's last, and how long it has waited."""
  workdir = str(tmp_path / 'run')
  shutil.copytree(followed_run[0], workdir)
  os.remove(os.path.join(workdir, 'metrics', 'eval_worker.jsonl'))
  shutil.rmtree(os.path.join(workdir, 'checkpoints', str(NUM_STEPS)))  # the run goes on
  monkeypatch.setattr(eval_worker, 'WAITING_NOTICE_SECS', 0.3)
  with caplog.at_level('INFO'):
    assert eval_worker.run(_worker_cfg(eval_idle_timeout_secs=1.0), workdir) == \
        eval_worker.IDLE_EXIT
  notices = [r.getMessage() for r in caplog.records if 'waiting for the next' in r.getMessage()]
  assert len(notices) >= 2, caplog.text
  assert notices[0].startswith(f'eval worker: evaluated up to step 6 of {NUM_STEPS}; no new '
                               'checkpoint '), notices[0]
  assert notices[0].endswith('stopping after 1 s without one (eval_idle_timeout_secs)')
  assert not any('waiting for the trainer to save one' in r.getMessage()
                 for r in caplog.records)  # that is the notice before the first checkpoint


def test_the_waiting_notice_gives_a_wait_only_once_there_is_one(tmp_path):
  """A worker restarted on an evaluated run said 'no new checkpoint for 0 s' at once, a
  figure that reads like a clock that does not run. Under a second it says 'yet'; after
  that, the whole seconds waited."""
  workdir = str(tmp_path)
  assert 'no new checkpoint yet, waiting' in eval_worker.waiting_message(workdir, 60, 6, 8, 0.2)
  assert 'no new checkpoint for 125 s, waiting' in eval_worker.waiting_message(
      workdir, 60, 6, 8, 125.3)


def test_the_idle_timeout_is_kept_when_the_poll_interval_is_longer(tmp_path):
  """`--config.eval_idle_timeout_secs=2` stopped after about 10 s, the poll interval: the
  worker slept a whole interval past the timeout. It now sleeps no longer than the time
  left."""
  start = time.time()
  assert eval_worker.run(_worker_cfg(eval_poll_secs=10.0, eval_idle_timeout_secs=0.5),
                         str(tmp_path / 'missing')) == eval_worker.IDLE_EXIT
  assert time.time() - start < 3.0
  assert eval_worker._sleep_secs(10.0, 0, 5.0) == 10.0  # no timeout: the whole interval


def test_the_worker_scores_a_checkpoint_as_the_trainer_did_and_says_when_its_knn_differs(
    tmp_path, caplog):
  """The trainer's final kNN and the eval worker's on the same checkpoint are one protocol
  (`knn.KnnEval`): with the run's kNN settings they are equal, and both records carry the
  settings (k as used, temperature, set sizes). A worker whose own --config holds other kNN
  settings (the preset's whole reference set, beside a trainer given 32 images and k=5)
  records those, says so, and names the flags that measure as the trainer did. Breaks if
  the trainer's record leaves the settings out, the two paths drift apart, or a worker's
  different settings pass without a word (its figure looked like a bug in one of them)."""
  workdir = str(tmp_path / 'run')
  run_cfg = tiny_config(**{'knn.k': 5, 'knn.train_examples': 32, 'eval_at_init': False})
  trainer = train.train_and_evaluate(run_cfg, workdir)['eval']
  worker = eval_worker.Worker(run_cfg, workdir).evaluate(4)
  keys = ('knn_top1', 'knn_top5', 'knn_k', 'knn_temperature', 'train_examples',
          'test_examples')
  assert {k: worker[k] for k in keys} == {k: trainer[k] for k in keys}
  assert (trainer['knn_k'], trainer['train_examples'], trainer['test_examples']) == (5, 32, 32)
  preset = tiny_config(eval_at_init=False, eval_network='target')  # knn.k=10, all 64 images
  with caplog.at_level('WARNING'):
    other = eval_worker.Worker(preset, workdir).evaluate(4)
  assert (other['knn_k'], other['train_examples']) == (10, 64)
  assert ('kNN settings differ from those the trainer used (knn.k=10, knn.train_examples=0 '
          "here), so its figures will not match the trainer's metrics/eval.jsonl; "
          '--config.knn.k=5 --config.knn.train_examples=32 measures as the trainer does'
          in caplog.text), caplog.text


@pytest.mark.slow
def test_the_worker_reads_the_knn_sets_as_the_trainer_did_on_a_smaller_machine(
    png_folder, tmp_path, monkeypatch):
  """The eval worker "can run on other hardware": on one with less accelerator memory than
  the trainer's it sized the kNN sets itself and streamed what the trainer held resident
  (tf.data's unantialiased bicubic, not PIL's resize), so the same checkpoint was scored on
  other pixels. It reads them as the run did (its checkpoint's input_mode) and gives the
  trainer's figure. Breaks if the worker's own memory decides again."""
  workdir = str(tmp_path / 'run')
  cfg = tiny_config(dataset=png_folder, batch_size=4, eval_at_init=False)
  trainer = train.train_and_evaluate(cfg, workdir)['eval']
  monkeypatch.setattr(train.data_lib, 'device_memory_bytes', lambda: 1)  # everything streams
  worker = eval_worker.Worker(cfg, workdir)
  record = worker.evaluate(4)
  assert not worker.knn.streamed
  assert (record['knn_top1'], record['knn_top5']) == (trainer['knn_top1'], trainer['knn_top5'])
