"""The pieces of MAE's reconstruction loss: the norm-pix target and the mean over hidden units only.

Each unit's target is its pixels normalised by their own mean and standard deviation (MAE's `norm_pix_loss`: 85.4
fine-tuning / 73.9 linear-probe accuracy against 84.9 / 73.5 for plain pixels in the paper's ablation), and the
per-unit errors are averaged over the hidden units only (a loss on all pixels cost about 0.5%).

References: facebookresearch/mae `models_mae.forward_loss`.
"""

from __future__ import annotations

import torch


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` where `mask` is 1 (both [B, L]); 0 when nothing is hidden, e.g. at mask_ratio=0, where the
    reference divides 0 by 0 and returns NaN."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1)


def pixel_stats(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation over the last dim, [..., 1] each: MAE's norm-pix statistics of every unit (the
    unbiased variance, plus 1e-6 so that a flat unit does not divide by zero)."""
    return pixels.mean(dim=-1, keepdim=True), (pixels.var(dim=-1, keepdim=True) + 1e-6) ** 0.5


def normalize_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """Each unit's pixels [..., P] normalised by its own `pixel_stats` (the norm-pix target)."""
    mean, std = pixel_stats(pixels)
    return (pixels - mean) / std
