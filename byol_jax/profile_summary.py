"""Where a profiled step spends its device time: by source file, by kind of op, top ops.

  python -m byol_jax.benchmark --config=configs/byol.py:r50 ... --profile_dir=DIR
  python -m byol_jax.profile_summary DIR [--top=15]

Why: a throughput target that is missed needs the next step to be obvious, and the GPU hosts
have no TensorBoard profile plugin. The benchmark's `--profile_dir` writes a jax.profiler
trace (`perfetto_trace.json.gz`, plain JSON) of a few steps and the compiled program's HLO
text (`hlo.txt`); this reads only those two, with the standard library.

Each device event that names its HLO instruction (`args.hlo_op`) is charged to:
- the first frame of its instruction's stack trace inside this package (augment.py: the
  views; networks.py: the encoder and heads; losses.py, optim.py, train_step.py: the rest),
  or 'other' where the HLO text has no such frame;
- the instruction's kind: its opcode, the custom-call target (cuDNN convolutions, cuBLAS
  matmuls) or the fusion kind.
On GPU the events are the kernels on the device's streams; on CPU, where there is no device
track, the host events that carry `hlo_op` (the thunks) stand in for them.

XLA on GPU replays runs of thunks as CUDA graphs: every kernel of such a run names the same
`command_buffer_N` as its `hlo_op`, which the HLO text does not have (on one H200 in
2026-11, 58% of a ResNet-50 step). Those kernels are resolved by their own name instead: a
fusion kernel is named after its instruction (`input_reduce_fusion_12` is
`input_reduce_fusion.12`); a library kernel (cuDNN convolutions, cuBLAS matmuls) gets a kind
from its name and the source that holds most of its command buffer's resolved time.

The memory traffic section divides each fusion's bytes at its boundary (its result and
operand shapes in the HLO text) by its device time. Fusions are XLA's memory-bound passes
(BatchNorm, ReLU, casts), so their achieved bandwidth against the device's peak says how
much of their time is left to win. The count is exact for element-wise passes and an upper
bound for a fusion that reads only a slice of an operand; library calls are not counted.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

PACKAGE = 'byol_jax'
TRACE_NAME = 'perfetto_trace.json.gz'
HLO_NAME = 'hlo.txt'
STEPS_NAME = 'profile_steps.txt'

# One HLO instruction: name, result shape, opcode, and the rest (operands, attributes).
_INSTRUCTION = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*([^=]*?)\s([a-z][\w\-]*)\((.*)$')
_FRAME_ID = re.compile(r'stack_frame_id=(\d+)')
_SOURCE_FILE = re.compile(r'source_file="([^"]+)"')
_TARGET = re.compile(r'custom_call_target="([^"]+)"')
_FUSION_KIND = re.compile(r'"kind":"([^"]+)"')
_FUSION_KIND_ATTR = re.compile(r'\bkind=(k\w+)')
_ARRAY = re.compile(r'\b([a-z]+\d*(?:e\d+m\d+\w*)?)\[([\d,]*)\]')
_OPERAND = re.compile(r'%([\w.\-]+)')
_BITS = re.compile(r'(\d+)')


class ProfileError(ValueError):
  """A profile folder that cannot be summarised; printed as one line."""


def _table(text: str, section: str) -> dict[int, dict[str, str]]:
  """One of the HLO text's id tables (FileNames, FileLocations, StackFrames...)."""
  out: dict[int, dict[str, str]] = {}
  match = re.search(rf'^{section}\n((?:\d+ .*\n)+)', text, re.M)
  for line in (match.group(1).splitlines() if match else []):
    key, _, rest = line.partition(' ')
    fields = dict(re.findall(r'(\w+)=("[^"]*"|\S+?)(?=[ }])', rest))
    out[int(key)] = fields if fields else {'value': rest.strip().strip('"')}
  return out


def _frame_files(text: str) -> dict[int, list[str]]:
  """stack_frame_id -> source files from the innermost frame outwards.

  In the printed table a frame's caller is the frame numbered parent_frame_id - 1 (1 and 0:
  none), read off JAX 0.10's output: that walk gives the Python call chains (e.g.
  _sample_indices <- resident_views <- the step). JAX keeps only user frames, so the frame
  itself is usually already in this package; the walk matters for the rest.
  """
  names = {k: v['value'] for k, v in _table(text, 'FileNames').items()}
  locations = {k: names.get(int(v.get('file_name_id', 0)), '')
               for k, v in _table(text, 'FileLocations').items()}
  frames = _table(text, 'StackFrames')
  out = {}
  for frame_id in frames:
    files, seen, current = [], set(), frame_id
    while current in frames and current not in seen:
      seen.add(current)
      files.append(locations.get(int(frames[current].get('file_location_id', 0)), ''))
      current = int(frames[current].get('parent_frame_id', 0)) - 1
    out[frame_id] = files
  return out


def _package_file(files: Iterable[str]) -> str:
  """The first file of this package in a stack, as 'augment.py'; 'other' if none."""
  for path in files:
    parts = path.replace('\\', '/').split('/')
    if PACKAGE in parts[:-1]:
      return parts[-1]
  return 'other'


