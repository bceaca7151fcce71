r"""Throughput of the real BYOL training step, or of its input alone, in one printed line.

Why: speed claims are only worth something when measured on the step that trains (device
augmentation included), with compilation excluded, proper synchronisation and the same
numbers every time, so this entry point builds the step exactly as `train` does and times it.

  python -m byol_jax.benchmark --config=configs/byol.py:r50 --config.batch_size=256 \
      --config.precision=bfloat16 --data=synthetic --steps=20 --warmup=5

`--data` picks the step and what feeds it:
  resident   make_resident_step: a uint8 dataset kept on the devices, sampled and augmented
             there (crop, flip, colour, blur, solarise). The demo preset uses its generated
             data; every other dataset is replaced by random images of the preset's size
             (image content does not change the step's cost).
  synthetic  the same step on random images whatever the dataset.
  crops      make_stream_step on random uint8 crop pairs already on the devices: the device
             half of the streaming path (flip, colour, blur, solarise; crops come from the host).
  views      make_views_step on ready-made float views: the network update alone.
  stream     make_stream_step fed by the tf.data stream of the dataset (folder or TFDS).
`--mode=input` times what feeds the step instead: the on-device sample and augmentation
(resident, synthetic), the device view ops (crops), or host batches moved to the devices
(stream).

Output: one line starting with BENCH (key=value fields, 'n/a' where a figure is not
available); `--output=FILE` also appends the result as a JSON line. img_s and step_ms come
from the median of steps timed one by one (each blocked until its outputs are ready);
window_img_s from the same number of steps dispatched back to back and synchronised once.
step_gflop is XLA's cost analysis of the lowered step (before optimisation: on GPU the
compiled program's cuDNN/cuBLAS calls count as nothing), summed over devices, and tflops
divides it by the median step time. cores_used is this process's CPU time over the window's
wall time: how much of a shared CPU the figures had. The step must compile exactly once:
`compiles` is the size of its jit cache after the run, and the command exits with status 3
if it is not 1 or if anything compiled while timing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from byol_jax import cli, datasets, train_step

DATA_KINDS = ('resident', 'synthetic', 'crops', 'views', 'stream')
MODES = ('step', 'input')
# Learning-rate and EMA schedules need a length; it does not change the step's cost.
_SCHEDULE_STEPS, _STEPS_PER_EPOCH = 10_000, 100
_MIN_RESIDENT_IMAGES = 4096
_COMPILE_EVENT = '/jax/core/compile/backend_compile_duration'
# Label counts of datasets whose metadata cannot be read without TFDS (probe head size only).
_KNOWN_CLASSES = {'imagenet2012': 1000, 'cifar10': 10, 'cifar100': 100, 'stl10': 10}
_FIELDS = ('tag', 'preset', 'data', 'mode', 'images', 'device', 'devices', 'precision',
           'batch', 'image_size', 'img_s', 'step_ms', 'window_img_s', 'peak_mem_gb',
           'step_gflop', 'tflops', 'compile_s', 'compiles', 'cores_used', 'loss')


class BenchmarkError(ValueError):
  """A benchmark request that cannot run; the command line prints it as one line."""


@dataclasses.dataclass
class Timed:
  """What to time: `call(carry) -> carry` repeated; `fn` is the jitted function it runs."""
  call: Callable[[Any], Any]
  carry: Any
  fn: Any | None  # jitted; None for host-only work (a tf.data stream)
  example_args: tuple  # fn's arguments for lowering
  images: str  # what the images are: demo, random, views or the dataset's name


# ------------------------------------------------------------------------------------------
# Inputs.
# ------------------------------------------------------------------------------------------


def _num_classes(cfg: Any) -> int:
  """The probe head's size for the config's dataset, without reading the dataset if known."""
  spec = datasets.parse_dataset(cfg.dataset)
  if spec.kind == 'demo':
    from byol_jax import demo_data
    return demo_data.NUM_CLASSES
  name = datasets.tfds_base_name(spec.name)
  if name in _KNOWN_CLASSES:
    return _KNOWN_CLASSES[name]
  from byol_jax import data as data_lib
  try:
    return data_lib.num_classes_of(cfg)
  except (datasets.DataError, ImportError):
    return 1000


def _random_arrays(mesh: Mesh, seed: int, shape: tuple[int, ...], dtype: Any,
                   num_classes: int) -> tuple[jax.Array, jax.Array]:
  """Random data and labels made on the devices, split on the leading axis (no host copy)."""
  sharding = NamedSharding(mesh, P(train_step.AXIS))

  @functools.partial(jax.jit, out_shardings=(sharding, sharding))
  def make(key):
    k_data, k_labels = jax.random.split(key)
    if dtype == jnp.uint8:
      values = jax.random.bits(k_data, shape, jnp.uint8)
    else:
      values = jax.random.normal(k_data, shape, dtype)
    return values, jax.random.randint(k_labels, shape[:1], 0, num_classes, jnp.int32)

  return make(jax.random.PRNGKey(seed))


def _resident_images(cfg: Any, data: str, mesh: Mesh, num_images: int,
                     num_classes: int) -> tuple[jax.Array, jax.Array, str]:
  """The demo's data for `resident` on the demo preset, else random uint8 images."""
  if data == 'resident' and datasets.parse_dataset(cfg.dataset).kind == 'demo':
    from byol_jax import data as data_lib
    split = data_lib.load_split(cfg, 'train')
    n = len(split.labels) - len(split.labels) % mesh.size
    if n < cfg.batch_size // mesh.size:
      raise BenchmarkError(f'{n} demo images are fewer than one batch of {cfg.batch_size}')
    images, labels = train_step.shard_batch((split.images[:n], split.labels[:n]), mesh)
    return images, labels, 'demo'
  n = num_images or max(4 * cfg.batch_size, _MIN_RESIDENT_IMAGES)
  n -= n % mesh.size
  shape = (n, cfg.image_size, cfg.image_size, 3)
  images, labels = _random_arrays(mesh, cfg.seed, shape, jnp.uint8, num_classes)
  return images, labels, 'random'


