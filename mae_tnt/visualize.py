"""Reconstruction grid of a checkpoint on the first images of a shard set.

    python tools/visualize.py CKPT SHARDS [--split val] [--out PNG] [--count 8] [--mask-ratio 0.75]
    python tools/visualize.py mae_vit_large.safetensors SHARDS --model mae_vit_large_patch16 [--no-norm-pix]

CKPT is a pretraining checkpoint directory, or a run directory for its newest checkpoint (its `state.json` names
the model and the data statistics). Weights without one, such as an official MAE checkpoint (with its decoder)
converted by tools/convert_checkpoint.py, need --model (and --img-size, --no-norm-pix where they differ from the
model's own size, 224 px for MAE's, and norm-pix targets); they are shown on images normalised with the ImageNet
statistics, as MAE's were. The grid goes to the run's `recon/` folder (beside a weights file) unless `--out` says
otherwise.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from .atomic import file_in_the_way
from .cli import quiet_on_ctrl_c, report_user_errors
from .config import ModelConfig, check_model_name
from .data.loader import first_images
from .data.shards import resolve_shards
from .models import create_model, load_weights
from .models.loading import (
    STATE_FILE,
    CheckpointError,
    by_module,
    pretraining_build_kwargs,
    refuse_oversized_build,
    refuse_resampled,
    resolve_checkpoint,
    untrained_keys,
)
from .models.masking import rounded_mask_ratio
from .text import HelpWithDefaults, counted
from .train.init import read_source
from .train.recon import shown_loss, write_reconstructions


@quiet_on_ctrl_c("run the same command again to draw the grid")
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpWithDefaults)
    parser.add_argument("checkpoint", type=Path,
                        help="checkpoints/step_* directory or run directory of a pretraining, or a weights file "
                             "(with --model)")
    parser.add_argument("shards", help="shard directory with _info.json, or a brace URL")
    parser.add_argument("--split", default="val", help="split of SHARDS whose first images are shown")
    parser.add_argument("--info", default=None,
                        help="local _info.json (or its directory) giving the sample counts of remote SHARDS URLs")
    parser.add_argument("--allow-pipe", action="store_true", help="allow pipe: SHARDS URLs, which run a shell command")
    parser.add_argument("--out", type=Path, default=None,
                        help="a .png or .jpg file, or a directory for step_N_SPLIT.png; defaults to "
                             "RUN/recon/step_N_SPLIT.png, or STEM_SPLIT.png beside a weights file")
    parser.add_argument("--count", type=int, default=8, help="images shown (>= 1)")
    parser.add_argument("--mask-ratio", type=float, default=None, help="in [0, 1); defaults to the run's")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shown masks")
    parser.add_argument("--model", default=None,
                        help="MAE model of weights that come without a run's state.json (e.g. mae_vit_large_patch16)")
    parser.add_argument("--img-size", type=int, default=None,
                        help="with --model: the image size in pixels the weights were pretrained at (default: the "
                             "model's own, 224 for MAE's)")
    parser.add_argument("--norm-pix", action=argparse.BooleanOptionalAction, default=None,
                        help="with --model: whether the weights were trained on norm-pix targets (default: yes, as "
                             "MAE's defaults)")
    args = parser.parse_args(argv)
    if args.count < 1:
        parser.error(f"--count must be >= 1, got {args.count}")
    if args.mask_ratio is not None and not 0 <= args.mask_ratio < 1:
        parser.error(f"--mask-ratio must be in [0, 1), got {args.mask_ratio}")
    if args.out is not None and not is_grid_file(args.out) and args.out.suffix and not args.out.is_dir():
        parser.error(f"--out must be a .png or .jpg file or a directory, got {args.out}")
    if args.out is not None and (blocker := file_in_the_way(args.out.parent)):
        parser.error(f"--out {args.out} cannot be written: {blocker} is a file")
    if args.model is None and (args.img_size is not None or args.norm_pix is not None):
        parser.error("--img-size and --[no-]norm-pix describe weights named with --model; a run's checkpoint gives "
                     "its own")
    return 0 if report_user_errors(lambda: visualize(args)) is not None else 1


GRID_SUFFIXES = (".png", ".jpg", ".jpeg")


def is_grid_file(out: Path) -> bool:
    """Whether --out names the grid's file; anything else without a suffix is a directory, created if need be."""
    return out.suffix.lower() in GRID_SUFFIXES and not out.is_dir()