def _kind(opcode: str, line: str) -> str:
  if opcode == 'custom-call':
    target = _TARGET.search(line)
    return f'custom-call {target.group(1)}' if target else opcode
  if opcode == 'fusion':
    kind = _FUSION_KIND.search(line) or _FUSION_KIND_ATTR.search(line)
    return f'fusion {kind.group(1)}' if kind else opcode
  return opcode


def parse_hlo(text: str) -> dict[str, tuple[str, str]]:
  """HLO instruction name -> (kind, source file of this package or 'other')."""
  frame_files = _frame_files(text)
  out = {}
  for line in text.splitlines():
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    name, _, opcode, _ = match.groups()
    frame = _FRAME_ID.search(line)
    source = _SOURCE_FILE.search(line)
    files = frame_files.get(int(frame.group(1)), []) if frame else []
    if source:
      files = [source.group(1), *files]
    out[name] = (_kind(opcode, line), _package_file(files))
  return out


def shape_bytes(shape: str) -> int:
  """Bytes of an HLO shape, a tuple's arrays summed: 'bf16[2,3]{1,0}' -> 12."""
  bits = 0
  for dtype, dims in _ARRAY.findall(shape):
    # pred and the f8 types (f8e4m3fn...) are one byte; the rest say their width (s4, bf16).
    width = _BITS.search(dtype)
    element = int(width.group(1)) if width else 0
    if dtype == 'pred' or dtype.startswith('f8'):
      element = 8
    count = 1
    for dim in filter(None, dims.split(',')):
      count *= int(dim)
    bits += element * count
  return (bits + 7) // 8


def fusion_bytes(text: str) -> dict[str, int]:
  """Fusion instruction name -> bytes of its result plus its operands."""
  shapes, operands = {}, {}
  for line in text.splitlines():
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    name, shape, opcode, rest = match.groups()
    shapes[name] = shape
    if opcode == 'fusion':  # operands end where the attributes begin
      operands[name] = _OPERAND.findall(rest.split('), ', 1)[0])
  return {name: shape_bytes(shapes[name]) + sum(shape_bytes(shapes.get(o, '')) for o in args)
          for name, args in operands.items()}


def traffic(events: Sequence[dict[str, Any]], hlo: dict[str, tuple[str, str]],
            sizes: dict[str, int], steps: int) -> dict[str, tuple[float, float]]:
  """(bytes, device us) per step of the fusions: 'all fusions', per kind, per source file."""
  out: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
  for event, (op, kind, source) in zip(events, resolve(events, hlo), strict=True):
    if op in sizes:
      for key in ('all fusions', kind, source):
        out[key][0] += sizes[op] / steps
        out[key][1] += float(event.get('dur', 0.0)) / steps
  return {key: (b, us) for key, (b, us) in out.items()}


def format_traffic(table: dict[str, tuple[float, float]], peak_tbs: float | None = None) -> str:
  peak = f'  {"of peak":>7}' if peak_tbs else ''
  lines = ['\nmemory traffic of fusions (bytes at their boundary / their device time)',
           f'  {"GB/step":>9} {"ms/step":>9} {"TB/s":>6}{peak}  fusions of (kind or file)']
  for key, (nbytes, us) in sorted(table.items(), key=lambda kv: -kv[1][1]):
    tbs = nbytes / us / 1e6 if us else 0.0
    share = f'  {tbs / peak_tbs:7.0%}' if peak_tbs else ''
    lines.append(f'  {nbytes / 1e9:9.2f} {us / 1e3:9.3f} {tbs:6.2f}{share}  {key}')
  return '\n'.join(lines)


def device_events(trace: dict[str, Any]) -> list[dict[str, Any]]:
  """Complete events naming an HLO op: on device tracks if there are any, else all."""
  events = trace.get('traceEvents', []) if isinstance(trace, dict) else trace
  devices = {e['pid'] for e in events if e.get('ph') == 'M' and e.get('name') == 'process_name'
             and str(e.get('args', {}).get('name', '')).startswith('/device:')}
  named = [e for e in events if e.get('ph') == 'X' and 'hlo_op' in e.get('args', {})]
  on_device = [e for e in named if e.get('pid') in devices]
  return on_device or named


# Library kernels inside CUDA graphs, recognised by name (first match wins).
_LIBRARY_KINDS = (
  ('dgrad', 'kernel conv backward input'), ('wgrad', 'kernel conv backward filter'),
  ('fprop', 'kernel conv forward'), ('conv', 'kernel conv'),
  ('nvjet', 'kernel matmul'), ('gemm', 'kernel matmul'),
)


def _library_kind(kernel: str) -> str:
  lower = kernel.lower()
  return next((kind for key, kind in _LIBRARY_KINDS if key in lower), 'kernel other')


def _instruction_of(event: dict[str, Any], hlo: dict[str, tuple[str, str]]) -> str | None:
  """The HLO instruction an event ran: its hlo_op, or for a kernel replayed inside a
  command buffer the instruction its kernel is named after."""
  op = event['args']['hlo_op']
  if op in hlo:
    return op
  name = str(event.get('name', ''))
  for candidate in (name, re.sub(r'_(\d+)$', r'.\1', name)):
    if candidate in hlo:
      return candidate
  return None


