"""Shared fixtures: a tiny tokenizer, a tiny Llama checkpoint and a small corpus, all made by the tests."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch

os.environ.setdefault("LONGFORGE_QUIET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

WORDS = ("alpha beta gamma delta river stone cloud green blue yellow grass sky sun pass key remember "
         "what is the and of to in for with def return class import self value number").split()


def random_text(rng: random.Random, n_words: int) -> str:
    """Sentences of common words and numbers."""
    out = []
    for i in range(n_words):
        out.append(str(rng.randint(0, 999)) if rng.random() < 0.1 else rng.choice(WORDS))
        if i % 9 == 8:
            out[-1] += "."
    return " ".join(out)


@pytest.fixture
def one_thread():  # noqa: ANN201
    """Tiny models are all per-op overhead: intra-op threads only add synchronisation (10x slower on shared cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 300-token byte-level BPE tokenizer saved as a Hugging Face tokenizer."""
    from longforge.demo.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tok")
    rng = random.Random(0)
    from longforge.eval.passkey import FILLER, NEEDLE, QUESTION

    texts = [random_text(rng, 200) for _ in range(50)]
    texts += [" ".join(FILLER) + " " + NEEDLE.format(key=rng.randint(10000, 99999)) + " " + QUESTION for _ in range(20)]
    train_tokenizer(texts, 300, out, model_max_length=4096)
    return out


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir: Path):
    """The tiny tokenizer, loaded."""
    from longforge.hf import load_tokenizer

    return load_tokenizer(tokenizer_dir)


def make_tiny_model(vocab_size: int, window: int = 64, kv_heads: int = 2, seed: int = 0, hidden: int = 32,
                    heads: int = 4):
    """A 2-layer Llama with grouped-query attention (4 heads of hidden/heads dimensions unless told)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=window,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=False,
                      bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path, tokenizer) -> Path:
    """A tiny Llama checkpoint (window 64) with the tiny tokenizer."""
    from longforge.hf import copy_tokenizer

    out = tmp_path_factory.mktemp("model")
    make_tiny_model(len(tokenizer)).save_pretrained(out)
    copy_tokenizer(tokenizer_dir, out)
    return out


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """long.jsonl (long documents), short.jsonl (short ones) and heldout.jsonl."""
    out = tmp_path_factory.mktemp("corpus")
    rng = random.Random(1)
    for name, n_docs, lo, hi in (("long", 12, 300, 900), ("short", 40, 5, 40), ("heldout", 6, 400, 600)):
        with (out / f"{name}.jsonl").open("w") as fh:
            for _ in range(n_docs):
                fh.write(json.dumps({"text": random_text(rng, rng.randint(lo, hi))}) + "\n")
    return out


@pytest.fixture
def micro_recipe(model_dir: Path, corpus_dir: Path) -> dict:
    """A recipe small enough to run end to end in seconds."""
    return {
        "name": "micro",
        "seed": 0,
        "device": "cpu",
        "model": {"path": str(model_dir)},
        "target_length": 256,
        "data": {
            "sources": [
                {"name": "long", "path": str(corpus_dir / "long.jsonl"), "domain": "web", "weight": 0.8},
                {"name": "short", "path": str(corpus_dir / "short.jsonl"), "domain": "chat", "weight": 0.2},
            ],
            "plan": "upsample_long",
            "short_threshold": 64,
            "token_budget": 6000,
        },
        "positions": {"method": "yarn", "beta_fast": 4, "beta_slow": 1},
        "stages": [{"name": "extend", "steps": 4, "batch_size": 2, "lr": 1e-3, "save_every": 2}],
        "eval": {
            "passkey": {"lengths": [64, 256], "depths": 2, "trials": 1},
            "ppl": {"source": str(corpus_dir / "heldout.jsonl"), "lengths": [64, 256], "num_docs": 2},
        },
    }


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked `gpu` when PyTorch sees no CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
