"""A split's shards on disk: the writer that renames each shard into place only when complete, and the journal that
lets an interrupted conversion resume without a duplicated or a lost sample.

Each shard is written as ``.tar.tmp`` (sorted members, constant headers, so the same input gives byte-identical
shards) and renamed when complete; then ``OUT/_progress_{split}.json`` records it with the order position it reached.
Re-running checks the recorded shards (sample counts), keeps them, deletes temporary files and continues from the
recorded position. The journal is removed once ``_info.json`` lists the split.

References: webdataset ``TarWriter`` (sorted members, constant mtime); img2dataset (resume by completed shards).
"""

import gzip
import io
import json
import os
import re
import shutil
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mae_tnt.atomic import json_bytes, write_json_atomic
from mae_tnt.data.encode import EncodedImage
from mae_tnt.data.info import (
    INFO_NAME,
    REPLACEMENT_STAGES,
    InfoError,
    count_tar_samples,
    journal_path,
    load_info,
    remove_split,
    replaced_split_dir,
)


class ConversionError(ValueError):
    """The conversion cannot run or finish as asked; the message says what to change."""


def discard_split(out: Path, split: str) -> None:
    """Delete everything of ``split`` in ``out``: its shards (finished or not), journal and ``_info.json`` entry."""
    for path in shard_files(out, split) + shard_files(out, split, temporary=True):
        path.unlink()
    journal_path(out, split).unlink(missing_ok=True)
    remove_split(out, split)


@contextmanager
def replacing_split(out: Path, split: str) -> Iterator[None]:
    """Replace ``split`` without losing it to a conversion that fails: its shards and ``_info.json`` entry (or an
    unfinished conversion's journal) wait in `replaced_split_dir` while the new split is written, and are deleted once
    it is complete. A conversion that fails or is interrupted removes what it wrote and puts the old split back.

    Each stage ends with a rename, so a conversion killed outright (SIGKILL, power loss) leaves a state the next
    ``--overwrite`` finishes first: a split half set aside or half put back returns to OUT whole, and one set aside
    whole stays the split being replaced (the new split the killed run half wrote is dropped).
    """
    _finish_interrupted_stages(out, split)
    if replaced_split_dir(out, split).is_dir():
        discard_split(out, split)
    else:
        _set_split_aside(out, split)
    try:
        yield
    except BaseException:
        discard_split(out, split)
        _put_split_back(out, split)
        raise
    discard_replaced_split(out, split)


def discard_replaced_split(out: Path, split: str) -> None:
    """Delete what `replacing_split` kept of ``split``: once a new split is complete, the old one is obsolete."""
    kept = replaced_split_dir(out, split)
    if kept.is_dir():  # gone at once, whatever interrupts the deletion
        kept.rename(replaced_split_dir(out, split, ".done"))
    for stage in REPLACEMENT_STAGES:
        shutil.rmtree(replaced_split_dir(out, split, stage), ignore_errors=True)


def _finish_interrupted_stages(out: Path, split: str) -> None:
    setting_aside = replaced_split_dir(out, split, ".tmp")
    if setting_aside.is_dir():  # the old split's other shards are still in OUT, with its _info.json entry
        for path in _split_files(setting_aside, split):
            path.rename(out / path.name)
        shutil.rmtree(setting_aside)
    if replaced_split_dir(out, split, ".back").is_dir():
        _put_split_back(out, split)
    shutil.rmtree(replaced_split_dir(out, split, ".done"), ignore_errors=True)


def _set_split_aside(out: Path, split: str) -> None:
    setting_aside = replaced_split_dir(out, split, ".tmp")
    setting_aside.mkdir()
    if (out / INFO_NAME).is_file() and split in (info := load_info(out))["splits"]:
        write_json_atomic(setting_aside / INFO_NAME, info)
    for path in _split_files(out, split):
        path.rename(setting_aside / path.name)
    setting_aside.rename(replaced_split_dir(out, split))  # the old split is now whole in one place
    discard_split(out, split)  # temporary shards and _info.json entry of the split


