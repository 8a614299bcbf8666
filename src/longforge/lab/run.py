"""`longforge lab`: pretrain a small base model, extend it 16x by every method on equal token budgets,
evaluate every arm the same way, and write a table, plots and the papers' claims side by side."""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from longforge.config import DataSpec, EvalSpec, PositionSpec
from longforge.errors import LongforgeError
from longforge.files import claim_dir
from longforge.lab.arms import KEY_ARMS, PROFILES, Arm, LabProfile, arms, schedule, train_length
from longforge.progress import say
from longforge.recipe import parse_recipe
from longforge.runner import discard, old_cache_folder, run_recipe, run_stage
from longforge.stages import Checkpoint, DataStage, EvalStage, RopeStage, RunPlan, fingerprint


def lab_cache(profile: LabProfile) -> Path:
    """Where the corpus, tokenizer, task pool and base model of a profile are kept between runs."""
    from longforge.demo.run import cache_root

    return cache_root() / f"lab-{profile.name}-{fingerprint([asdict(profile.base), profile.pool_docs, profile.factor])}"


def _jsonl_texts(path: Path, keep: Any = None) -> list[str]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r["text"] for r in rows if keep is None or keep(r)]


def write_side_corpora(corpus_dir: Path, out: Path, tokenizer: Any, doc_tokens: int) -> dict[str, Any]:
    """essays.jsonl (docstring prose, RULER's essay haystack) and heldout_long.jsonl (held-out files joined into
    documents of at least `doc_tokens` tokens where the text allows, for perplexity beyond the target)."""
    out.mkdir(parents=True, exist_ok=True)
    essays = _jsonl_texts(corpus_dir / "short.jsonl", lambda r: r.get("kind") == "docstring")
    with (out / "essays.jsonl").open("w") as fh:
        for e in essays:
            fh.write(json.dumps({"text": e}) + "\n")
    docs: list[tuple[str, int]] = []
    cur, n = "", 0
    for text in _jsonl_texts(corpus_dir / "heldout.jsonl"):
        cur = f"{cur}\n\n{text}" if cur else text
        n += len(tokenizer(text, add_special_tokens=False)["input_ids"])
        if n >= doc_tokens:
            docs.append((cur, n))
            cur, n = "", 0
    if cur:
        docs.append((cur, n))  # the remainder serves the shorter lengths
    with (out / "heldout_long.jsonl").open("w") as fh:
        for d, _ in docs:
            fh.write(json.dumps({"text": d}) + "\n")
    return {"essays": len(essays), "heldout_documents": len(docs), "heldout_tokens": [k for _, k in docs]}


def build_lab_assets(profile: LabProfile, cache: Path, device: Any) -> dict[str, Any]:
    """Corpus, tokenizer, side corpora, task pool and the base model, each a cached stage."""
    from longforge.demo.base import pretrain_base
    from longforge.demo.run import _params, corpus_and_tokenizer
    from longforge.hf import load_tokenizer
    from longforge.lab.tasks import TaskDocs, load_pool, save_pool

    b = profile.base
    corpus_dir, tok_dir, tok_rec = corpus_and_tokenizer(cache, b.vocab_size, 2 * profile.target, 0)
    tokenizer = load_tokenizer(tok_dir)
    corpus = np.load(tok_dir / "corpus_ids.npy").astype(np.int64)
    side = cache / "side"
    run_stage("lab/essays and long held-out documents", side, fingerprint(["side", 2 * profile.target, tok_rec["fingerprint"]]),
              lambda: write_side_corpora(corpus_dir, side, tokenizer, 2 * profile.target))
    pool_dir = cache / "pool"

    def do_pool() -> dict[str, Any]:
        docs = TaskDocs(tokenizer, side / "essays.jsonl", max_length=b.window)
        pool = docs.pool(profile.pool_docs, 48, b.window - 8, 0)
        save_pool(pool, pool_dir / "pool.jsonl")
        return {"documents": len(pool), "tokens": sum(len(d.ids) for d in pool)}

    pool_rec = run_stage("lab/task documents for pretraining (RULER formats)", pool_dir,
                         fingerprint(["pool", profile.pool_docs, b.window, tok_rec["fingerprint"]]), do_pool)
    base_dir = cache / "base"

    def do_base() -> dict[str, Any]:
        res = pretrain_base(b, tokenizer, tok_dir, corpus, base_dir, device, 0, load_pool(pool_dir / "pool.jsonl"))
        return {"final": res["final"], "last_loss": res["last_loss"], "tokens": res["tokens"], "params": _params(res["final"])}

    base_rec = run_stage(f"lab/base model ({b.layers} layers, d={b.hidden_size}, window {b.window})", base_dir,
                         fingerprint(["base", asdict(b), tok_rec["fingerprint"], pool_rec["fingerprint"], str(device.type)]),
                         do_base, resumable=True)
    return {"corpus": corpus_dir, "tokenizer": tok_dir, "side": side, "base": Path(base_rec["final"]),
            "base_record": base_rec, "tok_fp": tok_rec["fingerprint"]}


