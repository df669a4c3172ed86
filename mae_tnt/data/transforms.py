"""Image transforms on uint8: decode, MAE's random-resized crop and flip, eval resize, and device normalisation.

Augmentation stays in uint8 on the CPU and normalisation runs on the device, which halves the loader's CPU work
(facts: float normalisation costs about 1.3 ms per image on the CPU). RGB and grey JPEGs skip PIL: their frame header
gives the size, libjpeg-turbo decodes them and torch resizes the crop on uint8. Other images are cropped and resized in
one PIL call (`resize(box=...)`), and a JPEG crop large enough is decoded at a reduced DCT scale (`draft`), so large
images cost a fraction of a full decode. All randomness comes from the `random.Random` passed in, so a sample's
augmentation is a pure function of its seed.

References: MAE `main_pretrain.py` (RandomResizedCrop(scale 0.2-1, bicubic) + flip); torchvision
`RandomResizedCrop.get_params` (the sampling rule reproduced here); Pillow `Image.draft`.
"""

from __future__ import annotations

import functools
import math
import random

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .images import decode_rgb, load_image, open_image, plain_jpeg_size, to_rgb

# torchvision comes with timm. Its 0.29 release deprecated these decoders for TorchCodec: once they are removed (or
# without torchvision) every image takes the PIL path, slower but the same augmentation.
try:
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.transforms.v2.functional import InterpolationMode
    from torchvision.transforms.v2.functional import resize as tv_resize
except ImportError:  # pragma: no cover
    decode_jpeg = None


ASPECT_RATIOS = (3 / 4, 4 / 3)
"""The crops' range of width / height, torchvision's RandomResizedCrop default (MAE keeps it)."""


def random_resized_crop_box(
    width: int, height: int, scale: tuple[float, float], rng: random.Random
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop sampling: (left, top, right, bottom) in pixels."""
    area = width * height
    log_ratio = (math.log(ASPECT_RATIOS[0]), math.log(ASPECT_RATIOS[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            left, top = rng.randint(0, width - w), rng.randint(0, height - h)
            return left, top, left + w, top + h
    return _center_box(width, height)


def _center_box(width: int, height: int) -> tuple[int, int, int, int]:
    """Fallback of torchvision: the central crop with the aspect ratio clamped to `ASPECT_RATIOS`."""
    low, high = ASPECT_RATIOS
    in_ratio = width / height
    if in_ratio < low:
        w, h = width, round(width / low)
    elif in_ratio > high:
        w, h = round(height * high), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def sample_crop(width: int, height: int, scale: tuple[float, float],
                rng: random.Random) -> tuple[tuple[int, int, int, int], bool]:
    """MAE's augmentation draws for one image: the random-resized-crop box, then whether to flip it."""
    box = random_resized_crop_box(width, height, scale, rng)
    return box, rng.random() < 0.5


def train_crop(data: bytes, rng: random.Random, *, size: int, scale: tuple[float, float]) -> torch.Tensor:
    """Decode + random-resized crop (bicubic, antialiased) + random horizontal flip -> uint8 [3, size, size].

    RGB and grey JPEGs are sized from their frame header and, unless the crop is large enough for a DCT draft,
    decoded by libjpeg-turbo and resized by torch on uint8: about 2x faster than PIL. Everything else goes through PIL.
    """
    jpeg_size = plain_jpeg_size(data)
    image = None if jpeg_size else open_image(data)
    box, flip = sample_crop(*(jpeg_size or image.size), scale, rng)
    small_crop = min(box[2] - box[0], box[3] - box[1]) < 2 * size
    if jpeg_size and small_crop and (decoded := decode_jpeg_tensor(data)) is not None:
        out = resize_box(decoded, box, size)
    else:
        out = _pil_crop(image or open_image(data), box, size)
    return out.flip(-1) if flip else out


def _pil_crop(image: Image.Image, box: tuple[int, int, int, int], size: int) -> torch.Tensor:
    """Crop + resize in one PIL call, after a DCT draft when the JPEG crop allows it -> uint8 [3, size, size]."""
    image, box = _draft(image, box, size)
    return to_tensor(to_rgb(load_image(image)).resize((size, size), Image.BICUBIC, box=box))


def decode_jpeg_tensor(data: bytes, device: torch.device | str = "cpu") -> torch.Tensor | None:
    """torchvision's decode on `device` (libjpeg-turbo, or nvJPEG on a GPU) -> uint8 [3, H, W]; None when torchvision
    is missing or refuses the file. The callers then decode with PIL: it reads some damaged JPEGs that libjpeg-turbo
    refuses (zeroed data), and it is what the converter validated with, so whether an image trains never depends on
    the crop drawn or the decoder."""
    if decode_jpeg is None:
        return None
    try:
        return decode_jpegs([data], device)[0]
    except RuntimeError:
        return None


def decode_jpegs(jpegs: list[bytes], device: torch.device | str) -> list[torch.Tensor]:
    """torchvision's decode of a list of JPEGs in one call (batched by nvJPEG on a GPU) -> uint8 [3, H, W] each.

    Raises:
        RuntimeError: the decoder refuses one of them.
    """
    encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in jpegs]  # writable copies, as it needs
    return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device) if encoded else []


