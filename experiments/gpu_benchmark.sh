#!/bin/bash
# GPU throughput of byol-jax's full BYOL step beside byol-pytorch's, measured in one call on
# one machine (figures from different runs or machines are not comparable).
#
# Preparation, once, here in the repository root (needs a package registry; .whl/ and
# .bench/ are git-ignored):
#   bash ../shared/bench/fetch_wheels.sh .whl
#   mkdir -p .bench && cp ../shared/bench/peer_byol_pytorch.py .bench/
# Then ONE device call from the repository root, carrying .whl and .bench:
#   bash experiments/gpu_benchmark.sh          # about 5-8 minutes of GPU time
# It installs the wheels into /tmp/site, prints nvidia-smi and jax.devices(), times the peer
# (ResNet-50 224 px batch 256, ResNet-18 CIFAR 32 px batch 512, bf16 autocast) and ours
# (r50 batch 256 bf16 and float32, cifar10 batch 512 bf16; random images resident on the
# device, sampled and augmented there), the two bf16 runs again with both views in one
# network call (--config.fuse_views=True), then two diagnostics of the r50 bf16 step (network
# update alone, augmentation alone), then prints a summary table with the ratios. The r50 and
# cifar10 bf16 runs also trace 5 steps after timing (--profile_dir) and print where the
# device time goes (byol_jax.profile_summary: by source file, by kind of op, top ops).
# ONLY="peer_r50 r50_bf16 ..." runs just the runs named.
# Logs, results.jsonl (one JSON line per run of ours) and summary.txt go to $OUT, or to
# ./bench_out when OUT is unset. Targets are printed beside the figures, never asserted.
#
# CPU check of this script: TINY=1 bash experiments/gpu_benchmark.sh (or --dry-run): tiny
# models and 2 steps, no wheel install; nvidia-smi and the peer are skipped where there is
# no GPU or no byol-pytorch. PYTHON picks the interpreter (python3 by default); STEPS and
# WARMUP override the timed and warm-up steps; BUDGET_S (default 540) is the wall-clock
# budget: a run that would start after it is skipped and each run's timeout is cut to it.
set -uo pipefail

[[ "${1:-}" == "--dry-run" ]] && TINY=1
TINY=${TINY:-0}
PY=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-540}
OUT=${OUT:-./bench_out}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.." || exit 1
: > "$OUT/results.jsonl"

if (( TINY )); then
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
  steps=${STEPS:-2}; warmup=${WARMUP:-1}; r50_batch=4; cifar_batch=4
  small=(--config.model.depth=10 --config.image_size=8
         --config.model.projector_hidden=32 --config.model.predictor_hidden=32
         --config.model.projection_dim=16)
else
  if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
      || exit 1
    export PYTHONPATH=/tmp/site:$PWD
  else
    echo "warning: no wheels in .whl/ (see the preparation at the top); using what is installed"
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
  fi
  steps=${STEPS:-20}; warmup=${WARMUP:-5}; r50_batch=256; cifar_batch=512
  small=()
fi

{
  date
  if command -v nvidia-smi > /dev/null; then nvidia-smi; else echo "nvidia-smi: not available"; fi
  "$PY" -c 'import jax; print("jax", jax.__version__, jax.devices())'
} 2>&1 | tee "$OUT/env.log"

peer_ok=0
if [[ -f .bench/peer_byol_pytorch.py ]] && "$PY" -c \
    'import sys, torch, byol_pytorch; sys.exit(not torch.cuda.is_available())' 2> /dev/null; then
  peer_ok=1
else
  echo "peer skipped: needs .bench/peer_byol_pytorch.py, torch with a GPU and byol-pytorch"
fi

# run NAME LIMIT_S COMMAND...: runs with a timeout cut to the budget left, log in $OUT/NAME.log.
# ONLY="name ..." keeps just the runs named (e.g. the diagnostics, when the rest is measured).
failed=0
run() {
  local name=$1 limit=$2 left=$((BUDGET_S - SECONDS))
  shift 2
  if [[ -n "${ONLY:-}" && " $ONLY " != *" $name "* ]]; then
    return 0
  fi
  if (( left < 30 )); then
    echo "== $name skipped: the ${BUDGET_S} s budget is spent" | tee "$OUT/$name.log"
    return 1
  fi
  (( limit > left )) && limit=$left
  echo "== $name (timeout ${limit} s): $*"
  PYTHONUNBUFFERED=1 timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
}

ours() {
  local name=$1 limit=$2
  shift 2
  run "$name" "$limit" "$PY" -m byol_jax.benchmark --tag="$name" --data=synthetic \
    --steps="$steps" --warmup="$warmup" --output="$OUT/results.jsonl" "$@" "${small[@]}" \
    || failed=$((failed + 1))
}

peer() {
  local name=$1
  shift
  (( peer_ok )) && run "$name" 90 "$PY" .bench/peer_byol_pytorch.py "$@"
}

