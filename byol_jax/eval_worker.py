"""`--worker_mode=eval`: follows a trainer's checkpoints and evaluates each one once.

Why a separate process: evaluation then costs the trainer nothing, can run on other
hardware, and several workers (one per dataset) can follow one run. The worker polls
`<workdir>/checkpoints` every `eval_poll_secs`; for each newly finalised step it records
kNN top-1/top-5 on the test split (eval preprocessing, encoder in inference mode) and the
online probe's top-1 on the same clean test embeddings. With `eval_at_init` it first
records the encoder at initialisation (step 0, `weights='random_init'`): the run's own
initialisation with BN statistics re-estimated on the kNN training images
(`evaluators.common.ensure_bn_statistics`), the baseline that the checkpoints must beat on
this worker's dataset.

Every record names what it measured: checkpoint_step, dataset, split ('test'), protocol
('knn', plus 'online_probe' where probe_top1 is given), network, weights and where the BN
statistics came from (bn_statistics), with the kNN settings and set sizes.

Records go to `metrics/eval_worker.jsonl` (`eval_worker_<dataset>` when `eval_dataset` is
set, `_target` appended for `eval_network='target'`) and TensorBoard. The file is also the
worker's memory: a restarted worker skips the steps it already holds. Unfinished saves are
ignored, and a checkpoint that is damaged or deleted while being read (the trainer's
retention) is logged and skipped. The worker exits 0 after the run's final step, and
`IDLE_EXIT` when no new checkpoint appeared for `eval_idle_timeout_secs`. Until the first
checkpoint it says what it waits for every `WAITING_NOTICE_SECS` and writes nothing, so a
mistyped --workdir is seen in the log and not created; between checkpoints it says as often
which step it evaluated last and how long it has waited for the next.
"""

from __future__ import annotations

import os
import re
import time
from typing import Any

import numpy as np
from absl import logging

from byol_jax import checkpointing, metric_writers, optim, train, train_step
from byol_jax.evaluators import common
from byol_jax.evaluators import knn as knn_lib

IDLE_EXIT = 75  # EX_TEMPFAIL: stopped waiting before the run's final checkpoint
WAITING_NOTICE_SECS = 300.0  # how often a worker with no new checkpoint says so
NETWORKS = ('online', 'target')


def metrics_name(cfg: Any) -> str:
  """The JSONL/TensorBoard name of this worker's records."""
  name = 'eval_worker'
  if cfg.eval_dataset:
    name += '_' + re.sub(r'[^A-Za-z0-9_.-]+', '_', cfg.eval_dataset).strip('_')
  if cfg.eval_network != 'online':
    name += f'_{cfg.eval_network}'
  return name


def eval_config(saved: Any, cfg: Any) -> Any:
  """The trained run's config (model, sizes, data) with this worker's evaluation settings."""
  out = checkpointing.config_from_dict(checkpointing.config_to_dict(saved))
  out.knn = checkpointing.config_from_dict(checkpointing.config_to_dict(cfg.knn))
  if cfg.eval_dataset:
    out.dataset = cfg.eval_dataset
    out.data_dir = cfg.data_dir or out.data_dir
    out.pretrain_split = 'trainval'  # kNN's reference set: the other dataset's training images
    out.demo = checkpointing.config_from_dict(checkpointing.config_to_dict(cfg.demo))
  return out


def no_knn_message(knn: knn_lib.KnnEval) -> str:
  """Why this worker, which evaluates by kNN, cannot run on its dataset, and what can."""
  return (f'no kNN evaluation: {knn.unavailable}; pass a labelled --config.eval_dataset, or '
          'use --worker_mode=linear_eval (configs/linear_eval.py:voc2007 for VOC2007)')


def probe_top1(params: Any, features: np.ndarray, labels: np.ndarray) -> float:
  """Top-1 of the online linear probe (`params['probe']`) on precomputed embeddings."""
  probe = params['probe']
  logits = features @ np.asarray(probe['w']) + np.asarray(probe['b'])
  return float(np.mean(np.argmax(logits, axis=-1) == labels))