def decode_whole(data: bytes) -> torch.Tensor:
    """The whole image -> uint8 [3, H, W]: libjpeg-turbo where it takes the file, else PIL (`decode_jpeg_tensor`).

    Raises:
        BadImageError: PIL cannot read it either.
    """
    image = decode_jpeg_tensor(data)
    return image if image is not None else to_tensor(decode_rgb(data))


def resize_box(image: torch.Tensor, box: tuple[int, int, int, int], size: int) -> torch.Tensor:
    """uint8 [3, H, W] on any device, cropped to `box` and resized (bicubic, antialiased) -> [3, size, size]."""
    left, top, right, bottom = box
    crop = image[None, :, top:bottom, left:right]  # [1, 3, h, w], a view
    # torch's uint8 resize kernel works on interleaved pixels: packing the crop first is cheaper than letting it
    # convert a strided view (0.35 vs 0.6 ms for a 300-px crop).
    packed = crop.contiguous(memory_format=torch.channels_last)  # [1, 3, h, w], stored as [1, h, w, 3]
    if packed.is_cpu:  # torch's uint8 kernel, called directly: torchvision's wrapper adds 20% (0.07 ms per image)
        return F.interpolate(packed, size=(size, size), mode="bicubic", align_corners=False, antialias=True)[0]
    # GPUs have no uint8 bicubic kernel: torchvision resizes in float, then clamps and rounds back to uint8
    return tv_resize(packed, [size, size], interpolation=InterpolationMode.BICUBIC, antialias=True)[0]


EVAL_CROP_FRACTION = 0.875
"""The evaluation preprocessing of MAE and DeiT: bicubic resize of the shorter side to S / 0.875, centre crop S
(exports record it as timm's `crop_pct`)."""


def eval_resize(data: bytes, size: int) -> torch.Tensor:
    """Decode + resize the shorter side to floor(size / EVAL_CROP_FRACTION) + center crop (bicubic) -> uint8 [3, size,
    size]: timm's evaluation transform (what `resolve_data_config` gives for our exports) to the pixel, with
    torchvision's rounding of the resized size and of the crop offset.

    The whole image is resized, then cropped, as there: resizing only the region the crop covers, in one PIL call,
    rounds differently where both sides shrink (up to 20 grey levels on a noisy 300x400 photo).
    """
    image = decode_rgb(data)
    width, height = image.size
    resized_short = math.floor(size / EVAL_CROP_FRACTION)
    if width <= height:
        resized = (resized_short, int(resized_short * height / width))
    else:
        resized = (int(resized_short * width / height), resized_short)
    left, top = (int(round((side - size) / 2)) for side in resized)  # offsets in the resized image
    return to_tensor(image.resize(resized, Image.BICUBIC).crop((left, top, left + size, top + size)))


def _draft(image: Image.Image, box: tuple[int, int, int, int], size: int):
    """Let JPEG decode at 1/2, 1/4 or 1/8 scale when the crop still has at least `size` pixels per side."""
    if image.format != "JPEG":
        return image, box
    crop_w, crop_h = box[2] - box[0], box[3] - box[1]
    reduce = min(crop_w, crop_h) / size
    if reduce < 2:
        return image, box
    width, height = image.size
    image.draft("RGB", (math.ceil(width / reduce), math.ceil(height / reduce)))
    sx, sy = image.size[0] / width, image.size[1] / height
    return image, (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 tensor [3, H, W] (one copy)."""
    array = np.asarray(image, dtype=np.uint8)  # [H, W, 3]
    return torch.from_numpy(array.copy()).permute(2, 0, 1)  # [3, H, W], a view


def stack_images(images: list[torch.Tensor]) -> torch.Tensor:
    """uint8 [3, S, S] images -> a batch [B, 3, S, S] stored channels-last (as [B, S, S, 3]).

    Decoders and resizers give channels-last images, so each is copied as it lies: a quarter of the cost of stacking
    them channels-first (0.04 vs 0.15 ms per 224-px image, in every loader worker). `normalize` picks the model's
    layout on the device, in the pass that converts to float anyway.
    """
    return torch.stack([image.permute(1, 2, 0) for image in images]).permute(0, 3, 1, 2)  # [B, S, S, 3] -> [B, 3, S, S]


def normalize(images: torch.Tensor, mean: list[float], std: list[float],
              memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """uint8 [B, 3, H, W] in any layout, on any device -> float32 normalised in `memory_format`, computed where the
    tensor lives."""
    mean_t, std_t = (channel_constants(tuple(values), images.device) for values in (mean, std))
    # In place on a float copy (never the caller's tensor): no two more full-size temporaries (2.5x faster on a CPU)
    return images.to(torch.float32, memory_format=memory_format, copy=True).sub_(mean_t).div_(std_t)


@functools.cache
def channel_constants(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """`values` x 255 as a [1, 3, 1, 1] tensor on `device`, made once: a tensor built from Python numbers on a GPU is
    a blocking copy, which would make the step wait for the GPU at every micro-batch."""
    return torch.tensor(values, device=device).view(1, 3, 1, 1) * 255  # [1, 3, 1, 1]


def denormalize(images: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """Inverse of `normalize`, to floats in [0, 1] for display."""
    mean_t = torch.tensor(mean, device=images.device).view(1, 3, 1, 1)  # [1, 3, 1, 1]
    std_t = torch.tensor(std, device=images.device).view(1, 3, 1, 1)  # [1, 3, 1, 1]
    return (images * std_t + mean_t).clamp(0, 1)
