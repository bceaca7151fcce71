"""Tests of the command-line entry points' handling of user mistakes and start-up output
(cli.py)."""

import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, checkout_env, config_fields

from byol_jax import cli


def _run_main(argv: list[str], workdir) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, '-m', 'byol_jax.main', *argv, f'--workdir={workdir}'],
                        cwd=REPO, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize('argv, expected', [
  (['--config.nosuch=1'], "error: unknown config field 'nosuch'"),
  (['--config.batch_sise=1'],
   "error: unknown config field 'batch_sise' in a --config.FIELD=VALUE flag; did you mean "
   '--config.batch_size?'),
  (['--config=configs/byol.py:nope'],  # the preset's own message, no exception type
   "error: flag --config=configs/byol.py:nope: unknown preset 'nope'; valid: demo,"),
  # ml_collections named only the first unknown part ('train', 'lr') and no field to use.
  (['--config.train.epocs=5'],
   "error: unknown config field 'train.epocs' in a --config.FIELD=VALUE flag; did you mean "
   '--config.epochs?'),
  (['--config.optimizer.lr=0.1'], "field 'optimizer.lr' in a --config.FIELD=VALUE flag; did "
   'you mean --config.optimizer.base_lr?'),
  # A field of the evaluation configs given to a pretraining one.
  (['--config=configs/byol.py:demo', '--config.refit=False'],
   "field 'refit' in a --config.FIELD=VALUE flag: it is a field of configs/linear_eval.py "
   '(--config=configs/linear_eval.py:PRESET), not of configs/byol.py'),
  # A pretraining field given to an evaluation config: configs/byol.py's, not the ablation
  # file's that builds on it (and that sorted first).
  (['--config=configs/linear_eval.py:demo', '--worker_mode=linear_eval',
    '--config.tau_base=0.9'],
   "field 'tau_base' in a --config.FIELD=VALUE flag: it is a field of configs/byol.py "
   '(--config=configs/byol.py:PRESET), not of configs/linear_eval.py'),
  (['--config.batch_size=abc'], "error: flag --config.batch_size=abc: invalid literal"),
  # The valid presets were listed, but not the one that was meant.
  (['--config=configs/byol.py:cifar'], "unknown preset 'cifar'; valid: demo, cifar10, "
   "cifar10_lightly, r18, r50, r101, r152, r50x2, r50x4, r200x2; did you mean 'cifar10'?"),
  (['--config=configs/ablation.py:bnboth'], "did you mean 'bn_both'?"),
  (['--config=configs/nofile.py:demo'],  # the path as typed, and where it was looked for
   f"error: config file 'configs/nofile.py' not found in {REPO}: check"),
  # epochs=0 trained the preset's default schedule (1000 epochs for r50) without a word,
  # and of a key given twice the last won.
  (['--config=configs/byol.py:r50,epochs=0'],
   "error: flag --config=configs/byol.py:r50,epochs=0: bad preset argument 'epochs=0'; "
   'valid: epochs=<positive int>'),
  (['--config=configs/byol.py:r50,epochs=300,epochs=40'],
   'preset argument epochs is given twice (r50,epochs=300,epochs=40): give it once'),
  (['--config.augment.blur=maybe'],  # absl's text was the repr of a tuple
   "error: flag --config.augment.blur=maybe: 'maybe' is not a boolean (true or false)"),
  # A positional argument was dropped without a word: this trained the default demo.
  (['configs/byol.py:cifar10'],
   "error: unexpected argument 'configs/byol.py:cifar10': every argument is a flag, "
   '--NAME=VALUE (did you mean --config=configs/byol.py:cifar10?)'),
  (['--bogus=1'], "error: Unknown command line flag 'bogus'"),
  # A second --config: with an override, absl said "The flag 'config.epochs' is defined
  # twice"; without one, the last preset won silently.
  (['--config=configs/byol.py:demo', '--config=configs/byol.py:cifar10', '--config.epochs=1'],
   'error: --config is given 2 times (configs/byol.py:demo, configs/byol.py:cifar10)'),
])
def test_flag_mistakes_are_one_line_errors(argv, expected, tmp_path):
  """A mistyped flag, field, preset or file: exit 2 with one `error:` line, no traceback
  (a traceback wall here hides the one line that matters)."""
  proc = _run_main(argv, tmp_path)
  assert proc.returncode == 2, proc.stderr[-2000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith('error: ')]
  assert len(errors) == 1 and expected in errors[0], proc.stderr[-2000:]
  assert 'Traceback' not in proc.stderr


@pytest.mark.parametrize('body, expected', [
  ('  return undefined_name',
   "error: NameError: name 'undefined_name' is not defined ({}, line 2)"),
  # A KeyError of the file's own code is its bug, not a mistyped --config.FIELD.
  ("  return {}['zz']", "error: KeyError: 'zz' ({}, line 2)"),
])
def test_a_bug_in_a_config_file_is_one_line_saying_where(body, expected, tmp_path):
  """A user's own config file that raises: one line with the exception and the file and
  line, instead of a traceback wall or a misleading 'unknown config field'."""
  config = tmp_path / 'my_config.py'
  config.write_text(f'def get_config():\n{body}\n')
  proc = _run_main([f'--config={config}'], tmp_path)
  assert proc.returncode == 2, proc.stderr[-2000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith('error: ')]
  assert len(errors) == 1 and errors[0].startswith(expected.format(config)), proc.stderr[-2000:]
  assert 'Traceback' not in proc.stderr


