"""`longforge demo`: build a corpus, a tokenizer and a short-window base model locally, then extend it 8x."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from longforge.demo.base import BaseSettings, pretrain_base
from longforge.demo.corpus import build_corpus
from longforge.demo.retrieval import RetrievalDocs
from longforge.demo.tokenizer import train_tokenizer
from longforge.errors import LongforgeError
from longforge.eval.passkey import FILLER, NEEDLE, QUESTION
from longforge.files import atomic_write_text, claim_dir
from longforge.hf import load_tokenizer, resolve_device
from longforge.progress import say
from longforge.recipe import parse_recipe, parse_yaml
from longforge.report.build import build_report, collect, passkey_bands
from longforge.runner import discard, old_cache_folder, old_run_folder, run_recipe, run_stage
from longforge.stages import fingerprint


@dataclass(frozen=True)
class DemoProfile:
    """Everything the demo builds and trains, sized for one kind of machine."""

    name: str
    base: BaseSettings
    target_length: int
    ext_steps: int
    ext_batch: int
    ext_lr: float
    ext_warmup: int
    retrieval_docs: int
    passkey_lengths: int
    passkey_depths: int
    passkey_trials: int
    ppl_docs: int


# Sizes chosen by measurement (benchmarks/RESULTS.md): retrieval inside the window emerges within the
# base budget on 2 CPU cores, and 100 YaRN steps at 8x the window recover it everywhere.
PROFILES = {
    "cpu": DemoProfile(
        name="cpu",
        base=BaseSettings(vocab_size=2048, hidden_size=128, layers=4, heads=8, window=256, rope_theta=10000.0,
                          steps=450, micro_batch=16, lr=3e-3, warmup_steps=50, retrieval_share=0.7,
                          curriculum_steps=300, answer_weight=10.0),
        target_length=2048, ext_steps=100, ext_batch=2, ext_lr=3e-4, ext_warmup=10, retrieval_docs=400,
        passkey_lengths=10, passkey_depths=5, passkey_trials=4, ppl_docs=8,
    ),
    "cuda": DemoProfile(
        name="cuda",
        base=BaseSettings(vocab_size=4096, hidden_size=256, layers=6, heads=8, window=512, rope_theta=10000.0,
                          steps=1200, micro_batch=32, lr=2e-3, warmup_steps=100, retrieval_share=0.7,
                          curriculum_steps=700, answer_weight=10.0),
        target_length=4096, ext_steps=150, ext_batch=4, ext_lr=3e-4, ext_warmup=15, retrieval_docs=800,
        passkey_lengths=12, passkey_depths=10, passkey_trials=5, ppl_docs=8,
    ),
}


def cache_root() -> Path:
    """Where the demo keeps what it builds once (LONGFORGE_CACHE, else ~/.cache/longforge)."""
    return Path(os.environ.get("LONGFORGE_CACHE", Path.home() / ".cache" / "longforge")).expanduser()


def _jsonl_texts(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]


def _retrieval_lines(n: int, seed: int) -> list[str]:
    """Passkey-style text for the tokenizer's training set, so its words get tokens of their own."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        k = int(rng.integers(10000, 100000))
        out.append(" ".join(FILLER * 2) + " " + NEEDLE.format(key=k) + " " + " ".join(FILLER) + " " + QUESTION + f" {k}.")
    return out


def corpus_and_tokenizer(cache: Path, vocab_size: int, max_length: int, seed: int) -> tuple[Path, Path, dict[str, Any]]:
    """The standard-library corpus and a byte-level BPE trained on it, each built once (stage markers in the cache)."""
    corpus_dir, tok_dir = cache / "corpus", cache / "tokenizer"

    def do_corpus() -> dict[str, Any]:
        return build_corpus(corpus_dir)

    run_stage("corpus (standard library source)", corpus_dir, fingerprint(["corpus", 1]), do_corpus)

    def do_tokenizer() -> dict[str, Any]:
        texts = _jsonl_texts(corpus_dir / "long.jsonl") + _jsonl_texts(corpus_dir / "short.jsonl")
        tok = train_tokenizer(texts + _retrieval_lines(300, seed), vocab_size, tok_dir, max_length)
        enc = tok.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
        ids = np.concatenate([np.asarray(e.ids + [tok.eos_token_id], dtype=np.uint16) for e in enc])
        np.save(tok_dir / "corpus_ids.npy", ids)
        return {"vocab_size": len(tok), "corpus_tokens": int(len(ids)), "documents": len(texts)}

    tok_rec = run_stage("tokenizer (byte-level BPE)", tok_dir, fingerprint(["tok", vocab_size, seed, 1]), do_tokenizer)
    return corpus_dir, tok_dir, tok_rec


