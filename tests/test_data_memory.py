"""Huge records tokenized in pieces with bounded memory, groups limited by bytes, tables that fit 80 columns, and
progress while the data stage's long steps run."""

from __future__ import annotations

import io
import json
import random
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rich.console import Console
from typer.testing import CliRunner

import longforge.cli as cli
from longforge import progress
from longforge.cli import app
from longforge.config import DataSpec, SourceSpec
from longforge.data import pipeline, sources
from longforge.data.build import build_data
from longforge.data.pipeline import TextBatch, encode
from longforge.data.sources import Document, iter_items

from conftest import random_text

SRC = Path(pipeline.__file__).parents[2]
UNICODE = "Größe über café, naïve 日本語のテキスト and Ωmega 3.14159 with\ttabs\n\n  indented  twice  spaced line\n"


def _prose(seed: int, words: int) -> str:
    """Sentences in paragraphs, with numbers, double spaces and non-ASCII words."""
    rng = random.Random(seed)
    return "\n\n".join(random_text(rng, words // 10) + "  " + UNICODE for _ in range(10))


def _real_text() -> str:
    """Prose, Python source and non-ASCII text: what a corpus holds."""
    return _prose(3, 1500) + "\n" + (SRC / "longforge" / "data" / "sources.py").read_text() + "\n" + UNICODE * 10


def _ids(backend: Any, text: str) -> list[int]:
    return backend.encode(text, add_special_tokens=False).ids


def _batch(*texts: str) -> TextBatch:
    docs = [Document(t, "s", "d", f"doc {i}") for i, t in enumerate(texts)]
    return TextBatch(docs, [], sum(len(t) for t in texts))


@pytest.fixture
def tiny_pieces(monkeypatch: pytest.MonkeyPatch) -> int:
    """Pieces of at most 128 characters, calls of at most 512: a few KB of text is cut hundreds of times."""
    monkeypatch.setattr(pipeline, "PIECE_CHARS", 128)
    monkeypatch.setattr(pipeline, "CALL_CHARS", 512)
    return 128


# ---------------------------------------------------------------- tokenizing in pieces


def test_a_long_document_tokenized_in_pieces_gives_the_whole_texts_ids(tokenizer: Any, tiny_pieces: int) -> None:
    backend = tokenizer.backend_tokenizer
    text = _real_text()
    assert len(list(pipeline.text_pieces(text, tiny_pieces))) > 200
    short = "a short document between two long ones."
    tb = encode(backend, _batch(text, short, text[::-1]))
    assert not tb.rejects and [d.location for d in tb.docs] == ["doc 0", "doc 1", "doc 2"]
    got = [tb.ids[tb.offsets[i] : tb.offsets[i + 1]].tolist() for i in range(3)]
    assert got == [_ids(backend, text), _ids(backend, short), _ids(backend, text[::-1])]


def _family_tokenizer(kind: str) -> Any:
    """A small BPE of another family: Llama 3's pre-tokenizer, Metaspace, or Llama 2's Prepend normalizer."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

    texts = [_prose(i, 400) for i in range(30)]
    tok = Tokenizer(models.BPE(byte_fallback=kind == "llama2"))
    if kind == "llama3":
        regex = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                 r"|\s+(?!\S)|\s+")
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    alphabet = pre_tokenizers.ByteLevel.alphabet() if kind == "llama3" else []
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, initial_alphabet=alphabet, show_progress=False))
    if kind == "llama2":  # trained on words like SentencePiece, read as Llama 2's tokenizer.json does
        tok.pre_tokenizer = None
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    return tok


@pytest.mark.parametrize("kind", ["llama3", "metaspace", "llama2"])
def test_pieces_give_the_whole_texts_ids_for_other_tokenizer_families(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pipeline, "PIECE_CHARS", 64)
    monkeypatch.setattr(pipeline, "CALL_CHARS", 256)
    backend = _family_tokenizer(kind)
    assert pipeline.seam_skips_space(backend.encode_batch_fast) == (kind == "llama2")
    text = _prose(99, 3000)
    assert len(list(pipeline.text_pieces(text, 64))) > 200
    tb = encode(backend, _batch(text))
    assert tb.ids.tolist() == _ids(backend, text)


def test_text_pieces_are_bounded_and_cover_the_text() -> None:
    text = _real_text()
    pieces = list(pipeline.text_pieces(text, 100))
    assert "".join(pieces) == text and all(0 < len(p) <= 100 for p in pieces)
    prose = list(pipeline.text_pieces(_prose(3, 1500), 100))
    assert len(prose) > 50 and all(p.startswith(" ") for p in prose[1:])  # prose: every cut is before a space
    pos = skips = 0  # with skip_space, the pieces are the text less the space of some seams
    for p in pipeline.text_pieces(text, 100, skip_space=True):
        if not text.startswith(p, pos):
            assert text[pos] == " " and text[pos - 1].isalnum() and text.startswith(p, pos + 1)
            pos, skips = pos + 1, skips + 1
        pos += len(p)
    assert pos == len(text) and skips > 100
    blob = "x" * 1000  # nowhere to cut between tokens: cut anyway, so memory stays bounded
    assert [len(p) for p in pipeline.text_pieces(blob, 300)] == [300, 300, 300, 100]
    assert list(pipeline.text_pieces("short", 100)) == ["short"]


class _Spy:
    """A tokenizer backend that records the texts of every call."""

    def __init__(self, backend: Any):
        self.backend, self.calls = backend, []

    def encode_batch_fast(self, texts: list[str], add_special_tokens: bool = False) -> list[Any]:
        self.calls.append([len(t) for t in texts])
        return self.backend.encode_batch_fast(texts, add_special_tokens=add_special_tokens)

    encode_batch = encode_batch_fast


def test_the_tokenizer_is_never_given_a_long_text_at_once(tokenizer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pipeline, "PIECE_CHARS", 4096)
    monkeypatch.setattr(pipeline, "CALL_CHARS", 16384)
    spy = _Spy(tokenizer.backend_tokenizer)
    text = _prose(5, 20000)
    assert len(text) > 100_000
    tb = encode(spy, _batch(text, "tail"))
    assert max(max(c) for c in spy.calls) <= 4096 and max(sum(c) for c in spy.calls) <= 16384
    assert tb.ids.tolist() == _ids(tokenizer.backend_tokenizer, text) + _ids(tokenizer.backend_tokenizer, "tail")


PEAK_SCRIPT = """
import resource, sys
from tokenizers import Tokenizer
from longforge.data.pipeline import TextBatch, encode
from longforge.data.sources import Document
backend = Tokenizer.from_file(sys.argv[1])
text = open(sys.argv[2], encoding="utf-8").read()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
tb = encode(backend, TextBatch([Document(text, "s", "d", "x")], [], len(text)))
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(len(tb.ids), (after - before) / 1024)
"""


def test_tokenizing_a_huge_record_takes_little_memory(tokenizer_dir: Path, tmp_path: Path) -> None:
    """A 4 MB record took 0.5 GB more when encoded whole (the tokenizer keeps about 120 bytes per character)."""
    text = _prose(7, 800_000)
    assert len(text) > 4_000_000
    (tmp_path / "huge.txt").write_text(text, encoding="utf-8")
    res = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(tokenizer_dir / "tokenizer.json"), str(tmp_path / "huge.txt")],
                         env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    tokens, extra_mib = res.stdout.split()
    assert int(tokens) > 1_000_000
    assert float(extra_mib) < 150, f"peak memory grew by {extra_mib} MiB while tokenizing a 4 MB record"


def test_a_document_the_tokenizer_refuses_is_rejected_whole_when_cut(tokenizer: Any, tiny_pieces: int) -> None:
    backend = tokenizer.backend_tokenizer
    good, bad = _prose(1, 300), _prose(2, 300)
    bad = bad[:1000] + "\ud800" + bad[1000:]  # a lone surrogate (a JSON escape) in a late piece
    tb = encode(backend, _batch(good, bad, "last one"))
    assert [(r.reason, r.location) for r in tb.rejects] == [("cannot be tokenized", "doc 1")]
    assert [d.location for d in tb.docs] == ["doc 0", "doc 2"] and tb.items == 3
    assert tb.ids.tolist() == _ids(backend, good) + _ids(backend, "last one")
    assert tb.offsets.tolist() == [0, len(_ids(backend, good)), len(tb.ids)]


def test_a_build_with_tiny_pieces_writes_the_same_shards(corpus_dir: Path, tokenizer_dir: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "c.jsonl"
    lines = (corpus_dir / "long.jsonl").read_text().splitlines()
    huge = json.dumps({"text": "\n\n".join(json.loads(x)["text"] for x in lines)})  # one record of every document
    src.write_text("\n".join(lines[:3] + [huge] + lines[3:]) + "\n")
    spec = DataSpec(sources=[SourceSpec(name="c", path=src)], plan="none")
    build_data(spec, tokenizer_dir, 64, tmp_path / "whole", seed=1)
    monkeypatch.setattr(pipeline, "PIECE_CHARS", 48)
    monkeypatch.setattr(pipeline, "CALL_CHARS", 200)
    build_data(spec, tokenizer_dir, 64, tmp_path / "pieces", seed=1)
    for f in sorted((tmp_path / "whole").glob("tokens-*")):
        assert f.read_bytes() == (tmp_path / "pieces" / f.name).read_bytes()
    for f in ("starts-00000.npy", "offsets-00000.npy"):
        assert np.array_equal(np.load(tmp_path / "whole" / f), np.load(tmp_path / "pieces" / f))


# ---------------------------------------------------------------- groups limited by bytes


def test_a_group_is_cut_at_the_byte_limit_not_the_character_count(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "MAX_DOCUMENT_BYTES", 20)
    path = tmp_path / "g.jsonl"
    path.write_text("".join(json.dumps({"text": "éééé", "repo": "r"}) + "\n" for _ in range(5)))  # 4 characters, 8 bytes
    docs = list(iter_items(SourceSpec(name="g", path=path, group_by="repo", group_joiner="")))
    assert [len(d.text.encode()) for d in docs] == [16, 16, 8]
    assert [d.records for d in docs] == [2, 2, 1] and [d.piece for d in docs] == [False, True, True]


def test_a_group_counts_its_joiners_against_the_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "MAX_DOCUMENT_BYTES", 9)
    path = tmp_path / "g.jsonl"
    path.write_text("".join(json.dumps({"text": "aaaa", "repo": "r"}) + "\n" for _ in range(3)))
    docs = list(iter_items(SourceSpec(name="g", path=path, group_by="repo", group_joiner="--")))
    assert [d.text for d in docs] == ["aaaa", "aaaa", "aaaa"]  # two records and a joiner make 10 bytes
    monkeypatch.setattr(sources, "MAX_DOCUMENT_BYTES", 10)
    docs = list(iter_items(SourceSpec(name="g", path=path, group_by="repo", group_joiner="--")))
    assert [d.text for d in docs] == ["aaaa--aaaa", "aaaa"]


def test_utf8_size() -> None:
    assert [sources.utf8_size(t) for t in ("", "abc", "é", "日本", "\U0001f600", "\ud800")] == [0, 3, 2, 6, 4, 3]


# ---------------------------------------------------------------- tables at 80 columns

NUMBER = re.compile(r"(?<![\w.,])\d[\d.,]*[KMBT]?(?![\w])")


def _render(monkeypatch: pytest.MonkeyPatch, width: int, args: list[str]) -> str:
    """What a command prints on a terminal `width` columns wide."""
    con = Console(width=width, file=io.StringIO(), record=True, highlight=False)
    monkeypatch.setattr(cli, "console", con)
    monkeypatch.setattr(progress, "console", con)
    monkeypatch.setenv("LONGFORGE_QUIET", "0")
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    return con.export_text()


def _check_80_columns(narrow: str, wide: str, names: list[str]) -> None:
    """Every line fits; no cell is cut with an ellipsis; every number reads as on a wide terminal; names whole."""
    assert all(len(line) <= 80 for line in narrow.splitlines()), narrow
    assert "…" not in narrow, narrow
    numbers = [n for line in narrow.splitlines() if line.startswith(("│", "┃")) for n in NUMBER.findall(line)]
    wide_numbers = [n for line in wide.splitlines() if line.startswith(("│", "┃")) for n in NUMBER.findall(line)]
    assert numbers and numbers == wide_numbers, (narrow, wide)
    for name in names:
        assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", narrow), f"{name} is not whole in:\n{narrow}"


def test_recipes_fit_80_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    from longforge.recipes import preset_names, preset_summary

    narrow, wide = (_render(monkeypatch, w, ["recipes"]) for w in (80, 200))
    plans = {str(preset_summary(n)["plan"]) for n in preset_names()}
    _check_80_columns(narrow.split("\n" + preset_names()[0] + ":")[0], wide.split("\n" + preset_names()[0] + ":")[0],
                      preset_names() + sorted(plans))


def test_data_inspect_fits_80_columns(corpus_dir: Path, tokenizer_dir: Path, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    spec = DataSpec(sources=[SourceSpec(name="books", path=corpus_dir / "long.jsonl", domain="prose"),
                             SourceSpec(name="web", path=corpus_dir / "short.jsonl", domain="web")], plan="upsample_long",
                    short_threshold=200)
    out = tmp_path / "d"
    build_data(spec, tokenizer_dir, 64, out)
    m = json.loads((out / "manifest.json").read_text())

    def scale(x: Any) -> Any:  # counts of a corpus of billions of tokens, same shape
        if isinstance(x, dict):
            return {k: scale(v) for k, v in x.items()}
        return x * 9_876_543 + 1_234 if isinstance(x, int) and not isinstance(x, bool) and x > 0 else x

    m["sources"] = scale(m["sources"])
    assert m["sources"]["books"]["tokens_seen"] > 10**9
    (out / "manifest.json").write_text(json.dumps(m))
    args = ["data", "inspect", str(out), "--plot", str(tmp_path / "h.png")]
    narrow, wide = (_render(monkeypatch, w, args) for w in (80, 200))
    _check_80_columns(narrow.split("\nrejected")[0], wide.split("\nrejected")[0], ["books", "web", "prose"])


# ---------------------------------------------------------------- progress


def _recording(monkeypatch: pytest.MonkeyPatch, quiet: str) -> Console:
    con = Console(width=100, file=io.StringIO(), record=True)
    monkeypatch.setattr(progress, "console", con)
    monkeypatch.setenv("LONGFORGE_QUIET", quiet)
    return con


@pytest.mark.parametrize("quiet", ["0", "1"])
def test_the_tokenizer_shows_progress_while_it_trains(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, quiet: str) -> None:
    from longforge.demo.tokenizer import train_tokenizer

    con = _recording(monkeypatch, quiet)
    train_tokenizer([_prose(i, 200) for i in range(5)], 300, tmp_path / "tok", model_max_length=512)
    out = con.export_text()
    if quiet == "1":
        assert out == ""
    else:
        assert re.search(r"✓ tokenizer: training a 300-token byte-level BPE \d+:\d\d:\d\d", out), out


def test_the_data_stages_long_steps_show_progress(corpus_dir: Path, tokenizer_dir: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from longforge.data.verify import verify_folder

    con = _recording(monkeypatch, "0")
    spec = DataSpec(sources=[SourceSpec(name="s", path=corpus_dir / "long.jsonl")], plan="none", token_budget=2000)
    build_data(spec, tokenizer_dir, 64, tmp_path / "d")
    verify_folder(tmp_path / "d")
    out = con.export_text()
    assert "data: estimating what each source holds" in out and "data: tokens written" in out
    assert re.search(r"data verify: d shards .* 1/1", out), out
