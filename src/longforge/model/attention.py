"""Attention with document masks, plugged into transformers through its attention interface.

Back-ends (ATTENTION_BACKENDS): `dense` (exact reference, any device), `sdpa` (causal, no document mask), `varlen`
(flash attention over packed documents, CUDA) and `flex` (FlexAttention with a document block mask, CUDA).
With Ulysses sequence parallelism the heads are redistributed around the attention call; with ring attention
(model/ring.py: any head count) the keys and values travel around the sequence-parallel group instead.

What the attention function needs beyond q, k and v is one typed AttentionContext, bound to the model's attention
layers when the model is prepared (back-end, sequence-parallel group, or the inference engine's KV store); the only
thing a forward call passes is the document ids of its packed tokens (the `lf_doc_ids` keyword, DOC_IDS).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from longforge.model.names import ATTENTION_NAMES, BACKENDS  # noqa: F401 - BACKENDS re-exported
from longforge.model.parallel import SequenceParallel, heads_to_seq, seq_to_heads, spread_kv
from longforge.model.ring import block_mask, per_batch, ring_attention

ATTN_NAME = "longforge"
# The one keyword a forward call passes through transformers to the attention: document ids (B, S) of packed tokens.
DOC_IDS = "lf_doc_ids"
# Where an attention layer holds its bound context (a plain attribute: not a parameter, never saved).
CONTEXT_ATTR = "_lf_attention"
_registered: set[str] = set()
# Query elements one attention call is given at most. Kernels index with signed 32-bit offsets in places (2^31 is
# a hard limit), and a backward's scratch grows with its call: an fp32 query-gradient accumulator and, under GQA,
# key/value gradients expanded to every query head. One call of 4 query heads over 4M tokens (8-way sequence
# parallelism) asked for 16 GiB of it. 2^28 (64K tokens x 32 heads x 128) bounds that to a few GiB, each call
# still has thousands of thread blocks (benchmarks/attention_gpu.py --split: the same speed), and 64K tokens or
# fewer per GPU stay one call.
CALL_ELEMENTS = 2**28


class KVStore(Protocol):
    """A key/value cache that owns attention for one sequence (the inference engine's stores)."""

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               scale: float | None) -> torch.Tensor: ...


@dataclass(frozen=True)
class AttentionContext:
    """How longforge attention runs in one model: bound once to its attention layers, not passed per call.

    `backend` is a name of BACKENDS (`auto` is resolved per call from the device and dtype); `sp` the
    sequence-parallel group and its kind, Ulysses or ring (None: the whole sequence is here); `kv_store` the
    inference engine's cache, which then does the attention itself.
    """

    backend: str = "auto"
    sp: SequenceParallel | None = None
    kv_store: KVStore | None = None


DEFAULT_CONTEXT = AttentionContext()


def attention_layers(model: Any) -> list[torch.nn.Module]:
    """The modules transformers hands to the attention function (those that know their layer index)."""
    return [m for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int)]


def bind_attention(model: Any, context: AttentionContext) -> int:
    """Bind `context` to every attention layer of the model; how many layers were bound."""
    layers = attention_layers(model)
    for m in layers:
        setattr(m, CONTEXT_ATTR, context)
    return len(layers)


def context_of(module: Any) -> AttentionContext:
    """The context bound to an attention layer (the default one where nothing was bound)."""
    ctx = getattr(module, CONTEXT_ATTR, None)
    return ctx if isinstance(ctx, AttentionContext) else DEFAULT_CONTEXT


def document_causal_mask(doc_ids: torch.Tensor, kv_len: int | None = None) -> torch.Tensor:
    """Boolean (B, 1, S, S) mask: causal and within the same document (True = may attend)."""
    s = doc_ids.shape[-1]
    kv_len = kv_len or s
    causal = torch.ones(s, kv_len, dtype=torch.bool, device=doc_ids.device).tril(diagonal=kv_len - s)
    same = doc_ids[:, :, None] == doc_ids[:, None, :]
    return (same & causal)[:, None]


def resolve_backend(backend: str, device: torch.device, document_mask: bool, half: bool = True) -> str:
    """The back-end `auto` means: on CUDA varlen (document masks, bf16 weights), flex (fp32, autocast) or sdpa; dense on CPU."""
    if backend != "auto":
        return backend
    if device.type == "cuda":
        # With document masks varlen (flash) ran forward + backward 1.8x faster than compiled flex at 64K tokens in
        # 8 documents on an H100 (benchmarks/attention_gpu.py); flash takes only half precision, flex any.
        if document_mask:
            return "varlen" if half else "flex"
        return "sdpa"
    return "dense"


def _dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_ids: torch.Tensor | None,
           mask: torch.Tensor | None, scale: float | None) -> torch.Tensor:
    if doc_ids is not None:
        mask = document_causal_mask(doc_ids.to(q.device), k.shape[-2])
    if mask is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return causal_sdpa(q, k, v, scale)


