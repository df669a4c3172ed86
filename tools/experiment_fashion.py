"""Proof on real data: MAE pretraining vs random initialisation, and TNT vs ViT, on the full Fashion-MNIST.

    python tools/experiment_fashion.py                      # full experiment (8-20 min on 2 CPU cores)
    python tools/experiment_fashion.py demo runs/demo_mae_vit   # `make demo` tail: MAE demo checkpoint vs random init

The full experiment converts Fashion-MNIST (60,000 train / 10,000 test images) to shards if needed, pretrains the
two 32.6 k-parameter test encoders (ViT and TNT, 8-px patches at 32 px) with MAE for a few epochs, then gives every
(encoder, init) pair the same downstream budget: weighted kNN, a linear probe and a fine-tune. Every stage runs
through the same entry points users run (`pretrain.py`, `finetune.py`), each in its own process, with the demo
recipes plus overrides. The markdown table is written to OUT/results.md.

References: docs/experiment_fashion.md (measured results); recipes/demo_*.yaml (the settings overridden here).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "data" / "fashion_mnist"
"""The Fashion-MNIST sample in the repository, which the demo comparison reads by default."""
sys.path.insert(0, str(ROOT))  # works from a checkout without installing
from mae_tnt.text import HelpWithDefaults  # noqa: E402
from mae_tnt.train.checkpoint import find_checkpoints  # noqa: E402

IDX_SOURCE = "/usr/share/datasets/fashion-mnist"
CLASSES = "T-shirt/top,Trouser,Pullover,Dress,Coat,Sandal,Shirt,Sneaker,Bag,Ankle boot"
ENCODERS = {"ViT": ("mae_vit_test", "vit_test_patch8_32"), "TNT": ("mae_tnt_test", "tnt_test_patch8_32")}
DOWNSTREAM = {"knn": ("kNN", "knn_top1"), "linprobe": ("linear probe", "val_acc1"),
              "finetune": ("fine-tune", "val_acc1")}
"""The downstream runs of the experiment and the demo, in table order: mode -> (column name, metric read at its end)."""


@dataclass
class Budget:
    """Epochs and batch sizes shared by every arm, so the comparison is at equal cost."""

    pretrain_epochs: float = 4.0
    finetune_epochs: float = 1.5
    linprobe_epochs: float = 1.0
    knn_bank: int = 20_000
    """Train images in the kNN feature bank (decoding all 60,000 costs about a minute per run on 2 cores)."""
    batch_size: int = 128
    workers: int = 1
    threads: int = 1
    """Torch threads per process: tiny models run faster on one, and much faster on a shared CPU."""


@dataclass
class Arm:
    encoder: str
    init: str
    results: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)


def ensure_shards(out: Path, source: str = IDX_SOURCE) -> None:
    """Convert the IDX files to `out` (train = 60,000, val = the 10,000 test images) unless already there."""
    info = out / "_info.json"
    done = json.loads(info.read_text()).get("splits", {}) if info.exists() else {}
    for split in ("train", "val"):
        if split not in done:
            print(f"converting Fashion-MNIST {split} to {out}", flush=True)
            subprocess.run([sys.executable, str(ROOT / "tools" / "make_shards.py"), source, str(out), "--split", split,
                            "--shard-size", "5000", "--seed", "0", "--classes", CLASSES], check=True)


class StageError(RuntimeError):
    """A stage's run failed; the message ends with its last output lines."""


def run_stage(script: str, recipe: str, overrides: list[str], out: Path, threads: int, resume: str = "none") -> float:
    """Run one entry point in its own process, its output in OUT/log.txt; returns the wall time in seconds."""
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, str(ROOT / script), str(ROOT / "recipes" / recipe), f"run.output_dir={out}",
               f"run.resume={resume}", *overrides]
    start = time.perf_counter()
    with open(out / "log.txt", "a") as log:
        result = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    if result.returncode:
        last = (out / "log.txt").read_text().strip().splitlines()[-3:]
        raise StageError(f"{' '.join(command)} failed, ending with:\n  " + "\n  ".join(last)
                         + f"\nthe whole output is in {out / 'log.txt'}")
    return time.perf_counter() - start


def metric_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def last_value(out: Path, key: str) -> float:
    """The last logged value of `key` in OUT/metrics.jsonl."""
    return [row[key] for row in metric_rows(out) if key in row][-1]


def data_overrides(data: Path, budget: Budget, batch_size: int | None = None) -> list[str]:
    return [f"data.train={data}", f"data.val={data}", f"data.batch_size={batch_size or budget.batch_size}",
            f"data.num_workers={budget.workers}"]


def schedule(epochs: float) -> list[str]:
    """A short run warms up over its first tenth (the demo recipes' one epoch would be most of it)."""
    return [f"schedule.epochs={epochs}", f"schedule.warmup_epochs={epochs / 10:g}", "run.log_every=50",
            "run.checkpoint_every=1000000"]