@pytest.mark.parametrize('argv, expected', [
  (['--config.batch_size=-3'], 'error: batch_size=-3 must be a positive multiple'),
  (['--config.dataset=folder:/nonexistent/byol'],
   'error: dataset folder /nonexistent/byol does not exist'),
  (['--config.seed=-1'],  # was numpy's traceback from the demo data's generator
   'error: seed=-1 must be in [0, 2**32)'),
  (['--config.augment.mean=(0.5,0.5)'],  # was a broadcasting traceback from the traced step
   'error: augment.mean=(0.5, 0.5) must hold 3 numbers'),
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


_START_UP = """\
WARNING: All log messages before absl::InitializeLog() is called are written to STDERR
I0000 00:00:1795805160.638365    2827 port.cc:153] oneDNN custom operations are on.
I0000 00:00:1795805160.638672    2827 cudart_stub.cc:31] Could not find cuda drivers on your machine
W0000 00:00:1795805160.680995    2827 some_op.cc:12] a warning
E0000 00:00:1795805162.962955    2827 cuda_platform.cc:52] failed call to cuInit: INTERNAL
E0000 00:00:1795805162.962955    2827 op_kernel.cc:9] a real error
I1127 18:46:07.292090 140647407070080 file_utils.py:394] Python's absl, with a date
Traceback-like line that is not Abseil's"""


@pytest.mark.parametrize('level, kept', [
  (0, list(range(8))),  # TF_CPP_MIN_LOG_LEVEL=0 (TensorFlow's default): everything
  (1, [3, 5, 6, 7]),    # INFO and the pre-init banner go, CUDA lines go whatever their level
  (2, [5, 6, 7]),
  (3, [6, 7]),
])
def test_tensorflow_start_up_lines_follow_tf_cpp_min_log_level(level, kept):
  """Breaks if the filter drops an error the user asked to see, or lets through what
  TF_CPP_MIN_LOG_LEVEL (2 from every byol-jax command) hides."""
  lines = _START_UP.splitlines()
  assert cli.tensorflow_start_up_lines_kept(_START_UP, level) == [lines[i] for i in kept]


def test_start_up_filter_replays_captured_output(capfd, monkeypatch):
  """What C++ code writes to file descriptor 2 inside the block comes back filtered, and all
  of it comes back if the block raises, so a failing import still shows its cause."""
  monkeypatch.setenv('TF_CPP_MIN_LOG_LEVEL', '2')
  lines = _START_UP.splitlines()
  with cli.tensorflow_start_up_filtered():
    os.write(2, (_START_UP + '\n').encode())
  assert capfd.readouterr().err.splitlines() == [lines[5], lines[6], lines[7]]
  with pytest.raises(RuntimeError):
    with cli.tensorflow_start_up_filtered():
      os.write(2, (_START_UP + '\n').encode())
      raise RuntimeError('import failed')
  assert capfd.readouterr().err.splitlines() == lines
  os.write(2, b'after\n')  # file descriptor 2 is restored
  assert capfd.readouterr().err == 'after\n'


@pytest.mark.slow
def test_import_tensorflow_start_up_is_quiet():
  """With TF_CPP_MIN_LOG_LEVEL=2, as every byol-jax command sets it, importing TensorFlow
  prints none of its start-up INFO lines or the CUDA stubs' (TensorFlow 2.20+ writes them
  regardless of that variable). Level 0 shows they exist on this machine."""
  pytest.importorskip('tensorflow')
  code = 'from byol_jax import datasets; datasets.import_tensorflow(); print("imported")'

  def stderr_at(level: str) -> list[str]:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL=level)
    run = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                         timeout=300, cwd=REPO)
    assert run.returncode == 0 and run.stdout == 'imported\n', run.stderr
    return [line for line in run.stderr.splitlines() if line.strip()]

  assert stderr_at('2') == []
  if not stderr_at('0'):
    pytest.skip('this TensorFlow writes nothing at start-up, so there is nothing to filter')


@pytest.mark.parametrize('module', ['byol_jax.main', 'byol_jax.benchmark'])
def test_help_lists_the_config_flag(module):
  """--help shows only the main module's key flags; --config is defined inside
  ml_collections, so without being declared key it was missing from --help."""
  proc = subprocess.run([sys.executable, '-m', module, '--help'], cwd=REPO, capture_output=True,
                        text=True, timeout=120)
  assert '  --config: Config file and preset' in proc.stdout + proc.stderr, proc.stderr[-2000:]
  assert proc.returncode == 0  # absl's own exit code for help is 1, which reads as failure


