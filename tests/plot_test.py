"""Metric plots: every figure from realistic JSONL, and one-line errors without metrics."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO
from PIL import Image

from byol_jax import plot


def _write_jsonl(path, records):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in records)


@pytest.fixture
def workdir(tmp_path):
  """A fake run as the trainer and an evaluation worker write it (NaN as text)."""
  steps = range(20, 420, 20)
  _write_jsonl(tmp_path / 'metrics' / 'train.jsonl', [
    dict(step=s, loss=2.0 * math.exp(-s / 200) + 0.3, lr=min(s / 100, 1.0), tau=0.99 + s / 4e4,
         proj_std=0.08 - s / 1e4, proj_rank=60 - s / 20, probe_top1=min(0.1 + s / 800, 0.6),
         eta_sec='nan' if s == 20 else 100.0) for s in steps])
  _write_jsonl(tmp_path / 'metrics' / 'eval.jsonl', [
    dict(step=s, knn_top1=0.2 + s / 1000, knn_top1_init=0.15, network='online', split='test')
    for s in (200, 400)] + [dict(step=400, knn_top1=0.5, network='target')])
  _write_jsonl(tmp_path / 'metrics' / 'linear_eval.jsonl', [dict(step=400, test_top1=0.55)])
  (tmp_path / 'config.json').write_text(json.dumps({'model': {'projection_dim': 128}}))
  return tmp_path


def test_all_figures_are_valid_pngs(workdir):
  """A figure that is missing, blank-sized or not a PNG would break this."""
  paths = plot.make_plots(str(workdir))
  names = sorted(os.path.basename(p) for p in paths)
  assert names == ['accuracy.png', 'collapse.png', 'knn.png', 'loss.png', 'schedule.png']
  for path in paths:
    assert os.path.dirname(path) == str(workdir / 'plots')
    with Image.open(path) as image:
      assert image.format == 'PNG'
      assert 400 <= image.width <= 2000 and 250 <= image.height <= 2000
      pixels = np.asarray(image.convert('L'))
    assert pixels.std() > 5  # something was drawn


def test_collapse_reference_and_series_parsing(workdir):
  """Losing the NaN-as-text handling or the 1/sqrt(dim) reference would break this."""
  records = plot.load_metrics(str(workdir))
  assert set(records) == {'train', 'eval', 'linear_eval'}
  steps, values = plot.series(records['train'], 'eta_sec')
  assert steps[0] == 40 and len(values) == len(records['train']) - 1
  assert plot.series(records['eval'], 'network') == ([], [])
  assert plot.first_value(records['eval'], 'knn_top1_init') == 0.15
  assert plot.projection_dim(str(workdir)) == 128
  labels = [label for label, _ in plot._eval_files(records)]
  assert labels == ['eval online', 'eval target', 'linear_eval']


def test_evaluations_of_different_settings_get_their_own_lines():
  """A refit head's test top-1 and a sweep head's (records before refit existed count as
  the sweep's), or two datasets, are different measurements: breaks if they share a line."""
  rec = lambda step, **kw: {'step': step, 'test_top1': 0.5, 'network': 'online',
                            'dataset': 'cifar10', 'protocol': 'linear_cached', **kw}
  records = {'linear_eval': [rec(100), rec(200, refit=False), rec(200, refit=True),
                             rec(300, refit=True), rec(300, refit=True, dataset='dtd')]}
  groups = {label: [r['step'] for r in rs] for label, rs in plot._eval_files(records)}
  assert groups == {
    'linear_eval online dataset=cifar10 refit=False': [100, 200],
    'linear_eval online dataset=cifar10 refit=True': [200, 300],
    'linear_eval online dataset=dtd refit=True': [300]}


def test_the_eval_workers_initialisation_and_checkpoints_share_a_line():
  """The eval worker's step 0 (random init, protocol 'knn': no probe) and its checkpoints
  ('knn+online_probe') are one kNN curve; they were drawn as two unjoined legend entries."""
  rec = lambda step, protocol: {'step': step, 'knn_top1': 0.5, 'network': 'online',
                                'dataset': 'demo', 'protocol': protocol}
  records = {'eval_worker': [rec(0, 'knn'), rec(100, 'knn+online_probe'),
                             rec(200, 'knn+online_probe')]}
  groups = {label: [r['step'] for r in rs] for label, rs in plot._eval_files(records)}
  assert groups == {'eval_worker online': [0, 100, 200]}


def test_partial_metrics_and_output_dir(tmp_path):
  """Crashing on a run with only eval metrics, or ignoring --output, would break this."""
  _write_jsonl(tmp_path / 'run' / 'metrics' / 'eval.jsonl', [dict(step=10, knn_top1=0.3)])
  paths = plot.make_plots(str(tmp_path / 'run'), str(tmp_path / 'out'))
  assert [os.path.basename(p) for p in paths] == ['knn.png']
  assert os.path.exists(tmp_path / 'out' / 'knn.png')


@pytest.mark.parametrize('make_dir', [False, True], ids=['missing_workdir', 'no_metrics'])
def test_cli_errors_are_one_line(tmp_path, make_dir):
  """A traceback, a multi-line error or an exit code other than 2 would break this."""
  target = tmp_path / 'run'
  if make_dir:
    target.mkdir()
  result = subprocess.run([sys.executable, '-m', 'byol_jax.plot', f'--workdir={target}'],
                          cwd=REPO, capture_output=True, text=True)
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: ')
  assert ('does not exist' if not make_dir else 'no metrics') in lines[0]


def test_cli_writes_plots(workdir):
  """The entry point not wiring flags to make_plots would break this."""
  result = subprocess.run([sys.executable, '-m', 'byol_jax.plot', f'--workdir={workdir}'],
                          cwd=REPO, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr
  assert len(result.stdout.split()) == 5


@pytest.fixture
def trainer_eval(tmp_path):
  """eval.jsonl as the trainer writes it: kNN with epoch, elapsed time and the init score."""
  _write_jsonl(tmp_path / 'metrics' / 'eval.jsonl', [
    dict(step=s, epoch=s / 97, knn_top1=0.3 + s / 4000, knn_top5=0.8, knn_top1_init=0.28,
         network='online', split='test', elapsed_sec=s * 1.5) for s in (97, 388, 776, 970)])
  return tmp_path


def test_knn_over_epochs(trainer_eval):
  """Plotting kNN over steps when the records carry epochs, or dropping a point, breaks this."""
  from matplotlib.figure import Figure
  metrics = plot.load_metrics(str(trainer_eval))
  assert plot.knn_axis(metrics) == 'epoch'
  fig = Figure()
  assert plot._plot_knn(fig, metrics, str(trainer_eval))
  ax = fig.axes[0]
  assert ax.get_xlabel() == 'epoch' and ax.get_xlim()[0] == 0
  line = ax.get_lines()[0]
  np.testing.assert_allclose(line.get_xdata(), [1, 4, 8, 10])
  np.testing.assert_allclose(line.get_ydata(), [0.3 + s / 4000 for s in (97, 388, 776, 970)])
  assert ax.get_lines()[1].get_ydata()[0] == 0.28  # the initial encoder's dashed line
  # One record without an epoch (the eval worker writes none): fall back to steps for all.
  metrics['eval'].append(dict(step=1000, knn_top1=0.6))
  assert plot.knn_axis(metrics) == 'step'


def test_cli_one_figure_to_a_png_path(trainer_eval, tmp_path):
  """The README's command: --figures=knn --output=FILE.png writes that one PNG, nothing else."""
  target = tmp_path / 'docs' / 'cifar10_knn.png'
  result = subprocess.run([sys.executable, '-m', 'byol_jax.plot', f'--workdir={trainer_eval}',
                           '--figures=knn', f'--output={target}'],
                          cwd=REPO, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr
  assert result.stdout.split() == [str(target)]
  assert os.listdir(target.parent) == ['cifar10_knn.png']
  with Image.open(target) as image:
    assert image.format == 'PNG' and image.width >= 400
    assert np.asarray(image.convert('L')).std() > 5


@pytest.mark.parametrize('args, message', [
  (['--figures=knn,nope'], "unknown figure 'nope'"),
  (['--figures=knn,loss', '--output=x.png'], 'name one figure'),
  (['--figures=loss', '--output=x.png'], 'no data for the loss figure'),
], ids=['unknown_figure', 'png_for_two', 'png_without_data'])
def test_cli_figure_selection_errors(trainer_eval, tmp_path, args, message):
  """A traceback or a silent no-op for a bad --figures/--output would break this."""
  args = [a.replace('x.png', str(tmp_path / 'x.png')) for a in args]
  result = subprocess.run([sys.executable, '-m', 'byol_jax.plot', f'--workdir={trainer_eval}',
                           *args], cwd=REPO, capture_output=True, text=True)
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: ') and message in lines[0], lines


def test_a_voc_linear_evaluation_is_plotted_as_its_map(tmp_path):
  """VOC2007's linear evaluation writes test_map, not a top-1: the accuracy figure used to
  leave it out (and not be drawn at all for a run evaluated on VOC alone)."""
  _write_jsonl(tmp_path / 'metrics' / 'linear_eval.jsonl', [dict(step=400, test_map=0.71)])
  paths = plot.make_plots(str(tmp_path))
  assert [os.path.basename(p) for p in paths] == ['accuracy.png']
