"""The host training loop: the only impure place (I/O, timing, logging, checkpoints).

`train_and_evaluate(cfg, workdir)` builds data, state and step, then runs
`state, metrics = step(state, ...)`; metrics are fetched from the devices only on logging
steps so the loop never waits on the accelerator otherwise.
"""

from __future__ import annotations

import itertools
import os
import time
from typing import Any

import jax
import numpy as np
from absl import logging

from byol_jax import data as data_lib
from byol_jax import metric_writers, optim, preview, train_step
from byol_jax.evaluators import knn as knn_lib
from byol_jax.evaluators.common import embed_arrays, make_embed_fn


class ConfigError(ValueError):
  """A config value that cannot work; the CLI prints it as one line."""


def validate(cfg: Any, num_devices: int) -> None:
  """Checks that would otherwise fail late (after compiling) or silently."""
  if cfg.batch_size <= 0 or cfg.batch_size % num_devices:
    raise ConfigError(f'batch_size={cfg.batch_size} must be a positive multiple of the '
                      f'{num_devices} devices')
  if cfg.optimizer.base_lr <= 0:
    raise ConfigError(f'optimizer.base_lr={cfg.optimizer.base_lr} must be positive')
  if cfg.epochs <= 0 and cfg.steps <= 0:
    raise ConfigError(f'epochs={cfg.epochs} must be positive (or set steps)')
  if cfg.model.depth not in train_step.networks.RESNET_LAYOUTS:
    raise ConfigError(f'model.depth={cfg.model.depth} is not a ResNet depth; valid: '
                      f'{sorted(train_step.networks.RESNET_LAYOUTS)}')
  for name in ('projector_norm', 'predictor_norm'):
    if cfg.model[name] not in train_step.networks.NORM_KINDS:
      raise ConfigError(f'model.{name}={cfg.model[name]!r}; valid: '
                        f'{", ".join(train_step.networks.NORM_KINDS)}')
  try:
    train_step.precision_dtype(cfg.precision)
    data_lib.datasets.parse_dataset(cfg.dataset)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  if cfg.loss not in ('byol', 'infonce'):
    raise ConfigError(f'loss={cfg.loss!r}; valid: byol, infonce')


def prepare_workdir(workdir: str) -> None:
  """Creates the workdir and proves it writable before any compilation."""
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, '.write_test')
    with open(probe, 'w') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    raise ConfigError(f'workdir {workdir!r} is not writable: {e.strerror}') from None


def _place_dataset(split: data_lib.Split, mesh) -> tuple[jax.Array, jax.Array]:
  """Shards the uint8 images over the devices (dropping the remainder), once."""
  n = len(split.labels) - len(split.labels) % mesh.size
  return train_step.shard_batch((split.images[:n], split.labels[:n]), mesh)


class KnnEval:
  """kNN top-1/top-5 of an encoder on the dataset's test split, features of the train split."""

  def __init__(self, cfg: Any, mesh, train: data_lib.Split | None):
    self.cfg, self.mesh = cfg, mesh
    self.train = train if train is not None else data_lib.load_split(cfg, 'train')
    limit = cfg.knn.train_examples
    if limit and limit < len(self.train.labels):
      self.train = data_lib.Split(self.train.images[:limit], self.train.labels[:limit])
    self.test = data_lib.load_split(cfg, 'test')
    self.num_classes = max(int(self.train.labels.max()), int(self.test.labels.max())) + 1
    self.embed = make_embed_fn(cfg.model, cfg.image_size, cfg.eval_crop_fraction, mesh)

  def __call__(self, params, state) -> dict[str, float]:
    features = [embed_arrays(self.embed, params, state, s.images, self.cfg.knn.batch_size,
                             self.mesh.size) for s in (self.train, self.test)]
    result = knn_lib.knn_accuracy(features[0], self.train.labels, features[1], self.test.labels,
                                  self.num_classes, k=self.cfg.knn.k,
                                  temperature=self.cfg.knn.temperature)
    return {'knn_top1': result['top1'], 'knn_top5': result['top5']}


class Progress:
  """Images/s between log steps and an ETA from the steady-state step time."""

  def __init__(self, first_step: int, num_steps: int, batch_size: int):
    self.num_steps, self.batch_size = num_steps, batch_size
    self.last_step, self.last_time = first_step, time.time()
    self.start_step, self.start_time = None, None

  def update(self, step: int) -> dict[str, float]:
    now = time.time()
    rate = (step - self.last_step) * self.batch_size / max(now - self.last_time, 1e-9)
    if self.start_step is None:  # the first interval includes compilation
      self.start_step, self.start_time = step, now
      eta = float('nan')
    else:
      per_step = (now - self.start_time) / max(step - self.start_step, 1)
      eta = per_step * (self.num_steps - step)
    self.last_step, self.last_time = step, now
    return dict(images_per_sec=rate, eta_sec=eta)


def _fmt_eta(seconds: float) -> str:
  if not np.isfinite(seconds):
    return '--:--'
  m, s = divmod(int(seconds), 60)
  return f'{m // 60:d}:{m % 60:02d}:{s:02d}'


