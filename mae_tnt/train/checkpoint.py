"""Atomic, self-describing training checkpoints and exact resume.

A checkpoint is a directory `checkpoints/step_{step:08d}/` holding:
- `model.safetensors` (unwrapped model weights), `optimizer.pt` and `scaler.pt` (tensors and plain containers only,
  loaded with `weights_only=True`), or the DeepSpeed engine files under DeepSpeed;
- `data_rank{r}.json`: the stream position of every worker role of rank r;
- fine-tuning's extra weights: `ema.safetensors` with an EMA, and `frozen_fp32.safetensors` under DeepSpeed's half
  modes (the untrained parameters, of which the engine keeps only 16-bit copies);
- `state.json`, written last: the step, model name, world size, resolved config and schedule plan, the metrics rows
  written so far and the loss window's totals (which a resume keeps), the DeepSpeed layout under DeepSpeed, and for
  fine-tuning the mode, classes, image size and best result so far.

It is written to `.tmp-step_*` and renamed once every rank has finished, so a crash mid-write never leaves a
half-written `step_*`. `read_checkpoint` checks that every file reads back; `mae_tnt.train.resume` picks the
checkpoint to continue from and restores it.
RNG state is not saved because every step's randomness is a pure function of (seed, rank, step): see
`mae_tnt.train.loop.seed_step`.

References: nanoGPT (checkpoints that store their own config); accelerate `save_state` (called on every rank,
since DeepSpeed's save has barriers: accelerate #1171).
"""

from __future__ import annotations

import json
import pickle
import shutil
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..atomic import replace_dir, temporary_name, write_json_atomic
from ..models.loading import STATE_FILE, CheckpointError, save_weights, step_dirs
from .launch import deepspeed_layout, uses_deepspeed

if TYPE_CHECKING:  # engine imports this module
    from .loop import Window

LOG_WINDOW_KEY = "log_window"  # in state.json: the open log window's loss sums
DEEPSPEED_KEY = "deepspeed"  # in state.json: the ZeRO stage and precision a DeepSpeed checkpoint's shards are for
METRICS_ROWS_KEY = "metrics_rows"  # in state.json: the lines metrics.jsonl held (MetricsLogger.rows)


class ResumeError(RuntimeError):
    """A checkpoint that cannot be resumed from."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint (or fine-tuning's `best/`) that could not be written, most often for want of disk space."""


# What a failed write raises: the OS's error, safetensors' (which wraps it) or torch.save's, which loses it (a full
# disk gives "[enforce fail at inline_container.cc:671] . unexpected pos 576 vs 534").
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)


@dataclass
class Checkpoint:
    path: Path
    state: dict


