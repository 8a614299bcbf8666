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
from longforge.files import atomic_write_json, claim_dir, read_json
from longforge.lab.given import join_long
from longforge.lab.arms import (
    BASE_PROFILES,
    PROFILES,
    Arm,
    LabProfile,
    arm_list,
    for_base,
    key_arms,
    schedule,
    train_length,
    with_tokens,
)
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
    docs = join_long(_jsonl_texts(corpus_dir / "heldout.jsonl"), tokenizer, doc_tokens)  # remainder kept for shorter lengths
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


def mix_sources(assets: dict[str, Any], code_name: str, prose_name: str, prefix: str) -> list[dict[str, Any]]:
    """A given base's two domains as data sources, weighted by the lab's mix: the corpus folder's `<prefix>code.jsonl`
    and `<prefix>prose.jsonl` (prefix "heldout_" for the held-out packages)."""
    c, p = assets["corpus"], assets["prose_share"]
    return [{"name": code_name, "path": str(c / f"{prefix}code.jsonl"), "domain": "code", "weight": round(1 - p, 3)},
            {"name": prose_name, "path": str(c / f"{prefix}prose.jsonl"), "domain": "prose", "weight": p}]


def corpus_sources(profile: LabProfile, assets: dict[str, Any], arm: Arm, seq: int) -> list[dict[str, Any]]:
    """The extension corpus's sources: the lab's own (code repositories, short text, task documents), or for a given
    base the corpus folder's code repositories (60%) and prose (40%), long and short roles for ProLong's mix."""
    c = assets["corpus"]
    if profile.pretrained:
        roles = arm.data.get("plan") == "long_short_mix"
        code, prose = mix_sources(assets, "code-repositories", "prose", "")
        return [{**code, **({"role": "long"} if roles else {})}, {**prose, **({"role": "short"} if roles else {})}]
    return [{"name": "code-repositories", "path": str(c / "long.jsonl"), "domain": "code", "weight": 0.6},
            {"name": "modules-docstrings", "path": str(c / "short.jsonl"), "domain": "text", "weight": 0.1},
            {"name": "tasks", "path": str(retrieval_source(profile, assets, seq)), "domain": "tasks",
             "weight": profile.task_share}]


