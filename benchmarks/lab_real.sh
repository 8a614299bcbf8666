#!/usr/bin/env bash
# `longforge lab --base` on SmolLM2-135M-Instruct on the GPU machine, across several calls (each under 10 minutes).
#
# State lives outside the checkout in $LAB_STATE (default ~/lab-real): it survives between calls only while the
# machine stays warm. The lab itself runs detached (setsid), one process per group of arms, so it goes on between
# calls and is never cut at a call's end; each call starts the groups not yet running, waits up to LAB_SECONDS, and
# sends back what is recorded so far as ONE archive, $OUT/lab_real_<F>x.tgz (what comes back from $OUT is a few
# files at most two folders down): each arm's rows.json and failed.json, LongRecipe's impactful profile, training
# logs, the report, results.json and the groups' logs. Unpack it into benchmarks/results/lab_real/<F>x/ (untracked
# files travel with the working tree) and a call on a fresh machine imports it, so finished arms are never rerun.
# Checkpoints are too large to carry: an arm that did not finish resumes from its newest checkpoint only on the
# same warm machine, else starts again.
#
# Per call, in order (each step skipped when its output is already in $LAB_STATE):
#   1. install the carried wheels (.whl/*.whl: gguf, pydantic) into /tmp/site;
#   2. build the corpus from this machine's site-packages (benchmarks/real_corpus.py), its tokens counted by the
#      model's tokenizer, or by a carried copy of it (.smol/tok) while the model is not here yet;
#   3. copy carried GGUF parts (.smol/part.aa, .smol/part.ab: `split -b 50000000 SmolLM2-135M-Instruct.Q4_1.gguf
#      part.`) to $LAB_STATE/parts; with both there, join and convert to a bf16 checkpoint (benchmarks/smollm2.sh);
#   4. import benchmarks/results/lab_real/<F>x/ (results of earlier calls) into the lab folder;
#   5. start each group of $LAB_ARMS ("a,b|c,d": groups separated by "|") that is not running and not finished,
#      group i on GPU i mod (GPUs here), each in its own lab folder ($LAB_DIR.g<i>; the lab brings an arm's
#      dependencies, e.g. LongRecipe's analysis arm, into its group); wait until all are done or LAB_SECONDS pass;
#   6. merge the groups' rows into $LAB_DIR (never overwriting rows it holds), build the report from every arm
#      recorded (--report-only), and pack the archive.
#
# Usage there:  LAB_FACTOR=4 LAB_ARMS="base,yarn-0|prolong|fu,longrecipe" LAB_SECONDS=520 bash benchmarks/lab_real.sh
# and in the next call, at once, the same line: the running groups are left alone and waited for.
# Settings: LAB_FACTOR (4 or 8), LAB_ARMS, LAB_SEEDS (default 0), LAB_TOKENS (per trained arm, default 20000000),
# LAB_SECONDS (how long this call waits; cut to what LAB_CALL_S, the call's limit, default 600, leaves for the report
# and archive), LAB_ESSAYS (a prose haystack; default the corpus's held-out prose),
# LAB_STATE, LAB_DEVICE (cuda; cpu for a check here, groups then all run on the CPU).
set -u
OUT=${OUT:-/tmp/lab-real-out}
STATE=${LAB_STATE:-$HOME/lab-real}
FACTOR=${LAB_FACTOR:-4}
SEEDS=${LAB_SEEDS:-0}
TOKENS=${LAB_TOKENS:-20000000}
DEVICE=${LAB_DEVICE:-cuda}
LAB_DIR=$STATE/lab-${FACTOR}x
RUN=$STATE/run-${FACTOR}x
mkdir -p "$OUT" "$STATE/parts" "$RUN"
LOG=$RUN/calls.log
t0=$(date +%s)
say() { echo "[$(date -u +%H:%M:%S) +$(( $(date +%s) - t0 )) s] $*" | tee -a "$LOG"; }
# Copy the files below folder $1 that the find tests after $2 select into folder $2, never overwriting one it holds.
copy_new() { local from=$1 to=$2; shift 2; mkdir -p "$to"
  (cd "$from" && find . "$@" -type f -print0 | tar cf - --null -T -) | (cd "$to" && tar xf - --skip-old-files); }
