"""The host training loop: the only impure place (I/O, timing, logging, checkpoints).

`train_and_evaluate(cfg, workdir)` builds data, state and step, then runs
`state, metrics = step(state, ...)`. Nothing in the loop waits for the accelerator except
logging steps (metrics are fetched), evaluation and checkpoint saves.

Resume is exact: the TrainState holds everything a step depends on (step, rng, params,
target, BN state, optimiser state); per-step randomness is derived from (rng, step), the
resident sampler depends only on the step and the stream is reopened at `start_step`. So
a run restarted from its newest finalised checkpoint follows the same trajectory (bitwise
on CPU). Faults: SIGTERM/SIGINT save the current step and stop (exit 0); non-finite steps
are skipped by the step itself and counted on the device, and `max_bad_steps` of them in
a row stop the run without saving.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from byol_jax import (
  checkpointing,
  cli,
  config_compat,
  datasets,
  losses,
  metric_writers,
  multihost,
  optim,
  preview,
  train_step,
)
from byol_jax import data as data_lib
from byol_jax.evaluators import common
from byol_jax.evaluators import knn as knn_lib

DETERMINISM_FLAG = '--xla_gpu_deterministic_ops=true'
EXIT_DIVERGED = 3
EXIT_CHECKPOINT_FAILED = 4


class ConfigError(ValueError):
  """A config value that cannot work; the CLI prints it as one line."""


class SetupMismatch(ConfigError):
  """The workdir holds a run of another setup. `saved` is that run's config, so that the
  command line, which knows the config file, can name the preset argument that resumes it."""

  def __init__(self, message: str, saved: Any):
    super().__init__(message)
    self.saved = saved


class TrainingDiverged(RuntimeError):
  """Too many non-finite steps in a row: the run stopped without saving."""


def require_pretraining_config(cfg: Any) -> None:
  """Rejects an evaluation config (configs/linear_eval.py) passed to the trainer or the eval
  worker in one line, where it failed on the first missing field with a traceback."""
  if 'learning_rates' in cfg and 'random_init' in cfg:
    raise ConfigError('this worker needs a pretraining config: --config=configs/byol.py:PRESET '
                      '(e.g. :demo); configs/linear_eval.py serves --worker_mode=linear_eval')


def validate(cfg: Any, num_devices: int) -> None:
  """Checks that would otherwise fail late (after compiling), in a traceback, or silently."""
  if cfg.batch_size <= 0 or cfg.batch_size % num_devices:
    raise ConfigError(f'batch_size={cfg.batch_size} must be a positive multiple of the '
                      f'{num_devices} devices')
  if cfg.steps < 0:
    raise ConfigError(f'steps={cfg.steps} must be >= 0 (0: train for `epochs`)')
  if cfg.epochs <= 0 and cfg.steps <= 0:
    raise ConfigError(f'epochs={cfg.epochs} must be positive (or set steps)')
  if cfg.image_size < 8:
    raise ConfigError(f'image_size={cfg.image_size} must be at least 8 pixels')
  # A negative seed ended in numpy's traceback; from 2**32 up JAX's PRNGKey (32-bit without
  # jax_enable_x64) gives the key of seed mod 2**32 (2**32: seed 0's).
  if not 0 <= cfg.seed < 2**32:
    raise ConfigError(f'seed={cfg.seed} must be in [0, 2**32)')
  if not 0 < cfg.eval_crop_fraction <= 1:  # 0 divided by zero; above 1 cropped past the image
    raise ConfigError(f'eval_crop_fraction={cfg.eval_crop_fraction} must be in (0, 1]')
  if (target_init := config_compat.setting(cfg, 'target_init')) not in train_step.TARGET_INITS:
    raise ConfigError(f'target_init={target_init!r}; valid: '
                      f'{", ".join(train_step.TARGET_INITS)}')
  try:
    train_step.precision_dtype(cfg.precision)
    spec = data_lib.datasets.parse_dataset(cfg.dataset)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  split, logical = data_lib.pretrain_split(cfg), data_lib.datasets.LOGICAL_SPLITS
  if spec.kind != 'tfds' and split not in logical:
    raise ConfigError(f'pretrain_split={split!r}: {spec.kind} datasets have the splits '
                      f'{", ".join(logical)} (TFDS datasets also take split expressions)')
  if spec.kind == 'demo' and split == 'valid':  # its valid draw is linear evaluation's
    raise ConfigError("pretrain_split='valid': the demo pretrains on its train images "
                      "('train' or 'trainval', the same draw of demo.train_examples)")
  if data_lib.datasets.includes_test_split(spec, split):
    logging.warning("pretrain_split=%r takes images of %s's test split, on which kNN and "
                    'linear evaluation report: their figures are then not held out',
                    split, cfg.dataset)
  if cfg.input_mode not in data_lib.datasets.INPUT_MODES:  # the demo never reads it
    raise ConfigError(f'input_mode={cfg.input_mode!r}; valid: '
                      f'{", ".join(data_lib.datasets.INPUT_MODES)}')
  if cfg.loss not in losses.LOSSES:
    raise ConfigError(f'loss={cfg.loss!r}; valid: {", ".join(losses.LOSSES)} '
                      '(losses.LOSSES)')
  _need_positive(cfg, '', ('infonce_temperature',))
  _validate_model(cfg.model)
  _validate_optimisation(cfg)
  _validate_augment(cfg.augment)
  validate_knn(cfg.knn)
  _validate_faults(cfg)


def validate_knn(knn: Any) -> None:
  """The kNN settings, which the trainer and the eval worker read."""
  _need_positive(knn, 'knn', ('k', 'temperature', 'batch_size'))
  if knn.train_examples < 0:  # `images[:-N]` left N reference images out, silently
    raise ConfigError(f'knn.train_examples={knn.train_examples} must be >= 0 (0: all)')


def _need_positive(section: Any, prefix: str, names: tuple[str, ...]) -> None:
  for name in names:
    if not section[name] > 0:
      raise ConfigError(f'{prefix}{"." if prefix else ""}{name}={section[name]} must be positive')


def _validate_model(model: Any) -> None:
  networks = train_step.networks
  arch = config_compat.setting(model, 'model.arch')
  try:
    networks.encoder_class(model)  # an unknown name, or a 'module:Class' that cannot import
  except ValueError as e:
    raise ConfigError(str(e)) from None
  if arch == 'resnet' and model.depth not in networks.RESNET_LAYOUTS:
    raise ConfigError(f'model.depth={model.depth} is not a ResNet depth; valid: '
                      f'{sorted(train_step.networks.RESNET_LAYOUTS)}')
  _need_positive(model, 'model', ('width', 'projector_hidden', 'predictor_hidden',
                                  'projection_dim', 'bn_eps'))
  if not 0 <= model.bn_decay < 1:  # BN's moving averages: 1 never moves, above 1 diverges
    raise ConfigError(f'model.bn_decay={model.bn_decay} must be in [0, 1)')
  for name in ('projector_norm', 'predictor_norm'):
    if model[name] not in train_step.networks.NORM_KINDS:
      raise ConfigError(f'model.{name}={model[name]!r}; valid: '
                        f'{", ".join(train_step.networks.NORM_KINDS)}')
  weight_init = config_compat.setting(model, 'model.weight_init')
  if weight_init not in train_step.networks.WEIGHT_INITS:  # a traceback after loading the data
    raise ConfigError(f'model.weight_init={weight_init!r}; valid: '
                      f'{", ".join(train_step.networks.WEIGHT_INITS)}')


def _validate_optimisation(cfg: Any) -> None:
  opt = cfg.optimizer
  if opt.name not in optim.OPTIMIZERS:
    raise ConfigError(f'optimizer.name={opt.name!r}; valid: {", ".join(optim.OPTIMIZERS)}')
  _need_positive(opt, 'optimizer', ('base_lr', 'trust_coefficient'))
  if opt.weight_decay < 0 or opt.warmup_epochs < 0:
    raise ConfigError(f'optimizer.weight_decay={opt.weight_decay} and optimizer.warmup_epochs='
                      f'{opt.warmup_epochs} must be >= 0')
  if not 0 <= opt.momentum < 1:
    raise ConfigError(f'optimizer.momentum={opt.momentum} must be in [0, 1)')
  if config_compat.setting(cfg, 'tau_schedule') not in optim.TAU_SCHEDULES:
    raise ConfigError(f'tau_schedule={cfg.tau_schedule!r}; valid: '
                      f'{", ".join(optim.TAU_SCHEDULES)}')
  if not 0 <= cfg.tau_base <= 1:
    raise ConfigError(f'tau_base={cfg.tau_base} must be in [0, 1] (the EMA keeps tau of the '
                      'target)')


def _validate_augment(aug: Any) -> None:
  from byol_jax import augment  # local: keeps the import graph of this module small
  try:
    augment.check_config(aug)
  except ValueError as e:
    raise ConfigError(str(e)) from None


def _validate_faults(cfg: Any) -> None:
  ckpt = cfg.checkpoint
  for name in ('every_steps', 'every_secs', 'keep', 'keep_every_steps'):
    if ckpt[name] < 0:
      raise ConfigError(f'checkpoint.{name}={ckpt[name]} must be >= 0 (0 turns it off)')
  if cfg.max_bad_steps < 1:
    raise ConfigError(f'max_bad_steps={cfg.max_bad_steps} must be >= 1')
  # `step % -1 == 0`: a negative interval evaluated kNN after every step, silently.
  if cfg.eval_every_steps < 0:
    raise ConfigError(f'eval_every_steps={cfg.eval_every_steps} must be >= 0 (0: evaluate at '
                      'the end only)')
  if cfg.log_every_steps < 1:
    raise ConfigError(f'log_every_steps={cfg.log_every_steps} must be >= 1')


def prepare_workdir(workdir: str) -> None:
  """Creates the workdir and proves it writable before any compilation.

  The probe file is named per host and process: the processes of a multi-process run
  share the workdir, and one shared name let one process delete another's probe mid-check
  (a flaky 'not writable: No such file or directory').
  """
  if message := cli.remote_path_error(workdir):
    raise ConfigError(message)
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f'.write_test.{socket.gethostname()}.{os.getpid()}')
    with open(probe, 'w') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    raise ConfigError(f'workdir {workdir!r} is not writable: {e.strerror}') from None


class WorkdirBusy(ConfigError):
  """Another trainer holds the workdir."""


@contextlib.contextmanager
def _trainer_lock(workdir: str) -> Iterator[None]:
  """Keeps a second trainer out of a workdir that one is training in.

  Two trainers in one workdir interleave their metrics and save the same steps: the second
  one's resume would set aside or truncate what the first is writing. An advisory lock per
  process index (flock: released by the kernel when the process dies, even by SIGKILL, so a
  crash leaves nothing to clean up) makes the second one stop at once, naming the first.
  Eval workers and evaluations never take it. Where the file system has no locks, training
  goes on unguarded, with a warning.
  """
  try:
    import fcntl
  except ImportError:  # not a POSIX system
    yield
    return
  path = os.path.join(workdir, f'.trainer.lock.{jax.process_index()}')
  f = open(path, 'a+')
  try:
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    f.seek(0)
    holder = f.read().strip() or 'a process that has not written its name yet'
    f.close()
    raise WorkdirBusy(f'{workdir} is in use by another trainer ({holder}); stop it first, or '
                      'use another --workdir') from None
  except OSError as e:
    logging.warning('cannot lock %s (%s): nothing stops a second trainer in this workdir',
                    path, e)
  f.seek(0)
  f.truncate()
  f.write(f'host {socket.gethostname()}, pid {os.getpid()}, since '
          f'{time.strftime("%Y-%m-%d %H:%M:%S")}\n')
  f.flush()
  try:
    yield
  finally:
    f.close()


def configure_determinism(cfg: Any) -> None:
  """`deterministic=True`: bitwise-reproducible GPU runs via XLA's deterministic ops.

  Sets `--xla_gpu_deterministic_ops=true` in XLA_FLAGS, which only takes effect before JAX
  initialises its backends (so this runs first). The price is speed: about 13% slower on
  an H200 for a scatter-heavy step (scatter-adds lose their atomics). CPU runs are
  deterministic anyway; off by default.
  """
  if not cfg.deterministic:
    return
  flags = os.environ.get('XLA_FLAGS', '')
  if DETERMINISM_FLAG in flags.split():
    return
  if _backends_initialised():
    raise ConfigError(f'deterministic=True needs XLA_FLAGS={DETERMINISM_FLAG} before JAX '
                      'starts; this process has already initialised JAX (set it yourself)')
  os.environ['XLA_FLAGS'] = f'{flags} {DETERMINISM_FLAG}'.strip()
  logging.info('deterministic GPU ops on (XLA_FLAGS=%s)', os.environ['XLA_FLAGS'])


def _backends_initialised() -> bool:
  try:
    from jax._src import xla_bridge
    return bool(xla_bridge.backends_are_initialized())
  except (ImportError, AttributeError):  # private API moved: assume the worst
    return True


def _place_dataset(split: data_lib.Split, mesh) -> tuple[jax.Array, jax.Array]:
  """Shards the uint8 images over the devices (dropping the remainder), once."""
  n = len(split.labels) - len(split.labels) % mesh.size
  return train_step.shard_batch((split.images[:n], split.labels[:n]), mesh)


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


# ------------------------------------------------------------------------------ faults


def _init_faults(mesh) -> dict[str, jax.Array]:
  """Device-side counters: bad steps in a row, the step where the limit was first hit
  (-1: never) and the last finite step. Kept on the device so no step waits for them."""
  faults = dict(bad_in_a_row=np.int32(0), tripped_at=np.int32(-1), last_good=np.int32(0))
  return train_step.replicate(faults, mesh)


def _make_fault_counter(max_bad: int) -> Callable:

  @jax.jit
  def count(faults, nonfinite, step):
    bad = nonfinite > 0
    run = jnp.where(bad, faults['bad_in_a_row'] + 1, 0).astype(jnp.int32)
    hit = (faults['tripped_at'] < 0) & (run >= max_bad)
    return dict(bad_in_a_row=run,
                tripped_at=jnp.where(hit, step, faults['tripped_at']).astype(jnp.int32),
                last_good=jnp.where(bad, faults['last_good'], step).astype(jnp.int32))

  return count


def _check_faults(faults: dict[str, Any], max_bad: int, workdir: str,
                  ckpt: checkpointing.Checkpointer) -> dict[str, int]:
  """Host copy of the counters; raises TrainingDiverged once the limit was hit."""
  faults = {k: int(v) for k, v in jax.device_get(faults).items()}
  if faults['tripped_at'] < 0:
    return faults
  ckpt.wait()
  good = checkpointing.finalised_steps(workdir)
  raise TrainingDiverged(
    f'{max_bad} non-finite steps in a row at step {faults["tripped_at"]} (the updates were '
    f'skipped; last finite step {faults["last_good"]}); stopped without saving. Last good '
    f'checkpoint: {f"step {good[-1]}" if good else "none"} in '
    f'{checkpointing.checkpoint_dir(workdir)}. Lower the learning rate or check the data.')


# ---------------------------------------------------------------------------- collapse


class _CollapseWatch:
  """Warns once when two logged steps in a row show collapsed projections: one odd batch
  is not a collapse, and repeating the warning every log line would bury the rest."""

  def __init__(self, projection_dim: int):
    self.projection_dim = projection_dim
    self.in_a_row = 0
    self.warned = False

  def update(self, metrics: dict[str, Any]) -> None:
    message = losses.collapse_message(float(metrics['proj_std']), float(metrics['proj_rank']),
                                      self.projection_dim)
    self.in_a_row = self.in_a_row + 1 if message else 0
    if self.in_a_row >= 2 and not self.warned:
      logging.warning('%s', message)
      self.warned = True


# -------------------------------------------------------------------------- preemption


class _Preemption:
  """SIGTERM/SIGINT set a flag the loop checks after each step (save, then exit 0).

  A second signal gets the previous handler (e.g. Ctrl-C twice interrupts at once). With
  several processes the flag comes from JAX's preemption sync point instead, so that all
  processes stop at the same step.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.signal_name: str | None = None
    self._previous = {}

  def __enter__(self) -> _Preemption:
    if jax.process_count() == 1:
      with contextlib.suppress(ValueError):  # not the main thread: no handlers
        for sig in self.SIGNALS:
          self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame) -> None:
    del frame  # no logging here: the handler may interrupt a log call holding its lock
    self.signal_name = signal.Signals(signum).name
    self._restore()
    # Said at once, where the loop's own line waits for the steps the host has queued on the
    # devices (it runs ahead to the next logged step, whose metrics it awaits in short
    # sleeps, `fetch`, so that this runs at once; the first step compiles for seconds to
    # minutes): os.write takes no lock.
    with contextlib.suppress(OSError):
      os.write(2, f'{self.signal_name}: stopping after the steps already queued (at most one '
                  f'log interval), then saving ({self.signal_name} again: stop at once, '
                  'without saving)\n'.encode())

  @property
  def reason(self) -> str:
    """Why the run stops, as its checkpoint line says: a Ctrl-C (SIGINT) is the user's own
    interruption, which the log called a preemption; SIGTERM, or another process's signal
    that JAX's sync point passes on, is the scheduler's."""
    return 'interrupted' if self.signal_name == 'SIGINT' else 'preemption'

  def _restore(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}

  def __exit__(self, *exc) -> None:
    self._restore()

  def reached(self, step: int, ckpt: checkpointing.Checkpointer) -> bool:
    if jax.process_count() > 1:
      return ckpt.reached_preemption(step)
    return self.signal_name is not None


