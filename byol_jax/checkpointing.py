"""Checkpoints of the training state: save, retain, find, verify and restore.

Layout: orbax's `CheckpointManager` writes `<workdir>/checkpoints/<step>/` with two items:

- `state`: the `TrainState` (step, rng, online/target params and BN state, optimiser state).
  It is replicated, so one copy is written, and it is always restored to host (numpy)
  arrays: the caller replicates it onto whatever mesh it runs on, so a run saved on 8
  devices resumes on 1 and back.
- `meta`: JSON with the run's config, what a fresh process needs to rebuild the state's
  structure (`num_classes`, `num_examples`, `num_steps`), the host loop's fault counters,
  and a fingerprint of the state (below).

Orbax writes into `<step>.orbax-checkpoint-tmp` and renames it when every item is
complete, so a step directory is finalised by construction and a crash mid-save leaves the
previous checkpoints alone; old checkpoints are deleted only after a newer one is
finalised. Saves are asynchronous: `save` returns once the arrays are copied to host
memory, and the files are written in the background. In multi-process runs orbax
coordinates the processes; only process 0 writes the JSON.

Why a fingerprint: a finalised checkpoint can still be damaged later (a truncated or
removed file). Truncation fails on read, but a removed data chunk can read back as zeros
without any error. The wrapping uint32 sum of each leaf's bit pattern is exact and
independent of the reduction order, costs one reduction on the device per save, and is
compared after every restore.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging as std_logging
import os
import shlex
import shutil
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from absl.logging import get_absl_handler
from etils import epath

from byol_jax import cli, config_compat, train_step

CHECKPOINT_SUBDIR = 'checkpoints'
UNUSABLE_SUBDIR = 'checkpoints_unusable'  # damaged checkpoints are moved here, not deleted
FORMAT_VERSION = 1
_STATE, _META = 'state', 'meta'
_TMP_MARK = ocp.path.step.TMP_DIR_SUFFIX

# Config fields that define the trajectory: resuming with any of them changed would not
# continue the saved run (other shapes, schedule, data order or augmentations), so it is
# refused. Every other field (logging, evaluation, checkpointing, fault handling, data_dir)
# may change between runs and is only reported.
TRAJECTORY_FIELDS = (
  'model', 'optimizer', 'batch_size', 'epochs', 'steps', 'seed', 'dataset', 'image_size',
  'loss', 'infonce_temperature', 'tau_base', 'tau_schedule', 'augment', 'precision', 'demo',
  'input_mode', 'shuffle_buffer', 'target_init', 'pretrain_split',
)




class CheckpointError(RuntimeError):
  """A checkpoint could not be written or read; the message says which one and why."""


class NoCheckpointError(CheckpointError, FileNotFoundError):
  """The workdir has no finalised (complete) checkpoint."""


class NonFiniteError(RuntimeError):
  """The state went non-finite; raised instead of saving a poisoned state."""


@dataclasses.dataclass
class Scan:
  """What a checkpoint directory holds right now."""
  finalised: list[int]  # ascending
  unfinished: list[str]  # folder names of saves that never completed (or are in progress)


@dataclasses.dataclass
class Restored:
  """The newest usable checkpoint: host state, its metadata, and what was passed over."""
  state: train_step.TrainState
  meta: dict[str, Any]
  step: int
  skipped: list[tuple[int, str]]  # (step, reason) of newer, unusable checkpoints


class _OrbaxChatter:
  """Drops orbax's INFO records (about ten per save); its warnings and errors pass, without
  their tracebacks, and the asyncio records of orbax's tasks go: a failed save (a full disk)
  logged hundreds of lines around the one-line error that says what happened
  (`describe_write_failure`). `-v 1` shows everything. (tensorstore's own tracebacks of
  callbacks into the closed event loop are printed by C++ and still show.)"""

  def filter(self, record) -> bool:
    from_orbax = f'{os.sep}orbax{os.sep}' in record.pathname
    if record.levelno < std_logging.WARNING:
      return not from_orbax
    if record.name == 'asyncio' and f'{os.sep}orbax{os.sep}' in record.getMessage():
      return False  # 'Task exception was never retrieved': orbax's tasks of a failed save
    if record.exc_info and from_orbax:
      record.exc_info, record.exc_text = None, None
      record.msg = f'{record.msg} (its traceback: -v 1)'
    return True


def quiet_orbax_logs() -> None:
  """Keeps the run's log readable at the default verbosity (`-v 1` shows everything)."""
  handler = get_absl_handler()
  if logging.get_verbosity() <= logging.INFO and not any(
      isinstance(f, _OrbaxChatter) for f in handler.filters):
    handler.addFilter(_OrbaxChatter())


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), CHECKPOINT_SUBDIR)


