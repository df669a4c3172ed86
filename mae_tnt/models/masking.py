"""Per-sample random masking from injected noise, exactly as in MAE.

Polarity, stated once for the whole project: `mask` is 1 where a unit is HIDDEN from the encoder and 0 where it is
visible. The lowest-noise units are kept, so passing the same `noise` reproduces the same mask.

References: facebookresearch/mae `models_mae.random_masking`; hiera `get_random_mask` (injectable masks).
"""

from __future__ import annotations

import torch


def num_visible(num_units: int, mask_ratio: float) -> int:
    """Units the encoder sees: int(L * (1 - r)), at least one."""
    return max(1, int(num_units * (1 - mask_ratio)))


def rounded_mask_ratio(num_units: int, mask_ratio: float) -> str | None:
    """The units hidden at `mask_ratio`, e.g. "3 of 4 units hidden (0.75)", when whole units move the ratio by more
    than 0.01 (few units: SReT's 32-px ones, small images); else None."""
    hidden = num_units - num_visible(num_units, mask_ratio)
    if abs(hidden / num_units - mask_ratio) <= 0.01:
        return None
    return f"{hidden} of {num_units} units hidden ({hidden / num_units:.3g})"


def random_masking(noise: torch.Tensor, num_keep: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Turn per-unit noise into a mask.

    Args:
        noise: [B, L] uniform noise; ascending order decides which units stay visible.
        num_keep: visible units per sample.

    Returns:
        ids_keep: [B, K] indices of the visible units, in noise order.
        ids_restore: [B, L] inverse permutation that puts shuffled units back in raster order.
        mask: [B, L] float, 1 = hidden, 0 = visible, in raster order.
    """
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :num_keep]
    mask = torch.ones(noise.shape, device=noise.device)  # float whatever the noise: a permutation works as noise too
    mask[:, :num_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)
    return ids_keep, ids_restore, mask


def upsample_grid_mask(mask: torch.Tensor, grid: int, factor: int) -> torch.Tensor:
    """One flag per cell of a square grid -> one per pixel (or token) of each cell: [N, g * g] -> [N, g*f, g*f]."""
    n = mask.shape[0]
    cells = mask.reshape(n, grid, 1, grid, 1).expand(n, grid, factor, grid, factor)  # [N, g, f, g, f]
    return cells.reshape(n, grid * factor, grid * factor)  # [N, g*f, g*f]


def gather_units(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Select units along dim 1: [B, L, *rest] -> [B, K, *rest]."""
    index = ids.reshape(*ids.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])  # [B, K, *rest]
    return torch.gather(x, dim=1, index=index)
