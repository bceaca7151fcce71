"""Tests of the reproduction scripts in experiments/ (tiny budgets on CPU)."""

import json
import os
import re
import subprocess
import sys
import tarfile

import pytest
from conftest import FAST_COMPILE, REPO
from PIL import Image

sys.path.insert(0, os.path.join(REPO, 'experiments'))
import bn_traffic  # noqa: E402
import results_table  # noqa: E402

CIFAR = os.path.join(os.environ.get('BYOL_SHARED', os.path.join(os.path.dirname(REPO), 'shared')),
                     'datasets', 'cifar10', 'cifar10_jpeg_bytes.npz')
needs_cifar = pytest.mark.skipif(not os.path.exists(CIFAR), reason='shared CIFAR-10 copy absent')


def _write(path, records):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in records)


def test_results_table_reads_metrics(tmp_path):
  """The printed table must come from eval.jsonl (kNN) and train.jsonl (throughput: the
  median since the eval before, so the slow interval after an evaluation does not count)."""
  _write(tmp_path / 'metrics' / 'train.jsonl', [
    {'step': 10, 'images_per_sec': 123.0}, {'step': 20, 'images_per_sec': 456.0},
    {'step': 25, 'images_per_sec': 7.0}, {'step': 30, 'images_per_sec': 789.0},
    {'step': 40, 'images_per_sec': 800.0}])
  _write(tmp_path / 'metrics' / 'eval.jsonl', [
    {'step': 10, 'epoch': 1.0, 'knn_top1': 0.3, 'knn_top1_init': 0.1, 'elapsed_sec': 5.0},
    {'step': 20, 'epoch': 2.0, 'knn_top1': 0.5, 'knn_top1_init': 0.1, 'elapsed_sec': 9.0},
    {'step': 40, 'epoch': 4.0, 'knn_top1': 0.6, 'knn_top1_init': 0.1, 'elapsed_sec': 19.0}])
  table = results_table.format_table(results_table.rows(str(tmp_path)))
  lines = table.splitlines()
  assert len(lines) == 5 and '0.1000' in lines[1]
  assert '456' in lines[3] and '0.5000' in lines[3] and '123' in lines[2]
  assert lines[4].split()[:5] == ['4.0', '40', '19', '789', '0.6000']
  assert results_table.main(['--workdir', str(tmp_path / 'nothing')]) == 2


def test_bn_traffic_counts_resnet18_cifar_by_hand():
  """ResNet-18 with the CIFAR stem at 32 px, counted by hand: the stem and stage 1 normalise
  5 maps of 32x32x64; stages 2-4 five each (two blocks of two, plus the projection shortcut)
  at 16x16x128, 8x8x256 and 4x4x512; the projector and predictor one 4096 vector each.
  Breaks if the trace misses BatchNorm layers (nested jaxprs) or counts other ops."""
  from configs import byol
  cfg = byol.get_config('cifar10')
  sizes = bn_traffic.bn_input_sizes(cfg.model, 32)
  want = [32 * 32 * 64] * 5 + [16 * 16 * 128] * 5 + [8 * 8 * 256] * 5 + [4 * 4 * 512] * 5
  assert sizes == want + [4096, 4096]
  cfg.batch_size, cfg.precision = 512, 'bfloat16'
  f = bn_traffic.floor(cfg, bandwidth_tbs=1.0)
  assert f['step_bytes'] == 2 * 512 * sum(sizes) * 2 * (8 + 3)
  assert abs(f['floor_ms'] - f['step_bytes'] / 1e9) < 1e-9


def test_bn_traffic_counts_the_imagenet_stem_by_hand():
  """ResNet-18 with the ImageNet stem at 64 px, traced on a CPU, where the stem's max-pool is
  networks.stem_max_pool, also a custom-gradient op: only the BatchNorm layers count. The
  stem normalises 32x32x64 once, the pool halves it, then stage 1 normalises 4 maps of
  16x16x64 and stages 2-4 five each at 8x8x128, 4x4x256 and 2x2x512; the heads one 4096
  vector each. Counting the pool too (as before) made r50's floor 134.3 GB, not 125.3."""
  from configs import byol
  cfg = byol.get_config('r18')
  sizes = bn_traffic.bn_input_sizes(cfg.model, 64)
  want = [32 * 32 * 64] + [16 * 16 * 64] * 4 + [8 * 8 * 128] * 5 + [4 * 4 * 256] * 5
  assert sizes == want + [2 * 2 * 512] * 5 + [4096, 4096]


# What the GPU host (../shared/bench/README.md) lacks and the scripts must run without.
GPU_HOST_LACKS = ('tensorflow', 'tensorflow_datasets', 'tensorboardX')