class Worker:
  """The evaluation loop's state: what was done, what failed, and the evaluator."""

  def __init__(self, cfg: Any, workdir: str):
    if cfg.eval_network not in NETWORKS:
      raise train.ConfigError(f'eval_network={cfg.eval_network!r}; valid: {", ".join(NETWORKS)}')
    train.validate_knn(cfg.knn)
    self.cfg, self.workdir = cfg, workdir
    # Opened with the first record, so that a worker pointed at a mistyped --workdir
    # creates nothing there while it waits.
    self.writer: metric_writers.MetricWriter | None = None
    self.path = metric_writers.jsonl_path(workdir, metrics_name(cfg))
    self.done = {int(r['step']) for r in train._read_records(self.path)
                 if r.get('network', 'online') == cfg.eval_network}
    self.failed: dict[int, float] = {}  # step -> mtime of its folder when it failed
    self.reported: set[str] = set()
    self.knn: knn_lib.KnnEval | None = None
    self.run_cfg: Any = None  # the run's config with this worker's evaluation settings
    self.final_step: int | None = None
    self.dataset = ''
    if self.done:
      logging.info('eval worker: already evaluated steps %s (%s)', sorted(self.done),
                   self.path)

  def pending(self) -> list[int]:
    """Finalised steps not yet evaluated (a failed one again only if it was rewritten)."""
    found = checkpointing.scan(self.workdir)
    for name in found.unfinished:
      if name not in self.reported:
        self.reported.add(name)
        logging.info('eval worker: skipping unfinished checkpoint %s', name)
    return [s for s in found.finalised if s not in self.done
            and self.failed.get(s) != _mtime(self.workdir, s)]

  def evaluate(self, step: int) -> dict[str, Any] | None:
    """Evaluates one checkpoint and appends its record; None if it could not be read.

    The first checkpoint read also sets the worker up (the model is the run's) and, with
    eval_at_init, records the encoder at initialisation first.
    """
    try:
      state, saved_cfg, _ = checkpointing.load_state(self.workdir, step)
      meta = checkpointing.read_metadata(self.workdir, step)
    except checkpointing.CheckpointError as e:
      self.failed[step] = _mtime(self.workdir, step)
      logging.warning('eval worker: skipping checkpoint step %d: %s', step, e)
      return None
    if self.knn is None:
      self._setup(saved_cfg, meta)
    if self.cfg.eval_at_init and 0 not in self.done:
      self._record(0, common.initial_state(self.run_cfg), 'random_init')
    return self._record(step, state, 'checkpoint')

  def _record(self, step: int, state: train_step.TrainState, weights: str) -> dict[str, Any]:
    """kNN (and, for the online network on the run's data, probe) record of one state."""
    network = self.cfg.eval_network
    params = state.online_params if network == 'online' else state.target_params
    bn_state = state.online_state if network == 'online' else state.target_state
    bn_state, bn_note = common.ensure_bn_statistics(
      self.run_cfg.model, params, bn_state, self.knn.calibration_batches(self.run_cfg.seed),
      self.run_cfg.image_size, self.knn.crop_fraction, self.knn.mesh, self.run_cfg.augment,
      source=f'{self.dataset}/train')
    train_feats, test_feats = self.knn.features(params, bn_state)
    if self.knn.unavailable:  # a streamed dataset shows it only now
      raise train.ConfigError(no_knn_message(self.knn))
    with_probe = network == 'online' and not self.cfg.eval_dataset and weights == 'checkpoint'
    record = dict(checkpoint_step=step, dataset=self.dataset, split='test', network=network,
                  protocol='knn+online_probe' if with_probe else 'knn', weights=weights,
                  bn_statistics=bn_note, **self.knn.score(train_feats, test_feats),
                  probe_top1=None, **self.knn.settings())
    if with_probe:
      record['probe_top1'] = probe_top1(params, test_feats, self.knn.test_labels)
    if self.writer is None:
      self.writer = metric_writers.MetricWriter(self.workdir, metrics_name(self.cfg))
    record = self.writer.write(step, record)
    self.writer.flush()
    self.done.add(step)
    scores = {k: record[k] for k in ('knn_top1', 'knn_top5', 'probe_top1')
              if record.get(k) is not None}  # first: what a user reads the line for
    logging.info('eval worker: step %d: %s  (%s encoder, %s/test, %s weights, BN statistics: '
                 '%s; the whole record in %s)', step, train._fmt_metrics(scores), network,
                 self.dataset, weights, bn_note, self.path)
    return record

  def _setup(self, saved_cfg: Any, meta: dict[str, Any]) -> None:
    """Builds the evaluator from the first checkpoint's config (the model is the run's)."""
    cfg = eval_config(saved_cfg, self.cfg)
    self.run_cfg, self.dataset = cfg, cfg.dataset
    self.final_step = _final_step(saved_cfg, meta)
    self.knn = knn_lib.KnnEval(cfg, train_step.make_mesh(), None,
                               streamed=_streamed_as_the_run(self.cfg, meta))
    if self.knn.unavailable:
      raise train.ConfigError(no_knn_message(self.knn))
    logging.info('eval worker: %s encoder on %s/test; the run ends at step %d',
                 self.cfg.eval_network, cfg.dataset, self.final_step)
    if not self.cfg.eval_dataset:
      _say_knn_differences(saved_cfg.knn, self.cfg.knn)

  def finished(self) -> bool:
    if self.final_step is None and self.done:  # a rerun that has nothing left to evaluate
      self.final_step = self._final_step_of_newest_checkpoint()
    return self.final_step is not None and self.final_step in self.done

  def _final_step_of_newest_checkpoint(self) -> int | None:
    """The run's last step from the newest checkpoint's metadata (no arrays read), so that a
    worker started again on an evaluated run ends at once instead of waiting its idle
    timeout for a checkpoint that will never come."""
    for step in reversed(checkpointing.scan(self.workdir).finalised):
      try:
        meta = checkpointing.read_metadata(self.workdir, step)
        return _final_step(checkpointing.config_from_dict(meta['config']), meta)
      except (checkpointing.CheckpointError, KeyError, TypeError, ValueError):
        continue
    return None

  def close(self) -> None:
    if self.writer is not None:
      self.writer.close()


