"""Loaders built from the config: the per-rank training stream and sequential, rank-split evaluation reads.

The training loader is never passed to `accelerator.prepare` (it would dispatch or double-shard an iterable
dataset: accelerate PR #2325); batches are moved to the device by the engine.
"""

from __future__ import annotations

import itertools
import math
import os
import signal
import warnings
from collections.abc import Callable, Iterator
from contextlib import closing
from functools import partial

import torch
from torch.utils.data import DataLoader

from ..config import DataConfig
from ..ctrl_c import deferred
from ..text import counted
from .device_decode import DeferredCrop, gpu_decode_available
from .images import BadImageError, image_bytes, set_max_image_pixels
from .shards import SampleWarning, Shard, ShardError, break_warning, padded, read_samples, resolve_shards, sample_name
from .stream import ShardStream, label_of
from .transforms import eval_resize, stack_images, train_crop

EVAL_SKIPS_NAMED = 3  # unreadable samples an evaluation's warning names; it says how many more it left out


def build_train_stream(data: DataConfig, transform: Callable, *, seed: int, rank: int,
                       world_size: int) -> ShardStream:
    """The rank's stream of `transform`ed samples; raises a clear error before training when the shards are unusable."""
    set_max_image_pixels(data.max_image_pixels)
    shards = data_shards(data, "train")
    return ShardStream(shards, batch_size=data.batch_size, transform=transform, seed=seed, rank=rank,
                       world_size=world_size, num_workers=data.num_workers, chunk=data.shuffle_chunk)


def data_shards(data: DataConfig, which: str, verify: bool = True) -> list[Shard]:
    """The shards of `data.train` or `data.val` (`which`), with their sample counts."""
    spec, split, split_key = data_source(data, which)
    return resolve_shards(spec, split, allow_pipe=data.allow_pipe, verify=verify, info=data.info, split_key=split_key)


def data_source(data: DataConfig, which: str) -> tuple[str | None, str, str]:
    """(shard spec, split name, the split's config key) of `data.train` or `data.val` (`which`)."""
    if which == "train":
        return data.train, data.split, "data.split"
    return data.val, data.val_split, "data.val_split"


def mae_transform(data: DataConfig, img_size: int) -> Callable:
    """MAE's crop-and-flip, on the CPU or deferred to the GPU's JPEG decoder (`data.decode_device`)."""
    if data.decode_device == "cuda":
        if gpu_decode_available():
            return DeferredCrop(img_size, tuple(data.crop_scale))
        warnings.warn("data.decode_device=cuda needs CUDA and torchvision; decoding on the CPU instead", stacklevel=2)
    return partial(train_crop, size=img_size, scale=tuple(data.crop_scale))


def make_loader(stream: ShardStream, pin_memory: bool = False) -> DataLoader:
    """A fresh loader for the stream's current state (workers are not persistent: each epoch restarts them)."""
    _warn_if_workers_outnumber_cpus(stream.num_workers)
    return _SignalSafeLoader(stream, batch_size=None, num_workers=stream.num_workers, pin_memory=pin_memory,
                             prefetch_factor=4 if stream.num_workers else None, worker_init_fn=_ignore_stop_signals)


def _warn_if_workers_outnumber_cpus(workers: int) -> None:
    """In place of torch's warning, which comes twice, names no setting and misses that the other processes of the
    node start as many workers on the same CPUs."""
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if workers * processes > cpus:
        each = f" in each of {processes} processes" if processes > 1 else ""
        warnings.warn(f"data.num_workers={workers}{each} starts {workers * processes} loader workers on "
                      f"{counted(cpus, 'CPU')}, where they compete; a new run is faster with fewer (changing it when "
                      "resuming restarts the epoch in progress, since the data order depends on it)", stacklevel=2)


class _SignalSafeLoader(DataLoader):
    """Schedulers (SLURM, Kubernetes) send SIGTERM to the whole process group, and a terminal's Ctrl-C sends SIGINT
    to it. A worker that died of SIGTERM would make the main process raise before it could save its preemption
    checkpoint, and one that got Ctrl-C's KeyboardInterrupt prints its traceback, so workers ignore both (the main
    process ends them itself). They start with both blocked, which they inherit, until they ignore them: one sent
    while a worker is still starting would reach it otherwise. The main process gets a signal held meanwhile right
    after, and a Ctrl-C is held back (`ctrl_c.deferred`) until the iterator is whole: a KeyboardInterrupt in the
    middle of its set-up leaves workers that nothing shuts down."""

    def check_worker_number_rationality(self) -> None:
        """torch's check, replaced by `_warn_if_workers_outnumber_cpus`."""

    def __iter__(self):
        with deferred():
            previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
            try:
                return super().__iter__()  # starts the workers
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, previous)


STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def _ignore_stop_signals(worker_id: int) -> None:
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def eval_image(sample: dict, img_size: int) -> torch.Tensor | None:
    """A sample's image resized and center-cropped, uint8 [3, S, S]; None when it has none or it cannot be decoded."""
    try:
        return eval_resize(image_bytes(sample), img_size)
    except BadImageError:
        return None  # skipped, as in training