def _block_packages(folder, names=GPU_HOST_LACKS):
  """A PYTHONPATH folder in which importing each of `names` fails, as where it is absent."""
  for name in names:
    os.makedirs(folder / name, exist_ok=True)
    (folder / name / '__init__.py').write_text(
      f'raise ImportError("{name} is blocked: the GPU host has no {name}")\n')
  return str(folder)


def _run_script(name, tmp_path, *args):
  """Runs experiments/NAME with TINY=1 and without TensorFlow; returns (stdout, $OUT)."""
  out_dir = tmp_path / 'out'
  env = dict(os.environ, TINY='1', OUT=str(out_dir), RUN=str(tmp_path / 'run'),
             RUNS=str(tmp_path / 'runs'), CIFAR_NPZ=CIFAR, CIFAR_FOLDER=str(tmp_path / 'cifar'),
             XLA_FLAGS=FAST_COMPILE, JAX_PLATFORMS='cpu',
             PYTHONPATH=_block_packages(tmp_path / 'blocked'))
  out = subprocess.run(['bash', os.path.join('experiments', name), *args], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=1800)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  return out.stdout, out_dir


@pytest.mark.slow
@needs_cifar
def test_cifar10_gpu_script_runs_tiny(tmp_path):
  """The one-command GPU reproduction script runs end to end without TensorFlow (folder data
  decoded with Pillow), prints the results table and leaves its 8 small outputs in $OUT."""
  stdout, out_dir = _run_script('cifar10_gpu.sh', tmp_path, '1')
  assert 'kNN top-1' in stdout and '0 (init)' in stdout and '| epoch |' in stdout
  assert sorted(os.listdir(out_dir)) == sorted([
    'config.json', 'env.log', 'eval.jsonl', 'knn.png', 'peer.log', 'table.txt', 'train.jsonl',
    'train.log'])
  with open(out_dir / 'eval.jsonl') as f:
    evals = [json.loads(line) for line in f]
  assert [r['step'] for r in evals] == [3, 6] and all('epoch' in r for r in evals)
  with Image.open(out_dir / 'knn.png') as image:
    assert image.format == 'PNG'
  assert (tmp_path / 'run' / 'checkpoints').is_dir()  # heavy files stay out of $OUT


@pytest.mark.slow
@needs_cifar
def test_ablation_script_runs_tiny(tmp_path):
  """Every ablation variant trains and the table lists each plus the random encoder."""
  stdout, out_dir = _run_script('ablation.sh', tmp_path, '1')
  for variant in ('bn_both', 'bn_projector', 'bn_predictor', 'ln_both', 'none', 'contrastive',
                  'random init'):
    assert variant in stdout
  assert '(failed)' not in stdout
  assert len(os.listdir(out_dir)) == 7  # a log per variant and table.txt, no checkpoints


@pytest.mark.slow
@needs_cifar
def test_cifar10_sweep_script_runs_variants_side_by_side(tmp_path):
  """Two recipe variants and the PyTorch reference run at once and come back as at most 8
  files: the summary names each with its last kNN top-1 and overrides, the figure has every
  curve, runs.tgz holds each variant's metrics but no checkpoints (hundreds of MB on the
  GPU)."""
  stdout, out_dir = _run_script('cifar10_sweep.sh', tmp_path, '1', 'base:',
                                'sgd:--config=configs/byol.py:cifar10_lightly '
                                '--config.optimizer.base_lr=0.1',
                                'torch:--preset lightly --threads 1')
  assert sorted(os.listdir(out_dir)) == ['knn.png', 'runs.tgz', 'summary.txt', 'sweep.log']
  summary = (out_dir / 'summary.txt').read_text()
  assert re.search(r'^base +kNN top-1 0\.\d{4} at epoch', summary, re.M), summary
  assert re.search(r'^sgd +kNN top-1 0\.\d{4} .*cifar10_lightly', summary, re.M), summary
  with tarfile.open(out_dir / 'runs.tgz') as tar:
    names = tar.getnames()
  assert re.search(r'^torch +kNN top-1 0\.\d{4} at epoch 1\.0 .*--preset lightly', summary,
                   re.M), summary
  assert {'base/eval.jsonl', 'sgd/eval.jsonl', 'sgd/sgd.log', 'torch/eval.jsonl',
          'torch/torch.log'} <= set(names)
  assert not [n for n in names if 'checkpoints' in n]
  with open(tmp_path / 'runs' / 'sgd' / 'config.json') as f:
    config = json.load(f)  # the preset picked among the overrides, then overridden
  assert (config['preset'], config['optimizer']['base_lr']) == ('cifar10_lightly', 0.1)


@pytest.mark.parametrize('variant, message', [
  ('no_colon', "bad variant 'no_colon'"), ('bad name:', "bad variant 'bad name:'")])