# Most important first, so a spent budget drops the least important run.
peer peer_r50 --arch r50 --size 224 --batch 256
ours r50_bf16 200 --config=configs/byol.py:r50 --config.batch_size=$r50_batch \
  --config.precision=bfloat16 --profile_dir="$OUT/prof_r50_bf16"
peer peer_r18cifar --arch r18cifar --size 32 --batch 512
ours cifar_bf16 150 --config=configs/byol.py:cifar10 --config.batch_size=$cifar_batch \
  --config.precision=bfloat16 --profile_dir="$OUT/prof_cifar_bf16"
# Both views through one network call (fuse_views, the same maths): against the runs above.
ours cifar_bf16_fused 150 --config=configs/byol.py:cifar10 --config.batch_size=$cifar_batch \
  --config.precision=bfloat16 --config.fuse_views=True
ours r50_bf16_fused 200 --config=configs/byol.py:r50 --config.batch_size=$r50_batch \
  --config.precision=bfloat16 --config.fuse_views=True
ours r50_f32 200 --config=configs/byol.py:r50 --config.batch_size=$r50_batch \
  --config.precision=float32
# Diagnostics of the r50 bf16 step: the network update alone on ready-made views (the bench
# README's plain JAX step measured 2,646 img/s) and the device augmentation alone.
ours r50_views_bf16 200 --config=configs/byol.py:r50 --config.batch_size=$r50_batch \
  --config.precision=bfloat16 --data=views
ours r50_aug_bf16 90 --config=configs/byol.py:r50 --config.batch_size=$r50_batch \
  --config.precision=bfloat16 --mode=input

# The profiles keep what byol_jax.profile_summary reads (perfetto_trace.json.gz, hlo.txt;
# the XPlane copies of the same trace are dropped), packed into one file, profiles.tgz,
# since jax.profiler nests the trace too deep for a device call to bring it back.
find "$OUT" \( -name '*.xplane.pb' -o -name '*.trace.json.gz' \) -delete 2>/dev/null
profiles=$(cd "$OUT" && ls -d prof_* 2>/dev/null)
if [[ -n "$profiles" ]]; then
  # shellcheck disable=SC2086
  tar -czf "$OUT/profiles.tgz" -C "$OUT" $profiles && (cd "$OUT" && rm -rf $profiles)
fi

"$PY" - "$OUT" << 'EOF' | tee "$OUT/summary.txt"
"""Summary table: our img/s beside the peer's, with the issue's targets (not asserted)."""
import json
import os
import re
import sys

out = sys.argv[1]
ours = {}
with open(os.path.join(out, 'results.jsonl')) as f:
  for line in f:
    if line.strip():
      result = json.loads(line)
      ours[result['tag']] = result


def peer(name):
  path = os.path.join(out, name + '.log')
  match = re.search(r'img_per_s=(\d+)', open(path).read()) if os.path.exists(path) else None
  return float(match.group(1)) if match else None


def fmt(value, spec='.0f'):
  return 'n/a' if value is None else format(value, spec)


ROWS = (  # tag, peer log, target
  ('r50_bf16', 'peer_r50', '>= 3,500 img/s on an H200, >= 2.3x peer, peak < 40 GB'),
  ('cifar_bf16', 'peer_r18cifar', '>= 25,000 img/s, >= 1.35x peer'),
  ('cifar_bf16_fused', 'peer_r18cifar', 'cifar_bf16 with fuse_views=True'),
  ('r50_bf16_fused', 'peer_r50', 'r50_bf16 with fuse_views=True'),
  ('r50_f32', None, '>= 1,600 img/s'),
  ('r50_views_bf16', None, 'diagnostic: network update alone (plain JAX step: 2,646)'),
  ('r50_aug_bf16', None, 'diagnostic: device augmentation alone'),
)
header = ('run', 'ours img/s', 'window img/s', 'peer img/s', 'window/peer', 'step ms',
          'peak GB', 'TFLOP/s', 'target (not asserted)')
print('| ' + ' | '.join(header) + ' |')
print('|' + '---|' * len(header))
for tag, peer_name, target in ROWS:
  r = ours.get(tag, {})
  theirs = peer(peer_name) if peer_name else None
  # The peer syncs once after its timed steps, like our window: compare those two.
  ratio = r['window_img_s'] / theirs if r and theirs else None
  cells = (tag, fmt(r.get('img_s')), fmt(r.get('window_img_s')), fmt(theirs),
           fmt(ratio, '.2f') + ('x' if ratio else ''), fmt(r.get('step_ms'), '.1f'),
           fmt(r.get('peak_mem_gb'), '.1f'), fmt(r.get('tflops'), '.3g'), target)
  print('| ' + ' | '.join(cells) + ' |')
devices = {r['device'] for r in ours.values()}
print(f'device: {", ".join(sorted(devices)) or "n/a"}. ours img/s: batch / median blocked '
      'step; window: steps back to back, one sync, as the peer times its steps.')
EOF

(( failed )) && echo "$failed run(s) of ours failed; see $OUT/*.log"
exit $(( failed > 0 ))
