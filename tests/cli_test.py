"""Tests of the command-line entry points' handling of user mistakes (cli.py)."""

import subprocess
import sys

import pytest
from conftest import REPO


def _run_main(argv: list[str], workdir) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, '-m', 'byol_jax.main', *argv, f'--workdir={workdir}'],
                        cwd=REPO, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize('argv, expected', [
  (['--config.nosuch=1'], "error: unknown config field 'nosuch'"),
  (['--config.batch_sise=1'],  # ml_collections' suggestion, unescaped, on the same line
   "error: unknown config field 'batch_sise' in a --config.FIELD=VALUE flag. "
   'Did you mean "batch_size"'),
  (['--config=configs/byol.py:nope'], "unknown preset 'nope'; valid: demo,"),
  (['--config.batch_size=abc'], "error: flag --config.batch_size=abc: invalid literal"),
  (['--config=configs/nofile.py:demo'], "No such file or directory: 'configs/nofile.py'"),
  (['--bogus=1'], "error: Unknown command line flag 'bogus'"),
])
def test_flag_mistakes_are_one_line_errors(argv, expected, tmp_path):
  """A mistyped flag, field, preset or file: exit 2 with one `error:` line, no traceback
  (a traceback wall here hides the one line that matters)."""
  proc = _run_main(argv, tmp_path)
  assert proc.returncode == 2, proc.stderr[-2000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith('error: ')]
  assert len(errors) == 1 and expected in errors[0], proc.stderr[-2000:]
  assert 'Traceback' not in proc.stderr


@pytest.mark.parametrize('argv, expected', [
  (['--config.batch_size=-3'], 'error: batch_size=-3 must be a positive multiple'),
  (['--config.dataset=folder:/nonexistent/byol'],
   'error: dataset folder /nonexistent/byol does not exist'),
])
def test_run_time_mistakes_are_said_once(argv, expected, tmp_path):
  """A bad value found after parsing (config check, missing data): exit 2 and the message
  once, as the `error:` line; a log line repeating it above doubled every such message."""
  proc = _run_main(['--config=configs/byol.py:demo', *argv], tmp_path)
  assert proc.returncode == 2, proc.stderr[-2000:]
  message = expected.removeprefix('error: ')
  mentions = [line for line in proc.stderr.splitlines() if message in line]
  assert len(mentions) == 1 and mentions[0].startswith(expected), proc.stderr[-2000:]
  assert 'Traceback' not in proc.stderr