def test_cifar10_sweep_rejects_bad_variants_before_any_work(tmp_path, variant, message):
  """A mistyped variant stops the sweep at once with one line (exit 2), not after minutes of
  training the other variants."""
  out = subprocess.run(['bash', 'experiments/cifar10_sweep.sh', '1', 'ok:', variant],
                       cwd=REPO, env=dict(os.environ, OUT=str(tmp_path / 'out')),
                       capture_output=True, text=True, timeout=60)
  assert out.returncode == 2 and message in out.stdout + out.stderr
  duplicate = subprocess.run(['bash', 'experiments/cifar10_sweep.sh', '1', 'a:', 'a:'],
                             cwd=REPO, env=dict(os.environ, OUT=str(tmp_path / 'out2')),
                             capture_output=True, text=True, timeout=60)
  assert duplicate.returncode == 2 and "'a' used twice" in duplicate.stdout


@pytest.mark.slow
@needs_cifar
def test_gpu_session_script_runs_tiny(tmp_path):
  """The one-call GPU session (benchmark, then CIFAR-10 for the time left) runs end to end
  without TensorFlow and bundles everything into at most 8 files, the most a device call
  brings back; a missing file here would be a result lost on the GPU."""
  stdout, out_dir = _run_script('gpu_session.sh', tmp_path)
  assert sorted(os.listdir(out_dir)) == [
    'bench.tgz', 'bench_summary.txt', 'cifar.tgz', 'cifar_knn.png', 'cifar_table.txt',
    'session.log']
  summary = (out_dir / 'bench_summary.txt').read_text()
  for tag in ('r50_bf16', 'cifar_bf16', 'r50_f32'):
    assert f'| {tag} | n/a' not in summary, summary  # each of ours measured
  assert '0 (init)' in (out_dir / 'cifar_table.txt').read_text()
  with tarfile.open(out_dir / 'cifar.tgz') as tar:
    assert 'cifar/eval.jsonl' in tar.getnames()


# The cifar10 recipe narrowed for a 2-core CPU: its optimiser, schedule shape, tau and
# augmentations, but the demo's network (ResNet-10 at half width with the ImageNet stem:
# 8x8 maps after the stem, about 4x cheaper per image than ResNet-18's CIFAR stem at a
# quarter width, which left kNN where it started after 4 epochs), 512-wide heads, batch 128
# and one warmup epoch, on the first 500 training and 200 test images of each class.
CPU_RECIPE = ('--config=configs/byol.py:cifar10', '--config.batch_size=128',
              '--config.model.depth=10', '--config.model.width=0.5',
              '--config.model.cifar_stem=False', '--config.model.projector_hidden=512',
              '--config.model.predictor_hidden=512', '--config.optimizer.warmup_epochs=1')


@pytest.mark.slow
@needs_cifar
def test_cifar10_recipe_trains_on_a_subset(tmp_path):
  """The cifar10 recipe (narrowed for CPU) learns on 5,000 real images: kNN top-1 of the
  trained encoder rises above the initial encoder's (issue 7's CPU check), and the run does
  not collapse (the BYOL loss falls, the projections keep their spread and rank).

  10 epochs (390 steps), about 5 minutes on 2 idle cores. XLA's CPU optimisations stay on
  (the tests' fast-compile flag halves the step speed of a model this size).
  """
  folder = tmp_path / 'cifar'
  subprocess.run([sys.executable, 'experiments/cifar10_to_folder.py', '--src', CIFAR, '--out',
                  str(folder), '--train_per_class', '500', '--test_per_class', '200'],
                 cwd=REPO, check=True, capture_output=True)
  workdir = tmp_path / 'run'
  cmd = [sys.executable, '-m', 'byol_jax.main', *CPU_RECIPE, f'--config.dataset=folder:{folder}',
         f'--workdir={workdir}', '--config.epochs=10', '--config.eval_every_steps=0',
         '--config.log_every_steps=1']
  xla_flags = os.environ.get('XLA_FLAGS', '').replace(FAST_COMPILE, '').strip()
  out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1200,
                       env=dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=xla_flags))
  assert out.returncode == 0, out.stderr[-3000:]
  with open(workdir / 'metrics' / 'train.jsonl') as f:
    train = [json.loads(line) for line in f]
  with open(workdir / 'metrics' / 'eval.jsonl') as f:
    last = [json.loads(line) for line in f][-1]
  summary = dict(loss=[round(r['loss'], 3) for r in train[::10]], knn=last)
  assert train[-1]['step'] == last['step'] == 390, summary
  assert train[-1]['loss'] < 0.6 * train[0]['loss'], summary  # step 1 -> step 390
  assert min(r['proj_std'] for r in train) > 0.03, summary  # healthy 0.0625, collapsed 0
  assert train[-1]['proj_rank'] > 10, summary  # of 256
  # 2,000 test images: a standard error of about 0.01 on each accuracy.
  assert last['knn_top1'] > last['knn_top1_init'] + 0.03, summary
