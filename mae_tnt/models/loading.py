"""Safe checkpoint reading and loading with an exact key check.

Files are read with safetensors or `torch.load(weights_only=True)`, never as arbitrary pickles. Every load runs the
model's `adapt_state_dict` (its family's checkpoint filter), then `load_state_dict(strict=False)`, then compares the
missing and unexpected keys with what the caller allows and raises when they differ. The model that a checkpoint's
description (state.json, an export's config.json) builds is checked against its weights first, so that a corrupt or
forged one cannot take many GB before the weights' shapes are compared (`refuse_oversized_build`).

References: facebookresearch/mae `main_finetune.py` (asserting the exact missing set); timm `checkpoint_filter_fn`.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import pickle
import re
import struct
import threading
import typing
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.modules.module import (
    register_module_buffer_registration_hook,
    register_module_parameter_registration_hook,
)

from .mae import WRAPPER_KEY_PREFIXES, MaskedAutoencoder, split_mae_state_dict
from .pos_embed import recorded_resamples
from .registry import create_model

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.pth")
WRAPPER_KEYS = ("model", "state_dict", "module", "model_ema")
EXPORT_CONFIG = "config.json"  # written beside an export's model.safetensors by tools/export.py
STATE_FILE = "state.json"  # written beside a training checkpoint's model.safetensors
FROZEN_MASTERS_FILE = "frozen_fp32.safetensors"
"""Beside a DeepSpeed half-precision checkpoint's `engine/`: the fp32 values of the parameters that do not train (a
linear probe's encoder), which the engine keeps only as the module's 16-bit copies."""
WEIGHTS_DIGEST = "weights_digest"
"""The key of an export's config.json that holds the `weights_digest` of the model.safetensors it describes.
tools/export.py replaces config.json first, then the weights (OUT may hold other files, so the folder is not swapped
whole): a run stopped between the two leaves a new description (image size, classes, pooling, normalisation) beside
the earlier weights, which readers of an export refuse on seeing another digest. A digest of the weights rather than
an id written into both files keeps the weights file what the same export always writes, byte for byte."""
DIGEST_SPAN = 4096
"""Bytes that `weights_digest` reads at each end of every tensor."""
CONVERSION_METADATA = "mae_tnt_conversion"
"""The one safetensors metadata entry of a tools/convert_checkpoint.py file: JSON of the `model` converted to and its
`untrained_keys`, those SRC lacked, which hold a fresh initialisation (`untrained_keys(path)`). The file loads as
any other, where a fresh decoder or head does no harm (fine-tuning drops the decoder and may replace the head), and
tools/visualize.py refuses it, since an untrained decoder draws noise. One entry, as safetensors writes several in a
random order, and the same conversion must write the same file."""
BUILD_KEYS = ("num_classes", "img_size", "global_pool")
"""The build arguments that exports and training checkpoints record, so that loading one needs none."""
PROBE_BN_EPS = 1e-6
"""eps of the linear probe's parameter-free BatchNorm (MAE's); loading folds a probe head with it."""
RECORDED_BUILD_LIMIT = 4
"""How many times the elements, and the tensors, of its weights the model that a checkpoint's description builds may
hold (the parameters and buffers it builds are counted, whether the file holds them or not). An honest description
builds at most the model that wrote the weights (or the encoder part of an MAE's), plus what a caller adds: a fresh
head and fc_norm (with 1000 classes, twice the elements of the 32-wide test encoders) and position tables resampled to
a larger image. 4 leaves room for both, while a corrupt or forged description (img_size 65536, a decoder 10^5 wide)
takes at most a few times the memory that reading the weights took; the tensor count stops one of 10^5 small blocks,
whose module objects alone would fill the memory."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read, or whose keys do not fit the model."""


@dataclass
class LoadReport:
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    """Keys deliberately left out, e.g. the decoder when an MAE checkpoint initialises a classifier."""
    resampled: list[str] = field(default_factory=list)
    """`key [old shape] -> [new shape]` of the tables the model's `adapt_state_dict` resampled to its grid."""
    layout: str = ""
    """The checkpoint layout the weights came in, where the caller knows it (`train.init.load_init`)."""

    def summary(self) -> str:
        return (f"missing [{by_module(self.missing)}], unexpected [{by_module(self.unexpected)}], "
                f"dropped {len(self.dropped)} keys")


def save_weights(state_dict: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None):
    """Write tensors as safetensors, readable as the user's umask allows.

    safetensors creates its files with mode 0600; checkpoints and exports are shared on clusters, so they get the
    mode any other file written by this process would have.
    """
    save_file({key: value.detach().contiguous() for key, value in state_dict.items()}, str(path), metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def step_dirs(folder: Path) -> list[Path]:
    """The `step_*` checkpoint directories in `folder`, oldest first (their step numbers are zero-padded to sort by
    name)."""
    return sorted(path for path in folder.glob("step_*") if path.is_dir())


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory, or its `checkpoints/` folder, stands for its newest checkpoint directory; any other path for
    itself."""
    path = Path(path)
    folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    if folder.name != "checkpoints" or not folder.is_dir():
        return path
    steps = step_dirs(folder)
    if not steps:
        raise CheckpointError(f"run directory {folder.parent} has no checkpoints yet")
    return steps[-1]


def recorded_build_kwargs(path: str | Path, name: str) -> dict:
    """How model `name` is built for the export or training checkpoint at `path`, as its `config.json` or
    `state.json` records: the image size the weights were trained at (whichever model wrote them, e.g. the MAE
    whose encoder `name` is), and, when `name` wrote them, the head size and pooling, or every `model.*` setting
    of a pretraining run (decoder size, word masking, ...); {} for bare weights. The encoder of a pretraining
    checkpoint has no head, so `name` gets none (TNT and SReT would otherwise build 1000 classes)."""
    recorded = description_record(path)
    if recorded is None:
        return {}
    if recorded.get("model") != name:  # another model's weights: only their image size, and no head for an MAE's
        if name.startswith("mae_"):  # only the encoder goes into another model
            raise CheckpointError(f"{path} holds the weights of {recorded.get('model')}, not of {name}: build "
                                  f"{recorded.get('model')}, which its description records")
        recorded = {"img_size": recorded.get("img_size"),  # pretraining records no classes
                    "num_classes": 0 if recorded.get("num_classes") is None else None}
    elif "pretraining" in recorded:
        return recorded["pretraining"]
    return {key: recorded[key] for key in BUILD_KEYS if recorded.get(key) is not None}


def description_record(path: str | Path) -> dict | None:
    """What the export's `config.json` or the training checkpoint's `state.json` at `path` records; None for bare
    weights. A directory's unreadable config.json is refused, as `_checkpoint_record` refuses its state.json: its
    settings would be dropped without a word."""
    path, config = Path(path), Path(path) / EXPORT_CONFIG
    if path.is_dir() and config.exists() and read_json_object(config) is None:
        raise corrupt_description(config, path)
    return export_record(path) or _checkpoint_record(path)


def export_record(path: Path) -> dict | None:
    """An export's `config.json` (written by tools/export.py, hence its `timm_name`), or None; checked to describe
    the weights beside it (`check_export_pair`)."""
    config = unchecked_export_record(path)
    if config is not None:
        check_export_pair(config, path)
    return config


def unchecked_export_record(path: Path) -> dict | None:
    """`export_record` unchecked, to tell an export apart (an export replaces an interrupted one's files)."""
    config = read_json_object((path if path.is_dir() else path.parent) / EXPORT_CONFIG)
    return config if config is not None and "timm_name" in config else None


def check_export_pair(config: dict, path: Path) -> None:
    """Refuse an export's `config.json` beside weights it does not describe (see `WEIGHTS_DIGEST`): those of the
    export directory `path`, or the weights file `path`. Exports written before the digest load as before: refusing
    them would break every existing export over a crash between two renames."""
    weights = path if path.is_file() else path / WEIGHT_FILES[0]
    recorded = config.get(WEIGHTS_DIGEST)
    if recorded is not None and weights_digest(weights) not in (recorded, None):  # None: reading it reports why
        raise CheckpointError(f"{weights} and the {EXPORT_CONFIG} beside it come from different exports (an export "
                              f"was stopped between replacing the one and the other): export again into "
                              f"{weights.parent}")


def weights_digest(path: Path) -> str | None:
    """A fingerprint of the safetensors file at `path`, read without loading it: its tensors' names, dtypes and
    shapes, and the first and last DIGEST_SPAN bytes of each; None for another or an unreadable file. The weights of
    two trainings differ in every tensor that trained, so a few KiB of each tell them apart."""
    digest = hashlib.blake2b(digest_size=16)
    try:
        with open(path, "rb") as file:
            (length,) = struct.unpack("<Q", file.read(8))
            if length > os.fstat(file.fileno()).st_size - 8:  # a damaged or hostile length: read() would allocate it
                return None
            entries = json.loads(file.read(length))
            for name in sorted(key for key in entries if key != "__metadata__"):
                entry = entries[name]
                start, end = entry["data_offsets"]  # from the first byte after the header
                digest.update(json.dumps([name, entry["dtype"], entry["shape"]]).encode())
                for offset in (start, max(start, end - DIGEST_SPAN)):
                    file.seek(8 + length + offset)
                    digest.update(file.read(min(DIGEST_SPAN, end - offset)))
    except (OSError, ValueError, KeyError, TypeError, struct.error):  # a file that is not safetensors, or damaged
        return None
    return digest.hexdigest()


def safetensors_metadata(path: Path) -> dict[str, str] | None:
    """The metadata in a safetensors file's header ({} for none); None for another or an unreadable file, which
    reading its weights reports."""
    try:
        with safe_open(str(path), framework="pt") as file:
            return file.metadata() or {}
    except Exception:  # noqa: BLE001 - any decoding failure means no header to read
        return None


def _checkpoint_record(path: Path) -> dict | None:
    """The model, head size, image size and pooling of a training checkpoint (or run directory), with the build
    arguments of a pretraining run's MAE under `pretraining`; None without a readable `state.json`."""
    try:
        path = resolve_checkpoint(path)
    except CheckpointError:
        return None
    state_path = (path if path.is_dir() else path.parent) / STATE_FILE
    state = read_json_object(state_path)
    if state is None and state_path.exists() and path.is_dir():  # its settings would be dropped without a word
        raise corrupt_description(state_path, path)
    if state is None or not isinstance(state.get("config"), dict):
        return None
    model_config = _model_section(state, state_path)
    record = {"model": state.get("model"), "num_classes": state.get("num_classes"),
              "img_size": model_config.get("img_size"), "global_pool": model_config.get("global_pool")}
    if str(record["model"]).startswith("mae_"):
        record["pretraining"] = pretraining_build_kwargs(state, str(state_path))
    return record


def recorded_pooling(path: str | Path) -> str | None:
    """The global_pool an export's `config.json` or a training checkpoint's `state.json` records; None for bare
    weights (TNT's keys do not show it)."""
    recorded = description_record(path)
    return recorded.get("global_pool") if recorded else None


def refuse_oversized_build(name: str, kwargs: dict, weights: dict[str, torch.Tensor], source: str | Path,
                           remedy: str, given: Iterable[str] = ()) -> None:
    """Refuse model `name` built with `kwargs`, which the description of `source` sets but for the keys the caller
    `given`, when it holds more than RECORDED_BUILD_LIMIT times the elements or tensors of `weights`; `remedy` says
    what to do instead. When the caller's arguments alone build too much, the weights are another model's, and the
    error says to check the name rather than blame the description.

    It is built on the meta device, which allocates no storage, and stops at the first parameter or buffer past the
    limit, so that neither one huge table nor a million small blocks is ever built.
    """
    elements, tensors = sum(value.numel() for value in weights.values()), len(weights)
    if not _builds_over(name, kwargs, RECORDED_BUILD_LIMIT * elements, RECORDED_BUILD_LIMIT * tensors):
        return
    sizes = f"over {RECORDED_BUILD_LIMIT} times the {elements:,} elements or {tensors} tensors of its weights"
    own = {key: kwargs[key] for key in given if key in kwargs}
    if _builds_over(name, own, RECORDED_BUILD_LIMIT * elements, RECORDED_BUILD_LIMIT * tensors):
        raise CheckpointError(f"{name} holds {sizes} in {source}: they are another model's weights; check the model "
                              "name")
    described = EXPORT_CONFIG if unchecked_export_record(Path(source)) is not None else STATE_FILE
    settings = ", ".join(f"{key}={value!r}" for key, value in kwargs.items())
    raise CheckpointError(f"the {described} of {source} builds {name} with {settings}, which holds {sizes}: it is "
                          f"corrupt or describes other weights; {remedy}")


def _builds_over(name: str, kwargs: dict, elements: int, tensors: int) -> bool:
    """Whether model `name` built with `kwargs` holds more than `elements` elements or `tensors` tensors, found on the
    meta device by counting parameters and buffers as they are registered, and stopping at the first one over."""
    _install_registration_counter()
    _BUDGET.left = [elements, tensors]
    try:
        with torch.device("meta"):
            create_model(name, **kwargs)
    except _Oversized:
        return True
    finally:
        _BUDGET.left = None
    return False


class _Oversized(Exception):
    """A build registered more parameter and buffer elements, or tensors, than `_BUDGET` allows."""


_BUDGET = threading.local()
"""`left`: [elements, tensors] that the build sized in this thread may still register; None (or unset) for none."""
_COUNTER_LOCK = threading.Lock()
_COUNTER_INSTALLED = []


def _install_registration_counter() -> None:
    """Install, once in the process, torch's global hooks that charge every parameter and buffer registered to the
    registering thread's `_BUDGET`. They stay: removing them while another thread registers a tensor would change
    the hook table that thread is iterating over."""
    with _COUNTER_LOCK:
        if not _COUNTER_INSTALLED:
            register_module_parameter_registration_hook(_charge_registration)
            register_module_buffer_registration_hook(_charge_registration)
            _COUNTER_INSTALLED.append(True)


def _charge_registration(module: nn.Module, name: str, tensor: torch.Tensor | None) -> None:
    left = getattr(_BUDGET, "left", None)
    if left is None or tensor is None:  # no sizing in this thread, or a buffer slot set to None
        return
    left[0] -= tensor.numel()
    left[1] -= 1
    if left[0] < 0 or left[1] < 0:
        raise _Oversized


def pretraining_build_kwargs(state: dict, source: str) -> dict:
    """`create_model`'s arguments for the MAE of a pretraining checkpoint, from its `state.json` (read from
    `source`): every `model.*` setting of the run, checked as a recipe's are."""
    from ..config import ConfigError, ModelConfig, config_section  # the recipe's own mapping to build arguments

    settings = {"name": state["model"], **_model_section(state, source)}
    try:
        return config_section(ModelConfig, settings, "model.", source).build_kwargs()
    except ConfigError as err:  # a checkpoint's description, not the user's recipe
        raise CheckpointError(f"{err}; the checkpoint's description is corrupt: restore it") from None


def _model_section(state: dict, source: str | Path) -> dict:
    """The `model` section of a checkpoint's `state.json` (read from `source`) config ({} for none)."""
    model = state["config"].get("model") or {}
    if not isinstance(model, dict):
        raise CheckpointError(f"{source} is corrupt (its config's model section is no mapping): restore it")
    return model


def refuse_resampled(report: LoadReport, source: str, built: str, size_setting: str, *,
                     resampling_allowed: bool = True) -> None:
    """Refuse weights (from `source`) whose learned position table `load_weights` resampled to the grid of the model
    `built` (e.g. "vit_base_patch16_224's default"): resampling loses information, so it is done only at a size given
    with `size_setting`, or never where `resampling_allowed` is false (the tools show and export weights as they were
    trained)."""
    if report.resampled:
        alternative = " (or the size to resample it to)" if resampling_allowed else ""
        raise CheckpointError(f"the position table of {source} is for another image size than {built} "
                              f"({'; '.join(report.resampled)}): pass {size_setting} the size it was trained "
                              f"at{alternative}")


def corrupt_description(description: Path, checkpoint: Path) -> CheckpointError:
    """The error for a checkpoint directory whose state.json or config.json cannot be read (a weights file given
    alone, beside it, is read as bare weights)."""
    return CheckpointError(f"{description} is corrupt (not a JSON object): restore it, or pass the weights file in "
                           f"{checkpoint} itself")


def read_json_object(path: Path) -> dict | None:
    """The JSON object in `path`; None when it is missing, unreadable or holds something else."""
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return content if isinstance(content, dict) else None


CONVERT_ADVICE = "convert a foreign checkpoint with tools/convert_checkpoint.py, adding --unsafe-pickle"


def read_state_dict(path: str | Path, pickle_advice: str = CONVERT_ADVICE) -> dict[str, torch.Tensor]:
    """Tensors of a weights file, checkpoint directory or run directory (newest checkpoint), unwrapped from
    `{'model': ...}`-style containers; `pickle_advice` says how to read a pickle that is refused."""
    path = resolve_checkpoint(path)
    if path.is_dir():
        candidates = [path / name for name in WEIGHT_FILES if (path / name).exists()]
        if not candidates:
            raise CheckpointError(f"{path} holds none of {WEIGHT_FILES}; pass a checkpoint directory or weights file")
        path = candidates[0]
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        try:
            return without_wrapper_prefixes(load_file(str(path)))
        except Exception as err:  # noqa: BLE001 - any decoding failure means an unusable file
            raise CheckpointError(f"cannot read {path}: not a complete safetensors file ({err}); "
                                  f"{_repair_advice(path)}") from err
    try:
        with warnings.catch_warnings():  # torch asks to report pickle protocols it reads fine; users cannot act on it
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any decoding failure means an unusable file
        reason = f"{type(err).__name__}: {_load_failure_reason(err)}"
        if not _looks_like_torch_file(path):
            run_hint = f" ({path.parent} is a run directory: pass it)" if (path.parent / "checkpoints").is_dir() else ""
            raise CheckpointError(f"cannot read {path}: it is no PyTorch checkpoint ({reason}); pass a weights file "
                                  f"(.safetensors, .pth, .pt) or a checkpoint directory{run_hint}") from err
        if not _refused_as_unsafe(err):  # a truncated zip or pickle fails the same way when fully unpickled
            raise CheckpointError(f"cannot read {path}: it is truncated or corrupt ({reason}); "
                                  f"{_repair_advice(path)}") from err
        raise CheckpointError(f"cannot read {path} safely ({reason}). Only tensors and plain containers are accepted: "
                              f"{pickle_advice} for a legacy pickle you trust") from err
    return unwrap_state_dict(obj, path)


def conversion_metadata(model_name: str, untrained: list[str]) -> dict[str, str]:
    """The safetensors metadata of a converted file (see `CONVERSION_METADATA`)."""
    return {CONVERSION_METADATA: json.dumps({"model": model_name, "untrained_keys": untrained}, sort_keys=True)}


def untrained_keys(path: Path) -> list[str]:
    """The keys a converted file at `path` marks as never trained; [] for any other file or a directory.

    Raises:
        CheckpointError: the mark is there but is not a list of key names.
    """
    mark = (safetensors_metadata(path) or {}).get(CONVERSION_METADATA)
    if mark is None:
        return []
    try:
        untrained = json.loads(mark)["untrained_keys"]
    except (ValueError, TypeError, KeyError):
        untrained = None
    if not isinstance(untrained, list) or not all(isinstance(key, str) for key in untrained):
        raise CheckpointError(f"cannot read {path}: its {CONVERSION_METADATA} metadata is corrupt; convert its source "
                              "again with tools/convert_checkpoint.py")
    return untrained


def _repair_advice(weights: Path) -> str:
    """What to do about an unreadable weights file: use the previous checkpoint of its run, where there is one."""
    checkpoint = weights.parent
    in_run = checkpoint.parent.name == "checkpoints"
    earlier = [step for step in step_dirs(checkpoint.parent) if step.name < checkpoint.name] if in_run else []
    if earlier:
        return f"give the run's previous checkpoint, {earlier[-1]}, instead (or write the file again)"
    return "write or download it again"


def unwrap_state_dict(obj, path: Path) -> dict[str, torch.Tensor]:
    while isinstance(obj, dict) and not _is_state_dict(obj):
        inner = next((obj[key] for key in WRAPPER_KEYS if key in obj), None)
        if inner is None:
            raise CheckpointError(f"{path}: no state dict found under any of {WRAPPER_KEYS} (its top-level keys: "
                                  f"{', '.join(map(str, list(obj)[:8]))}); save the model's state_dict() alone, or "
                                  "load the file yourself and pass the weights")
        obj = inner
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state dict, got {type(obj).__name__}; save the model's "
                              "state_dict() rather than the model")
    return without_wrapper_prefixes(obj)


def _is_state_dict(obj: dict) -> bool:
    return bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def without_wrapper_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state_dict` without the key prefixes of DDP (`module.`) and torch.compile (`_orig_mod.`), which carry no
    meaning for the weights."""
    return {_strip_wrappers(key): value for key, value in state_dict.items()}


def _strip_wrappers(key: str) -> str:
    """`key` without its wrapper prefixes, in whichever order the wrappers nested (DDP(compiled) or compiled(DDP))."""
    while (bare := key.removeprefix("module.").removeprefix("_orig_mod.")) != key:
        key = bare
    return key


def load_weights(
    model: nn.Module,
    source: str | Path | dict[str, torch.Tensor],
    allow_missing: tuple[str, ...] = (),
    allow_unexpected: tuple[str, ...] = (),
    remedy: str | None = None,
) -> LoadReport:
    """Load weights into `model` and assert the exact missing/unexpected key sets.

    Args:
        source: a path (see `read_state_dict`) or a state dict.
        allow_missing: fnmatch patterns of keys the checkpoint may lack (e.g. `head.*` when fine-tuning).
        allow_unexpected: fnmatch patterns of checkpoint keys the model may ignore.
        remedy: the error's last advice, after the model name or build arguments that would fit; by default,
            converting the checkpoint where no build argument fits it.
    """
    state_dict = source if isinstance(source, dict) else read_state_dict(source)
    own = model.state_dict()
    if "head.0.running_mean" not in own:  # a classifier, not a linear probe being resumed
        state_dict = fold_probe_head(state_dict)
    report = LoadReport()
    if not isinstance(model, MaskedAutoencoder) and any(k.startswith(("encoder.", *WRAPPER_KEY_PREFIXES))
                                                        for k in state_dict):  # an MAE's, of our or the flat layout
        state_dict, wrapper = split_mae_state_dict(state_dict)
        report.dropped = sorted(wrapper)
    if hasattr(model, "adapt_state_dict"):
        with recorded_resamples() as report.resampled:
            state_dict = model.adapt_state_dict(state_dict)
    reshaped = [k for k, v in state_dict.items() if k in own and v.shape != own[k].shape]
    if reshaped:  # load_state_dict would raise a RuntimeError listing every one; report them with the other misfits
        report.missing = sorted(own.keys() - state_dict.keys())
        report.unexpected = sorted(state_dict.keys() - own.keys())
    else:
        result = model.load_state_dict(state_dict, strict=False)
        report.missing, report.unexpected = sorted(result.missing_keys), sorted(result.unexpected_keys)
    bad_missing = [k for k in report.missing if not _matches(k, allow_missing)]
    bad_unexpected = [k for k in report.unexpected if not _matches(k, allow_unexpected)]
    if bad_missing or bad_unexpected or reshaped:
        hint = _build_hint(state_dict, own, bad_missing, bad_unexpected, reshaped)
        shapes = [f"{k} {list(state_dict[k].shape)} vs {list(own[k].shape)}" for k in reshaped]
        _refuse(model, bad_missing, bad_unexpected, shapes, hint, remedy)
    return report


def fold_probe_head(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BatchNorm1d + Linear (keys head.0.*, head.1.*) -> one Linear `head.*` with the same output.

    W (g (x - mean) / s + beta) + b = (W g / s) x + (b + W (beta - g mean / s)), with s = sqrt(var + eps) per feature
    (eval statistics) and the BatchNorm's affine g, beta (1 and 0 for the probe's own, which has none).
    """
    if "head.0.running_mean" not in state_dict:
        return state_dict
    out = {k: v for k, v in state_dict.items() if not k.startswith("head.")}
    mean = state_dict["head.0.running_mean"].double()  # [D]
    gain = state_dict.get("head.0.weight", torch.ones_like(mean)).double()  # [D]
    scale = gain * (state_dict["head.0.running_var"].double() + PROBE_BN_EPS).rsqrt()  # [D]
    shift = state_dict.get("head.0.bias", torch.zeros_like(mean)).double() - scale * mean  # [D]
    linear = state_dict["head.1.weight"].double()  # [C, D]
    out["head.weight"] = (linear * scale).float()
    out["head.bias"] = (state_dict["head.1.bias"].double() + linear @ shift).float()
    return out


def _refuse(model: nn.Module, missing: list[str], unexpected: list[str], reshaped: list[str],
            build_hint: str | None, remedy: str | None) -> typing.NoReturn:
    """A CheckpointError short enough to read, since a wrong model misfits hundreds of keys.

    Keys are grouped by top-level module (`decoder_blocks.* (16)`, the form `--allow-missing` takes; groups of up
    to three are listed), and shape misfits show two examples.
    """
    parts = [f"{len(missing)} missing: {by_module(missing)}" if missing else "",
             f"{len(unexpected)} unexpected: {by_module(unexpected)}" if unexpected else "",
             f"{len(reshaped)} of another shape: {', '.join(reshaped[:2])}{' and more' if len(reshaped) > 2 else ''}"
             if reshaped else ""]
    if build_hint is None:  # the keys themselves are foreign: another model, or a layout to convert
        remedy = remedy or "convert it with tools/convert_checkpoint.py"
    advice = build_hint or "Check that the model name matches the checkpoint"
    raise CheckpointError(f"checkpoint keys do not fit {type(model).__name__}: {'; '.join(filter(None, parts))}. "
                          f"{advice}{f', or {remedy}' if remedy else ''}")


POOLINGS = {"avg": ("fc_norm", "was trained with global average pooling"),
            "token": ("norm", "was trained with the class token")}
"""timm's pooling layouts: global_pool -> the final norm it keeps (the other is absent), and how a hint says it."""


def _pooling_shown(state_dict: dict[str, torch.Tensor]) -> str | None:
    """The global_pool whose final norm alone a state dict holds; None when it holds both or neither."""
    shown = [pool for pool, (norm, _) in POOLINGS.items() if _has_module(state_dict, norm)]
    return shown[0] if len(shown) == 1 else None


def _build_hint(state_dict: dict[str, torch.Tensor], own: dict[str, torch.Tensor], missing: list[str],
                unexpected: list[str], reshaped: list[str]) -> str | None:
    """When only the pooling norm and/or the head misfit, the build arguments the checkpoint fits: its pooling and
    its head size (0: an encoder's)."""
    if any(not key.startswith("head.") for key in reshaped):
        return None
    fixes = []
    misfit = {key.split(".")[0] for key in missing + unexpected} - {"head"}
    if misfit:
        pooling = _pooling_shown(state_dict)
        if misfit != {norm for norm, _ in POOLINGS.values()} or pooling is None:
            return None
        fixes.append((POOLINGS[pooling][1], f"global_pool='{pooling}'"))
    theirs, ours = head_outputs(state_dict), head_outputs(own)
    if theirs != ours:
        fixes.append((f"has a head of {theirs} outputs" if theirs else "has no head", f"num_classes={theirs}"))
    if not fixes:
        return None
    hint = (f"The checkpoint {' and '.join(why for why, _ in fixes)}: create the model with "
            f"{', '.join(argument for _, argument in fixes)}")
    if theirs == 0 and ours and len(fixes) == 1:  # only the head misfits: an encoder, to be fine-tuned under it
        hint += ("; to train a new head on it, load it with mae_tnt.load_weights(model, path, "
                 "allow_missing=('head.*',)) instead, as finetune.py's init= does")
    return hint


ANSI_STYLE = re.compile(r"\x1b\[[0-9;]*m")


def _looks_like_torch_file(path: Path) -> bool:
    """torch.save writes a zip archive ("PK"), and wrote a pickle (protocol 2 and later start with 0x80) before 1.6."""
    with open(path, "rb") as f:
        head = f.read(2)
    return head == b"PK" or head[:1] == b"\x80"


def _refused_as_unsafe(err: Exception) -> bool:
    """Whether torch's weights-only unpickler refused something the file holds (it raises an UnpicklingError saying
    "Weights only load failed"), rather than failing to read the file at all."""
    return isinstance(err, pickle.UnpicklingError) and "Weights only load failed" in str(err)


def _load_failure_reason(err: Exception) -> str:
    """The line of torch's many-line weights_only explanation that names what it refused (else its first line),
    without the terminal styling some versions add."""
    lines = [ANSI_STYLE.sub("", line).strip() for line in str(err).splitlines() if line.strip()]
    named = [line for line in lines if "GLOBAL" in line or line.startswith("Unsupported")]
    return (named or lines or [""])[0]


def head_outputs(state_dict: dict[str, torch.Tensor]) -> int:
    """The classes a state dict's head predicts; 0 for an encoder's, which has none."""
    return int(state_dict["head.weight"].shape[0]) if "head.weight" in state_dict else 0


def shown_build_kwargs(state_dict: dict[str, torch.Tensor]) -> dict:
    """The classifier build arguments a state dict shows: its head size (0: an encoder's) and, in timm's layout of
    global average pooling (`fc_norm` and no `norm`), global_pool='avg'. TNT's pooling leaves no trace in its keys."""
    shown: dict = {"num_classes": head_outputs(state_dict)}
    if _pooling_shown(state_dict) == "avg":  # a class-token `norm` is also TNT's average-pooling one
        shown["global_pool"] = "avg"
    return shown


def fitting_build_kwargs(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict:
    """`shown_build_kwargs` that classifier `model` was built without; {} for an MAE model, which takes neither."""
    if isinstance(model, MaskedAutoencoder) or not hasattr(model, "num_classes"):
        return {}
    return {key: value for key, value in shown_build_kwargs(state_dict).items() if getattr(model, key, None) != value}


def _has_module(state_dict: dict[str, torch.Tensor], name: str) -> bool:
    return any(key.startswith(f"{name}.") for key in state_dict)


def by_module(keys: list[str]) -> str:
    groups: dict[str, list[str]] = {}
    for key in keys:
        groups.setdefault(key.split(".")[0], []).append(key)
    shown = (", ".join(items) if len(items) <= 3 else f"{top}.* ({len(items)})" for top, items in groups.items())
    return ", ".join(shown)


def _matches(key: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatch(key, pattern) for pattern in patterns)