def train_and_evaluate(cfg: Any, workdir: str) -> dict[str, Any]:
  """Trains BYOL as configured; returns the last train and eval records."""
  mesh = train_step.make_mesh()
  validate(cfg, mesh.size)
  prepare_workdir(workdir)
  is_main = jax.process_index() == 0
  if is_main:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(cfg.to_json_best_effort(indent=2))

  data = data_lib.make_train_data(cfg)
  num_steps = optim.total_steps(cfg, data.num_examples)
  spe = optim.steps_per_epoch(data.num_examples, cfg.batch_size)
  fns = train_step.make_step_fns(cfg, data.num_classes, num_steps, spe)
  image_shape = (cfg.image_size, cfg.image_size, 3)
  init = jax.jit(lambda rng: train_step.init_state(fns, rng, image_shape),
                 out_shardings=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  state = init(jax.random.PRNGKey(cfg.seed))
  logging.info('parameters: %d online; LARS mask: %s', train_step.networks.count_params(
    state.online_params), optim.describe_mask(state.online_params))

  train_writer = metric_writers.MetricWriter(workdir, 'train', is_main)
  eval_writer = metric_writers.MetricWriter(workdir, 'eval', is_main)
  knn = KnnEval(cfg, mesh, data.train)

  if data.mode == 'device':
    images, labels = _place_dataset(data.train, mesh)
    step_fn = train_step.make_resident_step(fns, mesh, cfg.augment, cfg.batch_size,
                                            cfg.image_size)
    next_inputs = lambda: (images, labels)
  else:
    step_fn = train_step.make_stream_step(fns, mesh, cfg.augment)
    next_inputs = lambda: _next_stream_batch(data.stream, mesh)

  start = int(state.step)
  init_knn = {}
  if cfg.eval_at_init and start == 0:
    init_knn = {f'{k}_init': v for k, v in knn(state.online_params, state.online_state).items()}
    logging.info('encoder at initialisation: %s', _fmt_metrics(init_knn))
  _write_preview(cfg, state, workdir, eval_writer, data, is_main)

  progress = Progress(start, num_steps, cfg.batch_size)
  last_train, last_eval = {}, {}
  logging.info('training %d steps (%d per epoch, global batch %d, %d devices)', num_steps, spe,
               cfg.batch_size, mesh.size)
  for step in range(start + 1, num_steps + 1):
    state, metrics = step_fn(state, *next_inputs())
    if step % cfg.log_every_steps == 0 or step == num_steps:
      metrics = jax.device_get(metrics)
      metrics.update(progress.update(step), epoch=step / spe)
      last_train = train_writer.write(step, metrics)
      logging.info('step %d/%d  loss %.4f  probe %.3f  std %.4f  rank %.1f  %.0f img/s  ETA %s',
                   step, num_steps, metrics['loss'], metrics['probe_top1'],
                   metrics['proj_std'], metrics['proj_rank'], metrics['images_per_sec'],
                   _fmt_eta(metrics['eta_sec']))
    is_eval = cfg.eval_every_steps and step % cfg.eval_every_steps == 0
    if is_eval or step == num_steps:
      result = {**knn(state.online_params, state.online_state), **init_knn,
                'epoch': step / spe, 'network': 'online', 'split': 'test'}
      last_eval = eval_writer.write(step, result)
      logging.info('eval at step %d: %s', step, _fmt_metrics(result))
  train_writer.close()
  eval_writer.close()
  return dict(train=last_train, eval=last_eval, state=state)


def _next_stream_batch(stream, mesh):
  batch = next(stream)
  return train_step.shard_batch((batch['views'], batch['labels']), mesh)


def _fmt_metrics(metrics: dict[str, Any]) -> str:
  return '  '.join(f'{k} {v:.4f}' if isinstance(v, float) else f'{k} {v}'
                   for k, v in metrics.items())


def _write_preview(cfg, state, workdir, writer, data, is_main) -> None:
  """A PNG of view pairs from the first batch, so users see what the network sees."""
  if not is_main:
    return
  from byol_jax import augment  # local: keeps the import graph of this module small
  if data.train is not None:
    images = data.train.images[:8]
    view1, view2 = augment.make_views(jax.random.PRNGKey(cfg.seed), images, cfg.augment,
                                      cfg.image_size)
  else:
    batch = next(data.stream)
    data.stream = itertools.chain([batch], data.stream)  # peek: the stream stays intact
    view1, view2 = augment.finish_views(jax.random.PRNGKey(cfg.seed), batch['views'][:8],
                                        cfg.augment)
  path = preview.save_view_grid(os.path.join(workdir, 'preview.png'), np.asarray(view1),
                                np.asarray(view2), cfg.augment.mean, cfg.augment.std)
  writer.write_image(int(state.step), 'augmentation_preview', np.asarray(
    preview.view_grid_array(np.asarray(view1), np.asarray(view2), cfg.augment.mean,
                            cfg.augment.std)))
  logging.info('augmentation preview: %s', path)
