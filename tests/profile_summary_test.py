"""Tests of the profile summary: attribution of device time to source files and op kinds."""

import gzip
import json

import pytest
from conftest import tiny_config

from byol_jax import benchmark, profile_summary

# A compiled-HLO text in the format of JAX 0.10 (stack-frame tables; a frame's caller is
# frame parent_frame_id - 1, none for 1) with one instruction of each source: a fusion from
# augment.py (through jax's own image code), a cuDNN convolution from networks.py (through
# haiku), a reduce with no frame in the package, and an old-style instruction carrying
# source_file= directly.
HLO = '''HloModule jit_step

FileNames
1 "/site/jax/_src/image/scale.py"
2 "/repo/byol_jax/augment.py"
3 "/site/haiku/_src/conv.py"
4 "/repo/byol_jax/networks.py"
5 "/site/optax/_src/transform.py"

FunctionNames
1 "f"

FileLocations
1 {file_name_id=1 function_name_id=1 line=1 end_line=1 column=1 end_column=2}
2 {file_name_id=2 function_name_id=1 line=2 end_line=2 column=1 end_column=2}
3 {file_name_id=3 function_name_id=1 line=3 end_line=3 column=1 end_column=2}
4 {file_name_id=4 function_name_id=1 line=4 end_line=4 column=1 end_column=2}
5 {file_name_id=5 function_name_id=1 line=5 end_line=5 column=1 end_column=2}

StackFrames
1 {file_location_id=2 parent_frame_id=1}
2 {file_location_id=1 parent_frame_id=2}
3 {file_location_id=4 parent_frame_id=1}
4 {file_location_id=3 parent_frame_id=4}
5 {file_location_id=5 parent_frame_id=1}

'''
ENTRY = [
  '  %fusion.7 = f32[8]{0} fusion(%p), kind=kLoop, calls=%fc, '
  'metadata={op_name="jit(step)/mul" stack_frame_id=2}',
  '  %custom-call.3 = (f32[8]{0}, u8[0]{0}) custom-call(%fusion.7), '
  'custom_call_target="__cudnn$convForward", metadata={op_name="jit(step)/conv" '
  'stack_frame_id=4}',
  '  %reduce.2 = f32[] reduce(%fusion.7, %c), dimensions={0}, to_apply=%add, '
  'metadata={op_name="jit(step)/reduce_sum" stack_frame_id=5}',
  '  ROOT %loop_fusion.1 = f32[8]{0} fusion(%p), kind=kCustom, calls=%fc2, '
  'metadata={op_name="jit(step)/sub" source_file="/repo/byol_jax/optim.py" source_line=3}, '
  'backend_config={"fusion_backend_config":{"kind":"__triton_gemm"}}',
]
HLO += '\nENTRY %main.1 (p: f32[8]) -> f32[8] {\n' + '\n'.join(ENTRY) + '\n}\n'


def _trace():
  """Two steps: kernels on the GPU track, and host events that must be ignored beside them."""
  meta = [dict(ph='M', pid=1, name='process_name', args=dict(name='/host:CPU')),
          dict(ph='M', pid=7, name='process_name', args=dict(name='/device:GPU:0'))]
  kernels = [('fusion.7', 100.0), ('custom-call.3', 300.0), ('reduce.2', 20.0),
             ('loop_fusion.1', 60.0), ('fusion.7', 140.0), ('custom-call.3', 260.0),
             ('mystery.1', 20.0)]
  events = [dict(ph='X', pid=7, tid=1, ts=i, dur=d, name='k', args=dict(hlo_op=op))
            for i, (op, d) in enumerate(kernels)]
  host = [dict(ph='X', pid=1, tid=2, ts=0, dur=9999.0, name='thunk', args=dict(hlo_op='fusion.7'))]
  return dict(traceEvents=meta + events + host)


def test_parse_hlo_attributes_kind_and_first_package_frame():
  """The source is the innermost frame inside byol_jax (not jax's or haiku's own code);
  custom-calls are named by target and fusions by kind. Breaks if the frame chain is walked
  the wrong way (augment.py would become 'other') or targets are dropped."""
  hlo = profile_summary.parse_hlo(HLO)
  assert hlo['fusion.7'] == ('fusion kLoop', 'augment.py')
  assert hlo['custom-call.3'] == ('custom-call __cudnn$convForward', 'networks.py')
  assert hlo['reduce.2'] == ('reduce', 'other')
  assert hlo['loop_fusion.1'] == ('fusion __triton_gemm', 'optim.py')


