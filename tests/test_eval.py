"""Passkey and NIAH grids, scorers, the generation engine, perplexity, results and comparison."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_tiny_model
from longforge.errors import LongforgeError
from longforge.inference.engine import Engine, greedy_generate
from longforge.eval.metrics import first_integer, rouge1, string_match_all, string_match_part
from longforge.eval.niah import NEEDLE, Needle, build_niah, run_niah, score_answer
from longforge.eval.passkey import NEEDLE as PK_NEEDLE
from longforge.eval.passkey import build_grid, fit_sentences, run_passkey, spread_lengths, summarize
from longforge.eval.ppl import run_ppl, sliding_windows
from longforge.eval.prompts import PromptFormat, TextHaystack, fit_count
from oracles import Oracle, niah_answer, passkey_answer

# Tiny models are all per-op overhead: run every test here on one intra-op thread (conftest).
pytestmark = pytest.mark.usefixtures("one_thread")


CHAT = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.mark.parametrize("length", [64, 100, 300, 1000])
def test_prompts_fit_the_length_and_hold_the_needle_once(tokenizer, length: int) -> None:
    grid = build_grid(tokenizer, [length], [0.0, 0.5, 1.0], trials=2, seed=0)
    assert len(grid) == 6
    filler_tokens = len(tokenizer(" The grass is green.", add_special_tokens=False)["input_ids"])
    for p in grid:
        assert length - 2 * filler_tokens <= len(p.ids) <= length
        needle = PK_NEEDLE.format(key=p.key)
        assert p.text.count(needle) == 1
        assert p.text.count(str(p.key)) == 2  # recoverable from the prompt, and only from the needle
        assert p.text.rstrip().endswith("The pass key is")
    first, mid, last = grid[0], grid[2], grid[4]
    sentences = fit_sentences(tokenizer, length, 55555)
    assert [first.needle_sentence, mid.needle_sentence, last.needle_sentence] == [0, round(sentences / 2), sentences]
    if sentences >= 4:
        assert first.text.index(PK_NEEDLE[:10]) < mid.text.index(PK_NEEDLE[:10]) < last.text.index(PK_NEEDLE[:10])


def test_prompt_that_cannot_fit_is_refused(tokenizer) -> None:
    with pytest.raises(LongforgeError, match="passkey prompt needs at least"):
        fit_sentences(tokenizer, 5, 12345)


def test_fit_count_finds_the_largest_fitting_size() -> None:
    for f, length in ((lambda n: 7 + 5 * n, 131072), (lambda n: 30 + n * n, 1000), (lambda n: 3 + n, 3)):
        for guess in (None, 1, 77, 10**6):
            n = fit_count(f, length, "test prompt", guess=guess)
            assert f(n) <= length < f(n + 1)
    assert fit_count(lambda n: n, 100, "x", guess=500, upper=150) == 100
    assert fit_count(lambda n: n, 100, "x", guess=5, upper=50) == 50


def test_passkey_in_a_user_corpus(tokenizer, tmp_path: Path) -> None:
    (tmp_path / "doc.txt").write_text(" ".join(f"Stone {i} rolled down the hill." for i in range(300)))
    hay = TextHaystack.load(tmp_path / "doc.txt", 5000)
    grid = build_grid(tokenizer, [150, 400], [0.0, 0.5, 1.0], 1, seed=0, haystack=hay)
    for p in grid:
        assert p.length - 12 <= len(p.ids) <= p.length and "Stone 0 rolled" in p.text
        assert p.text.count(PK_NEEDLE.format(key=p.key)) == 1 and p.text.endswith("What is the pass key? The pass key is")
    res = run_passkey(Oracle(tokenizer, passkey_answer), tokenizer, [150, 400], 3, 1, seed=0, haystack=tmp_path / "doc.txt")
    assert res["summary"]["accuracy"] == 1.0 and res["haystack"].endswith("doc.txt")


def test_grid_is_deterministic(tokenizer) -> None:
    a = build_grid(tokenizer, [64, 128], [0.5], 3, seed=5)
    b = build_grid(tokenizer, [64, 128], [0.5], 3, seed=5)
    assert [p.key for p in a] == [p.key for p in b]
    assert [p.key for p in build_grid(tokenizer, [64, 128], [0.5], 3, seed=6)] != [p.key for p in a]


def test_chat_template_wraps_the_prompt_and_keeps_the_answer_prefix_last(tokenizer) -> None:
    tokenizer.chat_template = CHAT
    try:
        fmt = PromptFormat(chat_template=True, system_prompt="Be brief.")
        grid = build_grid(tokenizer, [200], [0.5], 1, seed=0, fmt=fmt)
        p = grid[0]
        assert p.text.startswith("<|system|>Be brief.<|end|><|user|> The grass") or p.text.startswith("<|system|>Be brief.<|end|><|user|>The grass")
        assert p.text.endswith("What is the pass key?<|end|><|assistant|>The pass key is")
        assert len(p.ids) <= 200 and p.text.count(PK_NEEDLE.format(key=p.key)) == 1
    finally:
        tokenizer.chat_template = None
    with pytest.raises(LongforgeError, match="has none"):
        build_grid(tokenizer, [200], [0.5], 1, seed=0, fmt=PromptFormat(chat_template=True))


def test_scorers_on_hand_made_outputs() -> None:
    assert first_integer(" 48213. Remember") == 48213
    assert first_integer(" is 4821 3") == 4821
    assert first_integer(" no number") is None
    samples = [{"length": 8, "depth": 0.0, "correct": True}, {"length": 8, "depth": 0.0, "correct": False},
               {"length": 16, "depth": 0.0, "correct": True}]
    s = summarize(samples, [8, 16], [0.0])
    assert s["grid"] == [[0.5], [1.0]] and s["accuracy"] == pytest.approx(2 / 3)
    assert spread_lengths(64, 2048, 6)[0] == 64 and spread_lengths(64, 2048, 6)[-1] == 2048
    assert spread_lengths(1000, 128000, 40, "linear")[:3] == [1000, 4256, 7512] and len(spread_lengths(1000, 128000, 40, "linear")) == 40
    # ROUGE-1: 3 of 4 reference words, 3 of 5 predicted words.
    r = rouge1("the cat sat down", "The cat sat, quietly up")
    assert r["precision"] == pytest.approx(3 / 5) and r["recall"] == pytest.approx(3 / 4)
    assert r["f1"] == pytest.approx(2 * 0.6 * 0.75 / 1.35)
    assert rouge1("a b", "c d")["f1"] == 0.0 and rouge1("Dolores Park!", "dolores park")["f1"] == 1.0
    assert string_match_all(" 123, 456 and 78", ["123", "456", "999"]) == pytest.approx(2 / 3)
    assert string_match_all("ABC-def", ["abc-DEF"]) == 1.0
    assert string_match_part(" Paris, France", ["London", "paris"]) == 1.0 and string_match_part("x", ["y", "z"]) == 0.0
    needle = Needle()
    full = score_answer(needle, " eat a sandwich and sit in Dolores Park on a sunny day.\nMore text")
    assert full["rouge1_f1"] == 1.0 and full["exact"]
    part = score_answer(needle, " eat a sandwich.")
    assert part["rouge1_f1"] == pytest.approx(2 * 1.0 * (3 / 12) / (1 + 3 / 12)) and not part["exact"]
    assert score_answer(needle, " go surfing")["rouge1_f1"] == 0.0


def test_an_oracle_scores_everything_and_a_random_model_nothing(tokenizer) -> None:
    oracle = Oracle(tokenizer, passkey_answer)
    res = run_passkey(oracle, tokenizer, [64, 128], 3, 2, seed=0, batch_size=4)
    assert res["summary"]["accuracy"] == 1.0
    assert max(b for b, _ in oracle.batches) <= 4 and all(n <= 128 for _, n in oracle.batches)
    rnd = run_passkey(make_tiny_model(len(tokenizer)), tokenizer, [64, 128], 3, 2, seed=0)
    assert rnd["summary"]["accuracy"] == 0.0
    assert len(rnd["samples"]) == 12 and {"prompt_sha1", "output", "key", "correct", "score"} <= set(rnd["samples"][0])
    assert rnd["engine"]["path"] == "longforge"


def test_niah_prompts_fit_and_hold_the_needle_once_at_its_depth(tokenizer, tmp_path: Path) -> None:
    depths = [0.0, 0.25, 0.5, 0.75, 1.0]
    noise = build_niah(tokenizer, [300, 600], depths, 1, Needle(), None, PromptFormat(), seed=0)
    corpus = tmp_path / "essays"
    corpus.mkdir()
    (corpus / "a.txt").write_text(" ".join(f"Rivers carry stone number {i} to the sea." for i in range(400)))
    hay = TextHaystack.load(corpus, 10_000)
    text = build_niah(tokenizer, [300, 600], depths, 2, Needle(), hay, PromptFormat(), seed=0)
    for grid in (noise, text):
        for p in grid:
            assert p.length - 12 <= len(p.ids) <= p.length
            body = p.text[: p.text.rindex("Question:")]
            assert body.count(NEEDLE) == 1
            sentences = body.count(".") - 1  # every haystack sentence ends with a period; the needle's does too
            assert abs(p.meta["needle_char_depth"] - p.meta["depth"]) <= 1 / sentences + 0.02
    trials = [p for p in text if p.length == 600 and p.meta["depth"] == 0.5]
    assert trials[0].text != trials[1].text and trials[0].meta["haystack_offset"] == 0


def test_niah_oracle_scores_everything_and_a_random_model_little(tokenizer) -> None:
    res = run_niah(Oracle(tokenizer, niah_answer), tokenizer, [200, 400], 3, 1, seed=0)
    assert res["summary"]["accuracy"] == 1.0 and res["summary"]["exact"] == 1.0
    rnd = run_niah(make_tiny_model(len(tokenizer)), tokenizer, [200, 400], 3, 1, seed=0, max_new_tokens=12)
    assert rnd["summary"]["accuracy"] < 0.1 and rnd["summary"]["exact"] == 0.0
    assert len(rnd["summary"]["grid"]) == 2 and len(rnd["summary"]["grid"][0]) == 3


def test_chunked_prefill_matches_one_shot_greedy_on_both_paths(tokenizer) -> None:
    model = make_tiny_model(len(tokenizer), window=256)
    x = torch.randint(1, len(tokenizer), (2, 40))
    a = greedy_generate(model, x, 6, prefill_chunk=7)
    b = greedy_generate(model, x, 6, prefill_chunk=1000)
    ref = model.generate(x, max_new_tokens=6, do_sample=False, pad_token_id=0)[:, 40:]
    assert torch.equal(a, b) and torch.equal(a, ref)
    hf = Engine(model, prefill_chunk=7, attention="hf", stop_on_eos=False).generate(x, 6)
    assert hf == ref.tolist()
    assert model.config._attn_implementation == "sdpa"  # the engine puts the model's attention back


def test_offloaded_kv_logic_matches_device_kv(tokenizer) -> None:
    """The offload store's slots, prefetch lengths and wrap-around, with and without resident layers, on the CPU."""
    from transformers import LlamaForCausalLM

    for layers, resident in ((2, 0), (3, 0), (3, 1), (5, 2), (5, 4)):  # odd counts make slot parity wrap differently
        cfg = make_tiny_model(len(tokenizer), window=256).config
        cfg.num_hidden_layers = layers
        torch.manual_seed(layers)
        model = LlamaForCausalLM(cfg).eval()
        x = torch.randint(1, len(tokenizer), (2, 90))
        device_kv = Engine(model, prefill_chunk=17, stop_on_eos=False)
        offload = Engine(model, prefill_chunk=17, stop_on_eos=False)
        # The engine only offloads from a GPU; force the placement to test the logic.
        offload.kv_cache = "auto"
        offload._resident_layers = lambda capacity, batch, r=resident: r  # type: ignore[method-assign]
        ref = model.generate(x, max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)[:, 90:].tolist()
        assert offload.generate(x, 10) == device_kv.generate(x, 10) == ref
        assert offload.placement == {"kv_layers_on_gpu": resident, "kv_layers_in_host_memory": layers - resident}
        assert offload.generate(x[:, :50], 4) == device_kv.generate(x[:, :50], 4)  # pooled host buffers reused
        assert offload.window_nll(x[:1]) == pytest.approx(device_kv.window_nll(x[:1]), rel=1e-6)
        assert len(offload.pool.buffers) == layers - resident


