#!/usr/bin/env bash
# Normalisation ablation on CIFAR-10, every variant of configs/ablation.py with one budget,
# then a table of kNN top-1 per variant (plus the randomly initialised encoder).
#   bash experiments/ablation.sh 20          # EPOCHS per variant (default 20)
# The variants run side by side (PARALLEL at once, default all six), each with its share of
# the accelerator's memory: on one GPU their start-up (data decoding, compilation) overlaps
# and the six fit one device call; one after the other, each paid its own start-up (about
# 100 s in the H200 CIFAR-10 runs of the README: decoding, initialising, compiling).
# Preparation and TINY=1 as in experiments/cifar10_gpu.sh. $OUT (default runs/ablation) gets
# one log per variant and table.txt (7 files, small enough to come back from a device call);
# the runs (checkpoints) go to $RUNS, by default a fresh folder under /tmp.
set -euo pipefail
EPOCHS=${1:-20}
OUT=${OUT:-$PWD/runs/ablation}
mkdir -p "$OUT"
RUNS=${RUNS:-$(mktemp -d "${TMPDIR:-/tmp}/byol_ablation.XXXXXX")}
mkdir -p "$RUNS"
if [ "${TINY:-0}" != 1 ] && [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
SRC=${CIFAR_NPZ:-.bench/cifar10_jpeg_bytes.npz}
# TINY=1 checks get a folder of their own: a real run must never train on their subset.
if [ "${TINY:-0}" = 1 ]; then TINY_SUFFIX=_tiny; else TINY_SUFFIX=; fi
DATA=${CIFAR_FOLDER:-/tmp/byol_cifar10$TINY_SUFFIX}
EXTRA=(--config.eval_every_steps=0)
CONVERT=()
if [ "${TINY:-0}" = 1 ]; then
  EXTRA+=(--config.steps=4 --config.batch_size=16 --config.model.width=0.125
          --config.model.projector_hidden=32 --config.model.predictor_hidden=32
          --config.model.projection_dim=16 --config.log_every_steps=2
          --config.knn.train_examples=200 --config.knn.k=10)
  CONVERT=(--train_per_class 30 --test_per_class 10)
fi
python3 experiments/cifar10_to_folder.py --reuse --src "$SRC" --out "$DATA" "${CONVERT[@]}"
VARIANTS=$(python3 -c "from configs import ablation; print(' '.join(ablation.VARIANTS))")
read -r -a names <<< "$VARIANTS"
PARALLEL=${PARALLEL:-${#names[@]}}
(( PARALLEL >= 1 )) || { echo "PARALLEL=$PARALLEL must be at least 1"; exit 2; }
export XLA_PYTHON_CLIENT_MEM_FRACTION=$(python3 -c "print(round(0.9 / $PARALLEL, 3))")
for v in "${names[@]}"; do
  while (( $(jobs -rp | wc -l) >= PARALLEL )); do wait -n || true; done
  echo "== $v started $(date +%T)"
  ( rc=0
    python3 -m byol_jax.main --config="configs/ablation.py:$v" --config.dataset="folder:$DATA" \
      --config.epochs="$EPOCHS" --config.precision=bfloat16 --workdir="$RUNS/$v" "${EXTRA[@]}" \
      > "$OUT/$v.log" 2>&1 || rc=$?
    echo "$rc" > "$RUNS/$v.rc" ) &
done
wait
failed=0
for v in "${names[@]}"; do
  if [ "$(cat "$RUNS/$v.rc" 2>/dev/null)" != 0 ]; then
    echo "$v failed, see $OUT/$v.log"; tail -5 "$OUT/$v.log"; failed=$((failed + 1))
  fi
done
python3 - "$RUNS" $VARIANTS <<'PY' | tee "$OUT/table.txt"
import json, os, sys
runs, variants = sys.argv[1], sys.argv[2:]
print(f"{'variant':14s} kNN top-1  (runs in {runs})")
init = None
for v in variants:
    path = os.path.join(runs, v, 'metrics', 'eval.jsonl')
    if not os.path.exists(path):
        print(f'{v:14s} (failed)'); continue
    last = [json.loads(l) for l in open(path)][-1]
    init = last.get('knn_top1_init', init)
    print(f"{v:14s} {last['knn_top1']:.4f}")
print(f"{'random init':14s} {init:.4f}" if init is not None else 'random init    n/a')
PY
exit $(( failed > 0 ))
