"""LongRecipe's impactful-token analysis: which kinds of tokens a long-context model predicts better than its base.

For every token t of N long texts: delta(t) = S_extended(x_t | x_<t) - S_base(x_t | x_<t), S the raw logit of the
true token. The top fraction of tokens by delta in each text are "impactful"; their types are counted and compared
with the types of all tokens. The resulting profile drives the data stage's sentence selection.
"""

from __future__ import annotations

import json
import keyword
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from longforge.errors import LongforgeError
from longforge.progress import progress_bar

PRONOUNS = set("i me my mine myself you your yours yourself he him his himself she her hers herself it its itself we us "
               "our ours ourselves they them their theirs themselves who whom whose which what this that these those".split())
AUXILIARIES = set("be am is are was were been being have has had having do does did will would shall should can could "
                  "may might must".split())
DETERMINERS = set("a an the some any no every each either neither all both".split())
ADPOSITIONS = set("of in on at by for with about against between into through during before after above below to from "
                  "up down out off over under again further per via".split())
CONJUNCTIONS = set("and or but nor so yet if because although though while whereas unless since than".split())
TYPES = ("NUM", "PUNCT", "SPACE", "PRON", "AUX", "DET", "ADP", "CCONJ", "KEYWORD", "IDENT", "WORD", "OTHER")


def builtin_type(piece: str) -> str:
    """The type of a token's text with no tagger: numbers, punctuation, function-word classes, code, words."""
    text = piece.strip()
    if not text:
        return "SPACE"
    if re.fullmatch(r"[\d.,_]*\d[\d.,_]*", text):
        return "NUM"
    if re.fullmatch(r"[^\w\s]+", text):
        return "PUNCT"
    low = text.lower()
    for name, words in (("PRON", PRONOUNS), ("AUX", AUXILIARIES), ("DET", DETERMINERS), ("ADP", ADPOSITIONS),
                        ("CCONJ", CONJUNCTIONS)):
        if low in words:
            return name
    if keyword.iskeyword(text):
        return "KEYWORD"
    if "_" in text or re.search(r"[a-z][A-Z]", text):
        return "IDENT"
    if re.fullmatch(r"[^\W\d_]+", text):
        return "WORD"
    return "OTHER"


def vocab_types(tokenizer: Any) -> np.ndarray:
    """The built-in type of every token id, as an array of type names."""
    return np.array([builtin_type(tokenizer.decode([i])) for i in range(len(tokenizer))], dtype=object)


@torch.no_grad()
def true_token_logits(model: Any, ids: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Raw logit of each next true token (length L-1), without materialising the full logits."""
    device = next(model.parameters()).device
    ids = ids.to(device)
    hidden = model.model(input_ids=ids[None], use_cache=False).last_hidden_state[0, :-1]
    weight = model.get_output_embeddings().weight
    target = ids[1:]
    out = [(hidden[i : i + chunk].float() * weight[target[i : i + chunk]].float()).sum(-1)
           for i in range(0, hidden.shape[0], chunk)]
    return torch.cat(out).cpu()


@dataclass
class Profile:
    """Type shares among impactful tokens and among all tokens, and which types are impactful."""

    rows: list[dict[str, Any]]
    selected: list[str]
    meta: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        """The profile file's content."""
        return {"types": self.rows, "selected": self.selected, **self.meta}


def rank_types(deltas: list[np.ndarray], types: list[np.ndarray], top: float, min_lift: float = 1.2) -> tuple[list[dict[str, Any]], list[str]]:
    """Per text keep the top fraction of tokens by delta; share and lift of each type among them."""
    impactful: Counter[str] = Counter()
    overall: Counter[str] = Counter()
    for d, t in zip(deltas, types):
        k = max(1, int(round(top * len(d))))
        keep = np.argsort(-d, kind="stable")[:k]
        impactful.update(t[keep].tolist())
        overall.update(t.tolist())
    n_imp, n_all = sum(impactful.values()), sum(overall.values())
    rows = []
    for name in sorted(overall, key=lambda x: -impactful[x]):
        share, base = impactful[name] / n_imp, overall[name] / n_all
        rows.append({"type": name, "impactful_share": share, "overall_share": base, "lift": share / base})
    selected = [r["type"] for r in rows if r["lift"] >= min_lift and r["impactful_share"] >= 0.02]
    return rows, selected


def analyze(base: Any, extended: Any, tokenizer: Any, texts: list[str], length: int, top: float = 0.2,
            type_fn: Callable[[list[int]], np.ndarray] | None = None) -> Profile:
    """Run both models over texts truncated to `length` tokens and build the impactful-type profile."""
    enc = [e.ids[:length] for e in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]
    enc = [e for e in enc if len(e) >= min(length, 64)]
    if not enc:
        raise LongforgeError("no analysis text is at least 64 tokens long; give longer documents.")
    table = vocab_types(tokenizer) if type_fn is None else None
    deltas, types = [], []
    with progress_bar() as bar:
        task = bar.add_task("impactful tokens", total=len(enc))
        for ids in enc:
            x = torch.tensor(ids)
            d = (true_token_logits(extended, x) - true_token_logits(base, x)).numpy()
            deltas.append(d)
            types.append(table[ids[1:]] if table is not None else type_fn(ids)[1:])  # type: ignore[misc,index]
            bar.update(task, advance=1)
    rows, selected = rank_types(deltas, types, top)
    meta = {"texts": len(enc), "length": length, "top_fraction": top, "tagger": "builtin" if type_fn is None else "custom",
            "mean_delta": float(np.mean(np.concatenate(deltas)))}
    return Profile(rows, selected, meta)


def spacy_type_fn(tokenizer: Any, model_name: str) -> Callable[[list[int]], np.ndarray]:
    """Part-of-speech type of each token from a locally installed spaCy model (by character offsets)."""
    try:
        import spacy
    except ImportError:
        raise LongforgeError("--tagger spacy needs spaCy and a local model (pip install spacy; a model package); or use --tagger builtin.") from None
    try:
        nlp = spacy.load(model_name)
    except OSError:
        raise LongforgeError(f"spaCy model {model_name!r} is not installed locally; install its package or use --tagger builtin.") from None

    def types(ids: list[int]) -> np.ndarray:
        pieces = [tokenizer.decode([i]) for i in ids]
        text = "".join(pieces)
        doc = nlp(text)
        starts = np.cumsum([0] + [len(p) for p in pieces[:-1]])
        out = []
        for s, p in zip(starts, pieces):
            span = doc.char_span(int(s), int(s) + max(len(p), 1), alignment_mode="expand")
            out.append(span[0].pos_ if span is not None and len(span) else builtin_type(p))
        return np.array(out, dtype=object)

    return types


def write_profile(profile: Profile, out: Path) -> dict[str, Path]:
    """profile.json and a bar plot of impactful vs overall shares."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "profile.json").write_text(json.dumps(profile.to_json(), indent=1))
    rows = profile.rows[:12]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    x = np.arange(len(rows))
    ax.bar(x - 0.2, [r["impactful_share"] for r in rows], 0.4, label=f"top {profile.meta['top_fraction']:.0%} by delta")
    ax.bar(x + 0.2, [r["overall_share"] for r in rows], 0.4, label="all tokens")
    ax.set_xticks(x, [r["type"] + (" *" if r["type"] in profile.selected else "") for r in rows], rotation=30)
    ax.set_ylabel("share of tokens")
    ax.set_title("Impactful token types (* = selected for sentence filtering)")
    ax.legend()
    fig.savefig(out / "profile.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return {"json": out / "profile.json", "png": out / "profile.png"}
