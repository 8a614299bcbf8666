"""Greedy generation for long prompts: chunked prefill into a KV cache, logits only at the last position.

Two paths. The longforge path (standard full-attention decoders such as Llama, Mistral without a sliding
window, Qwen) runs the model's own layers but keeps keys and values in buffers sized once for the whole
sequence (no concatenation per chunk), optionally in pinned CPU memory with a two-slot prefetch so the GPU
holds two layers' caches at a time, and computes causal attention of a chunk against its past with
the fastest exact kernel for the shape (inference/kernels.py: cuDNN, split at the chunk's start, for prefill;
FlashAttention for decoding; no materialised mask). The HF path (any other model) uses
transformers' DynamicCache and the model's own attention. Both compute logits for the last position only.
"""

from __future__ import annotations

import contextlib
import inspect
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal, Protocol

import torch

from longforge.inference.kv import DeviceKV, HostPool, OffloadedKV, resident_layers, spread_layers
from longforge.model.attention import CONTEXT_ATTR, AttentionContext, attention_layers, bind_attention, context_of, register
from longforge.model.loss import chunked_lm_loss

PREFILL_CHUNK = 8192
KVPlace = Literal["auto", "device", "cpu"]
GIB = 2**30
AttentionPath = Literal["auto", "longforge", "hf"]


