"""Atomic, self-describing training checkpoints and exact resume.

A checkpoint is a directory `checkpoints/step_{step:08d}/` holding:
- `model.safetensors` (unwrapped model weights), `optimizer.pt` and `scaler.pt` (tensors and plain containers only,
  loaded with `weights_only=True`), or the DeepSpeed engine files under DeepSpeed;
- `data_rank{r}.json`: the stream position of every worker role of rank r;
- fine-tuning's extra weights: `ema.safetensors` with an EMA, and `frozen_fp32.safetensors` under DeepSpeed's half
  modes (the untrained parameters, of which the engine keeps only 16-bit copies);
- `state.json`: step, micro-step, model name, world size and the resolved config, written last.

It is written to `.tmp-step_*` and renamed once every rank has finished, so a crash mid-write never leaves a
half-written `step_*`. Resume picks the newest directory whose files all read back; a corrupted one is reported and
the previous one is used (when none reads back, the old run is set aside and a fresh one starts). Checkpoints past
the one resumed from, and a fine-tuning run's `best/` if a later step wrote it, are moved to `superseded/`, out of
the rotation.
RNG state is not saved because every step's randomness is a pure function of (seed, rank, step): see
`mae_tnt.train.engine.seed_step`.

References: nanoGPT (checkpoints that store their own config); accelerate `save_state` (called on every rank,
since DeepSpeed's save has barriers: accelerate #1171).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..data.info import write_json_atomic
from ..data.stream import StreamState
from ..models.loading import (
    STATE_FILE,
    CheckpointError,
    read_state_dict,
    resolve_checkpoint,
    save_weights,
    step_dirs,
)
from ..text import counted
from .metrics import row_step
from .run_lock import LOCK_NAME

if TYPE_CHECKING:  # engine imports this module
    from .engine import Plan
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
    tmp = root / f".tmp-step_{state['step']:08d}"
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


def replace_dir(tmp: Path, final: Path) -> None:
    """Put the complete directory `tmp` in place of `final`, durably: readers see the old one or the new one."""
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _fsync_dir(final.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


DEEPSPEED_PICKLE_GLOBALS = frozenset({
    "deepspeed.runtime.zero.config.ZeroStageEnum", "deepspeed.utils.tensor_fragment.fragment_address",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler", "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "numpy.dtype", "numpy.ndarray", "numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct",
})
"""What the pickles of a DeepSpeed checkpoint name beyond torch's weights-only set: DeepSpeed's own state classes,
and numpy arrays (accelerate's saved RNG states)."""


def check_engine_pickles(engine_dir: Path) -> None:
    """Refuse a DeepSpeed checkpoint whose files name any callable beyond tensors and `DEEPSPEED_PICKLE_GLOBALS`.

    DeepSpeed and accelerate unpickle these files without restriction (`weights_only=False`); a pickle can only run
    code through a callable it names, so once every name is known to be harmless, their load is as safe as a
    weights-only one.
    """
    for path in sorted(engine_dir.rglob("*")):
        if not path.is_file() or path.suffix not in (".pt", ".pkl", ".bin"):
            continue
        try:
            unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(path)) - DEEPSPEED_PICKLE_GLOBALS
        except (RuntimeError, ValueError, OSError, zipfile.BadZipFile) as err:
            raise CheckpointError(f"{path} is not a torch checkpoint file ({err}); resume from another checkpoint "
                                  "of the run") from None
        if unsafe:
            raise CheckpointError(f"{path} would run {', '.join(sorted(unsafe))} when unpickled, which no checkpoint "
                                  "of ours holds; refusing to read it. Use a checkpoint written by this project")


def uses_deepspeed(accelerator) -> bool:
    return accelerator.distributed_type.name == "DEEPSPEED"


def deepspeed_layout(accelerator) -> dict | None:
    """The ZeRO stage and precision (as run.precision names it) of a DeepSpeed engine; None without DeepSpeed."""
    if not uses_deepspeed(accelerator):
        return None
    precision = {"no": "fp32"}.get(accelerator.mixed_precision, accelerator.mixed_precision)
    return {"zero_stage": accelerator.state.deepspeed_plugin.zero_stage, "precision": precision}


