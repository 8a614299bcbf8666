"""The names the schema accepts for model-side choices, declared without importing torch (the CLI starts fast).

model/attention.py keys its back-ends by ATTENTION_NAMES (checked at import); model/parallel.py's sequence
parallelism takes SP_KINDS.
"""

from __future__ import annotations

ATTENTION_NAMES = ("dense", "sdpa", "varlen", "flex")
# The names a recipe's `attention` takes: `auto` (resolved per call from the device and dtype) or a back-end.
BACKENDS = ("auto", *ATTENTION_NAMES)
# How a sequence-parallel degree shards attention (the schema's `sequence_parallel`): auto = Ulysses where the
# heads allow it, else ring attention.
SP_KINDS = ("auto", "ulysses", "ring")
