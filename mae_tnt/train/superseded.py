"""Setting aside what a run no longer continues from: output of a previous run in the same directory, or of the
steps past the checkpoint a run resumes from, is moved to `superseded/<time>/` rather than deleted or mixed in."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import yaml

from ..models.loading import STATE_FILE
from .checkpoint import find_checkpoints
from .metrics import row_step
from .run_lock import LOCK_NAME


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
        grids_too = " reconstruction grids and" if grids else ""
        log(f"warning: this run continues from step {step}; moved what later steps wrote ("
            f"{', '.join(path.name for path in later)}), with their{grids_too} metrics rows, to {target}")


def holds_a_knn_evaluation(output_dir: str | Path) -> bool:
    """`output_dir` holds what `finetune.run_knn` writes: a config.yaml of mode knn (and one metrics row)."""
    try:
        return yaml.safe_load((Path(output_dir) / "config.yaml").read_text()).get("mode") == "knn"
    except (OSError, yaml.YAMLError, AttributeError):  # no file, not YAML, not a mapping
        return False


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
