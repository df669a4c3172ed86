"""ViT encoder and classifier with timm's exact state-dict keys, plus the MAE-ViT entrypoints.

The encoder is timm's `VisionTransformer` with MAE's fixed 2-D sin-cos position table and initialisation, extended by
the encoder contract (`forward_visible`, `forward_with_mask_tokens`, `unit`, `grid`). Reusing timm's class keeps the
weights loadable by `timm.create_model('vit_*_patch16_224')` without any key mapping.

References: Dosovitskiy et al. (arXiv 2010.11929); facebookresearch/mae `models_mae.py` (encoder path, init);
timm `vision_transformer.py` (keys).
"""

from __future__ import annotations

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .layers import LayerNorm, check_backbone_args, check_images, checkpointed, init_mae_weights
from .mae import REFERENCE_DECODER, MaskedAutoencoder, build_mae
from .masking import gather_units
from .pos_embed import resample_token_table, sincos_2d
from .registry import register_model


class ViT(VisionTransformer):
    """timm ViT with a fixed sin-cos position table and the MAE encoder contract.

    Args:
        img_size: input resolution; patch_size: the mask unit; num_classes: 0 for a bare encoder.
        global_pool: `token` (cls + final norm, used for pretraining) or `avg` (MAE fine-tuning: fc_norm of the
            mean patch token, as in timm).
        fixed_pos_embed: keep the sin-cos table frozen (MAE pretraining); a classifier trains it, as in timm.
    """

    def __init__(self, *, img_size: int = 224, patch_size: int = 16, embed_dim: int = 768, depth: int = 12,
                 num_heads: int = 12, mlp_ratio: float = 4.0, num_classes: int = 0, global_pool: str = "token",
                 drop_path_rate: float = 0.0, fixed_pos_embed: bool = False):
        # timm would accept an img_size that is no multiple of patch_size and fail on the first batch
        check_backbone_args(img_size, num_classes, drop_path_rate, family="ViT", mask_unit=patch_size)
        super().__init__(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                         num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, num_classes=num_classes,
                         global_pool=global_pool, drop_path_rate=drop_path_rate, norm_layer=LayerNorm)
        self.unit = patch_size
        self.grid = img_size // patch_size
        table = sincos_2d(embed_dim, self.grid, self.num_prefix_tokens)  # [1 + L, D]
        self.pos_embed.data.copy_(table.unsqueeze(0))  # [1, 1 + L, D]
        self.pos_embed.requires_grad_(not fixed_pos_embed)
        self._init_mae()

    def _init_mae(self) -> None:
        """MAE init: xavier on the flattened patch projection (its bias keeps Conv2d's default, as in MAE), normal(0.02)
        tokens, xavier Linear layers."""
        self.apply(init_mae_weights)
        weight = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))  # [D, 3*p*p], as the Linear it stands for
        nn.init.normal_(self.cls_token, std=0.02)

    def _prefix(self, batch: int) -> torch.Tensor:
        """cls token with its (zero) position row: [B, 1, D]."""
        return (self.cls_token + self.pos_embed[:, :1]).expand(batch, -1, -1)  # [B, 1, D]

    def _run_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """The masked paths' blocks; `set_grad_checkpointing` (timm's) applies here as in timm's forward_features."""
        x = self.norm_pre(x)
        for block in self.blocks:
            x = checkpointed(block, x, enabled=self.grad_checkpointing)
        return self.norm(x)

    def forward_features(self, images: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """timm's, after our input check (timm's own would name only the size)."""
        check_images(images, self.grid, self.unit)
        return super().forward_features(images, *args, **kwargs)

    def forward_visible(self, images: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """Encode only the visible patches: images [B, 3, H, W], ids_keep [B, K] -> [B, 1 + K, D]."""
        x = self.patch_embed(images) + self.pos_embed[:, 1:]  # [B, L, D]; positions added before masking
        x = gather_units(x, ids_keep)  # [B, K, D]
        return self._run_blocks(torch.cat([self._prefix(x.shape[0]), x], dim=1))

    def forward_with_mask_tokens(self, images: torch.Tensor, mask: torch.Tensor, mask_token: torch.Tensor):
        """SimMIM-style baseline: every patch enters, hidden ones replaced by `mask_token`. -> [B, 1 + L, D]."""
        x = self.patch_embed(images)  # [B, L, D]
        x = torch.where(mask.unsqueeze(-1).bool(), mask_token.to(x.dtype), x) + self.pos_embed[:, 1:]  # mask [B, L, 1]
        return self._run_blocks(torch.cat([self._prefix(x.shape[0]), x], dim=1))

    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's layer-decay groups without its final-norm entry, which merges `norm` into the last block's group.
        Unmatched, `norm` joins the head (and `fc_norm`) in the top group, where MAE's layer decay gives them scale 1.
        """
        return {**super().group_matcher(coarse), "blocks": r"^blocks\.(\d+)"}

    def adapt_state_dict(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Resample the position table when the checkpoint's grid differs from ours (bicubic, as in MAE). A table of
        another layout or width (another model's) is left to the key check, which names the misfit."""
        return resample_token_table(state_dict, "pos_embed", self.pos_embed, self.grid, self.num_prefix_tokens)


VIT_SIZES = {
    "test": dict(embed_dim=32, depth=2, num_heads=2, patch_size=8, img_size=32),
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
    "large": dict(embed_dim=1024, depth=24, num_heads=16),
    "huge": dict(embed_dim=1280, depth=32, num_heads=16, patch_size=14),
}


def _vit(size: str, **kwargs) -> ViT:
    return ViT(**{**VIT_SIZES[size], **kwargs})


def _mae_vit(size: str, decoder: dict, **kwargs) -> MaskedAutoencoder:
    return build_mae(lambda **enc: _vit(size, fixed_pos_embed=True, **enc), decoder, **kwargs)


@register_model
def vit_test_patch8_32(**kwargs) -> ViT:
    return _vit("test", **kwargs)


@register_model
def vit_tiny_patch16_224(**kwargs) -> ViT:
    return _vit("tiny", **kwargs)


@register_model
def vit_small_patch16_224(**kwargs) -> ViT:
    return _vit("small", **kwargs)


@register_model
def vit_base_patch16_224(**kwargs) -> ViT:
    return _vit("base", **kwargs)


@register_model
def vit_large_patch16_224(**kwargs) -> ViT:
    return _vit("large", **kwargs)


@register_model
def vit_huge_patch14_224(**kwargs) -> ViT:
    return _vit("huge", **kwargs)


@register_model
def mae_vit_test(**kwargs) -> MaskedAutoencoder:
    """Tiny model for tests and the CPU demo: 32 px, 8-px patches, 2 blocks of 32 wide."""
    return _mae_vit("test", dict(decoder_dim=32, decoder_depth=1, decoder_heads=2), **kwargs)


@register_model
def mae_vit_tiny_patch16(**kwargs) -> MaskedAutoencoder:
    return _mae_vit("tiny", REFERENCE_DECODER, **kwargs)


@register_model
def mae_vit_small_patch16(**kwargs) -> MaskedAutoencoder:
    return _mae_vit("small", REFERENCE_DECODER, **kwargs)


@register_model
def mae_vit_base_patch16(**kwargs) -> MaskedAutoencoder:
    return _mae_vit("base", REFERENCE_DECODER, **kwargs)


@register_model
def mae_vit_large_patch16(**kwargs) -> MaskedAutoencoder:
    return _mae_vit("large", REFERENCE_DECODER, **kwargs)


@register_model
def mae_vit_huge_patch14(**kwargs) -> MaskedAutoencoder:
    return _mae_vit("huge", REFERENCE_DECODER, **kwargs)
