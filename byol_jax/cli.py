"""What every command-line entry point shares: quiet start-up and one-line flag errors."""

from __future__ import annotations

import contextlib
import logging as std_logging
import os
import re
import shlex
import sys
import tempfile
import traceback

from absl import flags

# The checkout an editable install runs from; configs/ lives here.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def quiet_startup_logs() -> None:
  """No TensorFlow or XLA start-up chatter unless the user asked for it.

  On a machine without a TPU, JAX logs at INFO that libtpu failed to load, which reads like
  an error to a CPU or GPU user; warnings and errors still come through.
  """
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  std_logging.getLogger('jax._src.xla_bridge').setLevel(std_logging.WARNING)


# Abseil's C++ log line before its logging is initialised: no date or time, only the epoch.
_ABSL_LINE = re.compile(r'^([IWEF])0000 00:00:[\d.]+ +\d+ +([\w.]+):\d+\]')
_ABSL_PRE_INIT = 'WARNING: All log messages before absl::InitializeLog() is called'


def tensorflow_start_up_lines_kept(text: str, min_level: int) -> list[str]:
  """The lines of TensorFlow's C++ start-up output that TF_CPP_MIN_LOG_LEVEL lets through.

  TensorFlow 2.20+ logs its start-up (oneDNN, the CUDA stubs) through Abseil before
  Abseil's logging is initialised, and those lines ignore TF_CPP_MIN_LOG_LEVEL. They are
  filtered here as that variable says: 1 drops INFO, 2 also WARNING, 3 also ERROR. Lines
  from TensorFlow's CUDA layer go whatever their level, since TensorFlow is kept off the
  accelerators (a CPU host's "failed call to cuInit" is not the user's problem). Every other
  line is kept, Python's absl log lines (which carry a date) included.
  """
  if min_level <= 0:
    return text.splitlines()

  def dropped(line: str) -> bool:
    match = _ABSL_LINE.match(line)
    return line.startswith(_ABSL_PRE_INIT) or bool(match) and (
      'IWEF'.index(match.group(1)) < min_level or match.group(2).startswith('cuda'))

  return [line for line in text.splitlines() if not dropped(line)]


@contextlib.contextmanager
def tensorflow_start_up_filtered():
  """Runs the block with the process's stderr (file descriptor 2, where C++ writes) captured,
  then writes back the lines `tensorflow_start_up_lines_kept` keeps, or all of them if the
  block raised."""
  level = os.environ.get('TF_CPP_MIN_LOG_LEVEL', '0').strip()
  min_level = int(level) if level.isdigit() else 0  # TensorFlow reads anything else as 0
  try:
    saved = os.dup(2) if min_level > 0 else None
  except OSError:  # no stderr to capture
    saved = None
  if saved is None:
    yield
    return
  sys.stderr.flush()
  with tempfile.TemporaryFile() as capture:
    os.dup2(capture.fileno(), 2)
    failed = True
    try:
      yield
      failed = False
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      capture.seek(0)
      text = capture.read().decode('utf-8', 'replace')
      lines = text.splitlines() if failed else tensorflow_start_up_lines_kept(text, min_level)
      if lines:
        sys.stderr.write('\n'.join(lines) + '\n')


# A URL such as gs://bucket/run: Python's file functions would take it as a relative path.
_URL = re.compile(r'^[A-Za-z][A-Za-z0-9+.-]*://')


def missing_dir_error(path: str, what: str = 'workdir') -> str | None:
  """Why an existing run directory `path` cannot be read, if it is missing or a file."""
  if os.path.isdir(path):
    return None
  if os.path.exists(path):
    return f'{what} {path!r} is a file, not a directory'
  return f'{what} {path!r} does not exist'


def remote_path_error(path: str, what: str = 'workdir') -> str | None:
  """Why `path` cannot be used, if it is a URL (gs://, s3://, ...), else None.

  Runs, datasets and exports are read and written with local file operations (and a run
  with file locks). Given `gs://bucket/run`, those would create a directory named `gs:` in
  the working directory, write part of a run there and then fail, so a URL is refused
  before anything is written. (TFDS's data_dir is TFDS's business and may be a URL.)
  """
  if not path or not _URL.match(path):
    return None
  return (f'{what} {path!r} is a URL, and byol-jax reads and writes local paths only: use '
          'a local path, or one on a shared file system that every host mounts (NFS, Filestore)')


# Path flags, whose leading ~ parse_flags expands (validate_path_flag registers them).
_PATH_FLAGS = set()


