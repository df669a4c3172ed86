"""Transformer in Transformer (TNT) with timm's exact state-dict keys, a fast word path, and the MAE-TNT entrypoints.

TNT splits an image into 16x16 patches ("sentences"); a per-patch 7x7/stride-4 convolution turns each into 4x4 = 16
"words" of width c. Every block runs an inner transformer on the words of each sentence, adds a projection of the
sentence's words to its token, then runs an outer transformer over the sentence tokens. Words never cross sentences,
so MAE's visible-only encoder is exact for TNT: masked patches are dropped before the pixel embedding, together with
all their words, and both transformers run on the visible sentences only.

Fast path (same parameters and outputs as timm, see docs/tnt.md): q, k and v come from one matmul over the
concatenated `qk`/`v` weights (the attention scale folded into the q rows); on CPU the inner attention runs
channel-first, every (head, sentence) pair a strided [d, N] matrix in one batch, with no permute copy before it and
only N-column batched matmuls (backward included); on CUDA it runs as plain batched matmuls, since SDPA would pad its
6-wide heads to 32; the outer attention uses SDPA; patches are cut channels-last, so the pixel embedding hands over
words without a permute copy.

References: Han et al., "Transformer in Transformer" (NeurIPS 2021, arXiv 2103.00112); official code
huawei-noah/Efficient-AI-Backbones `tnt_pytorch/tnt.py`; timm `models/tnt.py` (non-legacy keys, `checkpoint_filter_fn`).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from .layers import (
    DropPath,
    Mlp,
    attention,
    check_backbone_args,
    checkpointed,
    image_units,
    init_mae_weights,
    init_trunc_normal_weights,
    trunc_normal_,
    use_fused_attn,
)
from .loading import CheckpointError
from .mae import MaskedAutoencoder, build_mae
from .masking import num_visible, random_masking, upsample_grid_mask
from .pixel_loss import masked_mean, normalize_pixels
from .pos_embed import resample_token_table
from .registry import register_model

WORD_STRIDE = 4
"""Pixels per word side: the stride of TNT's pixel-embedding convolution (a 16-px patch holds 4x4 words)."""

# Official huawei-noah names -> timm names (timm `checkpoint_filter_fn`), applied to top-level and block keys alike.
OFFICIAL_RENAMES = (
    ("outer_pos", "patch_pos"),
    ("inner_pos", "pixel_pos"),
    ("patch_embed", "pixel_embed"),
    ("proj_norm1", "norm1_proj"),
    ("proj_norm2", "norm2_proj"),
    ("inner_norm1", "norm_in"),
    ("inner_attn", "attn_in"),
    ("inner_norm2", "norm_mlp_in"),
    ("inner_mlp", "mlp_in"),
    ("outer_norm1", "norm_out"),
    ("outer_attn", "attn_out"),
    ("outer_norm2", "norm_mlp"),
    ("outer_mlp", "mlp"),
)