def splits_weights(accelerator) -> bool:
    """ZeRO-3 splits the weights across ranks and every forward gathers them: a forward that one rank runs alone
    waits for the others forever."""
    return uses_deepspeed(accelerator) and accelerator.state.deepspeed_plugin.zero_stage == 3


def find_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, newest first (by step number, never by file time)."""
    return step_dirs(checkpoint_dir(output_dir))[::-1]


def resolve_resume(resume: str, output_dir: str | Path, log=print, is_main: bool = True) -> Checkpoint | None:
    """The checkpoint to resume from: `auto` (newest readable one, if any), `none`, or an explicit checkpoint or run
    directory (its newest checkpoint).

    With `none`, and with `auto` when checkpoints exist but none can be read, a run already in `output_dir` is first
    set aside (`set_aside_previous_run`, by the main process).
    """
    if resume == "none":
        if is_main:
            set_aside_previous_run(output_dir, log)
        return None
    if resume != "auto":
        if not Path(resume).exists():
            kept = find_checkpoints(output_dir)
            listing = (f"this run's are {', '.join(path.name for path in kept)} in {kept[0].parent}: give one's path"
                       if kept else "this run has none yet")
            raise ResumeError(f"run.resume={resume} does not exist; {listing}, or run.resume=auto for the newest")
        return read_checkpoint(_explicit_checkpoint(resume))
    checkpoints = find_checkpoints(output_dir)
    for path in checkpoints:
        try:
            return read_checkpoint(path)
        except ResumeError as err:
            log(f"warning: skipping unusable checkpoint {path}: {err}; trying the previous one")
    # None could be read. Left in place, they would be the highest steps, which the rotation keeps: it would delete
    # the new checkpoints instead, and the next `auto` would fail on them again.
    if checkpoints and is_main:
        set_aside_previous_run(output_dir, log, why="no checkpoint of it could be read, so this run starts afresh")
    return None


def _explicit_checkpoint(resume: str) -> Path:
    """The checkpoint directory that an existing run.resume path stands for; a file or a folder of checkpoints is
    refused with the path to give instead, rather than read as a checkpoint that lacks its state.json."""
    path = resolve_checkpoint(resume)
    if path.is_file():
        raise ResumeError(f"run.resume={resume} is a file; give the checkpoint directory that holds it "
                          f"({path.parent}) or its run directory")
    steps = step_dirs(path)
    if steps and not (path / STATE_FILE).exists():
        raise ResumeError(f"run.resume={resume} is a folder of checkpoints; give one of them (the newest is "
                          f"{steps[-1]}) or the run directory {path.parent}")
    return path


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
    if (path / "model.safetensors").exists():
        try:
            load_file(path / "model.safetensors")
        except Exception as err:  # noqa: BLE001 - any parse failure means the file is corrupt
            raise ResumeError(f"{path / 'model.safetensors'} is corrupt ({err})") from err
        _check_torch_files(path)
    elif (path / "engine").is_dir():
        try:
            check_engine_pickles(path / "engine")
        except CheckpointError as err:
            raise ResumeError(str(err)) from None
    else:
        raise ResumeError(f"{path} holds no model weights")
    for data_file in path.glob("data_rank*.json"):
        try:
            json.loads(data_file.read_text())
        except (OSError, ValueError) as err:
            raise ResumeError(f"{data_file} is corrupt ({err})") from err
    return Checkpoint(path, state)


def _check_torch_files(path: Path) -> None:
    """The optimizer and scaler files are zip archives (`torch.save`): a truncated one has lost its central
    directory at the end, which is checked without reading the (large) optimizer state."""
    if not (path / "optimizer.pt").exists():
        raise ResumeError(f"{path} holds no optimizer.pt")
    for name in ("optimizer.pt", "scaler.pt"):
        if (path / name).exists() and not zipfile.is_zipfile(path / name):
            raise ResumeError(f"{path / name} is corrupt (truncated or not written by torch.save)")


FRESH = "use another run.output_dir, or run.resume=none to start fresh"


def check_compatible(checkpoint: Checkpoint, config: dict, effective_batch: int, world_size: int,
                     deepspeed: dict | None) -> None:
    """Refuse to resume another model's run (or mode's, or optimizer's), a run whose step counts meant another
    effective batch, or a checkpoint of the other engine (DeepSpeed or not, `deepspeed` being this launch's
    `deepspeed_layout`) or of another DeepSpeed layout.

    Steps count optimizer updates, so the LR schedule and the epoch of a step both assume the batch they were taken
    with; continuing on another number of processes without adapting `optim.accum_steps` would silently move the run
    to another point of its schedule and scale its learning rate.
    """
    saved, model_name = checkpoint.state.get("model"), config["model"]["name"]
    if saved != model_name:
        init = (f"; to fine-tune from this pretraining checkpoint, pass it as init={checkpoint.path}"
                if str(saved).startswith("mae_") and "mode" in config else "")
        raise ResumeError(f"{checkpoint.path} was written by model {saved!r} but this recipe builds {model_name!r}; "
                          f"{FRESH}{init}")
    if checkpoint.state.get("mode") != config.get("mode"):
        raise ResumeError(f"{checkpoint.path} was written with mode={checkpoint.state.get('mode')} but this recipe "
                          f"runs mode={config.get('mode')}; {FRESH}")
    saved_optimizer = _lookup(checkpoint.state.get("config", {}), ("optim", "name"))
    optimizer = config["optim"].get("name")
    if saved_optimizer is not None and saved_optimizer != optimizer:
        raise ResumeError(f"{checkpoint.path} was trained with optim.name={saved_optimizer}, whose state does not "
                          f"carry over to optim.name={optimizer}; set it back to continue, or {FRESH}")
    if (checkpoint.path / "engine").is_dir() != (deepspeed is not None):
        written = "without" if deepspeed else "with"
        launch = "without DeepSpeed" if deepspeed else "with the same DeepSpeed accelerate config"
        raise ResumeError(f"{checkpoint.path} was written {written} DeepSpeed: launch {launch} to continue it, or "
                          f"{FRESH}")
    if deepspeed is not None:
        _check_deepspeed_layout(checkpoint, world_size, deepspeed)
    saved_batch = checkpoint.state.get("plan", {}).get("effective_batch", effective_batch)
    if saved_batch != effective_batch:
        per_update = effective_batch // config["optim"]["accum_steps"]  # images per micro-step now
        fix = _batch_fix(checkpoint.state, saved_batch, per_update, world_size)
        processes = counted(checkpoint.state.get("world_size"), "process")
        raise ResumeError(f"{checkpoint.path} was trained with an effective batch of {saved_batch} "
                          f"({processes}), this launch gives {effective_batch}; "
                          f"its steps and LR schedule assume {saved_batch}: {fix} to continue it, or {FRESH}")


def _check_deepspeed_layout(checkpoint: Checkpoint, world_size: int, layout: dict) -> None:
    """DeepSpeed's optimizer shards load only on as many processes and in the precision they were written with, and
    ZeRO-3's partitioned weights only under ZeRO-3 (stages 1 and 2 read each other's)."""
    saved_world = checkpoint.state.get("world_size", world_size)
    if saved_world != world_size:
        raise ResumeError(f"{checkpoint.path} holds DeepSpeed shards of {counted(saved_world, 'process')}, which load "
                          f"only on as many: launch {counted(saved_world, 'process')} to continue it, or {FRESH}")
    saved = checkpoint.state.get(DEEPSPEED_KEY)
    if saved is None:  # written before the layout was recorded
        return
    if saved["precision"] != layout["precision"]:
        raise ResumeError(f"{checkpoint.path} was written by DeepSpeed in {saved['precision']}, whose optimizer shards "
                          f"load only in it: set run.precision={saved['precision']} to continue it, or {FRESH}")
    if (saved["zero_stage"] == 3) != (layout["zero_stage"] == 3):
        raise ResumeError(f"{checkpoint.path} was written under ZeRO stage {saved['zero_stage']}, which stage "
                          f"{layout['zero_stage']} cannot read: launch with a ZeRO-{saved['zero_stage']} DeepSpeed "
                          f"config to continue it, or {FRESH}")


def _batch_fix(state: dict, saved_batch: int, per_update: int, world_size: int) -> str:
    """The settings that give back the checkpoint's effective batch (`per_update`: images per micro-step now)."""
    saved_config = state.get("config", {})
    if state.get("world_size") == world_size and "data" in saved_config:  # the batch settings changed, not the launch
        return (f"set data.batch_size={saved_config['data']['batch_size']} "
                f"optim.accum_steps={saved_config['optim']['accum_steps']}")
    per_process, rest = divmod(saved_batch, world_size)
    if rest:
        return f"launch {counted(state.get('world_size'), 'process')}"
    batch_now = per_update // world_size
    # The largest per-device batch up to the present one: it fits in memory as the present one does.
    batch = max(b for b in range(1, batch_now + 1) if per_process % b == 0)
    accum = f"optim.accum_steps={per_process // batch}"
    return f"set {accum}" if batch == batch_now else f"set data.batch_size={batch} {accum}"


