"""Learning-rate schedules: linear warmup, then linear or cosine decay to zero (or constant)."""

from __future__ import annotations

import math


def lr_multiplier(step: int, warmup_steps: int, total_steps: int, kind: str) -> float:
    """The factor on the base learning rate for 0-based optimizer step `step` (as HF's schedulers)."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    if kind == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if kind == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    return max(0.0, 1.0 - progress)