def build_assets(profile: DemoProfile, cache: Path, device: Any, seed: int) -> dict[str, Path]:
    """Corpus, tokenizer and base model, each built once and reused (stage markers in the cache)."""
    base_dir = cache / "base"
    b = profile.base
    corpus_dir, tok_dir, tok_rec = corpus_and_tokenizer(cache, b.vocab_size, profile.target_length, seed)
    tokenizer = load_tokenizer(tok_dir)
    corpus = np.load(tok_dir / "corpus_ids.npy").astype(np.int64)

    def do_base() -> dict[str, Any]:
        res = pretrain_base(b, tokenizer, tok_dir, corpus, base_dir, device, seed)
        return {"final": res["final"], "last_loss": res["last_loss"], "tokens": res["tokens"], "params": _params(res["final"])}

    base_rec = run_stage(f"demo/base model ({b.layers} layers, d={b.hidden_size}, window {b.window})", base_dir,
                         fingerprint(["base", asdict(b), tok_rec["fingerprint"], str(device.type), seed]), do_base,
                         resumable=True)

    retrieval = corpus_dir / "retrieval.jsonl"

    def do_retrieval() -> dict[str, Any]:
        rng = np.random.default_rng(seed + 1)
        docs = RetrievalDocs(tokenizer, corpus)
        with retrieval.open("w") as fh:
            for i in range(profile.retrieval_docs):
                n = int(rng.integers(64, profile.target_length - 8))
                fh.write(json.dumps({"text": docs.text(n, rng, "noise" if i % 2 == 0 else "text")}) + "\n")
        return {"documents": profile.retrieval_docs}

    run_stage("demo/retrieval documents", cache / "retrieval", fingerprint(["ret", profile.retrieval_docs,
              profile.target_length, tok_rec["fingerprint"], seed]), do_retrieval)
    return {"corpus": corpus_dir, "tokenizer": tok_dir, "base": Path(base_rec["final"]), "retrieval": retrieval,
            "base_seconds": base_rec["seconds"]}


def _params(path: Path) -> int:
    """Parameter count of a safetensors checkpoint."""
    from safetensors import safe_open

    n = 0
    for f in Path(path).glob("*.safetensors"):
        with safe_open(str(f), "pt") as fh:
            n += sum(int(np.prod(fh.get_slice(k).get_shape())) for k in fh.keys())
    return n