def _open_stream(cfg: Any) -> Iterator[dict[str, Any]]:
  """The tf.data training stream of the config's dataset, as `train` would open it."""
  from byol_jax import input_pipeline  # TensorFlow only on this path
  return input_pipeline.train_stream(
    datasets.parse_dataset(cfg.dataset),
    batch_size_per_process=cfg.batch_size // jax.process_count(), image_size=cfg.image_size,
    aug_cfg=cfg.augment, data_dir=cfg.data_dir or None,
    seed=cfg.seed, process_index=jax.process_index(), process_count=jax.process_count(),
    strict=cfg.strict_data)


def _next_on_device(stream: Iterator[dict[str, Any]], mesh: Mesh) -> tuple[jax.Array, ...]:
  batch = next(stream)
  return train_step.shard_batch((batch['views'], batch['labels']), mesh)


# ------------------------------------------------------------------------------------------
# What is timed.
# ------------------------------------------------------------------------------------------


def _make_state(cfg: Any, fns: train_step.StepFns, mesh: Mesh) -> train_step.TrainState:
  """A fresh replicated state, initialised on the devices as `train` does."""
  shape = (cfg.image_size, cfg.image_size, 3)
  init = jax.jit(lambda rng: train_step.init_state(fns, rng, shape),
                 out_shardings=NamedSharding(mesh, P()))
  return init(jax.random.PRNGKey(cfg.seed))