def restore_training(accelerator, model, optimizer, checkpoint: Checkpoint, *, config: dict, plan: Plan,
                     output_dir: Path, window: Window, log=print) -> tuple[int, StreamState]:
    """Restore a compatible checkpoint in place, `window`'s loss sums included; returns its optimizer step and this
    rank's data position.

    Args:
        config: the run's resolved config (`to_dict`), compared with the one the checkpoint stores.

    The position is exact when the checkpoint was written with the same data and layout (shards, split, ranks,
    workers, batch size, shuffle chunk and seed); otherwise the epoch in progress restarts from its start, with a
    warning (positions of other data or another layout would skip or repeat samples). Checkpoints of `output_dir`
    past the restored step are set aside (`set_aside_later_checkpoints`).
    """
    check_compatible(checkpoint, config, plan.effective_batch, accelerator.num_processes,
                     deepspeed_layout(accelerator))
    data_state = _load_training_state(accelerator, model, optimizer, checkpoint, config)
    step = checkpoint.state["step"]
    # accelerate counts micro-steps to find accumulation boundaries, and DeepSpeed's load_state restores the count
    # of the checkpoint's accumulation: the loop continues at micro-step step x accum_steps of this one.
    accelerator.step = step * config["optim"]["accum_steps"]
    _note_changed_settings(checkpoint, config, plan, log)
    if LOG_WINDOW_KEY in checkpoint.state:  # absent from checkpoints of earlier versions: the window starts empty
        window.restore_loss_totals(checkpoint.state[LOG_WINDOW_KEY], accelerator.is_main_process)
    accelerator.wait_for_everyone()  # every rank has read its checkpoint before any directory moves
    if accelerator.is_main_process:
        set_aside_later_checkpoints(output_dir, step, log)
    changes = _layout_changes(checkpoint.state, config, accelerator.num_processes)
    if data_state is not None and not changes:
        return step, StreamState.from_dict(data_state)
    epoch, into_epoch = _epoch_to_restart(checkpoint, step * config["optim"]["accum_steps"], plan.batches_per_epoch)
    if into_epoch and step < plan.stop_step:  # at an epoch's start nothing is lost; past the end nothing is read
        why = (f"{'; '.join(changes)}: the data position does not carry over to other data or another layout "
               f"(continuing would skip some samples of epoch {epoch})" if changes
               else f"{checkpoint.path} holds no data position")
        log(f"warning: {why}, so epoch {epoch} restarts from its start and the samples it had seen are seen again")
    skipped = _skipped_carried_over(checkpoint.path, accelerator.process_index, accelerator.num_processes)
    return step, StreamState(epoch=epoch, skipped=skipped)