def causal_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
    """Causal attention of the last q positions against k/v in one SDPA call, the mask aligned to the last key."""
    gqa = q.shape[1] != k.shape[1]
    q_len, kv_len = q.shape[-2], k.shape[-2]
    if q_len == kv_len:
        return F.scaled_dot_product_attention(q, k, v, is_causal=q_len > 1, scale=scale, enable_gqa=gqa)
    # Decoding against a cache: new queries see every cached key and the causal part of themselves.
    causal = torch.ones(q_len, kv_len, dtype=torch.bool, device=q.device).tril(diagonal=kv_len - q_len)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal, scale=scale, enable_gqa=gqa)


def cu_seqlens(doc_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Cumulative document lengths over the flattened batch (every row starts a document) and the longest one."""
    b, s = doc_ids.shape
    new = torch.ones_like(doc_ids, dtype=torch.bool)
    new[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    starts = torch.nonzero(new.reshape(-1), as_tuple=True)[0]
    cu = torch.cat([starts, torch.tensor([b * s], device=doc_ids.device)]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def _varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_ids: torch.Tensor, scale: float | None) -> torch.Tensor:
    from torch.nn.attention.varlen import varlen_attn

    b, h, s, d = q.shape
    cu, longest = per_batch("varlen", doc_ids, lambda: cu_seqlens(doc_ids))
    kwargs: dict[str, Any] = {"scale": scale}
    params = inspect.signature(varlen_attn).parameters
    if "is_causal" in params:
        kwargs["is_causal"] = True
    else:
        kwargs["window_size"] = (-1, 0)
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:  # older PyTorch: give every query head its own copy of its KV head
            k, v = (t.repeat_interleave(h // t.shape[1], dim=1) for t in (k, v))
    flat = [t.transpose(1, 2).reshape(b * s, t.shape[1], d) for t in (q, k, v)]
    out = varlen_attn(*flat, cu, cu, longest, longest, **kwargs)
    return out.reshape(b, s, h, d).transpose(1, 2)


_flex_compiled: Any = None


def _flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_ids: torch.Tensor | None, scale: float | None) -> torch.Tensor:
    from torch.nn.attention.flex_attention import flex_attention

    global _flex_compiled
    if _flex_compiled is None:
        _flex_compiled = torch.compile(flex_attention, dynamic=False)
    s = q.shape[2]

    def make() -> Any:
        # From per-block ranges: create_block_mask first builds the dense B x S x S mask (its int64 index
        # intermediates were 128 GiB for 4 rows of 64K tokens). Without documents: causal only, for every row.
        pos = torch.arange(s, device=q.device)
        docs = doc_ids.to(q.device) if doc_ids is not None else None
        return block_mask(pos, pos, docs, docs)

    block = per_batch("flex", doc_ids, make, s, str(q.device))
    return _flex_compiled(q, k, v, block_mask=block, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


def head_split(q_heads: int, kv_heads: int, elements_per_q_head: int, budget: int = CALL_ELEMENTS) -> tuple[int, int]:
    """Query and KV heads per attention call: the fewest calls whose queries stay within `budget` elements.

    Whole groups of KV heads (with their query heads) while they fit; else part of one KV head's query heads,
    down to one query head per call.
    """
    ratio = q_heads // kv_heads
    for kv in range(kv_heads, 0, -1):
        if kv_heads % kv == 0 and kv * ratio * elements_per_q_head <= budget:
            return kv * ratio, kv
    for q in range(ratio, 0, -1):
        if ratio % q == 0 and q * elements_per_q_head <= budget:
            return q, 1
    return 1, 1


def split_heads(fn: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, budget: int | None = None) -> torch.Tensor:
    """fn(q, k, v) over head slices (see head_split; budget CALL_ELEMENTS unless given), outputs concatenated over heads."""
    budget = CALL_ELEMENTS if budget is None else budget  # read at call time, so a benchmark can set it
    nq, nkv = head_split(q.shape[1], k.shape[1], q.numel() // q.shape[1], budget)
    if nq == q.shape[1]:
        return fn(q, k, v)
    span = nkv * q.shape[1] // k.shape[1]  # query heads per slice of nkv KV heads
    ks, vs = k.split(nkv, dim=1), v.split(nkv, dim=1)
    return torch.cat([fn(qi, ks[i * nq // span], vs[i * nq // span]) for i, qi in enumerate(q.split(nq, dim=1))], dim=1)


def _sdpa_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
    """Causal flash attention (cuDNN or flash, as SDPA picks), one call per head slice."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


@dataclass(frozen=True)
class Backend:
    """One attention back-end: the calls it can take (others run the exact dense path) and how it runs them."""

    name: str
    fits: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None], bool]
    run: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, float | None], torch.Tensor]
    fp32_instead: str | None = None  # the back-end fp32 queries take (a kernel for half precision only)


def _square(q: torch.Tensor, k: torch.Tensor) -> bool:
    return q.shape[-2] == k.shape[-2]


