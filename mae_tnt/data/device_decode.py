"""Batched JPEG decoding on the GPU: workers only pick the crop, the device decodes, crops, resizes and flips.

With `data.decode_device: cuda`, a worker reads a JPEG's frame header, draws the random-resized-crop box and the flip
with the sample's own RNG (so the augmentation is the same as on the CPU path), and hands the encoded bytes on. The main
process decodes the batch with nvJPEG (`torchvision.io.decode_jpeg(list, device="cuda")`), then crops, resizes
(bicubic, antialiased) and flips each image on the device. Images that are not RGB/grey JPEGs are decoded on the CPU
in the worker as before. Without CUDA (or torchvision), the CPU path is used and a warning says so.

References: torchvision PR #8496 (batched nvJPEG decoding, about 20x the CPU rate on an A100); facts §6.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from .images import BadImageError, plain_jpeg_size
from .shards import StreamError
from .stream import INSPECT_ADVICE
from .transforms import (
    decode_jpeg,
    decode_jpeg_tensor,
    decode_jpegs,
    decode_whole,
    resize_box,
    sample_crop,
    stack_images,
    train_crop,
)


@dataclass
class EncodedCrop:
    """A JPEG still encoded, with the crop box (left, top, right, bottom) and flip chosen in the worker.

    The bytes stay `bytes` until the main process decodes them: every tensor a worker sends holds a file descriptor
    of shared memory until it is received, and a tensor per JPEG (batches of 64, 10 workers, 4 batches ahead)
    exceeds the usual limit of 1024 open files.
    """

    data: bytes
    box: tuple[int, int, int, int]
    flip: bool


class DeferredCrop:
    """Picklable per-sample transform: JPEGs become `EncodedCrop`, other images uint8 [3, S, S] as on the CPU path."""

    def __init__(self, size: int, scale: tuple[float, float]):
        self.size, self.scale = size, tuple(scale)

    def __call__(self, data: bytes, rng: random.Random) -> EncodedCrop | torch.Tensor:
        jpeg_size = plain_jpeg_size(data)
        if jpeg_size is None:
            return train_crop(data, rng, size=self.size, scale=self.scale)
        box, flip = sample_crop(*jpeg_size, self.scale, rng)
        return EncodedCrop(bytes(data), box, flip)


def gpu_decode_available() -> bool:
    return decode_jpeg is not None and torch.cuda.is_available()


def decode_batch(items: list, size: int, device: torch.device) -> tuple[torch.Tensor, int]:
    """Items from `DeferredCrop` (any mix) -> (uint8 [B', 3, S, S] on `device`, number of JPEGs dropped).

    When the batched call fails, the batch is decoded one image at a time, each on the CPU if the device refuses it
    (nvJPEG does not take every valid JPEG, nor some damaged ones that PIL reads); the images that neither decodes are
    dropped (B' < B) and counted, so one bad file never stops a run.

    Raises:
        StreamError: every image of the batch was dropped, so there is nothing to train on.
    """
    jpegs = [item.data for item in items if isinstance(item, EncodedCrop)]
    try:
        decoded = iter(decode_jpegs(jpegs, device))
    except RuntimeError:
        decoded = iter([_decode_one(data, device) for data in jpegs])
    images = []
    for item in items:
        if not isinstance(item, EncodedCrop):
            images.append(item.to(device, non_blocking=True))
        elif (image := next(decoded)) is not None:
            out = resize_box(image, item.box, size)
            images.append(out.flip(-1) if item.flip else out)
    if not images:
        raise StreamError(f"none of the {len(items)} JPEGs of a batch decodes; {INSPECT_ADVICE}, or set "
                          "data.decode_device=cpu, which skips bad images and fills the batch with the next ones")
    return stack_images(images), len(items) - len(images)


def _decode_one(data: bytes, device: torch.device) -> torch.Tensor | None:
    """The image on `device`, decoded there or else on the CPU as the CPU path decodes it; None when neither can."""
    if (image := decode_jpeg_tensor(data, device)) is not None:
        return image
    try:
        return decode_whole(data).to(device)
    except BadImageError:
        return None