def fetch(tree: Any, poll_secs: float = 0.001) -> Any:
  """`jax.device_get`, waiting for the devices in short sleeps: Python runs signal handlers
  only between bytecodes, so a Ctrl-C that came while the host blocked in device_get (up to
  a log interval of queued steps) was answered only when the wait ended, and a second one in
  that wait was lost."""
  arrays = [x for x in jax.tree.leaves(tree) if isinstance(x, jax.Array)]
  while not all(x.is_ready() for x in arrays):
    time.sleep(poll_secs)
  return jax.device_get(tree)


class _SaveClock:
  """When to save: every N steps, every T seconds, at the end and when stopped by a signal.

  The time rule is decided on process 0 and shared at log steps when there are several
  processes (a broadcast per step would be a sync per step); alone, it is checked per step.
  """

  def __init__(self, ckpt_cfg: Any, num_steps: int, log_every: int):
    self.every_steps, self.every_secs = ckpt_cfg.every_steps, ckpt_cfg.every_secs
    self.num_steps, self.log_every = num_steps, log_every
    self.last = time.time()

  def reason(self, step: int, stopped: str | None) -> str | None:
    """Why step `step` is saved, if it is; `stopped` is why the run stops there, if it does."""
    if stopped:
      return stopped
    if step == self.num_steps:
      return 'end of training'
    if self.every_steps and step % self.every_steps == 0:
      return f'every {self.every_steps} steps'
    if self.every_secs and self._time_is_up(step):
      return f'every {self.every_secs} s'
    return None

  def _time_is_up(self, step: int) -> bool:
    up = time.time() - self.last >= self.every_secs
    if jax.process_count() == 1:
      return up
    if step % self.log_every:
      return False
    from jax.experimental import multihost_utils
    return bool(multihost_utils.broadcast_one_to_all(np.asarray(up)))

  def saved(self) -> None:
    self.last = time.time()


