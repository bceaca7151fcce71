"""Tests of the reproduction scripts in experiments/ (tiny budgets on CPU)."""

import json
import os
import subprocess
import sys

import pytest
from conftest import FAST_COMPILE, REPO

sys.path.insert(0, os.path.join(REPO, 'experiments'))
import results_table  # noqa: E402

CIFAR = os.path.join(os.environ.get('BYOL_SHARED', os.path.join(os.path.dirname(REPO), 'shared')),
                     'datasets', 'cifar10', 'cifar10_jpeg_bytes.npz')
needs_cifar = pytest.mark.skipif(not os.path.exists(CIFAR), reason='shared CIFAR-10 copy absent')


def _write(path, records):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in records)


def test_results_table_reads_metrics(tmp_path):
  """The printed table must come from eval.jsonl (kNN) and train.jsonl (throughput)."""
  _write(tmp_path / 'metrics' / 'train.jsonl', [{'step': 10, 'images_per_sec': 123.0},
                                                {'step': 20, 'images_per_sec': 456.0}])
  _write(tmp_path / 'metrics' / 'eval.jsonl', [
    {'step': 10, 'epoch': 1.0, 'knn_top1': 0.3, 'knn_top1_init': 0.1, 'elapsed_sec': 5.0},
    {'step': 20, 'epoch': 2.0, 'knn_top1': 0.5, 'knn_top1_init': 0.1, 'elapsed_sec': 9.0}])
  table = results_table.format_table(results_table.rows(str(tmp_path)))
  lines = table.splitlines()
  assert len(lines) == 4 and '0.1000' in lines[1]
  assert '456' in lines[3] and '0.5000' in lines[3] and '123' in lines[2]
  assert results_table.main(['--workdir', str(tmp_path / 'nothing')]) == 2


def _run_script(name, tmp_path, *args):
  env = dict(os.environ, TINY='1', OUT=str(tmp_path / 'out'), CIFAR_NPZ=CIFAR,
             CIFAR_FOLDER=str(tmp_path / 'cifar'), XLA_FLAGS=FAST_COMPILE, JAX_PLATFORMS='cpu')
  out = subprocess.run(['bash', os.path.join('experiments', name), *args], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=1800)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  return out.stdout


@pytest.mark.slow
@needs_cifar
def test_cifar10_gpu_script_runs_tiny(tmp_path):
  """The one-command GPU reproduction script runs end to end and prints the results table."""
  stdout = _run_script('cifar10_gpu.sh', tmp_path, '1')
  assert 'kNN top-1' in stdout and '0 (init)' in stdout


@pytest.mark.slow
@needs_cifar
def test_ablation_script_runs_tiny(tmp_path):
  """Every ablation variant trains and the table lists each plus the random encoder."""
  stdout = _run_script('ablation.sh', tmp_path, '1')
  for variant in ('bn_both', 'bn_projector', 'bn_predictor', 'ln_both', 'none', 'contrastive',
                  'random init'):
    assert variant in stdout
  assert '(failed)' not in stdout


@pytest.mark.slow
@needs_cifar
def test_cifar10_recipe_learns_on_a_subset(tmp_path):
  """The cifar10 recipe (narrowed for CPU) on 5,000 real images lifts kNN above the init's."""
  folder = tmp_path / 'cifar'
  subprocess.run([sys.executable, 'experiments/cifar10_to_folder.py', '--src', CIFAR, '--out',
                  str(folder), '--train_per_class', '500', '--test_per_class', '100'],
                 cwd=REPO, check=True, capture_output=True)
  workdir = tmp_path / 'run'
  cmd = [sys.executable, '-m', 'byol_jax.main', '--config=configs/byol.py:cifar10',
         f'--config.dataset=folder:{folder}', f'--workdir={workdir}', '--config.epochs=6',
         '--config.batch_size=128', '--config.model.width=0.25', '--config.eval_every_steps=0',
         '--config.model.projector_hidden=512', '--config.model.predictor_hidden=512']
  out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=3000,
                       env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert out.returncode == 0, out.stderr[-3000:]
  with open(workdir / 'metrics' / 'eval.jsonl') as f:
    last = [json.loads(line) for line in f][-1]
  assert last['knn_top1'] > last['knn_top1_init'], last
