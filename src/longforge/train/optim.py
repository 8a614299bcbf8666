"""Optimizers: AdamW, and a memory-frugal AdamW for bf16 parameters with stochastic rounding."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch


def stochastic_round_bf16(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Round fp32 to bf16 up or down at random, with probability proportional to the distance (unbiased)."""
    bits = x.float().contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=x.device, generator=generator)
    # Adding noise below the kept 16 bits and truncating rounds up with the right probability.
    rounded = (bits + noise) & -65536
    return rounded.view(torch.float32).to(torch.bfloat16)


def _local(x: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (sharing storage), or the tensor itself."""
    return x.to_local() if hasattr(x, "to_local") else x


class BF16AdamW(torch.optim.Optimizer):
    """AdamW whose parameters and moments are bf16 (8 bytes/parameter instead of 16); updates computed in fp32."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    def init_state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        """The parameter's step count and moments, made (zero) on first use."""
        state = self.state[p]
        if not state:
            # States shaped (and, under FSDP2, sharded) like the parameter, so checkpoints can save them.
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.bfloat16)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.bfloat16)
        return state

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        """One AdamW step; parameters are written back with stochastic rounding."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.init_state(p)
                state["step"] += 1
                t = float(state["step"])
                bufs = [_local(x) for x in (p, p.grad, state["exp_avg"], state["exp_avg_sq"])]
                # Slices bound the fp32 temporaries (5 per element): the 0.5B-entry embedding would need 10 GB at once.
                for local, grad, m_buf, v_buf in _slices(bufs):
                    _adamw_update(local, grad, m_buf, v_buf, group, t)


UPDATE_SLICE = 1 << 26


def _slices(bufs: list[torch.Tensor]) -> list[tuple[torch.Tensor, ...]]:
    """Matching views of consecutive UPDATE_SLICE-element pieces of same-sized tensors (whole if any is strided)."""
    if bufs[0].numel() <= UPDATE_SLICE or not all(b.is_contiguous() for b in bufs):
        return [tuple(bufs)]
    return list(zip(*(b.view(-1).split(UPDATE_SLICE) for b in bufs)))


@torch.no_grad()
def _adamw_update(local: torch.Tensor, grad: torch.Tensor, m_buf: torch.Tensor, v_buf: torch.Tensor,
                  group: dict[str, Any], t: float) -> None:
    """AdamW on one (slice of a) parameter in fp32, the moments stored back in bf16, the weight rounded stochastically."""
    b1, b2 = group["betas"]
    g = grad.float()
    m = m_buf.float().mul_(b1).add_(g, alpha=1 - b1)
    v = v_buf.float().mul_(b2).addcmul_(g, g, value=1 - b2)
    m_buf.copy_(m)
    v_buf.copy_(v)
    denom = (v / (1 - b2**t)).sqrt_().add_(group["eps"])
    w = local.float()
    w.mul_(1 - group["lr"] * group["weight_decay"])
    w.addcdiv_(m, denom, value=-group["lr"] / (1 - b1**t))
    local.copy_(stochastic_round_bf16(w) if local.dtype == torch.bfloat16 else w)


class StepInBackward:
    """Runs the optimizer on each parameter as soon as autograd has its whole gradient, then frees the gradient.

    At any moment only the gradients not yet applied exist (with checkpointing, about one layer's), instead of
    all of them: 2 bytes per parameter in bf16, 15 GiB for an 8B model. The optimizer itself is unchanged (its
    step() updates the parameters that have a gradient, here one), so its state saves and loads as usual.
    Global-norm clipping is impossible (the norm is known only after the last update); the norm is still measured.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self._sq: torch.Tensor | None = None
        for p in model.parameters():
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(self._step)

    def _step(self, p: torch.Tensor) -> None:
        sq = p.grad.detach().float().pow(2).sum()
        self._sq = sq if self._sq is None else self._sq + sq
        self.optimizer.step()
        p.grad = None  # the only gradient that exists now: the others are either applied or not yet made

    def grad_norm(self) -> float:
        """The global gradient norm of the last backward pass (then forgotten)."""
        sq, self._sq = self._sq, None
        return float(sq.sqrt()) if sq is not None else 0.0


def param_groups(model: Any, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only (not on norms, biases or other 1-D parameters)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


Groups = list[dict[str, Any]]
# name -> factory(parameter groups, lr, betas, a parameter) -> optimizer; the schema's `optimizer` names these.
OptimizerFactory = Callable[[Groups, float, tuple[float, float], torch.Tensor], torch.optim.Optimizer]


def adamw(groups: Groups, lr: float, betas: tuple[float, float], first: torch.Tensor) -> torch.optim.Optimizer:
    """AdamW with fp32 states: the fused kernel for plain CUDA tensors, the default (foreach) path for FSDP2's
    sharded DTensors and on CPU."""
    fused = first.device.type == "cuda" and not hasattr(first, "to_local")
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=1e-8, fused=fused or None)


def adamw_bf16(groups: Groups, lr: float, betas: tuple[float, float], first: torch.Tensor) -> torch.optim.Optimizer:
    """BF16AdamW: bf16 states and weights, updates rounded stochastically (needs precision: bf16)."""
    return BF16AdamW(groups, lr=lr, betas=betas, eps=1e-8)


OPTIMIZERS: dict[str, OptimizerFactory] = {"adamw": adamw, "adamw_bf16": adamw_bf16}


def make_optimizer(model: Any, name: str, lr: float, betas: tuple[float, float], weight_decay: float) -> torch.optim.Optimizer:
    """The optimizer `name` of OPTIMIZERS over the model's parameters, weight decay on matrices only."""
    return OPTIMIZERS[name](param_groups(model, weight_decay), lr, betas, next(model.parameters()))
