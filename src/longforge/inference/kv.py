"""Where the inference engine keeps keys and values: buffers on the device sized once per sequence, or pinned host
memory staged through two GPU slots, with as many layers resident on the GPU as fit."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from longforge.inference.kernels import causal_attention, decode_attention


class DeviceKV:
    """Keys and values of every layer in buffers on the compute device, (rows, capacity, Hkv, D) each, allocated once.

    Two ways to write. Prefill: a chunk for the run of rows `select`ed, all holding `length` positions, attended
    causally to everything before it. Decoding (`decode`): one position per row at that row's own length (`lens`,
    on the device), each row's query attending to its own positions only; nothing on the host changes from step to
    step, so a CUDA graph can replay it. Rows of a batch may hold different lengths.
    """

    def __init__(self, capacity: int, rows: int | None = None):
        self.capacity = capacity
        self.rows = rows  # None: as many as the first chunk has
        self.length = 0
        self.calls = 0
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        self.first, self.last = 0, rows  # the rows a prefill chunk writes
        self.decoding = False
        self.lens: torch.Tensor | None = None  # decoding: each row's position of its new token
        self.used: torch.Tensor | None = None  # decoding: keys per row once the new one is written (int32)
        self.row_index: torch.Tensor | None = None

    def select(self, first: int, last: int, length: int) -> None:
        """Prefill rows first..last-1 next, each holding `length` positions already."""
        self.first, self.last, self.length = first, last, length
        self.decoding = False

    def decode(self, lens: torch.Tensor) -> None:
        """Decode every row from here, row b's next position being lens[b]: copied into the store's own tensor, so a
        graph captured on it sees new values."""
        if self.lens is None or self.lens.shape != lens.shape:
            self.lens = torch.empty_like(lens)
            self.row_index = torch.arange(lens.shape[0], device=lens.device)
        self.lens.copy_(lens)
        self.decoding = True

    def step(self) -> None:
        """Before a decoding forward: the keys each row will have (its length plus the new one), on the device."""
        assert self.lens is not None
        self.used = (self.lens + 1).to(torch.int32)

    def advance(self) -> None:
        """After a decoding forward: every row is one position longer (on the device)."""
        assert self.lens is not None
        self.lens.add_(1)

    def _buffers(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer not in self.k:
            rows = self.rows if self.rows is not None else k.shape[0]
            self.rows = rows
            _, hkv, _, d = k.shape
            # Zeros, not empty memory: the masked decoding path gives positions past a row's length no weight,
            # and a zero weight times a NaN left in uninitialised memory would still be NaN.
            self.k[layer] = k.new_zeros(rows, self.capacity, hkv, d)
            self.v[layer] = v.new_zeros(rows, self.capacity, hkv, d)
        return self.k[layer], self.v[layer]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
        """Write this chunk's k/v for `layer` and attend its queries: prefill causally, decoding row by row."""
        self.calls += 1
        kb, vb = self._buffers(layer, k, v)
        if self.decoding:
            assert self.used is not None and self.row_index is not None and self.lens is not None
            kb[self.row_index, self.lens] = k[:, :, 0]
            vb[self.row_index, self.lens] = v[:, :, 0]
            return decode_attention(q, kb, vb, self.used, scale)
        rows = slice(self.first, self.last)
        end = self.length + k.shape[2]
        kb[rows, self.length:end].copy_(k.transpose(1, 2))
        vb[rows, self.length:end].copy_(v.transpose(1, 2))
        return causal_attention(q, kb[rows, :end].transpose(1, 2), vb[rows, :end].transpose(1, 2), scale)

    def share(self, source: int, targets: tuple[int, ...], start: int, end: int) -> None:
        """Copy positions start..end of row `source` into each target row, in every layer (a shared prefix)."""
        for buffers in (self.k, self.v):
            for buf in buffers.values():
                for t in targets:
                    buf[t, start:end].copy_(buf[source, start:end])

    def commit(self, n: int) -> None:
        """Advance past a prefill chunk once every layer has seen it."""
        self.length += n

    def finish(self) -> None:
        """Nothing is in flight for device buffers."""


