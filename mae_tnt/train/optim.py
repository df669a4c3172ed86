"""Optimizer construction: AdamW with MAE's decay rules, and layer-wise LR decay groups for fine-tuning.

No weight decay on 1-D parameters (norms, biases, LRC scalars) and on every name the model lists in
`no_weight_decay()`. Classifiers list their position tables and class token, as MAE's fine-tuning exempts them. MAE
pretraining models list only the encoder's learned position tables (TNT's, SReT's; MAE's own are fixed): MAE pretrains
with timm's `add_weight_decay` and no skip list, which decays the class and mask tokens. Grouping is timm's
(`param_groups_weight_decay`, `param_groups_layer_decay`), driven by the model's `no_weight_decay` and `group_matcher`.
"""

from __future__ import annotations

import torch
from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from torch import nn


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float | None = None) -> list[dict]:
    """Parameter groups, skipping frozen parameters and dropping empty groups (DeepSpeed rejects them)."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    if layer_decay is None:
        groups = param_groups_weight_decay(model, weight_decay, no_weight_decay_list=skip)
    else:
        groups = param_groups_layer_decay(model, weight_decay, no_weight_decay_list=skip, layer_decay=layer_decay)
    return [g for g in groups if g["params"]]


def build_adamw(model: nn.Module, *, lr: float, weight_decay: float, betas: tuple[float, float], fused: bool,
                layer_decay: float | None = None) -> torch.optim.AdamW:
    """AdamW over `param_groups`; the fused kernel when every parameter lives on a CUDA device."""
    groups = param_groups(model, weight_decay, layer_decay)
    on_cuda = all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused and on_cuda)
