"""Cost of MAE on SReT-S: visible-only vs SimMIM-style full-grid encoder, the dense-stem option, SReT-S vs DeiT-S.

Prints, in one run, encoder and forward MACs per image (FlopCounterMode FLOPs / 2: matmuls, convs, attention) and the
median train-step time (forward + backward) of each case. Repetitions are interleaved across cases, so load on a
shared machine hits every case alike; ratios come last, step-time ratios as the median of the ratios of the pairs
timed in one repetition, with their range.

    OMP_NUM_THREADS=2 python tools/bench/sret.py                       # CPU, batch 8 at 224
    python tools/bench/sret.py --device cuda --dtype bf16 --batch 64 --repeats 20

References: docs/sret.md (design and measured numbers); timm `vit_small_patch16_224` (DeiT-S architecture).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    DTYPES,
    Case,
    add_step_options,
    autocast_for,
    bench_parser,
    classifier_case,
    gmacs_per_image,
    interleaved_times,
    medians,
    paired_ratio,
    train_step,
)

import mae_tnt  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = bench_parser(__doc__, repeats=3)
    add_step_options(parser, batch=8, mask_ratio_help="MAE's; the SReT recipes use 0.6")
    parser.add_argument("--img-size", type=int, default=224, help="input resolution in pixels")
    return parser.parse_args()


def mae_case(name: str, images: torch.Tensor, ratio: float, **kwargs) -> Case:
    model = mae_tnt.create_model("mae_sret_s", img_size=images.shape[-1], **kwargs).to(images.device).train()
    noise = torch.rand(images.shape[0], model.grid**2, device=images.device)
    return Case(name, model, step=lambda: model(images, ratio, noise)[0],
                encode=lambda: model.forward_encoder(images, ratio, noise)[0])


def build_cases(images: torch.Tensor, ratio: float) -> list[Case]:
    size = images.shape[-1]
    return [
        mae_case("mae_sret_s visible (per-unit stem)", images, ratio),
        mae_case("mae_sret_s visible (dense stem)", images, ratio, dense_stem=True),
        mae_case("mae_sret_s mask tokens (full grid)", images, ratio, encoder_mode="mask_tokens"),
        classifier_case("sret_s classifier", mae_tnt.create_model("sret_s", img_size=size), images),
        classifier_case("deit_s classifier (timm vit_small)", timm.create_model("vit_small_patch16_224", img_size=size),
                        images),
    ]


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    torch.manual_seed(0)
    images = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device)
    cases = build_cases(images, args.mask_ratio)

    autocast = autocast_for(device, dtype)

    encoder_macs = {c.name: gmacs_per_image(c.encode, args.batch) for c in cases if c.encode}
    forward_macs = {c.name: gmacs_per_image(c.step, args.batch) for c in cases}
    times = interleaved_times({c.name: train_step(c.model, c.step, autocast) for c in cases}, args.repeats)
    print_report(args, device, cases, encoder_macs, forward_macs, times)


def print_report(args, device, cases, encoder_macs, forward_macs, times) -> None:
    step = medians(times)
    print(f"device={device} dtype={args.dtype} batch={args.batch} img={args.img_size} mask_ratio={args.mask_ratio} "
          f"repeats={args.repeats} threads={torch.get_num_threads()} torch={torch.__version__}")
    print(f"{'case':40s} {'enc GMAC/img':>12s} {'fwd GMAC/img':>12s} {'step ms':>9s} {'img/s':>7s}")
    for case in cases:
        enc = f"{encoder_macs[case.name]:.3f}" if case.name in encoder_macs else "-"
        seconds = step[case.name]
        print(f"{case.name:40s} {enc:>12s} {forward_macs[case.name]:12.3f} {seconds * 1e3:9.1f} "
              f"{args.batch / seconds:7.1f}")
    visible, dense, full, sret, deit = (c.name for c in cases)
    encoder_ratio = encoder_macs[visible] / encoder_macs[full]
    ratios = [
        ("encoder MACs   visible / mask tokens", f"{encoder_ratio:.3f}", "(target <= 0.3)"),
        ("MAE step time  visible / mask tokens", paired_ratio(times, visible, full), "(target <= 0.5)"),
        ("encoder MACs   dense stem / per-unit", f"{encoder_macs[dense] / encoder_macs[visible]:.3f}", ""),
        ("MAE step time  dense stem / per-unit", paired_ratio(times, dense, visible), ""),
        ("forward MACs   SReT-S / DeiT-S", f"{forward_macs[sret] / forward_macs[deit]:.3f}", ""),
        ("train step     SReT-S / DeiT-S", paired_ratio(times, sret, deit), ""),
    ]
    print("ratios:")
    for label, value, target in ratios:
        print(f"  {label:38s} = {value}  {target}".rstrip())


if __name__ == "__main__":
    main()
