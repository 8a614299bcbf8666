"""Greedy generation for long prompts: chunked prefill into a KV cache, logits only at the last position.

Two paths. The longforge path (standard full-attention decoders such as Llama, Mistral without a sliding
window, Qwen) runs the model's own layers but keeps keys and values in buffers sized once for the whole
sequence (no concatenation per chunk), optionally in pinned CPU memory with a two-slot prefetch so the GPU
holds two layers' caches at a time, and computes causal attention of a chunk against its past with
the fastest exact kernel for the shape (inference/kernels.py: cuDNN, split at the chunk's start, for prefill;
FlashAttention for decoding; no materialised mask). The HF path (any other model) uses
transformers' DynamicCache and the model's own attention. Both compute logits for the last position only.

Batches (`generate`) may hold prompts of different lengths. On the longforge path their keys and values share one
buffer per layer (rows x capacity); rows are sorted by length and tokens, each is prefilled into its own row (rows
of equal length together, and a prefix several rows share computed once and copied: inference/prefill.py), then
all rows decode together, each at its own position and attending to its own length (kv.DeviceKV,
kernels.decode_attention). The host looks at the new tokens every `sync_every` steps (inference/decode.py), and on
CUDA the decoding step is captured once per batch shape as a CUDA graph and replayed. Where the cache does not fit
on the GPU (it is offloaded), and on the HF path, rows of equal length run together instead.
Under torchrun, a prompt whose cache does not fit one GPU (or every prompt, with kv_shards N) runs on every process of
its group together, each keeping a shard of the keys and values (inference/sharded.py; `kv_shards_for` decides).
`Engine(model, ragged=False, cuda_graphs="off", sync_every=1, prefix_reuse=False)` is the engine as it was before
batches could be ragged (benchmarks compare against it).
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch

from longforge.errors import LongforgeError
from longforge.inference.decode import DecodeState, GraphStep, Stop, run_decode
from longforge.inference.fusion import decode_kernels, fused_decoding
from longforge.inference.rope_rows import per_row_rope, rows_rotated
from longforge.inference.kv import DeviceKV, HostPool, OffloadedKV, resident_layers, spread_layers
from longforge.inference.prefill import Fill, Share, Step, Worth, computed_tokens, prefill_plan, shared_tokens
from longforge.inference.sharded import KVGroup, KVShards, ShardedKV, shard_sizes
from longforge.model.attention import CONTEXT_ATTR, AttentionContext, attention_layers, bind_attention, context_of, register
from longforge.model.fused import fused_available
from longforge.model.loss import chunked_lm_loss

PREFILL_CHUNK = 8192
# Rows of a Fill prefill together up to this many tokens per forward pass (a batch of many short prompts would
# otherwise put all its rows' chunks, and their activations, in one pass).
PREFILL_BATCH_TOKENS = 131072
CPU_BATCH_TOKENS = 131072  # an evaluation batch's prompt tokens on a CPU (eval/task.py uses it too)
KVPlace = Literal["auto", "device", "cpu"]
GIB = 2**30
AttentionPath = Literal["auto", "longforge", "hf"]
GraphMode = Literal["auto", "off"]
DecodeGemm = Literal["cublas", "triton"]
Prompts = torch.Tensor | Sequence[Sequence[int]]
# Steps between host visits: each visit costs a sync and the stop callbacks; a row that ended keeps computing until
# the next one, so this bounds the wasted steps (answers are a few to a few hundred tokens).
SYNC_EVERY = 8
# A prefix shared by several rows of a batch is computed once when at least this long (a shorter one is not worth
# the separate forward passes it needs).
PREFIX_MIN = 512
# What sharing a prefix costs on a GPU: the prefix's own forward pass and fills that no longer run together, ~40 ms
# a share on an H200 (measured with benchmarks/eval_engine.py on a 16K grid of 8 depths: 12 more fills cost the
# SmolLM2-135M shape 0.48 s, 2.3x slower prefill, while the 1B and 8B shapes gained 1.2x and 1.4x). A prefix is shared
# when the work it saves, at PREFILL_FLOPS, takes longer than that.
SHARE_OVERHEAD_S = 0.04
PREFILL_FLOPS = 5e14
# Rows of a batch are prefilled padded to a multiple of this (cuDNN builds an execution plan for each new length,
# tens of milliseconds; RULER's prompts of one nominal length differ by up to a sixteenth).
PAD_TO = 256
# Summed over the groups of a batch that runs in groups of equal length (the rest of engine.last is the last group's).
SUMMED = ("prefill_s", "decode_s", "decode_steps", "host_visits", "prompt_tokens", "prefill_tokens",
          "prefix_saved_tokens")


class TextGenerator(Protocol):
    """Anything that continues prompts greedily (the engine, or a test oracle)."""

    def generate(self, prompts: Prompts, max_new_tokens: int,
                 stop: Callable[[int, list[int]], bool] | None = None) -> list[list[int]]: ...


def token_rows(prompts: Prompts) -> list[list[int]]:
    """Prompts as lists of token ids: rows of a (B, L) tensor, or token lists (or 1-D tensors) of any lengths."""
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() != 2:
            raise ValueError(f"prompts must be a (batch, length) tensor of token ids, not of shape "
                             f"{tuple(prompts.shape)}")
        rows = prompts.tolist()
    else:
        rows = [r.tolist() if isinstance(r, torch.Tensor) else [int(t) for t in r] for r in prompts]
    if any(not r for r in rows):
        raise ValueError("a prompt has no tokens; every prompt needs at least one")
    return rows


@dataclass
class _Graphed:
    """A batch shape's cache and decoding state kept between calls, with the decoding step captured on them."""

    key: tuple[Any, ...]
    store: DeviceKV
    state: DecodeState
    step: GraphStep