def _epoch_to_restart(checkpoint: Checkpoint, batches_done: int, batches_per_epoch: int) -> tuple[int, bool]:
    """The epoch a position that does not carry over restarts at, and whether that epoch was under way: the saved
    position's epoch, the next one if it had read all of it (rank 0's, which every rank reads: a new rank has no
    file of its own); without a position, the one the step count falls in under this layout."""
    saved = checkpoint.path / "data_rank0.json"
    if not saved.exists():
        epoch, into_epoch = divmod(batches_done, batches_per_epoch)
        return epoch, into_epoch > 0
    position = json.loads(saved.read_text())
    finished = position["batches"] >= checkpoint.state.get("plan", {}).get("batches_per_epoch", math.inf)
    return position["epoch"] + finished, not finished and position["batches"] > 0


def _skipped_carried_over(path: Path, rank: int, world_size: int) -> int:
    """The skipped-sample counts of the checkpoint's ranks that fall to `rank` under `world_size` ranks (saved rank
    k goes to k mod world_size), so the run's total carries over to another number of processes."""
    counts = {int(file.stem.removeprefix("data_rank")): json.loads(file.read_text()).get("skipped", 0)
              for file in path.glob("data_rank*.json")}
    return sum(count for saved_rank, count in counts.items() if saved_rank % world_size == rank)


