"""Encoder-agnostic masked autoencoder: masking by mask unit, a light ViT decoder and the norm-pix MSE loss.

The wrapper reads only the encoder contract: `unit` (mask unit in pixels), `grid` (units per side), `embed_dim`,
`num_prefix_tokens`, `forward_visible(images, ids_keep)`, timm's `set_grad_checkpointing(enable)` and
`no_weight_decay()` (its tokens named `*_token`), and, for the SimMIM-style baseline,
`forward_with_mask_tokens(images, mask, mask_token)` (with an optional `mask_token_dim`). Everything else about the
encoder stays private to it.

References: He et al., "Masked Autoencoders Are Scalable Vision Learners" (arXiv 2111.06377);
facebookresearch/mae `models_mae.py` (semantics reproduced exactly: noise + argsort masking, sin-cos decoder
positions with a zero cls row, loss on removed units only, unbiased per-unit variance); SimMIM (arXiv 2111.09886)
for the baseline that keeps mask tokens in the encoder.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .layers import LayerNorm, check_images, checkpointed, image_units, init_mae_weights, transformer_blocks
from .masking import gather_units, num_visible, random_masking
from .pixel_loss import masked_mean, normalize_pixels
from .pos_embed import is_sincos_table, sincos_2d

WRAPPER_KEY_PREFIXES = ("decoder_", "mask_token", "encoder_mask_token")
"""State-dict keys owned by the MAE wrapper rather than the encoder (flat official MAE files mix the two)."""


StateDict = dict[str, torch.Tensor]


def split_mae_state_dict(state_dict: StateDict) -> tuple[StateDict, StateDict]:
    """An MAE state dict of either layout -> (its encoder part, without our `encoder.` prefix; the rest). Ours
    prefixes the encoder's keys; the official flat layout has the wrapper's (`WRAPPER_KEY_PREFIXES`) beside them."""
    if any(key.startswith("encoder.") for key in state_dict):
        encoder = {k.removeprefix("encoder."): v for k, v in state_dict.items() if k.startswith("encoder.")}
        return encoder, {k: v for k, v in state_dict.items() if not k.startswith("encoder.")}
    wrapper = {k: v for k, v in state_dict.items() if k.startswith(WRAPPER_KEY_PREFIXES)}
    return {k: v for k, v in state_dict.items() if k not in wrapper}, wrapper


class MaskedAutoencoder(nn.Module):
    """MAE around any encoder that follows the contract above.

    Args:
        encoder: the backbone; its state-dict keys are kept under `encoder.`.
        decoder_dim: decoder width (MAE: 512).
        decoder_depth: decoder blocks (MAE: 8).
        decoder_heads: decoder attention heads (MAE: 16).
        norm_pix_loss: normalise every target unit by its own mean and variance.
        mask_ratio: default fraction of hidden units.
        encoder_mode: `visible` (MAE: the encoder sees visible units only) or `mask_tokens` (SimMIM-style baseline:
            every unit enters the encoder, hidden ones replaced by a learned token; for measurement only).
    """

    def __init__(
        self,
        encoder: nn.Module,
        *,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
        norm_pix_loss: bool = True,
        mask_ratio: float = 0.75,
        encoder_mode: str = "visible",
    ):
        super().__init__()
        if encoder_mode not in ("visible", "mask_tokens"):
            raise ValueError(f"encoder_mode must be 'visible' or 'mask_tokens', got {encoder_mode!r}")
        self.encoder = encoder
        self.unit, self.grid = encoder.unit, encoder.grid
        self.num_prefix_tokens = encoder.num_prefix_tokens
        self.norm_pix_loss, self.mask_ratio, self.encoder_mode = norm_pix_loss, mask_ratio, encoder_mode
        if self.grid < 2:  # the one unit stays visible, so nothing is hidden and the loss is 0 at every step
            raise ValueError(f"images of one {self.unit}-px mask unit leave nothing to hide: use images of at least "
                             f"{2 * self.unit} px (img_size)")
        if encoder_mode == "mask_tokens":
            # The width where mask tokens enter is the encoder's business (SReT: after its stem).
            token_dim = getattr(encoder, "mask_token_dim", encoder.embed_dim)
            self.encoder_mask_token = nn.Parameter(torch.zeros(1, 1, token_dim))

        self.decoder_embed = nn.Linear(encoder.embed_dim, decoder_dim)
        if encoder_mode == "visible":  # hidden units enter at the decoder; unused, DDP would wait for its gradient
            self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        # Fixed sin-cos table, saved in the state dict as in MAE but never trained.
        table = sincos_2d(decoder_dim, self.grid, self.num_prefix_tokens)  # [P + L, Dd]
        self.decoder_pos_embed = nn.Parameter(table.unsqueeze(0), requires_grad=False)  # [1, P + L, Dd]
        self.decoder_blocks = transformer_blocks(decoder_dim, decoder_depth, decoder_heads, mlp_ratio=4.0)  # MAE's
        self.decoder_norm = LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, self.unit**2 * 3)
        self.grad_checkpointing = False
        self._init_decoder()

    def _init_decoder(self) -> None:
        for name, module in self.named_modules():
            if name.startswith("decoder_"):
                module.apply(init_mae_weights)
        mask_token = self.mask_token if self.encoder_mode == "visible" else self.encoder_mask_token
        nn.init.normal_(mask_token, std=0.02)

    def no_weight_decay(self) -> set[str]:
        """What the encoder exempts but its tokens: its learned position tables (TNT's, SReT's), which every reference
        that learns them exempts (MAE's own are fixed). The class and mask tokens decay, as in MAE (timm's
        `add_weight_decay`, no skip list)."""
        return {f"encoder.{name}" for name in self.encoder.no_weight_decay() if not name.endswith("_token")}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute every encoder and decoder block in the backward pass instead of keeping its activations."""
        self.grad_checkpointing = enable
        self.encoder.set_grad_checkpointing(enable)

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, L, u * u * 3], channel-last inside each unit (MAE's target layout)."""
        return image_units(images, self.grid, self.unit).flatten(2)  # [B, L, u*u*C]

    def unpatchify(self, units: torch.Tensor) -> torch.Tensor:
        """[B, L, u * u * 3] -> [B, 3, H, W]."""
        b, g, u = units.shape[0], self.grid, self.unit
        x = units.reshape(b, g, g, u, u, 3)  # [B, gh, gw, u, u, C]
        x = torch.einsum("bhwpqc->bchpwq", x)  # [B, C, gh, u, gw, u]
        return x.reshape(b, 3, g * u, g * u)  # [B, C, H, W]

    def forward_encoder(
        self, images: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mask and encode. Returns latent [B, P + K, D] (K = L in mask-token mode), mask [B, L], ids_restore [B, L].

        The loss target stays with the images as given (see `encoder_input`).
        """
        ids_keep, ids_restore, mask = self.mask_units(images, mask_ratio, noise)
        images = self.encoder_input(images)
        if self.encoder_mode == "mask_tokens":
            return self.encoder.forward_with_mask_tokens(images, mask, self.encoder_mask_token), mask, ids_restore
        return self.encoder.forward_visible(images, ids_keep), mask, ids_restore

    def encoder_input(self, images: torch.Tensor) -> torch.Tensor:
        """The images in the encoder's weights' dtype: bf16 under DeepSpeed's bf16 mode, which has no autocast. The
        loss targets are taken from the images as given, so norm-pix statistics do not come from rounded pixels."""
        return images.to(next(self.encoder.parameters()).dtype)

    def mask_units(self, images: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The reference masking by noise and argsort: ids_keep [B, K], ids_restore [B, L], mask [B, L]."""
        check_images(images, self.grid, self.unit)  # before the encoder meets them
        num_units = self.grid**2
        if not 0 <= mask_ratio < 1:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        if noise is None:
            noise = torch.rand(images.shape[0], num_units, device=images.device)
        elif noise.shape != (images.shape[0], num_units):
            raise ValueError(f"noise must be [batch, units] = [{images.shape[0]}, {num_units}], "
                             f"got {list(noise.shape)}")
        return random_masking(noise, num_visible(num_units, mask_ratio))

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Latent [B, P + K, D] -> predicted pixels [B, L, u * u * 3] for every unit, in raster order."""
        x = self.decoder_embed(latent)  # [B, P + K, Dd]
        prefix, units = x[:, : self.num_prefix_tokens], x[:, self.num_prefix_tokens :]
        if self.encoder_mode == "visible":
            num_hidden = ids_restore.shape[1] - units.shape[1]
            units = torch.cat([units, self.mask_token.expand(x.shape[0], num_hidden, -1)], dim=1)  # [B, L, Dd]
            units = gather_units(units, ids_restore)  # [B, L, Dd] unshuffled to raster order
        x = torch.cat([prefix, units], dim=1) + self.decoder_pos_embed  # [B, P + L, Dd]
        for block in self.decoder_blocks:
            x = checkpointed(block, x, enabled=self.grad_checkpointing)
        x = self.decoder_pred(self.decoder_norm(x))  # [B, P + L, u*u*3]
        return x[:, self.num_prefix_tokens :]

    def forward_loss(self, images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error over the hidden units only (mask == 1)."""
        target = self.target(images)
        per_unit = ((pred.float() - target) ** 2).mean(dim=-1)  # [B, L]
        return masked_mean(per_unit, mask)

    def target(self, images: torch.Tensor) -> torch.Tensor:
        """Reconstruction target [B, L, u * u * 3]: pixels, normalised per unit when norm_pix_loss is on."""
        target = self.patchify(images.float())
        if self.norm_pix_loss:
            target = normalize_pixels(target)
        return target

    def forward(
        self, images: torch.Tensor, mask_ratio: float | None = None, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns loss (scalar), pred [B, L, u * u * 3] and mask [B, L] (1 = hidden).

        Args:
            images: [B, 3, H, W] normalised images.
            mask_ratio: fraction of hidden units; defaults to the model's.
            noise: optional [B, L] noise replacing the random draw, exactly as in the reference.
        """
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        latent, mask, ids_restore = self.forward_encoder(images, ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(images, pred, mask), pred, mask

    def adapt_state_dict(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Accept our layout or a flat official-MAE one (encoder keys without the `encoder.` prefix)."""
        encoder_sd, wrapper_sd = split_mae_state_dict(state_dict)
        encoder_sd, wrapper_sd = rebuilt_fixed_tables(self.encoder, encoder_sd), rebuilt_fixed_tables(self, wrapper_sd)
        if hasattr(self.encoder, "adapt_state_dict"):  # resamples the learned position tables
            encoder_sd = self.encoder.adapt_state_dict(encoder_sd)
        return {**{f"encoder.{k}": v for k, v in encoder_sd.items()}, **wrapper_sd}


def rebuilt_fixed_tables(module: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state_dict` with `module`'s own values for its frozen tables where the checkpoint's is the sin-cos table of
    another grid: `module` built its own exactly for its grid, where resampling would only approximate it. A learned
    table of another grid (a supervised ViT's) stays, for the encoder to resample or the key check to refuse."""
    frozen = {name: p for name, p in module.named_parameters() if not p.requires_grad}

    def replaceable(key: str, value: torch.Tensor) -> bool:
        own = frozen.get(key)
        if own is None or value.shape == own.shape or own.dim() != 3:
            return False
        prefix = own.shape[1] - math.isqrt(own.shape[1]) ** 2  # the cls row, if any: P < 2 * grid + 1
        return is_sincos_table(value, prefix)

    return {key: frozen[key].detach().clone() if replaceable(key, value) else value
            for key, value in state_dict.items()}


MAE_KWARGS = (
    "decoder_dim", "decoder_depth", "decoder_heads", "norm_pix_loss", "mask_ratio", "encoder_mode"
)
REFERENCE_DECODER = {"decoder_dim": 512, "decoder_depth": 8, "decoder_heads": 16}


def build_mae(encoder_builder, decoder_defaults: dict, *, wrapper=None, **kwargs) -> MaskedAutoencoder:
    """Build `encoder_builder(**encoder kwargs)` and wrap it (`MaskedAutoencoder` unless `wrapper` is given); MAE
    kwargs override `decoder_defaults`."""
    if given := [key for key in ("num_classes", "global_pool") if key in kwargs]:  # the encoder builders set them
        raise ValueError(f"{' and '.join(given)} is for a classifier: an MAE model has no head, and its decoder reads "
                         "every encoded token; build the classifier (the name without mae_, e.g. vit_base_patch16_224)")
    mae_kwargs = {k: kwargs.pop(k) for k in MAE_KWARGS if k in kwargs}
    return (wrapper or MaskedAutoencoder)(encoder_builder(**kwargs), **{**decoder_defaults, **mae_kwargs})