class TextGenerator(Protocol):
    """Anything that continues equal-length prompts greedily (the engine, or a test oracle)."""

    def generate(self, prompts: torch.Tensor, max_new_tokens: int,
                 stop: Callable[[int, list[int]], bool] | None = None) -> list[list[int]]: ...


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
                 attention: AttentionPath = "auto", stop_on_eos: bool = True, gpu_memory_gib: float | None = None):
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
        self.last: dict[str, float] = {}  # timings of the last generate call (benchmarks read them)
        self.placement: dict[str, int] = {}  # where the last store kept each layer's keys and values

    def _sync(self) -> float:
        """Wall time after the device finished its queued work (timings must not stop at a kernel launch)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def describe(self) -> dict[str, Any]:
        """The settings a result file records."""
        kv = self.kv_cache if self.path == "longforge" else "device (transformers DynamicCache)"
        return {"path": self.path, "prefill_chunk": self.prefill_chunk, "kv_cache": kv, "gpu_memory_gib": self.gpu_memory_gib,
                "device": str(self.device), "dtype": str(next(self.model.parameters()).dtype).replace("torch.", "")}

    def _store(self, capacity: int, batch: int = 1) -> DeviceKV | OffloadedKV:
        """The KV store for one batch: on the device, offloaded, or (auto) as many layers resident as fit."""
        n_layers = self.model.config.num_hidden_layers
        resident = {"device": n_layers, "cpu": 0}.get(self.kv_cache)
        if resident is None:  # auto
            resident = self._resident_layers(capacity, batch)
        self.placement = {"kv_layers_on_gpu": resident, "kv_layers_in_host_memory": n_layers - resident}
        if resident == n_layers:
            return DeviceKV(capacity)
        return OffloadedKV(capacity, n_layers, self.device, self.pool, spread_layers(resident, n_layers))

    def _resident_layers(self, capacity: int, batch: int) -> int:
        """How many layers' caches fit on the GPU under the memory budget next to the weights and one chunk's work."""
        cfg = self.model.config
        hidden = cfg.hidden_size
        head_dim = getattr(cfg, "head_dim", None) or hidden // cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        elem = next(self.model.parameters()).element_size()
        per_layer = 2 * batch * capacity * kv_heads * head_dim * elem
        # One chunk's activations: the MLP's ~4 intermediate-wide tensors and ~16 hidden-wide ones (residual, norms,
        # projections, attention outputs and their fp32 merge); an over-estimate on the benchmarked 8B shape.
        inter = getattr(cfg, "intermediate_size", None) or 4 * hidden
        work = batch * min(self.prefill_chunk, capacity) * (4 * inter + 16 * hidden) * elem
        if self.gpu_memory_gib is not None:
            budget = self.gpu_memory_gib * GIB
        else:
            budget = 0.9 * torch.cuda.get_device_properties(self.device).total_memory
        return resident_layers(cfg.num_hidden_layers, per_layer, budget - torch.cuda.memory_allocated(self.device) - work)

    @contextlib.contextmanager
    def _attached(self, store: DeviceKV | OffloadedKV) -> Iterator[None]:
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

    def _run_decoder(self, ids: torch.Tensor, start: int, store: DeviceKV | OffloadedKV) -> torch.Tensor:
        """Hidden states of positions start..start+n through the decoder, appending their keys/values to `store`."""
        pos = torch.arange(start, start + ids.shape[1], device=self.device).expand(ids.shape[0], -1)
        before = store.calls
        h = self.model.model(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state
        if store.calls - before != self.model.config.num_hidden_layers:
            raise RuntimeError(f"{type(self.model).__name__} did not route attention through the inference store")
        store.commit(ids.shape[1])
        return h

    @torch.no_grad()
    def generate(self, prompts: torch.Tensor, max_new_tokens: int,
                 stop: Callable[[int, list[int]], bool] | None = None) -> list[list[int]]:
        """Greedy continuation of equal-length prompts (B, L): new tokens per row, ended by EOS, `stop` or the limit.

        `stop(row, tokens)` says when a row's answer is complete (the task's score can no longer change).
        """
        if self.path == "longforge":
            try:
                return self._generate_longforge(prompts, max_new_tokens, stop)
            except RuntimeError as e:
                if "did not route attention" not in str(e):
                    raise
                self.path = "hf"
        return self._generate_hf(prompts, max_new_tokens, stop)

    def _finished(self, rows: list[list[int]], nxt: torch.Tensor, done: list[bool],
                  stop: Callable[[int, list[int]], bool] | None) -> list[bool]:
        """Append each unfinished row's new token and update which rows are done."""
        for i, t in enumerate(nxt.tolist()):
            if done[i]:
                continue
            if t in self.stop_ids:
                done[i] = True
                continue
            rows[i].append(t)
            if stop is not None and stop(i, rows[i]):
                done[i] = True
        return done

    def _generate_longforge(self, prompts: torch.Tensor, max_new_tokens: int,
                            stop: Callable[[int, list[int]], bool] | None) -> list[list[int]]:
        prompts = prompts.to(self.device)
        b, n = prompts.shape
        store = self._store(n + max_new_tokens, b)
        head = self.model.get_output_embeddings()
        with self._attached(store):
            t0 = self._sync()
            h = None
            for start in range(0, n, self.prefill_chunk):
                h = self._run_decoder(prompts[:, start:start + self.prefill_chunk], start, store)
            assert h is not None
            nxt = head(h[:, -1]).argmax(-1)
            del h
            t1 = self._sync()
            rows: list[list[int]] = [[] for _ in range(b)]
            done = [False] * b
            steps = 0
            for i in range(max_new_tokens):
                done = self._finished(rows, nxt, done, stop)
                if all(done) or i + 1 == max_new_tokens:
                    break
                h = self._run_decoder(nxt[:, None], n + i, store)
                nxt = head(h[:, -1]).argmax(-1)
                steps += 1
            t2 = self._sync()
            self.last = {"prefill_s": t1 - t0, "decode_s": t2 - t1, "decode_steps": steps, "prompt_tokens": b * n,
                         **self.placement}
            return rows

    def _generate_hf(self, prompts: torch.Tensor, max_new_tokens: int,
                     stop: Callable[[int, list[int]], bool] | None) -> list[list[int]]:
        from transformers import DynamicCache

        model = self.model
        prompts = prompts.to(self.device)
        b, n = prompts.shape
        cache = DynamicCache(config=model.config)
        logits = None
        for start in range(0, n, self.prefill_chunk):
            chunk = prompts[:, start:start + self.prefill_chunk]
            logits = model(input_ids=chunk, use_cache=True, logits_to_keep=1, **{self.cache_kw: cache}).logits
        assert logits is not None
        nxt = logits[:, -1].argmax(-1)
        rows: list[list[int]] = [[] for _ in range(b)]
        done = [False] * b
        for i in range(max_new_tokens):
            done = self._finished(rows, nxt, done, stop)
            if all(done) or i + 1 == max_new_tokens:
                break
            logits = model(input_ids=nxt[:, None], use_cache=True, logits_to_keep=1, **{self.cache_kw: cache}).logits
            nxt = logits[:, -1].argmax(-1)
        return rows

    @torch.no_grad()
    def window_nll(self, ids: torch.Tensor, score_last: int | None = None) -> tuple[float, int]:
        """Summed next-token NLL and target count of one window (1, L), scoring only its last `score_last` tokens.

        Prefills in chunks, so activations stay bounded however long the window; the LM head runs on the
        scored positions only, in blocks (no full logits tensor).
        """
        ids = ids.to(self.device)
        n = ids.shape[1]
        first_target = 1 if score_last is None else max(1, n - score_last)
        head = self.model.get_output_embeddings()
        if self.path != "longforge" or n <= self.prefill_chunk:
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
