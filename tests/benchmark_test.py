"""Tests of the benchmark command: it times the real step, compiles once and reports figures."""

import json
import os
import subprocess
import sys
import tarfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, tiny_config
from PIL import Image

from byol_jax import benchmark

LINE_KEYS = ('preset', 'data', 'mode', 'images', 'device', 'devices', 'precision', 'batch',
             'img_s', 'step_ms', 'window_img_s', 'peak_mem_gb', 'step_gflop', 'tflops',
             'compile_s', 'compiles', 'cores_used')
TINY_FLAGS = ('--config.model.width=0.125', '--config.model.projector_hidden=32',
              '--config.model.predictor_hidden=32', '--config.model.projection_dim=16',
              '--config.image_size=16', '--config.batch_size=16',
              '--config.demo.train_examples=64')


def _fields(line):
  assert line.startswith('BENCH '), line
  return dict(item.split('=', 1) for item in line.split()[1:])


@pytest.fixture(scope='module')
def image_folder(tmp_path_factory):
  """An image folder of 2 classes x 10 small PNGs, enough for batches of 4."""
  root = tmp_path_factory.mktemp('bench_folder')
  rng = np.random.default_rng(0)
  for c in range(2):
    os.makedirs(root / 'train' / f'c{c}')
    for i in range(10):
      pixels = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
      Image.fromarray(pixels).save(root / 'train' / f'c{c}' / f'{i}.png')
  return f'folder:{root}'


def test_resident_step_benchmark_reports_figures_and_one_compile():
  """The resident step on the demo data is timed after one compile; a retrace, a missing
  figure or a broken line format fails here."""
  cfg = tiny_config()
  result = benchmark.run_benchmark(cfg, data='resident', steps=2, warmup=1, tag='t')
  assert result['images'] == 'demo' and result['batch'] == 16
  assert result['compiles'] == 1 and result['compiles_while_timing'] == 0
  assert benchmark.compiled_once(result)
  assert result['img_s'] > 0 and result['window_img_s'] > 0 and result['step_ms'] > 0
  assert result['img_s'] == pytest.approx(16 / (result['step_ms'] / 1e3))
  assert result['step_gflop'] > 0 and result['tflops'] > 0 and result['compile_s'] > 0
  assert result['cores_used'] > 0
  assert np.isfinite(result['loss'])
  fields = _fields(benchmark.format_line(result))
  assert set(LINE_KEYS) <= set(fields) and fields['tag'] == 't'
  assert fields['device'] == 'cpu' and fields['peak_mem_gb'] == 'n/a'  # CPU reports none


def test_input_mode_times_device_augmentation_alone():
  """--mode=input times the on-device sample + augment (resident) and view ops (crops) as
  one jitted function each, with FLOPs and no training loss."""
  cfg = tiny_config()
  for data, images in (('synthetic', 'random'), ('crops', 'random')):
    result = benchmark.run_benchmark(cfg, data=data, mode='input', steps=2, warmup=1)
    assert result['images'] == images and result['mode'] == 'input'
    assert benchmark.compiled_once(result) and result['compiles'] == 1
    assert result['step_gflop'] > 0 and result['img_s'] > 0 and result['loss'] is None


def test_stream_input_mode_reads_the_host_pipeline(image_folder):
  """--mode=input --data=stream times tf.data batches moved to the device (no jit at all)."""
  pytest.importorskip('tensorflow')
  cfg = tiny_config(dataset=image_folder, batch_size=4)
  result = benchmark.run_benchmark(cfg, data='stream', mode='input', steps=2, warmup=1)
  assert result['images'] == image_folder and result['img_s'] > 0
  assert result['compiles'] is None and result['step_gflop'] is None
  assert 'step_gflop=n/a' in benchmark.format_line(result)


def test_impossible_requests_are_refused_before_compiling(image_folder):
  """Views have no input work, demo data cannot stream and bad counts are refused with a
  BenchmarkError (a one-line CLI error), not a traceback after compiling."""
  cfg = tiny_config()
  for kwargs in (dict(data='views', mode='input'), dict(data='stream'), dict(steps=0),
                 dict(data='nope')):
    with pytest.raises(benchmark.BenchmarkError):
      benchmark.run_benchmark(cfg, **kwargs)
  with pytest.raises(benchmark.BenchmarkError, match='batch_size'):
    benchmark.run_benchmark(tiny_config(batch_size=0))
  with pytest.raises(benchmark.BenchmarkError, match='num_images=3 must be 0'):
    benchmark.run_benchmark(cfg, data='synthetic', num_images=3)  # fewer images than a batch


def test_flops_read_from_dict_or_list_cost_analysis():
  """Cost analysis comes as a dict (new JAX) or a list of dicts (old JAX); the lowered
  module is counted first and the compiled one is the fallback."""

  class Fake:
    def __init__(self, analysis):
      self.analysis = analysis

    def cost_analysis(self):
      if isinstance(self.analysis, Exception):
        raise self.analysis
      return self.analysis

  # The lowered count comes first: on GPU the compiled one misses cuDNN/cuBLAS calls
  # (388 GFLOP instead of 16,372 for a ResNet-50 step on an H200).
  assert benchmark._flops(Fake({'flops': 388.0}), Fake({'flops': 16372.0})) == 16372.0
  assert benchmark._flops(Fake({'flops': 5.0}), Fake(None)) == 5.0
  assert benchmark._flops(Fake([{'flops': 7.0}]), Fake(None)) == 7.0
  assert benchmark._flops(Fake(NotImplementedError()), Fake([{'flops': 3.0}])) == 3.0
  assert benchmark._flops(Fake({}), Fake([])) is None


