"""GPU pretraining throughput: images/s, model TFLOP/s and MFU, peak memory, and the data-wait fraction.

    python tools/bench/gpu.py [--steps 30] [--peak-tflops 989] [--models mae_vit_base_patch16:256 ...]

For each model it runs (1) the compute-only train step (bf16 autocast, fused AdamW, SDPA) on a device-resident batch
for a fixed number of warm steps, counting FLOPs of one step with `torch.utils.flop_counter`, and (2) the real
pretraining loop (`mae_tnt.train.engine.Trainer`) on synthetic JPEG shards, once with CPU decoding in one loader
worker per core (at most 32) and once with GPU decoding, reading img/s and the fraction of time spent waiting for data
from its metrics; the shards hold one epoch of the timed steps. MFU is achieved model FLOP/s over the dense bf16 peak
(H100/H200 SXM: 989 TFLOP/s). Prints one table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from accelerate.state import AcceleratorState

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from loader import write_jpegs  # noqa: E402

import mae_tnt  # noqa: E402
from mae_tnt.config import PretrainConfig, load_config  # noqa: E402
from mae_tnt.data.convert import ConvertOptions, convert  # noqa: E402
from mae_tnt.text import HelpWithDefaults, positive_int  # noqa: E402

DEFAULT_MODELS = ["mae_vit_base_patch16:256", "mae_vit_small_patch16:512", "mae_tnt_s_patch16:256",
                  "mae_sret_s:256"]


def compute_only(name: str, batch: int, steps: int) -> dict:
    """Warm train steps on a resident batch: seconds per step, FLOPs per step, peak memory."""
    torch.manual_seed(0)
    model = mae_tnt.create_model(name).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=True)
    size = model.grid * model.unit
    images = torch.randn(batch, 3, size, size, device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _, _ = model(images)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    with torch.utils.flop_counter.FlopCounterMode(display=False) as counter:
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    peak_gib = torch.cuda.max_memory_allocated() / 2**30
    return {"step_s": seconds, "flops": counter.get_total_flops(), "peak_gib": peak_gib}


def pipeline(name: str, batch: int, steps: int, shards: Path, decode: str, workers: int) -> dict:
    """The real training loop; img/s and data-wait fraction of its last log window."""
    from mae_tnt.train.engine import Trainer

    with tempfile.TemporaryDirectory() as out:
        overrides = [f"model.name={name}", f"data.train={shards}", "data.val=null", f"data.batch_size={batch}",
                     f"data.num_workers={workers}", f"data.decode_device={decode}", f"run.output_dir={out}",
                     f"run.max_steps={steps}", f"run.log_every={max(1, steps // 2)}",
                     f"run.checkpoint_every={10 * steps}", "run.resume=none", "schedule.epochs=100",
                     "model.img_size=224"]
        Trainer(load_config(PretrainConfig, ROOT / "recipes/mae_vit_b.yaml", overrides)).train()
        AcceleratorState._reset_state(True)  # the next configuration builds its own Accelerator
        last = json.loads((Path(out) / "metrics.jsonl").read_text().splitlines()[-1])
    return {"img_s": last["img_per_s"], "data_wait": last["data_wait"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpWithDefaults)
    parser.add_argument("--models", nargs="*", default=DEFAULT_MODELS, help="name:batch pairs")
    parser.add_argument("--steps", type=positive_int, default=30, help="timed training steps per model")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU")
    parser.add_argument("--images", type=positive_int, default=None,
                        help="synthetic JPEGs for the pipeline runs (default: one epoch covers the timed steps)")
    parser.add_argument("--workers", type=positive_int, default=min(os.cpu_count() or 8, 32),
                        help="loader workers of the pipeline runs (one per core, at most 32)")
    parser.add_argument("--skip-pipeline", action="store_true", help="time the models only, not the data pipeline")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("tools/bench/gpu.py needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = True
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, peak {args.peak_tflops} TFLOP/s bf16")
    with tempfile.TemporaryDirectory() as tmp:
        shards = None
        if not args.skip_pipeline:
            write_jpegs(Path(tmp) / "jpeg", args.images or images_for_one_epoch(args), 500, 375)
            convert(Path(tmp) / "jpeg", Path(tmp) / "shards", ConvertOptions(shard_size=256, progress=False))
            shards = Path(tmp) / "shards"
        print_rows(args, shards)


def images_for_one_epoch(args: argparse.Namespace) -> int:
    """Images enough for one epoch to hold the timed steps at the largest batch, every worker yielding as many
    batches: a new epoch restarts the loader workers, which would fall inside the measured window."""
    batch = max(int(spec.split(":")[1]) for spec in args.models)
    return batch * args.workers * math.ceil((args.steps + 1) / args.workers)


def print_rows(args: argparse.Namespace, shards: Path | None) -> None:
    """One row per model: compute-only speed, MFU and memory, then the pipeline's speed with each decoder."""
    header = f"{'model':<26}{'batch':>6}{'img/s':>9}{'TFLOP/s':>9}{'MFU':>7}{'mem GiB':>8}" \
             f"{'cpu-dec img/s':>14}{'wait':>7}{'gpu-dec img/s':>14}{'wait':>7}"
    rows = [header]
    for spec in args.models:
        name, batch = spec.split(":")[0], int(spec.split(":")[1])
        result = compute_only(name, batch, args.steps)
        tflops = result["flops"] / result["step_s"] / 1e12
        row = (f"{name:<26}{batch:>6}{batch / result['step_s']:>9.0f}{tflops:>9.1f}"
               f"{100 * tflops / args.peak_tflops:>6.1f}%{result['peak_gib']:>8.1f}")
        if shards is not None:
            for decode in ("cpu", "cuda"):
                run = pipeline(name, batch, args.steps, shards, decode, args.workers)
                row += f"{run['img_s']:>14.0f}{100 * run['data_wait']:>6.1f}%"
        rows.append(row)
        print(row, flush=True)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