def test_kv_placement_keeps_what_fits_and_spreads_it() -> None:
    from longforge.inference.kv import resident_layers, spread_layers

    assert resident_layers(32, 10, 320) == 32  # everything fits: no staging slots needed
    assert resident_layers(32, 10, 319) == 29  # else two slots of one layer each come first
    assert resident_layers(32, 10, 25) == 0 and resident_layers(32, 10, -5) == 0
    assert spread_layers(0, 32) == frozenset()
    assert spread_layers(32, 32) == frozenset(range(32))
    assert spread_layers(4, 32) == {4, 12, 20, 28}
    for n in (1, 7, 31):
        assert len(spread_layers(n, 32)) == n and max(spread_layers(n, 32)) < 32


@pytest.mark.gpu
def test_engine_on_cuda_matches_generate(tokenizer) -> None:
    """The inference kernels' fp32 fallback, and the offloaded cache's streams, on a real GPU (fp32)."""
    model = make_tiny_model(len(tokenizer), window=512).to("cuda")
    x = torch.randint(1, len(tokenizer), (2, 300))
    ref = model.generate(x.cuda(), max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)[:, 300:].tolist()
    for kv in ("device", "cpu"):
        got = Engine(model, prefill_chunk=64, kv_cache=kv, stop_on_eos=False).generate(x, 6)
        assert got == ref, kv


