"""SReT (Sliced Recursive Transformer): classifier, MAE encoder with 32-px mask units, and the official weight layout.

Structure as published: a three-conv stem (stride 8) with a learned position map, three stages of weight-shared
recursive blocks (each unique block applied twice in a row, every application followed by its own non-shared
non-linear projection, NLL), learnable residual coefficients (LRC), sliced group attention (contiguous slices on a
block's first application, random slices on its second), depthwise-conv pooling between stages, and
average-pool -> LayerNorm -> Linear.

Masked autoencoding follows Hiera: a 32x32-px mask unit is one stage-3 token (= 2x2 stage-2 = 4x4 stage-1 tokens).
`forward_visible` runs the stem on each visible unit separately, keeps the tokens unit-major and pools inside every
unit, so no masked pixel reaches the encoder; the price is zero padding at unit borders in the stem and pooling convs
(see docs/sret.md). `dense_stem=True` runs the stem on the whole image with masked pixels zeroed instead.

Shared blocks are stored once here (`stages.{s}.blocks.{r}`, NLLs at `stages.{s}.nlls.{n}`), because safetensors
(behind `accelerator.save_state`) refuses state dicts in which two keys share memory. The official layout
(`transformers.{s}.blocks.{j}`: even j = a block application, odd j = NLL, each shared block saved once per
application) is read by `adapt_state_dict` and written by `to_official_state_dict`.

References: Shen et al., "Sliced Recursive Transformer" (ECCV 2022, arXiv 2111.05297) and szq0214/SReT (structure,
keys); Ryali et al., "Hiera" (arXiv 2306.00989) for mask units with in-unit pooling; Heo et al., PiT (arXiv
2103.16302) for the pooling conv; Xie et al., SimMIM (arXiv 2111.09886) for the mask-token baseline.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .layers import (
    DropPath,
    LayerNorm,
    Mlp,
    attention,
    check_backbone_args,
    check_images,
    checkpointed,
    in_mode,
    init_trunc_normal_weights,
    trunc_normal_,
    use_fused_attn,
)
from .loading import CheckpointError
from .mae import MaskedAutoencoder, build_mae
from .masking import gather_units, upsample_grid_mask
from .pos_embed import is_other_grid, note_resampled
from .registry import register_model

STEM_STRIDE = 8
UNIT = 32
"""Mask unit in pixels: the stem's stride 8 times the two 2x poolings, i.e. one stage-3 token."""
EVAL_PERMUTATION_SEED = 0
Ints = tuple[int, ...]

_OURS_KEY = re.compile(r"^stages\.(\d+)\.(blocks|nlls)\.(\d+)\.(.+)$")
_OFFICIAL_KEY = re.compile(r"^transformers\.(\d+)\.blocks\.(\d+)\.(.+)$")


@functools.lru_cache(maxsize=64)
def fixed_permutation(num_tokens: int, device: torch.device) -> torch.Tensor:
    """Eval-time token permutation: drawn once on the CPU from a fixed seed, so every device and run agrees."""
    generator = torch.Generator().manual_seed(EVAL_PERMUTATION_SEED)
    return torch.randperm(num_tokens, generator=generator).to(device)


def token_permutation(num_tokens: int, device: torch.device, training: bool) -> torch.Tensor:
    """[N] permutation for random slicing; in training from torch's global RNG, which the loop reseeds per step."""
    if training:
        return torch.randperm(num_tokens, device=device)
    return fixed_permutation(num_tokens, device)


def split_units(x: torch.Tensor, grid: int) -> torch.Tensor:
    """Cut a square map into grid x grid units, raster order: [B, C, H, W] -> [B, L, C, H / grid, W / grid]."""
    b, c, h, w = x.shape
    s = h // grid
    x = x.reshape(b, c, grid, s, grid, s)  # [B, C, gh, s, gw, s]
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, grid * grid, c, s, s)  # [B, L, C, s, s]


