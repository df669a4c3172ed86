"""Train-step time of MAE-ViT-B with the visible-only encoder versus mask tokens in the encoder (SimMIM-style).

    python tools/bench/visible_only.py [--batch 8] [--repeats 5] [--model mae_vit_base_patch16] [--encoders]

Both models have the same weights; only the encoder input differs. Prints the speedup last: the median over
repetitions of the back-to-back pair's ratio, with its range (target >= 2.4x at batch 8 on a 2-core CPU; the paper
reports 2.8x wall-clock for ViT-L on TPUs). `--encoders` also times the two encoders alone on one mask, to show
how efficiently each runs per MAC and what the speed-up would be if the visible-only one ran as efficiently as the
full one.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    Case,
    add_step_options,
    bench_parser,
    gmacs_per_image,
    interleaved_times,
    medians,
    paired_ratio,
    print_table,
    train_step,
)

import mae_tnt  # noqa: E402


def main() -> None:
    parser = bench_parser(__doc__, repeats=5)
    parser.add_argument("--model", default="mae_vit_base_patch16", help="MAE model to time")
    add_step_options(parser, batch=8, mask_ratio_help="fraction of patches hidden", devices=False)
    parser.add_argument("--encoders", action="store_true", help="also time the two encoders alone")
    args = parser.parse_args()
    torch.manual_seed(0)
    visible = mae_tnt.create_model(args.model, mask_ratio=args.mask_ratio)
    full = mae_tnt.create_model(args.model, mask_ratio=args.mask_ratio, encoder_mode="mask_tokens")
    # identical weights: each model has its own mask token, where the hidden patches enter it
    keys = full.load_state_dict(visible.state_dict(), strict=False)
    assert (keys.missing_keys, keys.unexpected_keys) == (["encoder_mask_token"], ["mask_token"]), keys
    size = visible.grid * visible.unit
    images = torch.randn(args.batch, 3, size, size)
    cases = [Case("visible-only", visible, lambda: visible(images)[0]),
             Case("mask tokens in encoder", full, lambda: full(images)[0])]
    if args.encoders:
        cases += encoder_cases(visible, full, images, args.mask_ratio)
    macs = {c.name: gmacs_per_image(c.step, args.batch) for c in cases}
    times = interleaved_times({c.name: train_step(c.model, c.step) for c in cases}, args.repeats)
    print_table([(name, f"{seconds * 1000:8.1f} ms/step, {macs[name]:7.3f} GMAC/img forward")
                 for name, seconds in medians(times).items()],
                f"{args.model}, batch {args.batch}, mask ratio {args.mask_ratio}, fp32, "
                f"{torch.get_num_threads()} threads, median of {args.repeats}")
    # Backward matmuls scale with forward ones, so the MAC ratio is the speed-up when both steps run equally
    # efficiently per MAC; the measured ratio falls short of it by however much less efficiently the visible-only
    # step runs (its encoder's GEMMs are 4x shorter).
    print(f"MAC ratio mask tokens / visible-only: {macs['mask tokens in encoder'] / macs['visible-only']:.2f}x")
    if args.encoders:
        print_encoder_efficiency(medians(times), macs)
    print(f"speedup visible-only vs mask tokens: {paired_ratio(times, 'mask tokens in encoder', 'visible-only')}")


def encoder_cases(visible, full, images: torch.Tensor, mask_ratio: float) -> list[Case]:
    """Each encoder alone, forward to the mean square of its output and backward, on one fixed mask."""
    noise = torch.rand(images.shape[0], visible.grid**2)
    return [Case(f"encoder alone, {name}", model,
                 lambda model=model: model.forward_encoder(images, mask_ratio, noise)[0].square().mean())
            for name, model in (("visible-only", visible), ("mask tokens", full))]


def print_encoder_efficiency(seconds: dict[str, float], macs: dict[str, float]) -> None:
    """The encoders' forward MACs per second, and the speed-up the whole step would reach if the visible-only
    encoder ran at the full one's rate (the rest of both steps unchanged)."""
    visible, full = "encoder alone, visible-only", "encoder alone, mask tokens"
    efficiency = (macs[visible] / seconds[visible]) / (macs[full] / seconds[full])
    visible_step = seconds["visible-only"] - seconds[visible] * (1 - efficiency)
    print(f"encoder MACs per second, visible-only / mask tokens: {efficiency:.2f}x")
    print(f"speedup if the visible-only encoder ran at the full one's rate: "
          f"{seconds['mask tokens in encoder'] / visible_step:.2f}x")


if __name__ == "__main__":
    main()