def validate_path_flag(name: str, what: str = 'workdir') -> None:
  """Refuses a URL in flag --NAME while flags are parsed (one line, exit 2), and an empty
  --workdir= (it was taken for the current directory, then called not writable). A leading
  ~ is expanded once flags are parsed (parse_flags)."""
  _PATH_FLAGS.add(name)

  def check(path: str | None) -> bool:
    if what == 'workdir' and path == '':
      raise flags.ValidationError(f'empty: name the run\'s folder, e.g. --{name}=runs/demo')
    message = remote_path_error(path or '', what)
    if message:
      raise flags.ValidationError(message)
    return True

  flags.register_validator(name, check)


def _leaf_fields(cfg, prefix: str = '') -> list[str]:
  """The dotted names of a config's fields (`optimizer.base_lr`), the ones a
  --config.FIELD=VALUE flag sets."""
  names = []
  for key, value in cfg.items():
    if hasattr(value, 'items'):
      names += _leaf_fields(value, f'{prefix}{key}.')
    else:
      names.append(prefix + key)
  return names


def _config_fields_of(config_file: str) -> list[str] | None:
  """The fields of `config_file` ('FILE[:PRESET]'), or None if it does not load. Every
  preset of one file has the same fields, so the file's default preset stands for all."""
  import importlib.util
  path = config_file.partition(':')[0]
  try:
    spec = importlib.util.spec_from_file_location('_byol_jax_fields_config', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return _leaf_fields(module.get_config())
  except Exception:  # a file that does not load has no fields to suggest
    return None


def nearest_field(typed: str, fields: list[str]) -> str | None:
  """The field a mistyped dotted name most likely meant: close as a whole name
  (`optimizer.lr` -> `optimizer.base_lr`), else by its last part, wherever that lives
  (`train.epocs` -> `epochs`), else the closest field whose last part contains it (`lr` ->
  `optimizer.base_lr`).

  Why: ml_collections names only the first unknown part ('train') and suggests a name
  only among that group's siblings, so the overrides of `train.epocs` and `optimizer.lr`
  failed without a hint of the field the user meant."""
  import difflib
  close = difflib.get_close_matches(typed, fields, n=1, cutoff=0.75)
  if close:
    return close[0]
  leaf = typed.rpartition('.')[2]
  by_leaf = {}
  for field in fields:
    by_leaf.setdefault(field.rpartition('.')[2], field)
  close = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.75)
  if close:
    return by_leaf[close[0]]
  containing = [name for name in by_leaf if leaf and leaf in name]
  if not containing:
    return None
  return by_leaf[max(containing, key=lambda n: difflib.SequenceMatcher(None, leaf, n).ratio())]


def _unknown_field_hint(typed: str, config_file: str) -> str:
  """What to say after 'unknown config field': the nearest field of this config, or the
  config file that has the field (`--config.refit` belongs to configs/linear_eval.py, which
  the linear_eval and finetune workers take, not to configs/byol.py)."""
  fields = _config_fields_of(config_file)
  if not config_file or fields is None:
    return ''
  path = os.path.abspath(config_file.partition(':')[0])
  configs_dir = os.path.join(REPO, 'configs')
  # byol.py first: configs/ablation.py builds on it and has all its fields, and it sorted
  # first, so a pretraining field given to linear_eval.py was said to be ablation.py's.
  names = sorted(os.listdir(configs_dir), key=lambda n: (n != 'byol.py', n)) if (
    os.path.isdir(configs_dir)) else []
  for name in names:
    other = os.path.join(configs_dir, name)
    if name.endswith('.py') and os.path.abspath(other) != path:
      if typed in (_config_fields_of(other) or ()):
        shown = os.path.relpath(other, REPO)
        return (f': it is a field of {shown} (--config={shown}:PRESET), not of '
                f'{os.path.relpath(path, REPO) if path.startswith(REPO) else path}')
  nearest = nearest_field(typed, fields)
  return f'; did you mean --config.{nearest}?' if nearest else ''


def _typed_override(field: str, argv: list[str]) -> str | None:
  """The dotted name of the --config.NAME=VALUE flag in `argv` with unknown part `field`."""
  for arg in argv:
    if arg.startswith('--config.'):
      name = arg[len('--config.'):].partition('=')[0]
      if field in name.split('.'):
        return name
  return None