def test_engine_stops_each_row_on_its_own(tokenizer) -> None:
    model = make_tiny_model(len(tokenizer), window=256)
    x = torch.randint(1, len(tokenizer), (2, 30))
    full = Engine(model, stop_on_eos=False).generate(x, 8)
    rows = Engine(model, stop_on_eos=False).generate(x, 8, stop=lambda row, toks: row == 0 and len(toks) == 3)
    assert rows[0] == full[0][:3] and rows[1] == full[1]
    eng = Engine(model)
    eng.stop_ids = {full[1][2]}
    assert eng.generate(x, 8)[1] == full[1][: full[1].index(full[1][2])]


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
    chunked = Engine(model, prefill_chunk=64).window_nll(x)
    assert chunked[1] == 249 and chunked[0] / 249 == pytest.approx(float(nll), rel=1e-5)


def test_sliding_window_perplexity_scores_every_token_once_with_bounded_context() -> None:
    assert sliding_windows(10, 4, 2) == [(0, 4, 4), (2, 6, 2), (4, 8, 2), (6, 10, 2)]
    assert sliding_windows(5, 8, 3) == [(0, 5, 5)]
    model = make_tiny_model(50, window=256)
    doc = np.random.default_rng(1).integers(1, 50, 120).tolist()
    res = run_ppl(model, [doc], [32, 120], num_docs=1, stride=16)
    rows = {r["length"]: r for r in res["rows"]}
    assert rows[32]["tokens"] == rows[120]["tokens"] == 119 and rows[32]["stride"] == 16
    # By hand: token t (t >= 1) is predicted from the window that first scores it.
    total = 0.0
    with torch.no_grad():
        for begin, end, new in sliding_windows(120, 32, 16):
            x = torch.tensor([doc[begin:end]])
            logp = torch.log_softmax(model(x).logits[0, :-1], -1)
            nll = -logp[torch.arange(end - begin - 1), x[0, 1:]]
            total += float(nll[-min(new, end - begin - 1):].sum())
    assert rows[32]["nll"] == pytest.approx(total / 119, rel=1e-5)
    assert rows[120]["nll"] != pytest.approx(rows[32]["nll"], rel=1e-6)


