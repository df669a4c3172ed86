"""Export a checkpoint's encoder or classifier as `OUT/model.safetensors` + `OUT/config.json`.

    python tools/export.py runs/mae_vit_b/checkpoints/step_00100000 exports/vit_b_mae   # pretraining: the encoder
    python tools/export.py runs/finetune_vit_b/best exports/vit_b_ft                      # fine-tune: the classifier
    python tools/export.py mae_pretrain_vit_base.pth exports/vit_b --model vit_base_patch16_224  # no state.json

From a pretraining checkpoint the MAE's `encoder.` part is kept; from a fine-tune or linear-probe checkpoint the
classifier (a probe's BatchNorm1d(affine=False) is folded into its Linear, so the head is a plain `head.*`). A
DeepSpeed checkpoint (`engine/` instead of `model.safetensors`) is gathered with DeepSpeed's `zero_to_fp32`. The export
is checked by loading it into our model with no missing or unexpected key. ViT and TNT keys are timm's, so

    timm.create_model(cfg["timm_name"], pretrained=True,
                      pretrained_cfg_overlay=dict(file="OUT/model.safetensors", custom_load=False,
                                                  num_classes=cfg["num_classes"]),
                      **cfg["timm_kwargs"])

loads it (the `num_classes` overlay keeps a fine-tuned head; without it timm drops the head as "adapted"). The tool
prints this call for the export at hand, and config.json keeps it as `timm_call`. config.json also holds what timm
reads from a Hub or local model folder (`architecture`, `model_args`, `pretrained_cfg` and, for a classifier,
`label_names` from the fine-tuning checkpoint), so `timm.create_model("local-dir:OUT", pretrained=True)` loads it too.

References: timm `_builder.load_pretrained` (`pretrained_cfg_overlay`), DeepSpeed `utils/zero_to_fp32.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import timm
import torch
from torch import nn

from .atomic import file_in_the_way, sync_tree
from .cli import quiet_on_ctrl_c, report_user_errors
from .convert_checkpoint import pooling_note
from .data.transforms import EVAL_CROP_FRACTION
from .models import create_model, load_weights
from .models.loading import (
    EXPORT_CONFIG,
    STATE_FILE,
    WEIGHTS_DIGEST,
    CheckpointError,
    fold_probe_head,
    refuse_oversized_build,
    refuse_resampled,
    resolve_checkpoint,
    save_weights,
    shown_build_kwargs,
    unchecked_export_record,
    weights_digest,
)
from .models.registry import classifier_name_for
from .models.tnt import TNT
from .models.vit import ViT
from .text import HelpWithDefaults
from .train.checkpoint import RETRY_AFTER_FAILED_WRITE, fresh_directory, write_failures_explained
from .train.init import encoder_weights, read_source

INTERPOLATION = "bicubic"  # of `eval_resize`, as its crop fraction
DESCRIPTION_KEYS = ("model", "kind", "num_classes", "label_names", "img_size", "global_pool", "mean", "std", "step")


def timm_spec(model: nn.Module, name: str) -> tuple[str | None, dict]:
    """timm entrypoint and kwargs that rebuild `model` with identical keys (None for families timm lacks)."""
    if isinstance(model, ViT):
        kwargs = dict(patch_size=model.patch_embed.patch_size[0], embed_dim=model.embed_dim,
                      num_heads=model.blocks[0].attn.num_heads)
        base = "vit_base_patch16_224"
    elif isinstance(model, TNT):
        kwargs = dict(patch_size=model.unit, embed_dim=model.embed_dim, inner_dim=model.word_dim,
                      num_heads_inner=model.blocks[0].attn_in.num_heads,
                      num_heads_outer=model.blocks[0].attn_out.num_heads)
        base = "tnt_s_patch16_224"
    else:
        return None, {}
    # The architecture is spelled out even for timm's own names, so test-size models rebuild too.
    kwargs.update(img_size=model.grid * model.unit, depth=len(model.blocks),
                  mlp_ratio=model.blocks[0].mlp.fc1.out_features / model.embed_dim, num_classes=model.num_classes,
                  global_pool=model.global_pool)
    return (name if timm.is_model(name) else base), kwargs


def describe(meta: dict, model_name: str | None, state_dict: dict[str, torch.Tensor]) -> dict:
    """Model name, kind, classes, size, pooling and normalisation of a checkpoint from its state.json (or an
    export's config.json); bare weights show only their head size and ViT pooling.

    `kind` is `encoder` (a pretraining checkpoint or bare weights without a head), `classifier` (bare weights with
    one), `finetune` or `linprobe`.
    """
    saved = meta.get("model")
    if model_name is None and saved is None:
        raise CheckpointError("the checkpoint has no state.json naming its model; pass --model NAME")
    if "timm_name" in meta:  # our own export, described by its config.json
        return {**{key: meta.get(key) for key in DESCRIPTION_KEYS}, "model": model_name or saved}
    config = meta.get("config", {})
    pretraining = "mode" not in meta and saved is not None and saved.startswith("mae_")
    name = model_name or (classifier_name_for(saved) if pretraining else saved)
    model_cfg, data_cfg = config.get("model", {}), config.get("data", {})
    shown = {} if pretraining else shown_build_kwargs(state_dict)
    num_classes = meta.get("num_classes", shown.get("num_classes", 0))
    return {"model": name, "kind": meta.get("mode") or ("classifier" if num_classes else "encoder"),
            "num_classes": num_classes, "label_names": meta.get("label_names") if num_classes else None,
            "img_size": model_cfg.get("img_size"),
            "global_pool": model_cfg.get("global_pool", shown.get("global_pool")),
            "mean": data_cfg.get("mean"), "std": data_cfg.get("std"), "step": meta.get("step")}


def build_kwargs(info: dict) -> dict:
    """`create_model`'s arguments for `info`: its head size, and its image size and pooling where known."""
    known = {key: info[key] for key in ("img_size", "global_pool") if info[key] is not None}
    return {"num_classes": info["num_classes"], **known}


def build_checked(info: dict, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """Our model for `info`, loaded from `state_dict` with no key left over on either side, and no position table
    resampled: an export keeps the weights as they were trained."""
    model = create_model(info["model"], **build_kwargs(info))
    refuse_resampled(load_weights(model, state_dict), "the weights", f"{info['model']} at {model.grid * model.unit} px",
                     "--img-size", resampling_allowed=False)
    return model


def export(checkpoint: str | Path, out: str | Path, model_name: str | None = None, img_size: int | None = None,
           global_pool: str | None = None) -> dict:
    """Write OUT/model.safetensors and OUT/config.json; returns the config. For bare weights, which carry no
    description, `img_size` gives the size they were trained at when it is not the model's default, and `global_pool`
    the pooling where the weights do not show it (a checkpoint's state.json records both)."""
    given, checkpoint, out = Path(checkpoint), resolve_checkpoint(checkpoint), Path(out)
    check_export_directory(out, given, checkpoint)
    raw, meta = read_source(checkpoint)
    state_dict, dropped, layout = encoder_weights(raw)
    state_dict = fold_probe_head(state_dict)
    info = describe(meta, model_name, state_dict)
    if global_pool and meta and info["global_pool"] not in (None, global_pool):  # TNT's keys would not tell
        raise CheckpointError(f"--global-pool {global_pool} contradicts the pooling {info['global_pool']} that "
                              f"{checkpoint}'s description records; leave --global-pool out")
    info["img_size"] = img_size or info["img_size"]
    info["global_pool"] = global_pool or info["global_pool"]
    if meta:  # the description sizes the model, which must not outgrow the weights it is for
        refuse_oversized_build(info["model"], build_kwargs(info), state_dict, checkpoint,
                               "restore it, or copy the weights out of it and describe them with --model, "
                               "--img-size and --global-pool",
                               given=[key for key, value in (("img_size", img_size), ("global_pool", global_pool))
                                      if value])
    try:
        model = build_checked(info, state_dict)
    except CheckpointError as err:
        if global_pool is None:
            raise
        raise CheckpointError(f"--global-pool {global_pool} builds {info['model']} with other layers than "
                              f"{checkpoint} holds ({str(err).split(';')[0]}); leave --global-pool out to keep the "
                              f"pooling it was trained with, and choose the pooling when fine-tuning "
                              f"(model.global_pool={global_pool})") from None
    if pooling_note(model) and not meta and global_pool is None:
        raise CheckpointError("TNT's weights do not show the pooling its head was trained with: pass --global-pool "
                              "token (timm's and the official default) or --global-pool avg (MAE-style fine-tuning)")
    timm_name, timm_kwargs = timm_spec(model, info["model"])
    info.update(img_size=model.grid * model.unit, global_pool=getattr(model, "global_pool", info["global_pool"]))
    config = {**info, "timm_name": timm_name, "timm_kwargs": timm_kwargs,
              "timm_call": timm_call(timm_name, timm_kwargs, info, out / "model.safetensors"),
              "source": str(checkpoint), "source_layout": layout, "dropped_keys": len(dropped),
              "interpolation": INTERPOLATION, "crop_pct": EVAL_CROP_FRACTION}
    if timm_name is not None:  # what timm.create_model("local-dir:OUT", pretrained=True) reads
        config.update(architecture=timm_name, model_args=timm_kwargs, pretrained_cfg=timm_pretrained_cfg(info))
    write_export(out, model.state_dict(), config)
    return config


def write_export(out: Path, state_dict: dict[str, torch.Tensor], config: dict) -> None:
    """OUT/model.safetensors and OUT/config.json, both written before either replaces an earlier export's: a write
    that fails (a full disk) leaves no weights beside the description of others. A run stopped between the two
    replaces does, and the digest of the weights that config.json records (`WEIGHTS_DIGEST`), replaced first, makes
    readers refuse that pair."""
    tmp = out / ".tmp-export"
    with write_failures_explained(tmp, out, RETRY_AFTER_FAILED_WRITE):
        fresh_directory(tmp)
        save_weights(state_dict, tmp / "model.safetensors", metadata={"format": "pt"})
        digest = weights_digest(tmp / "model.safetensors")
        (tmp / EXPORT_CONFIG).write_text(json.dumps({**config, WEIGHTS_DIGEST: digest}, indent=1))
        sync_tree(tmp)
        for name in (EXPORT_CONFIG, "model.safetensors"):
            os.replace(tmp / name, out / name)
        tmp.rmdir()


def check_export_directory(out: Path, given: Path, checkpoint: Path) -> None:
    """Refuse an OUT that would overwrite the training run it exports (its checkpoint files share the export's names)
    or files of the export's names that are not an earlier export, or that a file keeps from being created."""
    if blocker := file_in_the_way(out):
        raise CheckpointError(f"the export goes into the directory {out}, but {blocker} is a file; choose another OUT")
    holds_training = (out / STATE_FILE).exists() or (out / "checkpoints").is_dir()
    written = {(out / name).resolve() for name in ("model.safetensors", EXPORT_CONFIG)}
    is_source = out.resolve() in {given.resolve(), checkpoint.resolve()} or checkpoint.resolve() in written
    if holds_training or is_source:
        raise CheckpointError(f"{out} holds a training run, a checkpoint or the weights to export, which the export "
                              "would overwrite; export into a new directory, e.g. exports/NAME")
    others = [name for name in ("model.safetensors", EXPORT_CONFIG) if (out / name).exists()]
    if others and unchecked_export_record(out) is None:  # an earlier export of ours, even a torn pair, is replaced
        raise CheckpointError(f"{out} holds {' and '.join(others)} that tools/export.py did not write, which the "
                              "export would overwrite; export into a new directory, e.g. exports/NAME")


def timm_call(timm_name: str | None, timm_kwargs: dict, info: dict, file: Path) -> str | None:
    """The Python expression that loads the export into timm, head included; None when timm lacks the architecture.

    The overlay carries the head size (timm drops a head whose size differs from its pretrained config's) and the
    preprocessing the weights were trained with, so `timm.data.resolve_data_config(model=...)` returns it.
    `custom_load=False` because timm before 1.0.31 keeps the default tag's flag with an overlaid file, and reads a
    safetensors file as a JAX .npz for the ViTs whose default weights are one (vit_tiny/small_patch16_224).
    """
    if timm_name is None:
        return None
    overlay = dict(file=str(file.resolve()), **timm_pretrained_cfg(info))
    return f"timm.create_model({timm_name!r}, pretrained=True, pretrained_cfg_overlay={overlay!r}, **{timm_kwargs!r})"


def timm_pretrained_cfg(info: dict) -> dict:
    """timm's description of the weights: head size and the preprocessing they were trained with (the mean and std
    where known)."""
    cfg = dict(custom_load=False, num_classes=info["num_classes"], input_size=(3, info["img_size"], info["img_size"]),
               interpolation=INTERPOLATION, crop_pct=EVAL_CROP_FRACTION)
    return cfg | {key: tuple(info[key]) for key in ("mean", "std") if info[key] is not None}


@quiet_on_ctrl_c("run the same command again to export")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpWithDefaults)
    parser.add_argument("checkpoint", help="checkpoint directory (pretraining, fine-tune, best/) or weights file")
    parser.add_argument("out", help="output directory")
    parser.add_argument("--model", default=None, help="registered classifier name (needed without state.json)")
    parser.add_argument("--img-size", type=int, default=None,
                        help="image size the weights were trained at (for weights without state.json, when it is "
                             "not the model's default)")
    parser.add_argument("--global-pool", choices=("token", "avg"), default=None,
                        help="pooling the weights were trained with (for weights without state.json; needed for a "
                             "TNT classifier, whose weights do not show it)")
    args = parser.parse_args(argv)
    replacing = (Path(args.out) / "model.safetensors").exists()
    config = report_user_errors(lambda: export(args.checkpoint, args.out, args.model, args.img_size,
                                               args.global_pool))
    if config is None:
        return 1
    head = f"{config['num_classes']} classes" if config["num_classes"] else "no head"
    print(f"exported {config['kind']} {config['model']} ({head}, {config['img_size']} px) "
          f"from {config['source']} to {args.out}{', replacing the export that was there' if replacing else ''}")
    source = Path(config["source"])
    best = source.parent.parent / "best"
    if source != Path(args.checkpoint) and best.is_dir():  # a run directory stood for its newest checkpoint
        print(f"note: that is the run's newest checkpoint; its best validated weights are in {best}")
    ours = f"mae_tnt.create_model({config['model']!r}, checkpoint_path={str(Path(args.out).resolve())!r})"
    if config["timm_call"]:
        print(f"load it in timm with: {config['timm_call']}\nor with: {ours}")
        if config["mean"] is None:
            print(f"note: the weights do not record the normalisation they were trained with, so timm's "
                  f"resolve_data_config gives {config['timm_name']}'s defaults; add mean=... and std=... to the "
                  "overlay if they differ")
    else:
        print(f"load it with: {ours} (not a timm architecture)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
