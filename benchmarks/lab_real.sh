#!/usr/bin/env bash
# `longforge lab --base` on SmolLM2-135M-Instruct on the GPU machine, one slice per call (each under 9 minutes).
#
# State lives outside the checkout in $LAB_STATE (default ~/lab-real): it survives between calls only while the
# machine stays warm. Everything small that a later call needs (each arm's rows.json, failed.json, LongRecipe's
# impactful profile, the report) comes back under $OUT/lab_real/; put it back into the checkout as
# benchmarks/results/lab_real/ (untracked files travel with the working tree) and a call on a fresh machine
# imports it, so finished arms are never rerun. Trained checkpoints are too large to carry: an arm that did not
# finish in one call resumes from its newest checkpoint only on the same warm machine, else starts again.
#
# Per call, what it does, in order (each step skipped when its output is already in $LAB_STATE):
#   1. install the carried wheels (.whl/*.whl: gguf, pydantic) into /tmp/site;
#   2. copy carried GGUF parts (.smol/part.aa, .smol/part.ab: `split -b 50000000 SmolLM2-135M-Instruct.Q4_1.gguf
#      part.`) to $LAB_STATE/parts; with both there, join and convert to a bf16 checkpoint (REALMODEL.md);
#   3. build the corpus from this machine's site-packages (benchmarks/real_corpus.py, tokens counted by SmolLM2);
#   4. import benchmarks/results/lab_real/<F>x/ (results of earlier calls) into the lab folder;
#   5. `longforge lab --base ... --arms $LAB_ARMS` under `timeout $LAB_SECONDS`, then the report from every arm
#      recorded (--report-only), and the small results into $OUT/lab_real/<F>x/.
#
# Usage there:  LAB_FACTOR=4 LAB_ARMS=base,pi-0 LAB_SECONDS=480 bash benchmarks/lab_real.sh
# On a machine with several GPUs, groups of arms separated by "|" run at once, group i on GPU i, each in its own lab
# folder ($LAB_DIR.gpu<i>; the lab brings an arm's dependencies, e.g. LongRecipe's analysis arm, into its group):
#               LAB_ARMS="base,yarn-0,ultralong|prolong,fu" bash benchmarks/lab_real.sh
# Their rows are then merged into $LAB_DIR (never overwriting rows it holds) and the report is built from all.
# Settings: LAB_FACTOR (4 or 8), LAB_ARMS (comma-separated), LAB_SEEDS (default 0), LAB_TOKENS (per trained arm,
# default 20000000), LAB_SECONDS (the lab's share of the call), LAB_ESSAYS (a prose haystack; default the corpus's
# held-out prose), LAB_STATE.
set -u
OUT=${OUT:-/tmp/lab-real-out}
STATE=${LAB_STATE:-$HOME/lab-real}
FACTOR=${LAB_FACTOR:-4}
SEEDS=${LAB_SEEDS:-0}
TOKENS=${LAB_TOKENS:-20000000}
LAB_DIR=$STATE/lab-${FACTOR}x
MODEL=$STATE/smollm2-135m
mkdir -p "$OUT/lab_real" "$STATE/parts"
LOG=$OUT/lab_real/call.log
t0=$(date +%s)
say() { echo "[$(( $(date +%s) - t0 )) s] $*" | tee -a "$LOG"; }
# Copy the files below folder $1 that the find tests after $2 select into folder $2, never overwriting one it holds.
copy_new() { local from=$1 to=$2; shift 2; mkdir -p "$to"
  (cd "$from" && find . "$@" -type f -print0 | tar cf - --null -T -) | (cd "$to" && tar xf - --skip-old-files); }
# What an arm records that a later call or the report needs (rows, failures, LongRecipe's profile), and its logs.
ROWS=( -path './seed*' \( -name rows.json -o -name failed.json -o -path './seed*/impactful/*' \) )
LOGS=( -path '*/train/*/log.jsonl' )

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD/src
else
  export PYTHONPATH=$PWD/src