class Attention(nn.Module):
    """Multi-head self-attention with TNT's separate `qk` and `v` weights (no bias) and a biased output projection.

    Args:
        dim: token width; num_heads: heads of width dim / num_heads.
        narrow_heads: the heads are too narrow for SDPA's fused kernels (the inner transformer's 6-wide heads over
            16 words): on CPU the channel-first path (`_attend_channel_first`), elsewhere plain batched matmuls
            (`_attend(x, fused=False)`), each measured faster than SDPA for that shape (docs/tnt.md, Speed).
    """

    def __init__(self, dim: int, num_heads: int, *, narrow_heads: bool = False):
        super().__init__()
        self.num_heads, self.head_dim, self.narrow_heads = num_heads, dim // num_heads, narrow_heads
        self.fused_attn = use_fused_attn()  # run.fused_attn=false turns SDPA off, as in timm's attention
        self.qk = nn.Linear(dim, 2 * dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def qkv_weight(self) -> torch.Tensor:
        """[3 * dim, dim]: q (pre-scaled by head_dim^-0.5), k and v rows, so one matmul yields all three."""
        q, k = self.qk.weight.chunk(2)
        return torch.cat([q * self.head_dim**-0.5, k, self.v.weight])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, C] -> [B, N, C]."""
        if self.narrow_heads and x.device.type == "cpu":
            return self._attend_channel_first(x)
        return self._attend(x, fused=self.fused_attn and not self.narrow_heads)

    def _attend(self, x: torch.Tensor, fused: bool) -> torch.Tensor:
        """[B, N, C] -> [B, N, C] through SDPA (`fused`) or explicit batched matmuls.

        On CUDA, SDPA runs 6-wide heads through its flash kernel padded to 32 columns: TNT-S's bf16 train step took
        1.8x as long as with the batched matmuls on an H100 (docs/tnt.md, Speed).
        """
        b, n, c = x.shape
        qkv = F.linear(x, self.qkv_weight()).view(b, n, 3, self.num_heads, self.head_dim)  # [B, N, 3, H, d]
        q, k, v = qkv.transpose(1, 3).unbind(2)  # 3 x [B, H, N, d], strided views (no copy); q is pre-scaled
        out = attention(q, k, v, fused, scale=1.0)  # [B, H, N, d]
        return self.proj(out.transpose(1, 2).reshape(b, n, c))  # [B, N, C]

    def _attend_channel_first(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, C] -> [B, N, C] with q, k, v and the heads' outputs as channel-first [H*B, d, N] views.

        One matmul `W x^T`, with W's rows reordered to (q/k/v, channel, head), lays every head of every sentence
        out as a strided [d, N] matrix, so no permute copy precedes the batched attention; one copy of rows of N
        brings the output back before the projection.
        """
        b, n, c = x.shape
        h, d = self.num_heads, self.head_dim
        weight = self.qkv_weight().view(3, h, d, c).transpose(1, 2).reshape(3 * c, c)  # [3C, C], rows (q/k/v, e, head)
        qkv = torch.mm(weight, x.reshape(b * n, c).t())  # [3C, B*N]
        q, k, v = (t.transpose(0, 1) for t in qkv.view(3, d, h * b, n).unbind(0))  # 3 x [H*B, d, N] (views)
        out = _ChannelFirstAttention.apply(q, k, v)  # [H*B, d, N], batch order (head, b)
        out = out.view(h, b, d, n).transpose(1, 2).reshape(c, b * n)  # [H*d, B*N], features in timm's order
        return F.linear(out.t(), self.proj.weight, self.proj.bias).view(b, n, c)  # [B, N, C]