def _unknown_field(e: BaseException, config_file: str) -> str | None:
  """ml_collections' error for an unknown --config.FIELD: a KeyError (possibly inside an
  AttributeError) whose text is the quoted field, then a 'Did you mean' line if any."""
  while isinstance(e, (AttributeError, KeyError)) and e.args:
    if isinstance(e.args[0], BaseException):
      e = e.args[0]
      continue
    if not isinstance(e, KeyError) or not isinstance(e.args[0], str):
      return None
    frames = traceback.extract_tb(e.__traceback__)
    if frames and 'ml_collections' not in frames[-1].filename:
      return None  # a KeyError of a config file's own code, not a mistyped field
    field = e.args[0].partition('\n')[0].strip('"\'')
    typed = _typed_override(field, sys.argv) or field
    return (f'unknown config field {typed!r} in a --config.FIELD=VALUE flag'
            + _unknown_field_hint(typed, config_file))
  return None


def _root_cause(e: BaseException) -> BaseException:
  seen = set()
  while (e.__cause__ or e.__context__) is not None and id(e) not in seen:
    seen.add(id(e))
    e = e.__cause__ or e.__context__
  return e


# How the config files refuse a preset name: "unknown preset 'x'; valid: a, b, c".
_UNKNOWN_PRESET = re.compile(r"unknown (?:preset|ablation variant) '([^']*)'; valid: (.*)$")


def _nearest_preset_hint(message: str) -> str:
  """'; did you mean PRESET?' for a config file's unknown-preset message, when one valid
  preset is close to the name typed (`cifar` -> cifar10, `R50` -> r50, `imagnet` ->
  imagenet): the list of ten or twelve valid names left the user to spot the one meant."""
  import difflib
  match = _UNKNOWN_PRESET.search(message)
  if not match:
    return ''
  typed = match.group(1).strip().lower()
  valid = [name.strip() for name in match.group(2).split(',')]
  prefixed = [name for name in valid if typed and name.startswith(typed)]
  close = prefixed[:1] or difflib.get_close_matches(typed, valid, n=1, cutoff=0.6)
  return f'; did you mean {close[0]!r}?' if close and close[0] != match.group(1) else ''


def _config_file_error(e: BaseException) -> str | None:
  """ml_collections reports a missing config file as 'an earlier failure to load ...
  config_config', and a get_config that raised as the whole traceback in one message; the
  user needs the path they typed, or the preset's own message."""
  root = _root_cause(e)
  text = str(root)
  missing = re.search(r"No such file or directory: '([^']*)'", text)
  if 'Failed loading config file' in text and missing:
    where = os.getcwd() + ('' if os.path.samefile(os.getcwd(), REPO) else f' nor in {REPO}')
    return (f'config file {missing.group(1)!r} not found in {where}: '
            "check the file's name (the presets are in configs/byol.py, "
            'configs/linear_eval.py and configs/ablation.py)')
  flag = re.match(r'(flag --config=\S+): Error whilst parsing config file', str(e))
  # The flag as typed: config_path_fallback made a relative file absolute in the checkout.
  prefix = f'{flag.group(1).replace(REPO + os.sep, "")}: ' if flag else ''
  if flag and root is not e and isinstance(root, ValueError):
    return prefix + text + _nearest_preset_hint(text)  # a preset's own message
  frames = traceback.extract_tb(root.__traceback__)
  if isinstance(root, (ValueError, flags.Error)) or not frames:
    return None
  # A bug in a config file: where it is, in one line (a SyntaxError's text says where).
  where = '' if isinstance(root, SyntaxError) else (
    f' ({frames[-1].filename}, line {frames[-1].lineno})')
  return f'{prefix}{type(root).__name__}: {text}{where}'


# absl's message for a boolean flag given another word is the repr of a tuple.
_NOT_BOOLEAN = re.compile(r"\('Non-boolean argument to boolean flag', '(.*)'\)$")


def _exit_with(e: BaseException, config_file: str = '') -> None:
  """Ends the program with `e` as one `error:` line (exit 2); `config_file` is the --config
  in use, whose fields an unknown field's message searches for the nearest."""
  message = _unknown_field(e, config_file) or _config_file_error(e)
  if message:
    e = ValueError(message)
  lines = [line.strip() for line in str(e).splitlines() if line.strip()]
  message = lines[-1] if lines else type(e).__name__
  if lines and lines[0] != message and not lines[0].startswith('flag --'):
    message = f'{lines[0]} {message}'
  message = _NOT_BOOLEAN.sub(r"'\1' is not a boolean (true or false)", message)
  print(f'error: {message} (see --help)', file=sys.stderr)
  sys.exit(2)


