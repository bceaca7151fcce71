"""Several processes, one run: joining `jax.distributed`, agreeing, and never hanging.

The same command runs on every host (a TPU pod slice with `--worker=all`, one SLURM task
per node or GPU, or processes started by hand with explicit flags). This module decides
whether to join a multi-process run, joins it, checks that every process was started
with the same config and device count, and watches the other processes.

Why a watchdog of our own: when a process dies, its peers block in the next collective;
JAX's coordination service notices only after its heartbeat timeout and then aborts every
process with a C++ stack trace, and a process that never joins aborts the same way. Each
process here publishes a beat to the coordination service's key-value store from a
background thread (it runs while the main thread waits in XLA, which releases the GIL) and
reads the others'. A process silent for `peer_timeout_secs`, or a coordinator that stops
answering, ends this process with one line naming it and the coordinator, exit code 5;
JAX's own timeouts are set longer so that this message comes first.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from typing import Any

import jax
from absl import logging

EXIT_PROCESS_LOST = 5
MODES = ('auto', 'on', 'off')
_JAX_MARGIN_SECS = 60  # JAX's own join/heartbeat timeouts exceed ours by this much
_KEY = 'byol_jax'


class LaunchError(ValueError):
  """Flags or environment that cannot start a multi-process run (exit 2, one line)."""


@dataclasses.dataclass(frozen=True)
class Launch:
  """How this process joins the run; None fields are left to JAX's cluster detection."""
  coordinator_address: str | None
  num_processes: int | None
  process_id: int | None
  source: str  # 'flags', 'SLURM', 'Open MPI', 'Cloud TPU' or '--multihost=on'

  def describe(self) -> str:
    return self.coordinator_address or 'the coordinator JAX detects'


def _int_env(env: Mapping[str, str], name: str) -> int:
  try:
    return int(env.get(name, '1'))
  except ValueError:
    return 1


def detected_cluster(env: Mapping[str, str] = os.environ) -> str | None:
  """The multi-process launcher visible in the environment, if it started several processes.

  Only variables are read (no metadata-server queries): single-process jobs under SLURM or
  mpirun, and single-host TPU VMs, stay single-process. A TPU pod slice whose environment
  does not list its workers needs `--multihost=on`.
  """
  if 'SLURM_PROCID' in env and _int_env(env, 'SLURM_NTASKS') > 1:
    return 'SLURM'
  if _int_env(env, 'OMPI_COMM_WORLD_SIZE') > 1:
    return 'Open MPI'
  if ',' in env.get('TPU_WORKER_HOSTNAMES', '') or env.get('MEGASCALE_COORDINATOR_ADDRESS'):
    return 'Cloud TPU'
  return None


def plan(mode: str, coordinator_address: str | None, num_processes: int | None,
         process_id: int | None, env: Mapping[str, str] = os.environ) -> Launch | None:
  """Whether and how to call `jax.distributed.initialize` (None: single process)."""
  if mode not in MODES:
    raise LaunchError(f'--multihost must be one of {", ".join(MODES)}, not {mode!r}')
  given = {'--coordinator_address': coordinator_address, '--num_processes': num_processes,
           '--process_id': process_id}
  if mode == 'off':
    if any(v is not None for v in given.values()):
      raise LaunchError('--multihost=off contradicts ' +
                        ', '.join(k for k, v in given.items() if v is not None))
    return None
  if any(v is not None for v in given.values()):
    missing = [k for k, v in given.items() if v is None]
    if missing and detected_cluster(env) is None:
      raise LaunchError(f'a multi-process run started by hand needs all of {", ".join(given)}; '
                        f'missing {", ".join(missing)}')
    _check_flags(coordinator_address, num_processes, process_id)
    return Launch(coordinator_address, num_processes, process_id, 'flags')
  source = detected_cluster(env)
  if source is None and mode == 'on':
    source = '--multihost=on'
  return None if source is None else Launch(None, None, None, source)


def _check_flags(address: str | None, count: int | None, pid: int | None) -> None:
  if address is not None and (':' not in address or not address.rsplit(':', 1)[1].isdigit()):
    raise LaunchError(f'--coordinator_address must be HOST:PORT, not {address!r}')
  if count is not None and count < 1:
    raise LaunchError(f'--num_processes must be at least 1, not {count}')
  if pid is not None and count is not None and not 0 <= pid < count:
    raise LaunchError(f'--process_id must lie in [0, {count}), not {pid}')


