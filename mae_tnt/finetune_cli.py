"""Command-line front end of `finetune.py`: recipe + dotted overrides (`init=PATH mode=knn ...`), friendly errors."""

from __future__ import annotations

from .cli import is_main_process, load_recipe, report_preempted, report_user_errors
from .finetune_config import FinetuneConfig


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
    if cfg.mode == "knn":
        print(f"done: kNN top-1 {summary['knn_top1']:.2f}, top-5 {summary['knn_top5']:.2f}")
    else:
        best = summary["best"]
        print(f"done: {summary['steps']} steps; best val top-1 {best['val_acc1']:.2f} ({best.get('weights', '-')} "
              f"weights, epoch {best.get('epoch', '-')}); outputs in {summary['output_dir']}")
    return 0
