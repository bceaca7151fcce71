"""Executes the notebooks in experiments/ end to end with a tiny setting (nbclient)."""

import os

import pytest
from conftest import FAST_COMPILE, REPO

nbformat = pytest.importorskip('nbformat')
nbclient = pytest.importorskip('nbclient')


@pytest.mark.parametrize('name', ['quickstart.ipynb', 'colab_tpu_pretraining.ipynb'])
def test_notebook_runs(name, tmp_path, monkeypatch):
  """A notebook cell that no longer matches the CLI, plots or export would fail here."""
  monkeypatch.setenv('BYOL_NOTEBOOK_TINY', '1')
  monkeypatch.setenv('BYOL_REPO', REPO)
  monkeypatch.setenv('BYOL_NOTEBOOK_WORKDIR', str(tmp_path / 'run'))
  monkeypatch.setenv('XLA_FLAGS', FAST_COMPILE)
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  nb = nbformat.read(os.path.join(REPO, 'experiments', name), as_version=4)
  nbclient.NotebookClient(nb, timeout=600, kernel_name='python3',
                          resources={'metadata': {'path': str(tmp_path)}}).execute()
  outputs = ''.join(o.get('text', '') for c in nb.cells if c.cell_type == 'code'
                    for o in c.get('outputs', []))
  assert 'knn_top1' in outputs