class _ChannelFirstAttention(torch.autograd.Function):
    """softmax(Q K^T) V on channel-first operands: q, k, v [G, d, N] (q pre-scaled) -> out [G, d, N].

    Every batched matmul here, backward included, has N output columns: on CPU, batched GEMMs with d = 6 output
    columns run 2-3x slower, and autograd's backward of `Q @ K^T` (dQ = dS K) would produce exactly such a one.
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        attn = torch.bmm(q.mT, k).softmax(dim=-1)  # [G, N, N]
        ctx.save_for_backward(q, k, v, attn)
        return torch.bmm(v, attn.mT)  # [G, d, N] = (A V)^T

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v, attn = ctx.saved_tensors
        grad_v = torch.bmm(grad_out, attn)  # [G, d, N] = (A^T dO)^T
        grad_attn = torch.bmm(grad_out.mT, v)  # dO V^T: [G, N, N]
        grad_scores = torch._softmax_backward_data(grad_attn, attn, -1, attn.dtype)
        return torch.bmm(k, grad_scores.mT), torch.bmm(q, grad_scores), grad_v  # [G, d, N] each: (dS K)^T, (dS^T Q)^T


def project_words(owner: nn.Module, words: torch.Tensor, batch: int) -> torch.Tensor:
    """TNT's word -> sentence projection LN(W*c) -> Linear -> LN(D), with `owner`'s `norm1_proj`, `proj`, `norm2_proj`.

    words [B * K, W, c] -> [B, K, D]. The stem and every block own these three modules under timm's names.
    """
    x = words.reshape(batch, -1, words.shape[1] * words.shape[2])  # [B, K, W*c] (view)
    return owner.norm2_proj(owner.proj(owner.norm1_proj(x)))


class Block(nn.Module):
    """TNT block: inner transformer on words, word -> sentence projection (not for cls), outer transformer.

    Drop path on the words is per sentence, as in timm and the official code (their batch is sentences).
    """

    def __init__(self, word_dim: int, num_words: int, dim: int, heads_inner: int, heads_outer: int,
                 mlp_ratio: float, drop_path: float):
        super().__init__()
        self.norm_in = nn.LayerNorm(word_dim)
        self.attn_in = Attention(word_dim, heads_inner, narrow_heads=True)
        self.norm_mlp_in = nn.LayerNorm(word_dim)
        self.mlp_in = Mlp(word_dim, 4 * word_dim)  # TNT fixes the inner MLP ratio at 4
        self.norm1_proj = nn.LayerNorm(num_words * word_dim)
        self.proj = nn.Linear(num_words * word_dim, dim, bias=False)
        self.norm2_proj = nn.LayerNorm(dim)
        self.norm_out = nn.LayerNorm(dim)
        self.attn_out = Attention(dim, heads_outer)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, words: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """words [B * K, W, c], tokens [B, 1 + K, D] -> the same shapes."""
        words = words + self.drop_path(self.attn_in(self.norm_in(words)))
        words = words + self.drop_path(self.mlp_in(self.norm_mlp_in(words)))
        sentences = project_words(self, words, tokens.shape[0])  # [B, K, D]
        tokens = torch.cat([tokens[:, :1], tokens[:, 1:] + sentences], dim=1)  # [B, 1 + K, D]; cls gets nothing
        tokens = tokens + self.drop_path(self.attn_out(self.norm_out(tokens)))
        return words, tokens + self.drop_path(self.mlp(self.norm_mlp(tokens)))


class PixelEmbed(nn.Module):
    """Per-patch 7x7 / stride-4 convolution (zero padding at patch borders): 16x16 px -> 4x4 words of width c."""

    def __init__(self, word_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, word_dim, kernel_size=7, stride=WORD_STRIDE, padding=3)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """patches [B', u, u, 3] channels-last -> words [B', W, c], W = (u / 4)^2 in raster order."""
        x = self.proj(patches.permute(0, 3, 1, 2))  # [B', c, s, s]; channels-last input keeps channels-last memory
        return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, x.shape[1])  # [B', W, c] (a view of that memory)


class TNT(nn.Module):
    """Non-legacy TNT (timm `tnt_*_patch16_224` keys) with the MAE encoder contract.

    Args:
        img_size: input resolution; patch_size: sentence size in pixels and the MAE mask unit (multiple of 4).
        inner_dim: word width c; embed_dim: sentence width D.
        num_heads_inner, num_heads_outer: attention heads of the word and sentence transformers.
        num_classes: 0 for a bare encoder; global_pool: `token` (cls, timm's default) or `avg` (mean sentence).
        drop_path_rate: stochastic depth, growing linearly over the blocks.
    """

    def __init__(self, *, img_size: int = 224, patch_size: int = 16, inner_dim: int = 24, embed_dim: int = 384,
                 depth: int = 12, num_heads_inner: int = 4, num_heads_outer: int = 6, mlp_ratio: float = 4.0,
                 num_classes: int = 1000, global_pool: str = "token", drop_path_rate: float = 0.0):
        super().__init__()
        if patch_size % WORD_STRIDE:
            raise ValueError(f"TNT needs patch_size divisible by its word stride {WORD_STRIDE}, got {patch_size}")
        check_backbone_args(img_size, num_classes, drop_path_rate, family="TNT", mask_unit=patch_size)
        if global_pool not in ("token", "avg"):
            raise ValueError(f"global_pool must be 'token' or 'avg', got {global_pool!r}")
        if inner_dim % num_heads_inner or embed_dim % num_heads_outer:
            raise ValueError(f"the heads must divide the widths: inner_dim {inner_dim} by num_heads_inner "
                             f"{num_heads_inner}, embed_dim {embed_dim} by num_heads_outer {num_heads_outer}")
        self.unit, self.grid = patch_size, img_size // patch_size
        self.embed_dim, self.word_dim, self.num_prefix_tokens = embed_dim, inner_dim, 1
        self.num_classes, self.global_pool = num_classes, global_pool
        side = patch_size // WORD_STRIDE
        self.num_words = side * side

        self.pixel_embed = PixelEmbed(inner_dim)
        self.norm1_proj = nn.LayerNorm(self.num_words * inner_dim)
        self.proj = nn.Linear(self.num_words * inner_dim, embed_dim)
        self.norm2_proj = nn.LayerNorm(embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.patch_pos = nn.Parameter(torch.zeros(1, 1 + self.grid**2, embed_dim))
        self.pixel_pos = nn.Parameter(torch.zeros(1, inner_dim, side, side))  # timm's NCHW layout
        rates = [drop_path_rate * i / max(1, depth - 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            Block(inner_dim, self.num_words, embed_dim, num_heads_inner, num_heads_outer, mlp_ratio, rate)
            for rate in rates
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.grad_checkpointing = False
        self._init_weights()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute every block in the backward pass instead of keeping its activations (timm's API)."""
        self.grad_checkpointing = enable

    def _init_weights(self) -> None:
        """timm's TNT init: truncated normal(0.02) for Linear weights and the three embeddings, LayerNorm 1/0."""
        for param in (self.cls_token, self.patch_pos, self.pixel_pos):
            trunc_normal_(param, std=0.02)
        self.apply(init_trunc_normal_weights)

    # ---- stem -------------------------------------------------------------------------------------------------
    def patch_pixels(self, images: torch.Tensor, ids_keep: torch.Tensor | None = None) -> torch.Tensor:
        """Cut sentences: images [B, 3, H, W] -> [B * K, u, u, 3] channels-last pixels (K = L when ids_keep is None).

        Only the kept patches are copied, so masked pixels never reach the pixel embedding.
        """
        return image_units(images, self.grid, self.unit, ids_keep).flatten(0, 1)  # [B*K, u, u, C]

    def embed_words(self, patches: torch.Tensor, word_mask: torch.Tensor | None = None,
                    word_mask_token: torch.Tensor | None = None) -> torch.Tensor:
        """patches [B', u, u, 3] -> words [B', W, c] with `pixel_pos` added.

        With `word_mask` [B', W] (True = hidden), hidden words' pixels are zeroed before the 7x7 convolution, whose
        receptive field would otherwise show 3 of their 4 pixel rows to each neighbour, and their embeddings are
        replaced by `word_mask_token` [1, 1, c] before `pixel_pos`, so the token still learns where it sits.
        """
        if word_mask is not None:
            hidden_px = upsample_grid_mask(word_mask, self.unit // WORD_STRIDE, WORD_STRIDE)  # [B', u, u]
            patches = patches.masked_fill(hidden_px.unsqueeze(-1), 0)  # [B', u, u, C]
        words = self.pixel_embed(patches)  # [B', W, c]
        if word_mask is not None:
            words = torch.where(word_mask.unsqueeze(-1), word_mask_token.to(words.dtype), words)  # mask [B', W, 1]
        pos = self.pixel_pos.permute(0, 2, 3, 1).reshape(1, self.num_words, self.word_dim)  # [1, W, c]
        return words + pos

    def forward_blocks(self, words: torch.Tensor, sentences: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """words [B * K, W, c], sentences [B, K, D] (positions added) -> final words and normed tokens [B, 1 + K, D]."""
        cls = (self.cls_token + self.patch_pos[:, :1]).expand(sentences.shape[0], -1, -1)  # [B, 1, D]
        tokens = torch.cat([cls, sentences], dim=1)  # [B, 1 + K, D]
        for block in self.blocks:
            words, tokens = checkpointed(block, words, tokens, enabled=self.grad_checkpointing)
        return words, self.norm(tokens)

    # ---- forwards -----------------------------------------------------------------------------------------------
    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """Full forward: images [B, 3, H, W] -> normed tokens [B, 1 + L, D]."""
        words = self.embed_words(self.patch_pixels(images))  # [B*L, W, c]
        sentences = project_words(self, words, images.shape[0]) + self.patch_pos[:, 1:]  # [B, L, D]
        return self.forward_blocks(words, sentences)[1]

    def forward_visible_words(self, images: torch.Tensor, ids_keep: torch.Tensor,
                              word_mask: torch.Tensor | None = None, word_mask_token: torch.Tensor | None = None):
        """Visible sentences only, optionally with hidden words (see `embed_words`).

        Returns normed tokens [B, 1 + K, D] and the last block's words [B * K, W, c] (for a word-level head).
        """
        words = self.embed_words(self.patch_pixels(images, ids_keep), word_mask, word_mask_token)  # [B*K, W, c]
        pos = self.patch_pos[0, 1:][ids_keep]  # [B, K, D]: patch_pos[1 + idx]
        words, tokens = self.forward_blocks(words, project_words(self, words, images.shape[0]) + pos)
        return tokens, words

    def forward_visible(self, images: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """MAE encoder: images [B, 3, H, W], ids_keep [B, K] -> [B, 1 + K, D]; masked sentences are never touched."""
        return self.forward_visible_words(images, ids_keep)[0]

    def forward_with_mask_tokens(self, images: torch.Tensor, mask: torch.Tensor, mask_token: torch.Tensor):
        """SimMIM-style baseline, every sentence in the encoder: mask [B, L] (1 = hidden) -> [B, 1 + L, D].

        Hidden sentence tokens become `mask_token` [1, 1, D] after the initial projection. Their words still run
        (that is the cost being measured) but from zeroed pixels, so the per-block projections cannot leak them.
        """
        hidden = mask.bool()  # [B, L]
        patches = self.patch_pixels(images).masked_fill(hidden.reshape(-1, 1, 1, 1), 0)  # [B*L, u, u, C]
        words = self.embed_words(patches)  # [B*L, W, c]
        sentences = project_words(self, words, images.shape[0])  # [B, L, D]
        sentences = torch.where(hidden.unsqueeze(-1), mask_token.to(sentences.dtype), sentences)  # mask [B, L, 1]
        return self.forward_blocks(words, sentences + self.patch_pos[:, 1:])[1]

    def forward_head(self, tokens: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """tokens [B, 1 + L, D] -> logits [B, num_classes] (or pooled features [B, D] with pre_logits)."""
        x = tokens[:, 1:].mean(dim=1) if self.global_pool == "avg" else tokens[:, 0]
        return x if pre_logits else self.head(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(images))

    # ---- optimiser and checkpoint hooks -------------------------------------------------------------------------
    def no_weight_decay(self) -> set[str]:
        return {"cls_token", "patch_pos", "pixel_pos"}

    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's layer-decay format: stem (embeddings and the initial projection), then one group per block.

        The final norm matches nothing, so it joins the head in the top group, where MAE's layer decay gives both
        scale 1 (timm's own TNT merges it into the last block's group).
        """
        return {
            "stem": r"^(?:cls_token|patch_pos|pixel_pos|pixel_embed|norm1_proj|proj|norm2_proj)(?:\.|$)",
            "blocks": r"^blocks\.(\d+)",
        }

    @staticmethod
    def from_official_layout(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The official huawei-noah layout renamed to timm's; any other passes through."""
        official = "patch_pos" not in state_dict and "outer_pos" in state_dict
        return convert_official(state_dict) if official else state_dict

    def adapt_state_dict(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """timm's layout passes through; the official huawei-noah layout is renamed; `patch_pos` follows our grid.

        Raises:
            CheckpointError: timm's legacy TNT layout, whose projection is another computation, not a renaming.
        """
        state_dict = self.from_official_layout(state_dict)
        if "blocks.0.proj.bias" in state_dict and "blocks.0.norm2_proj.weight" not in state_dict:
            raise CheckpointError("this is timm's legacy TNT layout (tnt_s_legacy_patch16_224: a LayerNorm per word "
                                  "before the projection, which has a bias, and none after it), a different "
                                  "computation that no model here builds; use the official TNT release or timm's "
                                  "tnt_s_patch16_224 / tnt_b_patch16_224 weights")
        return resample_token_table(state_dict, "patch_pos", self.patch_pos, self.grid, num_prefix_tokens=1)


def convert_official(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official TNT keys -> timm's: drop the unused `outer_tokens`, rename, `pixel_pos` [1, W, c] -> [1, c, s, s]."""
    out = {}
    for key, value in state_dict.items():
        if key == "outer_tokens":
            continue
        for old, new in OFFICIAL_RENAMES:
            key = key.replace(old, new)
        if key == "pixel_pos" and value.dim() == 3:
            side = round(value.shape[1] ** 0.5)
            value = value.transpose(1, 2).reshape(1, value.shape[2], side, side)  # [1, c, s, s]
        out[key] = value
    return out


class WordMaskedAutoencoder(MaskedAutoencoder):
    """MAE-TNT plus experimental word masking inside the visible sentences (no published precedent).

    Words cannot be dropped (each projection needs all W words), so a fraction of the words of every visible sentence
    is hidden SimMIM-style (see `TNT.embed_words`). A word head (LayerNorm + Linear on the last block's words)
    predicts their 4x4x3 pixels; that MSE over hidden words (norm-pix per word when `norm_pix_loss`) is added to the
    sentence loss. The word mask is drawn from torch's global RNG on the input's device, so a reseeded step repeats.

    Args:
        encoder: a `TNT`; word_mask_ratio: fraction of words hidden per visible sentence, in (0, 1).
        kwargs: as for `MaskedAutoencoder` (visible mode only).
    """

    def __init__(self, encoder: TNT, *, word_mask_ratio: float, **kwargs):
        super().__init__(encoder, **kwargs)
        if not 0 < word_mask_ratio < 1:
            raise ValueError(f"word_mask_ratio must be in (0, 1), or 0 for no word masking, got {word_mask_ratio}")
        if self.encoder_mode != "visible":
            raise ValueError("word masking needs encoder_mode='visible'")
        self.word_mask_ratio = word_mask_ratio
        self.word_mask_token = nn.Parameter(torch.zeros(1, 1, encoder.word_dim))
        self.decoder_word_norm = nn.LayerNorm(encoder.word_dim)
        self.decoder_word_pred = nn.Linear(encoder.word_dim, WORD_STRIDE**2 * 3)
        self.decoder_word_pred.apply(init_mae_weights)
        nn.init.normal_(self.word_mask_token, std=0.02)

    def random_word_mask(self, num_sentences: int, device: torch.device) -> torch.Tensor:
        """[B * K, W] bool, True = hidden word; the same count in every sentence, as MAE does per image."""
        num_words = self.encoder.num_words
        noise = torch.rand(num_sentences, num_words, device=device)
        return random_masking(noise, num_visible(num_words, self.word_mask_ratio))[2].bool()

    def word_target(self, images: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """Pixels of the visible sentences' words: [B * K, W, 4 * 4 * 3], channel-last, normalised per word."""
        s, w = self.unit // WORD_STRIDE, WORD_STRIDE
        x = self.encoder.patch_pixels(images.float(), ids_keep)  # [B*K, u, u, C]
        x = x.reshape(-1, s, w, s, w, 3).transpose(2, 3)  # [B*K, s, s, w, w, C]
        x = x.reshape(x.shape[0], s * s, w * w * 3)  # [B*K, W, w*w*C]
        if self.norm_pix_loss:
            x = normalize_pixels(x)
        return x

    def word_loss(self, images: torch.Tensor, ids_keep: torch.Tensor, words: torch.Tensor,
                  word_mask: torch.Tensor) -> torch.Tensor:
        """MSE over the hidden words only: words [B * K, W, c], word_mask [B * K, W] -> scalar."""
        pred = self.decoder_word_pred(self.decoder_word_norm(words))  # [B*K, W, w*w*C]
        per_word = ((pred.float() - self.word_target(images, ids_keep)) ** 2).mean(dim=-1)  # [B*K, W]
        return masked_mean(per_word, word_mask)

    def forward(self, images: torch.Tensor, mask_ratio: float | None = None, noise: torch.Tensor | None = None):
        """As `MaskedAutoencoder.forward` with the word term in the loss: loss, pred [B, L, u*u*3], mask [B, L]."""
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        ids_keep, ids_restore, mask = self.mask_units(images, ratio, noise)
        word_mask = self.random_word_mask(ids_keep.numel(), images.device)  # [B*K, W]
        latent, words = self.encoder.forward_visible_words(
            self.encoder_input(images), ids_keep, word_mask, self.word_mask_token
        )
        pred = self.forward_decoder(latent, ids_restore)
        loss = self.forward_loss(images, pred, mask) + self.word_loss(images, ids_keep, words, word_mask)
        return loss, pred, mask


TNT_SIZES = {
    "test": dict(img_size=32, patch_size=8, inner_dim=8, embed_dim=32, depth=2, num_heads_inner=2, num_heads_outer=2),
    "ti": dict(inner_dim=12, embed_dim=192, num_heads_inner=2, num_heads_outer=3),
    "s": dict(inner_dim=24, embed_dim=384, num_heads_inner=4, num_heads_outer=6),
    "b": dict(inner_dim=40, embed_dim=640, num_heads_inner=4, num_heads_outer=10),
}
# Decoders sized for the visible-only encoder (`tools/bench/tnt.py --decoders`, docs/tnt.md). At 75% masking MAE's
# 8x512 decoder costs 5.36 GMAC/img: 4.3x the 1.25-GMAC TNT-S encoder (78% of the step), 1.6x TNT-B's 3.45. Chosen:
# Ti 2x256 (0.39 GMAC, 1.2x its 0.32-GMAC encoder), S 4x256 (0.74, 0.59x), B 4x512 (2.73, 0.79x).
TNT_DECODERS = {
    "test": dict(decoder_dim=32, decoder_depth=1, decoder_heads=2),
    "ti": dict(decoder_dim=256, decoder_depth=2, decoder_heads=8),
    "s": dict(decoder_dim=256, decoder_depth=4, decoder_heads=8),
    "b": dict(decoder_dim=512, decoder_depth=4, decoder_heads=16),
}


def _tnt(size: str, **kwargs) -> TNT:
    return TNT(**{**TNT_SIZES[size], **kwargs})


def _mae_tnt(size: str, word_mask_ratio: float = 0.0, **kwargs) -> MaskedAutoencoder:
    """MAE kwargs override the size's decoder; the rest go to a headless `TNT`."""
    wrapper = partial(WordMaskedAutoencoder, word_mask_ratio=word_mask_ratio) if word_mask_ratio else None
    return build_mae(lambda **enc: _tnt(size, num_classes=0, **enc), TNT_DECODERS[size], wrapper=wrapper, **kwargs)


@register_model
def tnt_test_patch8_32(**kwargs) -> TNT:
    """Tiny TNT for tests and the CPU demo: 32 px, 8-px sentences of 2x2 words, 2 blocks (c 8, D 32)."""
    return _tnt("test", **kwargs)


@register_model
def tnt_ti_patch16_224(**kwargs) -> TNT:
    return _tnt("ti", **kwargs)


@register_model
def tnt_s_patch16_224(**kwargs) -> TNT:
    return _tnt("s", **kwargs)


@register_model
def tnt_b_patch16_224(**kwargs) -> TNT:
    return _tnt("b", **kwargs)


@register_model
def mae_tnt_test(**kwargs) -> MaskedAutoencoder:
    return _mae_tnt("test", **kwargs)


@register_model
def mae_tnt_ti_patch16(**kwargs) -> MaskedAutoencoder:
    return _mae_tnt("ti", **kwargs)


@register_model
def mae_tnt_s_patch16(**kwargs) -> MaskedAutoencoder:
    return _mae_tnt("s", **kwargs)


@register_model
def mae_tnt_b_patch16(**kwargs) -> MaskedAutoencoder:
    return _mae_tnt("b", **kwargs)
