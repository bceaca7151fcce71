#!/usr/bin/env bash
# One device call that spends a short GPU lease on both GPU issues: the throughput benchmark
# beside the peer (experiments/gpu_benchmark.sh), then the CIFAR-10 recipe for as many epochs
# as the time left allows (experiments/cifar10_gpu.sh, a complete cosine schedule, not a cut
# one), then everything bundled into at most 8 files, the most a device call brings back.
#
# Prepare once, here (the preparation of gpu_benchmark.sh and cifar10_gpu.sh together):
#   bash ../shared/bench/fetch_wheels.sh .whl
#   mkdir -p .bench && cp ../shared/bench/peer_byol_pytorch.py \
#       ../shared/datasets/cifar10/cifar10_jpeg_bytes.npz .bench/
# Then one device call, carry [".whl", ".bench"], timeout_s 600:
#   bash experiments/gpu_session.sh
# BUDGET_S (default 560) is the wall-clock budget of the whole call and BENCH_S (default 300)
# the benchmark's share; MAX_EPOCHS (default 100; 0: the benchmark alone) caps the CIFAR-10
# run; ONLY picks benchmark runs (see gpu_benchmark.sh) and CIFAR_FLAGS adds config
# overrides to the CIFAR-10 run; EPOCHS sets its epochs instead of the estimate from the
# time left (the run is still stopped, gracefully, 45 s before BUDGET_S).
# On one H200 (2026-11-26) the benchmark's share of 300 s ran both peers, r50 and cifar10 in
# bf16, but not r50 in float32. TINY=1 checks the script on a CPU with tiny models
# (tests/experiments_test.py).
# $OUT (default runs/gpu_session) gets: session.log (everything printed), bench_summary.txt,
# bench.tgz (every benchmark log, results.jsonl and profiles.tgz), cifar_table.txt,
# cifar_knn.png and cifar.tgz (the CIFAR-10 run's logs, metrics and config).
set -uo pipefail
BUDGET_S=${BUDGET_S:-560}
BENCH_S=${BENCH_S:-300}
MAX_EPOCHS=${MAX_EPOCHS:-100}
OUT=${OUT:-$PWD/runs/gpu_session}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.." || exit 1
WORK=$(mktemp -d "${TMPDIR:-/tmp}/byol_gpu_session.XXXXXX")
exec > >(tee "$OUT/session.log") 2>&1
# The CIFAR-10 trainer reuses what the benchmark compiled where the functions are the same.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$WORK/jax_cache}

# The benchmark installs the wheels into /tmp/site; the CIFAR-10 script then finds them there.
BUDGET_S=$BENCH_S OUT="$WORK/bench" bash experiments/gpu_benchmark.sh
cp "$WORK/bench/summary.txt" "$OUT/bench_summary.txt" 2>/dev/null
tar -czf "$OUT/bench.tgz" -C "$WORK" bench

# Epochs that fit the time left: the benchmark's sustained (window) img/s of the cifar10 step,
# at 85% for the kNN evaluations, after 80 s for loading the data, compiling and evaluating
# the initial encoder, and 45 s kept for saving, the table and the plot. On one H200
# (2026-11-26) training ran at the window rate (25,900 vs 25,635 img/s) and the start-up
# took about 70 s.
left=$((BUDGET_S - SECONDS))
epochs=$(python3 - "$WORK/bench/results.jsonl" "$left" "$MAX_EPOCHS" "${TINY:-0}" << 'EOF'
import json, sys
path, left, cap, tiny = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == '1'
rate = 15000.0  # img/s if the benchmark of the cifar10 step gave nothing
for line in open(path):
  if line.strip() and json.loads(line).get('tag') == 'cifar_bf16':
    rate = json.loads(line)['window_img_s']
print(1 if tiny else max(0, min(cap, int((left - 125) * 0.85 * rate / 50000))))
EOF
)
epochs=${EPOCHS:-$epochs}
echo "== CIFAR-10: ${left} s left, ${epochs} epochs"
if (( epochs > 0 )); then
  # kNN every 5 epochs (97 steps each at batch 512), so even a short run draws a curve.
  every=()
  (( ${TINY:-0} )) || every=(--config.eval_every_steps=485)
  SKIP_PEER=1 OUT="$WORK/cifar" TRAIN_TIMEOUT_S=$((left - 45)) RUN="$WORK/cifar_run" \
    bash experiments/cifar10_gpu.sh "$epochs" "${every[@]}" ${CIFAR_FLAGS:-}
  cp "$WORK/cifar/table.txt" "$OUT/cifar_table.txt" 2>/dev/null
  cp "$WORK/cifar/knn.png" "$OUT/cifar_knn.png" 2>/dev/null
  tar -czf "$OUT/cifar.tgz" -C "$WORK" cifar
fi
echo "== session done in ${SECONDS} s; outputs: $(ls "$OUT" | tr '\n' ' ')"