@dataclass
class _Batch:
    """A batch's rows sorted by length and tokens (`order` maps them back), and what its prefill computes."""

    rows: list[list[int]]
    order: list[int]
    plan: list[Step]

    @classmethod
    def sorted(cls, rows: list[list[int]], min_shared: int | None, pad_to: int | None,
               worth: Worth | None = None) -> _Batch:
        order = sorted(range(len(rows)), key=lambda i: (len(rows[i]), rows[i]))
        srt = [rows[i] for i in order]
        return cls(srt, order, prefill_plan(srt, min_shared, pad_to, worth))

    @property
    def lengths(self) -> list[int]:
        return [len(r) for r in self.rows]

    @property
    def filled(self) -> int:
        """Positions the prefill writes in the longest row (padding included)."""
        return max(s.end for s in self.plan if isinstance(s, Fill))


def share_worth(model: Any) -> Worth:
    """Whether a prefix shared by some rows saves more time than the forward passes its sharing adds (GPU)."""
    cfg = model.config
    layer_params = sum(p.numel() for n, p in model.named_parameters() if ".layers." in n)
    d_attn = cfg.num_attention_heads * (getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)

    def worth(start: int, end: int, copies: int) -> bool:
        # Each copy saves end - start positions, each 2 N for the matmuls and 4 d_attn per earlier key for attention.
        per_token = 2.0 * layer_params + 4.0 * cfg.num_hidden_layers * d_attn * (start + end) / 2
        return copies * (end - start) * per_token / PREFILL_FLOPS > SHARE_OVERHEAD_S

    return worth


def dynamic_rope(model: Any) -> bool:
    """Whether the model rescales RoPE by the longest position of each forward pass (dynamic NTK)."""
    cfg = model.config
    params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    return isinstance(params, dict) and params.get("rope_type") == "dynamic"


def reset_dynamic_rope(model: Any) -> None:
    """Put dynamic NTK rotary modules back to their original frequencies: transformers only grows them between calls,
    so a prompt would otherwise be rotated for the longest prompt before it (its generate depends on what ran first)."""
    for m in model.modules():
        if "dynamic" in str(getattr(m, "rope_type", "")) and hasattr(m, "original_inv_freq"):
            if getattr(m, "max_seq_len_cached", 0) > getattr(m, "original_max_seq_len", 0):
                m.register_buffer("inv_freq", m.original_inv_freq.to(m.inv_freq.device), persistent=False)
                m.max_seq_len_cached = m.original_max_seq_len


def supports_longforge_path(model: Any) -> bool:
    """True for decoders whose every layer is plain full attention reached through transformers' attention interface."""
    cfg = model.config
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
        return False
    if any(t != "full_attention" for t in (getattr(cfg, "layer_types", None) or [])):
        return False
    if getattr(cfg, "attn_logit_softcapping", None):
        return False
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or not hasattr(model, "set_attn_implementation"):
        return False
    return all(hasattr(getattr(layer, "self_attn", None), "layer_idx") for layer in layers)


def _accepts_attention(model: Any) -> bool:
    """True when transformers lets this model switch to the inference attention (some architectures refuse)."""
    previous = model.config._attn_implementation
    try:
        model.set_attn_implementation(register())
    except (ValueError, NotImplementedError, AttributeError):
        return False
    model.set_attn_implementation(previous)
    return True


def cache_keyword(model: Any) -> str:
    """The name the model's forward takes its KV cache by: `cache` where it has one, else `past_key_values`.

    Newer transformers (5.24 here) renamed the argument, warn on the old name and drop it in 5.40; older ones
    (5.17) know only the old name. A forward naming neither (checkpoint code taking **kwargs) gets the old name,
    which checkpoint code written for either kind of version understands.
    """
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # a forward without a readable signature (a C extension, a partial)
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def eos_ids(model: Any) -> set[int]:
    """End-of-sequence token ids from the model's generation config (or config)."""
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}


