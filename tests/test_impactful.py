"""Impactful-token analysis: exact true-token logits, type classification, and a ranking with a known answer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from conftest import make_tiny_model, random_text
from longforge.analyze.impactful import analyze, builtin_type, rank_types, true_token_logits, write_profile


def test_builtin_types() -> None:
    cases = {" 42": "NUM", "3.14": "NUM", ".": "PUNCT", "\n": "SPACE", " they": "PRON", " is": "AUX", " the": "DET",
             " of": "ADP", " and": "CCONJ", " def": "KEYWORD", "snake_case": "IDENT", "camelCase": "IDENT",
             " river": "WORD", "x2": "OTHER"}
    assert {k: builtin_type(k) for k in cases} == cases


def test_true_token_logits_match_full_logits() -> None:
    model = make_tiny_model(50, window=128)
    ids = torch.randint(0, 50, (40,))
    with torch.no_grad():
        full = model(input_ids=ids[None]).logits[0, :-1]
    expected = full.gather(1, ids[1:, None])[:, 0]
    torch.testing.assert_close(true_token_logits(model, ids, chunk=7), expected, rtol=1e-5, atol=1e-5)


def test_ranking_with_a_known_answer() -> None:
    rng = np.random.default_rng(0)
    types = [rng.choice(["NUM", "WORD", "PUNCT"], size=500, p=[0.1, 0.7, 0.2]) for _ in range(5)]
    deltas = [np.where(t == "NUM", 2.0, 0.0) + rng.normal(0, 0.3, t.shape) for t in types]
    rows, selected = rank_types(deltas, types, top=0.2)
    assert rows[0]["type"] == "NUM" and rows[0]["lift"] > 4 and selected == ["NUM"]


def test_extended_model_better_on_digits_ranks_numbers_first(tokenizer, tmp_path: Path) -> None:
    base = make_tiny_model(len(tokenizer), window=512)
    texts = [random_text(__import__("random").Random(i), 150) for i in range(4)]
    with torch.no_grad():
        sample = torch.tensor(tokenizer(texts[0], add_special_tokens=False)["input_ids"][:200])
        direction = base.model(input_ids=sample[None]).last_hidden_state[0].mean(0)
    extended = make_tiny_model(len(tokenizer), window=512)
    extended.load_state_dict(base.state_dict())
    digits = [i for i in range(len(tokenizer)) if tokenizer.decode([i]).strip().isdigit()]
    with torch.no_grad():  # the extended model now gives higher logits to every digit token
        extended.lm_head.weight[digits] += 5.0 * direction / direction.norm() ** 2
    profile = analyze(base, extended, tokenizer, texts, 200, top=0.2)
    assert profile.rows[0]["type"] == "NUM" and "NUM" in profile.selected
    paths = write_profile(profile, tmp_path)
    assert json.loads(paths["json"].read_text())["selected"] == profile.selected and paths["png"].is_file()


def test_profile_filter_keeps_sentences_with_impactful_types(tmp_path: Path) -> None:
    from longforge.config import SentenceFilterSpec
    from longforge.data.filters import FILTERS, VocabTables, select_sentences, sentence_bounds

    pieces = ["the", " river", " 42", ".", " we", " go", "\n", " 7", " stones", "!"]
    tables = VocabTables.from_strings(pieces)
    (tmp_path / "profile.json").write_text(json.dumps({"selected": ["NUM"], "types": []}))
    spec = SentenceFilterSpec(method="profile", profile=tmp_path / "profile.json", budget_fraction=1.0)
    flt = FILTERS["profile"](spec, tables)
    ids = np.arange(len(pieces))
    bounds = sentence_bounds(ids, tables.ends_sentence)
    scores = flt.scores(ids, bounds, np.random.default_rng(0))
    assert np.isfinite(scores).tolist() == [True, False, True]  # the sentence without a number is dropped
    kept = select_sentences(ids, bounds, scores, budget=3)
    assert kept.tolist() == [7, 8, 9]  # the denser numeric sentence fits the budget first
    rnd = FILTERS["random"](SentenceFilterSpec(method="random"), tables)
    assert np.isfinite(rnd.scores(ids, bounds, np.random.default_rng(0))).all()


def test_profile_method_needs_a_profile() -> None:
    import pytest
    from pydantic import ValidationError

    from longforge.config import SentenceFilterSpec

    with pytest.raises(ValidationError, match="needs `profile:`"):
        SentenceFilterSpec(method="profile")
