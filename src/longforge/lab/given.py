"""`longforge lab --base`: the lab's arms start from a pretrained checkpoint the user gives, extended by the
factor asked for, trained on a corpus folder written by benchmarks/real_corpus.py (code and prose domains with
held-out packages), and evaluated with retention at the base's own window."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from longforge.errors import LongforgeError
from longforge.files import read_json

# What benchmarks/real_corpus.py writes: training documents of two domains, held-out documents of each, a manifest.
CORPUS_FILES = ("code.jsonl", "prose.jsonl", "heldout_code.jsonl", "heldout_prose.jsonl")
CORPUS_MANIFEST = "corpus.json"
CORPUS_FIX = ("build one with `python benchmarks/real_corpus.py --out DIR` (Python package sources and prose from "
              "site-packages), or pass the folder it wrote")


def check_base(path: Path, flag: str = "--base") -> dict[str, Any]:
    """Refuse, in one sentence, a --base that is not a whole causal-LM checkpoint with a tokenizer and no own code;
    returns its window, RoPE base and model type."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from longforge.hf import check_checkpoint, load_config, load_tokenizer, needs_own_code, read_config
    from longforge.positions.rope import rope_info

    path = Path(path)
    check_checkpoint(path, flag)
    if needs_own_code(path):
        raise LongforgeError(f"{flag} {path} ships its own model code (auto_map in config.json) and the lab runs no code "
                             "from checkpoints; convert it to a model transformers knows, or use `longforge run` with "
                             "model.trust_remote_code: true if you trust it.")
    config = read_config(path)
    model_type = config["model_type"]
    archs = config.get("architectures") or []
    # A type transformers has a causal LM class for can still be saved as an encoder (BertModel, BertForMaskedLM).
    encoder = bool(archs) and not any("CausalLM" in a or "LMHeadModel" in a for a in map(str, archs))
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or encoder:
        raise LongforgeError(f"{flag} {path} is a {model_type!r} model ({', '.join(map(str, archs)) or 'no architectures'}), "
                             "not a causal language model; pass a decoder checkpoint (e.g. Llama, Qwen2, SmolLM2).")
    load_tokenizer(path)  # one sentence when its tokenizer files are missing or damaged
    info = rope_info(load_config(path))
    return {"window": info.original_length, "rope_theta": info.theta, "model_type": model_type,
            "rope_type": info.current.get("rope_type", "default")}


def check_corpus(folder: Path | None) -> Path:
    """Refuse, in one sentence, a missing or incomplete corpus folder for --base."""
    if folder is None:
        raise LongforgeError(f"longforge lab --base needs --data, a corpus folder with {', '.join(CORPUS_FILES)}; "
                             f"{CORPUS_FIX}.")
    folder = Path(folder)
    if not folder.is_dir():
        raise LongforgeError(f"--data {folder} does not exist; {CORPUS_FIX}.")
    missing = [f for f in CORPUS_FILES if not (folder / f).is_file() or (folder / f).stat().st_size == 0]
    if missing:
        raise LongforgeError(f"--data {folder} has no (or an empty) {missing[0]}; {CORPUS_FIX}.")
    return folder


def check_essays(path: Path | None) -> None:
    """Refuse a named essay haystack that is not there."""
    if path is not None and not Path(path).exists():
        raise LongforgeError(f"--essays {path} does not exist; pass a text file, folder or JSONL of prose (RULER's "
                             "essay haystack), or leave it out to use the corpus's held-out prose.")


def weights_digest(path: Path) -> str:
    """The identity of a checkpoint's content (config and weight files by name, size and sampled bytes; no mtimes),
    so results recorded on one machine still match after the same checkpoint is rebuilt on another."""
    from longforge.files import file_digest

    h = hashlib.blake2b(digest_size=16)
    for f in sorted(Path(path).iterdir()):
        if f.is_file() and (f.suffix in (".safetensors", ".bin") or f.name in ("config.json", "tokenizer.json")):
            size = f.stat().st_size
            h.update(f"{f.name}:{size}:{file_digest(f, size)}".encode())
    return h.hexdigest()


def corpus_digest(folder: Path) -> str:
    """The identity of a corpus folder's documents (sizes and sampled bytes; no mtimes)."""
    from longforge.files import file_digest

    h = hashlib.blake2b(digest_size=16)
    for name in CORPUS_FILES:
        size = (folder / name).stat().st_size
        h.update(f"{name}:{size}:{file_digest(folder / name, size)}".encode())
    return h.hexdigest()


