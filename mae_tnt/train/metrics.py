"""Run outputs people read: a JSONL metrics file, TensorBoard events when installed, and a rank-0 progress bar."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

from tqdm import tqdm

from ..atomic import atomic_file
from ..progress import progress_bar, write_line

NOT_PLOTTED = ("step", "knn_train", "knn_val", "knn_k")
"""Row fields that describe a row (its step, an evaluation's sizes) rather than a curve worth plotting."""


class MetricsLogger:
    """Writes one JSON line per log step to `metrics.jsonl` and its scalars to TensorBoard (rank 0 only).

    Use it as a `with` block: the TensorBoard writer is a thread, closed at the end of the block, errors included.
    """

    def __init__(self, output_dir: Path, enabled: bool, hparams: dict | None = None, resume_step: int = 0,
                 resume_rows: int | None = None):
        """`resume_step` and `resume_rows`: the step of the checkpoint a run continues from and the rows the file
        held when it was written (`rows`; None for checkpoints that did not record it)."""
        self.enabled = enabled
        self.writer = None
        self.rows = 0
        """Lines in metrics.jsonl (rank 0), which a checkpoint records."""
        # The keys plotted at the last step: an evaluation row repeats the epoch its log step's row plotted.
        self.plotted: tuple[int, set[str]] = (-1, set())
        if not enabled:
            return
        self.path = Path(output_dir) / "metrics.jsonl"
        self._truncate_after(resume_step, resume_rows)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            print("TensorBoard is not installed (pip install 'mae_tnt[tensorboard]'); writing metrics.jsonl only")
        else:
            # Hides events past the checkpoint a resumed run continues from, as _truncate_after does for the JSONL;
            # from step 1 when there is none (a run killed before its first checkpoint, started again).
            self.writer = SummaryWriter(str(Path(output_dir) / "tensorboard"), purge_step=resume_step + 1)
            if hparams:  # at the step it starts from: a resumed run's settings may differ
                self.writer.add_text("config", "```\n" + json.dumps(hparams, indent=1) + "\n```", resume_step)

    def _truncate_after(self, step: int, rows: int | None) -> None:
        """Drop lines logged after the checkpoint being resumed (a killed run may have logged past it, or left
        a half-written line), so the file reads as one uninterrupted run.

        Lines of the checkpoint's own step can follow it too: an epoch that ends inside an accumulation is validated
        at the step before, and the resumed run validates it again. Only the first `rows` are the checkpoint's.
        """
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if 0 <= row_step(line) <= step][:rows]
        self.rows = len(kept)
        with atomic_file(self.path) as tmp:
            tmp.write_text("".join(line + "\n" for line in kept))

    def log(self, metrics: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as handle:
            handle.write(json.dumps(metrics) + "\n")
        self.rows += 1
        if self.writer is not None:
            step = metrics["step"]
            if self.plotted[0] != step:
                self.plotted = (step, set())
            for key, value in metrics.items():
                if key not in NOT_PLOTTED and isinstance(value, (int, float)) and key not in self.plotted[1]:
                    self.plotted[1].add(key)
                    self.writer.add_scalar(key, value, step)
            self.writer.flush()

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc_info) -> None:
        if self.writer is not None:
            self.writer.close()


def row_step(line: str) -> int:
    """The step of a `metrics.jsonl` line; -1 for a half-written line (a killed run's last)."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError):
        return -1


def main_process_lines(is_main: bool) -> Callable[[str], None]:
    """`write_line` on the main process, nothing on the others: every rank would print the same line."""
    return write_line if is_main else lambda message: None


def batch_progress(batches: Iterable, total: int, desc: str, enabled: bool) -> tqdm:
    """A bar over evaluation batches that clears when done (rank 0 only): a large val set or kNN bank takes
    minutes to encode."""
    return progress_bar(batches, nested=True, total=total, desc=desc, unit="batch", disable=not enabled)


def step_progress(total: int, initial: int, enabled: bool, desc: str = "pretrain") -> tqdm:
    """Step progress bar; disabled on ranks other than 0 and when no step is left. Use it in a `with` block: closed on
    errors too, an error message then starts a line of its own."""
    return progress_bar(total=total, initial=initial, disable=not enabled or initial >= total, desc=desc, unit="step")
