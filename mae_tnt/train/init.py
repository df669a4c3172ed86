"""Initialising a classifier from the `init=` source of a downstream run, with an exact key report.

Accepted sources, told apart by their keys rather than by their file names:
- our pretraining checkpoint directory (`runs/x/checkpoints/step_*`): `model.safetensors` of the MAE model, keys
  `encoder.*` plus the decoder, or a DeepSpeed `engine/` folder gathered with DeepSpeed's `zero_to_fp32`;
- our export (`tools/export.py`) or fine-tune checkpoint: encoder or classifier keys as the model has them;
- an official MAE file, `{'model': encoder}` as released or flat with `decoder_*` / `mask_token` (`*_full.pth`);
- official TNT and SReT files, converted by the model's own `adapt_state_dict` (which also resamples position
  embeddings to the model's grid).

The MAE decoder and any head that does not fit are dropped and listed; then `load_weights` asserts that only the head
(and `fc_norm` under global pooling) is missing and only the unused final `norm` is unexpected.

References: facebookresearch/mae `main_finetune.py` (drop a mismatched head, interpolate the position embedding,
assert the missing keys, head init trunc_normal(2e-5)) and `main_linprobe.py` (BatchNorm1d(affine=False) + Linear
with std 0.01); DeepSpeed `utils/zero_to_fp32.py`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

from ..config import ConfigError
from ..models.layers import trunc_normal_
from ..models.loading import (
    EXPORT_CONFIG,
    FROZEN_MASTERS_FILE,
    POOLINGS,
    PROBE_BN_EPS,
    STATE_FILE,
    CheckpointError,
    LoadReport,
    check_export_pair,
    corrupt_description,
    fitting_build_kwargs,
    load_weights,
    read_json_object,
    read_state_dict,
    resolve_checkpoint,
)
from ..models.mae import split_mae_state_dict
from ..models.registry import ModelError, classifier_name_for
from ..models.sret import SReT, reestimate_batchnorm
from .checkpoint import ResumeError, check_engine_pickles, engine_tag
from .resume import FRESH

HEAD_KEYS = ("head.*", "fc_norm.*")


def read_source(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Weights and description of a checkpoint, export or weights file (resolve a run directory to its newest
    checkpoint first, with `resolve_checkpoint`, to know which one was read).

    Returns:
        The state dict as saved, and the `state.json` / `config.json` of its checkpoint or export ({} when there is
        none): of the directory given, or of the one whose `model.safetensors` is given.
    """
    path = Path(path)
    home = path if path.is_dir() else path.parent if path.name == "model.safetensors" else None
    described = [home / name for name in (STATE_FILE, EXPORT_CONFIG) if home is not None and (home / name).exists()]
    meta = read_json_object(described[0]) if described else {}
    if meta is None and path.is_dir():
        raise corrupt_description(described[0], path)
    meta = meta or {}  # a weights file given alone, beside a corrupt description, is read as bare weights
    if "timm_name" in meta:  # an export's config.json, which must describe these weights
        check_export_pair(meta, path)
    if path.is_dir() and not (path / "model.safetensors").exists() and (path / "engine").is_dir():
        return gather_zero_checkpoint(path / "engine"), meta
    return read_state_dict(path), meta


def gather_zero_checkpoint(engine_dir: Path) -> dict[str, torch.Tensor]:
    """Full fp32 weights of a DeepSpeed (ZeRO 1-3) checkpoint written by `accelerator.save_state`."""
    check_engine_pickles(engine_dir)  # DeepSpeed unpickles without restriction
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except ImportError as err:
        raise CheckpointError(
            f"{engine_dir} is a DeepSpeed checkpoint; install DeepSpeed (pip install 'mae_tnt[deepspeed]') to gather "
            "its sharded weights, or run the zero_to_fp32.py script DeepSpeed saved next to it"
        ) from err
    frozen = engine_dir.parent / FROZEN_MASTERS_FILE  # a half-precision run's untrained parameters, in fp32
    return {**unoptimized_weights(engine_dir), **get_fp32_state_dict_from_zero_checkpoint(str(engine_dir)),
            **(read_state_dict(frozen) if frozen.exists() else {})}


def unoptimized_weights(engine_dir: Path) -> dict[str, torch.Tensor]:
    """The module copy a ZeRO-1/2 checkpoint keeps (in the training dtype), as fp32: it holds the parameters the
    optimizer does not, such as MAE's fixed sin-cos tables, which DeepSpeed's gathering leaves out at ZeRO-1. ZeRO-3
    keeps no module copy and its gathering includes them."""
    states = engine_dir / engine_tag(engine_dir) / "mp_rank_00_model_states.pt"
    module = torch.load(states, map_location="cpu", weights_only=True)["module"] if states.exists() else None
    return {key: value.float() if value.is_floating_point() else value for key, value in (module or {}).items()}


