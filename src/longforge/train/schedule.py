"""Learning-rate schedules: linear warm-up then cosine decay or constant."""

from __future__ import annotations

import math

from longforge.config import StageSpec


def lr_at(step: int, spec: StageSpec) -> float:
    """Learning rate for 0-based `step`."""
    if spec.warmup_steps and step < spec.warmup_steps:
        return spec.lr * (step + 1) / spec.warmup_steps
    if spec.schedule == "constant":
        return spec.lr
    span = max(spec.steps - spec.warmup_steps, 1)
    progress = min(max(step - spec.warmup_steps, 0) / span, 1.0)
    floor = spec.lr * spec.min_lr_ratio
    return floor + (spec.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))