def demo_recipe(profile: DemoProfile, assets: dict[str, Path], device: str, seed: int) -> dict[str, Any]:
    """The demo preset (recipes/demo.yaml), its paths pointed at the built assets and its sizes at the profile."""
    from longforge.recipes import preset_text

    r = parse_yaml(preset_text("demo"), "preset demo")
    b, t = profile.base, profile.target_length
    r.update(name=f"demo-{profile.name}", seed=seed, device=device, target_length=t)
    r["model"]["path"] = str(assets["base"])
    sources = {"stdlib-repositories": assets["corpus"] / "long.jsonl",
               "stdlib-modules-docstrings": assets["corpus"] / "short.jsonl", "retrieval": assets["retrieval"]}
    for src in r["data"]["sources"]:
        src["path"] = str(sources[src["name"]])
    r["data"]["short_threshold"] = b.window
    r["data"]["token_budget"] = profile.ext_steps * profile.ext_batch * t + 8 * t
    r["stages"][0].update(steps=profile.ext_steps, batch_size=profile.ext_batch, lr=profile.ext_lr,
                          warmup_steps=profile.ext_warmup, save_every=max(profile.ext_steps // 4, 1))
    r["eval"]["passkey"] = {"num_lengths": profile.passkey_lengths, "depths": profile.passkey_depths,
                            "trials": profile.passkey_trials}
    r["eval"]["ppl"] = {"source": str(assets["corpus"] / "heldout.jsonl"), "num_docs": profile.ppl_docs}
    return r


def demo_checks(run_dir: Path, window: int) -> list[dict[str, Any]]:
    """The demo's targets, measured on this run: base retrieves inside its window and fails far beyond; extended retrieves everywhere."""
    info = collect(run_dir)
    base = passkey_bands(info["evals"]["base"]["passkey"], window)
    final = passkey_bands(info["evals"]["final"]["passkey"], window)
    checks = [
        ("base model, passkey inside its window", base["inside"], ">=", 0.9),
        ("base model, passkey at 4x-8x its window", base["4x-8x"], "<=", 0.3),
        ("extended model, passkey over the whole grid", final["all"], ">=", 0.9),
    ]
    out = []
    for name, value, op, bound in checks:
        ok = value is not None and (value >= bound if op == ">=" else value <= bound)
        out.append({"check": name, "value": value, "target": f"{op} {bound:.0%}", "pass": ok})
    return out


def run_demo(out: Path, device: str = "auto", fresh: bool = False, seed: int = 0, model: Path | None = None,
             data: Path | None = None) -> dict[str, Any]:
    """Build (or reuse) the demo assets and run the demo recipe into `out`; with `model`, the demo on that checkpoint
    and the corpus `data` (demo/model.py)."""
    if model is not None:
        from longforge.demo.model import run_model_demo

        return run_model_demo(out, model, data, device=device, fresh=fresh, seed=seed)
    if data is not None:
        raise LongforgeError("--data is for --model (the built-in demo trains on its own corpus); add --model PATH or "
                             "leave --data out.")
    t0 = time.time()
    dev = resolve_device(device)
    profile = PROFILES["cuda" if dev.type == "cuda" else "cpu"]
    cache = cache_root() / f"demo-{profile.name}-{fingerprint(asdict(profile))}"
    out = Path(out)
    if fresh:  # only folders longforge created (or recognises as an earlier demo's) are deleted
        discard(cache, "demo cache", ours=old_cache_folder)
        discard(out, "demo run folder", ours=old_run_folder)
    claim_dir(cache, "demo cache", ours=old_cache_folder)
    say(f"[bold]longforge demo[/] ({profile.name} profile): base window {profile.base.window} -> {profile.target_length} tokens; cache {cache}")
    assets = build_assets(profile, cache, dev, seed)
    recipe_dict = demo_recipe(profile, assets, dev.type, seed)
    claim_dir(out, "demo run folder", ours=old_run_folder)
    return run_and_check(recipe_dict, out, lambda: demo_checks(out, profile.base.window), t0)


def run_and_check(recipe_dict: dict[str, Any], out: Path, checks_of: Callable[[], list[dict[str, Any]]],
                  t0: float) -> dict[str, Any]:
    """Run a demo's recipe into `out`, then its checks: written, added to the report, and said PASS/MISS."""
    import yaml

    atomic_write_text(out / "demo.yaml", yaml.safe_dump(recipe_dict, sort_keys=False))
    result = run_recipe(parse_recipe(recipe_dict, "demo recipe"), out)
    checks = checks_of()
    total = time.time() - t0
    atomic_write_text(out / "demo_checks.json", json.dumps({"checks": checks, "seconds": round(total, 1)}, indent=1))
    build_report(out)  # again, now that the checks exist: the report's verdict lists them
    for c in checks:
        mark = "[green]PASS[/]" if c["pass"] else "[red]MISS[/]"
        val = "-" if c["value"] is None else f"{c['value']:.0%}"
        say(f"{mark} {c['check']}: {val} (target {c['target']})")
    say(f"demo finished in {total / 60:.1f} min; recipe: {out / 'demo.yaml'}")
    return {**result, "checks": checks, "seconds": total}