fi
export PYTHONUNBUFFERED=1 LONGFORGE_QUIET=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a "$LOG"

# 2. The model (benchmarks/smollm2.sh: parts carried in two calls, joined and converted once).
MODEL=$(SMOL_STATE=$STATE bash benchmarks/smollm2.sh 2>>"$LOG")
if [ -z "$MODEL" ]; then
  say "the model is not here yet: carry .smol/part.aa in this call and .smol/part.ab in the next, back to back"
  exit 0
fi
say "model: $MODEL"

# 3. The corpus.
if [ ! -f "$STATE/corpus/corpus.json" ]; then
  python3 benchmarks/real_corpus.py --out "$STATE/corpus" --tokenizer "$MODEL" 2>&1 | tee -a "$LOG"
  say "corpus built"
fi
cp "$STATE/corpus/corpus.json" "$OUT/lab_real/corpus.json"

# 4. Results of earlier calls (rows, failures, LongRecipe's profile): never overwrite what this machine holds.
if [ -d "benchmarks/results/lab_real/${FACTOR}x" ]; then
  copy_new "benchmarks/results/lab_real/${FACTOR}x" "$LAB_DIR" -path './seed*'
  say "imported earlier results from benchmarks/results/lab_real/${FACTOR}x"
fi

# 5. The slice, then the report from everything recorded.
ESSAYS_ARG=()
[ -n "${LAB_ESSAYS:-}" ] && ESSAYS_ARG=(--essays "$LAB_ESSAYS")
COMMON=(--base "$MODEL" --data "$STATE/corpus" --factor "$FACTOR" --tokens "$TOKENS" --seeds "$SEEDS"
        --device "${LAB_DEVICE:-cuda}" "${ESSAYS_ARG[@]}")
lab_slice() {  # arms, lab folder, log prefix: one `longforge lab` under the time limit
  timeout "${LAB_SECONDS:-480}" python3 -m longforge lab "${COMMON[@]}" --out "$2" --arms "$1" 2>&1 \
    | grep --line-buffered -v "Loading weights\|Writing model" | sed -u "s/^/$3/" | tee -a "$LOG"
  say "${3}lab exit: ${PIPESTATUS[0]} (124: cut by LAB_SECONDS; the next call on this warm machine resumes)"
}
if [ -n "${LAB_ARMS:-}" ]; then
  IFS='|' read -r -a GROUPS_ <<< "$LAB_ARMS"
  say "lab: arms $LAB_ARMS, seeds $SEEDS, ${FACTOR}x, $TOKENS tokens per trained arm"
  if [ "${#GROUPS_[@]}" -eq 1 ]; then
    lab_slice "${GROUPS_[0]}" "$LAB_DIR" ""
  else
    for i in "${!GROUPS_[@]}"; do
      mkdir -p "$LAB_DIR.gpu$i"
      [ -d "$LAB_DIR" ] && copy_new "$LAB_DIR" "$LAB_DIR.gpu$i" "${ROWS[@]}"
      CUDA_VISIBLE_DEVICES=$i lab_slice "${GROUPS_[$i]}" "$LAB_DIR.gpu$i" "[gpu$i] " &
    done
    wait
    for i in "${!GROUPS_[@]}"; do copy_new "$LAB_DIR.gpu$i" "$LAB_DIR" \( "${ROWS[@]}" -o "${LOGS[@]}" \); done
    say "merged the groups' rows into $LAB_DIR"
  fi
fi
python3 -m longforge lab "${COMMON[@]}" --out "$LAB_DIR" --report-only 2>&1 | tail -2 | tee -a "$LOG"
DEST=$OUT/lab_real/${FACTOR}x
copy_new "$LAB_DIR" "$DEST" \( "${ROWS[@]}" -o "${LOGS[@]}" -o -path './report/*' -o -name results.json \)
say "results in $DEST"
du -sh "$DEST" | tee -a "$LOG"