def config_path_fallback(argv: list[str], repo: str = REPO) -> list[str]:
  """argv with a relative `--config` file that the working directory lacks taken from the
  repository instead, when it is there (an editable install): the README's commands say
  `configs/byol.py:r50` and then work from any directory. A file in the working directory
  wins, so a user's own configs/ is never shadowed."""
  out = []
  for i, arg in enumerate(argv):
    value = arg[len('--config='):] if arg.startswith('--config=') else (
      arg if i and argv[i - 1] == '--config' else None)
    if value is not None:
      path, sep, rest = value.partition(':')
      in_repo = os.path.join(repo, path)
      if path and not os.path.isabs(path) and not os.path.exists(path) and (
          os.path.isfile(in_repo)):
        value = f'{in_repo}{sep}{rest}'
        arg = f'--config={value}' if arg.startswith('--config=') else value
    out.append(arg)
  return out


def _config_in_use(argv: list[str]) -> str:
  """The --config that `argv` gives, else the flag's default ('' without a config flag)."""
  if 'config' not in flags.FLAGS:
    return ''
  for i, arg in enumerate(argv):
    if arg.startswith('--config='):
      return arg[len('--config='):]
    if i and argv[i - 1] == '--config':
      return arg
  return str(flags.FLAGS['config'].default or '')


def define_config_flag(default: str, help_text: str):
  """`--config=FILE:PRESET` with `--config.FIELD=VALUE` overrides (ml_collections).

  ml_collections applies the overrides named on the command line while defining the flag,
  so an unknown field fails here, at import, rather than in flag parsing. A relative config
  file is looked for in the repository too (config_path_fallback).
  """
  from ml_collections import config_flags
  given = [arg[len('--config='):] if arg.startswith('--config=') else arg
           for i, arg in enumerate(sys.argv)
           if arg.startswith('--config=') or (i and sys.argv[i - 1] == '--config')]
  if len(given) > 1:  # absl: the last wins, or 'The flag config.X is defined twice'
    _exit_with(ValueError(f'--config is given {len(given)} times ({", ".join(given)}): give '
                          'one FILE:PRESET, and --config.FIELD=VALUE for each change'))
  sys.argv[:] = config_path_fallback(sys.argv)
  try:
    return config_flags.DEFINE_config_file('config', default, help_text, lock_config=True)
  except (AttributeError, KeyError) as e:
    _exit_with(e, config_path_fallback([f'--config={given[0]}'])[0][len('--config='):]
               if given else default)


_HELP_FLAG = re.compile(r'^--?(help|helpshort|helpfull|helpxml|\?)(=(true|1))?$', re.IGNORECASE)


def help_short_option(argv: list[str]) -> list[str]:
  """argv with `-h` as `--help`: absl knows --help, -help and -?, and answered the `-h` that
  most command-line tools take with "Unknown command line flag 'h'". Left alone after `--`
  and where a program defines a flag named h."""
  if 'h' in flags.FLAGS:
    return list(argv)
  out, flags_end = list(argv[:1]), False
  for arg in argv[1:]:
    flags_end = flags_end or arg == '--'
    out.append('--help' if arg == '-h' and not flags_end else arg)
  return out


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a mistyped flag, config field, preset or config file ending
  the program with one line (exit 2) instead of a traceback, and help (-h too) exiting 0."""
  argv = help_short_option(argv)
  try:
    rest = flags.FLAGS(argv)
    if 'config' in flags.FLAGS:  # a config file that failed to load fails on first use
      flags.FLAGS['config'].value.keys()
  except SystemExit as e:
    # absl ends every help flag with exit code 1, which reads as a failure to a shell
    # script or a CI step that checks that a command's help works.
    if e.code == 1 and any(_HELP_FLAG.match(arg) for arg in argv[1:]):
      sys.exit(0)
    raise
  except Exception as e:  # absl and ml_collections raise several types for user mistakes
    _exit_with(e, _config_in_use(argv))
  # The shell leaves the ~ of --workdir=~/runs/demo alone (it follows '='), and a folder
  # named '~' was made in the working directory.
  for name in _PATH_FLAGS & set(flags.FLAGS):
    value = flags.FLAGS[name].value
    if isinstance(value, str) and value.startswith('~'):
      flags.FLAGS[name].value = os.path.expanduser(value)
  if len(rest) > 1:
    # No entry point takes positional arguments, and they were dropped without a word:
    # `python -m byol_jax.main configs/byol.py:cifar10` trained the default demo.
    hint = (f' (did you mean --config={rest[1]}?)' if re.match(r'[^=\s]+\.py(:|$)', rest[1])
            and 'config' in flags.FLAGS else '')
    _exit_with(ValueError(f'unexpected argument {rest[1]!r}: every argument is a flag, '
                          f'--NAME=VALUE{hint}'))
  return rest


def worker_module_main(module: str) -> None:
  """What `python -m byol_jax.linear_eval` (a worker module, not an entry point) does: it
  printed nothing and exited 0, which reads as an evaluation that ran. The one command that
  runs a worker is byol_jax.main's --worker_mode; this names it and exits 2."""
  from byol_jax import main
  mode = next(m for m, name in main.WORKERS.items() if name == module)
  preset = 'configs/linear_eval.py:demo' if mode in ('linear_eval', 'finetune') else (
    'configs/byol.py:demo')
  print(f'{module} is run through byol_jax.main: python -m byol_jax.main '
        f'--worker_mode={mode} --config={preset} (--help lists its flags)', file=sys.stderr)
  sys.exit(2)


