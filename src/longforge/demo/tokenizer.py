"""Train the demo's byte-level BPE tokenizer and save it as a Hugging Face tokenizer."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from longforge.progress import spinner

EOS = "<|endoftext|>"


def train_tokenizer(texts: Iterable[str], vocab_size: int, out: Path, model_max_length: int) -> Any:
    """Byte-level BPE with digits split one per token (so numbers are copied digit by digit)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    # The trainer's own bar (show_progress) writes to stderr in its own format; a longforge spinner keeps one style
    # and is quiet under LONGFORGE_QUIET=1 (the trainer releases the GIL, so the spinner keeps turning).
    with spinner(f"tokenizer: training a {vocab_size:,}-token byte-level BPE"):
        tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS,
                                   model_max_length=model_max_length)
    fast.save_pretrained(out)
    return fast
