#!/usr/bin/env bash
# Training-engine scaling (issues 5 and 9), one call of the device tool per phase.
#   p1: lanes on disjoint GPUs of a 4-GPU machine at once: 8B full depth on GPUs 0,1 (FSDP2 + SP2, then DP2),
#       the 2-GPU scaling case and probe; 1-GPU scaling cases and probes on GPU 2 and GPU 3.
#   p2: the GPU tests and the 1- and 2-GPU probes at once, then the 4-GPU scaling cases and probes on all four.
#   x8a (8 GPUs): lanes at once: 1 GPU (0), 2 GPUs (1,2), 4 GPUs (4-7, then two 2-GPU lanes there), and on GPU 3
#       the GPU tests, the attention split benchmark and a 1-GPU case; then the 8-GPU cases on all eight.
#   x8b (8 GPUs): the full-depth 8B step at 4M tokens on all eight (one layer run, the others as ballast).
#   x8c (8 GPUs): a ballast step against a real 32-layer step at 1M tokens, same settings.
#   h1 (1 GPU): the same check at 128K and 256K tokens.
# Each lane writes JSON and a log; all of them end up in $OUT/<phase>.tgz (the device tool returns few files),
# and the logs are printed. NVLink multicast stays off.
set -u
PHASE=${1:?usage: scale_gpu.sh p1|p2|x8a|x8b|x8c|h1|h1r}
OUT=${OUT:-scale-out}
RAW=$(mktemp -d)
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
# The GPU tests import longforge from the checkout (the benchmark adds src/ itself).
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD/src
LIMIT=${LANE_SECONDS:-570}
lane() {  # lane NAME DEVICES SUITES... (stopped after $LIMIT seconds)
  local name=$1 devices=$2
  shift 2
  timeout "$LIMIT" python3 benchmarks/train_gpu.py --suite "$@" --devices "$devices" --case-timeout $((LIMIT - 10)) \
    --out "$RAW/$name.json" >"$RAW/$name.log" 2>&1
  echo "lane $name exit $?" >>"$RAW/$name.log"
}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >"$RAW/machine.txt"
free -g | head -2 >>"$RAW/machine.txt"
python3 -c 'import torch, transformers; print(torch.__version__, transformers.__version__)' >>"$RAW/machine.txt"
case $PHASE in
  p1)
    lane dist2 0,1 dist2 scale2 probe2 &
    lane one_a 2 scale1 probe1b &
    lane one_b 3 probe1a one8b &
    wait ;;
  p2)
    (CUDA_VISIBLE_DEVICES=3 timeout 300 python3 -m pytest -q tests/test_gpu.py >"$RAW/gpu_tests.log" 2>&1; echo "gpu tests exit $?" >>"$RAW/gpu_tests.log") &
    lane one_p 0 probe1b &
    lane two_p 1,2 probe2 &
    wait
    LIMIT=$((LIMIT - SECONDS)) lane four 0,1,2,3 scale4 probe4 ;;
  x8a)
    LIMIT=${LANE_SECONDS:-340}
    lane one 0 s8_one &
    lane two 1,2 s8_two &
    (lane four 4,5,6,7 s8_four; LIMIT=$((LIMIT - SECONDS)); lane two_a 4,5 s8_two_a & lane two_b 6,7 s8_two_b & wait) &
    (export CUDA_VISIBLE_DEVICES=3
     timeout 150 python3 -m pytest -q tests/test_gpu.py >"$RAW/gpu_tests.log" 2>&1; echo "gpu tests exit $?" >>"$RAW/gpu_tests.log"
     timeout 150 python3 benchmarks/attention_gpu.py --split --out "$RAW/split.json" >"$RAW/split.log" 2>&1
     echo "split exit $?" >>"$RAW/split.log"
     LIMIT=$((LIMIT - SECONDS)); lane small 3 s8_small) &
    wait
    LIMIT=$((560 - SECONDS)) lane eight 0,1,2,3,4,5,6,7 s8_eight ;;
  x8b)
    LIMIT=${LANE_SECONDS:-575} lane full8 0,1,2,3,4,5,6,7 full8 ;;
  x8c)
    LIMIT=${LANE_SECONDS:-585} lane check8 0,1,2,3,4,5,6,7 check8 ;;
  h1)
    LIMIT=${LANE_SECONDS:-585} lane check1 0 check1 ;;
  h1r)  # the real steps of h1 again, with the optimizer's moments made before the step
    LIMIT=${LANE_SECONDS:-585} lane check1r 0 check1r ;;
  *) echo "unknown phase $PHASE"; exit 2 ;;
esac
tar czf "$OUT/$PHASE.tgz" -C "$RAW" .
tail -n 40 "$RAW"/*.log