def _step_timed(cfg: Any, data: str, mesh: Mesh, num_images: int) -> Timed:
  """The training step fed as `--data` says; the carry is (state, metrics)."""
  num_classes = _num_classes(cfg)
  fns = train_step.make_step_fns(cfg, num_classes, _SCHEDULE_STEPS, _STEPS_PER_EPOCH)
  state = _make_state(cfg, fns, mesh)
  batch = cfg.batch_size
  if data in ('resident', 'synthetic'):
    images, labels, kind = _resident_images(cfg, data, mesh, num_images, num_classes)
    step = train_step.make_resident_step(fns, mesh, cfg.augment, batch, cfg.image_size)
    inputs = (images, labels)
  elif data == 'crops':
    shape = (batch, 2, cfg.image_size, cfg.image_size, 3)
    inputs, kind = _random_arrays(mesh, cfg.seed, shape, jnp.uint8, num_classes), 'random'
    step = train_step.make_stream_step(fns, mesh, cfg.augment)
  elif data == 'views':
    shape = (batch, cfg.image_size, cfg.image_size, 3)
    view1, labels = _random_arrays(mesh, cfg.seed, shape, jnp.float32, num_classes)
    view2, _ = _random_arrays(mesh, cfg.seed + 1, shape, jnp.float32, num_classes)
    inputs = (view1, view2, labels)
    step, kind = train_step.make_views_step(fns, mesh), 'views'
  else:
    stream = _open_stream(cfg)
    step, kind = train_step.make_stream_step(fns, mesh, cfg.augment), cfg.dataset
    first = _next_on_device(stream, mesh)
    return Timed(lambda c: step(c[0], *_next_on_device(stream, mesh)), (state, None), step,
                 (state, *first), kind)
  return Timed(lambda c: step(c[0], *inputs), (state, None), step, (state, *inputs), kind)


def _seed_state(cfg: Any, mesh: Mesh) -> train_step.TrainState:
  """A state holding only what the sampler and the augmentation keys read (step, rng)."""
  state = train_step.TrainState(jnp.zeros((), jnp.int32), jax.random.PRNGKey(cfg.seed),
                                {}, {}, {}, {}, ())
  return train_step.replicate(state, mesh)


def _views_fn(cfg: Any, mesh: Mesh, resident: bool) -> Callable:
  """The input half of the resident (or crops) step alone, jitted like the step."""
  batch_local = cfg.batch_size // mesh.size

  def per_device(state, images, labels):
    # The input halves of train_step.make_resident_step / make_stream_step.
    if resident:
      view1, view2, labels = train_step.resident_views(state, images, labels, cfg.augment,
                                                       batch_local, cfg.image_size)
    else:
      view1, view2 = train_step.stream_views(state, images, cfg.augment)
    return state._replace(step=state.step + 1), view1, view2, labels

  axis = P(train_step.AXIS)
  mapped = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), axis, axis),
                         out_specs=(P(), axis, axis, axis), check_vma=False)
  return jax.jit(mapped, donate_argnums=0)


def _input_timed(cfg: Any, data: str, mesh: Mesh, num_images: int) -> Timed:
  """What feeds the step, alone; the carry's first element is the sampler's state."""
  if data == 'stream':
    stream = _open_stream(cfg)
    return Timed(lambda c: (None, _next_on_device(stream, mesh)), None, None, (), cfg.dataset)
  num_classes = _num_classes(cfg)
  if data == 'crops':
    shape = (cfg.batch_size, 2, cfg.image_size, cfg.image_size, 3)
    images, labels = _random_arrays(mesh, cfg.seed, shape, jnp.uint8, num_classes)
    kind = 'random'
  else:
    images, labels, kind = _resident_images(cfg, data, mesh, num_images, num_classes)
  fn = _views_fn(cfg, mesh, resident=data != 'crops')
  state = _seed_state(cfg, mesh)
  return Timed(lambda c: fn(c[0], images, labels), (state, None), fn,
               (state, images, labels), kind)


# ------------------------------------------------------------------------------------------
# Timing.
# ------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _count_compiles() -> Iterator[list[float]]:
  """Collects the durations of XLA compilations that happen inside the block."""
  seen: list[float] = []

  def listener(event: str, duration: float, **kwargs: Any) -> None:
    if event == _COMPILE_EVENT:
      seen.append(duration)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield seen
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


