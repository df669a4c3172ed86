"""Images/s per loader worker: our shard stream versus torchvision ImageFolder with MAE's reference PIL transforms.

    python tools/bench/loader.py [--images 320] [--batch 64] [--size 500x375] [--repeats 3]

Both read the same JPEGs (synthetic photo-like images written once to a temporary folder, then converted to shards).
Each side runs in the main process (one worker), so the figure is per worker, and each ends with a batch, as a
DataLoader worker does. The reference pipeline is MAE's: RandomResizedCrop(224, scale 0.2-1, bicubic) + flip +
ToTensor + Normalize on float, then torch's default collate. Ours sizes the crop from the JPEG header, decodes with
libjpeg-turbo (or at a reduced DCT scale when the crop allows), resizes on uint8, stacks uint8 images and leaves
normalisation to the device (`mae_tnt/data/transforms.py`). A third case adds that normalisation to float on the CPU,
to show what the worker's ratio owes to moving it (the reference's batches are float, four times the bytes).
Prints the ratio last (target >= 2x).
"""

from __future__ import annotations

import sys
import tempfile
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import default_collate

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import bench_parser, interleaved_times, medians, paired_ratio, print_table  # noqa: E402

from mae_tnt.data.convert import ConvertOptions, convert  # noqa: E402
from mae_tnt.data.shards import resolve_shards  # noqa: E402
from mae_tnt.data.stream import ShardStream  # noqa: E402
from mae_tnt.data.transforms import normalize, train_crop  # noqa: E402
from mae_tnt.text import positive_int  # noqa: E402


def write_jpegs(root: Path, count: int, width: int, height: int) -> None:
    """Smooth gradients plus texture noise, so JPEG sizes resemble photos (tens of KB), in two classes."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width]
    for index in range(count):
        folder = root / f"class{index % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        base = np.stack([(xx * (index + 1) % 255), (yy * 2 % 255), ((xx + yy) % 255)], axis=-1)  # [H, W, 3]
        noisy = base + rng.normal(0, 12, base.shape)
        Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(folder / f"img{index}.jpg", quality=90)


def ours(shards, size: int, batch: int, normalised: bool = False):
    """One epoch of the shard stream in batches of `batch`, normalised to float on the CPU if `normalised`."""
    stream = ShardStream(shards, batch_size=batch, transform=partial(train_crop, size=size, scale=(0.2, 1.0)), seed=0)
    finish = partial(normalize, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD) if normalised else lambda x: x
    return lambda: [finish(b["images"]) for b in stream]


def torchvision_reference(root: Path, size: int, batch: int):
    """One epoch of MAE's ImageFolder pipeline in batches of `batch`, collated as a DataLoader worker does."""
    from torchvision import datasets, transforms

    transform = transforms.Compose([
        transforms.RandomResizedCrop(size, scale=(0.2, 1.0), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
    ])
    dataset = datasets.ImageFolder(str(root), transform=transform)
    starts = range(0, len(dataset), batch)
    return lambda: [default_collate([dataset[i] for i in range(start, start + batch)]) for start in starts]


def main() -> None:
    parser = bench_parser(__doc__, repeats=3)
    parser.add_argument("--images", type=positive_int, default=320, help="synthetic JPEGs to read")
    parser.add_argument("--batch", type=positive_int, default=64, help="images per batch (MAE: 64 per GPU)")
    parser.add_argument("--size", default="500x375", help="source JPEG size WxH (ImageNet's mean is about 500x375)")
    parser.add_argument("--crop", type=int, default=224, help="side of the random-resized crops in pixels")
    args = parser.parse_args()
    if args.images % args.batch:
        parser.error(f"--images {args.images} must be a multiple of --batch {args.batch}: both read whole batches")
    torch.set_num_threads(1)  # as inside a DataLoader worker
    width, height = map(int, args.size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        folder, shard_dir = Path(tmp) / "images", Path(tmp) / "shards"
        write_jpegs(folder, args.images, width, height)
        convert(folder, shard_dir, ConvertOptions(shard_size=100, workers=1, progress=False))
        shards = resolve_shards(str(shard_dir))
        times = interleaved_times({"mae_tnt shard stream": ours(shards, args.crop, args.batch),
                                   "torchvision ImageFolder": torchvision_reference(folder, args.crop, args.batch),
                                   "mae_tnt + float normalise": ours(shards, args.crop, args.batch, normalised=True)},
                                  args.repeats)
    rates = {name: args.images / seconds for name, seconds in medians(times).items()}
    title = (f"{args.images} JPEGs of {width}x{height} -> {args.crop}px crops in batches of {args.batch}, one process, "
             f"median of {args.repeats}")
    print_table([(name, f"{rate:8.1f} img/s per worker") for name, rate in rates.items()], title)
    with_normalise = paired_ratio(times, "torchvision ImageFolder", "mae_tnt + float normalise")
    print(f"speedup shard stream normalised to float on the CPU vs ImageFolder: {with_normalise}")
    speedup = paired_ratio(times, "torchvision ImageFolder", "mae_tnt shard stream")
    print(f"speedup shard stream (uint8; normalised on the device) vs ImageFolder: {speedup}")


if __name__ == "__main__":
    main()