# ------------------------------------------------------------------------- exits


def _exit_now(message: str, code: int = EXIT_PROCESS_LOST, tell_peers: bool = True) -> None:
  """Ends the process from any thread (the main thread may be stuck in a collective),
  telling the other processes first, and without JAX's exit-time shutdown barrier, which
  would wait for a process that is gone."""
  if message:  # once, as the one `error:` line (no log line repeating it)
    print(f'error: {message}', file=sys.stderr, flush=True)
  if tell_peers:
    _publish('failed')
  logging.flush()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)


def _beat_key(pid: int) -> str:
  return f'{_KEY}/beat/{pid}'


def _publish(value: str) -> None:
  """This process's beat: a counter while it works, then 'done' or 'failed'."""
  state = _global_state()  # not jax.process_index(): that would start backends mid-join
  if state.client is None:
    return
  try:
    state.client.key_value_set(_beat_key(state.process_id), value, allow_overwrite=True)
  except Exception:  # the coordinator may be gone; nobody is left to tell
    pass


class _Deadline:
  """Calls `_exit_now(message())` unless the block finishes within `seconds`."""

  def __init__(self, seconds: float, message: Callable[[], str]):
    self._timer = threading.Timer(seconds, lambda: _exit_now(message(), tell_peers=False))
    self._timer.daemon = True

  def __enter__(self) -> _Deadline:
    self._timer.start()
    return self

  def __exit__(self, *exc) -> None:
    self._timer.cancel()


# ----------------------------------------------------------------------- joining