def _flops(compiled: Any, lowered: Any) -> float | None:
  """FLOPs per device of one call, from XLA's cost analysis (dict or list of dicts).

  The lowered (pre-optimisation) program is counted first: on GPU the compiled program's
  convolutions and matmuls are library calls (cuDNN, cuBLAS) that the analysis counts as
  nothing, which reported 388 GFLOP for a ResNet-50 step of 16,372 on an H200. Backends
  behind PJRT's C API (the CUDA plugin) refuse to analyse a lowered program, so the lowered
  module then goes to the CPU backend's analysis, which counts the same HLO. The compiled
  count is the last resort.
  """
  for source in (lowered, _CpuAnalysis(lowered), compiled):
    try:
      analysis = source.cost_analysis()
    except (AttributeError, NotImplementedError, RuntimeError, ValueError, TypeError):
      continue
    if isinstance(analysis, (list, tuple)):
      analysis = analysis[0] if analysis else None
    flops = float((analysis or {}).get('flops', 0.0))
    if flops > 0:
      return flops
  return None


class _CpuAnalysis:
  """XLA's cost analysis of a lowered program's HLO run by the CPU backend.

  Uses JAX internals (there is no public API for it), hence every failure falls through.
  """

  def __init__(self, lowered: Any):
    self.lowered = lowered

  def cost_analysis(self) -> Any:
    from jax._src import xla_bridge
    from jax._src.lib import _jax
    module = self.lowered._lowering.hlo().as_hlo_module()
    return _jax.hlo_module_cost_analysis(xla_bridge.get_backend('cpu'), module)


def _compile(timed: Timed) -> tuple[float | None, float | None, Any]:
  """Compiles the jitted function ahead of timing; seconds, FLOPs per device, executable."""
  if timed.fn is None:
    return None, None, None
  start = time.perf_counter()
  lowered = timed.fn.lower(*timed.example_args)
  compiled = lowered.compile()  # fills the cache the calls below use
  return time.perf_counter() - start, _flops(compiled, lowered), compiled


def _peak_memory_bytes(mesh: Mesh) -> int | None:
  """Largest peak_bytes_in_use over the mesh's devices; None where not reported (CPU)."""
  peaks = []
  for device in mesh.devices.flat:
    stats = device.memory_stats() or {}
    if 'peak_bytes_in_use' in stats:
      peaks.append(int(stats['peak_bytes_in_use']))
  return max(peaks) if peaks else None


def time_calls(timed: Timed, warmup: int, steps: int) -> dict[str, Any]:
  """Median of `steps` calls blocked one by one, then `steps` calls synchronised once."""
  compile_s, flops, compiled = _compile(timed)
  carry = timed.carry
  with _count_compiles() as compiles:
    for _ in range(warmup):
      carry = timed.call(carry)
    carry = jax.block_until_ready(carry)
    per_call = []
    for _ in range(steps):
      start = time.perf_counter()
      carry = jax.block_until_ready(timed.call(carry))
      per_call.append(time.perf_counter() - start)
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(steps):
      carry = timed.call(carry)
    carry = jax.block_until_ready(carry)
    window = time.perf_counter() - start
    cores = (time.process_time() - cpu_start) / window
  cache = getattr(timed.fn, '_cache_size', None)
  return dict(median_s=statistics.median(per_call), window_s=window, cores_used=cores,
              compile_s=compile_s,
              flops_per_device=flops, compiles=cache() if cache else None,
              compiles_while_timing=len(compiles), carry=carry, compiled=compiled)


def profile_calls(timed: Timed, carry: Any, compiled: Any, profile_dir: str,
                  steps: int) -> None:
  """Traces `steps` further calls into profile_dir (jax.profiler, with the plain-JSON
  perfetto trace) beside the compiled program's HLO text, for `byol_jax.profile_summary`."""
  from byol_jax import profile_summary
  os.makedirs(profile_dir, exist_ok=True)
  if compiled is not None:
    with open(os.path.join(profile_dir, profile_summary.HLO_NAME), 'w') as f:
      f.write(compiled.as_text())
  with open(os.path.join(profile_dir, profile_summary.STEPS_NAME), 'w') as f:
    f.write(str(steps))
  carry = jax.block_until_ready(carry)
  with jax.profiler.trace(profile_dir, create_perfetto_trace=True):
    for _ in range(steps):
      carry = timed.call(carry)
    jax.block_until_ready(carry)


