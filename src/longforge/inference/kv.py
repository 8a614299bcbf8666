"""Where the inference engine keeps keys and values: buffers on the device sized once per sequence, or pinned host
memory staged through two GPU slots, with as many layers resident on the GPU as fit."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from longforge.inference.kernels import causal_attention


class DeviceKV:
    """Keys and values of every layer in buffers on the compute device, allocated once per sequence."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.length = 0
        self.calls = 0
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
        """Append this chunk's k/v for `layer` and attend the chunk's queries to everything so far."""
        self.calls += 1
        if layer not in self.k:
            b, hkv, _, d = k.shape
            self.k[layer] = k.new_empty(b, hkv, self.capacity, d)
            self.v[layer] = v.new_empty(b, hkv, self.capacity, d)
        end = self.length + k.shape[2]
        self.k[layer][:, :, self.length:end].copy_(k)
        self.v[layer][:, :, self.length:end].copy_(v)
        return causal_attention(q, self.k[layer][:, :, :end], self.v[layer][:, :, :end], scale)

    def commit(self, n: int) -> None:
        """Advance past a chunk once every layer has seen it."""
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