class LearnableCoefficient(nn.Module):
    """A learnable scalar gain (SReT's LRC), stored as `.bias` because that is the official key."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.bias


class SlicedAttention(nn.Module):
    """Multi-head self-attention inside equal slices of the sequence (SReT's `Group_Attention`).

    A block's first application cuts the sequence as it comes into `groups1` contiguous slices; its second shuffles
    the tokens (one permutation shared by the batch), cuts `groups2` slices and restores the order before the output
    projection. One group is global attention, so `sliced=False` (the published "without slice" models) uses 1 / 1.
    """

    def __init__(self, dim: int, num_heads: int, groups1: int, groups2: int):
        super().__init__()
        self.num_heads = num_heads
        self.groups = (groups1, groups2)
        self.fused_attn = use_fused_attn()  # run.fused_attn=false turns SDPA off, as in timm's attention
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, second: bool) -> torch.Tensor:
        """[B, N, C] -> [B, N, C]; `second` marks a shared block's second application (random slices)."""
        b, n, c = x.shape
        groups = self.groups[second]
        if n % groups:
            raise ValueError(f"SReT slices {n} tokens into {groups} groups; the token count must divide evenly")
        permutation = token_permutation(n, x.device, self.training) if second and groups > 1 else None
        if permutation is not None:
            x = x[:, permutation]  # [B, N, C] shuffled
        qkv = self.qkv(x).reshape(b * groups, n // groups, 3, self.num_heads, c // self.num_heads)  # [BG, N/G, 3, H, d]
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [BG, H, N/G, d]
        x = attention(q, k, v, self.fused_attn)  # [BG, H, N/G, d]
        x = x.transpose(1, 2).reshape(b, n, c)  # [B, N, C]
        if permutation is not None:
            x = x[:, permutation.argsort()]  # back to the input order
        return self.proj(x)


class RecursiveBlock(nn.Module):
    """Pre-norm transformer block with four LRCs; one instance serves every application of a shared block."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, groups: tuple[int, int], drop_path: float):
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.attn = SlicedAttention(dim, num_heads, *groups)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.coefficient1, self.coefficient2 = LearnableCoefficient(), LearnableCoefficient()
        self.coefficient3, self.coefficient4 = LearnableCoefficient(), LearnableCoefficient()

    def forward(self, x: torch.Tensor, second: bool) -> torch.Tensor:
        """[B, N, C] -> [B, N, C]."""
        x = self.coefficient1(x) + self.coefficient2(self.drop_path(self.attn(self.norm1(x), second)))
        return self.coefficient3(x) + self.coefficient4(self.drop_path(self.mlp(self.norm2(x))))


class NonLinearProjection(nn.Module):
    """The non-shared NLL after every block application (official `Non_proj`): x = a1 x + a2 MLP(LN x)."""

    def __init__(self, dim: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.coefficient1, self.coefficient2 = LearnableCoefficient(), LearnableCoefficient()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, C] -> [B, N, C]."""
        return self.coefficient1(x) + self.coefficient2(self.mlp(self.norm1(x)))


class RecursiveStage(nn.Module):
    """`recursive_num` unique blocks, each applied depth / recursive_num times in a row, each application + its NLL.

    Order for depth 4, two unique blocks: B0 N0 B0 N1 B1 N2 B1 N3.
    """

    def __init__(self, dim: int, num_heads: int, depth: int, recursive_num: int, mlp_ratio: float, nll_ratio: float,
                 groups: tuple[int, int], drop_path: list[float]):
        super().__init__()
        if depth % recursive_num:
            raise ValueError(f"depth {depth} must be a multiple of recursive_num {recursive_num}")
        self.loops = depth // recursive_num
        self.blocks = nn.ModuleList(
            RecursiveBlock(dim, num_heads, mlp_ratio, groups, drop_path[r]) for r in range(recursive_num)
        )
        self.nlls = nn.ModuleList(NonLinearProjection(dim, nll_ratio) for _ in range(depth))
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, C] -> [B, N, C]."""
        for application in range(len(self.nlls)):
            x = checkpointed(self.run_application, x, application, enabled=self.grad_checkpointing)
        return x

    def run_application(self, x: torch.Tensor, application: int) -> torch.Tensor:
        """One application of a shared block, then its own NLL: [B, N, C] -> [B, N, C]."""
        block = self.blocks[application // self.loops]
        # Odd applications slice randomly: the official `(i + 2) % 4 == 0` over the interleaved block/NLL list.
        return self.nlls[application](block(x, second=application % 2 == 1))


class ConvStem(nn.Module):
    """3x3/s2 conv + BN + ReLU, three times, 3 -> C/2 -> C -> C (official `conv_embedding`).

    [B, 3, H, W] -> [B, C, H/8, W/8].
    """

    def __init__(self, dim: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, dim // 2, 3, 2, 1), nn.BatchNorm2d(dim // 2)
        self.conv2, self.bn2 = nn.Conv2d(dim // 2, dim, 3, 2, 1), nn.BatchNorm2d(dim)
        self.conv3, self.bn3 = nn.Conv2d(dim, dim, 3, 2, 1), nn.BatchNorm2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return F.relu(self.bn3(self.conv3(x)))


class DepthwisePool(nn.Module):
    """Depthwise 3x3/s2 conv that widens C -> C' (PiT's `conv_head_pooling`): [B, C, h, w] -> [B, C', h/2, w/2]."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, out_dim, 3, 2, 1, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def _drop_path_rates(depth: Ints, recursive_num: Ints, rate: float) -> list[list[float]]:
    """Per stage, per unique block, as the official code assigns them: a stage's applications get rate * index /
    sum(depth) by their overall index, and its i-th unique block takes the i-th of these, so the rates of a stage's
    blocks stay near its first applications' (sret_s at 0.2: [0, .01], [.04 ... .08], [.14, .15, .16])."""
    total, rates, start = sum(depth), [], 0
    for d, r in zip(depth, recursive_num, strict=True):
        rates.append([rate * (start + i) / total for i in range(r)])
        start += d
    return rates


class SReT(nn.Module):
    """SReT classifier (num_classes > 0) or encoder (num_classes = 0) with the MAE encoder contract.

    Args:
        img_size: square input size in pixels, a multiple of the 32-px mask unit.
        base_dims, heads: per-stage head width and head count (width = base_dim * heads).
        depth, recursive_num: block applications and unique (shared) blocks per stage.
        mlp_ratio, nll_ratio: hidden ratios of the block MLP and of the NLL.
        groups1, groups2: slices per stage on a block's first / second application.
        sliced: False gives the published "without slice" models (same weights, global attention everywhere).
        num_classes: classifier classes; 0 gives a bare encoder whose `forward` returns normalised pooled features.
        drop_path_rate: stochastic depth, linear in depth up to this rate.
        dense_stem: MAE only; run the stem on the whole image with masked pixels zeroed instead of per visible unit.
        global_pool: "avg", the only pooling SReT has (its tokens are averaged; it has no class token), accepted so
            that one fine-tuning setting serves every family.
    """

    def __init__(self, *, img_size: int = 224, base_dims: Ints = (32, 32, 32), heads: Ints = (2, 4, 8),
                 depth: Ints = (4, 10, 6), recursive_num: Ints = (2, 5, 3), mlp_ratio: float = 3.6,
                 nll_ratio: float = 1.0, groups1: Ints = (8, 4, 1), groups2: Ints = (2, 1, 1), sliced: bool = True,
                 num_classes: int = 1000, drop_path_rate: float = 0.0, dense_stem: bool = False,
                 global_pool: str = "avg"):
        super().__init__()
        check_backbone_args(img_size, num_classes, drop_path_rate, family="SReT", mask_unit=UNIT)
        if global_pool != "avg":
            raise ValueError(f"SReT averages its tokens and has no class token: global_pool must be 'avg', got "
                             f"{global_pool!r}")
        self.global_pool = global_pool
        widths = [b * h for b, h in zip(base_dims, heads, strict=True)]
        self.unit, self.grid, self.num_prefix_tokens = UNIT, img_size // UNIT, 0
        self.embed_dim, self.mask_token_dim = widths[-1], widths[0]  # mask tokens replace stem tokens
        self.num_classes, self.dense_stem = num_classes, dense_stem
        self.patch_embed = ConvStem(widths[0])
        self.pos_embed = nn.Parameter(torch.zeros(1, widths[0], img_size // STEM_STRIDE, img_size // STEM_STRIDE))
        rates = _drop_path_rates(depth, recursive_num, drop_path_rate)
        self.stages = nn.ModuleList(
            RecursiveStage(widths[s], heads[s], depth[s], recursive_num[s], mlp_ratio, nll_ratio,
                           (groups1[s], groups2[s]) if sliced else (1, 1), rates[s])
            for s in range(len(widths))
        )
        self.pools = nn.ModuleList(DepthwisePool(widths[s], widths[s + 1]) for s in range(len(widths) - 1))
        self.norm = LayerNorm(widths[-1])
        self.head = nn.Linear(widths[-1], num_classes) if num_classes else nn.Identity()
        self._init_weights()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute every block application (with its NLL) in the backward pass instead of keeping its activations
        (timm's API)."""
        for stage in self.stages:
            stage.grad_checkpointing = enable

    def _init_weights(self) -> None:
        """DeiT-style init: truncated normal(0.02) for the position map and Linear weights, zero biases, LN 1/0.

        The official code (PiT's) sets only the LayerNorms and leaves Linear layers at PyTorch's uniform default; the
        DeiT-style init is the one every backbone here starts from (MAE's reference init for ViT, timm's for TNT), so
        pretraining compares backbones from like starts. Loaded weights are unaffected.
        """
        trunc_normal_(self.pos_embed, std=0.02)
        self.apply(init_trunc_normal_weights)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"}

    def group_matcher(self, coarse: bool = False) -> dict:
        """timm-style groups: stem and position map first, then per stage (coarse) or per unique block with its NLLs.

        Each pooling conv joins the stage it feeds. The final norm matches nothing, so it joins the head in the top
        group, where MAE's layer decay gives both scale 1.
        """
        blocks: list[tuple[str, tuple[int, ...] | None]] = []
        for s, stage in enumerate(self.stages):
            if s:
                blocks.append((rf"^pools\.{s - 1}\.", (s,) if coarse else (s, 0)))
            if coarse:
                blocks.append((rf"^stages\.{s}\.", (s,)))
                continue
            blocks.append((rf"^stages\.({s})\.blocks\.(\d+)\.", None))
            blocks += [(rf"^stages\.{s}\.nlls\.{n}\.", (s, n // stage.loops)) for n in range(len(stage.nlls))]
        return dict(stem=r"^pos_embed|^patch_embed", blocks=blocks)

    def _run_stages(self, x: torch.Tensor, windows: int, side: int) -> torch.Tensor:
        """Stages with pooling inside each of `windows` square windows per image (the image itself, or mask units).

        x [B, windows * side^2, C0] window-major, raster inside each window -> [B, windows * (side / 4)^2, D].
        """
        for s, stage in enumerate(self.stages):
            if s:
                x, side = self._pool(x, self.pools[s - 1], windows, side), side // 2
            x = stage(x)
        return x

    @staticmethod
    def _pool(x: torch.Tensor, pool: nn.Module, windows: int, side: int) -> torch.Tensor:
        """Pool each window separately: [B, W * side^2, C] -> [B, W * (side / 2)^2, C']."""
        b, _, c = x.shape
        x = x.reshape(b * windows, side, side, c).permute(0, 3, 1, 2)  # [BW, C, side, side]
        x = pool(x)  # [BW, C', side/2, side/2]
        return x.flatten(2).transpose(1, 2).reshape(b, -1, x.shape[1])  # [B, W * (side/2)^2, C']

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """Full forward used by fine-tuning: images [B, 3, H, W] -> tokens [B, L, D] in raster order (before norm)."""
        check_images(images, self.grid, self.unit)
        x = self.patch_embed(images) + self.pos_embed  # [B, C0, h, w]
        side = x.shape[-1]
        x = x.flatten(2).transpose(1, 2)  # [B, h*w, C0]
        return self._run_stages(x, windows=1, side=side)

    def forward_head(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, L, D] -> logits [B, classes] (or pooled features [B, D] when num_classes = 0)."""
        return self.head(self.norm(tokens.mean(dim=1)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(images))

    def forward_visible(self, images: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """Encode only the visible 32-px units: images [B, 3, H, W], ids_keep [B, K] -> [B, K, D] in ids_keep order.

        Units run in raster order inside the encoder, so the first application's contiguous slices group nearby
        units (as they group nearby tokens in fine-tuning); the output is put back into `ids_keep` order.
        """
        check_images(images, self.grid, self.unit)
        order = ids_keep.argsort(dim=1)  # [B, K]
        ids_raster = ids_keep.gather(1, order)  # [B, K] ascending unit index
        units = self._dense_stem_units(images, ids_raster) if self.dense_stem else self._unit_stem(images, ids_raster)
        b, k, c, t, _ = units.shape  # [B, K, C0, t, t], t = 4 stem tokens per unit side
        x = units.flatten(3).transpose(2, 3).reshape(b, k * t * t, c)  # [B, K*t*t, C0] unit-major
        x = self.norm(self._run_stages(x, windows=k, side=t))  # [B, K, D] raster order
        return gather_units(x, order.argsort(dim=1))  # [B, K, D] ids_keep order

    def _unit_stem(self, images: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Stem on each visible unit alone (zero padding at its borders): ids [B, K] -> [B, K, C0, t, t] + positions."""
        crops = gather_units(split_units(images, self.grid), ids)  # [B, K, 3, 32, 32]
        x = self.patch_embed(crops.flatten(0, 1))  # [B*K, C0, t, t]
        pos = split_units(self.pos_embed, self.grid)[0][ids]  # [B, K, C0, t, t]
        return x.unflatten(0, ids.shape) + pos  # [B, K, C0, t, t]

    def _dense_stem_units(self, images: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Stem on the whole image with hidden units zeroed, then the visible units' tokens: -> [B, K, C0, t, t]."""
        visible = torch.zeros(images.shape[0], self.grid**2, device=images.device).scatter_(1, ids, 1.0)  # [B, L]
        x = self.patch_embed(self._hide_pixels(images, visible)) + self.pos_embed  # [B, C0, h, w]
        return gather_units(split_units(x, self.grid), ids)  # [B, K, C0, t, t]

    def _hide_pixels(self, images: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] with the units where `visible` [B, L] is 0 zeroed: the stem's overlapping 3x3
        convolutions (and its batch statistics) would otherwise carry hidden pixels into visible tokens."""
        pixels = upsample_grid_mask(visible.to(images.dtype), self.grid, self.unit)  # [B, H, W]
        return images * pixels.unsqueeze(1)  # [B, 3, H, W]

    def forward_with_mask_tokens(self, images: torch.Tensor, mask: torch.Tensor, mask_token: torch.Tensor):
        """SimMIM-style baseline: hidden units' stem tokens become `mask_token` [1, 1, C0] on the full grid, their
        pixels zeroed before the stem (as for `dense_stem`).

        images [B, 3, H, W], mask [B, L] (1 = hidden) -> [B, L, D] in raster order.
        """
        check_images(images, self.grid, self.unit)
        x = self.patch_embed(self._hide_pixels(images, 1 - mask))  # [B, C0, h, w]
        b, c, h, w = x.shape
        g, t = self.grid, h // self.grid
        hidden = upsample_grid_mask(mask.bool(), g, t).reshape(b, h * w, 1)  # [B, h*w, 1]
        x = x.flatten(2).transpose(1, 2)  # [B, h*w, C0]
        pos = self.pos_embed.flatten(2).transpose(1, 2)  # [1, h*w, C0]
        x = torch.where(hidden, mask_token.to(x.dtype), x) + pos
        return self.norm(self._run_stages(x, windows=1, side=h))

    def adapt_state_dict(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Accept the official layout or ours; resample the position map (bicubic) when the input size differs."""
        state_dict = self.from_official_layout(state_dict)
        pos = state_dict.get("pos_embed")
        if pos is not None and is_other_grid(pos, self.pos_embed, grid_dims=(2, 3)):
            resized = F.interpolate(pos.float(), size=self.pos_embed.shape[-2:], mode="bicubic", align_corners=False)
            state_dict = {**state_dict, "pos_embed": resized.to(pos.dtype)}
            note_resampled("pos_embed", pos, resized)
        return state_dict

    def from_official_layout(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Official keys -> ours, where there are any; every shared block must appear once per application with
        identical tensors."""
        if not any(_OFFICIAL_KEY.match(key) for key in state_dict):
            return state_dict
        out, copies = {}, {}
        for key, value in state_dict.items():
            match = _OFFICIAL_KEY.match(key)
            if match is None:
                out[key] = value
                continue
            s, j, rest = int(match[1]), int(match[2]), match[3]
            if s >= len(self.stages):
                raise CheckpointError(f"{key}: the checkpoint has more stages than this model ({len(self.stages)})")
            application, is_nll = divmod(j, 2)
            if is_nll:
                out[f"stages.{s}.nlls.{application}.{rest}"] = value
            else:
                block = application // self.stages[s].loops
                copies.setdefault(f"stages.{s}.blocks.{block}.{rest}", []).append((key, value))
        for ours, twins in copies.items():
            out[ours] = self._check_twins(ours, twins)
        return out

    def _check_twins(self, ours: str, twins: list[tuple[str, torch.Tensor]]) -> torch.Tensor:
        """The single tensor behind every saved application of a shared block, or a CheckpointError."""
        loops = self.stages[int(ours.split(".")[1])].loops
        if len(twins) != loops:
            raise CheckpointError(f"{ours}: expected {loops} saved applications, found {[k for k, _ in twins]}")
        first_key, first = twins[0]
        for key, value in twins[1:]:
            if value.shape != first.shape or not torch.equal(value, first):
                raise CheckpointError(
                    f"{key} differs from its twin {first_key}: SReT shares one block between both applications, so "
                    "an official checkpoint stores identical copies; this file is not an SReT checkpoint of this config"
                )
        return first


def to_official_state_dict(model: SReT) -> dict[str, torch.Tensor]:
    """Our state dict in the official layout: a shared block at j = 2a for each application a, NLL n at j = 2n + 1."""
    out = {}
    for key, value in model.state_dict().items():
        match = _OURS_KEY.match(key)
        if match is None:
            out[key] = value
            continue
        s, kind, index, rest = int(match[1]), match[2], int(match[3]), match[4]
        loops = model.stages[s].loops
        positions = [2 * index + 1] if kind == "nlls" else [2 * (index * loops + i) for i in range(loops)]
        out.update({f"transformers.{s}.blocks.{j}.{rest}": value for j in positions})
    return out


@torch.no_grad()
def reestimate_batchnorm(model: SReT, batches: Iterable[torch.Tensor]) -> int:
    """Recompute the stem's BatchNorm statistics as a plain average over `batches` ([B, 3, H, W] each); returns the
    number of images seen.

    Pretraining feeds the stem 32-px crops (zero-padded at their borders), so its running statistics do not fit
    whole images; fine-tuning calls this first. Only the stem runs (it holds every BatchNorm), in train mode with
    momentum None (cumulative average); the model's mode and momenta are restored afterwards.
    """
    stem = model.patch_embed
    norms = [m for m in stem.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    device = stem.conv1.weight.device
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    seen = 0
    try:
        with in_mode(stem, training=True):
            for images in batches:
                stem(images.to(device))
                seen += len(images)
    finally:
        for norm, momentum in zip(norms, momenta, strict=True):
            norm.momentum = momentum
    return seen


SRET_CONFIGS = {
    "test": dict(img_size=64, base_dims=(8, 8, 8), heads=(1, 2, 4), depth=(2, 2, 2), recursive_num=(1, 1, 1),
                 mlp_ratio=2.0, nll_ratio=1.0),
    "t": dict(base_dims=(32, 32, 32), heads=(2, 4, 8), depth=(4, 10, 6), recursive_num=(2, 5, 3), mlp_ratio=3.6,
              nll_ratio=1.0),
    "lt": dict(base_dims=(32, 32, 32), heads=(2, 4, 8), depth=(4, 10, 6), recursive_num=(2, 5, 3), mlp_ratio=4.0,
               nll_ratio=1.0),
    "s": dict(base_dims=(42, 42, 42), heads=(3, 6, 12), depth=(4, 10, 6), recursive_num=(2, 5, 3), mlp_ratio=3.0,
              nll_ratio=2.0),
}
# Light decoders on the 7x7 unit grid (MAE Table 1: fine-tuning barely depends on decoder size); see the recipes.
SRET_DECODERS = {
    "test": dict(decoder_dim=32, decoder_depth=1, decoder_heads=2),
    "t": dict(decoder_dim=256, decoder_depth=2, decoder_heads=8),
    "s": dict(decoder_dim=256, decoder_depth=4, decoder_heads=8),
}


def _sret(size: str, **kwargs) -> SReT:
    return SReT(**{**SRET_CONFIGS[size], **kwargs})


def _mae_sret(size: str, **kwargs) -> MaskedAutoencoder:
    return build_mae(lambda **enc: _sret(size, num_classes=0, **enc), SRET_DECODERS[size], **kwargs)


@register_model
def sret_test(**kwargs) -> SReT:
    """Tiny SReT for tests and the CPU demo: 64 px (2x2 units), widths 8/16/32, one shared block per stage."""
    return _sret("test", **kwargs)


@register_model
def sret_t(**kwargs) -> SReT:
    return _sret("t", **kwargs)


@register_model
def sret_lt(**kwargs) -> SReT:
    return _sret("lt", **kwargs)


@register_model
def sret_s(**kwargs) -> SReT:
    return _sret("s", **kwargs)


@register_model
def sret_t_wo_slice(**kwargs) -> SReT:
    return _sret("t", sliced=False, **kwargs)


@register_model
def sret_lt_wo_slice(**kwargs) -> SReT:
    return _sret("lt", sliced=False, **kwargs)


@register_model
def sret_s_wo_slice(**kwargs) -> SReT:
    return _sret("s", sliced=False, **kwargs)


@register_model
def mae_sret_test(**kwargs) -> MaskedAutoencoder:
    return _mae_sret("test", **kwargs)


@register_model
def mae_sret_t(**kwargs) -> MaskedAutoencoder:
    return _mae_sret("t", **kwargs)


@register_model
def mae_sret_s(**kwargs) -> MaskedAutoencoder:
    return _mae_sret("s", **kwargs)