def test_summary_sums_device_time_per_step_by_source_kind_and_op():
  """Hand-summed reference: the 7 GPU kernels over 2 steps total 900 us, 450 per step;
  the host thunk (9,999 us) is not device time and must not count. 'other' holds the
  frameless reduce (10 us/step) and the op missing from the HLO text (10 us/step)."""
  events = profile_summary.device_events(_trace())
  assert len(events) == 7
  summary = profile_summary.summarise(events, profile_summary.parse_hlo(HLO), steps=2)
  assert summary['total_us'] == pytest.approx(450.0)
  assert dict(summary['by_source']) == pytest.approx(
    {'augment.py': 120.0, 'networks.py': 280.0, 'other': 20.0, 'optim.py': 30.0})
  assert summary['by_kind']['custom-call __cudnn$convForward'] == pytest.approx(280.0)
  assert summary['by_kind']['unknown'] == pytest.approx(10.0)
  text = profile_summary.format_summary(summary, top=3)
  assert 'device time per step: 0.45 ms' in text and 'networks.py' in text


def test_kernels_inside_command_buffers_are_resolved_by_kernel_name():
  """CUDA-graph kernels all name their command buffer as hlo_op, which the HLO text lacks:
  a fusion kernel must be found by its own name (loop_fusion_1 is loop_fusion.1), a library
  kernel gets a kind from its name and its buffer's dominant source, and a buffer with
  nothing resolvable stays unknown. Breaks if the buffer name is looked up alone (all three
  'unknown', 58% of a real ResNet-50 step) or the name suffix is not mapped."""
  events = [dict(ph='X', pid=7, tid=1, ts=i, dur=d, name=name, args=dict(hlo_op=op))
            for i, (name, op, d) in enumerate([
              ('loop_fusion_1', 'command_buffer_5', 40.0),
              ('sm90_xmma_fprop_implicit_gemm_bf16', 'command_buffer_5', 30.0),
              ('fusion_7', 'command_buffer_5', 10.0),
              ('nvjet_sm90_tst_64x512', 'command_buffer_9', 20.0),
              ('k', 'custom-call.3', 5.0)])]
  resolved = profile_summary.resolve(events, profile_summary.parse_hlo(HLO))
  assert resolved == [
    ('loop_fusion.1', 'fusion __triton_gemm', 'optim.py'),
    ('sm90_xmma_fprop_implicit_gemm_bf16', 'kernel conv forward', 'optim.py'),
    ('fusion.7', 'fusion kLoop', 'augment.py'),
    ('command_buffer_9', 'unknown', 'other'),
    ('custom-call.3', 'custom-call __cudnn$convForward', 'networks.py')]
  summary = profile_summary.summarise(events, profile_summary.parse_hlo(HLO), steps=1)
  assert summary['by_source']['optim.py'] == pytest.approx(70.0)
  assert summary['by_kind']['kernel conv forward'] == pytest.approx(30.0)


def test_cpu_trace_falls_back_to_host_events():
  """Without a device track (CPU), events carrying hlo_op on the host are the op timeline."""
  trace = _trace()
  trace['traceEvents'] = [e for e in trace['traceEvents'] if e.get('pid') != 7]
  events = profile_summary.device_events(trace)
  assert [e['dur'] for e in events] == [9999.0]


def test_missing_profile_is_one_line_error(tmp_path, capsys):
  assert profile_summary.main([str(tmp_path)]) == 2
  assert 'no perfetto_trace.json.gz' in capsys.readouterr().err


def test_profile_request_is_checked_before_building(tmp_path):
  with pytest.raises(benchmark.BenchmarkError, match='profile_steps'):
    benchmark.run_benchmark(tiny_config(), profile_dir=str(tmp_path), profile_steps=0)


@pytest.mark.slow  # 25 s; experiments' gpu_benchmark dry run (slow too) also profiles
def test_benchmark_profile_dir_end_to_end(tmp_path):
  """The benchmark's --profile_dir leaves a trace and the HLO text that the summary reads;
  on the resident step both the augmentation and the network show up, and the device time
  per step is of the order of the timed step (a wrong step count would be off by 2x+)."""
  result = benchmark.run_benchmark(tiny_config(), data='resident', steps=2, warmup=1,
                                   profile_dir=str(tmp_path), profile_steps=2)
  events, hlo, steps, sizes = profile_summary.load(str(tmp_path))
  assert steps == 2 and hlo
  summary = profile_summary.summarise(events, hlo, steps)
  assert summary['by_source']['augment.py'] > 0 and summary['by_source']['networks.py'] > 0
  # The compiled program's fusions are found with their bytes, and their time is charged.
  traffic = profile_summary.traffic(events, hlo, sizes, steps)
  assert traffic['all fusions'][0] > 0 and traffic['all fusions'][1] > 0, traffic
  assert 0.3 < summary['total_us'] / 1e3 / result['step_ms'] < 3.0, (summary['total_us'],
                                                                       result['step_ms'])


