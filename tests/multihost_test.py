"""Tests of multi-process training: 2 processes x 2 CPU devices against 1 process x 4.

The processes talk through JAX's distributed runtime on localhost and JAX's CPU
collectives (gloo), as separate hosts would. They share the tiny config and compilation
cache of checkpointing_test.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import pytest
from checkpointing_test import finish, run_flags, subprocess_env
from conftest import REPO

from byol_jax import checkpointing, multihost, train

STEPS = 6
FLAGS = {'steps': STEPS, 'multihost.peer_timeout_secs': 20.0}


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def launch(workdir, devices, process_id=None, num_processes=2, port=None, flags=None):
  """`python -m byol_jax.main` as process `process_id` (None: a single-process run)."""
  argv = [sys.executable, '-m', 'byol_jax.main', '--config=configs/byol.py:demo',
          *run_flags(workdir, **{**FLAGS, **(flags or {})})]
  if process_id is not None:
    argv += [f'--coordinator_address=localhost:{port}', f'--num_processes={num_processes}',
             f'--process_id={process_id}']
  log = open(os.path.join(tempfile.mkdtemp(), 'stderr.txt'), 'w+')
  proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=log,
                          env=subprocess_env(devices))
  proc.log = log
  return proc


def launch_pair(workdir, flags=None, flags_1=None):
  """Processes 0 and 1 of a 2-process run, 2 CPU devices each."""
  port = free_port()
  return [launch(workdir, 2, i, 2, port, {**(flags or {}), **((flags_1 or {}) if i else {})})
          for i in range(2)]


def params(workdir, step):
  return checkpointing.load_state(workdir, step)[0].online_params


def assert_close(a, b):
  """float32 agreement: collectives reduce in another order across processes, so the last
  bits differ (measured: at most 5e-7 after 6 steps); a sampling or reduction bug moves
  parameters by 1e-4 and more per step."""
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6),
                         a, b)


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """The same run as 1 process x 4 devices and as 2 processes x 2 devices, concurrently."""
  one, two = (str(tmp_path_factory.mktemp(name)) for name in ('one_process', 'two_processes'))
  procs = [launch(one, 4), *launch_pair(two)]
  results = [finish(p, timeout=600) for p in procs]
  for code, log in results:
    assert code == 0, log[-3000:]
  return one, two, results


@pytest.mark.slow
def test_two_processes_train_like_one_process_with_the_same_devices(runs):
  """Same global batch, seed and device count: params must agree to float32 tolerance.

  Breaks if a process samples or augments other rows than its devices would in one
  process, if gradients or BN statistics are not reduced across processes, or if the
  processes hold different replicas."""
  one, two, results = runs
  assert checkpointing.finalised_steps(two) == list(range(2, STEPS + 1, 2))
  assert_close(params(two, STEPS), params(one, STEPS))
  log_0, log_1 = results[1][1], results[2][1]
  assert 'process 0 of 2 joined; 2 local of 4 devices' in log_0
  last = f'step {STEPS}/{STEPS}'
  assert last in log_0 and last not in log_1  # only process 0 reports progress
  train_log = os.path.join(two, 'metrics', 'train.jsonl')
  assert [r['step'] for r in train._read_records(train_log)] == list(range(1, STEPS + 1))


@pytest.mark.slow
def test_two_process_checkpoints_restore_in_one_process(runs, tmp_path):
  """The 2-process run's step-4 checkpoint resumes in 1 process x 4 devices and reaches the
  same final params as the uninterrupted 1-process run. Breaks if checkpoints hold
  per-process pieces, or if restore needs the saving run's process count."""
  one, two, _ = runs
  workdir = str(tmp_path / 'resumed')
  shutil.copytree(two, workdir)
  for step in checkpointing.finalised_steps(workdir):
    if step > 4:
      shutil.rmtree(os.path.join(workdir, 'checkpoints', str(step)))
  code, log = finish(launch(workdir, 4), timeout=300)
  assert code == 0, log[-3000:]
  assert 'resuming from checkpoint step 4 (saved with 4 devices' in log
  assert_close(params(workdir, STEPS), params(one, STEPS))


