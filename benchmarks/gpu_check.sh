#!/usr/bin/env bash
# The GPU check of issue 14, one script, on a machine with an NVIDIA GPU (target: < 8 min):
#   1. installs what it needs (a venv with this project, tensorflow[and-cuda], onnxruntime-gpu);
#   2. trains vgg6 for two epochs on the GPU (stampbatch train);
#   3. scores 2 M simulated stamps end to end through ONNX Runtime's CUDA provider
#      (stampbatch score, whole process), sampling GPU utilisation with nvidia-smi;
#   4. checks the probabilities against the CPU path (ONNX Runtime CPU provider);
#   5. scores occlusion maps for every row of a small file on the GPU;
# and prints stamps/s, occlusion maps/s and GPU utilisation.
#
#   bash benchmarks/gpu_check.sh [--cpu-dry-run] [--stamps N] [--train N] [--maps N] [--workdir DIR]
#
# --cpu-dry-run runs every step without a GPU (no install, the current python, no
# nvidia-smi, the CPU provider) so that the script is tested on CPU machines
# (tests/test_gpu_check.py, with tiny sizes).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DRY=0
STAMPS=2000000
TRAIN=100000
MAPS=20000
WORK="${TMPDIR:-/tmp}/stampbatch-gpu-check"
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-dry-run) DRY=1 ;;
    --stamps) STAMPS="$2"; shift ;;
    --train) TRAIN="$2"; shift ;;
    --maps) MAPS="$2"; shift ;;
    --workdir) WORK="$2"; shift ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$WORK"
T0=$(date +%s)
step() { echo "== $(( $(date +%s) - T0 )) s: $*"; }
export TF_CPP_MIN_LOG_LEVEL=2 TF_ENABLE_ONEDNN_OPTS=1

if [ "$DRY" = 1 ]; then
  PY="${PYTHON:-python3}"
  step "CPU dry run: no install, $PY, sizes $STAMPS stamps / $TRAIN training / $MAPS maps"
else
  command -v nvidia-smi >/dev/null || { echo "gpu_check.sh: no nvidia-smi: not a GPU machine" >&2; exit 1; }
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  step "installing into $WORK/venv"
  python3 -m venv "$WORK/venv"
  PY="$WORK/venv/bin/python"
  "$PY" -m pip install -q --upgrade pip
  # onnxruntime (CPU) and onnxruntime-gpu must not both be installed: the project's
  # dependency is swapped for the GPU build after installing the project.
  "$PY" -m pip install -q -e "$REPO" "tensorflow[and-cuda]"
  "$PY" -m pip uninstall -q -y onnxruntime
  "$PY" -m pip install -q "onnxruntime-gpu[cuda,cudnn]"
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
SB=("$PY" -m stampbatch)

step "simulating $TRAIN training stamps, $STAMPS candidates, $MAPS occlusion candidates"
"${SB[@]}" simulate "$WORK/train.h5" --n "$TRAIN" --seed 1 --quiet --overwrite
"${SB[@]}" simulate "$WORK/cand.h5" --n "$STAMPS" --seed 2 --candidates --quiet --overwrite
"${SB[@]}" simulate "$WORK/occ.h5" --n "$MAPS" --seed 3 --candidates --quiet --overwrite

step "training vgg6, 2 epochs"
rm -rf "$WORK/vgg6"
"$PY" - "$WORK" <<'EOF'
import sys
import tensorflow as tf
print("TensorFlow GPUs:", [d.name for d in tf.config.list_physical_devices("GPU")] or "none")
EOF
"${SB[@]}" train --data "$WORK/train.h5" --arch vgg6 --out "$WORK/vgg6" --epochs 2 \
  --batch-size "$(( TRAIN >= 20000 ? 1024 : 64 ))" --patience 0 --quiet
ls "$WORK/vgg6"/model.*.onnx >/dev/null   # the training-time export: scoring will not export

UTIL="$WORK/util.csv"
rm -f "$UTIL"
SMI=""
if [ "$DRY" = 0 ]; then
  nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits -lms 200 > "$UTIL" &
  SMI=$!
fi
step "scoring $STAMPS stamps end to end (whole process)"
rm -rf "$WORK/out"
S0=$(date +%s.%N)
"${SB[@]}" score "$WORK/cand.h5" --model "$WORK/vgg6" --out "$WORK/out" --backend onnx --quiet
S1=$(date +%s.%N)
step "occlusion maps for $MAPS stamps"
rm -rf "$WORK/occ-out"
O0=$(date +%s.%N)
"${SB[@]}" score "$WORK/occ.h5" --model "$WORK/vgg6" --out "$WORK/occ-out" --backend onnx \
  --occlusion all --quiet
O1=$(date +%s.%N)
if [ -n "$SMI" ]; then kill "$SMI"; wait "$SMI" 2>/dev/null || true; fi

step "checking probabilities against the CPU path"
"$PY" "$REPO/benchmarks/gpu_check.py" compare "$WORK/vgg6" "$WORK/cand.h5" \
  "$WORK/out/cand.scores.h5" --n "$(( STAMPS < 100000 ? STAMPS : 100000 ))" \
  $( [ "$DRY" = 1 ] && echo --cpu-dry-run )
"$PY" - "$STAMPS" "$S0" "$S1" "$MAPS" "$O0" "$O1" <<'EOF'
import sys
n, s0, s1, m, o0, o1 = (float(v) for v in sys.argv[1:])
print(f"end to end: {n:,.0f} stamps in {s1 - s0:.1f} s = {n / (s1 - s0):,.0f} stamps/s "
      "(whole process, first use of the freshly trained model)")
print(f"occlusion: {m:,.0f} maps in {o1 - o0:.1f} s = {m / (o1 - o0):,.0f} maps/s (whole process)")
EOF
"$PY" "$REPO/benchmarks/gpu_check.py" util "$UTIL"
step "done"