def _put_split_back(out: Path, split: str) -> None:
    kept, putting_back = replaced_split_dir(out, split), replaced_split_dir(out, split, ".back")
    if kept.is_dir():
        kept.rename(putting_back)
    for path in _split_files(putting_back, split):
        path.rename(out / path.name)
    if (putting_back / INFO_NAME).is_file():  # merged into the present file: other splits may have changed since
        old = load_info(putting_back)
        info = load_info(out) if (out / INFO_NAME).is_file() else {**old, "splits": {}}
        present = {**info["splits"], split: old["splits"][split]}
        order = [*old["splits"], *(name for name in present if name not in old["splits"])]  # the split's old place
        info["splits"] = {name: present[name] for name in order if name in present}
        info["classes"] = info.get("classes") or old.get("classes", [])
        write_json_atomic(out / INFO_NAME, info)
    shutil.rmtree(putting_back)


def _split_files(folder: Path, split: str) -> list[Path]:
    """What `replacing_split` moves of ``split``: its finished shards and, for an unfinished conversion, its journal
    (put back with them, the conversion resumes as before)."""
    journal = journal_path(folder, split)
    return shard_files(folder, split) + ([journal] if journal.is_file() else [])


def shard_name(split: str, index: int, compress: bool = False) -> str:
    return f"{split}-{index:06d}.tar" + (".gz" if compress else "")


def shard_files(out: Path, split: str, temporary: bool = False) -> list[Path]:
    """Files named like (temporary) shards of ``split``, compressed or not (exactly, so split "a" never matches
    shards of split "a-b")."""
    pattern = re.compile(rf"{re.escape(split)}-\d{{6}}\.tar(\.gz)?" + (r"\.tmp" if temporary else ""))
    return [path for path in out.glob(f"{split}-*") if pattern.fullmatch(path.name)]


def refuse_a_finished_split(out: Path, split: str) -> None:
    """Shards of `split` without the journal of an unfinished conversion are a finished (or foreign) run's."""
    if not journal_path(out, split).is_file() and shard_files(out, split):
        raise ConversionError(f"{out} already holds shards of split '{split}' from a finished or foreign run. Pass "
                              "--overwrite to replace them, or choose another output directory.")


class Journal:
    """Completed shards of an unfinished conversion, in ``OUT/_progress_{split}.json``.

    Each entry: ``filename``, ``num_samples``, ``num_bytes`` (the file's size), ``end`` (first order position not
    consumed) and ``skipped`` (inputs skipped before ``end`` since the previous entry).
    """

    def __init__(self, path: Path, job: dict, shards: list[dict]):
        self.path, self.job, self.shards = path, job, shards

    @classmethod
    def open(cls, out: Path, split: str, job: dict) -> "Journal":
        """Resume the journal of this job, keeping the shards that still verify; or start a new one."""
        path = journal_path(out, split)
        for leftover in shard_files(out, split, temporary=True):
            leftover.unlink()
        shards = cls._recorded_shards(path, job) if path.is_file() else []
        # Renamed into place but never recorded (the run stopped in between): rewritten by this run, so its space is
        # freed first. Saved before any shard is renamed into place, so a shard without a journal is never ours.
        remove_stale_shards(out, split, keep={shard["filename"] for shard in shards})
        journal = cls(path, job, shards)
        journal._save()
        return journal

    @staticmethod
    def _recorded_shards(path: Path, job: dict) -> list[dict]:
        """The journal's shards that still verify, if it was written for the same job."""
        try:
            recorded = json.loads(path.read_text(encoding="utf-8"))
            recorded_job, shards = recorded["job"], recorded["shards"]
        except (ValueError, KeyError, TypeError) as err:
            raise ConversionError(f"{path}, the record of an unfinished conversion, is corrupt ({err}); pass "
                                  "--overwrite to start the split over") from None
        if recorded_job != job:
            raise ConversionError(
                f"{path} belongs to an unfinished conversion with other settings "
                f"({_differences(recorded_job, job)}). "
                "Re-run the original command to finish it, or pass --overwrite to start over."
            )
        return _verified_prefix(path.parent, shards)

    @property
    def num_samples(self) -> int:
        return sum(shard["num_samples"] for shard in self.shards)

    @property
    def next_position(self) -> int:
        return self.shards[-1]["end"] if self.shards else 0

    @property
    def skipped(self) -> list[dict]:
        return [skip for shard in self.shards for skip in shard["skipped"]]

    def add(self, filename: str, num_samples: int, num_bytes: int, end: int, skipped: list[dict]) -> None:
        self.shards.append({"filename": filename, "num_samples": num_samples, "num_bytes": num_bytes, "end": end,
                            "skipped": skipped})
        self._save()

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)

    def _save(self) -> None:
        write_json_atomic(self.path, {"job": self.job, "shards": self.shards})


