#!/usr/bin/env bash
# `longforge lab` on the GPU machine, in slices that fit its 10-minute command limit: every stage is cached
# under .labcache/ and .labrun/ (git-ignored, kept while the machine stays warm), so running this again resumes.
# Usage there: LAB_SECONDS=540 bash benchmarks/lab_gpu.sh   (results packed into $OUT/lab.tgz, log in $OUT/lab.log)
set -u
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD/src
else
  export PYTHONPATH=$PWD/src
fi
export PYTHONUNBUFFERED=1 LONGFORGE_CACHE=$PWD/.labcache LONGFORGE_QUIET=1
OUT=${OUT:-/tmp/lab-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a "$OUT/lab.log"
timeout "${LAB_SECONDS:-540}" python3 -m longforge lab --device cuda --out .labrun --seeds "${LAB_SEEDS:-0,1}" \
  ${LAB_ARGS:-} 2>&1 | grep --line-buffered -v "Loading weights\|Writing model" | tee -a "$OUT/lab.log"
echo "lab exit: ${PIPESTATUS[0]}" | tee -a "$OUT/lab.log"
# Small outputs only: the report, results, every evaluation summary and training log.
find .labrun .labcache -maxdepth 6 \( -name 'summary.json' -o -name 'results.json' -o -name 'DONE.json' \
  -o -name 'metrics.jsonl' -o -name 'profile.json' -o -path '*/report/*' \) -print0 2>/dev/null \
  | tar czf "$OUT/lab.tgz" --null -T -
ls -la "$OUT"
