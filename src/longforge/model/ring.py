"""Ring attention: sequence parallelism for any head count.

Each rank of a sequence-parallel group of P keeps the queries of its part of the sequence and passes its keys and
values around the ring (P - 1 shifts); the partial outputs of the P blocks are combined by their log-sum-exp.

- Balance: zigzag sharding. The sequence is cut into 2P chunks and rank r holds chunks r and 2P-1-r, so every rank
  does the same causal work: its diagonal block, then per step either both query chunks against the first key
  chunk (keys from a lower rank) or the second query chunk against both key chunks (keys from a higher rank).
  The tokens, positions, labels and loss weights follow the same permutation (`zigzag_index`); the loss is a sum
  over tokens, so nothing is permuted back.
- Document masks: every rank holds the whole row's document ids, so a block's mask is computed where it is used:
  causal on global positions and within one document. Packed documents never see each other across shards.
- Gradients: the forward is made of differentiable pieces. The block kernel returns (out, lse) with gradients
  through both (plain torch on CPU, FlexAttention on CUDA), the combination is torch arithmetic, and the K/V
  shift is an autograd Function whose backward sends the gradient the other way around the ring.
- Memory: autograd keeps each block's keys and values (the whole sequence's K/V of the layer on every rank: with
  grouped-query attention 2 x kv_heads x head_dim per token, 1.5 KiB per token in bf16 for SmolLM2's 3 KV heads),
  each block's output and lse in fp32 (P x the local attention output), and the plain CPU kernel its score matrix.
  Under activation checkpointing this lives for one layer at a time.
- Communication: one message per step (keys and values stacked); the next shift is started before the current
  block is computed and waited for after, so on GPUs the transfer overlaps the block's kernel. The backward's
  shifts are synchronous.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

# A masked score: finite, so a row with no allowed key in a block gets a weight of exactly 0 when blocks are
# combined (exp(-1e30 - lse) underflows to 0) and never a NaN in backward (exp(-inf - -inf)).
MASKED = -1e30
# What per_batch made, by key: (the document-id tensor it was made from, that tensor's version and extra keys, value).
_derived: dict[str, tuple[torch.Tensor | None, tuple[Any, ...], Any]] = {}
_flex_compiled: Any = None


def zigzag_index(length: int, size: int, rank: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Global positions of the tokens `rank` of `size` holds of a `length`-token sequence: chunks rank and 2*size-1-rank of 2*size."""
    c = length // (2 * size)
    first = torch.arange(rank * c, (rank + 1) * c, device=device)
    second = torch.arange((2 * size - 1 - rank) * c, (2 * size - rank) * c, device=device)
    return torch.cat([first, second])


def _exchange(x: torch.Tensor, group: Any, send_to: int, recv_from: int) -> tuple[torch.Tensor, list[Any]]:
    """Send x to one rank and receive a tensor of its shape from another; the received buffer and the pending work."""
    x = x.contiguous()
    out = torch.empty_like(x)
    ops = [dist.P2POp(dist.isend, x, send_to, group), dist.P2POp(dist.irecv, out, recv_from, group)]
    return out, dist.batch_isend_irecv(ops)


class _Shift(torch.autograd.Function):
    """Pass a tensor one step along the ring (receive the previous rank's); backward passes the gradient back.

    The forward does not wait: the caller waits for `pending` before reading the result, so the transfer overlaps
    whatever runs in between.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any, nxt: int, prv: int, pending: list[Any]) -> torch.Tensor:  # type: ignore[override]
        ctx.group, ctx.nxt, ctx.prv = group, nxt, prv
        out, works = _exchange(x, group, nxt, prv)
        pending.extend(works)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        # This rank's output came from the previous rank: its gradient goes back there, and the gradient of the
        # tensor this rank sent comes from the next one.
        out, works = _exchange(grad, ctx.group, ctx.prv, ctx.nxt)
        for w in works:
            w.wait()
        return out, None, None, None, None


def _allowed(q_pos: torch.Tensor, k_pos: torch.Tensor, q_docs: torch.Tensor | None,
             k_docs: torch.Tensor | None) -> torch.Tensor:
    """(B or 1, Sq, Sk) boolean: causal on global positions and, with document ids, within one document."""
    mask = (q_pos[:, None] >= k_pos[None, :])[None]
    if q_docs is not None and k_docs is not None:
        mask = mask & (q_docs[:, :, None] == k_docs[:, None, :])
    return mask


def block_plain(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
                q_docs: torch.Tensor | None, k_docs: torch.Tensor | None, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One block in plain torch (any device, exact): output (B, H, Sq, D) and lse (B, H, Sq), in fp32 or wider."""
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    wide = torch.promote_types(q.dtype, torch.float32)
    s = torch.matmul(q.to(wide), k.to(wide).transpose(-1, -2)) * scale
    s = s.masked_fill(~_allowed(q_pos, k_pos, q_docs, k_docs)[:, None], MASKED)
    lse = torch.logsumexp(s, dim=-1)
    return torch.matmul(torch.exp(s - lse[..., None]), v.to(wide)), lse


