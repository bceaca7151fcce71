#!/usr/bin/env bash
# CIFAR-10 reproduction in ONE device call: peer throughput baseline, then the cifar10 recipe,
# then the results table (epochs, wall time, images/s, kNN top-1 per eval point) and the plot
# of kNN top-1 over epochs (made by byol_jax.plot from metrics/eval.jsonl).
#
# Prepare once, here (the GPU host has no registry, no TensorFlow and no ../shared):
#   bash ../shared/bench/fetch_wheels.sh .whl
#   mkdir -p .bench && cp ../shared/bench/peer_byol_pytorch.py \
#       ../shared/datasets/cifar10/cifar10_jpeg_bytes.npz .bench/
# Then, with the device tool: carry [".whl", ".bench"], command:
#   bash experiments/cifar10_gpu.sh 100        # EPOCHS (default 100)
# Further arguments go to the trainer as config overrides (--config.eval_every_steps=485);
# --config=configs/byol.py:cifar10_lightly among them picks that preset instead of cifar10.
# SKIP_PEER=1 skips the peer baseline (when the same device call has already run it);
# TRAIN_TIMEOUT_S stops training gracefully (SIGTERM: the trainer saves and exits) after that
# many seconds, and the table and plot are still made from the eval points reached.
# On a CPU, TINY=1 runs the same steps with a tiny budget and no wheel install
# (tests/experiments_test.py runs it without TensorFlow, as on the GPU host).
#
# Outputs, 8 files in $OUT (default runs/cifar10_gpu), few and small enough to come back from a
# device call: env.log, peer.log, train.log, table.txt (plain and markdown), knn.png and the
# run's eval.jsonl, train.jsonl, config.json. The run itself (checkpoints: hundreds of MB)
# goes to $RUN, by default a fresh folder under /tmp, so a rerun never resumes an old run.
# CIFAR_NPZ: the JPEG copy (default .bench/...); CIFAR_FOLDER: where it is unpacked (reused).
set -euo pipefail
EPOCHS=${1:-100}
shift $(( $# > 0 ? 1 : 0 ))
OUT=${OUT:-$PWD/runs/cifar10_gpu}
mkdir -p "$OUT"
RUN=${RUN:-$(mktemp -d "${TMPDIR:-/tmp}/byol_cifar10_run.XXXXXX")}
if [ "${TINY:-0}" != 1 ] && [ "${BYOL_WHEELS_INSTALLED:-0}" != 1 ] && [ -d .whl ] \
    && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
SRC=${CIFAR_NPZ:-.bench/cifar10_jpeg_bytes.npz}
# TINY=1 checks get a folder of their own: a real run must never train on their subset.
if [ "${TINY:-0}" = 1 ]; then TINY_SUFFIX=_tiny; else TINY_SUFFIX=; fi
DATA=${CIFAR_FOLDER:-/tmp/byol_cifar10$TINY_SUFFIX}
EXTRA=()
CONVERT=()
if [ "${TINY:-0}" = 1 ]; then
  EXTRA=(--config.steps=6 --config.batch_size=16 --config.model.width=0.125
         --config.model.projector_hidden=32 --config.model.predictor_hidden=32
         --config.model.projection_dim=16 --config.eval_every_steps=3 --config.log_every_steps=2
         --config.knn.train_examples=200 --config.knn.k=10)
  CONVERT=(--train_per_class 30 --test_per_class 10)
fi
{
  date
  if [ "${TINY:-0}" != 1 ]; then nvidia-smi || true; fi
  python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
  echo "run folder: $RUN"
} 2>&1 | tee "$OUT/env.log"
if [ -f .bench/peer_byol_pytorch.py ] && python3 -c "import torch, byol_pytorch" 2>/dev/null \
    && [ "${TINY:-0}" != 1 ] && [ "${SKIP_PEER:-0}" != 1 ]; then
  python3 .bench/peer_byol_pytorch.py --arch r18cifar --size 32 --batch 512 2>&1 \
    | tee "$OUT/peer.log" || echo "peer baseline failed; training goes on" | tee -a "$OUT/peer.log"
else
  echo "peer baseline skipped (SKIP_PEER=1, or no torch, byol-pytorch or GPU)" | tee "$OUT/peer.log"
fi
python3 experiments/cifar10_to_folder.py --reuse --src "$SRC" --out "$DATA" "${CONVERT[@]}"
start=$(date +%s)
LIMIT=()
[ -n "${TRAIN_TIMEOUT_S:-}" ] && LIMIT=(timeout -s TERM "$TRAIN_TIMEOUT_S")
# A --config=configs/byol.py:PRESET among the overrides picks another preset (e.g.
# cifar10_lightly); the rest stay overrides of it.
CONFIG=configs/byol.py:cifar10
OVERRIDES=()
for arg in "$@"; do
  case $arg in --config=*) CONFIG=${arg#--config=} ;; *) OVERRIDES+=("$arg") ;; esac
done
"${LIMIT[@]}" python3 -m byol_jax.main --config="$CONFIG" \
  --config.dataset="folder:$DATA" --config.epochs="$EPOCHS" --config.precision=bfloat16 \
  --workdir="$RUN" "${EXTRA[@]}" "${OVERRIDES[@]}" 2>&1 | tee "$OUT/train.log" \
  || echo "training stopped early (status $?; TRAIN_TIMEOUT_S=${TRAIN_TIMEOUT_S:-unset})" \
     | tee -a "$OUT/train.log"
echo "wall time of the training command: $(( $(date +%s) - start )) s" | tee -a "$OUT/train.log"
cp "$RUN/metrics/eval.jsonl" "$RUN/metrics/train.jsonl" "$RUN/config.json" "$OUT/"
{
  python3 experiments/results_table.py --workdir "$RUN"
  echo
  python3 experiments/results_table.py --workdir "$RUN" --markdown
} | tee "$OUT/table.txt"
python3 -m byol_jax.plot --workdir="$RUN" --figures=knn --output="$OUT/knn.png" \
  || echo "plot skipped (no matplotlib): copy $OUT/eval.jsonl to DIR/metrics/, plot DIR there"
