"""Command-line front end of `finetune.py`: recipe + dotted overrides (`init=PATH mode=knn ...`), friendly errors."""

from __future__ import annotations

from .cli import load_recipe, quiet_on_ctrl_c, report_preempted, report_user_errors
from .finetune_config import FinetuneConfig
from .progress import is_main_process
from .text import counted


@quiet_on_ctrl_c()
def run_finetune(argv: list[str]) -> int:
    cfg = load_recipe(FinetuneConfig, argv, "finetune.py")
    from .train.finetune import finetune  # heavy imports only once the config is valid

    summary = report_user_errors(lambda: finetune(cfg))
    if summary is None:
        return 1
    if summary.get("preempted"):
        return report_preempted(summary)
    if not is_main_process():
        return 0
    print(summary_line(summary, cfg))
    return 0


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
