"""Exact resume: which checkpoint a run continues from, whether it fits this launch, and restoring it in place.

`run.resume=auto` takes the newest checkpoint whose files all read back; a corrupt one is reported and the previous
one is used (when none reads back, the old run is set aside and a fresh one starts). Checkpoints past the one
resumed from, and a fine-tuning run's `best/` if a later step wrote it, are set aside to `superseded/`, out of the
rotation.

A checkpoint fits when it holds the same model, mode and optimizer, was taken with the same effective batch (steps
count optimizer updates, so the schedule assumes it) and by the same engine and DeepSpeed layout. Its data position
carries over only to the same data and layout; otherwise the epoch in progress restarts. Settings that may change
(LR schedule, optimizer hyper-parameters, model options that keep weight shapes) are reported when they did.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..data.stream import StreamState
from ..models.loading import STATE_FILE, read_state_dict, resolve_checkpoint, step_dirs, unchecked_export_record
from ..text import counted
from .checkpoint import (
    DEEPSPEED_KEY,
    LOG_WINDOW_KEY,
    Checkpoint,
    ResumeError,
    bare_model,
    checkpoint_dir,
    find_checkpoints,
    holds_training_state,
    read_checkpoint,
)
from .launch import deepspeed_layout
from .schedule import Plan
from .superseded import holds_a_knn_evaluation, set_aside_later_checkpoints, set_aside_previous_run

if TYPE_CHECKING:  # loop imports this module
    from .loop import Window

FRESH = "use another run.output_dir, or run.resume=none to start fresh"


def resolve_resume(resume: str, output_dir: str | Path, log=print, is_main: bool = True,
                   check_fresh_start: Callable[[], object] = lambda: None) -> Checkpoint | None:
    """The checkpoint to resume from: `auto` (newest readable one, if any), `none`, or an explicit checkpoint or run
    directory (its newest checkpoint).

    With `none`, and with `auto` when checkpoints exist but none can be read, a run already in `output_dir` is first
    set aside (`set_aside_previous_run`, by the main process), once `check_fresh_start` (on every process: it raises
    what would stop the fresh start, e.g. a wrong init path) has passed.
    """
    if resume == "none":
        check_fresh_start()
        if is_main:
            set_aside_previous_run(output_dir, log)
        return None
    if resume != "auto":
        if not Path(resume).exists():
            kept = find_checkpoints(output_dir)
            listing = (f"this run's are {', '.join(path.name for path in kept)} in {kept[0].parent}: give one's path"
                       if kept else "this run has none yet")
            raise ResumeError(f"run.resume={resume} does not exist; {listing}, run.resume=auto for the newest, or "
                              "run.resume=none to start afresh")
        checkpoint = read_checkpoint(_explicit_checkpoint(resume))
        if is_main and of_another_run(checkpoint, output_dir):  # its metrics and best/ are not this run's past
            set_aside_previous_run(output_dir, log, why=f"run.resume={resume} continues another run")
        return checkpoint
    checkpoints = find_checkpoints(output_dir)
    for path in checkpoints:
        try:
            return read_checkpoint(path)
        except ResumeError as err:
            log(f"warning: skipping unusable checkpoint {path}: {err}; trying the previous one")
    # None could be read. Left in place, they would be the highest steps, which the rotation keeps: it would delete
    # the new checkpoints instead, and the next `auto` would fail on them again.
    check_fresh_start()
    if checkpoints and is_main:
        set_aside_previous_run(output_dir, log, why="no checkpoint of it could be read, so this run starts afresh")
    elif is_main and holds_a_knn_evaluation(output_dir):  # its config.yaml and row would pass for this run's
        set_aside_previous_run(output_dir, log, why=f"{output_dir} holds a kNN evaluation, not a run to continue")
    return None


def of_another_run(checkpoint: Checkpoint, output_dir: str | Path) -> bool:
    """`checkpoint` is not one of `output_dir`'s own (`OUTPUT_DIR/checkpoints/step_*`)."""
    return checkpoint.path.resolve().parent != checkpoint_dir(output_dir).resolve()


def _explicit_checkpoint(resume: str) -> Path:
    """The checkpoint directory that an existing run.resume path stands for (a run directory or its checkpoints
    folder: the newest); a file, weights alone (an export, `best/`), or another folder of checkpoints (a set-aside
    continuation in superseded/), is refused with the path to give instead, rather than read as a checkpoint that
    lacks its state.json or optimizer state."""
    path = resolve_checkpoint(resume)
    if advice := _weights_only(path, resume):
        raise ResumeError(advice)
    if path.is_file():
        raise ResumeError(f"run.resume={resume} is a file; give the checkpoint directory that holds it "
                          f"({path.parent}) or its run directory")
    steps = step_dirs(path)
    if steps and not (path / STATE_FILE).exists():
        raise ResumeError(f"run.resume={resume} is a folder of checkpoints; give one of them (the newest is "
                          f"{steps[-1]})")
    return path


def _weights_only(path: Path, resume: str) -> str | None:
    """Why `path`, weights alone (an export, or a fine-tuning run's `best/`), cannot be resumed from, with what to
    give instead; None for any other path."""
    if not path.is_dir() or holds_training_state(path):
        return None
    if path.name == "best" and (path.parent / "checkpoints").is_dir():
        what = f"the best weights of the fine-tuning run {path.parent}"
        instead = f"run.resume={path.parent} to continue that run from its newest checkpoint"
    elif unchecked_export_record(path) is not None:
        what = "an export (tools/export.py)"
        instead = "the directory of the run it came from, or one of its checkpoints (step_*), to continue that run"
    else:
        return None
    return (f"run.resume={resume} is {what}, weights without the optimizer state and data position a resume needs: "
            f"give {instead}, or init={resume} to fine-tune from these weights in a new run")


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
        pretrained = str(saved).startswith("mae_") and "mode" in config
        init = (f"; to fine-tune from this pretraining checkpoint, start a new run from it: init={checkpoint.path} "
                "with a run.output_dir of its own (and run.resume=auto)" if pretrained else "")
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
        window.restore_loss_totals(checkpoint.state[LOG_WINDOW_KEY], accelerator.process_index,
                                   accelerator.num_processes)
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
    """Say what the resumed run does differently from the checkpoint's: its stop step, LR schedule, model settings
    (those that change weight shapes cannot load, so they never get here) or the preparation of its inputs."""
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
    model_changes = _model_changes(saved_config, config) + _input_changes(saved_config, config)
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


INPUT_KEYS = (("data", "mean"), ("data", "std"), ("data", "crop_scale"))
"""How the images are prepared, besides fine-tuning's `augment` section: the model sees other inputs."""


def _input_changes(saved_config: dict, config: dict) -> list[str]:
    augment = [("augment", key) for key in saved_config.get("augment", {})]
    return _config_changes(saved_config, config, [*INPUT_KEYS, *augment])


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


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict, path: Path) -> None:
    """Load the moments and step counts of `saved` into `optimizer`, keeping this run's settings."""
    with this_runs_settings(optimizer):
        try:
            optimizer.load_state_dict(with_this_runs_kernel(saved, optimizer))
        except ValueError as err:  # another grouping: layer decay switched on or off, parameters frozen or not
            raise ResumeError(f"{path} holds optimizer state for other parameter groups than this recipe's "
                              f"({err}); set optim.layer_decay and what the model trains back to continue it (a "
                              f"pretraining checkpoint from a development build of mae_tnt that did not decay MAE's "
                              f"class and mask tokens, or that decayed TNT's or SReT's position tables, cannot "
                              f"continue), or {FRESH}") from None


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