def _differences(old: dict, new: dict) -> str:
    return ", ".join(f"{key}: {old.get(key)!r} -> {new[key]!r}" for key in new if old.get(key) != new[key])


def _verified_prefix(out: Path, shards: list[dict]) -> list[dict]:
    """The recorded shards up to the first one that is missing or whose sample count disagrees, with their sizes
    (which a journal of an older version lacks)."""
    for index, shard in enumerate(shards):
        path = out / shard["filename"]
        try:
            intact = path.is_file() and count_tar_samples(path) == shard["num_samples"]
        except InfoError:
            intact = False
        if not intact:
            return shards[:index]
        shard["num_bytes"] = path.stat().st_size
    return shards


def remove_stale_shards(out: Path, split: str, keep: set[str]) -> None:
    """Delete shards of ``split`` that a crashed run renamed but never recorded."""
    for path in shard_files(out, split):
        if path.name not in keep:
            path.unlink()


def shard_members(key: str, image: EncodedImage, classes: list[str]) -> dict[str, bytes]:
    """Tar members of one sample, named ``{key}.{extension}``."""
    meta = {"source": image.source, "width": image.width, "height": image.height}
    members = {f"{key}.{image.extension}": image.data}
    if image.label is not None:
        meta["label"] = classes[image.label]
        members[f"{key}.cls"] = str(image.label).encode("ascii")
    members[f"{key}.json"] = json_bytes(meta)
    return members


class ShardWriter:
    """Writes samples into numbered tar shards; a shard keeps a ``.tmp`` name until it is complete."""

    def __init__(self, out: Path, split: str, first_shard: int, compress: bool = False):
        self.out, self.split, self.shard_index, self.compress = out, split, first_shard, compress
        self.count = self.payload_bytes = 0
        self._file = self._gzip = self._tar = None

    def add(self, members: dict[str, bytes]) -> None:
        """Append one sample's members, in sorted order, with constant headers (reproducible tars)."""
        if self._tar is None:
            self._file = open(self._tmp_path(), "wb")
            # gzip with mtime 0 so that compressed shards are reproducible too
            self._gzip = gzip.GzipFile(fileobj=self._file, mode="wb", mtime=0) if self.compress else None
            self._tar = tarfile.open(fileobj=self._gzip or self._file, mode="w", format=tarfile.USTAR_FORMAT)
        for name in sorted(members):
            # TarInfo defaults are constant: mtime 0, mode 0o644, uid/gid 0, empty user and group names.
            header = tarfile.TarInfo(name)
            header.size = len(members[name])
            self._tar.addfile(header, io.BytesIO(members[name]))
            self.payload_bytes += header.size
        self.count += 1

    def close_shard(self) -> tuple[str, int, int]:
        """Finish the open shard, flush it to disk and rename it; return its file name, sample count and size."""
        self._tar.close()
        if self._gzip is not None:
            self._gzip.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        filename, count = shard_name(self.split, self.shard_index, self.compress), self.count
        os.replace(self._tmp_path(), self.out / filename)
        self._file = self._tar = None
        self.shard_index, self.count, self.payload_bytes = self.shard_index + 1, 0, 0
        return filename, count, (self.out / filename).stat().st_size

    def _tmp_path(self) -> Path:
        return self.out / (shard_name(self.split, self.shard_index, self.compress) + ".tmp")
