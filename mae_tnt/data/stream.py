"""The training stream: a pure function of (seed, epoch, rank, worker, position).

Each epoch, the shard list is shuffled with a seed shared by every rank, and the concatenated sample sequence is cut
into one contiguous range per global worker (rank x workers + worker). Every range holds the same whole number of
batches, so all ranks run the same number of steps and never hang on uneven shards, and ranges are disjoint, so no
two workers see the same sample. The ranges start at an epoch-seeded offset and wrap around the sequence's end, so
the samples left over (fewer than a batch per worker) are other ones every epoch, even when one shard holds them
all. A worker reads its range in chunks, shuffles each chunk with a seeded permutation, and batches inside the
worker. A corrupt image is skipped, counted, and replaced by the next sample of the stream, so batches stay full:
that sample lies past the worker's range (the next range, wrapping around), so each corrupt sample makes one good
one appear twice in the epoch.

Every batch carries its role (which range it came from) and the worker's stream position after it. `StreamState`
keeps the latest position per role; a resumed loader fast-forwards each role to its position by reading raw tar
members, never decoding what it skips, and rotates the roles so batches arrive in exactly the original order
(PyTorch's loader serves workers round-robin).

References: timm `reader_wds.py` (epoch-seeded shard shuffle before splitting by global worker, equal counts per
worker); webdataset issues #188 and #225 (DDP hangs with uneven shards) that this design avoids.
"""

from __future__ import annotations

import bisect
import random
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial

import torch
from torch.utils.data import IterableDataset, get_worker_info

from ..text import counted
from .images import BadImageError, image_bytes
from .shards import (
    SampleWarning,
    Shard,
    ShardError,
    StreamError,
    break_warning,
    is_local,
    padded,
    read_samples,
    sample_name,
)
from .transforms import stack_images

SampleTransform = Callable[[bytes, random.Random], object]
"""Encoded image bytes + the sample's own RNG -> uint8 [3, S, S] (or a deferred item decoded on the device, see
`device_decode`); must be picklable (loader workers)."""

INSPECT_ADVICE = "check the shards with tools/inspect_shards.py"
REMOTE_ADVICE = "read the URLs yourself to see why they fail (run a pipe: URL's command in a shell)"
FAILED_OPENS = 3
"""Remote or `pipe:` shard reads in a row that may give no sample before the stream gives up: a wrong host, bucket
or command fails every shard, and each failed read can take a minute of retries (curl's), so waiting for a whole
epoch of lost samples could take days."""
SKIPS_NAMED = 20  # skipped samples a run names, with the reason; one bad shard could otherwise flood the log


class LostSampleError(BadImageError):
    """A sample that its shard broke before: a truncated file, or a download or command that failed."""


@dataclass
class StreamPlan:
    """Geometry of one epoch: how many batches each global worker yields."""

    num_samples: int
    global_workers: int
    batch_size: int

    @property
    def batches_per_worker(self) -> int:
        return self.num_samples // (self.global_workers * self.batch_size)

    @property
    def samples_per_worker(self) -> int:
        return self.batches_per_worker * self.batch_size


@dataclass
class StreamState:
    """Where every worker role of this rank stands inside the current epoch."""

    epoch: int = 0
    batches: int = 0
    """Batches this rank consumed in the epoch."""
    positions: dict[int, int] = field(default_factory=dict)
    """role -> raw stream position after its last consumed batch."""
    next_role: int = 0
    """Role that serves the next batch (PyTorch's loader cycles through workers)."""
    skipped: int = 0
    """Corrupt or unreadable samples skipped so far (this rank, whole run)."""
    named: int = 0
    """Skipped samples named in a warning so far (this process); not saved, so a resumed run names its own."""

    def record(self, batch: dict, num_workers: int) -> None:
        """Account for a batch the training loop took (in the main process, whichever worker made it)."""
        role = int(batch["role"])
        self.positions[role] = int(batch["position"])
        self.next_role = (role + 1) % max(num_workers, 1)
        self.batches += 1
        self.skipped += int(batch["skipped"])
        for message in batch["breaks"]:  # said here, where the run shows each warning once, not in every worker
            warnings.warn(message, SampleWarning, stacklevel=2)
        for skip in batch["skips"][: max(SKIPS_NAMED - self.named, 0)]:
            self.named += 1
            last = self.named == SKIPS_NAMED
            warnings.warn(f"skipped sample {skip}" + ("; further skips are only counted (skipped_samples in the "
                                                      "metrics)" if last else ""), SampleWarning, stacklevel=2)

    def start_epoch(self, epoch: int) -> None:
        self.epoch, self.batches, self.positions, self.next_role = epoch, 0, {}, 0

    def to_dict(self) -> dict:
        positions = {str(role): position for role, position in self.positions.items()}  # JSON keys are strings
        return {"epoch": self.epoch, "batches": self.batches, "positions": positions, "next_role": self.next_role,
                "skipped": self.skipped}

    @classmethod
    def from_dict(cls, data: dict) -> StreamState:
        positions = {int(k): int(v) for k, v in data["positions"].items()}
        return cls(data["epoch"], data["batches"], positions, data["next_role"], data["skipped"])