def pretrain(encoder: str, data: Path, out: Path, budget: Budget) -> tuple[Path, float, float]:
    """MAE-pretrain one encoder; returns its final checkpoint, final loss and wall time.

    An interrupted or finished pretraining in `out` is resumed (a finished one returns at once), so a rerun of the
    experiment only redoes the downstream stages.
    """
    mae_name = ENCODERS[encoder][0]
    seconds = run_stage("pretrain.py", "demo_mae_vit.yaml", [
        f"model.name={mae_name}", *data_overrides(data, budget), f"schedule.epochs={budget.pretrain_epochs}",
        f"schedule.warmup_epochs={min(0.5, budget.pretrain_epochs / 8):g}",
        "run.checkpoint_every=200", "run.log_every=50", "run.recon_every=0",
    ], out, budget.threads, resume="auto")
    return find_checkpoints(out)[0], last_value(out, "loss"), seconds


def downstream(arm: Arm, init: Path | None, data: Path, out: Path, budget: Budget) -> None:
    """kNN, linear probe and fine-tune of one (encoder, init) pair, all recorded in `arm`."""
    common = [f"model.name={ENCODERS[arm.encoder][1]}", f"init={init if init else 'null'}"]
    stages = {
        "knn": ("demo_knn_vit.yaml", [*data_overrides(data, budget, 500), f"knn.max_train={budget.knn_bank}"]),
        "linprobe": ("demo_linprobe_vit.yaml", [*data_overrides(data, budget), "optim.base_lr=50",
                                                *schedule(budget.linprobe_epochs)]),
        "finetune": ("demo_finetune_vit.yaml", [*data_overrides(data, budget), "optim.base_lr=1e-2",
                                                *schedule(budget.finetune_epochs)]),
    }
    for mode, (recipe, overrides) in stages.items():
        stage_out = out / f"{arm.encoder.lower()}_{arm.init}_{mode}"
        arm.seconds[mode] = run_stage("finetune.py", recipe, [*common, *overrides], stage_out, budget.threads)
        arm.results[mode] = last_value(stage_out, DOWNSTREAM[mode][1])
        print(f"  {arm.encoder} {arm.init} {mode}: top-1 {arm.results[mode]:.2f} ({arm.seconds[mode]:.0f} s)",
              flush=True)


def accuracy_columns() -> str:
    """The table's accuracy headers, one per downstream mode: `kNN top-1 | linear probe top-1 | fine-tune top-1`."""
    return " | ".join(f"{name} top-1" for name, _ in DOWNSTREAM.values())


def results_table(arms: list[Arm], pretraining: dict[str, tuple[float, float]]) -> str:
    """Markdown table: one row per (encoder, init), accuracies in percent on the 10,000 test images."""
    lines = [f"| encoder (32.6 k params) | init | {accuracy_columns()} | pretrain loss / time | downstream time |",
             "|---" * (len(DOWNSTREAM) + 4) + "|"]
    for arm in arms:
        loss, seconds = pretraining.get(arm.encoder, (None, None)) if arm.init == "mae" else (None, None)
        pre = f"{loss:.3f} / {seconds / 60:.1f} min" if loss is not None else "-"
        accuracies = " | ".join(f"{arm.results[mode]:.2f}" for mode in DOWNSTREAM)
        lines.append(f"| {arm.encoder} | {'MAE' if arm.init == 'mae' else 'random'} | {accuracies} | {pre} | "
                     f"{sum(arm.seconds.values()) / 60:.1f} min |")
    return "\n".join(lines)


def experiment(out: Path, budget: Budget, shards: Path | None = None) -> str:
    """The full comparison; returns the markdown table (also written to OUT/results.md).

    Args:
        shards: where the converted Fashion-MNIST lives or is written (default OUT/shards).
    """
    start, out = time.perf_counter(), out.resolve()
    data = (shards or out / "shards").resolve()
    ensure_shards(data)
    arms, pretraining = [], {}
    for encoder in ENCODERS:
        checkpoint, loss, seconds = pretrain(encoder, data, out / f"{encoder.lower()}_pretrain", budget)
        pretraining[encoder] = (loss, seconds)
        print(f"{encoder}: MAE pretraining loss {loss:.3f} in {seconds / 60:.1f} min", flush=True)
        for init, path in (("mae", checkpoint), ("random", None)):
            arms.append(Arm(encoder, init))
            downstream(arms[-1], path, data, out, budget)
    table = results_table(arms, pretraining)
    footer = (f"\nBudget: {budget}. Total wall time {(time.perf_counter() - start) / 60:.1f} min; "
              "accuracies in percent on the 10,000 Fashion-MNIST test images (fine-tune and probe: last epoch).")
    (out / "results.md").write_text(table + "\n" + footer + "\n")
    return table + "\n" + footer