def test_flops_of_lowered_program_when_backend_refuses_to_analyse_it():
  """The CUDA plugin (PJRT C API) raises on Lowered.cost_analysis; the lowered module must
  then be counted by the CPU backend (here: 2*64*128*32 matmul FLOPs plus the tanh), not
  by the compiled program, which on GPU misses every cuDNN/cuBLAS call (the H200 run of
  2026-11-26 printed 388 GFLOP for a 16,372 GFLOP ResNet-50 step this way)."""
  lowered = jax.jit(lambda a, b: jnp.tanh(a @ b)).lower(jnp.ones((64, 128)), jnp.ones((128, 32)))
  want = lowered.cost_analysis()['flops']
  assert want >= 2 * 64 * 128 * 32

  class RefusingLowered:
    _lowering = lowered._lowering

    def cost_analysis(self):
      raise NotImplementedError('Lowered.cost_analysis not implemented on platform cuda')

  class Compiled:
    def cost_analysis(self):
      return {'flops': 1.0}

  assert benchmark._flops(Compiled(), RefusingLowered()) == want


def test_compiled_once_flags_recompiles():
  """A second executable or a compile while timing must fail the run (exit status 3)."""
  assert benchmark.compiled_once(dict(compiles=1, compiles_while_timing=0))
  assert benchmark.compiled_once(dict(compiles=None, compiles_while_timing=0))  # host only
  assert not benchmark.compiled_once(dict(compiles=2, compiles_while_timing=0))
  assert not benchmark.compiled_once(dict(compiles=1, compiles_while_timing=1))


@pytest.mark.slow
def test_cli_prints_one_line_and_appends_json(tmp_path):
  """`python -m byol_jax.benchmark` with config overrides prints one BENCH line for the views
  step and appends the same figures as a JSON line to --output; what it is doing is said
  first, where it was silent for the whole compile."""
  output = tmp_path / 'out' / 'bench.jsonl'
  cmd = [sys.executable, '-m', 'byol_jax.benchmark', '--config=configs/byol.py:demo',
         *TINY_FLAGS, '--data=views', '--steps=2', '--warmup=1', '--tag=cli',
         f'--output={output}']
  out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  lines = [line for line in out.stdout.splitlines() if line.startswith('BENCH')]
  assert len(lines) == 1
  # Said at once on stderr (the compile is silent otherwise, seconds to minutes).
  assert ('benchmark: building and compiling the step (views data, batch 16), then 1 warm-up '
          'and 2 x 2 timed calls') in out.stderr, out.stderr[-2000:]
  fields = _fields(lines[0])
  assert fields['data'] == 'views' and fields['images'] == 'views'
  assert fields['compiles'] == '1' and fields['batch'] == '16'
  (record,) = [json.loads(line) for line in output.read_text().splitlines()]
  assert record['tag'] == 'cli' and record['img_s'] > 0 and record['steps'] == 2


def test_cli_error_is_one_line():
  """A request that cannot run exits with status 2 and one 'error:' line, no traceback."""
  cmd = [sys.executable, '-m', 'byol_jax.benchmark', '--config=configs/byol.py:demo',
         '--data=views', '--mode=input']
  out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 2
  assert 'error: --data=views has no input work' in out.stderr
  assert 'Traceback' not in out.stderr


@pytest.mark.slow
def test_stream_step_trains_from_an_image_folder(image_folder):
  """--data=stream feeds the streaming step from tf.data; it compiles once and trains."""
  pytest.importorskip('tensorflow')
  cfg = tiny_config(dataset=image_folder, batch_size=4)
  result = benchmark.run_benchmark(cfg, data='stream', steps=2, warmup=1)
  assert benchmark.compiled_once(result) and np.isfinite(result['loss'])


@pytest.mark.slow
def test_gpu_benchmark_script_dry_run(tmp_path):
  """experiments/gpu_benchmark.sh --dry-run runs its seven runs of ours on CPU with tiny
  models and writes results.jsonl, the summary table and the two step profiles in one
  profiles.tgz (peer skipped without a GPU)."""
  env = dict(os.environ, OUT=str(tmp_path / 'bench'), PYTHON=sys.executable,
             JAX_PLATFORMS='cpu')
  out = subprocess.run(['bash', os.path.join(REPO, 'experiments', 'gpu_benchmark.sh'),
                        '--dry-run'], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=900)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  records = [json.loads(line) for line in (tmp_path / 'bench' / 'results.jsonl').open()]
  tags = ['r50_bf16', 'cifar_bf16', 'cifar_bf16_fused', 'r50_bf16_fused', 'r50_f32',
          'r50_views_bf16', 'r50_aug_bf16']
  assert [r['tag'] for r in records] == tags
  assert [r['precision'] for r in records] == ['bfloat16'] * 4 + ['float32'] + ['bfloat16'] * 2
  assert [r['fuse_views'] for r in records] == [False, False, True, True, False, False, False]
  assert [(r['data'], r['mode']) for r in records][5:] == [('views', 'step'),
                                                           ('synthetic', 'input')]
  summary = (tmp_path / 'bench' / 'summary.txt').read_text()
  for tag in tags:
    assert f'| {tag} |' in summary
  assert 'by source file' in out.stdout  # the profile summaries were printed
  with tarfile.open(tmp_path / 'bench' / 'profiles.tgz') as tar:
    names = tar.getnames()
  for run in ('prof_r50_bf16', 'prof_cifar_bf16'):
    assert f'{run}/hlo.txt' in names
    assert any(n.startswith(run) and n.endswith('perfetto_trace.json.gz') for n in names)
  assert not any(n.endswith('.xplane.pb') for n in names)