# ------------------------------------------------------------------------------ resume


def _restore(cfg: Any, workdir: str) -> checkpointing.Restored | None:
  """The newest usable checkpoint of this workdir, after checking the config matches.

  The restore template takes the checkpoint's class count, so nothing of the dataset is
  looked up before the check: a resume with another, unprepared dataset was told to prepare
  it, not that the workdir holds another run. `_train` then compares it with the data's.
  """

  def check(meta):
    trajectory, other = checkpointing.config_differences(meta['config'], cfg)
    saved_preset, preset = meta['config'].get('preset'), cfg.get('preset')
    if trajectory and saved_preset and preset and saved_preset != preset:
      # Another preset differs in a dozen fields: name the presets, not every field.
      raise ConfigError(f'{workdir} holds a run of preset {saved_preset}, not {preset}: use a '
                        f'new --workdir for this one (preset {saved_preset} resumes that run)')
    if trajectory:
      longer = any(c.split(' ')[0] in ('epochs', 'steps', 'dataset') for c in trajectory)
      saved = ' '.join(checkpointing.saved_value_flags(meta['config'], cfg))
      raise SetupMismatch(
        f'{workdir} holds a run with another setup, resuming would not continue it: '
        f'{", ".join(trajectory)}. Use a new --workdir or the saved values'
        + (f' ({saved})' if saved else '')
        + (f' (a new --workdir with --config.init_from={workdir} starts a new schedule from '
           'its networks)' if longer else '') + '.', meta['config'])
    if other:
      logging.info('resuming with changed settings: %s', ', '.join(other))

  template = []  # built on first use: a fresh run needs no trace of the model

  def template_fn(meta):
    # The config check has passed: the current config has the same structure.
    if not template:
      template.append(checkpointing.state_template(cfg, int(meta['num_classes'])))
    return template[0]

  restored = checkpointing.restore_latest(workdir, template_fn, check)
  if restored is None:
    return None
  if restored.skipped:
    checkpointing.set_aside(workdir, [step for step, _ in restored.skipped])
  multihost.barrier('restore', cfg.multihost.barrier_timeout_secs)
  logging.info('resuming from checkpoint step %d (saved with %s devices; now %d)%s',
               restored.step, restored.meta.get('num_devices', '?'), jax.device_count(),
               f'; skipped damaged steps {[s for s, _ in restored.skipped]}'
               if restored.skipped else '')
  return restored