def test_trace_json_is_read_gzipped(tmp_path):
  """load() finds the trace wherever jax.profiler nests it and reads the step count."""
  nested = tmp_path / 'plugins' / 'profile' / 'run1'
  nested.mkdir(parents=True)
  with gzip.open(nested / profile_summary.TRACE_NAME, 'wt') as f:
    json.dump(_trace(), f)
  (tmp_path / profile_summary.HLO_NAME).write_text(HLO)
  (tmp_path / profile_summary.STEPS_NAME).write_text('2')
  events, hlo, steps, sizes = profile_summary.load(str(tmp_path))
  assert len(events) == 7 and steps == 2 and 'fusion.7' in hlo and sizes


# GPU-style fusions: operands without shapes, a /*index=N*/ comment among them (which an
# earlier hand count missed, undercounting by half), a tuple result, and an old-style
# operand that prints its own shape.
TRAFFIC_HLO = '''ENTRY %main (p: bf16[4,8]) -> bf16[4,8] {
  %p = bf16[4,8]{1,0} parameter(0)
  %q = f32[8]{0} parameter(1)
  %loop_fusion.1 = (bf16[4,8]{1,0}, f32[8]{0}) fusion(%p, %q, /*index=2*/%p), kind=kLoop, calls=%f1
  %gte.1 = bf16[4,8]{1,0} get-tuple-element(%loop_fusion.1), index=0
  %input_reduce_fusion.2 = f32[8]{0} fusion(bf16[4,8]{1,0} %gte.1), kind=kInput, calls=%f2
  ROOT %custom-call.3 = bf16[4,8]{1,0} custom-call(%gte.1), custom_call_target="__cudnn$convForward"
}
'''


def test_shape_bytes_counts_every_array_of_a_shape():
  """Element widths from the dtype (pred and f8 one byte, s4 half), tuples summed, scalars
  one element; a wrong width would misstate every bandwidth in the traffic table."""
  assert profile_summary.shape_bytes('bf16[2,3]{1,0}') == 12
  assert profile_summary.shape_bytes('(f32[4]{0}, pred[8]{0})') == 24
  assert profile_summary.shape_bytes('f32[]') == 4
  assert profile_summary.shape_bytes('f8e4m3fn[10]{0}') == 10
  assert profile_summary.shape_bytes('s4[8]{0}') == 4
  assert profile_summary.shape_bytes('u8[0]{0}') == 0


def test_fusion_bytes_are_result_plus_every_operand():
  """Hand count: loop_fusion.1 writes 64 + 32 bytes and reads p (64), q (32) and p again
  after the index comment (64) = 256; the reduce reads 64 and writes 32 = 96. Library calls
  are not fusions and get no entry."""
  sizes = profile_summary.fusion_bytes(TRAFFIC_HLO)
  assert sizes == {'loop_fusion.1': 256, 'input_reduce_fusion.2': 96}


def test_traffic_divides_bytes_per_step_by_device_time():
  """Two steps of two fusions: per step 256 B in 2 us (loop) and 96 B in 1 us (reduce), that
  is 1.28e-4 and 9.6e-5 TB/s, each charged to its kind and its source file; the conv is not
  counted."""
  hlo = profile_summary.parse_hlo(TRAFFIC_HLO)
  events = [dict(ph='X', dur=dur, name='k', args=dict(hlo_op=op)) for op, dur in
            [('loop_fusion.1', 2.0), ('input_reduce_fusion.2', 1.0), ('custom-call.3', 50.0)] * 2]
  table = profile_summary.traffic(events, hlo, profile_summary.fusion_bytes(TRAFFIC_HLO), 2)
  assert table['fusion kLoop'] == pytest.approx((256.0, 2.0))
  assert table['fusion kInput'] == pytest.approx((96.0, 1.0))
  assert table['all fusions'] == pytest.approx((352.0, 3.0))
  assert table['other'] == pytest.approx((352.0, 3.0))  # no stack frames in this HLO
  text = profile_summary.format_traffic(table, peak_tbs=1e-4)
  # 256 B / 2 us = 1.28e-4 TB/s: 128% of a 1e-4 TB/s "peak".
  assert '128%' in text and 'fusion kLoop' in text


def test_main_prints_traffic_and_rejects_a_bad_peak(tmp_path, capsys):
  """The command line adds the traffic table after the time tables; a non-positive peak
  bandwidth is a one-line error, not a division by zero."""
  with gzip.open(tmp_path / profile_summary.TRACE_NAME, 'wt') as f:
    json.dump(dict(traceEvents=[dict(ph='X', dur=4.0, name='k', args=dict(hlo_op=op))
                                for op in ('loop_fusion.1', 'input_reduce_fusion.2')]), f)
  (tmp_path / profile_summary.HLO_NAME).write_text(TRAFFIC_HLO)
  assert profile_summary.main([str(tmp_path), '--peak_tbs=4.8']) == 0
  out = capsys.readouterr().out
  assert 'memory traffic of fusions' in out and 'all fusions' in out
  assert profile_summary.main([str(tmp_path), '--peak_tbs=0']) == 2
  assert capsys.readouterr().err.strip().startswith('error: --peak_tbs')
