#!/usr/bin/env bash
# Recipe variants of the CIFAR-10 recipe side by side, in ONE device call: each variant is an
# experiments/cifar10_gpu.sh run (same epochs, own config overrides), all started at once on
# the one GPU, so a short lease compares recipes on complete cosine schedules instead of
# running one after the other with a start-up each. Throughput is shared: the images/s in
# the tables are each run's share, not the recipe's speed alone.
#   bash experiments/cifar10_sweep.sh EPOCHS 'NAME:--config.x=1 --config.y=2' 'NAME2:...'
# A variant with no overrides ('base:') is the preset as it is. A variant named torch* runs
# the independent PyTorch BYOL instead, its overrides being that script's flags. Preparation and TINY=1 as in
# experiments/cifar10_gpu.sh; TRAIN_TIMEOUT_S is passed on (graceful stop of every run).
# $OUT (default runs/cifar10_sweep) gets at most 8 files: sweep.log, summary.txt (the last
# kNN top-1 of each variant with its overrides, then every variant's table), knn.png (all
# variants' kNN curves in one figure) and runs.tgz (each variant's logs, metrics, config).
set -uo pipefail
EPOCHS=${1:?usage: cifar10_sweep.sh EPOCHS NAME:OVERRIDES...}
shift
(( $# > 0 )) || { echo "name at least one variant, e.g. 'base:'"; exit 2; }
OUT=${OUT:-$PWD/runs/cifar10_sweep}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.." || exit 1
WORK=${RUNS:-$(mktemp -d "${TMPDIR:-/tmp}/byol_cifar10_sweep.XXXXXX")}
mkdir -p "$WORK"
exec > >(tee "$OUT/sweep.log") 2>&1
names=()
for variant in "$@"; do
  name=${variant%%:*}
  [[ $variant == *:* && $name =~ ^[A-Za-z0-9_.-]+$ ]] \
    || { echo "bad variant '$variant': NAME:OVERRIDES, NAME in letters, digits, . _ -"; exit 2; }
  [[ " ${names[*]} " == *" $name "* ]] && { echo "variant name '$name' used twice"; exit 2; }
  names+=("$name")
done

# Once, before the runs start: the wheels and the unpacked images (racing runs would each
# install and unpack into the same folders).
if [ "${TINY:-0}" != 1 ] && [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
  export BYOL_WHEELS_INSTALLED=1
fi
# TINY=1 checks get a folder of their own: a real run must never train on their subset.
if [ "${TINY:-0}" = 1 ]; then TINY_SUFFIX=_tiny; else TINY_SUFFIX=; fi
export CIFAR_FOLDER=${CIFAR_FOLDER:-/tmp/byol_cifar10$TINY_SUFFIX}
CONVERT=()
[ "${TINY:-0}" = 1 ] && CONVERT=(--train_per_class 30 --test_per_class 10)
python3 experiments/cifar10_to_folder.py --reuse \
  --src "${CIFAR_NPZ:-.bench/cifar10_jpeg_bytes.npz}" --out "$CIFAR_FOLDER" "${CONVERT[@]}" \
  || exit 1
# Each process may take its share of the GPU's memory (JAX takes 75% by default).
export XLA_PYTHON_CLIENT_MEM_FRACTION=$(python3 -c "print(round(0.9 / $#, 3))")

# A variant named torch* is the independent PyTorch BYOL (experiments/torch_byol_reference.py,
# bf16 autocast on the GPU) with its own flags, e.g. 'torch_lightly:--preset lightly'.
run_torch_reference() {
  local name=$1; shift
  local tiny=()
  [ "${TINY:-0}" = 1 ] && tiny=(--batch_size 16 --depth 10 --width 0.125 --hidden 32
                                --proj_dim 16 --eval_every_epochs 1 --log_every_steps 2)
  mkdir -p "$WORK/$name"
  python3 experiments/torch_byol_reference.py --data "$CIFAR_FOLDER" \
    --workdir "$WORK/$name/run" --epochs "$EPOCHS" --precision bfloat16 \
    ${TRAIN_TIMEOUT_S:+--timeout_s "$TRAIN_TIMEOUT_S"} "${tiny[@]}" "$@" || return 1
  python3 experiments/results_table.py --workdir "$WORK/$name/run" > "$WORK/$name/table.txt"
  cp "$WORK/$name/run/metrics/eval.jsonl" "$WORK/$name/run/metrics/train.jsonl" \
    "$WORK/$name/run/config.json" "$WORK/$name/"
}

pids=()
for variant in "$@"; do
  name=${variant%%:*}
  read -r -a overrides <<< "${variant#*:}"
  echo "== $name: ${overrides[*]:-(the preset as it is)}"
  if [[ $name == torch* ]]; then
    run_torch_reference "$name" "${overrides[@]}" > "$WORK/$name.log" 2>&1 &
  else
    SKIP_PEER=1 OUT="$WORK/$name" RUN="$WORK/$name/run" \
      bash experiments/cifar10_gpu.sh "$EPOCHS" "${overrides[@]}" > "$WORK/$name.log" 2>&1 &
  fi
  pids+=($!)
done
failed=0
for i in "${!pids[@]}"; do
  wait "${pids[$i]}" || { failed=$((failed + 1)); echo "${names[$i]} failed:"
                          tail -5 "$WORK/${names[$i]}.log"; }
done

mkdir -p "$WORK/all/metrics"
{
  echo "CIFAR-10 sweep, $EPOCHS epochs, ${#names[@]} runs at once on one device ($(date))"
  for variant in "$@"; do
    name=${variant%%:*}
    eval_file="$WORK/$name/run/metrics/eval.jsonl"
    last=$(tail -n 1 "$eval_file" 2>/dev/null | python3 -c \
      "import json,sys; r=json.loads(sys.stdin.read()); print(f\"{r['knn_top1']:.4f} at epoch {r.get('epoch', float('nan')):.1f}\")" \
      2>/dev/null || echo 'no evaluation')
    printf '%-16s kNN top-1 %s  | %s\n' "$name" "$last" "${variant#*:}"
    [ -f "$eval_file" ] && cp "$eval_file" "$WORK/all/metrics/$name.jsonl"
  done
  for name in "${names[@]}"; do
    echo; echo "== $name"; cat "$WORK/$name/table.txt" 2>/dev/null || echo '(no table)'
  done
} | tee "$OUT/summary.txt"
python3 -m byol_jax.plot --workdir="$WORK/all" --figures=knn --output="$OUT/knn.png" \
  || echo "plot skipped"
for name in "${names[@]}"; do mv "$WORK/$name.log" "$WORK/$name/" 2>/dev/null; done
tar -czf "$OUT/runs.tgz" -C "$WORK" --exclude=run "${names[@]}"
echo "== sweep done in ${SECONDS} s; outputs: $(ls "$OUT" | tr '\n' ' ')"
exit $(( failed > 0 ))