def task_doc_count(profile: LabProfile, max_length: int) -> int:
    """Task documents an extension corpus needs so its 30% share is never short (documents average ~half the maximum)."""
    share = 0.3 * (profile.ext_steps * profile.tokens_per_step + 8 * max_length)
    return max(profile.ext_task_docs, int(share / (0.45 * (64 + max_length)) * 2.5) + 1)


def retrieval_source(profile: LabProfile, assets: dict[str, Any], max_length: int) -> Path:
    """Passkey and RULER-format documents up to `max_length` tokens, for extension corpora (cached)."""
    from longforge.hf import load_tokenizer
    from longforge.lab.tasks import TaskDocs, retrieval_texts

    folder = assets["side"].parent / f"retrieval-{max_length}"
    count = task_doc_count(profile, max_length)

    def do() -> dict[str, Any]:
        tok = load_tokenizer(assets["tokenizer"])
        corpus = np.load(assets["tokenizer"] / "corpus_ids.npy").astype(np.int64)
        docs = TaskDocs(tok, assets["side"] / "essays.jsonl", max_length=max_length)
        n = 0
        with (folder / "retrieval.jsonl").open("w") as fh:
            for text in retrieval_texts(tok, corpus, docs, count, max_length, 0):
                fh.write(json.dumps({"text": text}) + "\n")
                n += 1
        return {"documents": n}

    run_stage(f"lab/retrieval documents up to {max_length} tokens", folder,
              fingerprint(["ret", count, max_length, assets["tok_fp"]]), do)
    return folder / "retrieval.jsonl"