def _loss(carry: Any) -> float | None:
  """The last step's BYOL loss, where the carry holds step metrics."""
  if isinstance(carry, tuple) and len(carry) == 2 and isinstance(carry[1], dict):
    return float(carry[1]['loss'])
  return None


def _check_request(cfg: Any, data: str, mode: str, steps: int, warmup: int,
                   num_images: int = 0) -> None:
  """Refuses what cannot run before anything is built or compiled."""
  if data not in DATA_KINDS or mode not in MODES:
    raise BenchmarkError(f'data={data!r}, mode={mode!r}; valid: {DATA_KINDS}, {MODES}')
  if steps < 1 or warmup < 0:
    raise BenchmarkError(f'steps={steps} must be >= 1 and warmup={warmup} >= 0')
  if num_images and not num_images >= cfg.batch_size:
    raise BenchmarkError(f'num_images={num_images} must be 0 (automatic) or at least one '
                         f'batch ({cfg.batch_size})')
  if data == 'views' and mode == 'input':
    raise BenchmarkError('--data=views has no input work to time; use another --data')
  if data == 'stream' and datasets.parse_dataset(cfg.dataset).kind not in ('folder', 'tfds'):
    raise BenchmarkError(f'--data=stream needs a folder or TFDS dataset, not {cfg.dataset!r}')


def _mesh_for(cfg: Any) -> Mesh:
  """The training mesh, after the config's determinism setting and checks, as `train` does."""
  from byol_jax import train
  try:
    train.configure_determinism(cfg)  # before the backends start
    mesh = train_step.make_mesh()
    train.validate(cfg, mesh.size)
  except train.ConfigError as e:
    raise BenchmarkError(str(e)) from None
  return mesh


def run_benchmark(cfg: Any, *, data: str = 'resident', mode: str = 'step', steps: int = 20,
                  warmup: int = 5, num_images: int = 0, tag: str = '',
                  profile_dir: str | None = None, profile_steps: int = 5) -> dict[str, Any]:
  """Times the configured step (or its input) and returns the figures of the BENCH line;
  with profile_dir, then traces profile_steps more calls (after the timing, so the figures
  never include the profiler's overhead)."""
  _check_request(cfg, data, mode, steps, warmup, num_images)
  if profile_dir and (profile_steps < 1 or data == 'stream'):
    raise BenchmarkError(f'--profile_dir needs --profile_steps >= 1 (got {profile_steps}) and '
                         'a device-side --data (not stream)')
  mesh = _mesh_for(cfg)
  build = _step_timed if mode == 'step' else _input_timed
  timed = build(cfg, data, mesh, num_images)
  timing = time_calls(timed, warmup, steps)
  if profile_dir:
    profile_calls(timed, timing['carry'], timing['compiled'], profile_dir, profile_steps)
  median_s, flops = timing['median_s'], timing['flops_per_device']
  step_flops = flops * mesh.size if flops else None
  peak = _peak_memory_bytes(mesh)
  return dict(
    tag=tag, preset=cfg.preset, data=data, mode=mode, images=timed.images,
    device=jax.devices()[0].device_kind, devices=mesh.size, precision=cfg.precision,
    batch=cfg.batch_size, image_size=cfg.image_size, steps=steps, warmup=warmup,
    img_s=cfg.batch_size / median_s, step_ms=median_s * 1e3,
    window_img_s=cfg.batch_size * steps / timing['window_s'],
    peak_mem_gb=peak / 1e9 if peak is not None else None,
    step_gflop=step_flops / 1e9 if step_flops else None,
    tflops=step_flops / median_s / 1e12 if step_flops else None,
    compile_s=timing['compile_s'], compiles=timing['compiles'], cores_used=timing['cores_used'],
    compiles_while_timing=timing['compiles_while_timing'], loss=_loss(timing['carry']),
    depth=cfg.model.depth, width=cfg.model.width,
    fuse_views=bool(cfg.get('fuse_views', False)), jax=jax.__version__,
    backend=jax.default_backend(), time=time.strftime('%Y-%m-%dT%H:%M:%S'))


def compiled_once(result: dict[str, Any]) -> bool:
  """True unless the timed function compiled more than once or while it was being timed."""
  return result['compiles'] in (None, 1) and result['compiles_while_timing'] == 0