ATTENTION_BACKENDS: dict[str, Backend] = {b.name: b for b in (
    Backend("dense", lambda q, k, docs, mask: mask is None, lambda q, k, v, docs, scale: _dense(q, k, v, docs, None, scale)),
    Backend("sdpa", lambda q, k, docs, mask: docs is None and mask is None and _square(q, k),
            lambda q, k, v, docs, scale: split_heads(lambda a, b, c: _sdpa_causal(a, b, c, scale), q, k, v)),
    # Flash takes half precision only: fp32 queries go to flex (under autocast, attend casts them as SDPA does).
    Backend("varlen", lambda q, k, docs, mask: docs is not None and _square(q, k),
            lambda q, k, v, docs, scale: split_heads(lambda a, b, c: _varlen(a, b, c, docs, scale), q, k, v),  # type: ignore[arg-type]
            fp32_instead="flex"),
    # FlexAttention's kernels need a head dimension of at least 16; tiny models use the exact dense path.
    Backend("flex", lambda q, k, docs, mask: _square(q, k) and q.shape[-1] >= 16,
            lambda q, k, v, docs, scale: _flex(q, k, v, docs, scale)),
)}
# The schema's names (model/names.py, torch-free) and the back-ends here must be the same.
assert tuple(ATTENTION_BACKENDS) == ATTENTION_NAMES, "model/names.py's ATTENTION_NAMES must list every back-end"


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_ids: torch.Tensor | None, backend: str,
           scale: float | None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention (B, H, S, D) -> (B, H, S, D), within documents when doc_ids is given."""
    chosen = ATTENTION_BACKENDS[backend]
    if chosen.fp32_instead and q.dtype == torch.float32:
        if q.is_cuda and torch.is_autocast_enabled("cuda"):
            # Under autocast SDPA computes in the autocast dtype; the flash varlen kernel is given the same inputs
            # (RoPE leaves the queries in fp32), rather than the slower fp32 flex path.
            half = torch.get_autocast_dtype("cuda")
            q, k, v = q.to(half), k.to(half), v.to(half)
        else:
            chosen = ATTENTION_BACKENDS[chosen.fp32_instead]
    if chosen.fits(q, k, doc_ids, mask):
        return chosen.run(q, k, v, doc_ids, scale)
    return _dense(q, k, v, doc_ids, mask, scale)


def ring_kernel(backend: str, q: torch.Tensor) -> str:
    """The block kernel of ring attention: FlexAttention on CUDA (it returns the lse and takes any block mask) unless
    the exact dense path was asked for or the head dimension is below flex's 16; plain torch elsewhere."""
    return "flex" if q.is_cuda and backend != "dense" and q.shape[-1] >= 16 else "plain"


def longforge_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function, as the layer's bound context says: the inference engine's KV store, or
    causal attention within documents, with Ulysses' all-to-all around it or as ring attention under sequence
    parallelism."""
    ctx = context_of(module)
    if ctx.kv_store is not None:
        out = ctx.kv_store.attend(module.layer_idx, query, key, value, scaling)  # type: ignore[arg-type]
        return out.transpose(1, 2).contiguous(), None
    doc_ids: torch.Tensor | None = kwargs.get(DOC_IDS)
    backend = resolve_backend(ctx.backend, query.device, doc_ids is not None, query.dtype != torch.float32)
    sp = ctx.sp
    if sp is not None and sp.size > 1 and sp.kind == "ring":
        out = ring_attention(query, key, value, doc_ids, sp, scaling, ring_kernel(backend, query))
        return out.transpose(1, 2).contiguous(), None
    if sp is not None and sp.size > 1:
        key, value = spread_kv(key, sp.size), spread_kv(value, sp.size)
        query, key, value = (seq_to_heads(t, sp.group, sp.size) for t in (query, key, value))
    out = attend(query, key, value, doc_ids, backend, scaling, attention_mask)
    if sp is not None and sp.size > 1:
        out = heads_to_seq(out, sp.group, sp.size)
    return out.transpose(1, 2).contiguous(), None


def _no_mask(*args: Any, **kwargs: Any) -> None:
    """Mask builder for attention functions that make their own masks: transformers must not build one."""
    return None


def register_attention(name: str, fn: Any) -> str:
    """Register an attention function (and no mask builder) with transformers under `name`, once."""
    if name not in _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        AttentionInterface.register(name, fn)
        AttentionMaskInterface.register(name, _no_mask)
        _registered.add(name)
    return name


def register() -> str:
    """Register longforge's attention with transformers (idempotent); returns its name."""
    return register_attention(ATTN_NAME, longforge_attention)


def use_longforge_attention(model: Any, context: AttentionContext = DEFAULT_CONTEXT) -> int:
    """Switch a loaded transformers model to longforge attention with `context` bound; how many layers it bound."""
    model.set_attn_implementation(register())
    return bind_attention(model, context)