@pytest.mark.slow
def test_two_processes_start_from_an_earlier_run(runs, tmp_path):
  """init_from in a 2-process run: each process reads the earlier run's newest checkpoint and
  the pair starts from its networks (tau held at 1 keeps the target exactly the earlier
  one). Breaks if reading another workdir's checkpoint hung orbax across the processes, or
  if the processes started from different networks."""
  one, _, _ = runs
  workdir = str(tmp_path / 'warm')
  procs = launch_pair(workdir, {'init_from': one, 'steps': 2, 'tau_base': 1.0,
                                'tau_schedule': 'constant'})
  for code, log in [finish(p, timeout=300) for p in procs]:
    assert code == 0, log[-3000:]
  new, old = (checkpointing.load_state(w)[0].target_params for w in (workdir, one))
  assert_close({m: v for m, v in new.items() if m != 'probe'},
               {m: v for m, v in old.items() if m != 'probe'})


def wait_for_step(workdir, step, procs):
  train_log = os.path.join(workdir, 'metrics', 'train.jsonl')
  deadline = time.time() + 400
  while not (os.path.exists(train_log) and train._read_records(train_log)[-1:]
             and train._read_records(train_log)[-1]['step'] >= step):
    exited = [i for i, p in enumerate(procs) if p.poll() is not None]
    if time.time() > deadline or exited:
      # Stopped first: finish(p, 1) on a live process raised TimeoutExpired, which hid why.
      why = f'process(es) {exited} exited' if exited else 'none came within 400 s'
      for p in procs:
        if p.poll() is None:
          p.kill()
      logs = [finish(p, 30)[1][-2000:] for p in procs]
      pytest.fail(f'no step {step} ({why}): ' + '\n-----\n'.join(logs))
    time.sleep(0.2)


LONG_RUN = {'steps': 2000, 'checkpoint.every_steps': 1000, 'multihost.peer_timeout_secs': 8.0}


@pytest.mark.slow
def test_a_killed_process_ends_the_others_with_a_message(tmp_path):
  """SIGKILL one process mid-run: the other must exit (code 5) naming the silent process and
  the coordinator, well before JAX's own heartbeat abort, instead of hanging."""
  workdir = str(tmp_path / 'run')
  procs = launch_pair(workdir, LONG_RUN)
  wait_for_step(workdir, 2, procs)
  procs[1].send_signal(signal.SIGKILL)
  killed_at = time.time()
  code, log = finish(procs[0], timeout=120)
  waited = time.time() - killed_at
  finish(procs[1], 5)
  assert code == multihost.EXIT_PROCESS_LOST, log[-3000:]
  # Before it, the step or a checkpoint save in flight may fail with gloo's closed connection.
  message = [line for line in log.splitlines() if line.startswith('error: ')]
  assert message and 'process 1 of 2 has not been heard from for 8 s' in message[-1], log[-2000:]
  assert 'coordinator localhost:' in message[-1]
  assert waited < 60  # JAX's heartbeat abort would come after 8 + 60 s


@pytest.mark.slow
def test_preemption_stops_all_processes_at_one_step_and_the_pair_resumes(tmp_path):
  """SIGTERM to one process: every process saves the same step and exits 0 (JAX's
  preemption sync point); the same command then resumes both from that step."""
  workdir = str(tmp_path / 'run')
  procs = launch_pair(workdir, LONG_RUN)
  wait_for_step(workdir, 2, procs)
  procs[1].send_signal(signal.SIGTERM)
  stopped = [finish(p, timeout=120) for p in procs]
  saved = checkpointing.finalised_steps(workdir)
  assert len(saved) == 1, saved
  for code, log in stopped:
    assert code == 0, log[-3000:]
    assert f'saved checkpoint step {saved[0]}' in log
  procs = launch_pair(workdir, LONG_RUN)
  wait_for_step(workdir, saved[0] + 2, procs)
  for proc in procs:
    proc.send_signal(signal.SIGTERM)
  code, log = finish(procs[0], timeout=120)
  finish(procs[1], 60)
  assert code == 0 and f'resuming from checkpoint step {saved[0]}' in log, log[-3000:]


def test_a_process_that_never_joins_times_out_with_the_coordinator_named(tmp_path):
  """Process 1 of 2 started alone: a one-line error naming the coordinator, exit 5."""
  port = free_port()
  proc = launch(str(tmp_path / 'run'), 2, 1, 2, port, {'multihost.join_timeout_secs': 3.0})
  code, log = finish(proc, timeout=120)
  assert code == multihost.EXIT_PROCESS_LOST, log[-3000:]
  assert (f'error: process 1 of 2 could not join the run at coordinator localhost:{port} '
          'within 3 s') in log
  assert sum('could not join the run' in line for line in log.splitlines()) == 1  # said once


