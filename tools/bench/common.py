"""Shared benchmark helpers: interleaved timing, paired ratios and MAC counts, because this machine is noisy.

Cases are timed in turn within every repetition, so a slow spell of the shared machine hits all of them alike, in
the reverse order every other repetition, so that running first or after a given case (allocator, cache and thread
state) does not always favour the same one. A speed-up is then reported as the median of the per-repetition ratios
(each pair timed within one repetition) together with their range, which says how far one run can be trusted.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from mae_tnt.text import HelpWithDefaults, positive_int  # the scripts put the repository root on sys.path first

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""--dtype choices of the benchmarks, named as run.precision names them."""


def bench_parser(doc: str, repeats: int) -> argparse.ArgumentParser:
    """A benchmark's argument parser: its docstring's first paragraph as the description, defaults in --help, and
    the --repeats every benchmark takes."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=HelpWithDefaults)
    parser.add_argument("--repeats", type=positive_int, default=repeats,
                        help="timed repetitions of every case, after one warm-up")
    return parser


def add_step_options(parser: argparse.ArgumentParser, batch: int, mask_ratio_help: str | None = None,
                     devices: bool = True) -> None:
    """The options of the train-step benchmarks: --batch, --mask-ratio for those with MAE cases (`mask_ratio_help`
    saying what it hides), and --device/--dtype for those that also run on a GPU."""
    parser.add_argument("--batch", type=positive_int, default=batch, help="images per step")
    if mask_ratio_help is not None:
        parser.add_argument("--mask-ratio", type=float, default=0.75, help=mask_ratio_help)
    if devices:
        parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
        parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="autocast dtype (fp32: none)")


def interleaved_times(cases: dict[str, Callable[[], object]], repeats: int, warmup: int = 1,
                      clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Seconds of every timed call of each case, alternating the cases within each repetition (in reverse order every
    other repetition)."""
    for _ in range(warmup):
        for run in cases.values():
            run()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for repetition in range(repeats):
        order = list(cases.items())
        for name, run in order[::-1] if repetition % 2 else order:
            start = clock()
            run()
            times[name].append(clock() - start)
    return times


def medians(times: dict[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(values) for name, values in times.items()}


@dataclass(frozen=True)
class Ratio:
    """A ratio of two cases' times: median and range over the repetitions, each pair timed in one repetition."""

    median: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.median:.2f}x (pairs {self.low:.2f}-{self.high:.2f})"


def paired_ratio(times: dict[str, list[float]], numerator: str, denominator: str) -> Ratio:
    """times[numerator] / times[denominator], repetition by repetition."""
    ratios = [a / b for a, b in zip(times[numerator], times[denominator], strict=True)]
    return Ratio(statistics.median(ratios), min(ratios), max(ratios))


@dataclass
class Case:
    """A model and a closure running its forward to a loss; `encode` runs only its encoder (for MACs), if given."""

    name: str
    model: torch.nn.Module
    step: Callable[[], torch.Tensor]
    encode: Callable[[], torch.Tensor] | None = None


def classifier_case(name: str, model: torch.nn.Module, images: torch.Tensor) -> Case:
    """A 1000-class classifier's cross-entropy on `images` with random labels, in train mode."""
    model = model.to(images.device).train()
    labels = torch.randint(0, 1000, (images.shape[0],), device=images.device)
    return Case(name, model, lambda: F.cross_entropy(model(images), labels))


def autocast_for(device: torch.device, dtype: torch.dtype) -> Callable[[], AbstractContextManager]:
    """A context factory: autocast to `dtype` on `device`, or nothing for float32."""
    return lambda: nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)


def train_step(model: torch.nn.Module, loss_fn: Callable[[], torch.Tensor],
               autocast: Callable[[], AbstractContextManager] = nullcontext) -> Callable[[], None]:
    """One forward + backward of `loss_fn` (no optimizer), finished on the device before it returns."""
    device = next(model.parameters()).device

    def run() -> None:
        model.zero_grad(set_to_none=True)
        with autocast():
            loss = loss_fn()
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return run


def gmacs_per_image(fn: Callable[[], object], batch: int) -> float:
    """Forward multiply-accumulates per image (FlopCounterMode FLOPs / 2: matmuls, convolutions, attention).

    Runs with autograd on: under no_grad, the counter's module hooks fail on views of leaf inputs that need grad.
    """
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 2 / batch / 1e9


def print_table(rows: list[tuple[str, str]], title: str) -> None:
    width = max(len(name) for name, _ in rows)
    print(title)
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