def not_a_run_hint(workdir: str, flags: tuple[str, str] | None = None) -> str:
  """Why `workdir` holds no checkpoints when it is a mistyped path or one checkpoint's own
  folder (`RUN/checkpoints/300`, which the tools took for a run and then found nothing in
  `RUN/checkpoints/300/checkpoints`); '' otherwise. `flags` (the run's and the step's flag)
  name the command line that means that checkpoint."""
  parent, step = os.path.split(os.path.normpath(workdir))
  run, name = os.path.split(parent)
  if name != CHECKPOINT_SUBDIR or not step.isdigit():
    return '' if os.path.isdir(workdir) else f' ({workdir} does not exist)'
  what = f' ({workdir} is checkpoint step {int(step)} of the run {run or "."}: pass '
  if flags:
    return what + f'the run and the step, {flags[0]}={run or "."} {flags[1]}={int(step)})'
  return what + "the run's folder, and that step if it is not the newest)"


def scan(workdir: str) -> Scan:
  """Lists finalised steps and unfinished save folders without reading any arrays."""
  root = checkpoint_dir(workdir)
  try:
    names = sorted(os.listdir(root))
  except (FileNotFoundError, NotADirectoryError):
    return Scan([], [])
  finalised, unfinished = [], []
  for name in names:
    path = os.path.join(root, name)
    if name.isdigit() and _is_finalised(path):
      finalised.append(int(name))
    elif _TMP_MARK in name or name.isdigit():
      unfinished.append(name)
  return Scan(sorted(finalised), unfinished)


def _is_finalised(path: str) -> bool:
  """Orbax's own commit test (rename or commit file) plus both items present."""
  try:
    return (ocp.path.step.is_path_finalized(epath.Path(path))
            and all(os.path.isdir(os.path.join(path, item)) for item in (_STATE, _META)))
  except OSError:  # vanished while we looked (retention deleting it)
    return False


def finalised_steps(workdir: str) -> list[int]:
  """Steps of the complete checkpoints under `<workdir>/checkpoints`, ascending."""
  return scan(workdir).finalised


# ----------------------------------------------------------------------------- configs


def config_to_dict(cfg: Any) -> dict[str, Any]:
  """A JSON-safe dict of a ConfigDict (tuples become lists)."""
  return json.loads(cfg.to_json_best_effort())


def config_from_dict(d: dict[str, Any]) -> ml_collections.ConfigDict:
  """Inverse of `config_to_dict`: lists go back to tuples, as the presets write them."""

  def fix(x):
    if isinstance(x, dict):
      return {k: fix(v) for k, v in x.items()}
    if isinstance(x, list):
      return tuple(fix(v) for v in x)
    return x

  return ml_collections.ConfigDict(fix(d))