# `name=value` as a ConfigDict's fields are written in a config file (a keyword argument):
# not `x = ...`, a variable of the file's code.
_ASSIGNED = re.compile(r'(?:^|[\s,(])(\w+)=(?!=)')


def field_comments(paths: list[str]) -> dict[str, str]:
  """Field name -> the comment beside (or the comment lines just above) the one place a
  config file sets it as `name=value`: the config files document their fields in comments,
  not in the config object, so this is where --show_config finds each field's doc. A name
  set in two places (`train_examples` of knn and of demo) gets none: it may be the other's."""
  found: dict[str, list[str]] = {}
  for path in paths:
    try:
      with open(path) as f:
        lines = f.read().splitlines()
    except OSError:
      continue
    block: list[str] = []
    for line in lines:
      code, _, comment = line.partition('  # ')
      if line.strip().startswith('#'):
        block.append(line.strip().lstrip('#').strip())
        continue
      names = _ASSIGNED.findall(code)
      text = comment.strip() or (' '.join(block) if len(names) == 1 else '')
      for name in names:
        found.setdefault(name, []).append(text)
      block = []
  return {name: texts[0] for name, texts in found.items() if len(texts) == 1 and texts[0]}


def _flag_value(value) -> str:
  """A field's value as a --config.FIELD=VALUE flag takes it."""
  if isinstance(value, tuple):
    return '(' + ','.join(_flag_value(v) for v in value) + ')'
  return str(value)


def _config_sources(config_file: str) -> list[str]:
  """The config file and the checkout's modules it imports (configs/ablation.py builds on
  configs/byol.py, which takes its augmentation fields from byol_jax/augment.py)."""
  path = config_file.partition(':')[0]
  paths = [path]
  try:
    with open(path) as f:
      source = f.read()
  except OSError:
    return paths
  for module in re.findall(r'^\s*from (?:configs|byol_jax) import (\w+)', source, re.M):
    for folder in ('configs', 'byol_jax'):
      candidate = os.path.join(REPO, folder, f'{module}.py')
      if os.path.isfile(candidate) and candidate not in paths:
        paths.append(candidate)
  return paths


def describe_config(cfg, config_file: str) -> str:
  """Every field of `cfg` as the --config.FIELD=VALUE flag that sets it to its value (the
  preset's, with the overrides given), and the config file's comment on it.

  Why: neither --help nor absl's full help listed a config field (ml_collections defines a flag per
  field only for the overrides given), so finding a field's name and default meant
  reading configs/byol.py and byol_jax/augment.py."""
  docs = field_comments(_config_sources(config_file))
  # Quoted for the shell where it needs it: a tuple's parentheses are bash syntax, an empty
  # string has to stay an argument, so each line pastes into a command as printed.
  rows = [(f'--config.{name}={shlex.quote(_flag_value(cfg_value(cfg, name)))}', docs.get(
    name.rpartition('.')[2], '')) for name in _leaf_fields(cfg)]
  width = min(48, max(len(flag) for flag, _ in rows))
  shown = os.path.relpath(config_file, REPO) if config_file.startswith(REPO + os.sep) else (
    config_file)
  lines = [f'# {shown}, with the --config.FIELD=VALUE overrides given; each line sets one']
  lines += [f'{flag:<{width}}  # {doc}' if doc else flag for flag, doc in rows]
  return '\n'.join(lines)


def cfg_value(cfg, dotted: str):
  """The value of the field `dotted` (`optimizer.base_lr`) of `cfg`."""
  for part in dotted.split('.'):
    cfg = cfg[part]
  return cfg