def _note_changed_settings(checkpoint: Checkpoint, config: dict, plan: Plan, log) -> None:
    """Say what the resumed run does differently from the checkpoint's: its stop step, LR schedule or model
    settings (those that change weight shapes cannot load, so they never get here)."""
    name, saved_config = checkpoint.path.name, checkpoint.state.get("config", {})
    if checkpoint.state["step"] >= plan.stop_step:
        log(f"note: {name} is at or past this run's last step {plan.stop_step} (run.max_steps, schedule.epochs): "
            "nothing is left to train")
    lr_changes = (_config_changes(saved_config, config, LR_KEYS)
                  + _config_changes(checkpoint.state.get("plan", {}), plan.__dict__, LR_PLAN_KEYS))
    if lr_changes:
        log(f"note: {'; '.join(lr_changes)} since {name}: the LR follows the schedule of the new settings from this "
            "step on, so it may jump")
    optim_changes = _config_changes(saved_config, config, OPTIM_KEYS)
    if optim_changes:
        log(f"note: {'; '.join(optim_changes)} since {name}: the new settings apply from this step on")
    model_changes = _model_changes(saved_config, config)
    if model_changes:
        log(f"note: {'; '.join(model_changes)} since {name}: training goes on under the new setting from this step "
            "on, so the loss may jump")


LR_KEYS = (("optim", "base_lr"), ("optim", "min_lr"), ("schedule", "epochs"), ("schedule", "warmup_epochs"))
"""Config keys that, with the effective batch, decide the LR of every step."""

OPTIM_KEYS = tuple(("optim", key) for key in ("weight_decay", "betas", "layer_decay", "momentum", "trust_coeff",
                                              "ema_decay"))
"""Optimizer settings that a resumed run takes from its config, not the checkpoint: those held in the parameter
groups (`this_runs_settings`), and the EMA decay (null drops the EMA)."""

LR_PLAN_KEYS = (("steps_per_epoch",), ("total_steps",), ("warmup_steps",))
"""The plan's step counts, which the data layout changes too (every worker gets the same whole batches)."""

LAYOUT_KEYS = (("data", "train"), ("data", "split"), ("data", "info"), ("data", "batch_size"), ("data", "num_workers"),
               ("data", "shuffle_chunk"), ("seed",))
"""Config keys that, with the number of ranks, decide which sample each stream position holds: the data and its
layout."""


def _layout_changes(state: dict, config: dict, world_size: int) -> list[str]:
    """What changed in the data or its layout since the checkpoint: ranks, and `LAYOUT_KEYS`."""
    ranks = [f"{counted(state.get('world_size'), 'process')} -> {world_size}"] if (
        state.get("world_size") != world_size) else []
    return ranks + _config_changes(state.get("config", {}), config, LAYOUT_KEYS)