def _streamed_as_the_run(cfg: Any, meta: dict[str, Any]) -> bool | None:
  """Whether to stream the kNN sets: as the trainer read them (its checkpoint's input_mode),
  else None (this machine's memory decides, `data.choose_mode`).

  Why: the streamed path (tf.data's host crop, bicubic without antialiasing) and the
  resident one (PIL's antialiased resize) give different pixels, so a worker on a machine
  with less accelerator memory than the trainer's (it "can run on other hardware") scored
  the same checkpoint on other pixels than the trainer did. Another dataset
  (eval_dataset), or a checkpoint saved before input_mode was kept, is sized here.
  """
  mode = meta.get('input_mode')
  return None if cfg.eval_dataset or mode is None else mode == 'stream'


KNN_SCORE_FIELDS = ('k', 'temperature', 'train_examples')  # what changes a kNN figure


def _say_knn_differences(run_knn: Any, worker_knn: Any) -> None:
  """Warns when this worker's kNN settings (its own --config) differ from those the trainer
  evaluated with (the run's saved config), naming the flags that measure as it did.

  Why: both evaluate the same checkpoints with one protocol (`knn.KnnEval`), and agree to
  the last digit when the settings match; a worker started with the preset beside a
  trainer given `--config.knn.train_examples=200 --config.knn.k=10` (as the experiment
  scripts do) scores the final checkpoint higher, and without a word the two figures look
  like a bug in one of them. The worker keeps its own settings: they may be meant.
  """
  differ = [f for f in KNN_SCORE_FIELDS if run_knn.get(f) != worker_knn.get(f)]
  if not differ:
    return
  here = ', '.join(f'knn.{f}={worker_knn.get(f)!r}' for f in differ)
  there = ' '.join(f'--config.knn.{f}={run_knn.get(f)!r}' for f in differ)
  logging.warning('eval worker: kNN settings differ from those the trainer used (%s here), '
                  "so its figures will not match the trainer's metrics/eval.jsonl; %s "
                  'measures as the trainer does', here, there)