def visualize(args: argparse.Namespace) -> dict:
    checkpoint = resolve_checkpoint(args.checkpoint)
    raw, state = read_source(checkpoint)
    if state:  # a run's state.json or an export's config.json, which name their model
        _check_pretraining_state(checkpoint, state, args.model)
        build = pretraining_build_kwargs(state, str(checkpoint))  # every model.* setting of the run
        refuse_oversized_build(state["model"], build, raw, checkpoint, "restore it, or copy the weights out of it "
                               "and describe them with --model (and --img-size, --no-norm-pix)")
        mean, std = state["config"]["data"]["mean"], state["config"]["data"]["std"]
    elif args.model is None:
        raise CheckpointError(f"{checkpoint} comes without a run's state.json: name the MAE model of these weights "
                              "with --model (and --img-size, --no-norm-pix where they differ from its defaults)")
    else:  # MAE's own settings, on ImageNet statistics, at the model's own size unless told
        check_model_name(args.model, masked_autoencoder=True, key="--model")
        refuse_untrained(checkpoint)
        build = {"mask_ratio": ModelConfig.mask_ratio, "norm_pix_loss": args.norm_pix is not False,
                 **({"img_size": args.img_size} if args.img_size else {})}
        state, mean, std = {"model": args.model}, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    ratio = args.mask_ratio if args.mask_ratio is not None else build["mask_ratio"]
    model = create_model(state["model"], **{**build, "mask_ratio": ratio})
    report = load_weights(model, raw)
    if args.model is not None and args.img_size is None:  # a run's checkpoint is built at its own size
        refuse_resampled(report, "the weights", f"{args.model} at {model.grid * model.unit} px", "--img-size",
                         resampling_allowed=False)
    elif args.model is None and report.resampled:  # what a corrupt state.json, not the user, asked for
        raise CheckpointError(f"the state.json of {checkpoint} records img_size={model.grid * model.unit}, another "
                              f"size than its weights' position table ({'; '.join(report.resampled)}): it is "
                              "corrupt; restore it")
    out = default_output(checkpoint, args.split)
    if args.out is not None:
        out = args.out if is_grid_file(args.out) else args.out / out.name
    shards = resolve_shards(args.shards, args.split, allow_pipe=args.allow_pipe, info=args.info,
                            split_key="--split")  # warns about a truncated shard
    images = first_images(shards, args.count, model.grid * model.unit)
    out.parent.mkdir(parents=True, exist_ok=True)  # once there is something to draw: a failure leaves no folder
    if len(images) < args.count:
        print(f"note: the {args.split} split has only {len(images)} readable images to show of the {args.count} asked")
    label = f"step {state['step']}" if "step" in state else checkpoint.name
    loss = write_reconstructions(model, images, mean, std, out, label, args.seed)
    rounded = rounded_mask_ratio(model.grid**2, ratio) if ratio > 0 else None
    print(f"wrote {out} (masked-patch loss {shown_loss(model, loss)} at mask ratio {ratio}"
          f"{f': {rounded}' if rounded else ''})")
    return {"out": out, "loss": loss}


def refuse_untrained(weights: Path) -> None:
    """Refuse a file tools/convert_checkpoint.py wrote with keys its source lacked: a decoder (or encoder part) that
    never trained reconstructs noise, which would look like a failed pretraining."""
    if untrained := untrained_keys(weights):
        raise CheckpointError(f"{weights} holds {counted(len(untrained), 'key')} that never trained "
                              f"({by_module(untrained)}): tools/convert_checkpoint.py initialised them fresh, as its "
                              "source lacked them, so the reconstruction would show noise; draw the grid from weights "
                              "with a trained decoder (an official MAE *_full.pth converts with its own)")


def _check_pretraining_state(checkpoint: Path, state: dict, given_model: str | None) -> None:
    """Refuse a described checkpoint that holds no MAE (an export, a classifier), or one named with --model too."""
    pretraining = "pass the pretraining run's directory (or one of its checkpoints/step_* directories)"
    if "timm_name" in state:  # described by an export's config.json
        raise CheckpointError(f"{checkpoint} is an export, which keeps no decoder to reconstruct with; {pretraining}")
    model = state.get("model", "")
    if not model.startswith("mae_") or "config" not in state:
        init = state.get("config", {}).get("init")
        started = f": it started from {init}" if init else ""
        raise CheckpointError(f"{checkpoint} holds the classifier {model or '(unnamed)'}, which has no decoder to "
                              f"reconstruct with; {pretraining}{started}")
    if given_model is not None:
        raise CheckpointError(f"{checkpoint} is a run's checkpoint, whose state.json names its model ({model}) and "
                              "data settings; drop --model")


def default_output(checkpoint: Path, split: str) -> Path:
    """RUN/recon/step_N_SPLIT.png beside the grids the run wrote itself (the checkpoint's folder for a lone one, the
    weights file's for weights; a checkpoint's own model.safetensors stands for the checkpoint)."""
    if checkpoint.name == "model.safetensors" and (checkpoint.parent / STATE_FILE).is_file():
        checkpoint = checkpoint.parent
    if checkpoint.is_file():
        return checkpoint.with_name(f"{checkpoint.stem}_{split}.png")
    run = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint
    return run / "recon" / f"{checkpoint.name}_{split}.png"


if __name__ == "__main__":
    sys.exit(main())