def _flatten(d: dict[str, Any], prefix: str = '') -> dict[str, Any]:
  out = {}
  for key, value in d.items():
    if isinstance(value, dict):
      out.update(_flatten(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


_UNSET = '<unset>'


def _changed_fields(saved: Any, current: Any) -> tuple[dict, dict, list[str]]:
  """Both configs flattened, the saved one completed as config_compat's tables say, and the
  fields whose values differ, less those that neither config reads."""
  a = _flatten(config_to_dict(saved) if not isinstance(saved, dict) else saved)
  b = _flatten(config_to_dict(current) if not isinstance(current, dict) else current)
  a = {**{k: v for k, v in config_compat.ADDED_FIELD_DEFAULTS.items() if k in b}, **a}
  removed = config_compat.REMOVED_FIELD_VALUES
  a = {k: v for k, v in a.items() if not (k in removed and k not in b and v == removed[k])}
  unread = config_compat.unread_fields(a) & config_compat.unread_fields(b)
  return a, b, [k for k in sorted(set(a) | set(b))
                if a.get(k, _UNSET) != b.get(k, _UNSET) and k not in unread]


def _is_trajectory(field: str) -> bool:
  return field.split('.')[0] in TRAJECTORY_FIELDS


def config_differences(saved: Any, current: Any) -> tuple[list[str], list[str]]:
  """(trajectory changes, other changes) between two configs, as 'field (old -> new)'."""
  a, b, changed = _changed_fields(saved, current)
  fmt = lambda k: f'{k} ({a.get(k, _UNSET)!r} -> {b.get(k, _UNSET)!r})'
  return ([fmt(k) for k in changed if _is_trajectory(k)],
          [fmt(k) for k in changed if not _is_trajectory(k)])


def saved_value_flags(saved: Any, current: Any) -> list[str]:
  """The `--config.FIELD=VALUE` flags that put the saved trajectory values back, for the
  fields that the current config can set (a field the code no longer has cannot be),
  quoted for a shell where needed (a tuple's parentheses)."""
  a, b, changed = _changed_fields(saved, current)

  def text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
      return '(' + ','.join(text(v) for v in value) + ('' if len(value) != 1 else ',') + ')'
    return str(value)

  return [shlex.quote(f'--config.{k}={text(a[k])}') for k in changed
          if _is_trajectory(k) and k in a and k in b]


# ------------------------------------------------------------------- state and checks


def state_template(cfg: Any, num_classes: int) -> train_step.TrainState:
  """Shapes and dtypes of a run's TrainState, without computing anything.

  The optimiser state's structure does not depend on the schedule, so any step count
  builds the same template.
  """
  fns = train_step.make_step_fns(cfg, num_classes, num_steps=1, steps_per_epoch=1)
  image_shape = (cfg.image_size, cfg.image_size, 3)
  return jax.eval_shape(lambda rng: train_step.init_state(fns, rng, image_shape),
                        jax.random.PRNGKey(0))


def _leaf_sum_device(x: jax.Array) -> jax.Array:
  if x.dtype == jnp.bool_:
    return jnp.sum(x.astype(jnp.uint32), dtype=jnp.uint32)
  width = {1: jnp.uint8, 2: jnp.uint16}.get(x.dtype.itemsize, jnp.uint32)
  bits = jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32)
  return jnp.sum(bits, dtype=jnp.uint32)


def _leaf_sum_host(x: np.ndarray) -> int:
  x = np.ascontiguousarray(x)
  if x.dtype == np.bool_:
    return int(x.astype(np.uint32).sum(dtype=np.uint32))
  width = {1: np.uint8, 2: np.uint16}.get(x.dtype.itemsize, np.uint32)
  return int(x.view(width).astype(np.uint32).sum(dtype=np.uint32))


@jax.jit
def inspect_state(tree: Any) -> tuple[jax.Array, jax.Array]:
  """(every float is finite, per-leaf fingerprint) of a state, computed on the devices."""
  leaves = jax.tree_util.tree_leaves(tree)
  finite = [jnp.all(jnp.isfinite(x)) for x in leaves if jnp.issubdtype(x.dtype, jnp.inexact)]
  sums = [_leaf_sum_device(x) for x in leaves]
  return jnp.all(jnp.stack(finite)), jnp.stack(sums)


def fingerprint_host(tree: Any) -> list[int]:
  """The same fingerprint as `inspect_state`, of host arrays (after a restore)."""
  return [_leaf_sum_host(np.asarray(x)) for x in jax.tree_util.tree_leaves(tree)]


def _verify(tree: Any, expected: Sequence[int]) -> None:
  got = fingerprint_host(tree)
  if len(got) != len(expected):
    raise CheckpointError(f'{len(got)} arrays restored, {len(expected)} saved')
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
  bad = [p for p, g, e in zip(paths, got, expected, strict=True) if g != int(e)]
  if bad:
    raise CheckpointError(f'content does not match its fingerprint ({len(bad)} arrays differ, '
                          f'first {bad[0]}): a data file was damaged or removed')


# ----------------------------------------------------------------------------- reading


def _step_path(workdir: str, step: int) -> str:
  return os.path.join(checkpoint_dir(workdir), str(step))


def _read_meta(path: str) -> dict[str, Any]:
  meta = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(
    epath.Path(path) / _META, args=ocp.args.JsonRestore())
  if not isinstance(meta, dict) or 'config' not in meta:
    raise CheckpointError('metadata is missing or not from this program')
  return meta


def _read_state(path: str, template: train_step.TrainState,
                fingerprint: Sequence[int]) -> train_step.TrainState:
  item = template._asdict()
  restore_args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
  with ocp.PyTreeCheckpointer() as checkpointer:
    tree = checkpointer.restore(epath.Path(path) / _STATE,
                                args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args))
  state = train_step.TrainState(**tree)
  _verify(state, fingerprint)
  return state