class ShardStream(IterableDataset):
    """Batches of uint8 images [B, 3, S, S] with labels [B] (-1 when unlabeled), for one rank.

    `transform` decodes and augments one sample with the RNG it is given, seeded from (seed, epoch, role, position),
    so every sample's augmentation is reproducible wherever the stream resumes.

    Set `state` before each `iter(DataLoader(...))`; the loader must not use persistent workers, so every epoch's
    workers start from the state's epoch and positions.
    """

    def __init__(self, shards: list[Shard], *, batch_size: int, transform: SampleTransform, seed: int, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0, chunk: int = 512):
        super().__init__()
        self.shards, self.batch_size, self.transform = shards, batch_size, transform
        self.seed, self.chunk = seed, chunk
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.plan = StreamPlan(sum(s.num_samples for s in shards), world_size * max(num_workers, 1), batch_size)
        if self.plan.batches_per_worker == 0:
            raise ShardError(
                f"{self.plan.num_samples} samples cannot fill one batch of {batch_size} for each of "
                f"{counted(self.plan.global_workers, 'worker')} (processes x data.num_workers); lower "
                "data.batch_size or data.num_workers"
            )
        self.state = StreamState()

    def batches_per_epoch(self) -> int:
        """Batches one rank yields per epoch."""
        return self.plan.batches_per_worker * max(self.num_workers, 1)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        role = (worker + self.state.next_role) % max(self.num_workers, 1)
        done = self._batches_done(role)
        stream = RoleStream(self, self.state.epoch, role, self.state.positions.get(role, 0))
        for _ in range(self.plan.batches_per_worker - done):
            yield stream.next_batch()

    def _batches_done(self, role: int) -> int:
        """Batches of `role` consumed so far in the epoch, from the round-robin order."""
        workers = max(self.num_workers, 1)
        first = self.state.next_role - self.state.batches  # role that served batch 0, modulo workers
        offset = (role - first) % workers
        return self.state.batches // workers + (1 if offset < self.state.batches % workers else 0)

    def epoch_offset(self, epoch: int) -> int:
        """Where the epoch's first range starts in its sample sequence, identical on every rank and worker."""
        return random.Random(f"{self.seed}-offset-{epoch}").randrange(self.plan.num_samples)

    def shard_order(self, epoch: int) -> list[Shard]:
        """The epoch's shard order, identical on every rank and worker."""
        order = list(self.shards)
        random.Random(f"{self.seed}-shards-{epoch}").shuffle(order)
        return order


