"""The one place where timm's layers enter our models, plus what every backbone shares: attention, the input check,
cutting images into units and the MAE weight initialisation.

Wrapping third-party layers here means a timm API change is fixed once (MAE's `qk_scale` pin shows the failure).
`vit.py` subclasses timm's whole `VisionTransformer`, so that its keys are timm's by construction; training takes
timm's optimisers, augmentations and EMA directly (`train/`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.layers import DropPath, Mlp, resample_abs_pos_embed, trunc_normal_, use_fused_attn
from timm.models.vision_transformer import Block
from torch import nn

LayerNorm = partial(nn.LayerNorm, eps=1e-6)

__all__ = [
    "Block",
    "DropPath",
    "LayerNorm",
    "Mlp",
    "attention",
    "checkpointed",
    "image_units",
    "init_mae_weights",
    "init_trunc_normal_weights",
    "resample_abs_pos_embed",
    "transformer_blocks",
    "trunc_normal_",
    "use_fused_attn",
]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fused: bool, scale: float | None = None
              ) -> torch.Tensor:
    """softmax(q k^T scale) v over [..., N, d] operands (scale: d^-0.5 by default): through SDPA when `fused`, else
    in plain matmuls. Modules take `fused` from timm's `use_fused_attn()` when built, as timm's attention does, so
    that `run.fused_attn=false` (timm's `set_fused_attn`) reaches every attention."""
    if fused:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if scale != 1.0:  # TNT's q comes pre-scaled (scale 1): no pass over it on that hot path
        q = q * scale
    return (q @ k.transpose(-2, -1)).softmax(dim=-1) @ v  # [..., N, N] scores -> [..., N, d]


def check_images(images: torch.Tensor, grid: int, unit: int) -> None:
    """Refuse anything but float images [B, 3, size, size] (size = grid x unit px), before a reshape or convolution
    fails on them obscurely."""
    if images.dim() != 4 or images.shape[1] != 3:
        channels_last = images.dim() == 4 and images.shape[-1] == 3
        raise ValueError(f"expected images [batch, 3, height, width], got shape {list(images.shape)}"
                         + ("; for channels-last images pass images.permute(0, 3, 1, 2)" if channels_last else ""))
    if not images.is_floating_point():
        raise ValueError(f"expected float images normalised with the data mean and std, got {images.dtype}; "
                         "mae_tnt.data.transforms.normalize(images, mean, std) turns uint8 images into them")
    h, w = images.shape[-2:]
    size = grid * unit
    if (h, w) == (size, size):
        return
    if h != w:
        advice = ""
    elif h % unit or h == unit:  # a model needs a whole number of units, and more than one
        advice = f"; resize them to {size} px, or to another multiple of {unit} px and build the model at that size"
    else:
        advice = (f"; build the model with img_size={h} (a checkpoint loads at any size: its position tables are "
                  "resampled)")
    raise ValueError(f"expected {size}x{size} images, got {h}x{w}{advice}")


def image_units(images: torch.Tensor, grid: int, unit: int, ids: torch.Tensor | None = None) -> torch.Tensor:
    """Cut images [B, C, H, W] into the units of a grid x grid raster, channels last: -> [B, K, u, u, C], the units
    `ids` [B, K] only (K = L = grid^2 when None). One copy, of the units kept: masked pixels are never read."""
    b, c = images.shape[:2]
    check_images(images, grid, unit)
    x = images.reshape(b, c, grid, unit, grid, unit).permute(0, 2, 4, 3, 5, 1)  # [B, gh, gw, u, u, C] (view)
    if ids is None:
        return x.reshape(b, grid * grid, unit, unit, c)  # [B, L, u, u, C]
    batch = torch.arange(b, device=images.device).unsqueeze(1)  # [B, 1]
    return x[batch, ids // grid, ids % grid]  # [B, K, u, u, C]


def check_backbone_args(img_size: object, num_classes: object, drop_path_rate: object, *, family: str,
                        mask_unit: int) -> None:
    """Refuse arguments that would build a model which fails later or quietly differs from the one asked for (the
    config layer refuses the same values in recipes, naming their keys); an image size must hold a whole number of
    the `family`'s mask units (`mask_unit` px), and the error names the nearest sizes that do."""
    if not _is_int(img_size) or img_size < 1:
        raise ValueError(f"img_size must be a positive int, got {img_size!r}")
    if img_size % mask_unit:
        below = img_size // mask_unit * mask_unit
        # Sizes of two units or more only: an MAE refuses one (nothing to hide), and no classifier needs it suggested
        sizes = sorted({max(size, 2 * mask_unit) for size in (below, below + mask_unit)})
        nearest = " or ".join(f"img_size={size}" for size in sizes)
        raise ValueError(f"{family} needs img_size divisible by its mask unit of {mask_unit} px, got {img_size}: use "
                         f"{nearest}")
    if not _is_int(num_classes) or num_classes < 0:
        raise ValueError(f"num_classes must be an int >= 0 (0 for a bare encoder), got {num_classes!r}")
    if isinstance(drop_path_rate, bool) or not isinstance(drop_path_rate, int | float) or not 0 <= drop_path_rate < 1:
        raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def transformer_blocks(dim: int, depth: int, num_heads: int, mlp_ratio: float):
    """Pre-norm ViT blocks with qkv bias and LayerNorm eps 1e-6 (MAE's), attention through SDPA, no drop path
    (MAE's decoder)."""
    return nn.ModuleList(
        Block(dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=LayerNorm) for _ in range(depth)
    )


def checkpointed(function, *args, enabled: bool, **kwargs):
    """`function(*args, **kwargs)`; when `enabled` and autograd is recording, its activations are recomputed in the
    backward pass instead of kept (grad checkpointing: memory for one more forward pass).

    Non-reentrant checkpointing restores the RNG state before recomputing, so drop path and SReT's random slices
    draw the same values twice and the gradients are those of the plain call.
    """
    if enabled and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False, **kwargs)
    return function(*args, **kwargs)


def _init_linear_and_norm(module: nn.Module, init_weight) -> None:
    """`init_weight` for Linear weights with zero bias, LayerNorm 1/0; other modules keep their own init."""
    if isinstance(module, nn.Linear):
        init_weight(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


init_mae_weights = partial(_init_linear_and_norm, init_weight=nn.init.xavier_uniform_)
"""MAE's initialisation: xavier-uniform Linear weights (use with `.apply`)."""

init_trunc_normal_weights = partial(_init_linear_and_norm, init_weight=partial(trunc_normal_, std=0.02))
"""timm's ViT/TNT initialisation: truncated-normal(0.02) Linear weights (use with `.apply`)."""


@contextmanager
def in_mode(module: nn.Module, training: bool) -> Iterator[nn.Module]:
    """Run the block with `module` in train or eval mode, and give it back its mode however the block ends."""
    was_training = module.training
    module.train(training)
    try:
        yield module
    finally:
        module.train(was_training)
