"""The demo's pieces: corpus, retrieval documents in the evaluation's exact format, pretraining batches."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from longforge.demo.base import PretrainBatches, curriculum_max
from longforge.demo.corpus import build_corpus
from longforge.demo.retrieval import RetrievalDocs
from longforge.demo.run import PROFILES, demo_recipe
from longforge.config import parse_recipe
from longforge.eval.passkey import passkey_text


def test_corpus_from_the_standard_library(tmp_path: Path) -> None:
    stats = build_corpus(tmp_path)
    s = stats["sources"]
    assert s["long"]["documents"] >= 10 and s["short"]["documents"] >= 100 and s["heldout"]["documents"] >= 4
    long_docs = [json.loads(x) for x in (tmp_path / "long.jsonl").read_text().splitlines()]
    assert all(d["text"].startswith("# file: ") for d in long_docs)
    assert max(len(d["text"]) for d in long_docs) > 200_000  # whole packages as one "repository" document
    held = {json.loads(x)["path"] for x in (tmp_path / "heldout.jsonl").read_text().splitlines()}
    assert not any(f"# file: {h}" in d["text"] for d in long_docs for h in held)


def test_retrieval_documents_use_the_evaluation_format(tokenizer) -> None:
    corpus = np.arange(1000) % 200 + 1
    docs = RetrievalDocs(tokenizer, corpus)
    rng = np.random.default_rng(0)
    minimal = len(docs.make(0, rng, "noise").ids)  # needle, question and answer alone
    longest_sentence = max(len(f) for f in docs.filler)
    for length in (minimal + 3, 120, 300):
        d = docs.make(length, rng, "noise")
        assert length - longest_sentence < len(d.ids) <= length
        answer = tokenizer.decode(d.ids[d.answer[0] : d.answer[1]]).strip()
        prompt = tokenizer.decode(d.ids[: d.answer[0]])
        sentences = prompt.count(".") - 3  # the needle has three sentence ends
        at = prompt.split(" The pass key is")[0].count(".")
        expected, _ = passkey_text(sentences, at / max(sentences, 1), int(answer))
        assert prompt == expected
        assert tokenizer(expected, add_special_tokens=False)["input_ids"] == d.ids[: d.answer[0]]


def test_pretraining_batches_are_deterministic_with_a_curriculum(tokenizer) -> None:
    s = replace(PROFILES["cpu"].base, window=128, micro_batch=3, curriculum_steps=10)
    corpus = (np.arange(5000) % 250 + 1).astype(np.int64)
    src = PretrainBatches(corpus, RetrievalDocs(tokenizer, corpus), s, seed=0)
    a, b = src.batch(4, 1), src.batch(4, 1)
    assert a.input_ids.shape == (3, 128) and np.array_equal(a.input_ids, b.input_ids)
    assert (a.loss_weights == s.answer_weight).any()
    assert a.position_ids[0, 0] == 0 and bool((a.position_ids[a.doc_ids != a.doc_ids.roll(1, 1)] == 0).all())
    assert [curriculum_max(k, s) for k in (0, 5, 10, 50)] == [48, 84, 120, 120]


def test_demo_recipe_is_valid(tmp_path: Path) -> None:
    assets = {"base": tmp_path / "base", "corpus": tmp_path / "c", "retrieval": tmp_path / "c" / "r.jsonl"}
    r = parse_recipe(demo_recipe(PROFILES["cpu"], assets, "cpu", 0))
    assert r.target_length == 8 * PROFILES["cpu"].base.window
    assert r.positions.method == "yarn" and (r.positions.beta_slow, r.positions.beta_fast) == (1.0, 4.0)


def test_demo_on_a_given_model_extends_it_with_the_same_report(tmp_path: Path, tokenizer_dir: Path, tokenizer,
                                                              one_thread: None) -> None:
    import sys

    import pytest

    from conftest import make_tiny_model
    from longforge.demo.run import run_demo
    from longforge.errors import LongforgeError
    from longforge.hf import copy_tokenizer

    sys.path.insert(0, str(Path(__file__).parent))
    from test_lab import _corpus

    model = tmp_path / "model"
    make_tiny_model(len(tokenizer), window=128).save_pretrained(model)
    copy_tokenizer(tokenizer_dir, model)
    with pytest.raises(LongforgeError, match="needs --data.*real_corpus.py"):
        run_demo(tmp_path / "d0", device="cpu", model=model)
    with pytest.raises(LongforgeError, match="--data is for --model"):
        run_demo(tmp_path / "d0", device="cpu", data=tmp_path)
    corpus = _corpus(tmp_path)
    out = tmp_path / "demo"
    res = run_demo(out, device="cpu", model=model, data=corpus)
    recipe = (out / "demo.yaml").read_text()
    assert f"path: {model}" in recipe and "target_length: 512" in recipe and "code-repositories" in recipe
    assert (out / "report" / "report.md").is_file() and (out / "eval" / "final" / "ppl.json").is_file()
    assert [c["check"] for c in res["checks"]][0].startswith("extended model, passkey beyond the window")
