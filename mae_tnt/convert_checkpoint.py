"""Convert foreign checkpoints (official MAE, TNT, SReT, timm) into ours, with an exact key report.

    python tools/convert_checkpoint.py SRC OUT.safetensors --model NAME [--img-size PX]
        [--allow-missing 'decoder_*'] [--allow-unexpected 'encoder.head.*'] [--unsafe-pickle]

The layout is recognised by the target model's `adapt_state_dict` (its family's checkpoint filter): flat official
MAE keys, the huawei-noah TNT names, SReT's duplicated recursive blocks, or timm's keys. A classifier is built with
the head size of the source (none for an encoder's weights). The result loads with the `mae_tnt.create_model` call
the tool prints. Keys the source lacks keep the model's fresh initialisation (from a fixed seed, so the same file is
written every time), are listed, and are named in OUT's metadata (tools/visualize.py refuses a decoder that never
trained); keys the model does not take are left out. Either must be allowed explicitly.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from .atomic import atomic_file, file_in_the_way, temporary_name
from .cli import quiet_on_ctrl_c
from .models import create_model, load_weights, read_state_dict
from .models.loading import (
    CheckpointError,
    conversion_metadata,
    fitting_build_kwargs,
    fold_probe_head,
    head_outputs,
    recorded_pooling,
    refuse_resampled,
    save_weights,
    unwrap_state_dict,
)
from .models.registry import ModelError
from .models.tnt import TNT
from .text import HelpWithDefaults, counted
from .train.checkpoint import RETRY_AFTER_FAILED_WRITE, CheckpointWriteError, write_failures_explained


def read_foreign_checkpoint(path: Path, unsafe_pickle: bool) -> dict[str, torch.Tensor]:
    """Tensors of SRC; a full unpickle only when the user opts in for a file they trust."""
    if not unsafe_pickle or not path.is_file():  # for a directory or a missing path, it says which file to give
        return read_state_dict(path, pickle_advice="add --unsafe-pickle")
    print(f"warning: unpickling {path} without restrictions (--unsafe-pickle); only do this for files you trust")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means an unusable file
        raise CheckpointError(f"cannot unpickle {path} ({type(err).__name__}: {err}); the classes it stores must "
                              "be importable here") from err
    return unwrap_state_dict(obj, path)


def convert(src: Path, out: Path, model_name: str, allow_missing: Sequence[str] = (),
            allow_unexpected: Sequence[str] = (), unsafe_pickle: bool = False, img_size: int | None = None):
    """Write SRC's weights as `model_name`'s (at `img_size`, else the model's default); a classifier gets the head
    size (0: none, for an encoder) and pooling of SRC (its keys' or, for TNT, our export's or checkpoint's record).
    Returns the load report, the build arguments of the model written, and a note on what they may miss.

    Raises:
        CheckpointError: SRC's position table is for another image size and `img_size` was not given to say which
            size to write (resampling loses information, so it is never done unasked).
    """
    sized = {"img_size": img_size} if img_size is not None else {}
    model = _seeded_model(model_name, **sized)  # an unknown name fails before a long read
    state_dict = fold_probe_head(read_foreign_checkpoint(src, unsafe_pickle))  # a probe's head counts the classes
    recorded = _recorded_head_pooling(src, model, state_dict)
    fitting = {**recorded, **fitting_build_kwargs(model, state_dict)}  # head size and pooling, never the image size
    if any(getattr(model, key) != value for key, value in fitting.items()):  # a classifier of another head or pooling
        model = _seeded_model(model_name, **sized, **fitting)
    build_kwargs = {**sized, **fitting}
    report = load_weights(model, state_dict, allow_missing=tuple(allow_missing),
                          allow_unexpected=tuple(allow_unexpected),
                          remedy="pass the groups of keys the source was saved without to --allow-missing (e.g. "
                                 "--allow-missing 'decoder_*' 'mask_token'), and of keys to leave out to "
                                 "--allow-unexpected (e.g. a classifier's head: --allow-unexpected 'encoder.head.*')")
    if img_size is None:
        refuse_resampled(report, str(src), f"{model_name}'s default", "--img-size")
    # a failed write leaves an earlier OUT as it was
    with write_failures_explained(temporary_name(out), out, RETRY_AFTER_FAILED_WRITE), atomic_file(out) as tmp:
        save_weights(model.state_dict(), tmp, metadata=conversion_metadata(model_name, report.missing))
    if hasattr(model, "num_classes"):  # a classifier: its head size is always named in the call that loads it
        build_kwargs = {"num_classes": model.num_classes, **build_kwargs}
    return report, build_kwargs, None if recorded else pooling_note(model)


def _recorded_head_pooling(src: Path, model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> dict:
    """The pooling that SRC's head was trained with, as our export or training checkpoint records it (TNT's weights do
    not show it), for a classifier `model`; {} for foreign weights, an encoder's or an MAE."""
    pooling = recorded_pooling(src) if head_outputs(state_dict) and hasattr(model, "global_pool") else None
    return {"global_pool": pooling} if pooling else {}


def _seeded_model(model_name: str, **kwargs) -> torch.nn.Module:
    """The model, initialised from a fixed seed: the keys SRC lacks keep that initialisation, so a conversion writes
    the same file every time. The caller's random state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return create_model(model_name, **kwargs)


def pooling_note(model: torch.nn.Module) -> str | None:
    """What the printed call cannot know: a TNT classifier keeps `norm` under either pooling, so its weights do not
    show which one it was trained with."""
    if isinstance(model, TNT) and model.num_classes:
        return ("TNT's weights do not show its pooling: the call uses the class token (timm's and the official "
                "default); add global_pool='avg' if SRC was trained with average pooling")
    return None


@quiet_on_ctrl_c("run the same command again to convert")
def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if (error := _out_error(args.src, args.out)) is not None:
        print(f"error: {error}", file=sys.stderr)
        return 1
    replacing = args.out.exists()
    try:
        report, build_kwargs, note = convert(args.src, args.out, args.model, args.allow_missing,
                                             args.allow_unexpected, args.unsafe_pickle, args.img_size)
    except (CheckpointError, CheckpointWriteError, ModelError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}{' (replacing the file that was there)' if replacing else ''} for {args.model}: "
          f"{report.summary()}")
    if report.missing:
        print(f"note: the {counted(len(report.missing), 'key')} SRC lacks hold a fresh initialisation, the same in "
              "every conversion: they were never trained, as OUT's metadata records (tools/visualize.py refuses to "
              "draw a reconstruction through an untrained decoder, which shows noise)")
    if report.resampled:
        print(f"resampled the position table to {args.img_size} px (bicubic): {'; '.join(report.resampled)}")
    arguments = "".join(f", {key}={value!r}" for key, value in build_kwargs.items())
    print(f"load it with: mae_tnt.create_model({args.model!r}, checkpoint_path={str(args.out)!r}{arguments})")
    if note:
        print(f"note: {note}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpWithDefaults)
    parser.add_argument("src", type=Path, help="foreign checkpoint (.pth, .pth.tar, .bin or .safetensors)")
    parser.add_argument("out", type=Path, help="output .safetensors file")
    parser.add_argument("--model", required=True, help="registered model name, e.g. mae_vit_base_patch16")
    parser.add_argument("--allow-missing", nargs="*", default=[], metavar="PATTERN",
                        help="fnmatch patterns of keys the source may lack (e.g. 'decoder_*' 'mask_token')")
    parser.add_argument("--allow-unexpected", nargs="*", default=[], metavar="PATTERN",
                        help="fnmatch patterns of SRC's keys to leave out, named as the model names them (e.g. "
                             "'encoder.head.*': a classifier's head when converting it to an MAE)")
    parser.add_argument("--img-size", type=int, default=None,
                        help="image size in pixels to build the model at: the size SRC was trained at (needed when it "
                             "is not the model's default), or another one to resample SRC's position table to")
    parser.add_argument("--unsafe-pickle", action="store_true",
                        help="allow a full unpickle for legacy files that weights_only loading refuses")
    return parser


def _out_error(src: Path, out: Path) -> str | None:
    """Why OUT cannot be written, if it cannot."""
    if out.suffix != ".safetensors":  # readers tell safetensors from pickles by the name
        return f"{out} must end in .safetensors, the format written; e.g. {out.with_suffix('.safetensors')}"
    blocker = file_in_the_way(out.parent)
    if blocker is not None or out.is_dir():
        where = f"{out} is a directory" if blocker is None else f"{blocker} is a file, not a directory"
        return f"{where}; choose another OUT"
    if out.exists() and out.resolve() == src.resolve():
        return f"OUT {out} is SRC, which the conversion would replace; write it to another file"
    return None


if __name__ == "__main__":
    sys.exit(main())
