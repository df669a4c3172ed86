"""Activation memory and step time of an MAE train step with grad checkpointing (`run.grad_checkpointing`) and without.

    python tools/bench/grad_checkpointing.py [--model mae_vit_base_patch16] [--batch 8] [--repeats 3]
    python tools/bench/grad_checkpointing.py --device cuda --dtype bf16 --batch 256

Memory: each setting runs in a fresh child process, which builds the model and takes one train step (forward +
backward, no optimizer) to allocate the gradients, then measures what a second step adds at its peak to the weights
and gradients (CUDA: torch's peak allocation; CPU: the process's peak resident set, VmHWM, with glibc told to return
every large free block at once so that the resident set follows the tensors). Time: both settings alternate on one
model in this process. Prints the memory ratio last.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    DTYPES,
    add_step_options,
    autocast_for,
    bench_parser,
    interleaved_times,
    medians,
    paired_ratio,
    print_table,
    train_step,
)

import mae_tnt  # noqa: E402

SETTINGS = {"plain": False, "grad checkpointing": True}


def parse_args() -> argparse.Namespace:
    parser = bench_parser(__doc__, repeats=3)
    parser.add_argument("--model", default="mae_vit_base_patch16", help="MAE model")
    add_step_options(parser, batch=8)
    parser.add_argument("--child", choices=list(SETTINGS), help=argparse.SUPPRESS)  # internal: one measurement
    return parser.parse_args()


def build(args: argparse.Namespace):
    """The model and a closure computing its loss on a fixed batch and mask, under the benchmark's autocast."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = mae_tnt.create_model(args.model).to(device).train()
    size = model.grid * model.unit
    images = torch.randn(args.batch, 3, size, size, device=device)
    noise = torch.rand(args.batch, model.grid**2, device=device)
    autocast = autocast_for(device, DTYPES[args.dtype])

    def loss() -> torch.Tensor:
        with autocast():
            return model(images, noise=noise)[0]

    return model, loss


def memory_in_use(device: torch.device) -> int:
    """Bytes in use now: torch's allocation on CUDA, the resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return _status_kib("VmRSS") * 1024


def reset_peak_memory(device: torch.device) -> None:
    """Start the peak figure afresh, so that what ran before (building, the first step) is not counted."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM to the present resident set


def peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return _status_kib("VmHWM") * 1024


def _status_kib(field: str) -> int:
    """A memory figure of this process from /proc/self/status (Linux), in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}: the CPU memory figure needs Linux")


def child(args: argparse.Namespace) -> None:
    """Runs in a fresh process: print the memory a train step adds to the weights and gradients, as JSON."""
    device = torch.device(args.device)
    model, loss = build(args)
    model.set_grad_checkpointing(SETTINGS[args.child])
    loss().backward()  # allocates the gradients, which the next step accumulates into
    reset_peak_memory(device)
    before = memory_in_use(device)
    loss().backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    print(json.dumps({"peak_bytes": peak_memory(device) - before}))


def measure_memory(args: argparse.Namespace) -> dict[str, int]:
    """Each setting's peak from its own child process, so one cannot inherit the other's high-water mark."""
    peaks = {}
    for name in SETTINGS:
        command = [sys.executable, __file__, "--child", name, "--model", args.model, "--batch", str(args.batch),
                   "--device", args.device, "--dtype", args.dtype]
        # A freed block of at least 128 KiB goes back to the system at once, not into glibc's free lists.
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
        result = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
        peaks[name] = json.loads(result.stdout.strip().splitlines()[-1])["peak_bytes"]
    return peaks


def main() -> None:
    args = parse_args()
    if args.child:
        child(args)
        return
    peaks = measure_memory(args)
    model, loss = build(args)
    step = train_step(model, loss)

    def timed(enabled: bool):
        def run() -> None:
            model.set_grad_checkpointing(enabled)
            step()
        return run

    times = interleaved_times({name: timed(enabled) for name, enabled in SETTINGS.items()}, args.repeats)
    rows = [(name, f"{peaks[name] / 2**20:8.0f} MiB of activations at the peak, {seconds * 1000:8.1f} ms/step")
            for name, seconds in medians(times).items()]
    print_table(rows, f"{args.model}, batch {args.batch}, {args.dtype} on {args.device}, "
                      f"{torch.get_num_threads()} threads, time: median of {args.repeats}")
    print(f"step time, grad checkpointing / plain: {paired_ratio(times, 'grad checkpointing', 'plain')}")
    print(f"activation memory, plain / grad checkpointing: {peaks['plain'] / peaks['grad checkpointing']:.2f}x")


if __name__ == "__main__":
    main()