def initialize(launch: Launch, join_timeout: float, peer_timeout: float) -> None:
  """Joins the run, or exits with a message naming the coordinator after `join_timeout`."""
  who = (f'process {launch.process_id} of {launch.num_processes}'
         if launch.process_id is not None else 'this process')

  def message() -> str:
    return (f'{who} could not join the run at coordinator {launch.describe()} within '
            f'{join_timeout:.0f} s: not every process started, or the address is unreachable '
            f'(start all processes with the same --coordinator_address and --num_processes)')

  logging.info('joining a multi-process run (%s) at %s', launch.source, launch.describe())
  with _Deadline(join_timeout, message):
    jax.distributed.initialize(
      launch.coordinator_address, launch.num_processes, launch.process_id,
      initialization_timeout=int(join_timeout) + _JAX_MARGIN_SECS,
      heartbeat_timeout_seconds=int(peer_timeout) + _JAX_MARGIN_SECS)
  logging.info('process %d of %d joined; %d local of %d devices', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def coordinator_address() -> str:
  """The address JAX resolved, from the flags or by auto-detection."""
  return str(getattr(_global_state(), 'coordinator_address', None) or '?')


def _global_state():
  from jax._src import distributed  # orbax and multihost_utils use the same client
  return distributed.global_state


def _client():
  client = _global_state().client
  if client is None:
    raise RuntimeError('jax.distributed is not initialised')
  return client


# ------------------------------------------------------------------- agreement


def check_agreement(facts: dict[str, Any], timeout: float,
                    describe: Callable[[dict[str, Any], dict[str, Any]], list[str]]) -> None:
  """Raises LaunchError on every process when any process's `facts` differ from process 0's.

  `describe(process_0_facts, these_facts)` names the differences (e.g. config fields).
  """
  if jax.process_count() == 1:
    return
  client, me = _client(), jax.process_index()
  client.key_value_set(f'{_KEY}/facts/{me}', json.dumps(facts, sort_keys=True))
  every = [json.loads(client.blocking_key_value_get(f'{_KEY}/facts/{pid}', int(timeout * 1000)))
           for pid in range(jax.process_count())]
  problems = [f'process {pid}: {"; ".join(differences)}'
              for pid, theirs in enumerate(every) if (differences := describe(every[0], theirs))]
  if problems:
    raise LaunchError('the processes of this run were started differently, compared with '
                      f'process 0: {" | ".join(problems)}; start every process with the same '
                      'command')


# --------------------------------------------------------------------- barriers

_barrier_count = [0]


def barrier(name: str, timeout: float) -> None:
  """All processes wait here; one that does not arrive within `timeout` ends this process."""
  if jax.process_count() == 1:
    return
  _barrier_count[0] += 1
  barrier_id = f'{_KEY}/{name}/{_barrier_count[0]}'
  try:
    _client().wait_at_barrier(barrier_id, int(timeout * 1000))
  except Exception as e:  # the client raises its own status errors
    _exit_now(f'not every process reached "{name}" within {timeout:.0f} s (coordinator '
              f'{coordinator_address()}): {str(e).splitlines()[0][:200]}')


# --------------------------------------------------------------------- watchdog


class PeerWatch:
  """Background beats through the coordination service; see the module docstring.

  Use as a context manager around the work and set `exit_code`. A clean exit marks this
  process 'done', so that peers still saving or evaluating do not take its silence for a
  failure. An exception or a nonzero exit code marks it 'failed' (peers would wait for it
  in their next collective, so they stop too, after a grace period in which an error that
  every process meets ends each one with its own message); it then waits until every peer
  has finished or failed, or one has gone silent (reported as lost, exit 5), and ends the
  process with its exit code without JAX's exit-time barrier.
  """

  def __init__(self, timeout: float, interval: float | None = None):
    self.timeout = timeout  # 0: no watch (a single-process run)
    self.interval = interval or max(0.5, min(5.0, timeout / 5))
    self.exit_code = 0
    self._stop, self._failed = threading.Event(), threading.Event()
    self._thread: threading.Thread | None = None

  def __enter__(self) -> PeerWatch:
    if self.timeout > 0 and jax.process_count() > 1:
      self._thread = threading.Thread(target=self._run, name='byol_jax-peer-watch', daemon=True)
      self._thread.start()
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if self._thread is None:
      return
    if exc_type is None and self.exit_code == 0:
      self._stop.set()
      self._thread.join()
      _publish('done')
      return
    if exc_type is not None:
      traceback.print_exception(exc_type, exc, tb)
    self._failed.set()
    self._thread.join(self.timeout + 4 * self.interval)
    if jax.process_index() == 0:
      time.sleep(self.interval)  # the coordinator leaves last: the others may still ask it
    _exit_now('', self.exit_code or 1)

  def _run(self) -> None:
    client, me, count = _client(), jax.process_index(), jax.process_count()
    peers = [p for p in range(count) if p != me]
    seen = {p: (None, time.monotonic()) for p in peers}  # last value, when it last changed
    unreachable_since, beat = None, 0
    while not self._stop.is_set():
      failing, now, beat = self._failed.is_set(), time.monotonic(), beat + 1
      try:
        client.key_value_set(_beat_key(me), 'failed' if failing else str(beat),
                             allow_overwrite=True)
        values = {p: self._read(client, p) for p in peers}
        unreachable_since = None
      except Exception as e:  # the coordinator (process 0) stopped answering
        if failing:
          return
        unreachable_since = unreachable_since or now
        if now - unreachable_since > self.timeout:
          _exit_now(f'process {me} of {count} lost the coordinator at {coordinator_address()} '
                    f'for {self.timeout:.0f} s ({str(e).splitlines()[0][:120]}); process 0 '
                    f'has probably stopped: check its log, then rerun the same command on '
                    f'every process to resume from the last checkpoint')
        self._failed.wait(self.interval)
        continue
      for p, value in values.items():
        if value != seen[p][0]:
          seen[p] = (value, now)
      self._check(seen, now, me, count, failing)
      if failing and all(value in ('done', 'failed') for value, _ in seen.values()):
        return
      if failing:
        time.sleep(self.interval)
      else:
        self._failed.wait(self.interval)  # a failure of this process wakes the watch at once

  def _check(self, seen: dict, now: float, me: int, count: int, failing: bool) -> None:
    for p, (value, since) in seen.items():
      if value not in ('done', 'failed') and now - since > self.timeout:
        _exit_now(f'process {p} of {count} has not been heard from for {self.timeout:.0f} s '
                  f'(coordinator {coordinator_address()}); stopping process {me} too: check '
                  f'process {p}\'s log, then rerun the same command on every process to '
                  f'resume from the last checkpoint')
      if value == 'failed' and not failing and now - since > 2 * self.interval:
        _exit_now(f'process {p} of {count} stopped with an error (see its log); stopping '
                  f'process {me} too')

  @staticmethod
  def _read(client, pid: int) -> str | None:
    try:
      return client.key_value_try_get(_beat_key(pid))
    except Exception as e:
      if 'NOT_FOUND' in str(e) or 'not found' in str(e).lower():
        return None  # that process has not published its first beat yet
      raise