def block_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, q_docs: torch.Tensor | None, k_docs: torch.Tensor | None,
                size: int = 128) -> Any:
    """A FlexAttention BlockMask built from per-block ranges (never the dense Sq x Sk mask).

    A block pair is skipped when no query can follow a key or their document ranges do not overlap (a necessary
    condition for one shared document, whatever the ids), and full when every query follows every key and both
    blocks hold one and the same document; the rest are partial and run the exact per-token mask.
    """
    from torch.nn.attention.flex_attention import BlockMask

    def ranges(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Smallest and largest value of every block of `size` along the last dimension."""
        extra = -(-x.shape[-1] // size) * size - x.shape[-1]
        # The last block is padded with values that cannot widen its range: the row's max for the min, and back.
        for_min = torch.cat([x, x.amax(-1, keepdim=True).expand(*x.shape[:-1], extra)], -1)
        for_max = torch.cat([x, x.amin(-1, keepdim=True).expand(*x.shape[:-1], extra)], -1)
        return for_min.unflatten(-1, (-1, size)).amin(-1), for_max.unflatten(-1, (-1, size)).amax(-1)

    qp_lo, qp_hi = ranges(q_pos)
    kp_lo, kp_hi = ranges(k_pos)
    some = (qp_hi[:, None] >= kp_lo[None, :])[None]  # (1, nQ, nK)
    full = (qp_lo[:, None] >= kp_hi[None, :])[None]
    if q_docs is not None and k_docs is not None:
        qd_lo, qd_hi = ranges(q_docs)
        kd_lo, kd_hi = ranges(k_docs)
        some = some & (qd_lo[:, :, None] <= kd_hi[:, None, :]) & (kd_lo[:, None, :] <= qd_hi[:, :, None])
        one = (qd_lo[:, :, None] == qd_hi[:, :, None]) & (kd_lo[:, None, :] == kd_hi[:, None, :])
        full = full & one & (qd_lo[:, :, None] == kd_lo[:, None, :])
    partial = some & ~full

    def ordered(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        counts = dense.sum(-1).to(torch.int32)[:, None]
        order = torch.argsort((~dense).to(torch.int8), dim=-1, stable=True).to(torch.int32)[:, None]
        return counts, order

    docs_q, docs_k = q_docs, k_docs

    def mask_mod(b: Any, h: Any, qi: Any, ki: Any) -> Any:
        ok = q_pos[qi] >= k_pos[ki]
        if docs_q is not None and docs_k is not None:
            ok = ok & (docs_q[b, qi] == docs_k[b, ki])
        return ok

    kv_num, kv_idx = ordered(partial)
    full_num, full_idx = ordered(full)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=size, mask_mod=mask_mod,
                                    seq_lengths=(q_pos.shape[0], k_pos.shape[0]))


def block_flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
               q_docs: torch.Tensor | None, k_docs: torch.Tensor | None, scale: float,
               mask: Any = None, compiled: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """One block with FlexAttention (gradients flow through its lse): output (B, H, Sq, D) and lse, both fp32."""
    from torch.nn.attention.flex_attention import AuxRequest, flex_attention

    global _flex_compiled
    fn: Any = flex_attention
    if compiled:
        if _flex_compiled is None:
            _flex_compiled = torch.compile(flex_attention, dynamic=False)
        fn = _flex_compiled
    if mask is None:
        mask = block_mask(q_pos, k_pos, q_docs, k_docs)
    out, aux = fn(q, k, v, block_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1],
                  return_aux=AuxRequest(lse=True))
    return out.float(), aux.lse.float()


def _merge(out: torch.Tensor, lse: torch.Tensor, o: torch.Tensor, l: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two partial attentions over disjoint keys combined into one (by their log-sum-exp)."""
    new = torch.logaddexp(lse, l)
    return out * torch.exp(lse - new)[..., None] + o * torch.exp(l - new)[..., None], new


def _plan(p: int, length: int, device: torch.device, doc_ids: torch.Tensor | None) -> dict[str, Any]:
    """Global positions and document ids of every rank's shard (what each ring step's block mask needs)."""
    pos = [zigzag_index(length, p, i, device) for i in range(p)]
    docs = [doc_ids.to(device)[:, i] for i in pos] if doc_ids is not None else [None] * p
    return {"pos": pos, "docs": docs, "masks": {}}


def per_batch(key: str, doc_ids: torch.Tensor | None, make: Callable[[], Any], *extra: Any) -> Any:
    """What is derived from one micro-batch's document ids (and `extra`), made once and reused by every layer and
    by recomputation.

    The entry holds the tensor itself and compares by identity: a freed tensor's id and memory are reused by the
    next ones (the CUDA allocator hands the same block to a same-sized tensor), so a key of id and address could
    give one micro-batch's document boundaries to the next. An in-place change (a new version) makes it again.
    """
    tag = (doc_ids._version if doc_ids is not None else None, *extra)
    hit = _derived.get(key)
    if hit is not None and hit[0] is doc_ids and hit[1] == tag:
        return hit[2]
    value = make()
    _derived[key] = (doc_ids, tag, value)
    return value


def _cached_plan(p: int, r: int, length: int, device: torch.device, doc_ids: torch.Tensor | None) -> dict[str, Any]:
    """The plan of one micro-batch, shared by every layer and by recomputation."""
    return per_batch("ring-plan", doc_ids, lambda: _plan(p, length, device, doc_ids), p, r, length, str(device))


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_ids: torch.Tensor | None, sp: Any,
                   scale: float | None, kernel: str = "plain") -> torch.Tensor:
    """Causal attention of this rank's zigzag shard of queries (B, H, S/P, D) over the whole sequence's keys.

    k and v are this rank's shard (B, KV, S/P, D), any number of KV heads; `doc_ids` (B, S) the whole rows' document
    ids (None: causal only); `sp` the group (size, rank, group); `kernel` 'plain' or 'flex' per block.
    """
    p, r = sp.size, sp.rank
    b, h, sl, d = q.shape
    scale = d ** -0.5 if scale is None else scale
    half = sl // 2
    plan = _cached_plan(p, r, sl * p, q.device, doc_ids)
    nxt = dist.get_global_rank(sp.group, (r + 1) % p)
    prv = dist.get_global_rank(sp.group, (r - 1) % p)
    kvh = k.shape[1]
    kv = torch.cat([k, v], dim=1)  # one message per step
    q_pos, q_docs = plan["pos"][r], plan["docs"][r]
    out = lse = torch.empty(0)
    for t in range(p):
        src = (r - t) % p
        pending: list[Any] = []
        incoming = _Shift.apply(kv, sp.group, nxt, prv, pending) if t + 1 < p else None
        kt, vt = kv[:, :kvh], kv[:, kvh:]
        k_pos, k_docs = plan["pos"][src], plan["docs"][src]
        # Zigzag: keys from a lower rank are all earlier than both query chunks but only their first chunk is;
        # keys from a higher rank are all later than the first query chunk and earlier than the second.
        rows = slice(0, sl) if src <= r else slice(half, sl)
        keys = slice(0, sl) if src >= r else slice(0, half)
        qd = q_docs[:, rows] if q_docs is not None else None
        kd = k_docs[:, keys] if k_docs is not None else None
        args = (q[:, :, rows], kt[:, :, keys], vt[:, :, keys], q_pos[rows], k_pos[keys], qd, kd, scale)
        if kernel == "flex":
            masks = plan["masks"]
            if t not in masks:
                masks[t] = block_mask(*args[3:7])
            o, l = block_flex(*args, mask=masks[t])
        else:
            o, l = block_plain(*args)
        if t == 0:
            out, lse = o, l
        elif rows.start == 0:
            out, lse = _merge(out, lse, o, l)
        else:
            mo, ml = _merge(out[:, :, half:], lse[:, :, half:], o, l)
            out, lse = torch.cat([out[:, :, :half], mo], dim=2), torch.cat([lse[:, :, :half], ml], dim=2)
        for w in pending:
            w.wait()
        if incoming is not None:
            kv = incoming
    return out.to(q.dtype)