def _short(e: BaseException, limit: int = 300) -> str:
  text = ' '.join(f'{type(e).__name__}: {e}'.split())
  return text if len(text) <= limit else text[:limit] + '...'


def read_metadata(workdir: str, step: int) -> dict[str, Any]:
  """The JSON metadata of one finalised checkpoint (config, sizes, counters)."""
  try:
    return _read_meta(_step_path(workdir, step))
  except CheckpointError:
    raise
  except Exception as e:  # orbax/tensorstore raise many types for a damaged file
    raise CheckpointError(f'checkpoint step {step} in {checkpoint_dir(workdir)}: '
                          f'unreadable metadata ({_short(e)})') from e


def read_checkpoint(workdir: str, step: int,
                    template_fn: Callable[[dict[str, Any]], train_step.TrainState],
                    check_meta: Callable[[dict[str, Any]], None] | None = None,
                    ) -> tuple[train_step.TrainState, dict[str, Any]]:
  """Host state and metadata of one checkpoint; any damage is a `CheckpointError`.

  `template_fn(meta)` gives the structure to restore into; `check_meta(meta)` may refuse a
  checkpoint before its arrays are read (its exceptions propagate unchanged).
  """
  meta = read_metadata(workdir, step)
  if check_meta is not None:
    check_meta(meta)
  path = _step_path(workdir, step)
  try:
    state = _read_state(path, template_fn(meta), meta['fingerprint'])
  except CheckpointError as e:
    raise CheckpointError(f'checkpoint step {step}: {e}') from e
  except train_step.networks.UnknownEncoder:
    raise  # the run's encoder, not its checkpoint: every checkpoint would read as damaged
  except Exception as e:
    if not os.path.isdir(path):
      raise CheckpointError(f'checkpoint step {step} was deleted while being read') from e
    raise CheckpointError(f'checkpoint step {step}: unreadable ({_short(e)})') from e
  if int(state.step) != step:
    raise CheckpointError(f'checkpoint step {step} holds a state of step {int(state.step)}')
  return state, meta