def _model_changes(saved_config: dict, config: dict) -> list[str]:
    return _config_changes(saved_config, config, [("model", key) for key in saved_config.get("model", {})])


def _config_changes(saved_config: dict, config: dict, paths) -> list[str]:
    """'data.num_workers 2 -> 1' for each key path whose value differs from the saved config's (when it has the key:
    checkpoints of earlier versions may lack newer keys). A null counts as a value: decoder_dim null -> 16."""
    changes = []
    for path in paths:
        before, now = _lookup(saved_config, path, ABSENT), _lookup(config, path)
        if before is not ABSENT and before != now:
            changes.append(f"{'.'.join(path)} {before} -> {now}")
    return changes


ABSENT = object()
"""`_lookup`'s answer for a key the config lacks, when told to tell it from a null."""


def _lookup(config: dict, path: tuple[str, ...], missing=None):
    for key in path:
        if not isinstance(config, dict) or key not in config:
            return missing
        config = config[key]
    return config


def set_aside_later_checkpoints(output_dir: str | Path, step: int, log=print) -> None:
    """Move the checkpoints past `step` and a `best/` written after it to `superseded/<time>/`, and the later
    reconstruction grids to its `recon/`.

    Resuming from an earlier checkpoint (chosen by `run.resume`, or because the later ones could not be read) starts
    another continuation of the run. Left in `checkpoints/`, the later ones would be kept by the rotation, which
    keeps the highest steps, in place of this continuation's, and `run.resume=auto` would jump back to them; a later
    `best/` would hold weights this continuation never had.
    """
    later = [path for path in find_checkpoints(output_dir) if step_of(path) > step]
    if (best := best_weights_step(output_dir)) is not None and best > step:
        later.append(Path(output_dir) / "best")
    if later:
        target = _move_to_superseded(output_dir, later)
        grids = [path for path in (Path(output_dir) / "recon").glob("step_*.png") if step_of(path) > step]
        if grids:
            (target / "recon").mkdir()
            for grid in grids:
                os.replace(grid, target / "recon" / grid.name)
        _copy_later_metrics(Path(output_dir) / "metrics.jsonl", step, target / "metrics.jsonl")
        log(f"warning: this run continues from step {step}; moved what later steps wrote ("
            f"{', '.join(path.name for path in later)}), with their reconstruction grids and metrics rows, to {target}")


def best_weights_step(output_dir: str | Path) -> int | None:
    """The step whose weights a fine-tuning run's `best/` holds; None without a readable `best/`."""
    try:
        return json.loads((Path(output_dir) / "best" / STATE_FILE).read_text())["step"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _copy_later_metrics(metrics: Path, step: int, copy: Path) -> None:
    """Keep the rows logged after `step` in `copy`: the run's own file drops them when it continues (MetricsLogger)."""
    if metrics.exists():
        rows = [line for line in metrics.read_text().splitlines() if row_step(line) > step]
        copy.write_text("".join(row + "\n" for row in rows))


def step_of(path: Path) -> int:
    """The step in a checkpoint or reconstruction grid name: step_00000300, step_00000300.png, step_00000300_val.png."""
    return int(path.name.split("_")[1].split(".")[0])


def set_aside_previous_run(output_dir: str | Path, log=print, why: str = "run.resume=none") -> None:
    """Move a run already in `output_dir` (everything but `superseded/`) to `superseded/<time>/`; `why` the new run
    starts afresh.

    A fresh start (`run.resume=none`, or a kNN evaluation) in the same directory would otherwise mix its metrics
    with the old ones, and the rotation, which keeps the highest steps, would delete the new checkpoints while
    `auto` resumed the old run.
    """
    out = Path(output_dir)
    if find_checkpoints(out) or (out / "metrics.jsonl").exists():
        kept = ("superseded", LOCK_NAME)  # the lock stays where the next run looks for it
        target = _move_to_superseded(out, [entry for entry in out.iterdir() if entry.name not in kept])
        log(f"warning: {why}: moved the previous run in {out} to {target}")


def _move_to_superseded(output_dir: str | Path, paths: list[Path]) -> Path:
    """Move `paths` into a new `superseded/<time>[-n]/` folder of the run (two set-asides within a second get their
    own); returns the folder."""
    root, stamp = Path(output_dir) / "superseded", time.strftime("%Y%m%d-%H%M%S")
    target, n = root / stamp, 0
    while target.exists():
        n += 1
        target = root / f"{stamp}-{n}"
    target.mkdir(parents=True)
    for path in paths:
        os.replace(path, target / path.name)
    return target


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict, path: Path) -> None:
    """Load the moments and step counts of `saved` into `optimizer`, keeping this run's settings."""
    with this_runs_settings(optimizer):
        try:
            optimizer.load_state_dict(with_this_runs_kernel(saved, optimizer))
        except ValueError as err:  # another grouping: layer decay switched on or off, parameters frozen or not
            raise ResumeError(f"{path} holds optimizer state for other parameter groups than this recipe's "
                              f"({err}); set optim.layer_decay and what the model trains back to continue it (a "
                              f"pretraining checkpoint from a development build of mae_tnt that did not decay MAE's "
                              f"class and mask tokens cannot continue), or {FRESH}") from None


