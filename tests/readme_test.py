"""Checks that the README quotes the code: presets table, code map, worker modes, set-up.

Run `python tests/readme_test.py` to print the presets table and the code map to paste after
a config or module change.
"""

import ast
import glob
import os
import re
import sys

import pytest
from conftest import REPO

from configs import byol


def presets_table() -> str:
  """The README's presets table, generated from configs/byol.py."""
  head = ('| preset | encoder | dataset | image px | batch | epochs | base LR | optimizer '
          '| weight decay | tau_base |\n|---|---|---|---|---|---|---|---|---|---|')
  rows = []
  for name in byol.PRESETS:
    c = byol.get_config(name)
    stem = ' (CIFAR stem)' if c.model.cifar_stem else ''
    clip = ' clipped' if c.optimizer.trust_clip else ''
    opt = (f'LARS {c.optimizer.trust_coefficient:g}{clip}' if c.optimizer.name == 'lars'
           else 'SGD')
    tau = f'{c.tau_base:g}' + (' constant' if c.tau_schedule == 'constant' else '')
    rows.append(f'| `{name}` | ResNet-{c.model.depth} x{c.model.width:g}{stem} | {c.dataset} | '
                f'{c.image_size} | {c.batch_size} | {c.epochs:g} | {c.optimizer.base_lr:g} | '
                f'{opt} | {c.optimizer.weight_decay:g} | {tau} |')
  return '\n'.join([head, *rows])


def code_map_table() -> str:
  """The README's code map: every module of the package and configs/, with the first
  paragraph of its docstring (so a new or renamed module, or a changed summary, shows)."""
  rows = ['| module | what it is for |', '|---|---|']
  paths = sorted(glob.glob(os.path.join(REPO, 'byol_jax', '**', '*.py'), recursive=True))
  paths += sorted(glob.glob(os.path.join(REPO, 'configs', '*.py')))
  for path in paths:
    with open(path) as f:
      doc = ast.get_docstring(ast.parse(f.read()))
    if not doc:  # package markers (__init__.py) say nothing
      continue
    summary = ' '.join(doc.split('\n\n')[0].split()).replace('|', '\\|')
    rows.append(f'| `{os.path.relpath(path, REPO)}` | {summary} |')
  return '\n'.join(rows)


def _readme() -> str:
  with open(os.path.join(REPO, 'README.md')) as f:
    return f.read()


def test_presets_table_matches_configs():
  """A preset whose hyperparameters changed without the README following fails here."""
  assert presets_table() in _readme(), 'regenerate with: python tests/readme_test.py'


def test_code_map_lists_every_module():
  """A module added, renamed or re-summarised without the README's code map following
  fails here."""
  assert code_map_table() in _readme(), 'regenerate with: python tests/readme_test.py'


def test_worker_modes_documented():
  """Every --worker_mode the CLI accepts is described in the README, and no other."""
  from byol_jax import main
  readme = _readme()
  for mode in main.WORKER_MODES:
    assert f'--worker_mode={mode}' in readme, mode
  documented = set(re.findall(r'--worker_mode=(\w+)', readme))
  assert documented <= set(main.WORKER_MODES), documented - set(main.WORKER_MODES)


def test_linear_eval_presets_listed_as_in_the_config():
  """A linear_eval preset added or dropped without the README following fails here."""
  from configs import linear_eval as eval_configs
  text = ' '.join(_readme().split())
  listed = re.search(r'Presets in `configs/linear_eval.py`: ([^.]+)\.', text).group(1)
  assert [p.strip() for p in listed.split(',')] == list(eval_configs.PRESETS)


def test_setup_commands_are_present():
  """The two set-up commands CI and new users rely on."""
  readme = _readme()
  assert 'python -m byol_jax.main --config=configs/byol.py:demo --workdir=runs/demo' in readme
  assert 'python -m pytest -q' in readme
  with open(os.path.join(REPO, '.ci', 'run')) as f:
    assert 'python -m pytest -q' in f.read()


def _section(title: str) -> str:
  readme = _readme()
  start = readme.index(f'## {title}\n')
  return readme[start:readme.index('\n## ', start + 1)]