def restore_latest(workdir: str,
                   template_fn: Callable[[dict[str, Any]], train_step.TrainState],
                   check_meta: Callable[[dict[str, Any]], None] | None = None,
                   ) -> Restored | None:
  """The newest checkpoint that reads back intact; None when there is none at all.

  Damaged checkpoints are passed over (newest first) and reported in `skipped`, so a
  crash or a bad disk costs the steps since the previous checkpoint, not the run.
  Raises NoCheckpointError if checkpoints exist but none is usable.
  """
  found = scan(workdir)
  for name in found.unfinished:
    logging.warning('checkpoints: skipping unfinished save %s', name)
  skipped = []
  for step in reversed(found.finalised):
    try:
      state, meta = read_checkpoint(workdir, step, template_fn, check_meta)
    except CheckpointError as e:
      logging.warning('checkpoints: skipping step %d: %s', step, e)
      skipped.append((step, str(e)))
      continue
    return Restored(state, meta, step, skipped)
  if skipped:
    raise NoCheckpointError(f'no usable checkpoint in {checkpoint_dir(workdir)}: '
                            + '; '.join(reason for _, reason in skipped))
  return None


def load_state(workdir: str, step: int | None = None, run_flags: tuple[str, str] | None = None,
               ) -> tuple[train_step.TrainState, ml_collections.ConfigDict, int]:
  """(host TrainState, the run's config, step) of `step`, or of the newest usable checkpoint.

  Works in a fresh process that knows only the workdir: the structure is rebuilt from the
  saved config and metadata. With `step=None` damaged newer checkpoints are skipped (and
  logged); an explicit step must be intact. `run_flags`: the caller's flags for the run and
  the step, which a path that is one checkpoint's folder is told to use (`not_a_run_hint`).
  """
  if message := cli.remote_path_error(workdir):
    raise NoCheckpointError(message)
  template_fn = lambda meta: state_template(config_from_dict(meta['config']),
                                            int(meta['num_classes']))
  if step is None:
    restored = restore_latest(workdir, template_fn)
    if restored is None:
      raise NoCheckpointError(f'no finalised checkpoint in {checkpoint_dir(workdir)}'
                              f'{not_a_run_hint(workdir, run_flags)}')
    state, meta, step = restored.state, restored.meta, restored.step
  else:
    steps = finalised_steps(workdir)
    if step not in steps:
      have = f' (finalised: {", ".join(map(str, steps))})' if steps else ''
      hint = not_a_run_hint(workdir, run_flags)
      raise NoCheckpointError(f'no finalised checkpoint for step {step} in '
                              f'{checkpoint_dir(workdir)}{have}{hint}')
    state, meta = read_checkpoint(workdir, step, template_fn)
  return state, config_from_dict(meta['config']), step


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config saved with the newest finalised checkpoint whose metadata is readable."""
  steps = finalised_steps(workdir)
  for step in reversed(steps):
    try:
      return config_from_dict(read_metadata(workdir, step)['config'])
    except CheckpointError as e:
      logging.warning('checkpoints: skipping step %d: %s', step, e)
  raise NoCheckpointError(f'no readable checkpoint in {checkpoint_dir(workdir)}')


def set_aside(workdir: str, steps: Sequence[int]) -> None:
  """Moves damaged checkpoints out of the way (kept for inspection), so their step
  numbers can be saved again and nothing reads them by mistake."""
  if not steps or jax.process_index() != 0:
    return
  target = os.path.join(os.path.abspath(workdir), UNUSABLE_SUBDIR)
  os.makedirs(target, exist_ok=True)
  stamp = datetime.datetime.now().strftime('%Y%m%d-%H%M%S')
  for step in steps:
    dst = os.path.join(target, f'{step}-{stamp}')
    shutil.move(_step_path(workdir, step), dst)
    logging.warning('checkpoints: moved damaged step %d to %s', step, dst)


# ----------------------------------------------------------------------------- writing


def _preservation_policy(keep: int, keep_every_steps: int):
  """The newest `keep` (0: all) plus every multiple of `keep_every_steps` (0: none)."""
  policies = ocp.checkpoint_managers
  latest = policies.LatestN(n=keep if keep > 0 else None)
  if keep_every_steps <= 0:
    return latest
  return policies.AnyPreservationPolicy([latest, policies.EveryNSteps(keep_every_steps)])


def describe_write_failure(e: BaseException) -> str:
  """A one-line cause of a failed save, naming disk-full and read-only explicitly."""
  text = ' '.join(str(x) for x in _chain(e))
  errnos = {getattr(x, 'errno', None) for x in _chain(e)}
  if errnos & {28} or 'No space left' in text or "os_error_code='28'" in text:
    return 'the disk is full (ENOSPC)'
  if errnos & {30} or 'Read-only file system' in text or "os_error_code='30'" in text:
    return 'the file system is read-only (EROFS)'
  if errnos & {13} or 'Permission denied' in text or "os_error_code='13'" in text:
    return 'permission denied (EACCES)'
  return _short(e)


def _chain(e: BaseException | None):
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    yield e
    e = e.__cause__ or e.__context__


class Checkpointer:
  """Asynchronous, retained saves of one run's TrainState (all processes construct it).

  Construct it after restoring: it removes unfinished save folders left by a killed
  process. Every save is checked first: a non-finite state is never written.
  """

  def __init__(self, workdir: str, keep: int, keep_every_steps: int,
               barrier_timeout_secs: float = 1200.0):
    self.workdir, self.directory = workdir, checkpoint_dir(workdir)
    for name in scan(workdir).unfinished:
      logging.warning('checkpoints: removing unfinished save %s (its process died mid-save)',
                      name)
    options = ocp.CheckpointManagerOptions(
      preservation_policy=_preservation_policy(keep, keep_every_steps), create=True,
      cleanup_tmp_directories=True, enable_async_checkpointing=True,
      # the processes' wait for each other around a save (multi-process runs) is bounded
      async_options=ocp.AsyncOptions(timeout_secs=int(barrier_timeout_secs)))
    try:
      self._manager = ocp.CheckpointManager(self.directory, options=options,
                                            item_names=(_STATE, _META))
    except Exception as e:
      raise CheckpointError(f'cannot open checkpoint directory {self.directory}: '
                            f'{describe_write_failure(e)}') from e
    self.last_saved: int | None = None

  def save(self, state: train_step.TrainState, meta: dict[str, Any]) -> None:
    """Starts an asynchronous save of `state`; returns when the arrays are on the host.

    Raises NonFiniteError (nothing written) if any float in the state is not finite, and
    CheckpointError (previous checkpoints intact) if the write fails, including a failure
    of the previous asynchronous save that surfaces here.
    """
    finite, sums = jax.device_get(inspect_state(state))
    step = int(jax.device_get(state.step))
    if not bool(finite):
      raise NonFiniteError(f'the state at step {step} is not finite; it was not saved')
    meta = dict(meta, step=step, format=FORMAT_VERSION, fingerprint=[int(s) for s in sums])
    args = ocp.args.Composite(**{_STATE: ocp.args.PyTreeSave(state._asdict()),
                                 _META: ocp.args.JsonSave(meta)})
    self.wait()  # orbax waits for the previous save anyway; this names it if it failed
    try:
      self._manager.save(step, args=args, force=True)
    except Exception as e:
      raise self._write_error(step, e) from e
    self.last_saved = step

  def wait(self) -> None:
    """Blocks until pending saves are finalised; a failed one raises CheckpointError."""
    try:
      self._manager.wait_until_finished()
    except Exception as e:
      raise self._write_error(self.last_saved, e) from e

  def close(self) -> None:
    """Waits for pending saves and releases orbax's threads; failures raise."""
    try:
      self.wait()
    finally:
      try:
        self._manager.close()
      except Exception as e:
        raise self._write_error(self.last_saved, e) from e

  def reached_preemption(self, step: int) -> bool:
    """Multi-process runs: whether JAX's preemption service asks every process to stop."""
    return bool(self._manager.reached_preemption(step))

  def _write_error(self, step: int | None, e: BaseException) -> CheckpointError:
    intact = finalised_steps(self.workdir)
    return CheckpointError(
      f'saving checkpoint step {step} in {self.directory} failed: {describe_write_failure(e)}; '
      f'finalised checkpoints left intact: {intact or "none"}')