def test_eval_stage_writes_every_task_and_compare_reads_them(model_dir: Path, corpus_dir: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from longforge.cli import app

    base = ["--target-length", "256", "--lengths", "200,256", "--depths", "2", "--ruler-tasks", "niah_single_1,fwe",
            "--ruler-lengths", "520", "--samples", "2", "--ppl-source", str(corpus_dir / "heldout.jsonl")]
    runner = CliRunner()
    res = runner.invoke(app, ["eval", str(model_dir), "--out", str(tmp_path / "a"), "--tasks", "passkey,niah,ruler,ppl", *base])
    assert res.exit_code == 0, res.output
    for f in ("passkey.json", "niah.json", "ruler.json", "ppl.json", "summary.json"):
        assert (tmp_path / "a" / f).is_file(), f
    ruler = json.loads((tmp_path / "a" / "ruler.json").read_text())
    assert {s["task"] for s in ruler["samples"]} == {"niah_single_1", "fwe"} and len(ruler["samples"]) == 4
    assert {"prompt_sha1", "answers", "output", "score"} <= set(ruler["samples"][0])
    assert "RULER" in res.output and "by prompt length" in res.output
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    res = runner.invoke(app, ["eval", "run", str(model_dir), "--out", str(tmp_path / "c"), "--lengths", "64",
                              "--depths", "1", "--target-length", "256"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "c" / "summary.json").read_text())["passkey"]["per_length"].keys() == {"64"}
    res = runner.invoke(app, ["eval", "compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "cmp")])
    assert res.exit_code == 0, res.output
    cmp = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    metrics = {r["metric"]: r for r in cmp["rows"]}
    assert {"passkey accuracy @200", "NIAH ROUGE-1 F1, all", "RULER fwe, mean over lengths", "RULER effective length",
            "perplexity @256"} <= set(metrics)
    assert all(r["delta"] == 0 or r["a"] is r["b"] is None for r in cmp["rows"]) and cmp["a"]["label"] == "a" and cmp["b"]["label"] == "b"
    for png in ("passkey.png", "niah.png", "ruler.png", "ppl.png"):
        assert (tmp_path / "cmp" / png).is_file()
    assert "| metric | a | b | change |" in (tmp_path / "cmp" / "compare.md").read_text()
    res = runner.invoke(app, ["eval", "compare", str(tmp_path / "a"), str(tmp_path / "nope"), "--out", str(tmp_path / "c2")])
    assert res.exit_code != 0 and "does not exist" in str(res.exception)

    # A run directory stands for its eval/final; the report shows every task.
    from longforge.eval.compare import resolve
    from longforge.report.build import build_report

    run = tmp_path / "run"
    shutil.copytree(tmp_path / "a", run / "eval" / "base")
    shutil.copytree(tmp_path / "b", run / "eval" / "final")
    assert resolve(run) == run / "eval" / "final"
    paths = build_report(run)
    md = paths["md"].read_text()
    assert "## RULER" in md and "| base | niah_single_1 |" in md and "ruler avg" in md and "niah all" in md
    for png in ("passkey.png", "niah.png", "ruler.png", "ppl.png"):
        assert (run / "report" / png).is_file()


def test_eval_spec_file_and_bad_input_are_clear(model_dir: Path, corpus_dir: Path, tmp_path: Path) -> None:
    import yaml
    from typer.testing import CliRunner

    from longforge.cli import app

    shutil.copy(corpus_dir / "heldout.jsonl", tmp_path / "held.jsonl")
    spec = {"eval": {"passkey": {"lengths": [64], "depths": 1}, "ppl": {"source": "held.jsonl", "lengths": [64]}}}
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(spec))
    runner = CliRunner()
    res = runner.invoke(app, ["eval", str(model_dir), "--out", str(tmp_path / "o"), "--spec", str(tmp_path / "eval.yaml")])
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert set(summary["passkey"]["per_length"]) == {"64"} and set(summary["ppl"]) == {"64"}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"eval": {"ruler": {"tasks": ["niah_single_2"]}, "passkey": None}}))
    res = runner.invoke(app, ["eval", str(model_dir), "--out", str(tmp_path / "p"), "--spec", str(tmp_path / "bad.yaml")])
    assert res.exit_code != 0 and "need essays" in str(res.exception)
    res = runner.invoke(app, ["eval", str(model_dir), "--out", str(tmp_path / "p"), "--tasks", "passkey,rulr"])
    assert res.exit_code != 0 and "unknown task 'rulr'" in str(res.exception)