# What an arm records that a later call or the report needs (rows, failures, LongRecipe's profile), and its logs.
ROWS=( -path './seed*' \( -name rows.json -o -name failed.json -o -path './seed*/impactful/*' \) )
LOGS=( -path '*/train/*/log.jsonl' )

# Installed once per machine (a reinstall would swap files under processes that import from /tmp/site).
if [ ! -d /tmp/site/pydantic ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=$PWD/src
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site:$PWD/src
export PYTHONUNBUFFERED=1 LONGFORGE_QUIET=1 HF_HUB_OFFLINE=1
[ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a "$LOG"

# 2. The corpus (needs only a tokenizer: the model's, else the carried copy).
MODEL=$(SMOL_STATE=$STATE bash benchmarks/smollm2.sh 2>>"$LOG")
TOK=${MODEL:-}
[ -z "$TOK" ] && [ -f .smol/tok/tokenizer.json ] && TOK=.smol/tok
if [ ! -f "$STATE/corpus/corpus.json" ] && [ -n "$TOK" ]; then
  python3 benchmarks/real_corpus.py --out "$STATE/corpus" --tokenizer "$TOK" 2>&1 | tee -a "$LOG"
  say "corpus built"
fi
pack() {  # the archive of everything small recorded so far, and the calls' log
  [ -f "$STATE/corpus/corpus.json" ] && cp "$STATE/corpus/corpus.json" "$OUT/corpus.json"
  cp "$LOG" "$OUT/lab_real_calls.log"
  [ -d "$LAB_DIR" ] || return 0
  mkdir -p "$LAB_DIR/groups" && cp "$RUN"/g*.log "$LAB_DIR/groups/" 2>/dev/null
  (cd "$LAB_DIR" && find . \( "${ROWS[@]}" -o "${LOGS[@]}" -o -path './report/*' -o -name results.json \
     -o -path './groups/*' \) -type f -print0 | tar czf "$OUT/lab_real_${FACTOR}x.tgz" --null -T -)
  say "results: lab_real_${FACTOR}x.tgz ($(du -h "$OUT/lab_real_${FACTOR}x.tgz" | cut -f1)); unpack into benchmarks/results/lab_real/${FACTOR}x/"
}
if [ -z "$MODEL" ]; then
  say "the model is not here yet: carry .smol/part.aa in this call and .smol/part.ab in the next, back to back"
  pack; exit 0
fi
say "model: $MODEL"

# 4. Results of earlier calls (rows, failures, LongRecipe's profile): never overwrite what this machine holds.
if [ -d "benchmarks/results/lab_real/${FACTOR}x" ]; then
  copy_new "benchmarks/results/lab_real/${FACTOR}x" "$LAB_DIR" "${ROWS[@]}"
  say "imported earlier results from benchmarks/results/lab_real/${FACTOR}x"
fi

# 5. The groups, detached; then wait for them up to LAB_SECONDS.
ESSAYS_ARG=()
[ -n "${LAB_ESSAYS:-}" ] && ESSAYS_ARG=(--essays "$LAB_ESSAYS")
COMMON=(--base "$MODEL" --data "$STATE/corpus" --factor "$FACTOR" --tokens "$TOKENS" --seeds "$SEEDS"
        --device "$DEVICE" "${ESSAYS_ARG[@]}")
NGPU=1
[ "$DEVICE" = cuda ] && NGPU=$(nvidia-smi -L | wc -l)
running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
PIDS=()
if [ -n "${LAB_ARMS:-}" ]; then
  IFS='|' read -r -a GROUPS_ <<< "$LAB_ARMS"
  # The groups share the host's cores (tokenizing, the training loop's host work): no oversubscription.
  export OMP_NUM_THREADS=$(( $(nproc) / ${#GROUPS_[@]} > 1 ? $(nproc) / ${#GROUPS_[@]} : 1 ))
  say "lab: groups $LAB_ARMS on $NGPU GPU(s), seeds $SEEDS, ${FACTOR}x, $TOKENS tokens per trained arm"
  for i in "${!GROUPS_[@]}"; do
    arms=${GROUPS_[$i]}; key=$(echo "$arms" | tr ',' '_'); pidf=$RUN/g-$key.pid
    PIDS+=("$pidf")
    if running "$pidf"; then say "group $arms: still running (pid $(cat "$pidf"))"; continue; fi
    if [ -f "$RUN/g-$key.done" ]; then say "group $arms: finished in an earlier call"; continue; fi
    folder=$LAB_DIR.g$i
    mkdir -p "$folder"
    [ -d "$LAB_DIR" ] && copy_new "$LAB_DIR" "$folder" "${ROWS[@]}"
    gpu=$(( i % NGPU ))
    # setsid: the group outlives this call (its processes are not the call's), until it ends or the machine goes;
    # it records its own pid, and a marker once the lab exits cleanly.
    CUDA_VISIBLE_DEVICES=$gpu LONGFORGE_QUIET=0 setsid bash -c 'echo $$ > "$3"
      python3 -m longforge lab "${@:5}" --out "$1" --arms "$2" 2>&1 | grep --line-buffered -v "Loading weights\|Writing model"
      rc=${PIPESTATUS[0]}; echo "exit $rc"; [ "$rc" -eq 0 ] && touch "$4"' _ \
        "$folder" "$arms" "$pidf" "$RUN/g-$key.done" "${COMMON[@]}" > "$RUN/g$i-$key.log" 2>&1 < /dev/null &
    say "group $arms: started on GPU $gpu (log $RUN/g$i-$key.log)"
  done
  sleep 2
  # Merging, the report and the archive take ~45 s after the wait: the wait ends early enough for them to finish
  # inside the call's limit (LAB_CALL_S, default 600), else the call is cut and nothing comes back.
  wait_s=${LAB_SECONDS:-480}; room=$(( ${LAB_CALL_S:-600} - 75 ))
  [ "$wait_s" -gt "$room" ] && { say "waiting until +$room s, not +$wait_s: the report and archive need the rest"; wait_s=$room; }
  deadline=$(( t0 + wait_s ))
  while [ "$(date +%s)" -lt "$deadline" ]; do
    alive=0; for p in "${PIDS[@]}"; do running "$p" && alive=1; done
    [ $alive -eq 0 ] && break
    sleep 10
  done
  for p in "${PIDS[@]}"; do
    key=$(basename "$p" .pid); state=finished; running "$p" && state=running
    say "$key: $state; last lines: $(tail -n 2 "$RUN"/g*-"${key#g-}".log | tr '\n' ' ' | cut -c1-300)"
  done
fi

# 6. Merge, report, archive.
for folder in "$LAB_DIR".g*; do
  [ -d "$folder" ] || continue
  copy_new "$folder" "$LAB_DIR" "${ROWS[@]}"
  # An arm that failed in an earlier call and has rows now: the imported failure is stale (the report already
  # prefers rows; the archive must not carry both).
  (cd "$folder" && find . -path './seed*' -name rows.json) | while read -r r; do
    d=$(dirname "$r"); [ -f "$folder/$d/failed.json" ] || rm -f "$LAB_DIR/$d/failed.json"; done
  # Training logs grow while a group runs: always the newest.
  (cd "$folder" && find . "${LOGS[@]}" -type f -print0 | tar cf - --null -T -) | (cd "$LAB_DIR" && tar xf -)
done
python3 -m longforge lab "${COMMON[@]}" --out "$LAB_DIR" --report-only 2>&1 | tail -2 | tee -a "$LOG"
pack
