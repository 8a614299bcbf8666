"""Passkey prompts, scoring, generation and perplexity."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_tiny_model
from longforge.errors import LongforgeError
from longforge.eval.generate import greedy_generate
from longforge.eval.passkey import NEEDLE, build_grid, first_integer, fit_sentences, run_passkey, spread_lengths, summarize
from longforge.eval.ppl import run_ppl


@pytest.mark.parametrize("length", [64, 100, 300, 1000])
def test_prompts_fit_the_length_and_hold_the_needle_once(tokenizer, length: int) -> None:
    grid = build_grid(tokenizer, [length], [0.0, 0.5, 1.0], trials=2, seed=0)
    assert len(grid) == 6
    filler_tokens = len(tokenizer(" The grass is green.", add_special_tokens=False)["input_ids"])
    for p in grid:
        assert length - 2 * filler_tokens <= len(p.ids) <= length
        needle = NEEDLE.format(key=p.key)
        assert p.text.count(needle) == 1
        assert p.text.count(str(p.key)) == 2  # recoverable from the prompt, and only from the needle
        assert p.text.rstrip().endswith("The pass key is")
    first, mid, last = grid[0], grid[2], grid[4]
    sentences = fit_sentences(tokenizer, length, 55555)
    assert [first.needle_sentence, mid.needle_sentence, last.needle_sentence] == [0, round(sentences / 2), sentences]
    if sentences >= 4:
        assert first.text.index(NEEDLE[:10]) < mid.text.index(NEEDLE[:10]) < last.text.index(NEEDLE[:10])


def test_prompt_that_cannot_fit_is_refused(tokenizer) -> None:
    with pytest.raises(LongforgeError, match="passkey prompt needs at least"):
        fit_sentences(tokenizer, 5, 12345)


def test_grid_is_deterministic(tokenizer) -> None:
    a = build_grid(tokenizer, [64, 128], [0.5], 3, seed=5)
    b = build_grid(tokenizer, [64, 128], [0.5], 3, seed=5)
    assert [p.key for p in a] == [p.key for p in b]
    assert [p.key for p in build_grid(tokenizer, [64, 128], [0.5], 3, seed=6)] != [p.key for p in a]


def test_scoring() -> None:
    assert first_integer(" 48213. Remember") == 48213
    assert first_integer(" is 4821 3") == 4821
    assert first_integer(" no number") is None
    samples = [{"length": 8, "depth": 0.0, "correct": True}, {"length": 8, "depth": 0.0, "correct": False},
               {"length": 16, "depth": 0.0, "correct": True}]
    s = summarize(samples, [8, 16], [0.0])
    assert s["grid"] == [[0.5], [1.0]] and s["accuracy"] == pytest.approx(2 / 3)
    assert spread_lengths(64, 2048, 6)[0] == 64 and spread_lengths(64, 2048, 6)[-1] == 2048


class _Oracle(torch.nn.Module):
    """A stub model that reads the passkey out of its prompt, to check generation and scoring end to end."""

    def __init__(self, tokenizer):
        super().__init__()
        self.tok = tokenizer
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.config = make_tiny_model(len(tokenizer)).config
        self.seen: list[torch.Tensor] = []

    def forward(self, input_ids, past_key_values=None, use_cache=True, logits_to_keep=1):  # noqa: ANN001
        self.seen.append(input_ids)
        full = torch.cat(self.seen, dim=1)
        out = torch.full((input_ids.shape[0], 1, len(self.tok)), -1e9)
        for b in range(full.shape[0]):
            text = self.tok.decode(full[b])
            key = text.split("The pass key is ")[1].split(".")[0]
            answer = self.tok(" " + key + ".", add_special_tokens=False)["input_ids"] + [0]
            done = len(self.seen) - 1
            out[b, 0, answer[min(done, len(answer) - 1)]] = 0
        return type("Out", (), {"logits": out})()


def test_an_oracle_scores_everything_and_a_random_model_nothing(tokenizer, monkeypatch) -> None:
    import longforge.eval.passkey as pk

    def oracle_generate(model, x, n):  # noqa: ANN001
        model.seen = []
        return greedy_generate(model, x, n)

    monkeypatch.setattr(pk, "greedy_generate", oracle_generate)
    res = run_passkey(_Oracle(tokenizer), tokenizer, [64, 128], 3, 2, seed=0)
    assert res["summary"]["accuracy"] == 1.0
    monkeypatch.undo()
    rnd = run_passkey(make_tiny_model(len(tokenizer)), tokenizer, [64, 128], 3, 2, seed=0)
    assert rnd["summary"]["accuracy"] == 0.0
    assert len(rnd["samples"]) == 12 and {"prompt_sha1", "output", "key", "correct"} <= set(rnd["samples"][0])


def test_chunked_prefill_matches_one_shot_greedy(tokenizer) -> None:
    model = make_tiny_model(len(tokenizer), window=256)
    x = torch.randint(1, len(tokenizer), (2, 40))
    a = greedy_generate(model, x, 6, prefill_chunk=7)
    b = greedy_generate(model, x, 6, prefill_chunk=1000)
    ref = model.generate(x, max_new_tokens=6, do_sample=False, pad_token_id=0)[:, 40:]
    assert torch.equal(a, b) and torch.equal(a, ref)


def test_perplexity_is_token_weighted_and_uses_long_enough_documents() -> None:
    model = make_tiny_model(50, window=256)
    rng = np.random.default_rng(0)
    docs = [rng.integers(1, 50, n).tolist() for n in (300, 200, 100)]
    res = run_ppl(model, docs, [64, 150, 250], num_docs=5)
    rows = {r["length"]: r for r in res["rows"]}
    assert rows[64]["documents"] == 3 and rows[150]["documents"] == 2 and rows[250]["documents"] == 1
    assert rows[64]["tokens"] == 3 * 63
    assert 20 < rows[64]["ppl"] < 100  # an untrained model is near uniform over 50 tokens
    with torch.no_grad():
        x = torch.tensor([docs[0][:250]])
        logits = model(x).logits[0, :-1]
        nll = torch.nn.functional.cross_entropy(logits, x[0, 1:])
    assert rows[250]["nll"] == pytest.approx(float(nll), rel=1e-5)
