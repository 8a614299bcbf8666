"""`longforge demo --model PATH --data CORPUS`: the demo on a real checkpoint the user gives (SmolLM2-135M-Instruct
is the documented example): YaRN to 4x its window, a short continued pretraining on the user's corpus, passkey and
perplexity before and after, and the same report as the built-in demo."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from longforge.errors import LongforgeError
from longforge.files import atomic_write_text, claim_dir
from longforge.progress import say

NO_DATA = ("longforge demo --model needs --data, the text to extend the model on: build a corpus from this machine's "
           "Python packages with `python benchmarks/real_corpus.py --out corpus --tokenizer {model}` and pass "
           "--data corpus (or give a JSONL file or folder of documents with a `text` field)")


@dataclass(frozen=True)
class ModelDemoProfile:
    """The real-model demo's sizes for one kind of machine."""

    name: str
    factor: int
    steps: int
    batch: int
    lr: float
    warmup: int
    depths: int
    trials: int
    ppl_docs: int


MODEL_PROFILES = {
    # One H200 and SmolLM2-135M: 80 steps of 8 x 32K tokens took ~8 minutes (REALMODEL.md).
    "cuda": ModelDemoProfile("model-cuda", factor=4, steps=80, batch=8, lr=1e-4, warmup=4, depths=5, trials=4, ppl_docs=4),
    # A CPU: the code paths on a small model; a 135M model at 32K on CPU is far too slow for a demo.
    "cpu": ModelDemoProfile("model-cpu", factor=4, steps=4, batch=1, lr=1e-4, warmup=1, depths=2, trials=1, ppl_docs=1),
}


def demo_sources(data: Path, out: Path, tokenizer: Any, target: int) -> tuple[list[dict[str, Any]], Path | None]:
    """The recipe's sources and a perplexity file: a real_corpus.py folder gives code and prose and its held-out code
    (joined into documents of 2x the target); any other JSONL file or folder is one source and no perplexity."""
    from longforge.lab.given import CORPUS_FILES, join_long

    if all((data / f).is_file() for f in CORPUS_FILES):
        texts = [json.loads(x)["text"] for x in (data / "heldout_code.jsonl").read_text().splitlines() if x.strip()]
        ppl = out / "heldout_long.jsonl"
        atomic_write_text(ppl, "".join(json.dumps({"text": t}) + "\n" for t, _ in join_long(texts, tokenizer, 2 * target)))
        return ([{"name": "code-repositories", "path": str(data / "code.jsonl"), "domain": "code", "weight": 0.6},
                 {"name": "prose", "path": str(data / "prose.jsonl"), "domain": "prose", "weight": 0.4}], ppl)
    return [{"name": "data", "path": str(data), "domain": "data", "weight": 1.0}], None


def model_recipe(profile: ModelDemoProfile, model: Path, window: int, sources: list[dict[str, Any]], ppl: Path | None,
                 device: str, seed: int) -> dict[str, Any]:
    """The demo preset (recipes/demo.yaml) pointed at the given model and corpus, sized by the profile."""
    from longforge.lab.run import doubling
    from longforge.recipe import parse_yaml
    from longforge.recipes import preset_text

    r = parse_yaml(preset_text("demo"), "preset demo")
    t = window * profile.factor
    r.update(name=f"demo-{profile.name}", description=f"The demo on {model}: YaRN {profile.factor}x and "
             f"{profile.steps} steps of its corpus", seed=seed, device=device, target_length=t)
    r["model"] = {"path": str(model)}
    r["data"]["sources"] = sources
    r["data"]["short_threshold"] = window
    r["data"]["token_budget"] = profile.steps * profile.batch * t + 8 * t
    # save_attention: backward does not run attention forward again (most of a 32K step; the same numbers).
    r["stages"][0].update(steps=profile.steps, batch_size=profile.batch, lr=profile.lr, warmup_steps=profile.warmup,
                          save_every=max(profile.steps // 4, 1), checkpoint_policy="save_attention")
    # Passkey from an eighth of the window to the target: inside the window (what the base keeps) and beyond it.
    r["eval"]["passkey"] = {"lengths": doubling(max(window // 8, 128), t), "depths": profile.depths,
                            "trials": profile.trials}
    if ppl is not None:
        r["eval"]["ppl"] = {"source": str(ppl), "lengths": doubling(max(window // 4, 16), t), "num_docs": profile.ppl_docs}
    else:
        r["eval"].pop("ppl", None)
    return r


def model_checks(run_dir: Path, window: int) -> list[dict[str, Any]]:
    """What the real-model demo shows, measured: passkey beyond the window before and after, and inside it after."""
    from longforge.report.build import collect, passkey_bands

    info = collect(run_dir)
    base = passkey_bands(info["evals"]["base"]["passkey"], window)
    final = passkey_bands(info["evals"]["final"]["passkey"], window)
    out = []
    for name, value, ref in (("extended model, passkey beyond the window, vs the base", final["beyond"], base["beyond"]),
                             ("extended model, passkey inside the window, vs the base", final["inside"], base["inside"])):
        ok = value is not None and ref is not None and value >= ref
        out.append({"check": name, "value": value, "target": f">= {ref:.0%}" if ref is not None else "-", "pass": ok})
    return out


def run_model_demo(out: Path, model: Path, data: Path | None, device: str = "auto", fresh: bool = False,
                   seed: int = 0) -> dict[str, Any]:
    """Extend a given checkpoint 4x on the given corpus, evaluate before and after, and report, into `out`."""
    from longforge.demo.run import run_and_check
    from longforge.hf import load_tokenizer, resolve_device
    from longforge.lab.given import check_base
    from longforge.runner import discard, old_run_folder

    t0 = time.time()
    dev = resolve_device(device)
    info = check_base(Path(model), "--model")
    if data is None:
        raise LongforgeError(NO_DATA.format(model=model) + ".")
    data = Path(data)
    if not data.exists():
        raise LongforgeError(f"--data {data} does not exist; " + NO_DATA.format(model=model).split(": ", 1)[1] + ".")
    profile = MODEL_PROFILES["cuda" if dev.type == "cuda" else "cpu"]
    window = int(info["window"])
    out = Path(out)
    if fresh:
        discard(out, "demo run folder", ours=old_run_folder)
    claim_dir(out, "demo run folder", ours=old_run_folder)
    say(f"[bold]longforge demo[/] on {model}: window {window} -> {window * profile.factor} tokens, "
        f"{profile.steps} steps x {profile.batch} sequences on {data}")
    sources, ppl = demo_sources(data, out, load_tokenizer(model), window * profile.factor)
    recipe_dict = model_recipe(profile, Path(model), window, sources, ppl, dev.type, seed)
    return run_and_check(recipe_dict, out, lambda: model_checks(out, window), t0)