class Engine:
    """Greedy long-prompt generation and chunked scoring for one loaded causal LM."""

    def __init__(self, model: Any, prefill_chunk: int = PREFILL_CHUNK, kv_cache: KVPlace = "auto",
                 attention: AttentionPath = "auto", stop_on_eos: bool = True, gpu_memory_gib: float | None = None,
                 ragged: bool = True, cuda_graphs: GraphMode = "auto", sync_every: int = SYNC_EVERY,
                 prefix_reuse: bool = True, prefix_min: int = PREFIX_MIN, pad_to: int | None = PAD_TO,
                 fused: GraphMode = "auto", kv_shards: KVShards = "auto", kv_group: KVGroup | None = None,
                 decode_gemm: DecodeGemm = "cublas"):
        if sync_every < 1:
            raise ValueError(f"sync_every must be at least 1 (steps between host visits), not {sync_every}")
        if cuda_graphs not in ("auto", "off"):
            raise ValueError(f"cuda_graphs must be 'auto' or 'off', not {cuda_graphs!r}")
        if decode_gemm not in ("cublas", "triton"):
            raise ValueError(f"decode_gemm must be 'cublas' or 'triton', not {decode_gemm!r}")
        self.model = model
        self.prefill_chunk = prefill_chunk
        self.device = next(model.parameters()).device
        self.kv_cache = kv_cache if self.device.type == "cuda" else "device"  # offloading only means something on a GPU
        self.gpu_memory_gib = gpu_memory_gib
        if attention == "auto":
            attention = "longforge" if supports_longforge_path(model) and _accepts_attention(model) else "hf"
        self.path: AttentionPath = attention
        self.stop_ids = eos_ids(model) if stop_on_eos else set()
        self.cache_kw = cache_keyword(model)  # read once: the signature does not change while the engine lives
        self.pool = HostPool()
        # Dynamic NTK rotates by the longest position of each forward pass: a prompt prefilled in chunks, or decoded
        # beside longer rows, would be rotated otherwise than transformers' generate rotates it (the whole prompt in
        # one pass, then each new token at the row's own length). Such models prefill in one pass, rows of equal length.
        self.one_pass = dynamic_rope(model)
        # ...and decode beside rows of other lengths only with each row's own frequencies (inference/rope_rows.py),
        # where those equal transformers' for the row alone; else rows of equal length together.
        self.row_rope = per_row_rope(model) if self.one_pass else None
        self.ragged = ragged and (not self.one_pass or self.row_rope is not None)  # prompts of different lengths together
        self.cuda_graphs: GraphMode = cuda_graphs
        self.sync_every = sync_every
        # Dynamic RoPE rotates a row's keys for its whole length: no prefix shared between rows, no padding.
        self.prefix_min: int | None = max(1, prefix_min) if prefix_reuse and not self.one_pass else None
        self.worth = share_worth(model) if self.device.type == "cuda" else None  # on CPU a pass costs little
        self.pad_to = pad_to if pad_to and pad_to > 1 and not self.one_pass else None
        # Decoding steps with fused RMSNorm, RoPE and SwiGLU kernels (compiled; inference/fusion.py): CUDA only.
        self.fused = fused == "auto" and fused_available(self.device)
        # A decoding step's linear layers by the weight-streaming Triton kernel (inference/skinny.py), routed with the
        # fused kernels (which need CUDA and Triton too); else torch's (cuBLAS).
        self.decode_gemm: DecodeGemm = "triton" if decode_gemm == "triton" and self.fused else "cublas"
        if decode_gemm != self.decode_gemm and self.device.type == "cuda":
            warnings.warn("longforge: decode_gemm 'triton' needs the fused decoding kernels (Triton installed, fused "
                          "not 'off'); decoding with cuBLAS", stacklevel=2)
        self.graph_failure: str | None = None  # why decoding runs eagerly after a failed capture (describe says it)
        self._graphed: _Graphed | None = None
        self.last: dict[str, Any] = {}  # timings and counts of the last generate call (benchmarks read them)
        self.placement: dict[str, int] = {}  # where the last store kept each layer's keys and values
        # Prompts longer than one GPU holds: their keys and values sharded over the processes of `kv_group`
        # (inference/sharded.py); 'auto' shards only a prompt that does not fit one device, N every prompt.
        self.kv_shards: KVShards = kv_shards
        self.kv_group = kv_group
        self.sharded_prompts: list[int] = []  # lengths of the prompts that ran sharded (describe() lists them)

    def _sync(self) -> float:
        """Wall time after the device finished its queued work (timings must not stop at a kernel launch)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def describe(self) -> dict[str, Any]:
        """The settings a result file records."""
        kv = self.kv_cache if self.path == "longforge" else "device (transformers DynamicCache)"
        return {"path": self.path, "prefill_chunk": self.prefill_chunk, "kv_cache": kv, "gpu_memory_gib": self.gpu_memory_gib,
                "device": str(self.device), "dtype": str(next(self.model.parameters()).dtype).replace("torch.", ""),
                "ragged": self.ragged, "sync_every": self.sync_every, "prefix_reuse": self.prefix_min,
                "prefill_pad_to": self.pad_to, "fused_decoding": self.fused, "decode_gemm": self.decode_gemm,
                "cuda_graphs": self._graphs_described(),
                "kv_shards": self.kv_shards, **self._shards_described(),
                **({"prefill": self._one_pass_described()} if self.one_pass else {})}

    def _one_pass_described(self) -> str:
        """How a dynamic-RoPE model's prompts run."""
        if self.ragged:
            return "one pass per prompt (dynamic RoPE), every row rotated for its own length, rows decoded together"
        return "one pass (dynamic RoPE), rows of equal length together"

    def _prefill_span(self, n: int) -> int:
        """Positions per prefill pass of an n-token prompt about to be prefilled: the chunk, or (dynamic RoPE, whose
        frequencies this resets, so the prompt is rotated for its own length) all of them."""
        if not self.one_pass:
            return self.prefill_chunk
        reset_dynamic_rope(self.model)
        return n

    def _shards_described(self) -> dict[str, Any]:
        """Which prompts ran with their keys and values sharded over processes (nothing when none did)."""
        if not self.sharded_prompts or self.kv_group is None:
            return {}
        return {"sharded_prompts": {"processes_per_prompt": self.kv_group.size, "groups": self.kv_group.count,
                                    "prompt_tokens": sorted(self.sharded_prompts)}}

    def _graphs_described(self) -> str:
        if self.graph_failure is not None:
            return f"eager: CUDA graph capture failed ({self.graph_failure})"
        if self.cuda_graphs == "off" or self.device.type != "cuda" or self.path != "longforge" or not self.ragged:
            return "off"
        return "auto"

    def _graphs_wanted(self) -> bool:
        """Whether decoding steps are captured as CUDA graphs (CUDA, not turned off, no capture failed yet)."""
        return self.cuda_graphs == "auto" and self.device.type == "cuda" and self.graph_failure is None

    def release(self) -> None:
        """Drop the cache and graph kept for the last batch shape (their GPU memory goes back to the allocator)."""
        if self._graphed is not None:
            self._graphed = None
            # At once, not at the collector's next pass: the next batch is sized by the memory allocated now (a
            # released 30 GB cache still counted once sent a 16K batch to the slow equal-length path).
            gc.collect()

    def _store(self, capacity: int, batch: int = 1) -> DeviceKV | OffloadedKV:
        """The KV store for one batch: on the device, offloaded, or (auto) as many layers resident as fit."""
        n_layers = self.model.config.num_hidden_layers
        resident = self._resident(capacity, batch)
        self.placement = {"kv_layers_on_gpu": resident, "kv_layers_in_host_memory": n_layers - resident}
        if resident == n_layers:
            return DeviceKV(capacity)
        return OffloadedKV(capacity, n_layers, self.device, self.pool, spread_layers(resident, n_layers))

    def _resident(self, capacity: int, batch: int) -> int:
        """Layers whose keys and values stay on the GPU for this batch: kv_cache's choice, or (auto) as many as fit."""
        n_layers = self.model.config.num_hidden_layers
        resident = {"device": n_layers, "cpu": 0}.get(self.kv_cache)
        return self._resident_layers(capacity, batch) if resident is None else resident

    def _resident_layers(self, capacity: int, batch: int) -> int:
        """How many layers' caches fit on the GPU under the memory budget next to the weights and one chunk's work,
        and in what the device has free now (other processes may share it: the lab runs several per GPU)."""
        per_layer = batch * capacity * self._kv_bytes_per_token() // self.model.config.num_hidden_layers
        work = self._work_bytes(capacity, batch)
        allocated = torch.cuda.memory_allocated(self.device)
        device_free = torch.cuda.mem_get_info(self.device)[0] + torch.cuda.memory_reserved(self.device) - allocated
        free = min(self._budget() - allocated, device_free) - work
        return resident_layers(self.model.config.num_hidden_layers, per_layer, free)

    def _kv_bytes_per_token(self) -> int:
        """Bytes of keys and values one position of one row takes over all layers."""
        cfg = self.model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        elem = next(self.model.parameters()).element_size()
        return 2 * cfg.num_hidden_layers * kv_heads * head_dim * elem

    def _work_bytes(self, capacity: int, batch: int) -> int:
        """One chunk's activations: the MLP's ~4 intermediate-wide tensors and ~16 hidden-wide ones (residual, norms,
        projections, attention outputs and their fp32 merge); an over-estimate on the benchmarked 8B shape."""
        cfg = self.model.config
        hidden = cfg.hidden_size
        inter = getattr(cfg, "intermediate_size", None) or 4 * hidden
        elem = next(self.model.parameters()).element_size()
        return min(batch * min(self.prefill_chunk, capacity), max(self.prefill_chunk, PREFILL_BATCH_TOKENS)) * (
            4 * inter + 16 * hidden) * elem

    def batch_tokens_budget(self) -> int:
        """Prompt tokens an evaluation batch may hold: on a GPU, what half the memory left after the weights holds as
        KV cache (the other half for prefill work and the allocator's slack); elsewhere CPU_BATCH_TOKENS.

        Computed from the weights' size, not from what the allocator holds now (a cache kept from the last batch
        differs between the processes of a torchrun job, which must all cut the same batches).
        """
        if self.device.type != "cuda" or self.path != "longforge":
            return CPU_BATCH_TOKENS
        weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
        return max(self.prefill_chunk, int(0.5 * (self._budget() - weights) / self._kv_bytes_per_token()))

    def _budget(self) -> float:
        """GPU memory the engine may use: gpu_memory_gib, else 90% of the device."""
        if self.gpu_memory_gib is not None:
            return self.gpu_memory_gib * GIB
        return 0.9 * torch.cuda.get_device_properties(self.device).total_memory

    def kv_shards_for(self, lengths: Sequence[int], max_new_tokens: int) -> int:
        """Processes that run a batch of prompts with these lengths together, their keys and values sharded: 1 (this
        process alone), or the size of the engine's group. Every process of the job computes the same answer (the
        evaluation's split of the prompts depends on it); a prompt too long even when sharded is an error here."""
        g = self.kv_group
        if g is None or not lengths:
            return 1
        if self.path != "longforge":
            if self.kv_shards == "auto":
                return 1
            raise LongforgeError(f"inference.kv_shards {self.kv_shards} needs the engine's own attention, but "
                                 f"{type(self.model).__name__} runs through transformers' cache (sliding window or "
                                 f"custom layers); set kv_shards to auto.")
        longest = max(lengths)
        if self.kv_shards == "auto":
            # Only where a prompt would not fit one GPU (its cache offloaded otherwise); kv_cache cpu asks for host memory.
            if self.device.type != "cuda" or self.kv_cache == "cpu" or self._fits_alone(longest + max_new_tokens):
                return 1
        self._check_shard_fits(longest, max_new_tokens, len(lengths))
        return g.size

    def _fits_alone(self, capacity: int) -> bool:
        """Whether one prompt's cache of `capacity` positions fits on this GPU beside the weights and one chunk's work.

        From the model's size, not the allocator's count: every process must decide the same, whatever it ran before.
        """
        need = self._weights_bytes() + self._work_bytes(capacity, 1) + capacity * self._kv_bytes_per_token()
        return need <= self._budget()

    def _weights_bytes(self) -> int:
        """Bytes of the model's parameters and buffers."""
        tensors = [*self.model.parameters(), *self.model.buffers()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def _check_shard_fits(self, length: int, max_new_tokens: int, rows: int) -> None:
        """One sentence, before any work, when this process's shard of a prompt does not fit its GPU."""
        if self.device.type != "cuda" or self.kv_group is None:
            return
        size = self.kv_group.size
        need = max(shard_sizes(length, self.prefill_chunk, size, max_new_tokens)) * rows * self._kv_bytes_per_token()
        weights = self._weights_bytes()
        work = self._work_bytes(length, rows)
        budget = self._budget()
        if weights + work + need > budget:
            raise LongforgeError(
                f"a prompt of {length:,} tokens needs {(weights + work + need) / GIB:.1f} GiB per process when sharded "
                f"over {size} processes ({need / GIB:.1f} GiB of keys and values, {weights / GIB:.1f} GiB of weights, "
                f"{work / GIB:.1f} GiB for one chunk's work), more than the {budget / GIB:.1f} GiB each GPU may use; "
                f"run on more processes (torchrun --nproc-per-node), set inference.kv_cache: cpu, or use shorter lengths.")

    @contextlib.contextmanager
    def _attached(self, store: DeviceKV | OffloadedKV | ShardedKV) -> Iterator[None]:
        """Route the model's attention through `store` while the block runs; then the model is as it was (its
        attention implementation and its layers' bound contexts), and the store's transfers have finished."""
        model = self.model
        previous = model.config._attn_implementation
        layers = attention_layers(model)
        bound = [context_of(m) for m in layers]
        model.set_attn_implementation(register())
        bind_attention(model, AttentionContext(kv_store=store))
        try:
            yield
        finally:
            store.finish()
            for m, ctx in zip(layers, bound):
                setattr(m, CONTEXT_ATTR, ctx)
            model.set_attn_implementation(previous)

    def _run_decoder(self, ids: torch.Tensor, start: int, store: DeviceKV | OffloadedKV | ShardedKV) -> torch.Tensor:
        """Hidden states of positions start..start+n through the decoder, appending their keys/values to `store`."""
        pos = torch.arange(start, start + ids.shape[1], device=self.device).expand(ids.shape[0], -1)
        before = store.calls
        h = self.model.model(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state
        if store.calls - before != self.model.config.num_hidden_layers:
            raise RuntimeError(f"{type(self.model).__name__} did not route attention through the inference store")
        store.commit(ids.shape[1])
        return h

    @torch.no_grad()
    def generate(self, prompts: Prompts, max_new_tokens: int, stop: Stop | None = None) -> list[list[int]]:
        """Greedy continuation of each prompt: new tokens per row, ended by EOS, `stop` or the limit.

        `prompts` is a (B, L) tensor or a list of token-id lists of any lengths. `stop(row, tokens)` says when a
        row's answer is complete (the task's score can no longer change). Every row's tokens are those it would get
        alone.
        """
        rows = token_rows(prompts)
        self.last = {}
        if not rows or max_new_tokens <= 0:
            return [[] for _ in rows]
        if self.kv_shards_for([len(r) for r in rows], max_new_tokens) > 1:
            self.release()  # a kept batch cache would take memory from the shard
            return self._in_groups(rows, max_new_tokens, stop, self._generate_sharded)
        if self.path == "longforge":
            try:
                return self._generate_longforge(rows, max_new_tokens, stop)
            except RuntimeError as e:
                if "did not route attention" not in str(e):
                    raise
                self.path = "hf"
                self.release()
        return self._in_groups(rows, max_new_tokens, stop, self._generate_hf)

    def _generate_longforge(self, rows: list[list[int]], max_new_tokens: int, stop: Stop | None) -> list[list[int]]:
        """The whole batch at once when its cache fits on the device; else in two ragged halves when each fits; else
        rows of equal length together."""
        note = "ragged batches are off (ragged=False)"
        if self.ragged:
            batch = _Batch.sorted(rows, self.prefix_min, self.pad_to, self.worth)
            capacity, width = self._shape(batch, max_new_tokens)
            key = (len(rows), capacity, width, tuple(sorted(self.stop_ids)), next(self.model.parameters()).data_ptr())
            if self._graphed is not None and self._graphed.key != key:
                self.release()  # before sizing: its buffers would count as used memory
            n_layers = self.model.config.num_hidden_layers
            if self._graphed is not None or self._resident(capacity, len(rows)) == n_layers:
                self.placement = {"kv_layers_on_gpu": n_layers, "kv_layers_in_host_memory": 0}
                return self._generate_ragged(batch, max_new_tokens, stop, capacity, width, key)
            if self.kv_cache == "auto" and len(rows) > 1 and self._resident(capacity, -(-len(rows) // 2)) == n_layers:
                # A cache rounded up for its graph can pass the budget the caller cut the batch by: two ragged halves
                # (shorter and longer prompts) cost far less than one equal-length group per distinct length.
                order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
                halves = [order[: len(rows) // 2], order[len(rows) // 2:]]
                return self._in_groups(rows, max_new_tokens, stop, self._generate_longforge, halves=halves,
                                       note="the batch's KV cache did not fit on the GPU: it ran in ragged halves")
            note = "the batch's KV cache does not fit on the GPU: rows of equal length ran together, offloaded"
        self.release()
        return self._in_groups(rows, max_new_tokens, stop, self._generate_group, note)

    def _shape(self, batch: _Batch, max_new_tokens: int) -> tuple[int, int]:
        """Cache capacity and token columns of a batch: exact, or with CUDA graphs rounded up (to within an eighth),
        so the batches of one length bucket share one captured graph."""
        longest = max(batch.filled, max(batch.lengths) + max_new_tokens)
        if not self._graphs_wanted():
            return longest, max_new_tokens
        width = max(16, 1 << (max_new_tokens - 1).bit_length())
        need = max(batch.filled, max(batch.lengths) + width)
        grain = max(256, 1 << max(0, need.bit_length() - 4))
        return -(-need // grain) * grain, width

    def _in_groups(self, rows: list[list[int]], max_new_tokens: int, stop: Stop | None, run: Callable[..., list[list[int]]],
                   note: str | None = None, halves: list[list[int]] | None = None) -> list[list[int]]:
        """Run rows of equal length together through `run` (a (B, L) batch each), or the given groups of rows (token
        lists each); outputs in the rows' order."""
        groups: dict[int, list[int]] = {}
        for i, r in enumerate(rows):
            groups.setdefault(len(r), []).append(i)
        parts = halves if halves is not None else list(groups.values())
        if self.one_pass and halves is None:
            # A one-pass prefill holds every row's activations at once: at most PREFILL_BATCH_TOKENS per pass (rows
            # are independent, so fewer per group changes no token).
            parts = [idx[i:i + per] for idx in parts for per in [max(1, PREFILL_BATCH_TOKENS // len(rows[idx[0]]))]
                     for i in range(0, len(idx), per)]
        out: list[list[int]] = [[] for _ in rows]
        totals: dict[str, Any] = {}
        graphs = []
        for idx in parts:
            row_stop = None if stop is None else (lambda r, toks, idx=idx: stop(idx[r], toks))
            part = [rows[i] for i in idx] if halves is not None else torch.tensor([rows[i] for i in idx])
            for i, toks in zip(idx, run(part, max_new_tokens, row_stop)):
                out[i] = toks
            for k, v in self.last.items():
                totals[k] = totals.get(k, 0) + v if k in SUMMED else v
            graphs.append(bool(self.last.get("cuda_graph")))
        self.last = {**totals, "batch": len(rows), "groups": len(parts), "cuda_graph": bool(halves) and all(graphs)}
        if note is not None and len(parts) > 1:
            self.last["ragged_fallback"] = note
        return out

    def _generate_ragged(self, batch: _Batch, max_new_tokens: int, stop: Stop | None, capacity: int,
                         width: int, key: tuple[Any, ...]) -> list[list[int]]:
        """Every row in one cache: prefill (shared prefixes once), then decode all rows together."""
        b = len(batch.rows)
        store, state, step = self._decoder(b, capacity, width, key)
        ids = torch.zeros(b, batch.filled, dtype=torch.long)
        for i, r in enumerate(batch.rows):
            ids[i, :len(r)] = torch.tensor(r)
        ids = ids.to(self.device)
        with self._attached(store), rows_rotated(self.model, self.row_rope):
            t0 = self._sync()
            first = torch.zeros(b, dtype=torch.long, device=self.device)
            with self._fused("prefill"):
                for s in batch.plan:
                    if isinstance(s, Share):
                        store.share(s.source, s.targets, s.start, s.end)
                    else:
                        self._fill(s, ids, batch.lengths, store, first)
            t1 = self._sync()
            store.decode(torch.tensor(batch.lengths, device=self.device))
            state.start(first)
            row_stop = None if stop is None else (lambda r, toks: stop(batch.order[r], toks))
            with self._fused():
                res = run_decode(state, step, max_new_tokens, row_stop, self.sync_every)
            t2 = self._sync()
        if isinstance(step, GraphStep) and step.failure is not None:
            self.graph_failure = step.failure
        prompt = sum(batch.lengths)
        self.last = {"prefill_s": t1 - t0, "decode_s": t2 - t1, "decode_steps": res.steps, "host_visits": res.visits,
                     "batch": b, "prompt_tokens": prompt, "prefill_tokens": computed_tokens(batch.plan),
                     "prefix_saved_tokens": shared_tokens(batch.plan),
                     "padding_tokens": computed_tokens(batch.plan) + shared_tokens(batch.plan) - prompt,
                     "cuda_graph": isinstance(step, GraphStep) and step.graph is not None, **self.placement}
        out: list[list[int]] = [[] for _ in batch.rows]
        for pos, i in enumerate(batch.order):
            out[i] = res.rows[pos]
        return out

    def _fill(self, s: Fill, ids: torch.Tensor, lengths: list[int], store: DeviceKV, first: torch.Tensor) -> None:
        """Prefill one Fill chunk by chunk; a row whose last position falls in a chunk gets its first new token there
        (a padded row's last position comes before the Fill's end)."""
        head = self.model.get_output_embeddings()
        # Dynamic RoPE: each row in one pass (rotated for its length), at most PREFILL_BATCH_TOKENS per pass.
        chunk = self._prefill_span(s.end - s.start)
        per_pass = max(1, max(chunk, PREFILL_BATCH_TOKENS) // min(chunk, s.end - s.start))
        for lo in range(s.first, s.last, per_pass):
            hi = min(lo + per_pass, s.last)
            for start in range(s.start, s.end, chunk):
                stop = min(start + chunk, s.end)
                store.select(lo, hi, start)
                h = self._run_decoder(ids[lo:hi, start:stop], start, store)
                ending = [r for r in range(lo, hi) if start < lengths[r] <= stop]
                if ending:
                    at = torch.tensor([lengths[r] - 1 - start for r in ending], device=self.device)
                    pick = torch.tensor([r - lo for r in ending], device=self.device)
                    first[torch.tensor(ending, device=self.device)] = head(h[pick, at]).argmax(-1)

    def _decoder(self, rows: int, capacity: int, width: int,
                 key: tuple[Any, ...]) -> tuple[DeviceKV, DecodeState, Callable[[], None]]:
        """The cache, decoding state and step for a batch: kept with a captured graph per shape, or made afresh."""
        if not self._graphs_wanted():
            store = DeviceKV(capacity, rows)
            state = DecodeState(rows, width, self.device, self.stop_ids)
            return store, state, self._ragged_step(store, state)
        if self._graphed is None:
            store = DeviceKV(capacity, rows)
            state = DecodeState(rows, width, self.device, self.stop_ids)
            self._graphed = _Graphed(key, store, state, GraphStep(self._ragged_step(store, state), self.device))
        g = self._graphed
        return g.store, g.state, g.step

    def _ragged_step(self, store: DeviceKV, state: DecodeState) -> Callable[[], None]:
        """One decoding step for every row, on the device only: the current tokens in, the next ones recorded."""
        decoder = self.model.model
        head = self.model.get_output_embeddings()
        # A prepared 4D mask makes transformers skip its mask preparation, which otherwise inspects the position
        # ids on the host (a sync per step); the store does the attention and reads no mask.
        no_mask = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=self.device)

        def step() -> None:
            store.step()
            h = decoder(input_ids=state.current[:, None], position_ids=store.lens[:, None],  # type: ignore[index]
                        attention_mask=no_mask, use_cache=False).last_hidden_state
            store.advance()
            state.record(head(h[:, -1]).argmax(-1))

        return step

    @contextlib.contextmanager
    def _fused(self, phase: str = "decode") -> Iterator[None]:
        """Decoding steps or prefill chunks with single-kernel RMSNorm, RoPE and SwiGLU (when fused), the model as it
        was after."""
        if not self.fused:
            yield
            return
        with fused_decoding(self.model, decode_kernels(phase, self.decode_gemm if phase == "decode" else "cublas")):
            yield

    def _generate_group(self, prompts: torch.Tensor, max_new_tokens: int, stop: Stop | None) -> list[list[int]]:
        """Equal-length prompts (B, L) with one length for the whole batch (the cache may be offloaded)."""
        b, n = prompts.shape
        rows = self._equal_length(prompts, max_new_tokens, stop, self._store(n + max_new_tokens, b))
        self.last = {**self.last, **self.placement}
        return rows

    def _generate_sharded(self, prompts: torch.Tensor, max_new_tokens: int, stop: Stop | None) -> list[list[int]]:
        """Equal-length prompts (B, L) run by every process of the group together, each keeping a shard of the keys
        and values (inference/sharded.py); every process returns the same tokens."""
        g = self.kv_group
        assert g is not None
        n = prompts.shape[1]
        store = ShardedKV(shard_sizes(n, self.prefill_chunk, g.size, max_new_tokens)[g.rank], g)
        rows = self._equal_length(prompts, max_new_tokens, stop, store, sharded=True)
        self.last = {**self.last, "kv_shards": g.size, "kv_positions_here": store.held[g.rank]}
        return rows

    def _equal_length(self, prompts: torch.Tensor, max_new_tokens: int, stop: Stop | None,
                      store: DeviceKV | OffloadedKV | ShardedKV, sharded: bool = False) -> list[list[int]]:
        """Prefill (B, L) prompts chunk by chunk into `store`, then decode all rows together; sharded: the new tokens
        agreed over the group, decoding steps with the fused kernels."""
        agree = self._agreed if sharded else (lambda t: t)
        prompts = prompts.to(self.device)
        b, n = prompts.shape
        head = self.model.get_output_embeddings()
        with self._attached(store):
            t0 = self._sync()
            h = None
            # A sharded store is filled chunk by chunk over the processes (dynamic RoPE then rotates per chunk too).
            span = self.prefill_chunk if sharded else self._prefill_span(n)
            for start in range(0, n, span):
                h = self._run_decoder(prompts[:, start:start + span], start, store)
            assert h is not None
            state = DecodeState(b, max_new_tokens, self.device, self.stop_ids)
            state.start(agree(head(h[:, -1]).argmax(-1)))
            del h
            t1 = self._sync()
            if sharded:
                store.decode()  # type: ignore[call-arg]
            position = [n]

            def step() -> None:
                out = self._run_decoder(state.current[:, None], position[0], store)
                position[0] += 1
                state.record(agree(head(out[:, -1]).argmax(-1)))

            with self._fused() if sharded else contextlib.nullcontext():
                res = run_decode(state, step, max_new_tokens, stop, self.sync_every)
            t2 = self._sync()
        self.last = {"prefill_s": t1 - t0, "decode_s": t2 - t1, "decode_steps": res.steps, "host_visits": res.visits,
                     "prompt_tokens": b * n, "prefill_tokens": b * n, "prefix_saved_tokens": 0}
        return res.rows

    def _agreed(self, tokens: torch.Tensor) -> torch.Tensor:
        """The group's first process's tokens on every process of the group: the same decisions everywhere."""
        import torch.distributed as dist

        assert self.kv_group is not None
        dist.broadcast(tokens, src=self.kv_group.first, group=self.kv_group.handle)
        return tokens

    def _generate_hf(self, prompts: torch.Tensor, max_new_tokens: int, stop: Stop | None) -> list[list[int]]:
        """Equal-length prompts through transformers' own cache and attention (any architecture)."""
        from transformers import DynamicCache

        model = self.model
        prompts = prompts.to(self.device)
        b, n = prompts.shape
        cache = DynamicCache(config=model.config)
        t0 = self._sync()
        logits = None
        span = self._prefill_span(n)
        for start in range(0, n, span):
            chunk = prompts[:, start:start + span]
            logits = model(input_ids=chunk, use_cache=True, logits_to_keep=1, **{self.cache_kw: cache}).logits
        assert logits is not None
        state = DecodeState(b, max_new_tokens, self.device, self.stop_ids)
        state.start(logits[:, -1].argmax(-1))
        t1 = self._sync()

        def step() -> None:
            out = model(input_ids=state.current[:, None], use_cache=True, logits_to_keep=1,
                        **{self.cache_kw: cache}).logits
            state.record(out[:, -1].argmax(-1))

        res = run_decode(state, step, max_new_tokens, stop, self.sync_every)
        t2 = self._sync()
        self.last = {"prefill_s": t1 - t0, "decode_s": t2 - t1, "decode_steps": res.steps, "host_visits": res.visits,
                     "prompt_tokens": b * n, "prefill_tokens": b * n, "prefix_saved_tokens": 0}
        return res.rows

    @torch.no_grad()
    def window_nll(self, ids: torch.Tensor, score_last: int | None = None) -> tuple[float, int]:
        """Summed next-token NLL and target count of one window (1, L), scoring only its last `score_last` tokens.

        Prefills in chunks, so activations stay bounded however long the window; the LM head runs on the
        scored positions only, in blocks (no full logits tensor).
        """
        self.release()  # the cache kept for batches' decoding: its memory is better free for this window
        ids = ids.to(self.device)
        n = ids.shape[1]
        first_target = 1 if score_last is None else max(1, n - score_last)
        head = self.model.get_output_embeddings()
        span = self._prefill_span(n)
        if self.path != "longforge" or n <= span:
            h = self.model.model(input_ids=ids, use_cache=False).last_hidden_state
            return _nll_part(h, ids, 0, first_target, head, chunked_lm_loss)
        store = self._store(n)
        total, count = 0.0, 0
        with self._attached(store):
            for start in range(0, n, self.prefill_chunk):
                h = self._run_decoder(ids[:, start:start + self.prefill_chunk], start, store)
                s, c = _nll_part(h, ids, start, first_target, head, chunked_lm_loss)
                total += s
                count += c
        return total, count


def _nll_part(h: torch.Tensor, ids: torch.Tensor, start: int, first_target: int, head: torch.nn.Module,
              loss_fn: Callable[..., torch.Tensor]) -> tuple[float, int]:
    """NLL of the targets predicted by hidden states of positions start..start+len(h) (target index >= first_target)."""
    n = ids.shape[1]
    length = h.shape[1]
    pos = torch.arange(start, start + length, device=ids.device)
    labels = torch.full((1, length), -100, dtype=torch.long, device=ids.device)
    valid = pos + 1 < n
    labels[0, valid] = ids[0, (pos + 1)[valid]]
    weights = (valid & (pos + 1 >= first_target)).float()[None]
    labels = torch.where(weights > 0, labels, torch.zeros_like(labels))
    total = loss_fn(h, head, labels, weights)
    return float(total), int(weights.sum())


def as_engine(model_or_engine: Any, **settings: Any) -> Any:
    """An Engine for a model, or the object itself when it already generates (an Engine or a test oracle)."""
    if hasattr(model_or_engine, "generate") and not isinstance(model_or_engine, torch.nn.Module):
        return model_or_engine
    return Engine(model_or_engine, **settings)


@torch.no_grad()
def greedy_generate(model: Any, prompts: torch.Tensor, max_new_tokens: int, prefill_chunk: int = PREFILL_CHUNK,
                    stop_ids: Sequence[int] | set[int] | None = None) -> torch.Tensor:
    """Greedy continuation of equal-length prompts (B, L); returns exactly max_new_tokens new tokens (B, N).

    Kept for callers that want a tensor; EOS does not stop it unless listed in stop_ids (then rows are cut at
    the first row-wide stop and padded with the stop token).
    """
    engine = Engine(model, prefill_chunk=prefill_chunk, stop_on_eos=False)
    engine.stop_ids = set(stop_ids or ())
    rows = engine.generate(prompts, max_new_tokens)
    pad = min(engine.stop_ids) if engine.stop_ids else 0
    width = max(len(r) for r in rows) if engine.stop_ids else max_new_tokens
    out = [r + [pad] * (width - len(r)) for r in rows]
    return torch.tensor(out, dtype=torch.long)
