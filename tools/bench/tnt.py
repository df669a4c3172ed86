"""Speed of our TNT against timm's, DeiT-S and the SimMIM-style baseline; decoder sizing for MAE-TNT.

Default mode prints, in one run, the median train-step time (forward + backward, no optimizer) and forward MACs per
image of: timm `tnt_s_patch16_224`, our `tnt_s_patch16_224` (same weights), timm `vit_small_patch16_224` (DeiT-S),
and MAE-TNT-S with the visible-only encoder vs every sentence in the encoder (`encoder_mode="mask_tokens"`).
Repetitions are interleaved across cases, so load on a shared machine hits every case alike; the key ratios come last,
each the median of the ratios of the pairs timed in one repetition, with their range.

`--decoders` instead compares decoder sizes for `mae_tnt_s_patch16` (`--model` for another size): encoder and decoder
MACs per image and the step time of the whole MAE and of its encoder alone.

`--parts` instead times one TNT-S block part by part (inner attention, inner MLP, word -> sentence projection, outer
transformer) beside one DeiT-S block, on the activations of `--batch` 224-px images: where TNT's extra time goes.

    OMP_NUM_THREADS=2 python tools/bench/tnt.py                              # CPU, batch 16 at 224, fp32
    OMP_NUM_THREADS=2 python tools/bench/tnt.py --decoders --batch 8
    OMP_NUM_THREADS=2 python tools/bench/tnt.py --parts --repeats 9
    python tools/bench/tnt.py --device cuda --dtype bf16 --batch 128 --repeats 20

References: docs/tnt.md (design and measured numbers); timm `models/tnt.py`, `vit_small_patch16_224` (DeiT-S).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
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
from mae_tnt.models.tnt import project_words  # noqa: E402

DECODERS = ((8, 512, 16), (4, 512, 16), (4, 384, 12), (2, 384, 12), (4, 256, 8), (2, 256, 8))
"""(depth, width, heads) of the decoders compared by --decoders; MAE's reference is 8 x 512."""


def parse_args() -> argparse.Namespace:
    parser = bench_parser(__doc__, repeats=5)
    add_step_options(parser, batch=16, mask_ratio_help="fraction of sentences hidden (MAE cases)")
    parser.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                        help="wall: perf_counter; cpu: this process's CPU time (steadier on a loaded CPU machine; "
                             "one thread on the CPU only)")
    parser.add_argument("--decoders", action="store_true", help="compare MAE-TNT decoder sizes instead")
    parser.add_argument("--model", default="mae_tnt_s_patch16", help="MAE-TNT model for --decoders")
    parser.add_argument("--parts", action="store_true", help="time one TNT-S block part by part instead")
    args = parser.parse_args()
    if args.clock == "cpu" and (torch.device(args.device).type != "cpu" or torch.get_num_threads() > 1):
        # CPU time adds up every thread's, spin-waits included, and says nothing of a GPU's time
        parser.error("--clock cpu measures one CPU thread: run with OMP_NUM_THREADS=1 and --device cpu")
    return args


def mae_case(name: str, images: torch.Tensor, ratio: float, model_name: str = "mae_tnt_s_patch16", **kwargs) -> Case:
    model = mae_tnt.create_model(model_name, img_size=images.shape[-1], **kwargs).to(images.device).train()
    noise = torch.rand(images.shape[0], model.grid**2, device=images.device)
    return Case(name, model, lambda: model(images, ratio, noise)[0])


def encoder_case(name: str, mae: Case, images: torch.Tensor, ratio: float) -> Case:
    """The MAE's encoder alone (same mask), with a stand-in loss so that backward runs through it."""
    noise = torch.rand(images.shape[0], mae.model.grid**2, device=images.device)
    return Case(name, mae.model, lambda: mae.model.forward_encoder(images, ratio, noise)[0].float().square().mean())


def speed_cases(images: torch.Tensor, ratio: float) -> list[Case]:
    timm_tnt = timm.create_model("tnt_s_patch16_224")
    ours = mae_tnt.create_model("tnt_s_patch16_224")
    ours.load_state_dict(timm_tnt.state_dict())  # same weights, so the timings compare like with like
    return [
        classifier_case("timm tnt_s_patch16_224", timm_tnt, images),
        classifier_case("ours tnt_s_patch16_224", ours, images),
        classifier_case("timm vit_small_patch16_224 (DeiT-S)", timm.create_model("vit_small_patch16_224"), images),
        mae_case("mae_tnt_s visible-only", images, ratio),
        mae_case("mae_tnt_s mask tokens (every sentence)", images, ratio, encoder_mode="mask_tokens"),
    ]


def decoder_cases(images: torch.Tensor, ratio: float, model_name: str) -> list[Case]:
    cases = []
    for depth, width, heads in DECODERS:
        cases.append(mae_case(f"decoder {depth}x{width}", images, ratio, model_name,
                              decoder_depth=depth, decoder_dim=width, decoder_heads=heads))
    cases.append(encoder_case("encoder alone (visible)", cases[0], images, ratio))
    return cases