def resolve(events: Sequence[dict[str, Any]],
            hlo: dict[str, tuple[str, str]]) -> list[tuple[str, str, str]]:
  """(op, kind, source) per event; see the module docstring for command buffers."""
  found = [_instruction_of(e, hlo) for e in events]
  # Per command buffer (hlo_op), the source of most of its resolved kernel time.
  share: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
  for event, instruction in zip(events, found, strict=True):
    if instruction is not None and instruction != event['args']['hlo_op']:
      share[event['args']['hlo_op']][hlo[instruction][1]] += float(event.get('dur', 0.0))
  out = []
  for event, instruction in zip(events, found, strict=True):
    op = event['args']['hlo_op']
    if instruction is not None:
      out.append((instruction, *hlo[instruction]))
    elif op in share:
      kernel = str(event.get('name', op))
      out.append((kernel[:60], _library_kind(kernel), share[op].most_common(1)[0][0]))
    else:
      out.append((op, 'unknown', 'other'))
  return out


def summarise(events: Sequence[dict[str, Any]], hlo: dict[str, tuple[str, str]],
              steps: int) -> dict[str, Any]:
  """Microseconds per step by source file, by kind and by op."""
  by_source: collections.Counter = collections.Counter()
  by_kind: collections.Counter = collections.Counter()
  by_op: collections.Counter = collections.Counter()
  for event, (op, kind, source) in zip(events, resolve(events, hlo), strict=True):
    dur = float(event.get('dur', 0.0)) / steps
    by_source[source] += dur
    by_kind[kind] += dur
    by_op[(op, kind, source)] += dur
  return dict(total_us=sum(by_source.values()), by_source=by_source, by_kind=by_kind,
              by_op=by_op, steps=steps, events=len(events))


def format_summary(summary: dict[str, Any], top: int = 15) -> str:
  total = summary['total_us'] or 1.0
  lines = [f'device time per step: {summary["total_us"] / 1e3:.2f} ms '
           f'({summary["events"]} op events over {summary["steps"]} steps)']

  def section(title, counter, label):
    lines.append(f'\n{title}')
    lines.append(f'  {"ms/step":>9} {"share":>6}  {label}')
    for key, us in counter.most_common(top):
      text = key if isinstance(key, str) else '  '.join(key)
      lines.append(f'  {us / 1e3:9.3f} {us / total:6.1%}  {text}')

  section('by source file (first frame in byol_jax/)', summary['by_source'], 'file')
  section('by kind of op', summary['by_kind'], 'kind')
  section(f'top {top} ops', summary['by_op'], 'op  kind  file')
  return '\n'.join(lines)


class Profile(NamedTuple):
  """What a benchmark's --profile_dir holds, read once."""
  events: list[dict[str, Any]]
  hlo: dict[str, tuple[str, str]]  # parse_hlo of the HLO text; empty without one
  steps: int
  fusion_bytes: dict[str, int]  # fusion_bytes of the HLO text; empty without one


def load(profile_dir: str) -> Profile:
  """Events, parsed HLO, step count and fusion bytes of a benchmark's --profile_dir."""
  traces = sorted(glob.glob(os.path.join(profile_dir, '**', TRACE_NAME), recursive=True))
  if not traces:
    raise ProfileError(f'no {TRACE_NAME} under {profile_dir}: make one with '
                       'python -m byol_jax.benchmark ... --profile_dir=DIR')
  with gzip.open(traces[-1], 'rt') as f:
    events = device_events(json.load(f))
  if not events:
    raise ProfileError(f'{traces[-1]} has no events naming an HLO op')
  hlo_path = os.path.join(profile_dir, HLO_NAME)
  text = ''
  if os.path.exists(hlo_path):
    with open(hlo_path) as f:
      text = f.read()
  steps_path = os.path.join(profile_dir, STEPS_NAME)
  steps = 1
  if os.path.exists(steps_path):
    with open(steps_path) as f:
      steps = max(1, int(f.read().strip() or 1))
  return Profile(events, parse_hlo(text) if text else {}, steps,
                 fusion_bytes(text) if text else {})


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('profile_dir')
  parser.add_argument('--top', type=int, default=15)
  parser.add_argument('--peak_tbs', type=float, default=None,
                      help="the device's peak memory bandwidth in TB/s (H200: 4.8, H100 SXM: "
                      '3.35), to print each fusion kind\'s share of it')
  args = parser.parse_args(argv)
  if args.peak_tbs is not None and args.peak_tbs <= 0:
    print(f'error: --peak_tbs must be positive, got {args.peak_tbs}', file=sys.stderr)
    return 2
  try:
    profile = load(args.profile_dir)
  except (ProfileError, OSError, json.JSONDecodeError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  events, hlo, steps = profile.events, profile.hlo, profile.steps
  print(format_summary(summarise(events, hlo, steps), args.top))
  table = traffic(events, hlo, profile.fusion_bytes, steps)
  if table:
    print(format_traffic(table, args.peak_tbs))
  return 0


if __name__ == '__main__':
  sys.exit(main())
