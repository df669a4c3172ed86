"""Fixed 2-D sine-cosine position embeddings, as in MAE.

Half of the channels encode the column (w) coordinate and half the row (h) coordinate, in that order, because MAE's
meshgrid puts w first; prefix tokens (cls) get all-zero rows. Matching this layout exactly keeps official MAE
checkpoints interchangeable.

References: facebookresearch/mae `util/pos_embed.py`; Vaswani et al. 2017 for the 1-D frequencies.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch

from .layers import resample_abs_pos_embed

_RESAMPLED: ContextVar[list[str] | None] = ContextVar("resampled_tables", default=None)


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """[N] positions -> [N, dim] embedding [sin(p * w_k), cos(p * w_k)], w_k = 10000^(-k / (dim / 2))."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dimension, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.double()[:, None] * omega[None, :]  # [N, dim / 2]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(dim: int, grid: int, num_prefix_tokens: int = 0) -> torch.Tensor:
    """Table for a raster-ordered square grid: [num_prefix_tokens + grid * grid, dim] float32, prefix rows zero."""
    if dim % 4:  # half the width per axis, each half in sin and cos
        raise ValueError(f"a 2-D sin-cos position table needs a width divisible by 4, got {dim}")
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    table = torch.cat([sincos_1d(dim // 2, cols.flatten()), sincos_1d(dim // 2, rows.flatten())], dim=1)  # [L, dim]
    prefix = torch.zeros(num_prefix_tokens, dim, dtype=table.dtype)
    return torch.cat([prefix, table], dim=0).float()


def is_sincos_table(table: torch.Tensor, num_prefix_tokens: int) -> bool:
    """Whether a [1, P + H*W, D] table is the fixed sin-cos table of its own square grid (a frozen one, which another
    grid's can replace exactly), rather than a learned one."""
    if table.dim() != 3 or table.shape[2] % 4:
        return False
    tokens = table.shape[1] - num_prefix_tokens
    grid = math.isqrt(max(tokens, 0))
    if grid * grid != tokens:
        return False
    return torch.allclose(table[0].float(), sincos_2d(table.shape[2], grid, num_prefix_tokens), atol=1e-5)


def is_other_grid(pos: torch.Tensor, own: torch.Tensor, grid_dims: tuple[int, ...]) -> bool:
    """Whether a checkpoint's position table `pos` has `own`'s layout for another grid: equal but in `grid_dims`, so
    resampling applies. Another model's table is not; it is left to the exact key check, which names the misfit."""
    if pos.dim() != own.dim() or pos.shape == own.shape:
        return False
    return all(pos.shape[d] == own.shape[d] for d in range(own.dim()) if d not in grid_dims)


def resample_token_table(state_dict: dict[str, torch.Tensor], key: str, own: torch.Tensor, grid: int,
                         num_prefix_tokens: int) -> dict[str, torch.Tensor]:
    """`state_dict` with its [1, P + H*W, D] table `key` resampled to `grid` x `grid` when it has `own`'s layout for
    another grid; otherwise `state_dict` itself. Bicubic without antialiasing, as MAE's `interpolate_pos_embed`
    (timm's default antialiasing uses another cubic kernel, even when upsampling)."""
    pos = state_dict.get(key)
    if pos is None or not is_other_grid(pos, own, grid_dims=(1,)):
        return state_dict
    resampled = resample_abs_pos_embed(pos, new_size=(grid, grid), num_prefix_tokens=num_prefix_tokens,
                                       antialias=False)
    note_resampled(key, pos, resampled)
    return {**state_dict, key: resampled}


@contextmanager
def recorded_resamples() -> Iterator[list[str]]:
    """The `key [old shape] -> [new shape]` of every learned table resampled inside the block: a wrapper renames
    the keys its encoder adapts (`encoder.` and official layouts), so the load report cannot find them by name."""
    token = _RESAMPLED.set([])
    try:
        yield _RESAMPLED.get()
    finally:
        _RESAMPLED.reset(token)


def note_resampled(key: str, old: torch.Tensor, new: torch.Tensor) -> None:
    """Record a resampled table for the enclosing `recorded_resamples` block, if any."""
    if (records := _RESAMPLED.get()) is not None:
        records.append(f"{key} {list(old.shape)} -> {list(new.shape)}")