def join_long(texts: list[str], tokenizer: Any, doc_tokens: int) -> list[tuple[str, int]]:
    """Texts joined in order into documents of at least `doc_tokens` tokens (the remainder kept for shorter lengths)."""
    docs: list[tuple[str, int]] = []
    cur, n = "", 0
    for text in texts:
        cur = f"{cur}\n\n{text}" if cur else text
        n += len(tokenizer(text, add_special_tokens=False)["input_ids"])
        if n >= doc_tokens:
            docs.append((cur, n))
            cur, n = "", 0
    if cur:
        docs.append((cur, n))
    return docs


def _texts(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]


def write_heldout(corpus: Path, out: Path, tokenizer: Any, doc_tokens: int) -> dict[str, Any]:
    """heldout_code_long.jsonl and heldout_prose_long.jsonl: each domain's held-out packages joined into documents long
    enough for perplexity at `doc_tokens` tokens."""
    out.mkdir(parents=True, exist_ok=True)
    stats: dict[str, Any] = {}
    for domain in ("code", "prose"):
        docs = join_long(_texts(corpus / f"heldout_{domain}.jsonl"), tokenizer, doc_tokens)
        with (out / f"heldout_{domain}_long.jsonl").open("w") as fh:
            for text, _ in docs:
                fh.write(json.dumps({"text": text}) + "\n")
        stats[domain] = [n for _, n in docs]
    return stats


def base_assets(base: Path, corpus: Path, essays: Path | None, folder: Path, target: int, tokens: int) -> dict[str, Any]:
    """The lab's assets for a given checkpoint: the base itself (and its tokenizer), the corpus and its prose share of
    an arm's `tokens`, long held-out documents for perplexity to 2x the target, and the essay haystack (the user's,
    else the held-out prose)."""
    from longforge.demo.run import _params
    from longforge.hf import load_tokenizer
    from longforge.runner import run_stage
    from longforge.stages import fingerprint

    base_fp, corpus_fp = weights_digest(base), corpus_digest(corpus)
    side = folder / "side"
    rec = run_stage("lab/long held-out documents (code, prose)", side, fingerprint(["heldout", corpus_fp, base_fp, 2 * target]),
                    lambda: write_heldout(corpus, side, load_tokenizer(base), 2 * target))
    manifest = read_json(corpus / CORPUS_MANIFEST) or {}
    share = prose_share(manifest, tokens + 16 * target)  # the largest budget: training at 2x the target
    sizes = f"{corpus_sizes(manifest)}; every arm's mix: code {1 - share:.0%}, prose {share:.0%}"
    return {"corpus": corpus, "prose_share": share, "tokenizer": base, "side": side, "base": base, "tok_fp": base_fp,
            "heldout_texts": corpus / "heldout_code.jsonl", "essays": Path(essays) if essays else corpus / "heldout_prose.jsonl",
            "ppl_code": side / "heldout_code_long.jsonl", "ppl_prose": side / "heldout_prose_long.jsonl",
            "heldout_tokens": {k: v for k, v in rec.items() if k in ("code", "prose")},
            "base_record": {"fingerprint": fingerprint([base_fp, corpus_fp]), "path": str(base), "params": _params(base),
                            "tokens": None, "seconds": None, "corpus": str(corpus), "corpus_tokens": sizes}}


# The lab's mix for a given base: code repositories and prose, 60/40 where the prose allows (ProLong's long/short
# shares). A machine's site-packages can hold less prose than 40% of an arm's budget; the share is then cut to what
# the prose gives with a margin for what the sampling plans drop (short documents), the same for every arm.
PROSE_SHARE = 0.4
PROSE_MARGIN = 0.7


def prose_share(manifest: dict[str, Any], budget: int) -> float:
    """The prose share of every arm's tokens: PROSE_SHARE, or less when the corpus's prose cannot fill it."""
    prose = ((manifest.get("domains") or {}).get("prose") or {}).get("tokens")
    if not prose or budget <= 0:  # not counted (no tokenizer): the recipe's share, the data stage checks it
        return PROSE_SHARE
    return round(min(PROSE_SHARE, PROSE_MARGIN * prose / budget), 3)


def corpus_sizes(manifest: dict[str, Any]) -> str:
    """Tokens (or, without a tokenizer, characters) per domain, as real_corpus.py recorded them."""
    domains = manifest.get("domains") or {}
    if not domains:
        return "not recorded"
    counted = manifest.get("tokenizer") is not None
    unit = "tokens" if counted else "characters"
    return ", ".join(f"{k} {v.get(unit, 0):,}" for k, v in domains.items()) + f" {unit}"