def _load_init_source(cfg: Any) -> train_step.TrainState | None:
  """The earlier run that a new run starts from (`init_from`), on the host. Read and checked
  against this run's network before any data is loaded, so that a wrong path or a network
  that does not fit fails at once, in one line (naming the source's model flags)."""
  if not cfg.get('init_from'):
    return None
  try:
    state, source_cfg, step = checkpointing.load_state(
      cfg.init_from, cfg.init_from_step or None, ('--config.init_from', '--config.init_from_step'))
  except checkpointing.CheckpointError as e:
    raise ConfigError(f'init_from={cfg.init_from}: {e}') from None
  source_model = {'model': checkpointing.config_to_dict(source_cfg.model)}
  model = {'model': checkpointing.config_to_dict(cfg.model)}
  try:
    train_step.warm_start_state(
      checkpointing.state_template(cfg, data_lib.num_classes_of(cfg)), state)
  except ValueError as e:
    flags = ' '.join(checkpointing.saved_value_flags(source_model, model))
    raise ConfigError(f'init_from={cfg.init_from}: {e}'
                      + (f'; its model: {flags}' if flags else '')) from None
  changed, _ = checkpointing.config_differences(source_model, model)
  logging.info('starting from the networks of %s, step %d (%s); the schedule, optimiser, '
               'probe and step count start afresh%s', cfg.init_from, step,
               source_cfg.get('preset', '?'),
               f'; model settings changed: {", ".join(changed)}' if changed else '')
  return state


