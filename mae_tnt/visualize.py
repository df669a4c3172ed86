"""Reconstruction grid of a checkpoint on the first images of a shard set.

    python tools/visualize.py CKPT SHARDS [--split val] [--out PNG] [--count 8] [--mask-ratio 0.75]

CKPT is a pretraining checkpoint directory, or a run directory for its newest checkpoint (its `state.json` names
the model and the data statistics). The grid goes to the run's `recon/` folder unless `--out` says otherwise.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from .cli import report_user_errors
from .data.loader import first_images
from .data.shards import resolve_shards
from .models import create_model, load_weights
from .models.loading import CheckpointError, resolve_checkpoint
from .text import HelpWithDefaults
from .train.init import read_source
from .train.recon import write_reconstructions


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpWithDefaults)
    parser.add_argument("checkpoint", type=Path, help="checkpoints/step_* directory or run directory of a pretraining")
    parser.add_argument("shards", help="shard directory with _info.json, or a brace URL")
    parser.add_argument("--split", default="val", help="split of SHARDS whose first images are shown")
    parser.add_argument("--out", type=Path, default=None, help="defaults to RUN/recon/step_N_SPLIT.png")
    parser.add_argument("--count", type=int, default=8, help="images shown (>= 1)")
    parser.add_argument("--mask-ratio", type=float, default=None, help="in [0, 1); defaults to the run's")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shown masks")
    args = parser.parse_args(argv)
    if args.count < 1:
        parser.error(f"--count must be >= 1, got {args.count}")
    if args.mask_ratio is not None and not 0 <= args.mask_ratio < 1:
        parser.error(f"--mask-ratio must be in [0, 1), got {args.mask_ratio}")
    return 0 if report_user_errors(lambda: visualize(args)) is not None else 1


def visualize(args: argparse.Namespace) -> dict:
    checkpoint = resolve_checkpoint(args.checkpoint)
    raw, state = read_source(checkpoint)
    if "config" not in state or not state.get("model", "").startswith("mae_"):
        what = "names no MAE model" if "model" in state else "is missing: an export or a bare weights file"
        raise CheckpointError(f"{checkpoint} is not a pretraining checkpoint (its state.json {what}); pass a "
                              "checkpoints/step_* directory of a pretrain.py run, whose state.json gives the model and "
                              "data settings the grid needs")
    model_cfg, data_cfg = state["config"]["model"], state["config"]["data"]
    ratio = args.mask_ratio if args.mask_ratio is not None else model_cfg["mask_ratio"]
    model = create_model(state["model"], img_size=model_cfg["img_size"], norm_pix_loss=model_cfg["norm_pix_loss"],
                         mask_ratio=ratio)
    load_weights(model, raw)
    out = args.out or default_output(checkpoint, args.split)
    out.parent.mkdir(parents=True, exist_ok=True)
    shards = resolve_shards(args.shards, args.split, split_key="--split")  # warns about a truncated shard
    images = first_images(shards, args.count, model_cfg["img_size"])
    if len(images) < args.count:
        print(f"note: the {args.split} split has only {len(images)} readable images to show of the {args.count} asked")
    loss = write_reconstructions(model, images, data_cfg["mean"], data_cfg["std"], out, state["step"], args.seed)
    shown = f"{loss:.4f}" if ratio > 0 else "n/a, nothing is hidden"
    print(f"wrote {out} (masked-patch loss {shown} at mask ratio {ratio})")
    return {"out": out, "loss": loss}


def default_output(checkpoint: Path, split: str) -> Path:
    """RUN/recon/step_N_SPLIT.png beside the grids the run wrote itself (the checkpoint's folder for a lone one)."""
    run = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint
    return run / "recon" / f"{checkpoint.name}_{split}.png"


if __name__ == "__main__":
    sys.exit(main())