def data_spec(profile: LabProfile, assets: dict[str, Any], arm: Arm, seq: int, profile_json: Path | None) -> dict[str, Any]:
    """The extension corpus of an arm: code repositories, short text and task documents, length-upsampled."""
    steps, batch = schedule(arm, profile)
    c = assets["corpus"]
    spec: dict[str, Any] = {
        "sources": [{"name": "code-repositories", "path": str(c / "long.jsonl"), "domain": "code", "weight": 0.6},
                    {"name": "modules-docstrings", "path": str(c / "short.jsonl"), "domain": "text", "weight": 0.1},
                    {"name": "tasks", "path": str(retrieval_source(profile, assets, seq)), "domain": "tasks", "weight": 0.3}],
        # Fu et al.'s upsampling with "short" = under the base window; at window-length training, under a quarter of it.
        "plan": "upsample_long", "short_threshold": max(64, min(profile.window, seq // 4)), "short_keep_prob": 0.1,
        "separator": "eos",
    }
    if arm.sentences is not None:
        spec["sentence_filter"] = {"method": arm.sentences, "budget_fraction": 0.3, "min_document_tokens": 64,
                                   "sources": ["code-repositories", "modules-docstrings"],
                                   **({"profile": str(profile_json)} if arm.sentences == "profile" else {})}
    return spec


def replay_spec(profile: LabProfile, assets: dict[str, Any]) -> dict[str, Any]:
    """LongRecipe's replay data: the original distribution (code, text, tasks) at the base window, 10% of the tokens."""
    spec = data_spec(profile, assets, Arm("replay", "replay", None, length="window"), profile.window, None)
    spec["token_budget"] = int(profile.replay_fraction * profile.ext_steps * profile.tokens_per_step) + 8 * profile.window
    return {**spec, "seq_len": profile.window}


def arm_recipe(profile: LabProfile, assets: dict[str, Any], arm: Arm, seed: int, device: str, data_dir: Path,
               profile_json: Path | None) -> dict[str, Any]:
    """The longforge recipe of one trained arm (its data folder built by the lab, shared where arms agree)."""
    steps, batch = schedule(arm, profile)
    seq = train_length(arm, profile)
    stages: list[dict[str, Any]] = [{
        "name": "extend", "steps": steps, "batch_size": batch, "lr": profile.ext_lr, "warmup_steps": profile.ext_warmup,
        "schedule": "cosine", "document_mask": arm.document_mask, "save_every": max(steps // 2, 1), "data": str(data_dir)}]
    if "replay" in arm.after:
        rbatch = max(profile.tokens_per_step // profile.window, 1)
        rsteps = max(round(profile.replay_fraction * profile.ext_steps), 1)
        stages.append({"name": "replay", "steps": rsteps, "batch_size": rbatch, "lr": profile.ext_lr / 10,
                       "schedule": "constant", "document_mask": True, "save_every": rsteps,
                       "data": str(data_dir.parent / "replay")})
    if "merge" in arm.after:
        stages.append({"name": "merge", "kind": "merge", "merge": {"other": "base", "weights": [0.5, 0.5]}})
    return {"name": f"lab-{arm.name}", "description": arm.label, "seed": seed, "device": device,
            "model": {"path": str(assets["base"])}, "target_length": profile.target,
            "data": {**data_spec(profile, assets, arm, seq, profile_json), "seq_len": seq},
            "positions": {**(arm.rope or {}), "transform": arm.transform}, "stages": stages, "eval": {"models": []}}


def eval_spec(profile: LabProfile, assets: dict[str, Any], seed: int) -> EvalSpec:
    """The one evaluation every row gets: passkey grid to 2x the target, RULER's synthetic tasks, perplexity curve."""
    from longforge.eval.ruler import SYNTHETIC

    w, t = profile.window, profile.target
    ppl, n = [], max(w // 4, 64)
    while n <= 2 * t:
        ppl.append(n)
        n *= 2
    return EvalSpec.model_validate({
        "passkey": {"num_lengths": profile.passkey_lengths, "min_length": max(w // 4, 64), "max_length": 2 * t,
                    "depths": profile.passkey_depths, "trials": profile.passkey_trials, "batch_size": 16},
        "ruler": {"tasks": list(profile.ruler_tasks or SYNTHETIC), "lengths": list(profile.ruler_lengths),
                  "samples": profile.ruler_samples, "essays": str(assets["side"] / "essays.jsonl"), "batch_size": 16,
                  "max_new_tokens": profile.ruler_max_new_tokens},
        "ppl": {"source": str(assets["side"] / "heldout_long.jsonl"), "lengths": ppl, "num_docs": profile.ppl_docs},
        "models": [], "seed": 1234 + seed})


def impactful_profile(profile: LabProfile, assets: dict[str, Any], extended: Path, out: Path, device: Any) -> Path:
    """LongRecipe's analysis: base vs the NTK full-length arm on held-out text at the target length."""
    from longforge.analyze.impactful import analyze, write_profile
    from longforge.hf import load_model, load_tokenizer

    def do() -> dict[str, Any]:
        tok = load_tokenizer(extended)
        texts = _jsonl_texts(assets["corpus"] / "heldout.jsonl")[: profile.analysis_texts]
        prof = analyze(load_model(assets["base"], device), load_model(extended, device), tok, texts, profile.target, top=0.2)
        paths = write_profile(prof, out)
        return {"selected": prof.selected, "rows": prof.rows[:8], "json": str(paths["json"])}

    rec = run_stage("lab/impactful-token analysis (base vs NTK full-length)", out,
                    fingerprint(["impactful", str(extended), profile.analysis_texts, profile.target]), do)
    return Path(rec["json"])


def zero_shot_model(profile: LabProfile, assets: dict[str, Any], arm: Arm, out: Path) -> Path:
    """The base model with the arm's RoPE scaling written into its config, untrained."""
    if arm.rope is None:
        return Path(assets["base"])
    stage = RopeStage(PositionSpec.model_validate(arm.rope), Checkpoint(Path(assets["base"])), out)
    plan = RunPlan(target_length=profile.target, original_length=profile.window)
    run_stage(f"lab/{arm.name}: rope", out, fingerprint([arm.rope, str(assets["base"]), profile.target]),
              lambda: {"method": stage.run(plan)["method"]})
    return out


def evaluate_row(profile: LabProfile, assets: dict[str, Any], model: Path, out: Path, seed: int, device: Any,
                 label: str, model_fp: str) -> dict[str, Any]:
    """Evaluate one model (cached by the model's fingerprint and the evaluation's settings)."""
    spec = eval_spec(profile, assets, seed)
    stage = EvalStage(spec, Checkpoint(Path(model)), label, out)
    plan = RunPlan(original_length=profile.window, target_length=profile.target, device=device.type)
    run_stage(f"lab/eval {label}", out, fingerprint([spec.model_dump(mode="json"), model_fp]),
              lambda: {"summary": stage.run(plan)["seconds"]})
    return json.loads((out / "summary.json").read_text())


def run_arm(profile: LabProfile, assets: dict[str, Any], arm: Arm, seed: int, seed_dir: Path, device: Any,
            profile_json: Path | None) -> list[dict[str, Any]]:
    """Train (or not) one arm and evaluate each of its models; one result row per model."""
    arm_dir = seed_dir / arm.name
    rows: list[dict[str, Any]] = []
    if not arm.train:
        model = zero_shot_model(profile, assets, arm, arm_dir / "model")
        mfp = fingerprint([str(assets["base"]), assets["base_record"]["fingerprint"], arm.rope])
        ev = evaluate_row(profile, assets, model, arm_dir / "eval", seed, device, arm.name, mfp)
        return [{"row": arm.name, "arm": arm.name, "label": arm.label, "seed": seed, "tokens": 0, "train_seconds": 0.0,
                 "eval_seconds": ev["seconds"], "eval": ev}]
    seq = train_length(arm, profile)
    data_key = f"{arm.length}-{arm.sentences or 'all'}"
    recipe = arm_recipe(profile, assets, arm, seed, device.type, seed_dir / "data" / data_key, profile_json)
    data_dir = seed_dir / "data" / data_key

    def do_data() -> dict[str, Any]:
        plan = RunPlan(tokenizer=assets["tokenizer"], seq_len=seq, seed=seed)
        return DataStage(parse_recipe(recipe, arm.name).data, data_dir).run(plan)

    run_stage(f"lab/data {data_key} (sequences of {seq})", data_dir,
              fingerprint([recipe["data"], seed, assets["tok_fp"]]), do_data, resumable=True)
    if "replay" in arm.after:
        rspec = replay_spec(profile, assets)

        def do_replay() -> dict[str, Any]:
            spec = DataSpec.model_validate({k: v for k, v in rspec.items() if k != "seq_len"})
            plan = RunPlan(tokenizer=assets["tokenizer"], seq_len=profile.window, seed=seed)
            return DataStage(spec, seed_dir / "data" / "replay").run(plan)

        run_stage(f"lab/replay data (sequences of {profile.window})", seed_dir / "data" / "replay",
                  fingerprint([rspec, seed, assets["tok_fp"]]), do_replay, resumable=True)
    run_recipe(parse_recipe(recipe, arm.name), arm_dir)
    tokens, seconds = 0, 0.0
    done_names: list[str] = []
    for st in recipe["stages"]:
        done_names.append(st["name"])
        done = json.loads((arm_dir / "train" / st["name"] / "DONE.json").read_text())
        tokens += int(done.get("tokens", 0))
        seconds += float(done["seconds"])
        name = "+".join([arm.name] + done_names[1:])
        label = ", then ".join([arm.label] + done_names[1:])
        ev = evaluate_row(profile, assets, Path(done["final"]), arm_dir / f"eval-{st['name']}", seed, device, name,
                          done["fingerprint"])
        rows.append({"row": name, "arm": arm.name, "label": label, "seed": seed, "tokens": tokens,
                     "train_seconds": round(seconds, 1), "eval_seconds": ev["seconds"], "eval": ev})
    return rows


def select_arms(profile: LabProfile, names: list[str] | None) -> list[Arm]:
    """The arms asked for (all when None), in run order; LongRecipe brings the NTK arm its analysis needs."""
    every = arms(profile)
    if names is None:
        return every
    known = {a.name for a in every}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise LongforgeError(f"unknown lab arm {unknown[0]!r}; choose from {', '.join(a.name for a in every)}.")
    want = set(names) | ({"ntk"} if "longrecipe" in names else set())
    return [a for a in every if a.name in want]


def old_lab_folder(folder: Path) -> bool:
    """A lab folder written by a longforge that did not mark its folders: results, report and seed folders only."""
    names = [p.name for p in folder.iterdir() if not p.name.startswith(".")]
    seeds = [n for n in names if re.fullmatch(r"seed\d+", n)]
    return set(names) - set(seeds) <= {"results.json", "report"} and bool(seeds or "results.json" in names)


def run_lab(out: Path, device: str = "auto", profile_name: str = "auto", seeds: list[int] | None = None,
            arm_names: list[str] | None = None, second_seed_arms: str = "key", fresh: bool = False) -> dict[str, Any]:
    """Run the lab into `out`: every arm for the first seed, the key arms (or all) for the others; then the report."""
    from longforge.hf import resolve_device
    from longforge.lab.report import write_lab_report

    t0 = time.time()
    dev = resolve_device(device)
    profile = PROFILES[profile_name if profile_name != "auto" else ("cuda" if dev.type == "cuda" else "cpu")]
    seeds = seeds or [0, 1]
    out = Path(out)
    cache = lab_cache(profile)
    if fresh:  # only folders longforge created (or recognises as an earlier lab's) are deleted
        discard(cache, "lab cache", ours=old_cache_folder)
        discard(out, "lab folder", ours=old_lab_folder)
    claim_dir(cache, "lab cache", ours=old_cache_folder)
    claim_dir(out, "lab folder", ours=old_lab_folder)
    say(f"[bold]longforge lab[/] ({profile.name} profile): base window {profile.window} -> {profile.target} tokens, "
        f"{profile.ext_steps} steps x {profile.tokens_per_step} tokens per arm; seeds {seeds}; cache {cache}")
    assets = build_lab_assets(profile, cache, dev)
    rows: list[dict[str, Any]] = []
    for i, seed in enumerate(seeds):
        names = arm_names
        if i > 0 and second_seed_arms == "key":
            names = [n for n in (arm_names or KEY_ARMS) if n in KEY_ARMS or n == "base"]
        seed_dir = out / f"seed{seed}"
        profile_json = None
        for arm in select_arms(profile, names):
            if arm.sentences == "profile":
                profile_json = impactful_profile(profile, assets, seed_dir / "ntk" / "train" / "extend" / "final",
                                                 seed_dir / "impactful", dev)
            rows += run_arm(profile, assets, arm, seed, seed_dir, dev, profile_json)
            (out / "results.json").write_text(json.dumps(_results(profile, assets, rows, t0), indent=1))
    results = _results(profile, assets, rows, t0)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    report = write_lab_report(results, out / "report")
    say(f"lab finished in {(time.time() - t0) / 60:.1f} min; report: {report['md']}")
    return {"results": str(out / "results.json"), **{k: str(v) for k, v in report.items()}}


def _results(profile: LabProfile, assets: dict[str, Any], rows: list[dict[str, Any]], t0: float) -> dict[str, Any]:
    base = assets["base_record"]
    return {"profile": asdict(profile), "window": profile.window, "target": profile.target,
            "base": {"params": base.get("params"), "tokens": base.get("tokens"), "seconds": base.get("seconds"),
                     "last_loss": base.get("last_loss")},
            "rows": rows, "seconds": round(time.time() - t0, 1)}