def data_spec(profile: LabProfile, assets: dict[str, Any], arm: Arm, seq: int, profile_json: Path | None) -> dict[str, Any]:
    """The extension corpus of an arm: code repositories, short text and task documents, length-upsampled."""
    sources = corpus_sources(profile, assets, arm, seq)
    spec: dict[str, Any] = {
        "sources": sources,
        # Fu et al.'s upsampling with "short" = under the base window; at window-length training, under a quarter of it.
        "plan": "upsample_long", "short_threshold": max(64, min(profile.window, seq // 4)), "short_keep_prob": 0.1,
        "separator": "eos", **arm.data,
    }
    if profile.pretrained:  # the same tokens for every arm: a real corpus holds far more than one arm trains on
        spec["token_budget"] = profile.tokens + 8 * seq
        if spec["plan"] == "long_short_mix":  # ProLong's short share is the prose; no more than the corpus gives
            spec["long_share"] = max(spec.get("long_share", DataSpec.model_fields["long_share"].default),
                                     round(1 - assets["prose_share"], 3))
    if arm.sentences is not None:
        spec["sentence_filter"] = {"method": arm.sentences, "budget_fraction": 0.3, "min_document_tokens": 64,
                                   "sources": [s["name"] for s in sources[:2]],
                                   **({"profile": str(profile_json)} if arm.sentences == "profile" else {})}
    return spec


def replay_spec(profile: LabProfile, assets: dict[str, Any]) -> dict[str, Any]:
    """LongRecipe's replay data: the original distribution (code, text, tasks) at the base window, 10% of the tokens."""
    spec = data_spec(profile, assets, Arm("replay", "replay", None, length="window"), profile.window, None)
    spec["token_budget"] = int(profile.replay_fraction * profile.ext_steps * profile.tokens_per_step) + 8 * profile.window
    spec.pop("sentence_filter", None)
    return {**spec, "seq_len": profile.window}


def validation_data(profile: LabProfile, assets: dict[str, Any], folder: Path) -> Path | None:
    """Held-out code and prose (the training mix) packed at the target length, on which every trained arm's loss is
    measured as it trains (the budget curve); None when the profile asks for none."""
    if not profile.val_tokens:
        return None
    spec = DataSpec.model_validate({"sources": mix_sources(assets, "heldout-code", "heldout-prose", "heldout_"),
                                    "plan": "none", "token_budget": profile.val_tokens, "separator": "eos"})

    def do() -> dict[str, Any]:
        return DataStage(spec, folder).run(RunPlan(tokenizer=assets["tokenizer"], seq_len=profile.target, seed=0))

    run_stage(f"lab/validation data ({profile.val_tokens:,} held-out tokens at {profile.target})", folder,
              fingerprint([spec.model_dump(mode="json"), profile.target, assets["tok_fp"]]), do)
    return folder


def arm_recipe(profile: LabProfile, assets: dict[str, Any], arm: Arm, seed: int, device: str, data_dir: Path,
               profile_json: Path | None) -> dict[str, Any]:
    """The longforge recipe of one trained arm (its data folder built by the lab, shared where arms agree)."""
    steps, batch = schedule(arm, profile)
    seq = train_length(arm, profile)
    stages: list[dict[str, Any]] = [{
        "name": "extend", "steps": steps, "batch_size": batch, "lr": profile.ext_lr, "warmup_steps": profile.ext_warmup,
        "schedule": arm.schedule, "document_mask": arm.document_mask, "save_every": max(steps // profile.checkpoints, 1),
        # Attention is most of a long step: keeping its outputs spares backward a second attention forward (the same
        # numbers; tokens x hidden x 2 bytes per layer, 9 GiB for the 135M model's 262K tokens per step).
        "checkpoint_policy": "save_attention", "data": str(data_dir)}]
    if assets.get("val") is not None:  # the loss on held-out text every eighth of the budget (one global batch's tokens each)
        stages[0].update(val_data=str(assets["val"]), val_every=max(steps // profile.checkpoints, 1),
                         val_batches=max(1, round(profile.val_tokens / profile.tokens_per_step)))
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


def doubling(lo: int, hi: int) -> list[int]:
    """lo, 2 lo, 4 lo, ... up to hi."""
    out, n = [], lo
    while n <= hi:
        out.append(n)
        n *= 2
    return out


def base_eval_specs(profile: LabProfile, assets: dict[str, Any], seed: int) -> tuple[EvalSpec, EvalSpec]:
    """For a given base: passkey from an eighth of the window to 2x the target, RULER (self-contained and essay
    tasks) from half the window to the target, perplexity on held-out code from a quarter of the window to 2x the
    target; and a second spec for perplexity on held-out prose. The lengths at or under the window measure
    retention (RULER at w/2, perplexity at w/4, passkey up to w: 4K, 2K and 8K for an 8K model)."""
    w, t = profile.window, profile.target
    ppl = doubling(max(w // 4, 16), 2 * t)
    main = EvalSpec.model_validate({
        "passkey": {"lengths": doubling(max(w // 8, 128), 2 * t), "depths": profile.passkey_depths,
                    "trials": profile.passkey_trials, "batch_size": 16},
        "ruler": {"tasks": list(profile.ruler_tasks) if profile.ruler_tasks else None,
                  "lengths": doubling(max(w // 2, 64), t), "samples": profile.ruler_samples,
                  "essays": str(assets["essays"]), "batch_size": 16, "max_new_tokens": profile.ruler_max_new_tokens},
        "ppl": {"source": str(assets["ppl_code"]), "lengths": ppl, "num_docs": profile.ppl_docs},
        "models": [], "seed": 1234 + seed})
    prose = EvalSpec.model_validate({"passkey": None, "ppl": {"source": str(assets["ppl_prose"]), "lengths": ppl,
                                                              "num_docs": profile.ppl_docs}, "models": [], "seed": 1234 + seed})
    return main, prose


def eval_spec(profile: LabProfile, assets: dict[str, Any], seed: int) -> EvalSpec:
    """The one evaluation every row gets: passkey grid to 2x the target, RULER's synthetic tasks, perplexity curve."""
    from longforge.eval.ruler import SYNTHETIC

    if profile.pretrained:
        return base_eval_specs(profile, assets, seed)[0]
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
        texts = _jsonl_texts(assets.get("heldout_texts") or assets["corpus"] / "heldout.jsonl")[: profile.analysis_texts]
        prof = analyze(load_model(assets["base"], device), load_model(extended, device), tok, texts, profile.target, top=0.2)
        paths = write_profile(prof, out)
        return {"selected": prof.selected, "rows": prof.rows[:8], "json": str(paths["json"])}

    # Keyed by the analysed checkpoint's place in the seed folder, not its absolute path, and the profile found beside
    # the record: a later call on another machine (another lab folder) uses the carried profile as it is.
    where = extended.relative_to(out.parent).as_posix() if extended.is_relative_to(out.parent) else str(extended)
    rec = run_stage(f"lab/impactful-token analysis (base vs {extended.parents[2].name} full-length)", out,
                    fingerprint(["impactful", where, profile.analysis_texts, profile.target]), do)
    return out / Path(rec["json"]).name


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
    run_stage(f"lab/eval {label}", out, fingerprint([spec.settings(), model_fp]),
              lambda: {"summary": stage.run(plan)["seconds"]})
    summary = json.loads((out / "summary.json").read_text())
    if profile.pretrained:  # the second domain's perplexity, by the same evaluation stage into its own folder
        prose = base_eval_specs(profile, assets, seed)[1]
        pout = out.parent / f"{out.name}-prose"
        pstage = EvalStage(prose, Checkpoint(Path(model)), label, pout)
        run_stage(f"lab/eval {label} (perplexity on prose)", pout, fingerprint([prose.settings(), model_fp]),
                  lambda: {"summary": pstage.run(plan)["seconds"]})
        extra = json.loads((pout / "summary.json").read_text())
        summary["ppl_prose"] = extra.get("ppl", {})
        summary["seconds"] = summary.get("seconds", 0) + extra.get("seconds", 0)
    return summary


ROWS = "rows.json"  # an arm's result rows with the fingerprint of what made them: small, carried between machines
FAILED = "failed.json"  # why an arm did not finish (the report lists it)


def arm_fingerprint(profile: LabProfile, assets: dict[str, Any], arm: Arm, seed: int) -> str:
    """What an arm's rows depend on: the arm, the profile, the base and corpus, the seed and the evaluation."""
    specs = base_eval_specs(profile, assets, seed) if profile.pretrained else (eval_spec(profile, assets, seed),)
    text = json.dumps([s.settings() for s in specs], sort_keys=True)
    # Files the lab derives are named by their place, not their folder, so rows carried to a lab folder elsewhere
    # still match (their content is covered by the base's and the corpus's fingerprints).
    for key in ("side", "corpus"):
        text = text.replace(str(assets[key]), f"<{key}>")
    # Validation only reads: rows recorded before it existed (or with another val_tokens) stay valid.
    settings = {k: v for k, v in asdict(profile).items() if k != "val_tokens"}
    return fingerprint([asdict(arm), settings, assets["base_record"]["fingerprint"], seed, text])


def recorded_rows(arm_dir: Path, fp: str) -> list[dict[str, Any]] | None:
    """The rows an earlier call recorded for this arm with the same inputs (here or carried from another machine)."""
    rec = read_json(arm_dir / ROWS)
    return rec["rows"] if isinstance(rec, dict) and rec.get("fingerprint") == fp else None


def arm_leftovers(folder: Path) -> bool:
    """An arm folder holding only what the lab writes there (rows, a failure, stage folders, a run's entries)."""
    from longforge.runner import RUN_ENTRIES

    names = [p.name for p in folder.iterdir() if not p.name.startswith(".")]
    return all(n in {ROWS, FAILED, "model"} | RUN_ENTRIES or n.startswith("eval-") for n in names)


def run_arm(profile: LabProfile, assets: dict[str, Any], arm: Arm, seed: int, seed_dir: Path, device: Any,
            profile_json: Path | None) -> list[dict[str, Any]]:
    """Train (or not) one arm and evaluate each of its models; one result row per model (recorded in rows.json)."""
    arm_dir = seed_dir / arm.name
    fp = arm_fingerprint(profile, assets, arm, seed)
    done = recorded_rows(arm_dir, fp)
    if done is not None:
        say(f"[green]✓[/] lab/{arm.name} (seed {seed}) [dim](rows recorded earlier, skipped)[/]")
        return done
    # Adopt the arm's folder when it holds only what the lab writes (rows or a failure carried from another call).
    claim_dir(arm_dir, f"lab arm {arm.name}'s folder", ours=arm_leftovers)
    rows = _run_arm(profile, assets, arm, seed, seed_dir, device, profile_json)
    atomic_write_json(arm_dir / ROWS, {"fingerprint": fp, "rows": rows})
    (arm_dir / FAILED).unlink(missing_ok=True)
    return rows


def _run_arm(profile: LabProfile, assets: dict[str, Any], arm: Arm, seed: int, seed_dir: Path, device: Any,
             profile_json: Path | None) -> list[dict[str, Any]]:
    """run_arm's work: rope or data and training, then each model's evaluation."""
    arm_dir = seed_dir / arm.name
    rows: list[dict[str, Any]] = []
    if not arm.train:
        model = zero_shot_model(profile, assets, arm, arm_dir / "model")
        mfp = fingerprint([str(assets["base"]), assets["base_record"]["fingerprint"], arm.rope])
        ev = evaluate_row(profile, assets, model, arm_dir / "eval", seed, device, arm.name, mfp)
        return [{"row": arm.name, "arm": arm.name, "label": arm.label, "seed": seed, "tokens": 0, "train_seconds": 0.0,
                 "eval_seconds": ev["seconds"], "eval": ev}]
    seq = train_length(arm, profile)
    data_key = f"{arm.length}-{arm.sentences or 'all'}" + (f"-{fingerprint(arm.data)[:8]}" if arm.data else "")
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
                     "train_seconds": round(seconds, 1), "eval_seconds": ev["seconds"], "eval": ev,
                     **({"val_curve": val_curve(arm_dir / "train" / st["name"] / "log.jsonl")} if st.get("val_data") else {})})
    return rows


def val_curve(log: Path) -> list[list[float]]:
    """[training tokens so far, held-out loss] at every validation a stage's step log recorded."""
    out, tokens = [], 0
    for line in log.read_text().splitlines():
        rec = json.loads(line)
        tokens += int(rec.get("tokens", 0))
        if "val_loss" in rec:
            out.append([tokens, float(rec["val_loss"])])
    return out


def select_arms(profile: LabProfile, names: list[str] | None) -> list[Arm]:
    """The arms asked for (all when None), in run order; LongRecipe brings the arm its analysis needs."""
    every = arm_list(profile)
    if names is None:
        return every
    known = {a.name for a in every}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise LongforgeError(f"unknown lab arm {unknown[0]!r}; choose from {', '.join(a.name for a in every)}.")
    want = set(names) | {a.analysis for a in every if a.name in names and a.sentences == "profile"}
    return [a for a in every if a.name in want]


def planned_arms(profile: LabProfile, seeds: list[int], arm_names: list[str] | None, second_seed_arms: str) -> dict[int, list[Arm]]:
    """Per seed, the arms a run asks for: every arm for the first seed, the key arms (or all) for the others."""
    out = {}
    for i, seed in enumerate(seeds):
        names = arm_names
        if i > 0 and second_seed_arms == "key":
            keys = key_arms(profile)
            names = [n for n in (arm_names or keys) if n in keys or n == "base"]
        out[seed] = select_arms(profile, names)
    return out


def old_lab_folder(folder: Path) -> bool:
    """A lab folder written by a longforge that did not mark its folders: results, report and seed folders only."""
    names = [p.name for p in folder.iterdir() if not p.name.startswith(".")]
    seeds = [n for n in names if re.fullmatch(r"seed\d+", n)]
    return set(names) - set(seeds) <= {"results.json", "report"} and bool(seeds or "results.json" in names)


def resolve_profile(profile_name: str, dev: Any, base: Path | None, factor: int | None, tokens: int | None) -> tuple[LabProfile, dict[str, Any] | None]:
    """The lab's profile: a self-pretrained one, or for --base one fitted to the checkpoint (window, RoPE base)."""
    from longforge.lab.given import check_base

    name = profile_name if profile_name != "auto" else ("cuda" if dev.type == "cuda" else ("tiny" if base else "cpu"))
    if base is None:
        if factor is not None:
            raise LongforgeError("--factor is for --base (the self-pretrained lab extends its base 16x); leave it out.")
        return with_tokens(PROFILES[name], tokens), None
    if name not in BASE_PROFILES:
        raise LongforgeError(f"--profile {name!r} has no --base variant; choose one of {', '.join(BASE_PROFILES)}.")
    info = check_base(base)
    if factor is not None and factor < 2:
        raise LongforgeError(f"--factor {factor} must be at least 2 (4 extends an 8K model to 32K, 8 to 64K).")
    return for_base(BASE_PROFILES[name], info["window"], info["rope_theta"], factor or 4, tokens), info


def run_lab(out: Path, device: str = "auto", profile_name: str = "auto", seeds: list[int] | None = None,
            arm_names: list[str] | None = None, second_seed_arms: str = "key", fresh: bool = False,
            base: Path | None = None, data: Path | None = None, essays: Path | None = None, factor: int | None = None,
            tokens: int | None = None, report_only: bool = False) -> dict[str, Any]:
    """Run the lab into `out`: every arm for the first seed, the key arms (or all) for the others; then the report.

    With `base`, the arms start from that checkpoint (its window from its config, extended `factor` times) and train
    on the corpus folder `data`; `report_only` builds the report from the arms already recorded in `out`.
    """
    from longforge.hf import resolve_device
    from longforge.lab.given import base_assets, check_corpus, check_essays
    from longforge.lab.report import write_lab_report

    t0 = time.time()
    dev = resolve_device(device)
    if base is None and (data is not None or essays is not None):
        raise LongforgeError("--data and --essays are for --base (the self-pretrained lab builds its own corpus); "
                             "add --base PATH or leave them out.")
    profile, info = resolve_profile(profile_name, dev, Path(base) if base else None, factor, tokens)
    if base is not None:
        data = check_corpus(data)
        check_essays(essays)
    seeds = seeds or [0, 1]
    out = Path(out)
    plan = planned_arms(profile, seeds, arm_names, second_seed_arms)
    if fresh:  # only folders longforge created (or recognises as an earlier lab's) are deleted
        if base is None:
            discard(lab_cache(profile), "lab cache", ours=old_cache_folder)
        discard(out, "lab folder", ours=old_lab_folder)
    claim_dir(out, "lab folder", ours=old_lab_folder)
    if base is None:
        cache = lab_cache(profile)
        claim_dir(cache, "lab cache", ours=old_cache_folder)
        where = f"cache {cache}"
    else:
        where = f"base {base} ({info['model_type'] if info else ''})"
    say(f"[bold]longforge lab[/] ({profile.name} profile): base window {profile.window} -> {profile.target} tokens, "
        f"{profile.ext_steps} steps x {profile.tokens_per_step} tokens per arm; seeds {seeds}; {where}")
    if base is None:
        assets = build_lab_assets(profile, lab_cache(profile), dev)
    else:
        assert data is not None
        assets = base_assets(Path(base), data, essays, out / "assets", profile.target, profile.tokens)
        assets["val"] = validation_data(profile, assets, out / "assets" / f"val-{profile.target}")
    rows: list[dict[str, Any]] = []
    if not report_only:
        check_evaluation(profile, assets, seeds[0])
        for seed, chosen in plan.items():
            rows += run_seed(profile, assets, chosen, seed, out / f"seed{seed}", dev)
            (out / "results.json").write_text(json.dumps(_results(profile, assets, rows, t0), indent=1))
    every = planned_arms(profile, seeds, None, second_seed_arms)
    rows, missing = gather_rows(profile, assets, every, out)
    results = {**_results(profile, assets, rows, t0), "not_run": missing}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    report = write_lab_report(results, out / "report")
    say(f"lab finished in {(time.time() - t0) / 60:.1f} min; report: {report['md']}")
    return {"results": str(out / "results.json"), **{k: str(v) for k, v in report.items()}}


def check_evaluation(profile: LabProfile, assets: dict[str, Any], seed: int) -> None:
    """The evaluation's inputs and shortest prompts, checked once before any arm (a problem there would fail every arm)."""
    from longforge.eval.run import check_inputs, check_prompts
    from longforge.hf import load_tokenizer

    tok = load_tokenizer(assets["tokenizer"])
    for spec in base_eval_specs(profile, assets, seed) if profile.pretrained else (eval_spec(profile, assets, seed),):
        check_inputs(spec)
        check_prompts(spec, tok, profile.window, profile.target)


def run_seed(profile: LabProfile, assets: dict[str, Any], chosen: list[Arm], seed: int, seed_dir: Path,
             dev: Any) -> list[dict[str, Any]]:
    """The chosen arms of one seed, in order; an arm that fails is recorded with its reason and the others go on."""
    import torch

    rows: list[dict[str, Any]] = []
    analyses = {a.analysis for a in arm_list(profile) if a.sentences == "profile"}
    profile_json = None
    for arm in chosen:
        try:
            if arm.sentences == "profile":
                profile_json = impactful_profile(profile, assets, seed_dir / arm.analysis / "train" / "extend" / "final",
                                                 seed_dir / "impactful", dev)
            rows += run_arm(profile, assets, arm, seed, seed_dir, dev, profile_json)
            if arm.name in analyses and profile.pretrained:
                # LongRecipe's analysis right after the arm it reads, so a later call (another machine) needs only
                # the small profile, not this arm's checkpoint.
                impactful_profile(profile, assets, seed_dir / arm.name / "train" / "extend" / "final", seed_dir / "impactful", dev)
        except (LongforgeError, torch.OutOfMemoryError) as e:
            reason = " ".join(str(e).split()) or type(e).__name__
            say(f"[red]lab/{arm.name} (seed {seed}) did not finish:[/] {reason}")
            claim_dir(seed_dir / arm.name, f"lab arm {arm.name}'s folder", ours=arm_leftovers)
            atomic_write_json(seed_dir / arm.name / FAILED, {"reason": reason, "arm": arm.name, "seed": seed})
    return rows


def gather_rows(profile: LabProfile, assets: dict[str, Any], plan: dict[int, list[Arm]], out: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every row recorded in `out` for the planned arms (this call's or earlier ones'), and the arms without rows
    with the reason."""
    rows: list[dict[str, Any]] = []
    missing: list[dict[str, Any]] = []
    for seed, chosen in plan.items():
        for arm in chosen:
            arm_dir = out / f"seed{seed}" / arm.name
            done = recorded_rows(arm_dir, arm_fingerprint(profile, assets, arm, seed))
            if done is not None:
                rows += done
                continue
            failed = read_json(arm_dir / FAILED)
            if isinstance(failed, dict):
                reason = f"failed: {failed.get('reason')}"
            elif (arm_dir / ROWS).is_file():
                reason = "recorded with other settings (base, corpus, profile or budget); run it again"
            else:
                reason = f"not run yet (longforge lab ... --arms {arm.name} --seeds {seed})"
            missing.append({"arm": arm.name, "seed": seed, "label": arm.label, "reason": reason})
    return rows, missing


def _results(profile: LabProfile, assets: dict[str, Any], rows: list[dict[str, Any]], t0: float) -> dict[str, Any]:
    base = assets["base_record"]
    return {"profile": asdict(profile), "window": profile.window, "target": profile.target,
            "pretrained": profile.pretrained,
            "base": {"params": base.get("params"), "tokens": base.get("tokens"), "seconds": base.get("seconds"),
                     "last_loss": base.get("last_loss"), "path": base.get("path"), "corpus": base.get("corpus"),
                     "corpus_tokens": base.get("corpus_tokens"), "essays": str(assets.get("essays") or "")},
            "rows": rows, "seconds": round(time.time() - t0, 1)}
