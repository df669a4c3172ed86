"""Run outputs people read: a JSONL metrics file, TensorBoard events when installed, and a rank-0 progress bar."""

from __future__ import annotations

import json
from pathlib import Path

from tqdm import tqdm


class MetricsLogger:
    """Writes one JSON line per log step to `metrics.jsonl` and the same scalars to TensorBoard (rank 0 only)."""

    def __init__(self, output_dir: Path, enabled: bool, hparams: dict | None = None):
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        self.path = Path(output_dir) / "metrics.jsonl"
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            print("TensorBoard is not installed (pip install 'mae_tnt[tensorboard]'); writing metrics.jsonl only")
        else:
            self.writer = SummaryWriter(str(Path(output_dir) / "tensorboard"))
            if hparams:
                self.writer.add_text("config", "```\n" + json.dumps(hparams, indent=1) + "\n```")

    def log(self, metrics: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as handle:
            handle.write(json.dumps(metrics) + "\n")
        if self.writer is not None:
            for key, value in metrics.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, metrics["step"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def progress_bar(total: int, initial: int, enabled: bool, desc: str = "pretrain") -> tqdm:
    """Step progress bar; disabled on ranks other than 0."""
    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, unit="step", dynamic_ncols=True)
