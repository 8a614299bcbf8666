"""Benchmark: the whole data build (read, tokenize, sample, pack, write) against bare `tokenizers` batch encoding of
the same text, in the same run, and the build's peak memory on a corpus larger than 5 GB.

Usage: python benchmarks/data_build.py [--size-gb 5.2] [--subset-mb 256] [--rounds 2] [--threads 0]
                                       [--work /tmp/lf-data-bench] [--record] [--keep]

1. Writes a JSONL corpus of --size-gb under --work: documents are spans of a text pool made of this machine's Python
   standard library (code, docstrings) and generated prose (Zipf-distributed words, numbers, sentences), with
   log-normal lengths (median ~4 KB, long tail to 4 MB), like a web + code + books mix.
2. Trains a 32K-vocab byte-level BPE on a sample of it.
3. Throughput, alternating A/B --rounds times on the first --subset-mb of the corpus: (A) bare
   `Tokenizer.encode_batch_fast` on texts already in memory, batches of 2 MB and of 16 MB (the faster counts);
   (B) `longforge data build` (plan upsample_long, seq_len 65536) in a fresh process, timed by the build itself.
   Each runs in its own process so the tokenizer's thread pool can be sized (RAYON_NUM_THREADS, --threads).
4. Peak memory: the full build on the whole corpus in a fresh process; peak RSS of its process tree polled every
   0.2 s, and the kernel's ru_maxrss for it.
--record appends the results to benchmarks/RESULTS.md. The corpus is deleted unless --keep.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SEQ_LEN = 65536
MIB = 1 << 20


def machine() -> str:
    """CPU model and core count, for the record."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


# ---------------------------------------------------------------- corpus


def _stdlib_text(limit: int) -> str:
    """Up to `limit` characters of the standard library's .py/.txt/.rst files."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    parts, n = [], 0
    for f in sorted(root.rglob("*")):
        if "site-packages" in f.parts or f.suffix not in (".py", ".txt", ".rst") or not f.is_file():
            continue
        try:
            t = f.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        parts.append(t)
        n += len(t)
        if n >= limit:
            break
    return "\n".join(parts)


def _prose(words: list[str], n_chars: int, rng: np.random.Generator) -> str:
    """Zipf-distributed words in sentences and paragraphs, with numbers, about n_chars long."""
    vocab = np.array(words, dtype=object)
    n_words = n_chars // 6
    idx = np.minimum(rng.zipf(1.2, n_words) - 1, len(vocab) - 1)
    toks = vocab[idx]
    nums = rng.random(n_words) < 0.04
    toks[nums] = rng.integers(0, 100000, int(nums.sum())).astype(str)
    out, i = [], 0
    while i < n_words:
        k = int(rng.integers(6, 30))
        sent = " ".join(toks[i : i + k])
        out.append(sent[:1].upper() + sent[1:] + (". " if rng.random() < 0.85 else "? "))
        if rng.random() < 0.12:
            out.append("\n\n")
        i += k
    return "".join(out)


def make_corpus(path: Path, size_bytes: int, seed: int = 0) -> dict[str, float]:
    """Write a JSONL corpus of about size_bytes; returns its document count and size."""
    import re

    rng = np.random.default_rng(seed)
    code = _stdlib_text(60 * MIB)
    words = sorted(set(re.findall(r"[A-Za-z]{2,14}", code)))
    rng.shuffle(words)
    prose = _prose(words[:50000], 60 * MIB, rng)
    pools = [code, prose]
    written = docs = 0
    t0 = time.time()
    with path.open("w", encoding="utf-8") as fh:
        while written < size_bytes:
            pool = pools[int(rng.random() < 0.5)]
            n = int(min(max(rng.lognormal(math.log(4000), 1.6), 200), 4 * MIB))
            start = int(rng.integers(0, max(len(pool) - n, 1)))
            start = pool.rfind("\n", 0, start) + 1
            text = pool[start : start + n]
            if len(text) < n:  # wrap around the pool for the longest documents
                text += pool[: n - len(text)]
            line = json.dumps({"text": text, "id": docs}) + "\n"
            fh.write(line)
            written += len(line)
            docs += 1
    return {"documents": docs, "bytes": path.stat().st_size, "seconds": time.time() - t0}


def head(src: Path, dst: Path, size_bytes: int) -> int:
    """The first size_bytes of a JSONL file (whole lines) into dst; returns its size."""
    with src.open("rb") as fi, dst.open("wb") as fo:
        n = 0
        for line in fi:
            fo.write(line)
            n += len(line)
            if n >= size_bytes:
                break
    return n


def train_tokenizer(corpus: Path, out: Path, sample_bytes: int = 24 * MIB) -> float:
    """A 32K byte-level BPE trained on the head of the corpus; returns seconds."""
    sys.path.insert(0, str(ROOT / "src"))
    from longforge.demo.tokenizer import train_tokenizer as train

    t0 = time.time()
    texts, n = [], 0
    with corpus.open() as fh:
        for line in fh:
            texts.append(json.loads(line)["text"])
            n += len(texts[-1])
            if n >= sample_bytes:
                break
    train(texts, 32000, out, model_max_length=SEQ_LEN)
    return time.time() - t0


# ---------------------------------------------------------------- measurements

BARE = r"""
import json, resource, sys, time
from tokenizers import Tokenizer
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
tok = Tokenizer.from_file(sys.argv[1])
texts = [json.loads(l)["text"] for l in open(sys.argv[2], encoding="utf-8")]
out = {}
for batch_bytes in (2 << 20, 16 << 20):
    batches, cur, n = [], [], 0
    for t in texts:
        cur.append(t); n += len(t)
        if n >= batch_bytes:
            batches.append(cur); cur, n = [], 0
    if cur:
        batches.append(cur)
    t0, c0 = time.perf_counter(), cpu()
    tokens = 0
    for b in batches:
        tokens += sum(len(e) for e in tok.encode_batch_fast(b, add_special_tokens=False))
    out[str(batch_bytes)] = {"tokens": tokens, "seconds": time.perf_counter() - t0, "cpu": cpu() - c0}