class OffloadedKV:
    """Keys and values in pinned CPU memory, except `resident` layers kept on the GPU; two GPU slots stage the rest.

    An offloaded layer's new keys/values go to a GPU slot and are copied to the host on a side stream; the next
    offloaded layer's past is copied in while this layer (and any resident layers after it) compute. Buffers are
    sequence-major (L, B, Hkv, D) on both sides, so every transfer is one contiguous DMA (a strided pinned copy
    would silently go through pageable memory and stall the host). Prefill moves little; each decoding step
    moves every offloaded layer's cache over PCIe, which bounds its speed (resident layers cost nothing).
    On a CPU device the same logic runs without streams (tests use that).
    """

    def __init__(self, capacity: int, n_layers: int, device: torch.device, pool: HostPool,
                 resident: frozenset[int] = frozenset()):
        self.capacity, self.device, self.pool = capacity, device, pool
        self.cuda = device.type == "cuda"
        self.length = 0
        self.calls = 0
        self.resident = DeviceKV(capacity)
        self.resident_layers = resident
        offloaded = [layer for layer in range(n_layers) if layer not in resident]
        # Each offloaded layer prefetches the next one (the last wraps to the first, for the next forward).
        self.next_offloaded = {layer: offloaded[(i + 1) % len(offloaded)] for i, layer in enumerate(offloaded)}
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.slots: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.slot_free: list[Any] = [None, None]
        self.slot_of: dict[int, int] = {}
        self.ready: dict[int, Any] = {}
        self.shape: tuple[int, int, int, torch.dtype] | None = None

    def _side(self) -> Any:
        """The side stream's context (a no-op on CPU)."""
        return torch.cuda.stream(self.stream) if self.cuda else contextlib.nullcontext()

    def _event(self, stream: Any) -> Any:
        """An event recorded on `stream` now (None on CPU)."""
        if not self.cuda:
            return None
        ev = torch.cuda.Event()
        ev.record(stream)
        return ev

    def _wait(self, stream: Any, event: Any) -> None:
        if self.cuda and event is not None:
            stream.wait_event(event)

    def _host(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.shape is not None
        b, hkv, d, dtype = self.shape
        return self.pool.get(layer, (self.capacity, b, hkv, d), dtype, pinned=self.cuda)

    def _prefetch(self, layer: int, slot: int, past: int) -> None:
        """Copy the first `past` positions of `layer` from the host into GPU slot `slot`, on the side stream."""
        with self._side():
            self._wait(self.stream, self.slot_free[slot])
            if past > 0:
                hk, hv = self._host(layer)
                sk, sv = self.slots[slot]
                sk[:past].copy_(hk[:past], non_blocking=True)
                sv[:past].copy_(hv[:past], non_blocking=True)
            self.ready[layer] = self._event(self.stream)
        self.slot_of[layer] = slot

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
        """Append this chunk's k/v for `layer` (GPU slot and host), attend, and prefetch the next offloaded layer."""
        self.calls += 1
        if layer in self.resident_layers:
            return self.resident.attend(layer, q, k, v, scale)
        compute = torch.cuda.current_stream(self.device) if self.cuda else None
        if self.shape is None:
            b, hkv, _, d = k.shape
            self.shape = (b, hkv, d, k.dtype)
            self.slots = [(k.new_empty(self.capacity, b, hkv, d), v.new_empty(self.capacity, b, hkv, d)) for _ in range(2)]
        if layer not in self.slot_of:  # only the very first call: nothing was prefetched yet
            self._prefetch(layer, 1 - next(iter(self.slot_of.values())) if self.slot_of else 0, self.length)
        slot = self.slot_of.pop(layer)
        self._wait(compute, self.ready.pop(layer))
        sk, sv = self.slots[slot]
        end = self.length + k.shape[2]
        sk[self.length:end].copy_(k.permute(2, 0, 1, 3))
        sv[self.length:end].copy_(v.permute(2, 0, 1, 3))
        written = self._event(compute)
        hk, hv = self._host(layer)
        with self._side():
            self._wait(self.stream, written)
            hk[self.length:end].copy_(sk[self.length:end], non_blocking=True)
            hv[self.length:end].copy_(sv[self.length:end], non_blocking=True)
        out = causal_attention(q, sk[:end].permute(1, 2, 0, 3), sv[:end].permute(1, 2, 0, 3), scale)
        self.slot_free[slot] = self._event(compute)
        nxt = self.next_offloaded[layer]
        # A later layer of this forward sees the past; the first one of the next forward also sees this chunk.
        self._prefetch(nxt, 1 - slot, self.length if nxt > layer else end)
        return out

    def commit(self, n: int) -> None:
        """Advance past a chunk once every layer has seen it."""
        self.length += n
        self.resident.commit(n)

    def finish(self) -> None:
        """Wait for the side stream, so host buffers can be reused."""
        if self.stream is not None:
            self.stream.synchronize()


def resident_layers(n_layers: int, per_layer: int, free: float) -> int:
    """Layers whose caches can stay on the GPU in `free` bytes: all of them, or as many as fit beside two staging slots."""
    if n_layers * per_layer <= free:
        return n_layers
    return max(0, min(n_layers - 1, int((free - 2 * per_layer) // per_layer)))


def spread_layers(count: int, n_layers: int) -> frozenset[int]:
    """`count` layer indices spread evenly, so transfers of the offloaded layers overlap resident layers' compute."""
    if count <= 0:
        return frozenset()
    return frozenset(int(i * n_layers // count + n_layers // (2 * count)) % n_layers for i in range(count))


class HostPool:
    """Pinned CPU buffers kept across prompts (pinning tens of GiB takes seconds), grown when a prompt needs more."""

    def __init__(self) -> None:
        self.buffers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def get(self, layer: int, shape: tuple[int, ...], dtype: torch.dtype, pinned: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of this layer's (pinned) key and value buffers with the given shape."""
        n = 1
        for s in shape:
            n *= s
        have = self.buffers.get(layer)
        if have is None or have[0].numel() < n or have[0].dtype != dtype:
            have = (torch.empty(n, dtype=dtype, pin_memory=pinned), torch.empty(n, dtype=dtype, pin_memory=pinned))
            self.buffers[layer] = have
        return have[0][:n].view(shape), have[1][:n].view(shape)