def _final_step(saved_cfg: Any, meta: dict[str, Any]) -> int:
  """The last step of the run that saved a checkpoint (its config and metadata)."""
  return optim.total_steps(saved_cfg, int(meta['num_examples']))


def waiting_message(workdir: str, idle_timeout_secs: float, last_step: int | None = None,
                    final_step: int | None = None, idle_secs: float = 0.0) -> str:
  """What the worker is waiting for, and until when: before the first checkpoint, a
  mistyped --workdir otherwise looks like a trainer that has not saved yet; after one, a
  worker silent between two checkpoints (5000 steps apart in the ImageNet presets) could
  not be told from a hung one."""
  folder = checkpointing.checkpoint_dir(workdir)
  until = (f'stopping after {idle_timeout_secs:.0f} s without one (eval_idle_timeout_secs)'
           if idle_timeout_secs else 'never stopping (eval_idle_timeout_secs=0)')
  if last_step is not None:
    of = f' of {final_step}' if final_step is not None else ''
    # Under a second ('for 0 s') is the worker's own start or its last evaluation just
    # ending, not a wait worth a figure.
    since = f'for {idle_secs:.0f} s' if idle_secs >= 1 else 'yet'
    return (f'eval worker: evaluated up to step {last_step}{of}; no new checkpoint {since}, '
            f'waiting for the next one in {folder}, {until}')
  if not os.path.isdir(workdir):
    what = f'{workdir} does not exist yet (is --workdir the trainer\'s?)'
  else:
    what = f'no checkpoint in {folder} yet'
  return f'eval worker: {what}; waiting for the trainer to save one, {until}'


def _mtime(workdir: str, step: int) -> float:
  try:
    return os.stat(os.path.join(checkpointing.checkpoint_dir(workdir), str(step))).st_mtime
  except OSError:
    return -1.0


def _sleep_secs(poll_secs: float, idle_timeout_secs: float, idle: float) -> float:
  """The wait before the next poll: the poll interval, or less when the idle timeout ends
  sooner (just past it, as the worker stops once idle exceeds it)."""
  if not idle_timeout_secs:
    return poll_secs
  return max(0.0, min(poll_secs, idle_timeout_secs - idle + 0.01))


def run(cfg: Any, workdir: str) -> int:
  """Evaluates checkpoints until the final step is done (0) or none came for a while."""
  train.require_pretraining_config(cfg)
  checkpointing.quiet_orbax_logs()
  worker = Worker(cfg, workdir)
  idle_since = time.time()
  logging.info('eval worker: following %s (poll %.1f s)', checkpointing.checkpoint_dir(workdir),
               cfg.eval_poll_secs)
  next_notice = idle_since  # while nothing has come: say what is awaited, now and then
  try:
    while True:
      pending = worker.pending()
      for step in pending:
        if worker.evaluate(step) is not None:
          idle_since = time.time()
          next_notice = idle_since + WAITING_NOTICE_SECS
      if worker.finished():
        logging.info('eval worker: evaluated the final step %d; done', worker.final_step)
        return 0
      idle = time.time() - idle_since
      if not pending and time.time() >= next_notice:
        logging.info(waiting_message(workdir, cfg.eval_idle_timeout_secs,
                                     max(worker.done) if worker.done else None,
                                     worker.final_step, idle))
        next_notice = time.time() + WAITING_NOTICE_SECS
      if cfg.eval_idle_timeout_secs and idle > cfg.eval_idle_timeout_secs:
        logging.warning('eval worker: no new checkpoint for %.0f s; stopping (last evaluated: '
                        '%s)', idle, max(worker.done) if worker.done else 'none')
        return IDLE_EXIT
      # Not past the timeout by more than a moment: eval_idle_timeout_secs=2 with the 10 s
      # poll stopped after 10 s.
      time.sleep(_sleep_secs(cfg.eval_poll_secs, cfg.eval_idle_timeout_secs, idle))
  finally:
    worker.close()


if __name__ == '__main__':
  from byol_jax import cli
  cli.worker_module_main('byol_jax.eval_worker')  # not __spec__.name: None when run by path