print(json.dumps(out))
"""


def _env(threads: int) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "LONGFORGE_QUIET": "1", "TOKENIZERS_PARALLELISM": "true"}
    if threads:
        env["RAYON_NUM_THREADS"] = str(threads)
    return env


def bare(tok: Path, data: Path, threads: int) -> dict[str, float]:
    """Bare batch encoding of the texts of `data` (already in memory), in a fresh process."""
    res = subprocess.run([sys.executable, "-c", BARE, str(tok / "tokenizer.json"), str(data)], env=_env(threads),
                         capture_output=True, text=True, check=True)
    r = json.loads(res.stdout.strip().splitlines()[-1])
    best = max(r.values(), key=lambda x: x["tokens"] / x["seconds"])
    return {"tokens": best["tokens"], "seconds": best["seconds"], "tokens_per_s": best["tokens"] / best["seconds"],
            "tokens_per_cpu_s": best["tokens"] / best["cpu"],
            "per_batch_size": {k: v["tokens"] / v["seconds"] for k, v in r.items()}}


def _tree_rss(p: "psutil.Process") -> int:  # noqa: F821
    import psutil

    total = 0
    for q in [p, *p.children(recursive=True)]:
        try:
            total += q.memory_info().rss
        except psutil.Error:
            pass
    return total


def build(tok: Path, data: Path, out: Path, threads: int) -> dict[str, float]:
    """`longforge data build` on `data` in a fresh process: its own timing, wall time and peak memory."""
    import psutil

    cmd = [sys.executable, "-m", "longforge", "data", "build", "--source", f"{data},name=corpus", "--tokenizer", str(tok),
           "--seq-len", str(SEQ_LEN), "--out", str(out), "--plan", "upsample_long", "--short-threshold", "4096",
           "--short-keep-prob", "0.1", "--shard-sequences", "1024"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=_env(threads), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ps = psutil.Process(proc.pid)
    peak = 0
    while True:
        # Reap only when it has exited, keeping its own rusage (ru_maxrss of this process alone, KiB on Linux).
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            break
        try:
            peak = max(peak, _tree_rss(ps))
        except psutil.Error:
            pass
        time.sleep(0.2)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"build failed: {proc.stderr.read().decode() if proc.stderr else ''}")
    m = json.loads((out / "manifest.json").read_text())
    st = m["sources"]["corpus"]
    maxrss = usage.ru_maxrss * 1024
    return {"tokens": st["tokens_seen"], "tokens_written": st["tokens_written"], "seconds": m["seconds"], "wall": wall,
            "tokens_per_s": st["tokens_seen"] / m["seconds"], "tokens_per_cpu_s": st["tokens_seen"] / m["cpu_seconds"],
            "peak_rss": peak, "ru_maxrss": maxrss,
            "sequences": m["sequences"], "documents": st["documents_seen"]}


# ---------------------------------------------------------------- report


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def record(res: dict, cmd: str) -> str:
    """The RESULTS.md section for this run."""
    r = res["rounds"]
    bare_tps = [x["bare"]["tokens_per_s"] for x in r]
    build_tps = [x["build"]["tokens_per_s"] for x in r]
    ratio = [b / a for a, b in zip(bare_tps, build_tps)]
    full = res.get("full")
    lines = [
        f"## data build vs bare tokenizers ({res['date']})",
        f"- command: `{cmd}`",
        f"- machine: {res['machine']}; tokenizers {res['tokenizers']}; other developers' jobs shared the 2 cores, "
        "so A/B runs alternate and each ratio compares neighbours",
        f"- corpus: {_gb(res['corpus']['bytes'])} JSONL, {res['corpus']['documents']:,} documents (stdlib code + "
        "generated prose, log-normal lengths, median ~4 KB); 32K byte-level BPE trained on its first 24 MB "
        f"({res['tokenizer_seconds']:.0f} s)",
        f"- throughput, on the first {_gb(res['subset_bytes'])} of the corpus ({r[0]['build']['tokens']:,} tokens), "
        f"{len(r)} alternating rounds, all cores (threads: {res['threads'] or os.cpu_count()}); build = `longforge data build` "
        f"(plan upsample_long, seq_len {SEQ_LEN}), timed by the build from start to manifest:",
        "",
        "| round | bare encode_batch_fast (tokens/s) | whole build (tokens/s) | build / bare | bare (tokens/CPU-s) | build (tokens/CPU-s) |",
        "|---|---|---|---|---|---|",
        *(f"| {i + 1} | {a:,.0f} | {b:,.0f} | {c:.1%} | {x['bare']['tokens_per_cpu_s']:,.0f} | {x['build']['tokens_per_cpu_s']:,.0f} |"
          for i, (a, b, c, x) in enumerate(zip(bare_tps, build_tps, ratio, r))),
        f"| mean | {np.mean(bare_tps):,.0f} | {np.mean(build_tps):,.0f} | **{np.mean(ratio):.1%}** (target >= 80%) | "
        f"{np.mean([x['bare']['tokens_per_cpu_s'] for x in r]):,.0f} | {np.mean([x['build']['tokens_per_cpu_s'] for x in r]):,.0f} |",
        "",
        "The build's time and CPU include loading the tokenizer through transformers (about 4 s); the bare encoder's "
        "exclude loading it and parsing the JSON.",
        "",
    ]
    if res.get("single"):
        s = res["single"]
        lines.append(f"- one tokenizer thread (RAYON_NUM_THREADS=1), same subset: bare {s['bare']['tokens_per_s']:,.0f} tokens/s "
                     f"({s['bare']['tokens_per_cpu_s']:,.0f}/CPU-s), build {s['build']['tokens_per_s']:,.0f} tokens/s "
                     f"({s['build']['tokens_per_cpu_s']:,.0f}/CPU-s), build / bare {s['build']['tokens_per_s'] / s['bare']['tokens_per_s']:.1%}; "
                     f"all cores over one thread: bare x{np.mean(bare_tps) / s['bare']['tokens_per_s']:.2f}, "
                     f"build x{np.mean(build_tps) / s['build']['tokens_per_s']:.2f} (below x2 when other jobs hold the cores)")
    if full:
        lines.append(f"- full build on the whole {_gb(res['corpus']['bytes'])}: {full['tokens']:,} tokens read in "
                     f"{full['seconds'] / 60:.1f} min ({full['tokens_per_s']:,.0f} tokens/s), {full['tokens_written']:,} written "
                     f"into {full['sequences']:,} sequences; **peak RSS {full['peak_rss'] / 2**30:.2f} GiB** (process tree, "
                     f"polled every 0.2 s; kernel ru_maxrss of the build process {full['ru_maxrss'] / 2**30:.2f} GiB; target < 2 GB)")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-gb", type=float, default=5.2)
    ap.add_argument("--subset-mb", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="tokenizer threads (RAYON_NUM_THREADS); 0 = all cores")
    ap.add_argument("--single-thread", action="store_true", help="also measure both with one tokenizer thread")
    ap.add_argument("--skip-full", action="store_true", help="no full build (throughput only)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/lf-data-bench"))
    ap.add_argument("--record", action="store_true")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    import tokenizers

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    corpus, subset, tok = work / "corpus.jsonl", work / "subset.jsonl", work / "tokenizer"
    res: dict = {"date": dt.date.today().isoformat(), "machine": machine(), "tokenizers": tokenizers.__version__,
                 "threads": args.threads}
    try:
        if not corpus.is_file() or corpus.stat().st_size < args.size_gb * 1e9 * 0.99:
            print(f"writing a {args.size_gb} GB corpus to {corpus} ...", flush=True)
            res["corpus"] = make_corpus(corpus, int(args.size_gb * 1e9))
        else:
            res["corpus"] = {"bytes": corpus.stat().st_size, "documents": sum(1 for _ in corpus.open("rb"))}
        print(f"corpus: {res['corpus']}", flush=True)
        if not (tok / "tokenizer.json").is_file():
            res["tokenizer_seconds"] = train_tokenizer(corpus, tok)
        else:
            res["tokenizer_seconds"] = 0.0
        res["subset_bytes"] = head(corpus, subset, args.subset_mb * MIB)
        rounds = []
        for i in range(args.rounds):
            a = bare(tok, subset, args.threads)
            print(f"round {i + 1}: bare {a['tokens_per_s']:,.0f} tokens/s {a['per_batch_size']}", flush=True)
            b = build(tok, subset, work / "out-subset", args.threads)
            print(f"round {i + 1}: build {b['tokens_per_s']:,.0f} tokens/s ({b['tokens_per_s'] / a['tokens_per_s']:.1%}), "
                  f"wall {b['wall']:.1f} s, peak {b['peak_rss'] / 2**30:.2f} GiB", flush=True)
            rounds.append({"bare": a, "build": b})
        res["rounds"] = rounds
        if args.single_thread:
            res["single"] = {"bare": bare(tok, subset, 1), "build": build(tok, subset, work / "out-small", 1)}
            print(f"one thread: {res['single']}", flush=True)
        if not args.skip_full:
            shutil.rmtree(work / "out-subset", ignore_errors=True)
            print("full build ...", flush=True)
            res["full"] = build(tok, corpus, work / "out-full", args.threads)
            print(f"full: {res['full']}", flush=True)
        (work / "result.json").write_text(json.dumps(res, indent=1, default=str))
        cmd = "python " + " ".join(["benchmarks/data_build.py", *sys.argv[1:]])
        text = record(res, cmd)
        print(text)
        if args.record:
            with (ROOT / "benchmarks" / "RESULTS.md").open("a") as fh:
                fh.write("\n" + text)
    finally:
        if not args.keep:
            for p in (corpus, subset):
                p.unlink(missing_ok=True)
            for d in ("out-subset", "out-full", "out-small"):
                shutil.rmtree(work / d, ignore_errors=True)


if __name__ == "__main__":
    main()