def _warm_start(cfg: Any, fresh: train_step.TrainState, source: train_step.TrainState,
                mesh) -> train_step.TrainState:
  try:
    state = train_step.warm_start_state(jax.device_get(fresh), source)
  except ValueError as e:
    raise ConfigError(f'init_from={cfg.init_from}: {e}') from None
  return train_step.replicate(state, mesh)


def _read_records(path: str) -> list[dict[str, Any]]:
  """Records of a metrics JSONL file, dropping a line torn by a killed writer."""
  if not os.path.exists(path):
    return []
  records = []
  with open(path) as f:
    for line in f:
      with contextlib.suppress(json.JSONDecodeError):
        if line.strip():
          records.append(json.loads(line))
  return records


def _truncate_metrics(workdir: str, step: int) -> int:
  """Drops records after `step` (logged by a run that died before its next checkpoint), so
  the metrics files describe one trajectory after a resume; at step 0 (a start that left no
  checkpoint: Ctrl-C twice, a crash, kill -9) every record of that start goes. Returns how
  many records were dropped."""
  dropped = 0
  for name in ('train', 'eval'):
    path = os.path.join(workdir, 'metrics', f'{name}.jsonl')
    if not os.path.exists(path):
      continue
    records = _read_records(path)
    kept = [r for r in records if r.get('step', 0) <= step]
    dropped += len(records) - len(kept)
    with open(path + '.tmp', 'w') as f:
      f.writelines(json.dumps(r) + '\n' for r in kept)
    os.replace(path + '.tmp', path)
  return dropped


# -------------------------------------------------------------------------------- loop


# Streamed batches in flight to the devices ahead of the step that takes them.
STREAM_PREFETCH = 2


def _input_fn(data: data_lib.TrainData, mesh) -> Callable[[int], tuple]:
  """inputs(step) -> the data arguments of the step function for that step. Streamed
  batches are copied to the devices STREAM_PREFETCH steps ahead, so the copy of the next
  batch overlaps the current step and host jitter is absorbed."""
  if data.mode == 'device':
    arrays = _place_dataset(data.train, mesh)
    return lambda step: arrays
  from byol_jax import input_pipeline  # the stream mode has imported it (TensorFlow) already
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(train_step.AXIS))
  batches = input_pipeline.prefetch_to_device(
    ((b['views'], b['labels']) for b in data.stream), STREAM_PREFETCH, sharding)
  return lambda step: next(batches)


def _meta(cfg: Any, data: data_lib.TrainData, num_steps: int, spe: int,
          faults: dict[str, int], init_knn: dict[str, float], train_sec: float) -> dict[str, Any]:
  return dict(config=checkpointing.config_to_dict(cfg), num_classes=data.num_classes,
              num_examples=data.num_examples, input_mode=data.mode,
              num_steps=num_steps, steps_per_epoch=spe,
              num_devices=jax.device_count(), process_count=jax.process_count(),
              faults=faults, saved_at=time.time(), jax_version=jax.__version__,
              knn_init={k: float(v) for k, v in init_knn.items()}, train_sec=train_sec)


def _saved_train_sec(workdir: str, step: int) -> float:
  """The training wall time that led to checkpoint `step`, summed over the run's earlier
  segments, so that `elapsed_sec` after a resume goes on from there instead of restarting at
  zero (steps redone after a crash count once). 0 for checkpoints saved before it was kept."""
  try:
    return float(checkpointing.read_metadata(workdir, step).get('train_sec', 0.0))
  except checkpointing.CheckpointError:
    return 0.0


