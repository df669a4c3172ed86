"""Pieces shared by the pretraining and fine-tuning loops: the per-micro-step seeding, the run's config.yaml, the
per-batch bookkeeping of a run, device-side log windows, data-wait timing, the non-finite loss guard and SIGTERM
handling that all ranks agree on."""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from ..config import save_config, to_dict
from ..ctrl_c import raise_if_pending
from ..data.transforms import normalize
from ..text import counted
from .checkpoint import METRICS_ROWS_KEY, find_checkpoints
from .launch import training_precision, uses_deepspeed
from .metrics import MetricsLogger
from .resume import restore_training
from .schedule import lr_at, set_lr


def seed_step(seed: int, rank: int, micro_step: int) -> None:
    """All torch randomness of a micro-step, as a pure function of its coordinates.

    The coordinates are hashed (NumPy's SeedSequence): a linear mix such as seed * a + rank * b + step gives one
    rank, some thousand steps on, the masks another rank drew earlier.
    """
    [hashed] = np.random.SeedSequence([seed, rank, micro_step]).generate_state(1, np.uint64)
    torch.manual_seed(int(hashed) >> 1)  # below 2**63, as manual_seed needs


def write_run_config(cfg, out: Path, is_main: bool, left_to_train: bool = True) -> None:
    """The run's config.yaml, written once a resume has been accepted: a refused one leaves the directory as it was,
    and so does one with nothing `left_to_train`, whose settings no checkpoint was trained with."""
    if is_main and left_to_train:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stops without overwriting good checkpoints."""


class Window:
    """Device-side sums between log steps, so the hot path never waits for the device."""

    def __init__(self, device: torch.device):
        self.device = device
        self.first_bad = torch.tensor(-1, device=device)
        self.reset()

    def reset(self) -> None:
        self.loss_sum = torch.zeros((), device=self.device)
        self.count = torch.zeros((), device=self.device)
        self.restart_clock()

    def restart_clock(self) -> None:
        """Rates count from here: when training starts, not when the trainer (and this window) was built."""
        self.images, self.data_time, self.start = 0, 0.0, time.perf_counter()

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Leave the time spent inside out of the window's rates: img/s and data_wait measure training, not the
        checkpoints, reconstruction grids and evaluations that happen between steps."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.start += time.perf_counter() - start

    def add(self, loss: torch.Tensor, images: int, micro: int) -> None:
        """Add the loss of micro-step `micro` (0-based); remember the first non-finite one."""
        finite = torch.isfinite(loss)
        self.loss_sum += torch.where(finite, loss.float(), 0.0)
        self.count += 1
        newly_bad = (~finite) & (self.first_bad < 0)
        # a Python scalar, not a new device tensor, whose blocking copy would make every micro-step wait for the GPU
        self.first_bad = torch.where(newly_bad, micro, self.first_bad)
        self.images += images

    def loss_totals(self, accelerator) -> dict:
        """Every rank's loss sum and count of the open window (a collective: every rank calls it).

        A checkpoint keeps them, so the first log row after a resume off a log step averages the same micro-steps
        as in the uninterrupted run, not only those after the resume, and sums them in the same order.
        """
        totals = accelerator.gather(torch.stack([self.loss_sum, self.count])[None])  # [processes, 2]
        return {"loss_sums": totals[:, 0].tolist(), "counts": [int(count) for count in totals[:, 1].tolist()]}

    def restore_loss_totals(self, totals: dict, rank: int, world_size: int) -> None:
        """Reopen a checkpoint's window: each rank its own sums. From another number of processes (or a checkpoint
        of an earlier version, which kept only the total) rank 0 takes the total, as `close_window` sums the ranks."""
        sums, counts = totals.get("loss_sums", [totals.get("loss_sum")]), totals.get("counts", [totals.get("count")])
        if len(sums) == world_size:
            own_sum, own_count = sums[rank], counts[rank]
        else:
            own_sum, own_count = (sum(sums), sum(counts)) if rank == 0 else (0.0, 0)
        self.loss_sum.fill_(own_sum)
        self.count.fill_(own_count)


@contextmanager
def timed(batches: Iterable, window: Window) -> Iterator[Iterator]:
    """The batches, adding the time spent waiting for each to `window.data_time`; the loader's workers stop when
    the block ends, however it ends.

    Left to interpreter exit, torch skips that, and multiprocessing then waits forever for workers that ignore its
    SIGTERM (`loader._ignore_stop_signals`). A context rather than a generator's `finally`: a generator left by
    `break` is closed when it is collected, where a Ctrl-C during the shutdown is printed as "Exception ignored" and
    lost.
    """
    iterator = iter(batches)
    try:
        yield _waited_for(iterator, window)
    finally:
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


def _waited_for(iterator: Iterator, window: Window) -> Iterator:
    while True:
        raise_if_pending()  # a Ctrl-C held back while the loader started, or dropped in a finalizer
        start = time.perf_counter()
        batch = next(iterator, None)
        window.data_time += time.perf_counter() - start
        if batch is None:
            return
        yield batch


def close_window(accelerator, window: Window, bar, step: int, epoch: float, lr: float, skipped: int,
                 keep_loss: bool = False) -> dict:
    """The log line of a window (mean loss over all ranks, lr, img/s, data-wait fraction, and the running total of
    samples skipped as unreadable, summed over the ranks' own totals `skipped`); shows it and resets, the loss sums
    excepted with `keep_loss`."""
    # One all-reduce and one device sync for the three sums (the skip count is exact in float32 below 2**24).
    totals = torch.stack([window.loss_sum, window.count, window.loss_sum.new_tensor(skipped)])  # [3]
    loss_sum, count, all_skipped = accelerator.reduce(totals, "sum").tolist()
    loss = loss_sum / max(1, count)
    elapsed = time.perf_counter() - window.start
    metrics = {"step": step, "epoch": round(epoch, 4), "loss": loss, "lr": lr,
               "img_per_s": window.images * accelerator.num_processes / elapsed,
               "data_wait": window.data_time / elapsed, "skipped_samples": int(all_skipped)}
    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{metrics['img_per_s']:.0f}")
    if keep_loss:
        window.restart_clock()
    else:
        window.reset()
    return metrics


ALL_FINITE = -(2**62)
"""`raise_if_nonfinite`'s value for a rank whose losses are all finite: below any negated micro-step."""


def raise_if_nonfinite(accelerator, window: Window, out: Path, accum_steps: int) -> None:
    """Stop every rank when any saw a non-finite loss since the start; checkpoints stay untouched."""
    # The earliest rank's first bad micro-step, as the largest of the negated ones (ALL_FINITE from ranks without one).
    negated = torch.where(window.first_bad >= 0, -window.first_bad, ALL_FINITE)
    earliest = int(accelerator.reduce(negated, "max").item())
    if earliest == ALL_FINITE:
        return
    bad = -earliest
    # DeepSpeed's optimizer shards resume only in the precision they were written in
    half = accelerator.mixed_precision != "no" and not uses_deepspeed(accelerator)
    kept = find_checkpoints(out)
    then = (f"The last good checkpoint, {kept[0]}, is intact: the same command resumes from it" if kept else
            "No checkpoint was written yet: the same command starts afresh")
    raise NonFiniteLossError(
        f"non-finite loss at micro-step {bad} (optimizer step {bad // accum_steps + 1}); stopping without saving. "
        f"Try a lower optim.base_lr, optim.grad_clip=1.0{' or run.precision=fp32' if half else ''}. {then}."
    )


class TrainingRun:
    """The bookkeeping that pretraining and fine-tuning share around their own `micro_step`: the LR of a step,
    counting micro-batches and optimizer steps, the epoch boundary, the log window and restoring a checkpoint.

    A subclass sets `cfg`, `acc`, `is_main`, `plan`, `stream`, `window`, `out`, `model`, `optimizer`, `log` and
    `step`, opens `logger` (`open_metrics`), and defines `micro_step(batch, micro) -> loss`.
    """

    resumed_rows: int | None = None
    """metrics.jsonl's line count when the restored checkpoint was written (None: fresh, or not recorded)."""

    @property
    def memory_format(self) -> torch.memory_format:
        """channels_last when asked for on a GPU (where convolutions gain from it), the default layout otherwise.

        Never under DeepSpeed: its engine broadcasts and flattens every parameter as raw bytes, which needs a unit
        last stride, and a channels-last [D, 3, k, k] convolution weight has stride 3 there.
        """
        wanted = self.cfg.run.channels_last and self.acc.device.type == "cuda"
        return torch.channels_last if wanted and not uses_deepspeed(self.acc) else torch.contiguous_format

    def plan_line(self, optimizer_note: str = "") -> str:
        """How the batch, the LR and the schedule follow from the recipe and the launch (a run's first lines)."""
        o, p = self.cfg.optim, self.plan
        return (f"effective batch {p.effective_batch} = {self.cfg.data.batch_size} per device x {o.accum_steps} "
                f"accumulation x {counted(self.acc.num_processes, 'process')} in {training_precision(self.acc)}; "
                f"lr = {o.base_lr:g} x {p.effective_batch} / 256 = {p.peak_lr:.3g}{optimizer_note}; "
                f"{p.steps_per_epoch:g} steps/epoch, {p.total_steps} steps in the schedule, stopping at {p.stop_step}")

    @property
    def epoch(self) -> float:
        """Epochs trained at the current optimizer step (fractional, as logged)."""
        return round(self.step / self.plan.steps_per_epoch, 4)

    def device_images(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, S, S] -> normalised floats on the device, in the model's memory format."""
        return normalize(images.to(self.acc.device, non_blocking=True), self.cfg.data.mean, self.cfg.data.std,
                         self.memory_format)

    def lr(self, step: int) -> float:
        return lr_at(step, peak_lr=self.plan.peak_lr, total_steps=self.plan.total_steps,
                     warmup_steps=self.plan.warmup_steps, min_lr=self.cfg.optim.min_lr)

    def train_batch(self, batch: dict, micro: int, bar) -> int:
        """Train on micro-batch `micro` (0-based; the optimizer steps on accumulation boundaries) and count it in
        the stream state, the log window and, after an optimizer step, `step` and the bar. Returns `micro + 1`."""
        loss = self.micro_step(batch, micro)
        self.stream.state.record(batch, self.stream.num_workers)
        self.window.add(loss, len(batch["images"]), micro)
        if self.acc.sync_gradients:
            self.step += 1
            bar.update(1)
        return micro + 1

    def log_due(self, step: int | None = None) -> bool:
        """Whether optimizer step `step` (by default the one just taken) closes a log window."""
        step = self.step if step is None else step
        return step % self.cfg.run.log_every == 0 or step == self.plan.stop_step

    def close_log_window(self, bar) -> dict:
        """The metrics row of the window that this optimizer step closes, once every rank's losses are finite.

        A row that the stop step adds between log steps leaves the loss sums open: the last checkpoint keeps them,
        so a run continued from it (a higher run.max_steps) logs the rows of a run that never stopped.
        """
        raise_if_nonfinite(self.acc, self.window, self.out, self.cfg.optim.accum_steps)
        return close_window(self.acc, self.window, bar, self.step, self.epoch, self.lr(self.step - 1),
                            self.stream.state.skipped, keep_loss=self.step % self.cfg.run.log_every != 0)

    def epoch_done(self) -> bool:
        return self.stream.state.batches >= self.stream.batches_per_epoch()

    def share_main_buffers(self) -> None:
        """Rank 0's buffers (BatchNorm statistics) on every rank, before the EMA copies them or a model is evaluated.

        DDP copies them only at the first forward after an optimizer step, and each rank's forwards then update its
        own: otherwise every rank would average into its EMA, or score its share of the data with, statistics of a
        model that is never saved (checkpoints and `best/` hold rank 0's).
        """
        if self.acc.num_processes > 1:
            for buffer in self.acc.unwrap_model(self.model).buffers():
                torch.distributed.broadcast(buffer, src=0)

    def restore(self, checkpoint) -> None:
        """Load `checkpoint` into the model, optimizer, step, stream position and open log window."""
        self.step, self.stream.state = restore_training(
            self.acc, self.model, self.optimizer, checkpoint, config=to_dict(self.cfg), plan=self.plan,
            output_dir=self.out, window=self.window, log=self.log)
        self.resumed_rows = checkpoint.state.get(METRICS_ROWS_KEY)

    def write_config(self) -> None:
        """The run's config.yaml, once the checkpoint to resume from is accepted (`write_run_config`)."""
        write_run_config(self.cfg, self.out, self.is_main, left_to_train=self.step < self.plan.stop_step)

    def open_metrics(self) -> MetricsLogger:
        """The run's metrics writer (a `with` block), holding the rows of the checkpoint it continues from."""
        return MetricsLogger(self.out, self.is_main, to_dict(self.cfg), resume_step=self.step,
                             resume_rows=self.resumed_rows)

    def checkpoint_state(self, **state) -> dict:
        """`state` for a checkpoint's state.json, with the metrics rows written so far, which a resume keeps."""
        return {"step": self.step, **state, METRICS_ROWS_KEY: self.logger.rows}


def accumulate_step(accelerator, model, optimizer, compute_loss: Callable[[], torch.Tensor], *, lr: float,
                    grad_clip: float | None, measure_norm: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One micro-step under accelerate's accumulation: the optimizer steps on accumulation boundaries only.

    Returns the detached loss and, on a boundary step that clips or `measure_norm`, the gradient norm.
    """
    grad_norm = None
    with accelerator.accumulate(model):
        if accelerator.sync_gradients:  # before backward: DeepSpeed steps inside accelerator.backward
            set_lr(optimizer, lr)
        with accelerator.autocast():
            loss = compute_loss()
        accelerator.backward(loss)
        if accelerator.sync_gradients and (grad_clip or measure_norm):
            # An infinite max_norm only measures (gradients scaled by exactly 1), unscaled from fp16 as clipping is.
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), grad_clip or math.inf)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss.detach(), grad_norm


class Preemption:
    """SIGTERM sets a flag; the loop saves a checkpoint and exits at the next step all ranks agree on.

    `requested` is this rank's own flag, set by the signal handler at any moment; `stopping` is the decision all
    ranks share, so it is the one every loop condition must test (a rank that leaves the loop alone would hang the
    others in their next collective).

    Use it as a `with` block around the training loop: the previous SIGTERM handler comes back at its end, so a
    notebook, a test session or a process forked later (e.g. a `make_shards` worker pool) still dies on SIGTERM.
    """

    def __init__(self, accelerator, check_every: int, log=print):
        self.accelerator, self.check_every, self.log = accelerator, check_every, log
        self.requested = self.stopping = False
        self._previous_handler = None

    def __enter__(self) -> Preemption:
        self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def __exit__(self, *exc_info) -> None:
        # None: the previous handler was not set from Python, i.e. the default one.
        signal.signal(signal.SIGTERM, self._previous_handler or signal.SIG_DFL)

    def _on_sigterm(self, signum, frame) -> None:
        when = "after this step" if self.accelerator.num_processes == 1 else "at the next step the ranks agree on"
        self.log(f"SIGTERM received: saving a checkpoint {when}, then exiting")
        self.requested = True

    def should_stop(self, step: int) -> bool:
        """Ranks agree every `check_every` steps, all at the same ones: agreeing every step would cost a host sync
        per step."""
        if self.accelerator.num_processes == 1:
            self.stopping = self.requested
        elif step % self.check_every == 0:
            flag = torch.tensor(float(self.requested), device=self.accelerator.device)
            self.stopping = bool(self.accelerator.reduce(flag, "max").item())
        return self.stopping

    def cut_short(self, step: int, stop_step: int) -> bool:
        """Whether the run ended on this signal before its stop step (a preempted run, to be resumed)."""
        return self.stopping and step < stop_step
