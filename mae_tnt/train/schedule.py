"""Learning-rate schedule as a pure function of the global optimizer step: linear warmup, then half-cosine.

No prepared scheduler: accelerate steps those `num_processes` times per optimizer step (accelerate PR #1013).

References: facebookresearch/mae `util/lr_sched.adjust_learning_rate`; nanoGPT `get_lr`.
"""

from __future__ import annotations

import math


def lr_at(step: int, *, peak_lr: float, total_steps: int, warmup_steps: int, min_lr: float = 0.0) -> float:
    """LR for optimizer step `step` (0-based)."""
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def set_lr(optimizer, lr: float) -> None:
    """Apply `lr` to every group, scaled by the group's `lr_scale` (layer-wise decay) when present."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