def test_show_config_lists_every_field_with_its_value_and_comment(tmp_path):
  """--help and --helpfull listed no config field: a field's name, default and meaning were
  in configs/byol.py's source only. --show_config prints each as the flag that sets it, the
  preset's value with the overrides applied, and its comment, without training."""
  proc = subprocess.run([sys.executable, '-m', 'byol_jax.main', '--config=configs/byol.py:cifar10',
                         '--config.optimizer.base_lr=0.5', '--show_config',
                         f'--workdir={tmp_path / "run"}'], cwd=REPO, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  lines = proc.stdout.splitlines()
  assert lines[0].startswith('# configs/byol.py:cifar10')
  flags_shown = [line.split('=')[0][len('--config.'):] for line in lines[1:]]
  from configs import byol
  assert sorted(flags_shown) == sorted(cli._leaf_fields(byol.get_config('cifar10')))
  assert {'optimizer.base_lr', 'augment.view2.solarize_prob'} <= set(flags_shown)
  assert '--config.optimizer.base_lr=0.5' in lines  # the override, not the preset's 1.0
  assert '--config.batch_size=512' in lines
  assert any(line.startswith('--config.eval_network=online ') and line.endswith(
    "# or 'target'") for line in lines)
  assert not os.path.exists(tmp_path / 'run')  # nothing trained, nothing written


def test_show_config_lines_paste_back_as_flags_that_give_the_same_config():
  """--show_config printed `--config.augment.mean=(0.485,0.456,0.406)`: pasted into bash,
  a syntax error. Every line, pasted as printed (comment left off) into one bash command,
  must be accepted and print the same config again."""
  command = (f'{shlex.quote(sys.executable)} -m byol_jax.main --config=configs/byol.py:demo '
             '--show_config')
  def show(*flags):
    proc = subprocess.run(['bash', '-c', ' '.join([command, *flags])], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.splitlines()

  first = show()
  flags = [line.partition('  # ')[0].strip() for line in first[1:]]
  assert any(flag.startswith('--config.augment.mean=') for flag in flags)
  assert show(*flags) == first


def test_field_comments_skip_a_name_set_in_two_places(tmp_path):
  """A comment is a field's doc only where the name is set once: knn's and demo's
  `train_examples` share a name, and the one comment would have documented both."""
  source = tmp_path / 'c.py'
  source.write_text('x = dict(\n  # the bank\n  train_examples=0,\n  k=200,  # neighbours\n'
                    ')\ny = dict(train_examples=0)\nk = 3  # a variable, not a field\n')
  assert cli.field_comments([str(source)]) == {'k': 'neighbours'}


@pytest.mark.parametrize('module', ['byol_jax.main', 'byol_jax.plot'])
def test_dash_h_is_help(module):
  """`-h` said "Unknown command line flag 'h'" (absl knows --help, -help and -?); every
  entry point parses flags with cli.parse_flags, which takes it as --help."""
  proc = subprocess.run([sys.executable, '-m', module, '-h'], cwd=REPO, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert '--workdir' in proc.stdout + proc.stderr and 'Unknown' not in proc.stderr
  assert cli.help_short_option(['prog', '-h', '--', '-h']) == ['prog', '--help', '--', '-h']


def test_help_names_the_presets_and_what_a_file_alone_means():
  """--help listed no preset, and `--config=configs/byol.py` without one trains r50 on
  ImageNet while no --config at all trains the demo: --help says both, and its lists are
  the configs' own."""
  from absl import flags

  from byol_jax import main  # noqa: F401  (defines --config)
  from configs import ablation, byol
  from configs import linear_eval as eval_configs
  proc = subprocess.run([sys.executable, '-m', 'byol_jax.main', '--help'], cwd=REPO,
                        capture_output=True, text=True, timeout=120)
  text = ' '.join((proc.stdout + proc.stderr).split())
  for names in (byol.PRESETS, tuple(ablation.VARIANTS), eval_configs.PRESETS):
    assert ', '.join(names) in text, (names, text[:3000])
  alone = byol.get_config().preset
  default = flags.FLAGS['config'].default_as_str.strip("'").rpartition(':')[2]
  assert (f'The file alone (`--config=configs/byol.py`) is {alone}; without --config, '
          f'{default}.') in text, text[:3000]
  for module in (ablation, eval_configs):  # what get_config() without a preset builds
    names = ', '.join(getattr(module, 'VARIANTS', None) or module.PRESETS)
    alone = module.get_config().preset.rpartition(':')[2]
    assert f'{names}; the file alone is {alone}.' in text, (module.__name__, text[:3000])
  assert 'importing any module defines none' not in text  # a note for developers


def test_flags_named_in_messages_and_docstrings_exist():
  """Breaks when an error message or docstring tells the user to pass a flag that no entry
  point defines (e.g. `--data_dir` for what is `--config.data_dir`): following the advice
  would be the user's next mistake."""
  import ast
  import glob
  import re
  sources = {path: open(path).read()
             for path in glob.glob(os.path.join(REPO, 'byol_jax', '**', '*.py'), recursive=True)}
  defined = {'config', 'help'}
  for text in sources.values():
    defined |= set(re.findall(r"DEFINE_\w+\(\s*'(\w+)'", text))
    defined |= set(re.findall(r"add_argument\(\s*'--(\w+)'", text))
  fields = config_fields()
  # Other programs' flags quoted in our messages: `tfds build --data_dir`, `gcloud ...
  # --worker=all`, an XLA flag.
  foreign = {'data_dir', 'worker', 'xla_gpu_deterministic_ops'}
  wrong = []
  for path, text in sources.items():
    for node in ast.walk(ast.parse(text)):
      if not (isinstance(node, ast.Constant) and isinstance(node.value, str)):
        continue
      for flag in re.findall(r'(?<![\w-])--([a-z_0-9]+(?:\.[a-z_0-9]+)*)', node.value):
        field = flag.removeprefix('config.')
        ok = field in fields if flag.startswith('config.') else (flag in defined | foreign)
        if not ok:
          wrong.append(f'{os.path.relpath(path, REPO)}: --{flag}')
  assert not wrong, wrong


def test_relative_config_files_are_found_from_any_directory(tmp_path, monkeypatch):
  """`--config=configs/byol.py:r50` as the README writes it must work outside the checkout
  (editable install), while a configs/ file in the working directory still wins and a
  missing file stays missing (its error names it)."""
  monkeypatch.chdir(tmp_path)
  repo_file = os.path.join(REPO, 'configs', 'byol.py')
  assert cli.config_path_fallback(
    ['prog', '--config=configs/byol.py:r50,epochs=300', '--config.seed=1']) == [
      'prog', f'--config={repo_file}:r50,epochs=300', '--config.seed=1']
  assert cli.config_path_fallback(['prog', '--config', 'configs/byol.py']) == [
    'prog', '--config', repo_file]
  for argv in (['prog', '--config=/abs/byol.py:x'], ['prog', '--config=configs/nofile.py'],
               ['prog', '--workdir=configs/byol.py']):
    assert cli.config_path_fallback(argv) == argv
  (tmp_path / 'configs').mkdir()
  (tmp_path / 'configs' / 'byol.py').write_text('')
  assert cli.config_path_fallback(['prog', '--config=configs/byol.py:r50']) == [
    'prog', '--config=configs/byol.py:r50']


def test_readme_command_runs_outside_the_checkout(tmp_path):
  """The repository's preset file is read from another directory: the preset's own error
  comes back, not 'config file not found'."""
  proc = subprocess.run([sys.executable, '-m', 'byol_jax.main', '--config=configs/byol.py:nope',
                         f'--workdir={tmp_path}'], cwd=tmp_path, env=checkout_env(),
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2 and "unknown preset 'nope'" in proc.stderr, proc.stderr[-2000:]


def test_eval_worker_shares_the_gpu_unless_told_otherwise():
  """The eval worker runs beside the trainer: JAX's default of taking 75% of a GPU up front
  would starve one of them. Breaks if the worker preallocates, if the trainer stops
  preallocating, or if a user's own memory setting is overridden."""
  from byol_jax import main
  env = {}
  main.share_accelerator_memory('eval', env)
  assert env == {'XLA_PYTHON_CLIENT_PREALLOCATE': 'false'}
  for mode in ('train', 'linear_eval', 'finetune'):
    env = {}
    main.share_accelerator_memory(mode, env)
    assert env == {}
  env = {'XLA_PYTHON_CLIENT_MEM_FRACTION': '.3'}
  main.share_accelerator_memory('eval', env)
  assert env == {'XLA_PYTHON_CLIENT_MEM_FRACTION': '.3'}


@pytest.mark.parametrize('path, remote', [
  ('gs://bucket/run', True), ('s3://b/x', True), ('file:///tmp/x', True),
  ('runs/demo', False), ('/tmp/gs:/x', False), ('~/runs/a', False), ('', False),
])
def test_remote_path_error_names_urls_only(path, remote):
  """Only a URL is refused: a local path that merely contains a colon must still work."""
  message = cli.remote_path_error(path)
  assert (message is not None) == remote
  if remote:
    assert repr(path) in message and 'NFS' in message


@pytest.mark.parametrize('module, argv', [
  ('byol_jax.main', ['--config=configs/byol.py:demo', '--workdir=gs://bucket/run']),
  ('byol_jax.export', ['--workdir=gs://bucket/run']),
  ('byol_jax.plot', ['--workdir=.', '--output=gs://bucket/plots']),
  ('byol_jax.import_release', ['--pkl=gs://bucket/pretrain_res50x1.pkl', '--workdir=run']),
])
def test_a_url_path_is_refused_before_anything_is_written(module, argv, tmp_path):
  """gs://bucket/run used to become a local folder 'gs:/bucket/run' holding half a run,
  then a traceback from the TensorBoard writer: now one line and nothing written."""
  proc = subprocess.run([sys.executable, '-m', module, *argv], cwd=tmp_path,
                        env=checkout_env(), capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr[-2000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith('error: ')]
  assert len(errors) == 1 and 'is a URL' in errors[0], proc.stderr[-2000:]
  assert 'Traceback' not in proc.stderr
  assert list(tmp_path.iterdir()) == []


def test_an_empty_workdir_is_one_line(tmp_path):
  """`--workdir=` (an unset shell variable) was refused as "workdir '' is not writable"."""
  proc = subprocess.run([sys.executable, '-m', 'byol_jax.main', '--workdir='], cwd=tmp_path,
                        env=checkout_env(), capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2 and 'Traceback' not in proc.stderr, proc.stderr[-2000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith('error: ')]
  assert errors == ["error: flag --workdir=: empty: name the run's folder, e.g. "
                    '--workdir=runs/demo (see --help)'], proc.stderr[-2000:]
  assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize('module, argv', [
  ('byol_jax.main', ['--config=configs/byol.py:demo', '--worker_mode=eval', '--workdir=afile']),
  ('byol_jax.main', ['--config=configs/linear_eval.py:demo', '--worker_mode=linear_eval',
                     '--workdir=afile']),
  ('byol_jax.export', ['--workdir=afile']),
  ('byol_jax.plot', ['--workdir=afile']),
])
def test_a_workdir_that_is_a_file_is_one_line(module, argv, tmp_path):
  """The eval and linear_eval workers ended in a NotADirectoryError traceback; export and
  plot said the file 'does not exist'."""
  (tmp_path / 'afile').write_text('not a run')
  proc = subprocess.run([sys.executable, '-m', module, *argv], cwd=tmp_path,
                        env=checkout_env(), capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr[-2000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith('error: ')]
  assert errors == ["error: workdir 'afile' is a file, not a directory"], proc.stderr[-2000:]


def test_a_workdir_under_tilde_is_the_home_folder(tmp_path):
  """The shell does not expand the ~ of `--workdir=~/run` (it follows '='): the path flags
  expand it, as a folder dataset's path already was, where a folder named '~' was made in
  (or, for plot, looked for under) the working directory."""
  run = tmp_path / 'home' / 'run'
  (run / 'metrics').mkdir(parents=True)
  (run / 'metrics' / 'train.jsonl').write_text(
    '{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.0}\n')
  proc = subprocess.run([sys.executable, '-m', 'byol_jax.plot', '--workdir=~/run',
                         '--figures=loss'], cwd=tmp_path, capture_output=True, text=True,
                        timeout=120, env=checkout_env(HOME=str(tmp_path / 'home')))
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert (run / 'plots' / 'loss.png').exists(), proc.stdout + proc.stderr
  assert not (tmp_path / '~').exists()


def test_a_path_field_under_tilde_is_the_home_folder(tmp_path):
  """--config.init_from=~/old was looked for under a folder named '~' in the working
  directory; it is the home folder's, as for the path flags."""
  home = tmp_path / 'home'
  home.mkdir()
  proc = subprocess.run([sys.executable, '-m', 'byol_jax.main', '--config=configs/byol.py:demo',
                         f'--workdir={tmp_path / "run"}', '--config.init_from=~/old'],
                        cwd=tmp_path, capture_output=True, text=True, timeout=120,
                        env=checkout_env(HOME=str(home)))
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines()[-1].startswith(
    f'error: init_from={home}/old: no finalised checkpoint in {home}/old/checkpoints'), (
    proc.stderr[-2000:])


def test_plots_that_cannot_be_written_are_one_line(tmp_path):
  """An --output that cannot be written (here under a file; a read-only disk alike) ended in
  an OSError traceback from matplotlib."""
  (tmp_path / 'metrics').mkdir()
  (tmp_path / 'metrics' / 'train.jsonl').write_text('{"step": 1, "loss": 1.0}\n')
  (tmp_path / 'afile').write_text('')
  proc = subprocess.run([sys.executable, '-m', 'byol_jax.plot', f'--workdir={tmp_path}',
                         f'--output={tmp_path / "afile" / "plots"}'], env=checkout_env(),
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2 and 'Traceback' not in proc.stderr, proc.stderr[-2000:]
  assert proc.stderr.startswith('error: cannot write the plots: Not a directory')


def test_ctrl_c_outside_the_step_loop_is_one_line(tmp_path):
  """Ctrl-C while a worker sets up or waits (here: an eval worker waiting for a checkpoint)
  printed a KeyboardInterrupt traceback; the trainer's loop already saved and stopped."""
  code = ('import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); '
          "sys.argv = ['main', '--config=configs/byol.py:demo', '--worker_mode=eval', "
          f"'--workdir={tmp_path / 'run'}']; "
          "runpy.run_module('byol_jax.main', run_name='__main__')")
  log = tmp_path / 'stderr.txt'
  with open(log, 'w') as err:
    proc = subprocess.Popen([sys.executable, '-c', code], cwd=REPO, env=checkout_env(),
                            stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.time() + 120
    while 'waiting for the trainer' not in log.read_text() and time.time() < deadline:
      time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130, log.read_text()[-2000:]
  text = log.read_text()
  assert 'Traceback' not in text and 'KeyboardInterrupt' not in text, text[-2000:]
  assert text.strip().splitlines()[-1].startswith('interrupted: the eval worker stopped')


_SLOW_COMPILE_WORKER = '''
import sys
import jax
import jax.numpy as jnp


def _slow_to_compile(x):
  for i in range(400):
    x = jnp.sin(x @ x.T + i) * jnp.cos(x)
  return x


def run(cfg, workdir):
  del cfg, workdir
  lowered = jax.jit(_slow_to_compile).lower(jnp.ones((64, 64)))
  print('compiling', file=sys.stderr, flush=True)
  lowered.compile()  # seconds on a CPU: the interrupt lands in it
  return 0
'''


def test_ctrl_c_during_compilation_exits_130_without_a_segfault(tmp_path):
  """Ctrl-C that lands inside XLA's compiler (the trainer's set-up jits, the eval worker's
  first kNN call) printed the one-line message, then died in 'Fatal Python error:
  Segmentation fault' (exit -11) at interpreter exit."""
  (tmp_path / 'slow_compile_worker.py').write_text(_SLOW_COMPILE_WORKER)
  code = ('import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); '
          f'sys.path.insert(0, {str(tmp_path)!r}); '
          'from byol_jax import main; main.WORKERS["train"] = "slow_compile_worker"; '
          f"sys.argv = ['main', '--workdir={tmp_path / 'run'}']; main.main()")
  log = tmp_path / 'stderr.txt'
  # No persistent compilation cache: a cached executable would leave nothing to interrupt.
  env = checkout_env(JAX_ENABLE_COMPILATION_CACHE='false')
  with open(log, 'w') as err:
    proc = subprocess.Popen([sys.executable, '-c', code], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.time() + 120
    while 'compiling' not in log.read_text() and time.time() < deadline:
      time.sleep(0.1)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    code = proc.wait(timeout=60)
  text = log.read_text()
  assert code == 130, (code, text[-2000:])
  assert 'Fatal Python error' not in text and 'Traceback' not in text, text[-2000:]
  assert text.strip().splitlines()[-1].startswith('interrupted: the train worker stopped')


def test_a_start_stopped_by_its_data_leaves_no_workdir(tmp_path):
  """A dataset that is not prepared is found after the workdir is made: the folders that
  start created (here runs/ and runs/x) are removed again, as nothing was written there."""
  proc = _run_main(['--config=configs/byol.py:demo', '--config.dataset=cifar10',
                    f'--config.data_dir={tmp_path / "no_data"}'], tmp_path / 'runs' / 'x')
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines()[-1].startswith(
    "error: TFDS dataset 'cifar10' is not prepared"), proc.stderr[-2000:]
  assert not os.path.exists(tmp_path / 'runs'), os.listdir(tmp_path / 'runs')


def test_the_default_workdir_is_named_after_the_preset():
  """Without --workdir every preset trained in runs/demo, so the second preset tried there
  was refused as another preset's run. Pretraining presets now default to runs/<preset>;
  an evaluation preset reads a pretraining run that only the demo's name can guess, so the
  others ask for it in one line instead of evaluating the demo's run."""
  from byol_jax import main, train
  from configs import ablation, byol
  from configs import linear_eval as eval_configs
  assert main.default_workdir(byol.get_config('cifar10')) == os.path.join('runs', 'cifar10')
  # A preset's arguments name another schedule: `r50,epochs=300` shared runs/r50 with `r50`,
  # and whichever came second was refused there as a changed schedule.
  assert main.default_workdir(byol.get_config('r50')) == os.path.join('runs', 'r50')
  assert (main.default_workdir(byol.get_config('r50,epochs=300'), 'r50,epochs=300')
          == os.path.join('runs', 'r50_epochs300'))
  assert (main.default_workdir(ablation.get_config('none,epochs=20'), 'none,epochs=20')
          == os.path.join('runs', 'ablation_none_epochs20'))
  assert (main.default_workdir(ablation.get_config('bn_both'))
          == os.path.join('runs', 'ablation_bn_both'))
  assert main.default_workdir(eval_configs.get_config('demo')) == os.path.join('runs', 'demo')
  with pytest.raises(train.ConfigError, match='name the pretraining run that preset imagenet'):
    main.default_workdir(eval_configs.get_config('imagenet'))


def test_the_default_workdir_of_a_users_config_is_its_file_name_in_one_folder():
  """A user's config without a `preset` field trained in runs/demo, the demo's folder; it
  is named after the config file. A path character in a preset argument made nested
  folders (or one outside runs/); each is one folder name now."""
  from byol_jax import main, train
  from configs import byol
  from configs import linear_eval as eval_configs
  mine = byol.get_config('demo')
  mine.preset = ''
  assert main.default_workdir(mine, '', 'my/configs/small.py') == os.path.join('runs', 'small')
  assert main.default_workdir(mine, 'fast,data=/tmp/x', 'small.py') == os.path.join(
    'runs', 'small_fast_data_tmp_x')
  for arg in ('../../etc', 'a/b', 'c:\\d e'):
    name = main.default_workdir(mine, arg, 'small.py')
    assert os.path.dirname(name) == 'runs' and '..' not in name, name
  assert main.default_workdir(byol.get_config('demo'), 'demo,epochs=3', 'configs/byol.py') == (
    os.path.join('runs', 'demo_epochs3'))
  evaluation = eval_configs.get_config('demo')
  evaluation.preset = ''
  with pytest.raises(train.ConfigError, match='name the pretraining run that config probe '):
    main.default_workdir(evaluation, '', 'configs/probe.py')


def test_a_users_config_without_a_preset_does_not_default_to_the_demos_folder(tmp_path):
  """The command line passes the config file to default_workdir (a config error then stops
  the run before anything is written)."""
  (tmp_path / 'small.py').write_text(
    'from configs import byol\n\n\ndef get_config():\n'
    "  cfg = byol.get_config('demo')\n  cfg.preset = ''\n  return cfg\n")
  proc = subprocess.run([sys.executable, '-m', 'byol_jax.main', '--config=small.py',
                         '--config.batch_size=-3'], cwd=tmp_path, capture_output=True,
                        text=True, timeout=120, env=checkout_env())
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert f"workdir {os.path.join('runs', 'small')} (the default" in proc.stderr, (
    proc.stderr[-2000:])


def test_the_default_workdir_holds_the_preset_arguments_as_typed(tmp_path):
  """The trainer names the default workdir after the preset with its arguments (main
  passes what followed the ':' of --config); a config error then stops it before anything
  is written."""
  proc = subprocess.run([sys.executable, '-m', 'byol_jax.main',
                         '--config=configs/byol.py:demo,epochs=3', '--config.batch_size=-3'],
                        cwd=tmp_path, capture_output=True, text=True, timeout=120,
                        env=checkout_env())
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert f"workdir {os.path.join('runs', 'demo_epochs3')} (the default" in proc.stderr, (
    proc.stderr[-2000:])


def test_an_evaluation_preset_without_workdir_is_one_line(tmp_path):
  proc = subprocess.run([sys.executable, '-m', 'byol_jax.main', '--worker_mode=linear_eval',
                         '--config=configs/linear_eval.py:cifar10'],
                        cwd=tmp_path, capture_output=True, text=True, timeout=120,
                        env=checkout_env())
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines()[-1] == (
    'error: --workdir: name the pretraining run that preset cifar10 evaluates, e.g. '
    '--workdir=runs/r50'), proc.stderr[-2000:]
  assert not os.listdir(tmp_path)  # nothing written


def test_a_run_started_in_the_earlier_default_workdir_resumes_there(tmp_path, monkeypatch):
  """configs/byol.py:r50,epochs=300 trained in runs/r50 before the default workdir held the
  preset's arguments (runs/r50_epochs300 now). The same command must resume that run, not
  start it afresh in the new folder; runs/r50 holding another run (plain r50's 1000
  epochs), or none, keeps the new default."""
  from byol_jax import checkpointing, main
  from configs import byol
  monkeypatch.chdir(tmp_path)
  cfg = byol.get_config('r50,epochs=300')
  new, earlier = os.path.join('runs', 'r50_epochs300'), os.path.join('runs', 'r50')
  assert main.resolve_default_workdir(cfg, 'r50,epochs=300') == new  # nothing there
  os.makedirs(earlier)
  saved = {earlier: cfg}
  monkeypatch.setattr(checkpointing, 'load_config', lambda w: saved[w])
  assert main.resolve_default_workdir(cfg, 'r50,epochs=300') == earlier
  saved[earlier] = byol.get_config('r50')  # plain r50's run: another schedule
  assert main.resolve_default_workdir(cfg, 'r50,epochs=300') == new
  assert main.resolve_default_workdir(saved[earlier], 'r50') == earlier  # its own default


def test_a_users_config_file_built_on_a_preset_names_its_own_workdir(tmp_path, monkeypatch):
  """A user's file that starts from byol.get_config('demo') keeps preset='demo'; run
  without --workdir it trained in runs/demo, the demo's own folder. It is named after the
  file now, and a run it had started in runs/demo still resumes there."""
  from byol_jax import checkpointing, main
  from configs import byol
  mine = byol.get_config('demo')
  mine.dataset = 'folder:/data/mine'
  assert main.default_workdir(mine, '', '/home/me/my_config.py') == os.path.join(
    'runs', 'my_config')
  assert main.default_workdir(mine, 'big', '/home/me/my_config.py') == os.path.join(
    'runs', 'my_config_big')
  assert main.default_workdir(mine, '', os.path.join(main._REPO_CONFIGS, 'byol.py')) == (
    os.path.join('runs', 'demo'))
  monkeypatch.chdir(tmp_path)
  assert main.resolve_default_workdir(mine, '', 'my_config.py') == os.path.join(
    'runs', 'my_config')
  os.makedirs(os.path.join('runs', 'demo'))
  saved = {os.path.join('runs', 'demo'): mine}
  monkeypatch.setattr(checkpointing, 'load_config', lambda w: saved[w])
  assert main.resolve_default_workdir(mine, '', 'my_config.py') == os.path.join('runs', 'demo')
  saved[os.path.join('runs', 'demo')] = byol.get_config('demo')  # the demo's own run
  assert main.resolve_default_workdir(mine, '', 'my_config.py') == os.path.join(
    'runs', 'my_config')


def test_a_refused_resume_names_the_runs_own_preset(monkeypatch):
  """`--config=configs/byol.py:r50,epochs=300` on a run of plain `r50` listed the differing
  fields and the flags of their saved values, but not that the run's own preset (`r50`, in
  its config.json) resumes it. The refusal carries the saved config, and the command line
  names the preset of the config file whose config matches it, with flags for the rest."""
  from byol_jax import checkpointing, main, train
  from configs import byol
  saved = checkpointing.config_to_dict(byol.get_config('r50'))
  monkeypatch.setattr(checkpointing, 'restore_latest',
                      lambda workdir, template_fn, check: check({'config': saved}))
  with pytest.raises(train.SetupMismatch) as e:
    train._restore(byol.get_config('r50,epochs=300'), 'runs/r50')
  assert e.value.saved == saved
  config_file = os.path.join(REPO, 'configs', 'byol.py')
  assert main.resuming_config(config_file, saved) == '--config=configs/byol.py:r50'
  longer = checkpointing.config_to_dict(byol.get_config('r50,epochs=300'))
  assert main.resuming_config(config_file, longer) == '--config=configs/byol.py:r50,epochs=300'
  smaller = byol.get_config('cifar10')
  smaller.batch_size = 128
  assert main.resuming_config(config_file, checkpointing.config_to_dict(smaller)) == (
    '--config=configs/byol.py:cifar10 --config.batch_size=128')
  # A preset that another file holds (or none) is not guessed.
  assert main.resuming_config(os.path.join(REPO, 'configs', 'ablation.py'), saved) is None
  assert main.resuming_config(config_file, {**saved, 'preset': None}) is None


@pytest.mark.parametrize('module,mode', [('byol_jax.linear_eval', 'linear_eval'),
                                         ('byol_jax.finetune', 'finetune'),
                                         ('byol_jax.eval_worker', 'eval'),
                                         ('byol_jax.train', 'train')])
def test_a_worker_module_run_alone_names_the_command_that_runs_it(module, mode):
  """`python -m byol_jax.linear_eval --help` printed nothing and exited 0, as if it had run:
  a worker module run alone exits 2 with the byol_jax.main command that runs it."""
  proc = subprocess.run([sys.executable, '-m', module, '--help'], cwd=REPO, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert f'python -m byol_jax.main --worker_mode={mode} --config=configs/' in proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-2000:]


@pytest.mark.parametrize('module,mode', [('linear_eval', 'linear_eval'),
                                         ('finetune', 'finetune'),
                                         ('eval_worker', 'eval'), ('train', 'train')])
def test_a_worker_module_run_by_its_path_names_the_command_that_runs_it(module, mode):
  """`python byol_jax/finetune.py` (a file, not -m) has no __spec__: the module's
  `__spec__.name` ended in AttributeError's traceback instead of the one-line hint."""
  proc = subprocess.run([sys.executable, os.path.join(REPO, 'byol_jax', f'{module}.py')],
                        cwd=REPO, capture_output=True, text=True, timeout=120,
                        env=checkout_env())
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert f'python -m byol_jax.main --worker_mode={mode} --config=configs/' in proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-2000:]


@pytest.mark.parametrize('typed, nearest', [
  ('train.epocs', 'epochs'),  # a group that does not exist, the leaf misspelt
  ('optimizer.lr', 'optimizer.base_lr'),  # a short name inside the real one
  ('lr', 'optimizer.base_lr'),
  ('model.dept', 'model.depth'),
  ('weight_decay', 'optimizer.weight_decay'),  # the right name in the wrong group
  ('nosuch', None),
])
def test_nearest_field_of_a_mistyped_override(typed, nearest):
  """The field an unknown --config.FIELD most likely meant, searched over the whole config:
  ml_collections suggested only among the siblings of the first unknown part."""
  fields = cli._config_fields_of(os.path.join(REPO, 'configs', 'byol.py') + ':demo')
  assert cli.nearest_field(typed, fields) == nearest


def test_a_preset_error_from_another_directory_shows_the_file_as_typed(tmp_path):
  """From outside the checkout, configs/byol.py is read from the checkout
  (config_path_fallback), and the error quoted that absolute path, not what was typed."""
  proc = subprocess.run([sys.executable, '-m', 'byol_jax.main', '--config=configs/byol.py:R50',
                         '--show_config'], cwd=tmp_path, capture_output=True, text=True,
                        timeout=120, env=checkout_env())
  assert proc.returncode == 2
  assert proc.stderr.startswith("error: flag --config=configs/byol.py:R50: unknown preset 'R50'")
  assert "did you mean 'r50'?" in proc.stderr