MAE_LAYOUTS = ("MAE checkpoint (encoder.* kept)", "flat MAE checkpoint with decoder")
"""`encoder_weights`' names of the layouts that hold a pretrained MAE: ours, and the official one."""


def encoder_weights(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str], str]:
    """The encoder (or classifier) part of any accepted layout, the keys left out, and the layout's name."""
    kept, wrapper = split_mae_state_dict(state_dict)
    if any(key.startswith("encoder.") for key in state_dict):
        return kept, sorted(wrapper), MAE_LAYOUTS[0]
    return kept, sorted(wrapper), MAE_LAYOUTS[1] if wrapper else "encoder/classifier weights"


def drop_unfit_head(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list]:
    """Remove checkpoint head keys the model cannot take (other class count, probe head, no head)."""
    own = model.state_dict()
    unfit = sorted(
        k for k, v in state_dict.items()
        if k.startswith(("head.", "fc_norm.")) and (k not in own or own[k].shape != v.shape)
    )
    return {k: v for k, v in state_dict.items() if k not in unfit}, unfit


def allowed_keys(model: nn.Module) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(may be missing, may be unexpected): the head, and the final norm that global pooling replaces by fc_norm."""
    unexpected = ("norm.*",) if isinstance(getattr(model, "norm", None), nn.Identity) else ()
    return HEAD_KEYS, unexpected


def recorded_init(init: str | None, resumed_state: dict | None = None) -> str | None:
    """`init` as a run's config.yaml records it, so that the record names the weights actually read: the checkpoint
    a run directory stood for when the run started. A resumed run (`resumed_state`: its checkpoint's state) keeps
    the one it started from, though the pretraining run may have saved newer ones since.

    Raises:
        CheckpointError: a fresh run's `init` does not exist (`init_source`).
        ResumeError: when the resumed run started from other weights than `init`, which it would silently ignore.
    """
    if resumed_state is None:
        return str(init_source(init)) if init else None
    recorded = resumed_state.get("config", {}).get("init", init)
    if not _stands_for(init, recorded):
        wanted = _weights_named(init)
        raise ResumeError(f"run.output_dir holds a run started from {_weights_named(recorded)}, which resuming would "
                          f"continue rather than start from {wanted}: to start from {wanted}, {FRESH}; to continue "
                          f"the run, pass init={recorded or 'null'}")
    return recorded


def _weights_named(init: str | None) -> str:
    return f"init={init}" if init else "random initialisation (init=null)"


def _stands_for(init: str | None, recorded: str | None) -> bool:
    """Whether `init` names the recorded weights: the same path, or the run directory (or its checkpoints folder)
    they are a checkpoint of."""
    if init is None or recorded is None:
        return init == recorded
    given, recorded_path = Path(init).resolve(), Path(recorded).resolve()
    folder = given if given.name == "checkpoints" else given / "checkpoints"
    return recorded_path == given or recorded_path.parent == folder


def init_source(init: str | Path) -> Path:
    """The weights `init` names: itself, or a run directory's newest checkpoint (`resolve_checkpoint`).

    Raises:
        CheckpointError: `init` does not exist, or names a run without checkpoints.
    """
    if not Path(init).exists():
        raise CheckpointError(f"init={init} does not exist: give a pretraining checkpoint, run directory, export "
                              "or weights file, or init=null for a randomly initialised encoder")
    return resolve_checkpoint(init)


def load_init(model: nn.Module, source: str | Path, log: Callable[[str], None] = print,
              normalization: tuple[list[float], list[float]] | None = None) -> LoadReport:
    """Load `source` into `model` (a classifier or bare encoder) and print the exact key report; warn when the
    source records another `normalization` (mean, std) of its images than the one given.

    Raises:
        CheckpointError: for a missing or unexpected key beyond the head / fc_norm / final-norm allowance; the
            message names the keys.
    """
    source = init_source(source)  # a run directory: say which of its checkpoints
    raw, meta = read_source(source)
    state_dict, dropped, layout = encoder_weights(raw)
    pooling = fitting_build_kwargs(model, state_dict).get("global_pool")  # before the unfit fc_norm is dropped
    # Heads are `head.*` in every accepted layout, so this runs before the model's own key filter (in load_weights).
    state_dict, unfit_head = drop_unfit_head(model, state_dict)
    allow_missing, allow_unexpected = allowed_keys(model)
    report = load_weights(model, state_dict, allow_missing=allow_missing, allow_unexpected=allow_unexpected,
                          **_misfit_remedy(meta, pooling))
    report.dropped = dropped + unfit_head
    report.layout = meta.get("source_layout", layout)  # an export's: the layout it was exported from
    loaded = len(model.state_dict()) - len(report.missing)  # not the file's count: official files repeat or add some
    shown = f" ({', '.join(report.dropped[:4])}{', ...' if len(report.dropped) > 4 else ''})" if report.dropped else ""
    log(f"init from {source} [{layout}]: {loaded} tensors loaded; missing {report.missing}; "
        f"unexpected {report.unexpected}; dropped {len(report.dropped)}{shown}")
    if report.resampled:
        log(f"init: resampled the position table to this image size (bicubic): {'; '.join(report.resampled)}")
    recorded = recorded_normalization(meta)
    if normalization is not None and recorded is not None and not _same_normalization(recorded, normalization):
        log(f"warning: {source.name} was trained on images normalised with mean {recorded[0]} and std {recorded[1]}, "
            f"this run uses data.mean {normalization[0]} and data.std {normalization[1]}: set them to the "
            "checkpoint's unless the change is deliberate")
    return report


def _misfit_remedy(meta: dict, pooling: str | None) -> dict[str, str]:
    """load_weights' closing advice for a misfit: the pooling the checkpoint was trained with, where the model's
    differs (one final norm in place of the other, the likely cause), then the model that wrote it, if recorded."""
    writer = (f"set model.name={_classifier_of(meta['model'])} (the checkpoint was written by `{meta['model']}`; "
              "model.name and its arguments must build the same encoder)") if "model" in meta else None
    if pooling is None:
        return {"remedy": writer} if writer else {}
    advice = f"set model.global_pool={pooling}: the checkpoint {POOLINGS[pooling][1]}"
    return {"remedy": f"{advice}{f'; if keys still misfit, also {writer}' if writer else ''}"}


def _classifier_of(name: str) -> str:
    """The classifier whose encoder model `name` holds (itself for a classifier), or `name` when that is unclear."""
    try:
        return classifier_name_for(name)
    except ModelError:
        return name


def recorded_normalization(meta: dict) -> tuple[list[float], list[float]] | None:
    """The (mean, std) a checkpoint's (`state.json`: its config's data section) or an export's (`config.json`)
    images were normalised with; None when it does not say."""
    data = meta.get("config", {}).get("data", meta)
    mean, std = data.get("mean"), data.get("std")
    return (list(mean), list(std)) if mean is not None and std is not None else None


def _same_normalization(a: tuple[list[float], list[float]], b: tuple[list[float], list[float]]) -> bool:
    return all(torch.allclose(torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64))
               for x, y in zip(a, b, strict=True))


def init_head(head: nn.Module, std: float) -> None:
    """Truncated-normal weights and zero bias for a linear head (MAE: std 2e-5 fine-tune, 0.01 probe)."""
    if isinstance(head, nn.Linear):
        trunc_normal_(head.weight, std=std)
        nn.init.zeros_(head.bias)


def attach_probe_head(model: nn.Module, std: float = 0.01) -> nn.Sequential:
    """Replace the linear head by BatchNorm1d(affine=False) + Linear and freeze everything else.

    The parameter-free BatchNorm whitens features whose scale differs a lot between encoders, so one LARS learning
    rate fits them all (MAE linear probe). Returns the new head.
    """
    linear = model.head
    if not isinstance(linear, nn.Linear):
        raise ValueError(f"the linear probe needs a classifier with a Linear head; got {type(linear).__name__}")
    init_head(linear, std)
    model.head = nn.Sequential(nn.BatchNorm1d(linear.in_features, affine=False, eps=PROBE_BN_EPS), linear)
    model.requires_grad_(False)
    model.head.requires_grad_(True)
    return model.head


def stale_stem_norm_note(model: nn.Module, report: LoadReport, reestimate_batches: int) -> str | None:
    """A note for SReT loaded from an MAE checkpoint (or an export of its encoder) without re-estimation: its stem
    BatchNorm statistics fit the 32-px crops pretraining showed it, not whole images (`reestimate_stem_norms`)."""
    if not isinstance(model, SReT) or report.layout not in MAE_LAYOUTS or reestimate_batches:
        return None
    return ("note: the stem BatchNorm statistics come from MAE pretraining, which showed the stem 32-px crops; "
            "model.bn_reestimate_batches=100 refits them on whole train images first")


def reestimate_stem_norms(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Recompute SReT's stem BatchNorm statistics on whole images ([B, 3, H, W], normalised); returns their count.

    MAE pretraining shows the SReT stem 32-px crops zero-padded at their borders, so its running statistics do not
    fit whole images (see `mae_tnt.models.sret.reestimate_batchnorm`).
    """
    if not isinstance(model, SReT):
        raise ConfigError(f"model.bn_reestimate_batches applies to SReT only, not {type(model).__name__}; set it to 0")
    return reestimate_batchnorm(model, batches)