def with_this_runs_kernel(saved: dict, optimizer: torch.optim.Optimizer) -> dict:
    """`saved` with this optimizer's `fused` and `capturable` flags: torch places each loaded step count by the saved
    groups' flags, and the fused kernel refuses a step count left on the CPU by a checkpoint of the unfused one (a
    CPU run, or optim.fused=false; pytorch#124133)."""
    flags = ("fused", "capturable")
    groups = [{**group, **{flag: built[flag] for flag in flags if flag in built}}
              # not strict: another group count is load_state_dict's error to report
              for group, built in zip(saved["param_groups"], optimizer.param_groups, strict=False)]
    return {**saved, "param_groups": groups + saved["param_groups"][len(groups):]}


@contextmanager
def this_runs_settings(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Give the parameter groups back the settings this run built them with after a checkpoint is loaded into the
    optimizer, which would otherwise take the checkpoint's: weight decay, betas, layer-decay `lr_scale`, LARS momentum
    and trust coefficient (the LR itself is set at every step from the schedule)."""
    built = [{key: value for key, value in group.items() if key != "params"} for group in optimizer.param_groups]
    yield
    for group, settings in zip(optimizer.param_groups, built, strict=True):
        group.update(settings)


def _load_training_state(accelerator, model, optimizer, checkpoint: Checkpoint, config: dict) -> dict | None:
    """Restore weights, optimizer and scaler in place; returns this rank's data state (None if unknown)."""
    path = checkpoint.path
    if (path / "engine").is_dir():  # its pickles were checked by read_checkpoint
        with this_runs_settings(optimizer):
            accelerator.load_state(str(path / "engine"))
    else:
        try:
            bare_model(accelerator, model).load_state_dict(read_state_dict(path / "model.safetensors"))
        except RuntimeError as err:  # another img_size, head, pooling, decoder ... under the same model name
            changes = _model_changes(checkpoint.state.get("config", {}), config)
            first_misfit = str(err).splitlines()[1:2] or [str(err)]  # the line after torch's "Error(s) in loading"
            raise ResumeError(f"{path} holds weights of another shape than this recipe's model "
                              f"({'; '.join(changes) or first_misfit[0].strip()}); {FRESH}") from None
        load_optimizer_state(optimizer, torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True),
                             path)
        if accelerator.scaler is not None and (path / "scaler.pt").exists():
            accelerator.scaler.load_state_dict(torch.load(path / "scaler.pt", weights_only=True))
    data_file = path / f"data_rank{accelerator.process_index}.json"
    return json.loads(data_file.read_text()) if data_file.exists() else None