def master_state_dict(accelerator, model: torch.nn.Module,
                      frozen_masters: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The model's weights as training keeps them (every rank takes part, as in `get_state_dict`): under DeepSpeed's
    bf16/fp16 modes the module holds 16-bit copies, and the fp32 masters the optimizer updates are taken instead,
    with `frozen_masters` (`frozen_fp32_copies`) for the parameters it does not update."""
    state = accelerator.get_state_dict(model)
    if not uses_deepspeed(accelerator) or accelerator.mixed_precision == "no":
        return state
    from deepspeed.utils import safe_get_full_fp32_param

    params = bare_model(accelerator, model).named_parameters()
    masters = {name: safe_get_full_fp32_param(param) for name, param in params}
    masters = {**{name: value for name, value in masters.items() if value is not None}, **(frozen_masters or {})}
    return {key: masters[key].cpu() if key in masters else value for key, value in state.items()}


def frozen_fp32_copies(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """fp32 copies (on the CPU) of the parameters that do not train, taken before DeepSpeed's half modes cast the
    module: the engine keeps fp32 masters only of what its optimizer updates."""
    return {name: param.detach().float().cpu().clone() for name, param in model.named_parameters()
            if not param.requires_grad}


def bare_model(accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """The model inside its DDP or DeepSpeed wrapper and torch.compile's, whose state-dict keys are the model's own.

    `torch.compile` runs before `accelerator.prepare`, so accelerate unwraps DDP(OptimizedModule(model)) down to the
    OptimizedModule only, whose keys carry `_orig_mod.`, whatever its `keep_torch_compile`.
    """
    model = accelerator.unwrap_model(model)
    return getattr(model, "_orig_mod", model)


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def save_checkpoint(accelerator, model, optimizer, state: dict, data_state: dict, output_dir: Path, keep: int,
                    window: Window, extra_weights: dict[str, dict] | None = None) -> Path:
    """Write a checkpoint atomically from every rank; returns its final path.

    Args:
        window: the open log window, whose loss sums the checkpoint keeps (`Window.loss_totals`).
        extra_weights: file name -> state dict saved (main process) inside the same atomic directory, e.g. the EMA.
    """
    state = {**state, LOG_WINDOW_KEY: window.loss_totals(accelerator)}
    if (layout := deepspeed_layout(accelerator)) is not None:
        state[DEEPSPEED_KEY] = layout
    root = checkpoint_dir(output_dir)
    final = root / f"step_{state['step']:08d}"
    tmp = temporary_name(final)
    if accelerator.is_main_process:
        with write_failures_explained(tmp, final):
            fresh_directory(tmp)
    accelerator.wait_for_everyone()
    with write_failures_explained(tmp, final):
        write_json_atomic(tmp / f"data_rank{accelerator.process_index}.json", data_state)
        if uses_deepspeed(accelerator):
            accelerator.save_state(str(tmp / "engine"))
        elif accelerator.is_main_process:
            save_weights(bare_model(accelerator, model).state_dict(), tmp / "model.safetensors")
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            if accelerator.scaler is not None:
                torch.save(accelerator.scaler.state_dict(), tmp / "scaler.pt")
        if accelerator.is_main_process:
            for name, weights in (extra_weights or {}).items():
                save_weights(weights, tmp / name)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with write_failures_explained(tmp, final):
            write_json_atomic(tmp / STATE_FILE, state)
            replace_dir(tmp, final)
        _rotate(root, keep)
    accelerator.wait_for_everyone()
    return final


def fresh_directory(path: Path) -> None:
    """An empty directory at `path`, whatever an interrupted earlier write left there."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)


RESUME_AFTER_FAILED_WRITE = ("The checkpoints written before it are intact: free some space (or lower "
                             "run.keep_checkpoints) and run the same command again to resume")
RETRY_AFTER_FAILED_WRITE = "Free some space and run the same command again"  # a tool's output, written in one go


@contextmanager
def write_failures_explained(tmp: Path, final: Path, then: str = RESUME_AFTER_FAILED_WRITE) -> Iterator[None]:
    """Turn a failed write of `tmp`, a directory or a file to become `final`, into a `CheckpointWriteError` that
    says what to do (`then`), once `tmp` is removed: its partial files would hold disk space that the next attempt
    needs. Our barriers between the writes stay outside, so a rank that times out waiting for another is not taken
    for a failed write."""
    try:
        yield
    except WRITE_ERRORS as err:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        reason = " ".join(str(err).split())
        raise CheckpointWriteError(
            f"could not write {final} ({reason}), with {_free_space(final.parent)} free on its disk. {then}") from err


def _free_space(path: Path) -> str:
    existing = next(folder for folder in (path, *path.parents) if folder.exists())
    free = shutil.disk_usage(existing).free / 2**20  # MiB
    return f"{free / 1024:.1f} GiB" if free >= 1024 else f"{free:.1f} MiB"


def _rotate(root: Path, keep: int) -> None:
    for old in step_dirs(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


DEEPSPEED_PICKLE_GLOBALS = frozenset({
    "deepspeed.runtime.zero.config.ZeroStageEnum", "deepspeed.utils.tensor_fragment.fragment_address",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler", "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "numpy.dtype", "numpy.ndarray", "numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct",
})
"""What the pickles of a DeepSpeed checkpoint name beyond torch's weights-only set: DeepSpeed's own state classes,
and numpy arrays (accelerate's saved RNG states)."""


def check_engine_pickles(engine_dir: Path) -> None:
    """Refuse a DeepSpeed checkpoint whose files name any callable beyond tensors and `DEEPSPEED_PICKLE_GLOBALS`, or
    that leads DeepSpeed to files outside `engine_dir` (a symbolic link, or a `latest` tag naming another folder).

    DeepSpeed and accelerate unpickle these files without restriction (`weights_only=False`); a pickle can only run
    code through a callable it names, so once every name is known to be harmless, their load is as safe as a
    weights-only one.
    """
    files = []
    for path in sorted(engine_dir.rglob("*")):
        if path.is_symlink():  # rglob does not look behind it, DeepSpeed would read what it leads to
            raise CheckpointError(f"{path} is a symbolic link, which no checkpoint of ours holds; refusing to read "
                                  "the checkpoint. Copy the files it leads to in its place")
        if path.is_file() and path.suffix in (".pt", ".pkl", ".bin"):
            files.append(path)
    if (engine_dir / "latest").exists():
        engine_tag(engine_dir)
    check_pickles(files, allowed=DEEPSPEED_PICKLE_GLOBALS)


def engine_tag(engine_dir: Path) -> str:
    """The folder of `engine_dir` that its `latest` file names, where DeepSpeed reads the weights from."""
    tag = (engine_dir / "latest").read_text(errors="replace").strip()
    if tag in ("", ".", "..") or Path(tag).name != tag or not (engine_dir / tag).is_dir():
        raise CheckpointError(f"{engine_dir / 'latest'} names {tag!r}, which is no folder of {engine_dir}; refusing "
                              "to read the checkpoint. Use a checkpoint written by this project")
    return tag


def check_pickles(paths: list[Path], allowed: frozenset[str] = frozenset()) -> None:
    """Refuse torch files whose pickles name callables beyond torch's weights-only set and `allowed`; only the
    pickles are read, not the tensors."""
    for path in paths:
        try:
            unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(path)) - allowed
        except (RuntimeError, ValueError, OSError, zipfile.BadZipFile, pickle.UnpicklingError) as err:
            raise CheckpointError(f"{path} cannot be checked as a torch checkpoint file ({err}); resume from another "
                                  "checkpoint of the run") from None
        if unsafe:
            raise CheckpointError(f"{path} would run {', '.join(sorted(unsafe))} when unpickled, which no checkpoint "
                                  "of ours holds; refusing to read it. Use a checkpoint written by this project")


def find_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, newest first (by step number, never by file time)."""
    return step_dirs(checkpoint_dir(output_dir))[::-1]


STATE_KEYS = ("step", "model", "config")
"""What every checkpoint's state.json says: resuming reads the step and checks the model and config against it."""


def read_checkpoint(path: Path) -> Checkpoint:
    """Read and validate `state.json` and check that the weight files exist and parse."""
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except (OSError, ValueError) as err:
        raise ResumeError(f"{path / STATE_FILE} is missing or corrupt ({err})") from err
    lacking = [key for key in STATE_KEYS if not isinstance(state, dict) or key not in state]
    if lacking:
        raise ResumeError(f"{path / STATE_FILE} is corrupt: it lacks {', '.join(lacking)}")
    try:
        _check_weight_files(path)
    except CheckpointError as err:  # a pickle refused: the checkpoint is unusable, and auto-resume passes over it
        raise ResumeError(str(err)) from None
    for data_file in path.glob("data_rank*.json"):
        try:
            json.loads(data_file.read_text())
        except (OSError, ValueError) as err:
            raise ResumeError(f"{data_file} is corrupt ({err})") from err
    return Checkpoint(path, state)


def holds_training_state(path: Path) -> bool:
    """Whether a directory holds the optimizer state a resume needs, as `save_checkpoint` writes it: optimizer.pt, or
    a DeepSpeed engine's directory."""
    return (path / "optimizer.pt").exists() or (path / "engine").is_dir()


def _check_weight_files(path: Path) -> None:
    """The weights parse, and the torch files' pickles name nothing but tensors and known state classes."""
    if (path / "model.safetensors").exists():
        try:
            load_file(path / "model.safetensors")
        except Exception as err:  # noqa: BLE001 - any parse failure means the file is corrupt
            raise ResumeError(f"{path / 'model.safetensors'} is corrupt ({err})") from err
        _check_torch_files(path)
    elif (path / "engine").is_dir():
        check_engine_pickles(path / "engine")
    else:
        raise ResumeError(f"{path} holds no model weights")


def _check_torch_files(path: Path) -> None:
    """The optimizer and scaler files are zip archives (`torch.save`): a truncated one has lost its central
    directory at the end, which is checked without reading the (large) optimizer state."""
    if not (path / "optimizer.pt").exists():
        raise ResumeError(f"{path} holds no optimizer.pt")
    for name in ("optimizer.pt", "scaler.pt"):
        if (path / name).exists() and not zipfile.is_zipfile(path / name):
            raise ResumeError(f"{path / name} is corrupt (truncated or not written by torch.save)")
    # refused when loaded too, with torch's advice to load it without the check
    check_pickles([path / name for name in ("optimizer.pt", "scaler.pt") if (path / name).exists()])
