#!/usr/bin/env bash
# Training-engine scaling on a machine of 4 GPUs (issues 5 and 9): run as two calls, `p1` then `p2`.
#   p1: lanes on disjoint GPUs at once: 8B full depth on GPUs 0,1 (FSDP2 + SP2, then DP2), the 2-GPU
#       scaling case and probe; 1-GPU scaling cases and probes on GPU 2 and GPU 3.
#   p2: the GPU tests and the 1- and 2-GPU probes at once, then the 4-GPU scaling cases and probes on all four.
# Results (JSON per lane) and logs go to $OUT (or ./scale-out). NVLink multicast stays off.
set -u
PHASE=${1:?usage: scale_gpu.sh p1|p2}
OUT=${OUT:-scale-out}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
# The GPU tests import longforge from the checkout (the benchmark adds src/ itself).
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD/src
LIMIT=${LANE_SECONDS:-570}
lane() {  # lane NAME DEVICES SUITES...
  local name=$1 devices=$2
  shift 2
  timeout "$LIMIT" python3 benchmarks/train_gpu.py --suite "$@" --devices "$devices" --case-timeout 330 \
    --out "$OUT/$name.json" >"$OUT/$name.log" 2>&1
  echo "lane $name exit $?" >>"$OUT/$name.log"
}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -4 >"$OUT/machine.txt"
python3 -c 'import torch, transformers; print(torch.__version__, transformers.__version__)' >>"$OUT/machine.txt"
case $PHASE in
  p1)
    lane dist2 0,1 dist2 scale2 probe2 &
    lane one_a 2 scale1 probe1b &
    lane one_b 3 probe1a one8b &
    wait ;;
  p2)
    (CUDA_VISIBLE_DEVICES=3 timeout 300 python3 -m pytest -q tests/test_gpu.py >"$OUT/gpu_tests.log" 2>&1; echo "gpu tests exit $?" >>"$OUT/gpu_tests.log") &
    lane one_p 0 probe1b &
    lane two_p 1,2 probe2 &
    wait
    LIMIT=$((LIMIT - SECONDS)) lane four 0,1,2,3 scale4 probe4 ;;
  *) echo "unknown phase $PHASE"; exit 2 ;;
esac
cat "$OUT"/*.log
