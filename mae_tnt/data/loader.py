"""Loaders built from the config: the per-rank training stream and sequential evaluation reads.

The training loader is never passed to `accelerator.prepare` (it would dispatch or double-shard an iterable
dataset: accelerate PR #2325); batches are moved to the device by the engine.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterator
from functools import partial

import torch
from torch.utils.data import DataLoader

from ..config import DataConfig
from .device_decode import DeferredCrop, gpu_decode_available
from .images import BadImageError, image_bytes, set_max_image_pixels
from .shards import Shard, read_samples, resolve_shards
from .stream import ShardStream, label_of
from .transforms import eval_resize, train_crop


def build_train_stream(data: DataConfig, *, img_size: int, seed: int, rank: int, world_size: int) -> ShardStream:
    """The rank's stream; raises a clear error before training when the shards are unusable."""
    set_max_image_pixels(data.max_image_pixels)
    shards = resolve_shards(data.train, data.split, allow_pipe=data.allow_pipe)
    transform = partial(train_crop, size=img_size, scale=tuple(data.crop_scale))
    if data.decode_device == "cuda":
        if gpu_decode_available():
            transform = DeferredCrop(img_size, tuple(data.crop_scale))
        else:
            warnings.warn("data.decode_device=cuda needs CUDA and torchvision; decoding on the CPU instead",
                          stacklevel=2)
    return ShardStream(shards, batch_size=data.batch_size, transform=transform, seed=seed, rank=rank,
                       world_size=world_size, num_workers=data.num_workers, chunk=data.shuffle_chunk)


def make_loader(stream: ShardStream, pin_memory: bool = False) -> DataLoader:
    """A fresh loader for the stream's current state (workers are not persistent: each epoch restarts them)."""
    return DataLoader(stream, batch_size=None, num_workers=stream.num_workers, pin_memory=pin_memory,
                      prefetch_factor=4 if stream.num_workers else None)


def iter_eval_samples(shards: list[Shard], img_size: int) -> Iterator[tuple[torch.Tensor, int]]:
    """Every decodable sample in shard order, resized and center-cropped: (uint8 [3, S, S], label or -1)."""
    for shard in shards:
        for sample in read_samples(shard.url):
            data = image_bytes(sample)
            try:
                image = eval_resize(data, img_size) if data is not None else None
            except BadImageError:
                image = None
            if image is not None:
                yield image, label_of(sample)


def iter_eval_batches(
    shards: list[Shard], img_size: int, batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Sequential evaluation batches: (uint8 [B, 3, S, S], labels [B])."""
    samples = iter_eval_samples(shards, img_size)
    while batch := list(itertools.islice(samples, batch_size)):
        images, labels = zip(*batch, strict=True)
        yield torch.stack(images), torch.tensor(labels, dtype=torch.long)


def first_images(spec: str, split: str, count: int, img_size: int, allow_pipe: bool = False) -> torch.Tensor:
    """The first `count` decodable images of a shard set: uint8 [count, 3, S, S]."""
    shards = resolve_shards(spec, split, allow_pipe=allow_pipe, verify=False)
    images, _ = next(iter_eval_batches(shards, img_size, count))
    return images