def demo_compare(pretrain_checkpoint: str | Path, data_dir: str | Path = BUNDLED,
                 out: str | Path = "runs/demo_compare", threads: int = 1) -> str:
    """kNN, linear-probe and fine-tune the demo MAE checkpoint next to the same runs from random init (about 2 min
    on CPU).

    Args:
        pretrain_checkpoint: a checkpoint directory, or a run directory (its newest checkpoint is used).
        data_dir: labeled shards with train and val splits (the bundled sample by default).
    Returns:
        A markdown table of val top-1 accuracies, and where the runs are; both are also written to OUT/results.md.
    """
    checkpoint, data_dir, out = (Path(p).resolve() for p in (pretrain_checkpoint, data_dir, out))
    if (checkpoint / "checkpoints").is_dir():
        checkpoint = find_checkpoints(checkpoint)[0]
    rows = [f"| init | {accuracy_columns()} |", "|---" * (len(DOWNSTREAM) + 1) + "|"]
    runs = []
    for label, init in (("MAE demo checkpoint", checkpoint), ("random", None)):
        accuracy = []
        for mode, (_, metric) in DOWNSTREAM.items():
            stage_out = out / f"{'mae' if init else 'random'}_{mode}"
            run_stage("finetune.py", f"demo_{mode}_vit.yaml",
                      [f"init={init or 'null'}", f"data.train={data_dir}", f"data.val={data_dir}"], stage_out, threads)
            accuracy.append(f"{last_value(stage_out, metric):.2f}")
            runs.append(stage_out.name)
        rows.append(f"| {label} | " + " | ".join(accuracy) + " |")
    text = "\n".join(rows) + (f"\n\nRuns in {out}: {', '.join(runs)} (metrics.jsonl, config.yaml); this table is in "
                              "results.md there.")
    (out / "results.md").write_text(text + "\n")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpWithDefaults)
    parser.add_argument("command", nargs="?", default="experiment", choices=("experiment", "demo"),
                        help="experiment (the default): the full comparison; demo: downstream runs of one pretraining")
    parser.add_argument("checkpoint", nargs="?", help="demo: pretraining run or checkpoint directory")
    parser.add_argument("--out", type=Path, default=None,
                        help="output directory (experiment: runs/experiment_fashion; demo: runs/demo_compare)")
    parser.add_argument("--data", default=None, help="labeled shards: demo default the bundled data/fashion_mnist; "
                        "experiment default OUT/shards (converted from the IDX files when missing)")
    defaults = Budget()
    for name, value in defaults.__dict__.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value,
                            help="torch threads per run" if name == "threads" else
                            "experiment only (demo runs the demo recipes)")
    args = parser.parse_args(argv)
    if args.command == "experiment" and args.checkpoint is not None:
        parser.error(f"experiment pretrains its own encoders and takes no checkpoint; for the downstream runs of "
                     f"{args.checkpoint}, run: demo {args.checkpoint}")
    if args.command == "demo":
        check_demo_arguments(parser, args, defaults)
    try:
        if args.command == "demo":
            print(demo_compare(args.checkpoint, args.data or BUNDLED, args.out or "runs/demo_compare", args.threads))
        else:
            budget = Budget(**{name: getattr(args, name) for name in defaults.__dict__})
            print(experiment(args.out or ROOT / "runs" / "experiment_fashion", budget, args.data and Path(args.data)))
    except StageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def check_demo_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace, defaults: Budget) -> None:
    """Usage errors for `demo`: its checkpoint is needed and must exist, and the experiment's budget flags would be
    ignored."""
    if args.checkpoint is None:
        parser.error("demo needs the pretraining run or checkpoint directory")
    ignored = [f"--{name.replace('_', '-')}" for name, value in defaults.__dict__.items()
               if name != "threads" and getattr(args, name) != value]
    if ignored:
        parser.error(f"demo runs the demo recipes as they are and takes only --out, --data and --threads, not "
                     f"{', '.join(ignored)} (for the experiment)")
    run = Path(args.checkpoint)
    if not run.exists():
        parser.error(f"{args.checkpoint} does not exist: give a pretraining run or checkpoint directory (make demo "
                     "writes runs/demo_mae_vit)")
    if (run / "checkpoints").is_dir() and not find_checkpoints(run):
        parser.error(f"{args.checkpoint} has no checkpoint yet: let its pretraining run to its first one, or give "
                     "a checkpoint directory")
    if args.data is not None and not Path(args.data).exists():
        parser.error(f"--data {args.data} does not exist: give labeled shards with train and val splits")


if __name__ == "__main__":
    sys.exit(main())