def _fmt(value: Any) -> str:
  if value is None or value == '':
    return 'n/a'
  if isinstance(value, float):
    return f'{value:.0f}' if abs(value) >= 1000 else f'{value:.4g}'
  return str(value).replace(' ', '_')


def format_line(result: dict[str, Any]) -> str:
  """The one printed line: BENCH then key=value fields, 'n/a' where a figure is missing."""
  fields = [f'{k}={_fmt(result.get(k))}' for k in _FIELDS if k != 'tag' or result.get(k)]
  return 'BENCH ' + ' '.join(fields)


def append_json(path: str, result: dict[str, Any]) -> None:
  """Appends the result as one JSON line (creating the folder if needed)."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  with open(path, 'a') as f:
    f.write(json.dumps(result, sort_keys=True) + '\n')


# ------------------------------------------------------------------------------------------
# Command line.
# ------------------------------------------------------------------------------------------


def _run(argv: list[str], flag_values: Any) -> int:
  if len(argv) > 1:
    print(f'error: unexpected arguments {argv[1:]}', file=sys.stderr)
    return 2
  cfg = flag_values.config
  # Said first: building and compiling the step takes from seconds to minutes, silently.
  print(f'benchmark: building and compiling the {flag_values.mode} ({flag_values.data} data, '
        f'batch {cfg.batch_size}), then {flag_values.warmup} warm-up and 2 x '
        f'{flag_values.steps} timed calls', file=sys.stderr, flush=True)
  try:
    result = run_benchmark(cfg, data=flag_values.data, mode=flag_values.mode,
                           steps=flag_values.steps, warmup=flag_values.warmup,
                           num_images=flag_values.num_images, tag=flag_values.tag,
                           profile_dir=flag_values.profile_dir,
                           profile_steps=flag_values.profile_steps)
  except (BenchmarkError, datasets.DataError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(format_line(result), flush=True)
  if flag_values.output:
    append_json(flag_values.output, result)
  if flag_values.profile_dir:
    from byol_jax import profile_summary
    print(f'profile of {flag_values.profile_steps} steps in {flag_values.profile_dir}:')
    profile_summary.main([flag_values.profile_dir, '--top=10'])
  if not compiled_once(result):
    print(f'error: the timed function compiled {result["compiles"]} times '
          f'({result["compiles_while_timing"]} while timing); expected once', file=sys.stderr)
    return 3
  return 0


def main() -> None:
  """`python -m byol_jax.benchmark`: flags are defined here, so importing defines none."""
  from absl import app, flags
  cli.define_config_flag(os.path.join(cli.REPO, 'configs', 'byol.py') + ':demo',
                         'Config file and preset, e.g. configs/byol.py:r50; any field '
                         'overridden as --config.FIELD=VALUE.')
  flags.declare_key_flag('config')  # defined inside ml_collections: list it in --help too
  flags.DEFINE_enum('data', 'resident', DATA_KINDS, 'What feeds the step (module docstring).')
  flags.DEFINE_enum('mode', 'step', MODES, 'step: the training step; input: its input alone.')
  flags.DEFINE_integer('steps', 20, 'Timed steps (twice: blocked one by one, then a window).')
  flags.DEFINE_integer('warmup', 5, 'Untimed steps after compiling.')
  flags.DEFINE_integer('num_images', 0, 'Resident random images; 0: max(4 * batch, 4096).')
  flags.DEFINE_string('output', None, 'Append the result to this JSON-lines file.')
  flags.DEFINE_string('tag', '', 'A name for this run, printed and saved with it.')
  flags.DEFINE_string('profile_dir', None, 'After timing, trace --profile_steps more calls '
                      'here; summarise with python -m byol_jax.profile_summary DIR.')
  flags.DEFINE_integer('profile_steps', 5, 'Calls traced with --profile_dir.')
  cli.quiet_startup_logs()
  app.run(lambda argv: sys.exit(_run(argv, flags.FLAGS)), flags_parser=cli.parse_flags)


if __name__ == '__main__':
  main()