class RoleStream:
    """The samples of one global worker's range in one epoch, chunk-shuffled, decoded and batched."""

    def __init__(self, stream: ShardStream, epoch: int, role: int, position: int):
        self.stream, self.epoch, self.position = stream, epoch, position
        self.global_role = stream.rank * max(stream.num_workers, 1) + role
        self.role = role
        order = stream.shard_order(epoch)
        self.order = order
        self.starts = [0]
        for shard in order:
            self.starts.append(self.starts[-1] + shard.num_samples)
        self.range_start = self.global_role * stream.plan.samples_per_worker + stream.epoch_offset(epoch)
        self.pending: list[tuple[int, dict]] = []
        self._reader: tuple[str, int, Iterator[dict]] = ("", -1, iter(()))
        self.last_break: tuple[str, str] | None = None  # (url, reason) of the last shard that broke: why samples went
        self.breaks: list[str] = []  # shards that broke since the last batch, to warn about (`_note_break`)
        self.failed_opens = 0  # remote shard reads in a row that gave no sample (`_check_remote_reads`)

    def next_batch(self) -> dict:
        images, labels, keys, skips, skipped = [], [], [], [], 0
        while len(images) < self.stream.batch_size:
            index, sample = self._next_raw()
            try:
                image, label = self._decode(sample, index), label_of(sample)
            except BadImageError as err:
                skipped += 1
                self._check_not_all_bad(skipped, err)
                if sample is not None and len(skips) < SKIPS_NAMED:  # a lost sample's shard break is warned about
                    skips.append(f"{sample_name(sample)}: {err}")
                continue
            images.append(image)
            labels.append(label)
            keys.append(sample["__key__"])
        # Deferred decoding leaves JPEGs encoded (decoded on the device) among other images decoded here
        stacked = stack_images(images) if all(isinstance(image, torch.Tensor) for image in images) else images
        breaks, self.breaks = self.breaks, []
        return {"images": stacked, "labels": torch.tensor(labels, dtype=torch.long), "keys": keys,
                "role": self.role, "position": self.position, "skipped": skipped, "skips": skips, "breaks": breaks}

    def _check_not_all_bad(self, skipped: int, err: Exception) -> None:
        """A whole epoch's worth of bad samples in a row means the data, not a few files, is broken."""
        if skipped > self.starts[-1]:
            raise StreamError(f"no readable image in {skipped} consecutive samples (last error: {err}); "
                             f"{self._advice(err)}")

    def _advice(self, err: Exception) -> str:
        """What to do about it: look at the shards, unless remote or `pipe:` reads failed, or the images are huge."""
        if not isinstance(err, LostSampleError):
            return f"{INSPECT_ADVICE}, and data.max_image_pixels if the images are very large"
        if self.last_break is None or is_local(self.last_break[0]):
            return INSPECT_ADVICE
        return REMOTE_ADVICE

    def _lost_to(self) -> str:
        if self.last_break is None:
            return "a truncated shard"
        url, reason = self.last_break
        return f"{url}, which broke ({reason})"

    def _decode(self, sample: dict, index: int) -> torch.Tensor:
        if sample is None:
            raise LostSampleError(f"sample lost to {self._lost_to()}")
        data = image_bytes(sample)
        rng = random.Random(f"{self.stream.seed}-{self.epoch}-{self.global_role}-{index}")
        return self.stream.transform(data, rng)

    def _next_raw(self) -> tuple[int, dict | None]:
        """Next (position, raw sample) in emission order; advances `position`."""
        if not self.pending:
            self._load_chunk()
        index, sample = self.pending.pop()
        self.position += 1
        return index, sample

    def _chunk_bounds(self, position: int) -> tuple[int, int]:
        """Emission positions [start, end) of the chunk holding `position`; chunks never straddle the range end."""
        quota, chunk = self.stream.plan.samples_per_worker, self.stream.chunk
        if position < quota:
            start = position - position % chunk
            return start, min(start + chunk, quota)
        start = quota + (position - quota) // chunk * chunk
        return start, start + chunk

    def _load_chunk(self) -> None:
        start, end = self._chunk_bounds(self.position)
        raw = self._read_range(start, end)  # [(stream index, sample or None)] in range order
        perm = list(range(len(raw)))
        random.Random(f"{self.stream.seed}-{self.epoch}-{self.global_role}-chunk{start}").shuffle(perm)
        emitted = [raw[i] for i in perm][self.position - start :]
        self.pending = emitted[::-1]  # pop() from the end yields emission order

    def _read_range(self, start: int, end: int) -> list[tuple[int, dict | None]]:
        """Raw samples at stream positions [start, end) of this role, wrapping around the epoch's samples."""
        total = self.starts[-1]
        out: list[tuple[int, dict | None]] = []
        position = start
        while position < end:
            absolute = (self.range_start + position) % total
            shard_index = bisect.bisect_right(self.starts, absolute) - 1
            offset = absolute - self.starts[shard_index]
            take = min(end - position, self.order[shard_index].num_samples - offset)
            samples = self._read_shard(self.order[shard_index], offset, take)
            out += [(position + i, sample) for i, sample in enumerate(samples)]
            position += take
        return out

    def _read_shard(self, shard: Shard, offset: int, count: int) -> list[dict | None]:
        """`count` raw samples from `offset`; samples lost to a truncated tar come back as None (then counted).

        The open reader is kept when the next chunk continues the same shard, so a shard is read once per epoch
        even from a non-seekable stream.
        """
        url, next_offset, reader = self._reader
        opened = url != shard.url or next_offset != offset
        if opened:
            reader = read_samples(shard.url, start=offset, on_break=partial(self._note_break, shard),
                                  expected=shard.num_samples)
        samples = list(padded(reader, count))
        self._reader = (shard.url, offset + count, reader)
        if opened and not is_local(shard.url):
            self._check_remote_reads(gave_samples=any(sample is not None for sample in samples))
        return samples

    def _check_remote_reads(self, gave_samples: bool) -> None:
        """Give up after `FAILED_OPENS` remote reads in a row without a sample, naming the last failure."""
        self.failed_opens = 0 if gave_samples else self.failed_opens + 1
        if self.failed_opens == FAILED_OPENS:
            raise StreamError(f"{FAILED_OPENS} remote shard reads in a row gave no sample, the last from "
                              f"{self._lost_to()}; {REMOTE_ADVICE}")

    def _note_break(self, shard: Shard, reason: str) -> None:
        """Remember why samples went missing; warn about a break the start of training did not find (a remote or
        `pipe:` shard, a local one it trusted by its size, or one truncated or deleted since)."""
        self.last_break = (shard.url, reason)
        if not shard.warned_broken:
            self.breaks.append(f"{break_warning(shard.url, reason)} and counted (skipped_samples in the metrics)")


MAX_LABEL_DIGITS = 18


class BadLabelError(BadImageError):
    """A `.cls` member that is not a class index: the sample is skipped like an undecodable image."""


def label_of(sample: dict) -> int:
    """The sample's class index; -1 when it has no `.cls`."""
    value = sample.get("cls")
    if not value:
        return -1
    # ASCII digits alone: int() would also take b"-1", read as no label, or b"+3"; and few of them, since int() refuses
    # over 4300 (no class index is that long)
    digits = value.strip()
    if not digits.isdigit() or len(digits) > MAX_LABEL_DIGITS:
        raise BadLabelError(f"its .cls {value[:40]!r} is not a class index (tools/make_shards.py writes those)")
    return int(digits)