def part_cases(images: torch.Tensor) -> list[Case]:
    """One TNT-S block whole and part by part, and one DeiT-S block, on random activations of the right shapes."""
    block = mae_tnt.create_model("tnt_s_patch16_224").blocks[0].to(images.device).train()
    vit_block = timm.create_model("vit_small_patch16_224").blocks[0].to(images.device).train()
    batch = images.shape[0]
    words = torch.randn(batch * 196, 16, 24, device=images.device, requires_grad=True)  # [B*K, W, c]
    tokens = torch.randn(batch, 197, 384, device=images.device, requires_grad=True)  # [B, 1+K, D]

    def fresh(loss_fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        """`loss_fn` with the inputs' gradients dropped first: leaves outside the model, they would accumulate."""
        def run() -> torch.Tensor:
            words.grad = tokens.grad = None
            return loss_fn()
        return run

    def outer() -> torch.Tensor:
        x = tokens + block.attn_out(block.norm_out(tokens))
        return (x + block.mlp(block.norm_mlp(x))).mean()

    return [
        Case("inner attention (LN, attn, add)", block,
             fresh(lambda: (words + block.attn_in(block.norm_in(words))).mean())),
        Case("inner MLP (LN, MLP, add)", block, fresh(lambda: (words + block.mlp_in(block.norm_mlp_in(words))).mean())),
        Case("words -> sentence projection", block, fresh(lambda: project_words(block, words, batch).mean())),
        Case("outer transformer", block, fresh(outer)),
        Case("TNT-S block", block, fresh(lambda: sum(out.mean() for out in block(words, tokens)))),
        Case("DeiT-S block", vit_block, fresh(lambda: vit_block(tokens).mean())),
    ]


def print_case_table(args, cases: list[Case], macs: dict[str, float], step: dict[str, float]) -> None:
    print(f"device={args.device} dtype={args.dtype} batch={args.batch} img=224 mask_ratio={args.mask_ratio} "
          f"repeats={args.repeats} clock={args.clock} threads={torch.get_num_threads()} "
          f"torch={torch.__version__} timm={timm.__version__}")
    print(f"{'case':42s} {'fwd GMAC/img':>12s} {'step ms':>9s} {'img/s':>7s}")
    for case in cases:
        seconds = step[case.name]
        print(f"{case.name:42s} {macs[case.name]:12.3f} {seconds * 1e3:9.1f} {args.batch / seconds:7.1f}")


def print_speed_ratios(cases: list[Case], macs: dict[str, float], times: dict[str, list[float]]) -> None:
    timm_tnt, ours, vit, visible, full = (c.name for c in cases)
    print("ratios (the targets are the project's for a 2-vCPU CPU, which it misses there: see docs/tnt.md, Speed):")
    print(f"  {'forward MACs  TNT-S / DeiT-S':42s} = {macs[ours] / macs[vit]:.3f}")
    print(f"  {'MAE MACs      mask tokens / visible-only':42s} = {macs[full] / macs[visible]:.3f}")
    step_ratios = [
        ("MAE step      mask tokens / visible-only", full, visible, ""),
        ("train step    timm TNT-S / DeiT-S", timm_tnt, vit, ""),
        ("train step    ours TNT-S / DeiT-S", ours, vit, "(target <= 1.25)"),
        ("speed-up      timm TNT-S / ours TNT-S", timm_tnt, ours, "(target >= 1.3)"),
    ]
    for label, numerator, denominator, target in step_ratios:
        print(f"  {label:42s} = {paired_ratio(times, numerator, denominator)}  {target}".rstrip())


def print_decoder_ratios(cases: list[Case], macs: dict[str, float], step: dict[str, float]) -> None:
    encoder = cases[-1].name
    print(f"decoder vs encoder (encoder alone: {macs[encoder]:.3f} GMAC/img, {step[encoder] * 1e3:.1f} ms):")
    for case in cases[:-1]:
        dec_macs = macs[case.name] - macs[encoder]
        dec_ms = step[case.name] - step[encoder]
        print(f"  {case.name:16s} decoder {dec_macs:6.3f} GMAC/img = {dec_macs / macs[encoder]:5.2f}x encoder;  "
              f"step {step[case.name] * 1e3:8.1f} ms, decoder share {dec_ms / step[case.name]:6.1%}")


def print_part_shares(cases: list[Case], times: dict[str, list[float]], depth: int = 12) -> None:
    *parts, block, vit_block = (c.name for c in cases)
    step = medians(times)
    print(f"per train step ({depth} blocks):")
    for name in parts:
        print(f"  {name:40s} {step[name] * depth * 1e3:8.1f} ms  {step[name] / step[block]:6.1%} of the block")
    print(f"  {'TNT-S block / DeiT-S block':40s} = {paired_ratio(times, block, vit_block)}")


def main() -> None:
    args = parse_args()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    torch.manual_seed(0)
    images = torch.randn(args.batch, 3, 224, 224, device=device)
    if args.decoders:
        cases = decoder_cases(images, args.mask_ratio, args.model)
    elif args.parts:
        cases = part_cases(images)
    else:
        cases = speed_cases(images, args.mask_ratio)

    autocast = autocast_for(device, dtype)

    with autocast():
        macs = {c.name: gmacs_per_image(c.step, args.batch) for c in cases}
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    times = interleaved_times({c.name: train_step(c.model, c.step, autocast) for c in cases}, args.repeats, clock=clock)
    step = medians(times)
    print_case_table(args, cases, macs, step)
    if args.decoders:
        print_decoder_ratios(cases, macs, step)
    elif args.parts:
        print_part_shares(cases, times)
    else:
        print_speed_ratios(cases, macs, times)


if __name__ == "__main__":
    main()
