"""The inference engine: greedy long-prompt generation and chunked scoring, with its own KV cache and kernels.

engine.py holds Engine (chunked prefill, batched decoding of prompts of any lengths, window NLL), kv.py where keys
and values live (device buffers with a length per row, or pinned host memory), kernels.py the causal attention of a
chunk against its past and of a decoding step against each row's length, prefill.py which positions a batch
computes (shared prefixes once), decode.py the decoding loop (host visits every few tokens, CUDA graphs), sharded.py
one prompt's keys and values sharded by sequence over a torchrun job's processes (prompts longer than one GPU
holds). The evaluation tasks (eval/) use it; it knows nothing of them, nor of training.
"""

from longforge.inference.engine import PREFILL_CHUNK, Engine, TextGenerator, as_engine, greedy_generate

__all__ = ["PREFILL_CHUNK", "Engine", "TextGenerator", "as_engine", "greedy_generate"]
