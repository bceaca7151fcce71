"""What every command-line entry point shares: quiet start-up and one-line flag errors."""

from __future__ import annotations

import logging as std_logging
import os
import sys

from absl import flags


def quiet_startup_logs() -> None:
  """No TensorFlow or XLA start-up chatter unless the user asked for it.

  On a machine without a TPU, JAX logs at INFO that libtpu failed to load, which reads like
  an error to a CPU or GPU user; warnings and errors still come through.
  """
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  std_logging.getLogger('jax._src.xla_bridge').setLevel(std_logging.WARNING)


def _unknown_field(e: BaseException) -> str | None:
  """ml_collections' error for an unknown --config.FIELD: a KeyError (possibly inside an
  AttributeError) whose text is the quoted field, then a 'Did you mean' line if any."""
  while isinstance(e, (AttributeError, KeyError)) and e.args:
    if isinstance(e.args[0], BaseException):
      e = e.args[0]
      continue
    if not isinstance(e, KeyError) or not isinstance(e.args[0], str):
      return None
    field, _, hint = e.args[0].partition('\n')
    hint = f'. {hint.strip()}' if hint.strip() else ''
    field = field.strip('"\'')
    return f'unknown config field {field!r} in a --config.FIELD=VALUE flag{hint}'
  return None


def _exit_with(e: BaseException) -> None:
  field = _unknown_field(e)
  if field:
    e = ValueError(field)
  lines = [line.strip() for line in str(e).splitlines() if line.strip()]
  message = lines[-1] if lines else type(e).__name__
  if lines and lines[0] != message and not lines[0].startswith('flag --'):
    message = f'{lines[0]} {message}'
  print(f'error: {message} (see --help)', file=sys.stderr)
  sys.exit(2)


def define_config_flag(default: str, help_text: str):
  """`--config=FILE:PRESET` with `--config.FIELD=VALUE` overrides (ml_collections).

  ml_collections applies the overrides named on the command line while defining the flag,
  so an unknown field fails here, at import, rather than in flag parsing.
  """
  from ml_collections import config_flags
  try:
    return config_flags.DEFINE_config_file('config', default, help_text, lock_config=True)
  except (AttributeError, KeyError) as e:
    _exit_with(e)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a mistyped flag, config field, preset or config file ending
  the program with one line (exit 2) instead of a traceback."""
  try:
    rest = flags.FLAGS(argv)
    if 'config' in flags.FLAGS:  # a config file that failed to load fails on first use
      flags.FLAGS['config'].value.keys()
  except Exception as e:  # absl and ml_collections raise several types for user mistakes
    _exit_with(e)
  return rest