def _saved_initial_knn(workdir: str, step: int) -> dict[str, float]:
  """The `*_init` kNN figures of a resumed run: measured once at its start and kept in every
  checkpoint's metadata, so that the evaluations after a resume (often only the final one)
  still stand beside the baseline. Checkpoints saved before they were kept there: the
  newest evaluation record that holds them, or none."""
  try:
    saved = checkpointing.read_metadata(workdir, step).get('knn_init')
  except checkpointing.CheckpointError:
    saved = None
  if saved:
    return {k: float(v) for k, v in saved.items()}
  records = _read_records(os.path.join(workdir, 'metrics', 'eval.jsonl'))
  for record in reversed(records):
    found = {k: v for k, v in record.items() if k.startswith('knn_') and k.endswith('_init')}
    if found:
      return found
  return {}


def train_and_evaluate(cfg: Any, workdir: str) -> dict[str, Any]:
  """Trains BYOL as configured (resuming from `workdir`'s checkpoints); returns the last
  train and eval records, the state and `preempted` (the step a signal stopped at)."""
  require_pretraining_config(cfg)
  configure_determinism(cfg)
  checkpointing.quiet_orbax_logs()
  mesh = train_step.make_mesh()
  validate(cfg, mesh.size)
  created = _missing_ancestors(workdir)
  prepare_workdir(workdir)
  try:
    with _trainer_lock(workdir):
      return _train(cfg, workdir, mesh)
  except WorkdirBusy:
    # Not this start's mistake: the lock file and the folder are the holder's (two trainers
    # started at once on a new workdir both found it missing), and it may not have written
    # anything else yet.
    raise
  except (ConfigError, datasets.DataError):
    _remove_if_untouched(workdir, created)
    raise


def _missing_ancestors(workdir: str) -> list[str]:
  """The folders from `workdir` up that do not exist yet, deepest first."""
  missing, path = [], os.path.abspath(workdir)
  while not os.path.exists(path) and os.path.dirname(path) != path:
    missing.append(path)
    path = os.path.dirname(path)
  return missing


def _remove_if_untouched(workdir: str, created: list[str]) -> None:
  """Removes the folders this start created when it stopped on a mistake (data not
  prepared, a bad init_from) before writing anything but its lock: a mistyped
  `--config=configs/byol.py` left an empty runs/r50 behind, which the eval worker then
  took for a trainer's workdir. Other processes' locks, or anything else, keep them."""
  if not created:
    return
  try:
    os.remove(os.path.join(workdir, f'.trainer.lock.{jax.process_index()}'))
  except OSError:
    pass
  for path in created:
    try:
      os.rmdir(path)  # only an empty folder
    except OSError:
      return