def test_multihost_section_quotes_the_flags_and_defaults():
  """Every --flag the multi-host section names exists, and the timeouts it quotes are the
  config's defaults."""
  from absl import flags

  from byol_jax import main  # noqa: F401  (defines the flags)
  section = _section('Multi-host')
  gcloud = {'worker', 'command'}  # gcloud's own flags in the TPU pod command
  for name in set(re.findall(r'--(\w+)=', section)) - gcloud:
    assert name in flags.FLAGS, name
  for field, value in byol.get_config('demo').multihost.items():
    assert f'`{field}` ({value:g})' in section, field


def _anchor(heading: str) -> str:
  """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
  return re.sub(r'[^\w\- ]', '', heading.strip().lower()).replace(' ', '-')


def _markdown_files() -> list[str]:
  paths = [os.path.join(REPO, 'README.md')]
  paths += sorted(glob.glob(os.path.join(REPO, 'docs', '*.md')))
  return paths + sorted(glob.glob(os.path.join(REPO, 'experiments', '*.md')))


def test_relative_links_resolve():
  """A moved or renamed document, figure or section leaves no dead link in the docs: every
  relative [text](path#anchor) names a file that exists and a heading that file has."""
  dead = []
  for path in _markdown_files():
    with open(path) as f:
      text = f.read()
    for target in re.findall(r'\]\(([^)\s]+)\)', text):
      if re.match(r'[a-z]+://', target):
        continue
      file_part, _, anchor = target.partition('#')
      linked = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part \
        else path
      if not os.path.exists(linked):
        dead.append(f'{os.path.relpath(path, REPO)}: {target} (no such file)')
      elif anchor:
        with open(linked) as f:
          headings = re.findall(r'^#+ (.+)$', f.read(), flags=re.M)
        if anchor not in {_anchor(h) for h in headings}:
          dead.append(f'{os.path.relpath(path, REPO)}: {target} (no such heading)')
  assert not dead, dead


if __name__ == '__main__':
  sys.stdout.write(presets_table() + '\n\n' + code_map_table() + '\n')


def test_config_fields_in_docs_and_scripts_exist():
  """Breaks when a command in the README, docs/ or experiments/ overrides a config field that
  no preset has: ml_collections would reject it, and in a GPU session's one prepared call
  that costs the call."""
  from conftest import config_fields
  fields = config_fields()
  paths = [os.path.join(REPO, 'README.md'), *glob.glob(os.path.join(REPO, 'docs', '*.md')),
           *glob.glob(os.path.join(REPO, 'experiments', '*'))]
  placeholders = {'x', 'y'}  # the README's `--config.x=...` pattern
  wrong = []
  for path in paths:
    if os.path.isfile(path) and not path.endswith('.png'):
      with open(path) as f:
        for field in re.findall(r'--config\.([a-z_0-9]+(?:\.[a-z_0-9]+)*)', f.read()):
          if field not in fields | placeholders:
            wrong.append(f'{os.path.relpath(path, REPO)}: --config.{field}')
  assert not wrong, wrong


def test_imagenet_finetune_commands_name_a_label_subset():
  """finetune decodes its splits into memory and refuses one over a quarter of an
  accelerator's (finetune._require_resident); all of ImageNet's training images exceed even
  an H200's, so a README command that fine-tunes with the imagenet preset (subset_fraction 0:
  all labels) must name the 1% or 10% subset, or it stops with an error."""
  from byol_jax import data, datasets, import_release
  from configs import linear_eval as eval_configs
  cfg = eval_configs.get_config('imagenet')
  train = import_release.IMAGENET_TRAIN_EXAMPLES - datasets.IMAGENET_VALID_EXAMPLES
  side = data.eval_decode_size(cfg.image_size, cfg.crop_fraction)
  assert datasets.choose_input_mode(train, side, 141 * 2**30)[0] == 'stream'
  assert not cfg.subset_fraction  # the preset alone fine-tunes on all labels
  lines = _readme().replace('\\\n', ' ').splitlines()
  commands = [line for line in lines
              if '--worker_mode=finetune' in line and 'linear_eval.py:imagenet' in line]
  assert commands  # the README shows how to fine-tune on ImageNet
  wrong = [c for c in commands if not re.search(r'--config\.subset_fraction=0\.0?1\b', c)]
  assert not wrong, wrong


def _quoted(pattern: str, text: str) -> tuple[str, ...]:
  """The groups of the one place `pattern` matches in `text` (whitespace normalised)."""
  found = re.findall(pattern, text)
  assert len(found) == 1, (pattern, found)
  return found[0] if isinstance(found[0], tuple) else (found[0],)


def _number(text: str) -> float:
  words = {'a tenth': 0.1, 'two': 2, 'a quarter': 0.25}
  return words[text] if text in words else float(text.replace(',', ''))


def test_quoted_defaults_match_the_code():
  """The defaults and constants the README quotes in prose (outside the presets and
  multi-host tables) are the code's: changing either side without the other fails here."""
  import inspect
  import math

  from byol_jax import datasets, eval_worker, losses, main, networks, train
  from byol_jax.evaluators import common
  from configs import linear_eval as eval_configs
  text = ' '.join(_readme().split())
  r50, demo, cifar10 = (byol.get_config(p) for p in ('r50', 'demo', 'cifar10'))
  imagenet = [byol.get_config(p) for p in byol.IMAGENET_PRESETS]
  checks = {
    r'LARS \(trust coefficient ([\d.e-]+), momentum ([\d.]+),':
      (r50.optimizer.trust_coefficient, r50.optimizer.momentum),
    r'\(([\d,]+) images for ImageNet;': (datasets.IMAGENET_VALID_EXAMPLES,),
    r'`valid/`; (\d+)% elsewhere': (datasets.VALID_PERCENT,),
    r'`--config.pretrain_split` \(default `(\w+)`\)': (r50.pretrain_split,),
    r'\(([\d,]+) in the ImageNet presets, whose feature bank then takes ([\d.]+) GB\)':
      (imagenet[0].knn.train_examples,
       round(imagenet[1].knn.train_examples * networks.resnet_output_dim(True, 1) * 4 / 1e9,
             1)),
    r'it says every (\d+) minutes what it waits for':
      (eval_worker.WAITING_NOTICE_SECS / 60,),
    r'it stops \(exit (\d+)\) after `--config.eval_idle_timeout_secs` \((\d+)\)':
      (eval_worker.IDLE_EXIT, r50.eval_idle_timeout_secs),
    r'without that save, exit (\d+)\)': (main.INTERRUPTED,),
    r"so each of its (\d+) epochs, and the refit's (\d+),":
      (eval_configs.get_config('imagenet').epochs,) * 2,
    r'refuses one larger than (a quarter) of an accelerator':
      (inspect.signature(datasets.choose_input_mode).parameters['max_fraction'].default,),
    r'streamed batches are copied to the devices (two) steps ahead \(`train.STREAM_PREFETCH`\)':
      (train.STREAM_PREFETCH,),
    r'`std` has stayed under (a tenth) of its healthy value': (losses.COLLAPSE_STD_FRACTION,),
    r"when healthy \(([\d.]+) for the demo's (\d+), ([\d.]+) for (\d+);":
      (round(demo.model.projection_dim ** -0.5, 3), demo.model.projection_dim,
       r50.model.projection_dim ** -0.5, r50.model.projection_dim),
    r'kNN top-1 after (\d+) steps \((\d+) epochs\)':
      (demo.epochs * demo.demo.train_examples // demo.batch_size, demo.epochs),
    r're-estimated on ([\d,]+) training images \(`knn_top1_init`':
      (min(demo.demo.train_examples, common.BN_CALIBRATION_EXAMPLES),),
    r'\(D = (\d+) for the demo\)':
      (networks.resnet_output_dim(demo.model.depth >= 50, demo.model.width),),
    r'kNN: k=(\d+), temperature ([\d.]+), features of the': (cifar10.knn.k,
                                                              cifar10.knn.temperature),
    r"picks the release's hyperparameters for ([\d/]+) epochs":
      ('/'.join(map(str, byol.EPOCH_TABLE)),),
  }
  wrong = []
  for pattern, expected in checks.items():
    quoted = _quoted(pattern, text)
    if not all(q == e if isinstance(e, str) else math.isclose(_number(q), e)
               for q, e in zip(quoted, expected, strict=True)):
      wrong.append(f'{pattern}: README {quoted}, code {expected}')
  assert not wrong, wrong
  assert all(c.knn.train_examples == imagenet[0].knn.train_examples for c in imagenet)
  assert all(byol.get_config(p).pretrain_split == r50.pretrain_split for p in byol.PRESETS)
  # "(on in the demo and cifar10 presets)": the presets that evaluate at initialisation.
  assert '`--config.eval_at_init` (on in the demo and cifar10 presets)' in text
  assert {p for p in byol.PRESETS if byol.get_config(p).eval_at_init} == {
    'demo', 'cifar10', 'cifar10_lightly'}


def test_quoted_preset_settings_match_the_configs():
  """Settings the README names per preset outside the presets table: the linear-evaluation
  mode of each configs/linear_eval.py preset, and the PyTorch-recipe switches that
  `cifar10_lightly` sets (and the stem ReLU it does not)."""
  from configs import linear_eval as eval_configs
  text = ' '.join(_readme().split())
  assert ("The `imagenet` preset is the paper's protocol: heads train on random crops + flips "
          "(`mode='augmented'`)") in text
  assert "as the transfer and `demo` presets do (the paper's transfer protocol)" in text
  modes = {p: eval_configs.get_config(p).mode for p in eval_configs.PRESETS}
  assert modes.pop('imagenet') == 'augmented'
  assert set(modes.values()) == {'cached'}, modes
  switches = ('--config.optimizer.name=sgd', '--config.tau_schedule=constant',
              '--config.augment.jitter_style=torchvision', '--config.model.weight_init=pytorch')
  said = text[text.index(switches[0]):text.index('`cifar10_lightly` sets all of these')]
  assert all(s in said for s in switches), switches
  lightly = byol.get_config('cifar10_lightly')
  assert (lightly.optimizer.name, lightly.tau_schedule, lightly.augment.jitter_style,
          lightly.model.weight_init) == tuple(s.split('=')[1] for s in switches)
  assert '`--config.model.stem_relu=False` drops the ReLU' in text
  assert 'not in the preset)' in text and lightly.model.stem_relu


def test_extending_section_quotes_names_that_exist():
  """Breaks when "Extending byol-jax" names a table, function or file that was renamed or
  removed: the section is where a researcher starts, and a dead name sends them hunting."""
  import importlib
  text = _readme()
  section = text[text.index('## Extending byol-jax'):text.index('## Results')]
  modules = 'networks|losses|augment|config_compat|datasets'
  names = set(re.findall(rf'`((?:{modules})\.(?!py\b)\w+)', section))
  assert {'networks.ENCODERS', 'losses.LOSSES', 'augment.default_augment_config'} <= names
  missing = [n for n in sorted(names) if not hasattr(
    importlib.import_module('byol_jax.' + n.split('.')[0]), n.split('.')[1])]
  paths = set(re.findall(r'`((?:tests|configs|byol_jax)/[\w/]+\.py)', section))
  missing += [p for p in sorted(paths) if not os.path.isfile(os.path.join(REPO, p))]
  assert not missing, missing


def test_cited_commits_are_in_the_history():
  """The README and docs name the commit a figure was recorded at; a hash from before a
  rebase (the README's ConvNet example cited cd9ffe5, docs/performance.md a5a9328) names no
  commit of the history, so the provenance cannot be followed. Skipped outside a full git
  checkout (a source archive, a shallow clone)."""
  import shutil
  import subprocess
  git = shutil.which('git')
  if not git or not os.path.isdir(os.path.join(REPO, '.git')):
    pytest.skip('no git checkout')
  run = lambda *a: subprocess.run([git, '-C', REPO, *a], capture_output=True, text=True)
  if run('rev-parse', '--is-shallow-repository').stdout.strip() != 'false':
    pytest.skip('a shallow clone lacks old commits')
  cited = set()
  for path in [os.path.join(REPO, 'README.md'), *glob.glob(os.path.join(REPO, 'docs', '*.md'))]:
    with open(path) as f:
      text = f.read()
    cited |= {h for h in re.findall(r'\b[0-9a-f]{7,12}\b', text) if re.search('[a-f]', h)
              and re.search('[0-9]', h)}
    cited |= set(re.findall(r'\bcommits? ([0-9]{7})\b', text))
  assert len(cited) > 10, cited
  missing = sorted(h for h in cited
                   if run('merge-base', '--is-ancestor', h, 'HEAD').returncode != 0)
  assert not missing, missing
