"""Learning-rate schedule as a pure function of the global optimizer step: linear warmup, then half-cosine; and the
run's `Plan` of steps (total, warmup, stop) and peak LR, derived from the config and the data.

No prepared scheduler: accelerate steps those `num_processes` times per optimizer step (accelerate PR #1013).

References: facebookresearch/mae `util/lr_sched.adjust_learning_rate`; nanoGPT `get_lr`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..config import ConfigError

if TYPE_CHECKING:  # annotations only
    from ..config import PretrainConfig
    from ..finetune_config import FinetuneConfig


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


@dataclass
class Plan:
    """Values derived once from the config and the data; logged and saved, never written back into the config."""

    effective_batch: int
    peak_lr: float
    batches_per_epoch: int
    steps_per_epoch: float
    total_steps: int
    warmup_steps: int
    stop_step: int


def derive_plan(cfg: PretrainConfig | FinetuneConfig, num_processes: int, batches_per_epoch: int) -> Plan:
    """The run's step plan from its config's data, optim, schedule and run sections (pretraining's or fine-tuning's)
    and the data: `batches_per_epoch` per process, over `num_processes` processes.

    Raises:
        ConfigError: optim.min_lr is above the peak LR, which the cosine would then raise towards.
    """
    effective = cfg.data.batch_size * cfg.optim.accum_steps * num_processes
    steps_per_epoch = batches_per_epoch / cfg.optim.accum_steps
    total = max(1, whole(cfg.schedule.epochs * steps_per_epoch))
    stop = min(total, cfg.run.max_steps) if cfg.run.max_steps else total
    peak_lr = cfg.optim.base_lr * effective / 256
    if cfg.optim.min_lr > peak_lr:  # the cosine would raise the LR after warmup
        raise ConfigError(f"optim.min_lr={cfg.optim.min_lr:g} is above the peak LR {peak_lr:.3g} (optim.base_lr x "
                          f"effective batch {effective} / 256): the LR would rise after warmup; lower optim.min_lr")
    return Plan(effective, peak_lr, batches_per_epoch, steps_per_epoch, total,
                whole(cfg.schedule.warmup_epochs * steps_per_epoch), stop)


def whole(count: float) -> int:
    """The whole part of a count of steps or periods, computed in floats: 0.29 epochs x 100 steps gives
    28.999999999999996, which stands for 29."""
    return math.floor(round(count, 9))