def _train(cfg: Any, workdir: str, mesh) -> dict[str, Any]:
  is_main = jax.process_index() == 0
  restored = _restore(cfg, workdir)
  start = restored.step if restored else 0
  source = None if restored else _load_init_source(cfg)
  data = data_lib.make_train_data(cfg, start_step=start)
  if restored and data.num_classes != int(restored.meta['num_classes']):
    raise ConfigError(f'{cfg.dataset} now has {data.num_classes} classes; {workdir} was '
                      f'trained on {restored.meta["num_classes"]} (its online probe): use a new '
                      f'--workdir, with --config.init_from={workdir} to start from its networks')
  if is_main:  # once the data is there: a start that fails on its data leaves no config
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(cfg.to_json_best_effort(indent=2))
    dropped = _truncate_metrics(workdir, start)
    if dropped:
      logging.info('dropped %d metric records after step %d, logged by an earlier start that '
                   'saved no checkpoint past it', dropped, start)

  num_steps = optim.total_steps(cfg, data.num_examples)
  spe = optim.steps_per_epoch(data.num_examples, cfg.batch_size)
  fns = train_step.make_step_fns(cfg, data.num_classes, num_steps, spe)
  if restored:
    state = train_step.replicate(restored.state, mesh)
  else:
    image_shape = (cfg.image_size, cfg.image_size, 3)
    init = jax.jit(lambda rng: train_step.init_state(fns, rng, image_shape),
                   out_shardings=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    state = init(jax.random.PRNGKey(cfg.seed))
    if source is not None:
      state = _warm_start(cfg, state, source, mesh)
  logging.info('parameters: %d online; LARS mask: %s', train_step.networks.count_params(
    state.online_params), optim.describe_mask(state.online_params))
  faults = _init_faults(mesh)
  if restored:
    saved = restored.meta.get('faults', {})
    faults = train_step.replicate({k: np.int32(saved.get(k, int(v)))
                                   for k, v in jax.device_get(faults).items()}, mesh)

  ckpt = checkpointing.Checkpointer(workdir, cfg.checkpoint.keep, cfg.checkpoint.keep_every_steps,
                                    cfg.multihost.barrier_timeout_secs)
  ckpt.last_saved = start or None
  try:
    with _Preemption() as preemption:
      result = _loop(cfg, workdir, mesh, data, fns, state, faults, ckpt, preemption,
                     num_steps, spe, start, is_main)
  except BaseException:
    with contextlib.suppress(checkpointing.CheckpointError):
      ckpt.close()  # the first error is the one to report; close failures are logged
    raise
  ckpt.close()
  return result


def _initial_knn(cfg: Any, state: train_step.TrainState, knn: knn_lib.KnnEval,
                 mesh) -> dict[str, float]:
  """kNN of the encoder before training (`*_init` keys), written beside every later
  evaluation so that each can be read against it."""
  # Never-updated BN statistics (mean 0, var 0) would scale every BN input by 1/sqrt(eps)
  # in inference mode; re-estimate them on the kNN training images, as the eval worker
  # and linear_eval do for the initial encoder (the training state itself is unchanged).
  init_bn, _ = common.ensure_bn_statistics(
    cfg.model, state.online_params, state.online_state, knn.calibration_batches(cfg.seed),
    cfg.image_size, knn.crop_fraction, mesh, cfg.augment, source=f'{cfg.dataset}/train')
  init_knn = {f'{k}_init': v for k, v in knn(state.online_params, init_bn).items()}
  if knn.unavailable:
    return {}
  logging.info('encoder %s: %s', f'from {cfg.init_from}' if cfg.get('init_from') else
               'at initialisation', _fmt_metrics(init_knn))
  return init_knn


_NO_KNN = ('kNN evaluation is off: %s (the online probe learns only from labelled images '
           'too). Evaluate the encoder with --worker_mode=linear_eval, or --worker_mode=eval '
           '--config.eval_dataset=NAME, on a labelled dataset.')


def _evaluate(state: train_step.TrainState, knn: knn_lib.KnnEval, init_knn: dict[str, float],
              step: int, extra: dict[str, Any], writer: metric_writers.MetricWriter) -> dict:
  """Writes and logs the kNN record of one evaluation; {} if a streamed run's first
  evaluation finds no labelled images (said once: `unavailable` stops later ones)."""
  scores = knn(state.online_params, state.online_state)
  if knn.unavailable:
    logging.warning(_NO_KNN, knn.unavailable)
    return {}
  result = {**scores, **init_knn, **extra}
  logging.info('eval at step %d: %s', step, _fmt_metrics(result))
  return writer.write(step, {**result, **knn.settings()})


def _loop(cfg, workdir, mesh, data, fns, state, faults, ckpt, preemption, num_steps, spe,
          start, is_main) -> dict[str, Any]:
  """The step loop proper; see `train_and_evaluate`."""
  if start >= num_steps:
    logging.info('nothing to train: checkpoint step %d is the final step', start)
    return dict(train={}, eval={}, state=state, preempted=None, start_step=start, signal=None,
                step=start)
  train_writer = metric_writers.MetricWriter(workdir, 'train', is_main)
  eval_writer = metric_writers.MetricWriter(workdir, 'eval', is_main)
  knn = knn_lib.KnnEval(cfg, mesh, data.train, streamed=data.mode == 'stream')
  if data.mode == 'device':
    step_fn = train_step.make_resident_step(fns, mesh, cfg.augment, cfg.batch_size,
                                            cfg.image_size)
  else:
    step_fn = train_step.make_stream_step(fns, mesh, cfg.augment)
  count_faults = _make_fault_counter(cfg.max_bad_steps)

  if start == 0:
    init_knn = (_initial_knn(cfg, state, knn, mesh)
                if cfg.eval_at_init and not knn.unavailable else {})
  else:
    init_knn = _saved_initial_knn(workdir, start)
  if knn.unavailable:  # known now, except for a streamed run without eval_at_init
    logging.warning(_NO_KNN, knn.unavailable)
  if start == 0:
    _write_preview(cfg, state, workdir, eval_writer, data, is_main)
  inputs = _input_fn(data, mesh)  # after the preview, which peeks at the stream

  progress = Progress(start, num_steps, cfg.batch_size)
  collapse = _CollapseWatch(cfg.model.projection_dim)
  loop_start = time.time() - (_saved_train_sec(workdir, start) if start else 0.0)
  clock = _SaveClock(cfg.checkpoint, num_steps, cfg.log_every_steps)
  last_train, last_eval, preempted = {}, {}, None
  logging.info('training steps %d..%d of %d (%d per epoch, global batch %d, %d devices); the '
               'first step compiles the training program (minutes for big models on CPU)',
               start + 1, num_steps, num_steps, spe, cfg.batch_size, mesh.size)
  for step in range(start + 1, num_steps + 1):
    state, metrics = step_fn(state, *inputs(step))
    faults = count_faults(faults, metrics['nonfinite'], step)
    if train_step.is_logged_step(step, fns):  # the steps whose collapse signals exist
      metrics, host_faults = fetch((metrics, faults))
      metrics.update(progress.update(step), epoch=step / spe,
                     bad_steps_in_a_row=int(host_faults['bad_in_a_row']))
      last_train = train_writer.write(step, metrics)
      logging.info('step %d/%d  loss %.4f  probe %.3f  std %.4f  rank %.1f  %.0f img/s  ETA %s',
                   step, num_steps, metrics['loss'], metrics['probe_top1'],
                   metrics['proj_std'], metrics['proj_rank'], metrics['images_per_sec'],
                   _fmt_eta(metrics['eta_sec']))
      _check_faults(host_faults, cfg.max_bad_steps, workdir, ckpt)
      if is_main:  # every process has the same metrics: one warning, not one per host
        collapse.update(metrics)
    is_eval = cfg.eval_every_steps and step % cfg.eval_every_steps == 0
    if (is_eval or step == num_steps) and not knn.unavailable:
      extra = {'epoch': step / spe, 'network': 'online', 'split': 'test',
               'dataset': cfg.dataset, 'protocol': 'knn',
               'elapsed_sec': time.time() - loop_start}
      last_eval = _evaluate(state, knn, init_knn, step, extra, eval_writer) or last_eval
    stop = preemption.reached(step, ckpt)
    if stop:
      logging.warning('%s received: saving step %d, then stopping',
                      preemption.signal_name or 'preemption', step)
    reason = clock.reason(step, preemption.reason if stop else None)
    if reason:
      host_faults = _check_faults(faults, cfg.max_bad_steps, workdir, ckpt)
      ckpt.save(state, _meta(cfg, data, num_steps, spe, host_faults, init_knn,
                             time.time() - loop_start))
      clock.saved()
      logging.info('checkpoint of step %d started (%s)', step, reason)
    if stop:
      preempted = step
      break
  train_writer.close()
  eval_writer.close()
  return dict(train=last_train, eval=last_eval, state=state, preempted=preempted,
              start_step=start, signal=preemption.signal_name, step=preempted or num_steps)


def run(cfg: Any, workdir: str) -> int:
  """`--worker_mode=train`: exit 0 when done or preempted (after saving), 3 when the loss
  diverged, 4 when a checkpoint could not be written; config errors propagate (exit 2)."""
  try:
    result = train_and_evaluate(cfg, workdir)
  except (TrainingDiverged, checkpointing.NonFiniteError) as e:
    return _fail(e, EXIT_DIVERGED)
  except checkpointing.CheckpointError as e:
    return _fail(e, EXIT_CHECKPOINT_FAILED)
  if result['preempted'] is not None:
    message = (f'{result["signal"] or "preemption"}: saved checkpoint step {result["preempted"]} '
               f'in {checkpointing.checkpoint_dir(workdir)}; rerun the same command to resume')
    print(message, file=sys.stderr)  # once, without a log prefix, as main's errors are
  elif jax.process_index() == 0:  # once for the run, not once per host
    logging.info('%s', closing_line(cfg, workdir, result['step'], result['eval']))
  return 0


# Where no preset names the run's dataset: a transfer preset (cached features, 100 epochs)
# whose dataset `--config.dataset=` (empty) replaces with the run's.
GENERIC_LINEAR_EVAL = 'cifar10 --config.dataset='


def _linear_eval_preset(cfg: Any) -> str:
  """The configs/linear_eval.py preset (and override) that evaluates a run of `cfg`'s data.

  Why not the dataset's name: 'stl10' or 'folder:/data' name no preset, and the suggested
  command ended in linear_eval's 'unknown preset'. A preset is named only where its dataset
  is the run's (TFDS config and version aside); else `GENERIC_LINEAR_EVAL`.
  """
  dataset = str(cfg.get('dataset', ''))
  if dataset == 'demo':
    return 'demo'
  try:  # configs/ is beside byol_jax in a checkout, which the command names anyway
    from configs import linear_eval as presets
  except ImportError:
    return GENERIC_LINEAR_EVAL
  from byol_jax import datasets
  base = datasets.tfds_base_name(dataset)
  if base.startswith('imagenet2012'):  # its subsets too: evaluated on ImageNet
    return 'imagenet'
  for name, (preset_dataset, *_) in presets.TRANSFER_PRESETS.items():
    if preset_dataset == dataset or (preset_dataset == base and '/' not in preset_dataset):
      return name
  return GENERIC_LINEAR_EVAL


def closing_line(cfg: Any, workdir: str, step: int, last_eval: dict[str, Any]) -> str:
  """The line that ends a finished run: the demo's last line was 'checkpoint of step 300
  started (end of training)', which left a new user to find where the run is, how it did
  and what comes next in the README. Logged once the final checkpoint is closed, so the
  commands it names find it."""
  knn = last_eval.get('knn_top1')
  knn = f', final kNN top-1 {knn:.3f}' if isinstance(knn, (int, float)) else ''
  return (f'done: {workdir} holds the final checkpoint (step {step}){knn}. Next: this command '
          f'with --worker_mode=eval, or --config=configs/linear_eval.py:'
          f'{_linear_eval_preset(cfg)} --worker_mode=linear_eval; plots: '
          f'python -m byol_jax.plot --workdir={workdir}')


def _fail(e: BaseException, code: int) -> int:
  print(f'error: {e}', file=sys.stderr)
  return code


def _fmt_metrics(metrics: dict[str, Any]) -> str:
  return '  '.join(f'{k} {v:.4f}' if isinstance(v, float) else f'{k} {v}'
                   for k, v in metrics.items())


def _write_preview(cfg, state, workdir, writer, data, is_main) -> None:
  """A PNG of view pairs from the first batch, so users see what the network sees."""
  if not is_main:
    return
  import itertools

  from byol_jax import augment  # local: keeps the import graph of this module small
  key = jax.random.PRNGKey(cfg.seed)
  if data.train is not None:
    views = jax.jit(lambda k, x: augment.make_views(k, x, cfg.augment, cfg.image_size))
    view1, view2 = views(key, data.train.images[:8])
  else:
    batch = next(data.stream)
    data.stream = itertools.chain([batch], data.stream)  # peek: the stream stays intact
    finish = jax.jit(lambda k, x: augment.finish_views(k, x, cfg.augment))
    view1, view2 = finish(key, batch['views'][:8])
  view1, view2 = np.asarray(view1), np.asarray(view2)
  path = preview.save_view_grid(os.path.join(workdir, 'preview.png'), view1, view2,
                                cfg.augment.mean, cfg.augment.std)
  writer.write_image(int(state.step), 'augmentation_preview', np.asarray(
    preview.view_grid_array(view1, view2, cfg.augment.mean, cfg.augment.std)))
  logging.info('augmentation preview: %s', path)


if __name__ == '__main__':
  from byol_jax import cli
  cli.worker_module_main('byol_jax.train')  # not __spec__.name: None when run by path