def eval_batches(shards: list[Shard], img_size: int, batch_size: int, rank: int = 0, world_size: int = 1,
                 max_samples: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's share of the evaluation samples in shard order: uint8 [B, 3, S, S] and labels [B].

    The first `max_samples` samples (all by default) are cut by position into batches, and each rank takes a
    contiguous run of `eval_batch_count` of them: gathered rank after rank, the rows are in shard order whatever the
    number of processes, and a rank reads only the shards its batches lie in. Every rank yields as many full-size
    batches; rows past the data, or lost to undecodable images or to a shard that broke, are zeros with label -1.
    """
    count = eval_batch_count(shards, batch_size, world_size, max_samples)
    first = rank * count * batch_size
    last = min(first + count * batch_size, _samples_used(shards, max_samples))
    # Each rank reads a share of its own when there are several; one process, or every rank reading alike (the SReT
    # stem refit), speaks for all.
    warning = SampleWarning if world_size > 1 else UserWarning
    samples = _samples_at(shards, first, last, warning)
    unreadable: list[str] = []
    for _ in range(count):
        yield _padded_batch(list(itertools.islice(samples, batch_size)), img_size, batch_size, unreadable)
    if unreadable:
        warnings.warn(_left_out(unreadable), warning, stacklevel=1)  # ours, not the caller's: one `warning:` line


def eval_batch_count(shards: list[Shard], batch_size: int, world_size: int = 1, max_samples: int | None = None) -> int:
    """How many batches `eval_batches` yields on every rank."""
    return math.ceil(math.ceil(_samples_used(shards, max_samples) / batch_size) / world_size)


def _samples_used(shards: list[Shard], max_samples: int | None) -> int:
    total = sum(shard.num_samples for shard in shards)
    return total if max_samples is None else min(total, max_samples)


def _samples_at(shards: list[Shard], first: int, last: int, warning: type[Warning]) -> Iterator[dict | None]:
    """The samples at positions [first, last) of the shard sequence, placed by the shards' recorded counts; None for
    each one a broken shard lost, so that later samples keep their positions. A break is warned about as `warning`:
    a `SampleWarning` when only this rank reads these samples."""
    offset = 0
    for shard in shards:
        start, stop = max(first - offset, 0), min(last - offset, shard.num_samples)
        offset += shard.num_samples
        if start >= stop:
            continue
        on_break = partial(_warn_of_break, shard, warning)
        with closing(read_samples(shard.url, start, on_break, expected=shard.num_samples)) as samples:
            yield from padded(samples, stop - start)


def _padded_batch(samples: list[dict | None], img_size: int, batch_size: int,
                  unreadable: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Exactly `batch_size` rows: the usable samples, then zero images labeled -1. A sample whose image or label
    cannot be read is skipped, as in training, and named in `unreadable`."""
    images = torch.zeros(batch_size, 3, img_size, img_size, dtype=torch.uint8)
    labels = torch.full((batch_size,), -1, dtype=torch.long)
    row = 0
    for sample in samples:
        if sample is None:  # lost to a shard break, which is warned about where it broke
            continue
        try:
            images[row], labels[row] = eval_resize(image_bytes(sample), img_size), label_of(sample)
        except BadImageError as err:  # a BadLabelError too
            unreadable.append(f"{sample_name(sample)}: {err}")
            continue
        row += 1
    return images, labels


def _left_out(unreadable: list[str]) -> str:
    """One warning for the samples an evaluation left out, naming the first few."""
    named = "; ".join(unreadable[:EVAL_SKIPS_NAMED])
    more = f"; and {len(unreadable) - EVAL_SKIPS_NAMED} more" if len(unreadable) > EVAL_SKIPS_NAMED else ""
    return (f"evaluation left out {counted(len(unreadable), 'unreadable sample')}: {named}{more} "
            "(tools/inspect_shards.py lists every one)")


def first_images(shards: list[Shard], count: int, img_size: int) -> torch.Tensor:
    """The first `count` decodable images of a shard set: uint8 [count, 3, S, S]."""
    samples = _samples_at(shards, 0, _samples_used(shards, None), UserWarning)  # every rank reads them alike
    decoded = (eval_image(sample, img_size) for sample in samples if sample is not None)
    images = list(itertools.islice((image for image in decoded if image is not None), count))
    if not images:
        raise ShardError(f"no readable image in {counted(len(shards), 'shard')} from {shards[0].url} on; see the "
                         "warnings above, and check the shards with tools/inspect_shards.py")
    return stack_images(images)


def _warn_of_break(shard: Shard, warning: type[Warning], reason: str) -> None:
    """Warn about a break that resolving the shards did not find (damage that kept a local file's size, a remote
    shard)."""
    if not shard.warned_broken:
        warnings.warn(break_warning(shard.url, reason), warning, stacklevel=2)
