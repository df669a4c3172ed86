"""Command-line front end of `finetune.py`: recipe + dotted overrides (`init=PATH mode=knn ...`), friendly errors."""

from __future__ import annotations

from .cli import quiet_on_ctrl_c, run_recipe
from .finetune_config import FinetuneConfig
from .text import counted


@quiet_on_ctrl_c()
def run_finetune(argv: list[str]) -> int:
    return run_recipe(FinetuneConfig, argv, "finetune.py", _finetune, summary_line)


def _finetune(cfg: FinetuneConfig) -> dict:
    from .train.finetune import finetune  # heavy imports only once the config is valid

    return finetune(cfg)


def summary_line(summary: dict, cfg: FinetuneConfig) -> str:
    """The closing line of a run: the kNN accuracy, or the best validation accuracy and where the outputs are."""
    if cfg.mode == "knn":
        from .train.knn import topk_text

        return f"done: kNN {topk_text(summary, 'knn_top')}"
    best, outputs = summary["best"], f"outputs in {summary['output_dir']}"
    if "weights" not in best:
        why = "data.val is null" if cfg.data.val is None else "validation runs at the end of each epoch"
        return f"done: {counted(summary['steps'], 'step')}, not validated yet ({why}); {outputs}/checkpoints"
    return (f"done: {counted(summary['steps'], 'step')}; best val top-1 {best['val_acc1']:.2f} ({best['weights']} "
            f"weights, epoch {best['epoch']:g}); {outputs}")
