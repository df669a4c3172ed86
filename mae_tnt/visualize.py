"""Reconstruction grid of a checkpoint on the first images of a shard set.

    python tools/visualize.py CKPT SHARDS [--split val] [--out recon.png] [--count 8] [--mask-ratio 0.75]

CKPT is a pretraining checkpoint directory (its `state.json` names the model and the data statistics).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from .data.loader import first_images
from .data.shards import resolve_shards
from .models import create_model
from .train.recon import write_reconstructions


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="checkpoints/step_* directory of a pretraining run")
    parser.add_argument("shards", help="shard directory with _info.json, or a brace URL")
    parser.add_argument("--split", default="val")
    parser.add_argument("--out", type=Path, default=Path("recon.png"))
    parser.add_argument("--count", type=int, default=8)
    parser.add_argument("--mask-ratio", type=float, default=None, help="defaults to the run's")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shown masks")
    args = parser.parse_args(argv)
    state = json.loads((args.checkpoint / "state.json").read_text())
    config = state["config"]
    model_cfg = config["model"]
    ratio = args.mask_ratio if args.mask_ratio is not None else model_cfg["mask_ratio"]
    model = create_model(state["model"], checkpoint_path=args.checkpoint, img_size=model_cfg["img_size"],
                         norm_pix_loss=model_cfg["norm_pix_loss"], mask_ratio=ratio)
    images = first_images(resolve_shards(args.shards, args.split, verify=False), args.count, model_cfg["img_size"])
    loss = write_reconstructions(model, images, config["data"]["mean"], config["data"]["std"], args.out,
                                 state["step"], args.seed)
    print(f"wrote {args.out} (masked-patch loss {loss:.4f} at mask ratio {ratio})")
    return 0