def test_processes_started_differently_are_refused(tmp_path):
  """A different batch size on process 1: every process exits 2 naming the field."""
  procs = launch_pair(str(tmp_path / 'run'), flags_1={'batch_size': 32})
  for proc in procs:
    code, log = finish(proc, timeout=300)
    assert code == 2, log[-3000:]
    assert 'process 1: batch_size (16 -> 32)' in log and 'Traceback' not in log


PLACEMENT = r'''
import sys
import numpy as np
from byol_jax import multihost, train_step
pid, port = int(sys.argv[1]), sys.argv[2]
multihost.initialize(multihost.plan('auto', f'localhost:{port}', 2, pid), 60, 60)
import jax
mesh = train_step.make_mesh()
rows = np.arange(4 * pid, 4 * pid + 4, dtype=np.int32)  # this process's 4 rows of 8
batch = train_step.shard_process_batch(rows, mesh)
total = jax.jit(lambda x: x * (1 + jax.numpy.arange(8)), out_shardings=
                jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))(batch)
print('RESULT', batch.shape, np.asarray(total).tolist())
'''


def test_streamed_rows_of_each_process_form_the_global_batch_in_process_order():
  """Process p's host batch must become rows [4p, 4p+4) of the global batch: the order a
  single process with all devices would see. Breaks if a process's rows land elsewhere
  (e.g. the device order of the mesh is not grouped by process)."""
  port = free_port()
  procs = [subprocess.Popen([sys.executable, '-c', PLACEMENT, str(i), str(port)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=subprocess_env(2)) for i in range(2)]
  outputs = [p.communicate(timeout=120)[0] for p in procs]
  expected = f'RESULT (8,) {[i * (1 + i) for i in range(8)]}'
  for proc, out in zip(procs, outputs, strict=True):
    assert proc.returncode == 0 and expected in out, out[-2000:]


@pytest.mark.parametrize('env, expected', [
  ({}, None),
  ({'SLURM_PROCID': '0', 'SLURM_NTASKS': '1'}, None),
  ({'SLURM_PROCID': '3', 'SLURM_NTASKS': '8'}, 'SLURM'),
  ({'OMPI_COMM_WORLD_SIZE': '4'}, 'Open MPI'),
  ({'TPU_WORKER_HOSTNAMES': 'host-0'}, None),
  ({'TPU_WORKER_HOSTNAMES': 'host-0,host-1'}, 'Cloud TPU'),
])
def test_cluster_detection_reads_only_multi_process_launchers(env, expected):
  """Single-task SLURM jobs and single-host TPU VMs must stay single-process."""
  assert multihost.detected_cluster(env) == expected
  launch_plan = multihost.plan('auto', None, None, None, env)
  assert (launch_plan.source if launch_plan else None) == expected


def test_launch_flags_are_checked():
  """Explicit flags make a plan; incomplete or impossible ones are one-line errors."""
  plan = multihost.plan('auto', 'host:1234', 2, 1, {})
  assert (plan.coordinator_address, plan.num_processes, plan.process_id) == ('host:1234', 2, 1)
  assert multihost.plan('on', None, None, None, {}).source == '--multihost=on'
  assert multihost.plan('off', None, None, None, {'OMPI_COMM_WORLD_SIZE': '4'}) is None
  for args, match in [(('auto', 'host:1234', 2, None), 'missing --process_id'),
                      (('auto', 'host', 2, 0), 'HOST:PORT'),
                      (('auto', 'host:1', 2, 2), r'\[0, 2\)'),
                      (('off', 'host:1', 2, 0), 'contradicts')]:
    with pytest.raises(multihost.LaunchError, match=match):
      multihost.plan(*args, {})



def test_workdir_check_is_safe_when_processes_share_the_workdir(tmp_path):
  """Every process of a multi-process run proves the shared workdir writable at start-up.
  With one probe name for all, one process could delete another's probe mid-check (seen as
  a flaky 'not writable: No such file or directory'); here 4 processes check 300 times each
  at once and none may fail."""
  code = ('import sys\nfrom byol_jax import train\n'
          'for _ in range(300):\n  train.prepare_workdir(sys.argv[1])\n')
  procs = [subprocess.Popen([sys.executable, '-c', code, str(tmp_path)], cwd=REPO,
                            stderr=subprocess.PIPE, text=True) for _ in range(4)]
  errors = [p.communicate(timeout=120)[1] for p in procs]
  assert all(p.returncode == 0 for p in procs), errors
  assert os.listdir(tmp_path) == []  # no probe left behind
