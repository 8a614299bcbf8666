"""The eval stage: run the configured tasks on one checkpoint and write one JSON per task."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from longforge.config import EvalSpec
from longforge.data.sources import Rejects, iter_documents
from longforge.config import SourceSpec
from longforge.errors import LongforgeError
from longforge.eval.passkey import run_passkey, spread_lengths
from longforge.eval.ppl import run_ppl
from longforge.hf import load_model, load_tokenizer


def passkey_lengths(spec: EvalSpec, original_length: int, target_length: int) -> list[int]:
    """The grid's lengths: given, or spread from a quarter of the original window to the target."""
    pk = spec.passkey
    assert pk is not None
    if pk.lengths:
        return sorted(pk.lengths)
    lo = pk.min_length or max(original_length // 4, 16)
    hi = pk.max_length or target_length
    return spread_lengths(lo, hi, pk.num_lengths)


def ppl_lengths(lengths: list[int] | None, original_length: int, target_length: int) -> list[int]:
    """Perplexity lengths: given, or doubling from a quarter of the original window to the target."""
    if lengths:
        return sorted(lengths)
    out, n = [], max(original_length // 4, 16)
    while n < target_length:
        out.append(n)
        n *= 2
    return out + [target_length]


def load_ppl_docs(spec: EvalSpec, tokenizer: Any) -> list[list[int]]:
    """Tokenized held-out documents for perplexity."""
    assert spec.ppl is not None
    src = SourceSpec(name="ppl", path=spec.ppl.source, text_field=spec.ppl.text_field)
    rejects = Rejects()
    texts = [d.text for d in iter_documents(src, rejects)]
    if not texts:
        raise LongforgeError(f"eval.ppl.source {spec.ppl.source} has no usable documents; point it at long text.")
    enc = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    return sorted((e.ids for e in enc), key=len, reverse=True)


def evaluate(model_dir: Path, spec: EvalSpec, out: Path, original_length: int, target_length: int,
             device: torch.device, label: str) -> dict[str, Any]:
    """Run passkey and perplexity on one checkpoint; write passkey.json, ppl.json and summary.json."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = load_model(model_dir, device, dtype)
    tok = load_tokenizer(model_dir)
    summary: dict[str, Any] = {"model": str(model_dir), "label": label, "original_length": original_length,
                               "target_length": target_length}
    t0 = time.time()
    if spec.passkey is not None:
        lengths = passkey_lengths(spec, original_length, target_length)
        res = run_passkey(model, tok, lengths, spec.passkey.depths, spec.passkey.trials, spec.seed,
                          spec.passkey.batch_size, label=f"{label} passkey")
        (out / "passkey.json").write_text(json.dumps(res, indent=1))
        summary["passkey"] = res["summary"]
    if spec.ppl is not None:
        docs = load_ppl_docs(spec, tok)
        lengths = ppl_lengths(spec.ppl.lengths, original_length, target_length)
        res = run_ppl(model, docs, lengths, spec.ppl.num_docs, label=f"{label} ppl")
        (out / "ppl.json").write_text(json.dumps(res, indent=1))
        summary["ppl"] = {str(r["length"]): r["ppl"] for r in res["rows"]}
    summary["seconds"] = round(time.time() - t0, 2)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
