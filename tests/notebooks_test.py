"""Executes the notebooks in experiments/ end to end with a tiny setting (nbclient)."""

import os
import subprocess
import sys

import pytest
from conftest import FAST_COMPILE, REPO

nbformat = pytest.importorskip('nbformat')
nbclient = pytest.importorskip('nbclient')

# A stand-in for TFDS's prepared CIFAR-10: the real builder's version and features, 64 train
# and 32 test random images, written where download_and_prepare looks (no network needed).
_FAKE_CIFAR10 = """
import sys
import numpy as np, tensorflow as tf, tensorflow_datasets as tfds
builder = tfds.builder('cifar10', data_dir=sys.argv[1])
def split(n, seed):
  rng = np.random.default_rng(seed)
  return tf.data.Dataset.from_tensor_slices({
    'id': np.array([f'{seed}_{i}' for i in range(n)]),
    'image': rng.integers(0, 256, (n, 32, 32, 3), np.uint8), 'label': np.arange(n) % 10})
tfds.dataset_builders.store_as_tfds_dataset(
  name='cifar10', version=str(builder.version), features=builder.info.features,
  data_dir=sys.argv[1], split_datasets={'train': split(64, 0), 'test': split(32, 1)})
"""


def _execute(name: str, tmp_path) -> str:
  nb = nbformat.read(os.path.join(REPO, 'experiments', name), as_version=4)
  nbclient.NotebookClient(nb, timeout=600, kernel_name='python3',
                          resources={'metadata': {'path': str(tmp_path)}}).execute()
  return ''.join(o.get('text', '') for c in nb.cells if c.cell_type == 'code'
                 for o in c.get('outputs', []))


@pytest.fixture
def tiny_notebook_env(tmp_path, monkeypatch):
  monkeypatch.setenv('BYOL_NOTEBOOK_TINY', '1')
  monkeypatch.setenv('BYOL_REPO', REPO)
  monkeypatch.setenv('BYOL_NOTEBOOK_WORKDIR', str(tmp_path / 'run'))
  monkeypatch.setenv('XLA_FLAGS', FAST_COMPILE)
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')


# The Colab notebook's default run off Colab (the demo preset) is slow-marked: the same cells
# run in CI with its Colab preset, cifar10 (test_colab_notebook_prepares_and_passes_cifar10).
@pytest.mark.parametrize('name', ['quickstart.ipynb', pytest.param(
  'colab_tpu_pretraining.ipynb', marks=pytest.mark.slow)])
def test_notebook_runs(name, tmp_path, tiny_notebook_env):
  """A notebook cell that no longer matches the CLI, plots or export would fail here."""
  assert 'knn_top1' in _execute(name, tmp_path)


@pytest.mark.slow
def test_colab_notebook_prepares_and_passes_cifar10(tmp_path, tiny_notebook_env, monkeypatch):
  """On Colab the TPU notebook runs the cifar10 preset, whose TFDS data byol-jax never
  downloads: the notebook must prepare it and hand the same data_dir to the trainer, or
  every Colab user's first run stops at 'not prepared'. Here the data is already prepared
  (as on a second run), so a wrong data_dir would try the network and fail."""
  data_dir = tmp_path / 'tfds'
  subprocess.run([sys.executable, '-c', _FAKE_CIFAR10, str(data_dir)], check=True,
                 capture_output=True, timeout=300)
  monkeypatch.setenv('BYOL_PRESET', 'cifar10')
  monkeypatch.setenv('BYOL_NOTEBOOK_DATA_DIR', str(data_dir))
  outputs = _execute('colab_tpu_pretraining.ipynb', tmp_path)
  assert "'dataset': 'cifar10'" in outputs and 'knn_top1' in outputs


def _helper_cell(name: str) -> str:
  nb = nbformat.read(os.path.join(REPO, 'experiments', name), as_version=4)
  cells = [c.source for c in nb.cells if c.cell_type == 'code' and 'def sh(' in c.source]
  assert len(cells) == 1, name
  return cells[0]


@pytest.mark.parametrize('name', ['quickstart.ipynb', 'colab_tpu_pretraining.ipynb'])
def test_notebook_commands_show_their_output_as_it_comes(name, tmp_path, monkeypatch):
  """A notebook cell that trains for an hour must show its progress lines while it runs, not
  the tail of its output at the end (as `sh` once did), and must still fail on an error."""
  import time
  monkeypatch.setenv('BYOL_REPO', str(tmp_path))
  shown = []
  namespace = {'print': lambda *a, **k: shown.append((time.monotonic(), ' '.join(map(str, a))))}
  exec(_helper_cell(name), namespace)  # noqa: S102 - the notebook's own helper, from the repo
  start = time.monotonic()
  namespace['sh'](sys.executable, '-c',
                  'import time; print("F" * 3); time.sleep(2); print("L" * 3)')
  end = time.monotonic()
  first = next(t for t, text in shown if 'FFF' in text)  # not the echoed command line
  assert first - start < end - start - 1.0, shown  # shown before the command went on
  assert any('LLL' in text for _, text in shown)
  with pytest.raises(AssertionError, match='exit code 3'):
    namespace['sh'](sys.executable, '-c', 'raise SystemExit(3)')


def test_colab_notebook_leaves_the_tpu_to_the_trainer():
  """A TPU serves one process at a time: a notebook kernel that imported JAX (or TensorFlow)
  would hold it, and the trainer started by the next cell would fall back to the CPU. So the
  Colab notebook runs every such step through `sh` and its kernel imports none of them."""
  import ast
  nb = nbformat.read(os.path.join(REPO, 'experiments', 'colab_tpu_pretraining.ipynb'),
                     as_version=4)
  held = {'jax', 'jaxlib', 'tensorflow', 'tensorflow_datasets', 'byol_jax', 'haiku'}
  imported = set()
  for cell in nb.cells:
    if cell.cell_type != 'code':
      continue
    for node in ast.walk(ast.parse(cell.source)):
      if isinstance(node, ast.Import):
        imported |= {a.name.split('.')[0] for a in node.names}
      elif isinstance(node, ast.ImportFrom) and node.module:
        imported.add(node.module.split('.')[0])
  assert not imported & held, sorted(imported & held)
