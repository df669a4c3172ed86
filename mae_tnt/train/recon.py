"""Reconstruction grids: original / masked input / reconstruction / reconstruction with visible patches pasted.

With norm_pix_loss the model predicts per-unit normalised pixels; to display them, each predicted unit is
un-normalised with the mean and variance of the true unit. That uses information the model never saw, so the grid is
for display only (MAE issues #174, #190) and its title says so.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..atomic import atomic_file
from ..data.transforms import denormalize, normalize
from ..models.layers import in_mode
from ..models.pixel_loss import pixel_stats


@torch.no_grad()
def reconstruct(model, images: torch.Tensor, noise: torch.Tensor) -> dict[str, torch.Tensor]:
    """Normalised float images [B, 3, H, W] -> display rows in [0, 1]: original, masked, recon, recon+visible."""
    loss, pred, mask = model(images, noise=noise)
    if model.norm_pix_loss:
        mean, std = pixel_stats(model.patchify(images.float()))  # [B, L, 1] each
        pred = pred.float() * std + mean
    unit_mask = mask.unsqueeze(-1).expand(-1, -1, model.unit**2 * 3)  # [B, L, u*u*3]
    hidden = model.unpatchify(unit_mask.float())  # [B, 3, H, W], 1 where hidden
    recon = model.unpatchify(pred.float())
    return {"original": images, "masked": images * (1 - hidden), "reconstruction": recon,
            "reconstruction + visible": images * (1 - hidden) + recon * hidden, "loss": loss}


def save_grid(rows: dict[str, torch.Tensor], mean: list[float], std: list[float], path: Path, title: str) -> None:
    """Save a PNG with one labelled row per entry of `rows` (normalised images [B, 3, H, W])."""
    names = [name for name in rows if name != "loss"]
    tiles = [denormalize(rows[name].float().cpu(), mean, std) for name in names]
    scale = max(1, 96 // tiles[0].shape[-1])  # small images are enlarged (nearest) so people can see them
    tiles = [torch.nn.functional.interpolate(t, scale_factor=scale, mode="nearest") for t in tiles]
    batch, _, height, width = tiles[0].shape
    label_w, header = 150, 18
    title_w = round(ImageFont.load_default().getlength(title)) + 8  # wider than a grid of one or two images
    canvas = Image.new("RGB", (max(label_w + batch * (width + 2), title_w), header + len(names) * (height + 2)),
                       "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 2), title, fill="black")
    for row, (name, images) in enumerate(zip(names, tiles, strict=True)):
        top = header + row * (height + 2)
        draw.text((4, top + height // 2 - 5), name, fill="black")
        for col in range(batch):
            array = (images[col].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)  # [H, W, 3]
            canvas.paste(Image.fromarray(array), (label_w + col * (width + 2), top))
    with atomic_file(path) as tmp:  # a run stopped while saving leaves no half-written grid
        canvas.save(tmp)  # in the format of the suffix


def shown_loss(model, loss: float) -> str:
    """An MAE's loss as the grid title and visualize show it: n/a when nothing is hidden, and with what it sums
    beyond the hidden units (TNT's word masking adds the hidden words' term; the grid's rows show sentences only)."""
    if model.mask_ratio == 0:
        return "n/a, nothing is hidden"
    return f"{loss:.4f}" + (" (hidden sentences + hidden words)" if getattr(model, "word_mask_ratio", 0) else "")


def write_reconstructions(model, images_uint8: torch.Tensor, mean, std, path: Path | None, label: str,
                          seed: int) -> float:
    """Reconstruct a fixed batch with a fixed mask and save the grid to `path` (None: no grid, only the forward),
    titled by `label` (e.g. "step 100"); returns the batch loss."""
    images = normalize(images_uint8, mean, std)  # fp32 even for half weights: the model casts its encoder's input
    generator = torch.Generator().manual_seed(seed)
    noise = torch.rand(images.shape[0], model.grid**2, generator=generator).to(images.device)
    with in_mode(model, training=False):
        rows = reconstruct(model, images, noise)
    note = " (norm-pix: un-normalised with the true patch statistics, display only)" if model.norm_pix_loss else ""
    loss = rows["loss"].item()
    if path is not None:
        save_grid(rows, mean, std, path, f"{label}, loss {shown_loss(model, loss)}{note}")
    return loss
