"""Shard lists and raw sample reading.

`resolve_shards` turns `data.train` (a directory with `_info.json`, or a brace URL) into shards with known sample
counts (from `_info.json` for local shards beside theirs), refusing `pipe:` URLs unless allowed and failing before
training on a missing shard, an empty list or counts that disagree with complete files; a truncated local shard is
warned about and streams up to its break. `read_samples` yields a shard's raw samples (bytes per field, nothing
decoded) from a given sample index on, skipping earlier members without reading their payload when the file is
seekable.

References: webdataset 1.0 key rules (key = basename up to the first dot); timm `reader_wds.py` (`_info.json`).
"""

from __future__ import annotations

import io
import itertools
import json
import os
import re
import subprocess
import tarfile
import warnings
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO
from urllib.parse import urlparse

import braceexpand
import webdataset as wds
from PIL import Image
from webdataset.gopen import rewrite_url

from ..config import DEFAULT_MAX_IMAGE_PIXELS
from ..text import counted
from .info import (
    INFO_NAME,
    InfoError,
    count_tar_samples,
    listed_shards,
    load_info,
    sample_members,
    split_classes,
    unfinished_conversion,
)

COMMAND_EXIT_WAIT = 10  # seconds; a command still running then is stopped, and its stream's read error reported


class ShardError(InfoError, RuntimeError):
    """A shard list that cannot be trained on. A subclass of `info.InfoError` (raised by the `_info.json` and tar
    checks), so catching that one class catches every shard problem."""


class StreamError(ShardError):
    """Unfit samples met while reading one process's share of the shards: unlike the shard set's own faults, this
    may concern that process only."""


class SampleWarning(UserWarning):
    """A warning about the samples one process read (one it skipped, a shard that broke under it): as for
    `StreamError`, each process has its own."""


def missing_split(root: Path, info: dict, split: str, split_key: str) -> str:
    if unfinished := unfinished_conversion(root, split):  # not another split: the one asked for is coming
        return unfinished
    if not (splits := sorted(info.get("splits", {}))):
        return f"{root}/_info.json lists no split; make the shards with tools/make_shards.py --split {split}"
    return f"{root}/_info.json has no split {split!r}; it has {', '.join(splits)}: set {split_key} to one of them"


@dataclass(frozen=True)
class Shard:
    url: str
    num_samples: int
    num_bytes: int | None = None
    """The file size `_info.json` records, if any: a local shard of this size is trusted without a header scan."""
    recorded: bool = False
    """A local file counted by the `_info.json` beside it, which the start of training checks (`_verify_counts`)."""
    warned_broken: bool = False
    """Resolving the shards found this one broken and warned (`_verify_counts`), so reading it does not warn again.
    Set then, since what the file looks like later (truncated or deleted during the run) cannot tell."""


def resolve_shards(spec: str, split: str = "train", allow_pipe: bool = False, verify: bool = True,
                   info: str | None = None, split_key: str = "the split") -> list[Shard]:
    """Shards of `spec` with their sample counts.

    Args:
        spec: a directory holding `_info.json` (its `split` entry is used) or a brace URL / path pattern.
        split_key: the setting that chose `split` (e.g. `data.val_split`), named when `_info.json` lacks it.
        allow_pipe: allow `pipe:` URLs, which run a shell command.
        verify: for local shards that an `_info.json` describes (a shard directory, or a pattern of the files beside
            it), count the samples of every shard whose size is not the recorded one (tar headers only) and compare
            with `_info.json`.
        info: a local `_info.json` or its directory giving the sample counts of the URLs in `spec`, in order.
    """
    _refuse_commands(expand(spec), spec, allow_pipe)  # before any is read, as a pattern's counts would be
    path = local_path(spec)
    if is_local(spec) and "{" not in spec and not path.exists():
        wildcard = " (wildcards are not expanded: write train-{000000..000009}.tar)" if set("*?") & set(spec) else ""
        raise ShardError(f"{spec} does not exist: give a shard directory made by tools/make_shards.py, or a brace "
                         f"pattern of .tar files{wildcard}")
    if is_local(spec) and path.is_file() and not path.name.endswith((".tar", ".tar.gz", ".tgz")):
        # read as a shard, its bytes were reported as a damaged tar of 0 samples
        directory = f" ({path.parent} holds {INFO_NAME})" if (path.parent / INFO_NAME).is_file() else ""
        raise ShardError(f"{spec} is a file but not a .tar shard: give the shard directory made by "
                         f"tools/make_shards.py{directory}, or a brace pattern of .tar files")
    if path.is_dir():
        shards = _from_info(path, split, split_key)
    elif info is not None:
        shards = _urls_with_info_counts(spec, info, split, split_key)
    else:
        shards = _from_pattern(spec)
    if not shards:
        raise ShardError(f"no shards found for {spec!r} (split {split!r}); create them with tools/make_shards.py")
    missing = [s.url for s in shards if is_local(s.url) and not local_path(s.url).exists()]
    if missing:
        raise ShardError(f"{spec!r} lists {counted(len(missing), 'missing shard')}, e.g. {missing[0]}; restore them "
                         "or re-run tools/make_shards.py (tools/inspect_shards.py DIR lists every problem)")
    _refuse_commands([shard.url for shard in shards], spec, allow_pipe)
    if verify:
        broken = _verify_counts([shard for shard in shards if shard.recorded], spec)
        shards = [replace(shard, warned_broken=True) if shard.url in broken else shard for shard in shards]
    return shards


def _refuse_commands(urls: list[str], spec: str, allow_pipe: bool) -> None:
    """Refuse `pipe:` URLs, which run a shell command, unless allowed: as webdataset will open them, after the
    rewrites the GOPEN_REWRITE environment variable asks for, and whatever the case (`PIPE:`)."""
    if not allow_pipe and any(urlparse(url if is_local(url) else rewrite_url(url)).scheme == "pipe" for url in urls):
        raise ShardError(f"refusing to run the shell command in shard URL {spec!r}; set data.allow_pipe=true "
                         "(tools/visualize.py: --allow-pipe) if you trust it")


def expand(spec: str) -> list[str]:
    """The URLs of a brace pattern (`train-{000000..000009}.tar`, `{a,b}.tar`)."""
    try:
        return list(braceexpand.braceexpand(spec))
    except braceexpand.UnbalancedBracesError as err:
        raise ShardError(f"{spec!r} has unbalanced braces ({err}); write a range as train-{{000000..000009}}.tar") \
            from None


def info_directory(spec: str, info: str | None = None) -> Path | None:
    """The directory of the `_info.json` describing `spec`: `spec` itself when it is a shard directory, else that of
    `info` (`data.info`: the file or its directory), else the directory of a local shard file or pattern when it
    holds one (make_shards wrote them together); None when there is none."""
    if local_path(spec).is_dir():
        return local_path(spec)
    if info is not None:
        if Path(info).is_file() and Path(info).name != INFO_NAME:  # its directory's _info.json would be read instead
            raise ShardError(f"data.info={info} is not an {INFO_NAME}: give the {INFO_NAME} that tools/make_shards.py "
                             "wrote (or its directory), under that name (tools/visualize.py: --info)")
        return Path(info).parent if Path(info).is_file() else Path(info)
    if is_local(spec):
        folder = local_path(expand(spec)[0]).parent
        if (folder / INFO_NAME).is_file():
            return folder
    return None


def labeled_classes(spec: str, info: str | None, split: str, split_key: str, needed_by: str) -> list[str] | None:
    """The classes labelling `split` of `spec` by its `_info.json` (see `info_directory`), None without one.

    Raises:
        ShardError: the split is unlabeled; the message names the labeled splits beside it, to set `split_key` to.
    """
    root = info_directory(spec, info)
    if root is None:
        return None
    meta = load_info(root)
    if split not in meta.get("splits", {}):
        raise ShardError(missing_split(root, meta, split, split_key))
    classes = split_classes(meta, split)
    if classes:
        return classes
    labeled = [name for name in sorted(meta["splits"]) if split_classes(meta, name)]
    fix = (f"set {split_key} to a labeled split ({', '.join(labeled)})" if labeled else
           "make labeled shards (an ImageFolder tree, a labeled list, IDX or CIFAR data) with tools/make_shards.py")
    raise ShardError(f"{needed_by} needs labeled shards, but {root}/_info.json gives split '{split}' ({split_key}) no "
                     f"classes; {fix}")


def _from_info(root: Path, split: str, split_key: str) -> list[Shard]:
    info = load_info(root)
    splits = info.get("splits", {})
    if split not in splits:
        raise ShardError(missing_split(root, info, split, split_key))
    entry = splits[split]  # load_info has checked that its filenames, shard_lengths, shard_bytes and num_samples agree
    return [Shard(str(root / name), n, size, recorded=True) for name, n, size in listed_shards(entry)]


def _urls_with_info_counts(spec: str, info: str, split: str, split_key: str) -> list[Shard]:
    """Each URL with the count of the listed shard whose file name it holds (so a subset of the shards works), or,
    when some URL holds none, of the shard listed at its position."""
    root = info_directory(spec, info)
    listed = {Path(shard.url).name: shard.num_samples for shard in _from_info(root, split, split_key)}
    urls = expand(spec)
    names = [_listed_name(url, listed) for url in urls]
    if None not in names:
        return [Shard(url, listed[name]) for url, name in zip(urls, names, strict=True)]
    if len(urls) != len(listed):
        raise ShardError(f"{spec!r} expands to {len(urls)} shard URLs but {root}/_info.json lists {len(listed)} "
                         f"shards for split {split!r}, and {urls[names.index(None)]!r} holds none of their file "
                         "names; keep the shards' file names in the URLs, or give every listed shard in order")
    return [Shard(url, count) for url, count in zip(urls, listed.values(), strict=True)]


def _listed_name(url: str, listed: dict[str, int]) -> str | None:
    """The one listed file name that is a whole part of `url` (a path component or a word of a pipe: command)."""
    found = set(re.split(r"[/\s:?#]", url)) & listed.keys()
    return found.pop() if len(found) == 1 else None


def _from_pattern(spec: str) -> list[Shard]:
    """The shards of a pattern of local files, counted as the `_info.json` beside them records (when make_shards
    wrote them), else by reading their tar headers."""
    urls = expand(spec)
    if not all(is_local(url) for url in urls):
        raise ShardError(f"remote shards {spec!r} need sample counts: set data.info (tools/visualize.py: --info) to a "
                         "local copy of their _info.json, or point at a local shard directory")
    root = info_directory(spec)
    recorded = {} if root is None else {  # file name -> (samples, bytes)
        name: (n, size) for entry in load_info(root)["splits"].values() for name, n, size in listed_shards(entry)}
    # A missing file gets count 0 here and a clear error from resolve_shards right after.
    return [Shard(url, *recorded[local_path(url).name], recorded=True) if local_path(url).name in recorded
            else Shard(url, _count_readable(url) if local_path(url).exists() else 0) for url in urls]


def _count_readable(url: str) -> int:
    """A local tar's sample count; for a truncated one (with no `_info.json` to say how many it had), the samples
    before the break, with a warning."""
    try:
        return count_tar_samples(local_path(url))
    except InfoError as err:
        readable = sum(1 for _ in read_samples(url))
        _warn_broken(err, f"only its {readable} samples before the break are used")
        return readable


def _verify_counts(shards: list[Shard], spec: str) -> set[str]:
    """Fail on a complete shard whose count disagrees with `_info.json` (the data changed under it); warn about a
    truncated or corrupt one, whose samples after the break are then skipped (and counted, by training). Returns the
    URLs of the broken ones.

    A shard is scanned (its tar headers read) only when its size differs from the one make_shards recorded, or none
    is recorded: a scan costs about 0.2 ms a sample (minutes for ImageNet, on every rank at every start), a size
    check nothing. Damage that keeps the size is met when the shard is read, and counted then.
    """
    broken = set()
    for shard in shards:
        if local_path(shard.url).stat().st_size == shard.num_bytes:
            continue
        try:
            actual = count_tar_samples(local_path(shard.url))
        except InfoError as err:
            _warn_broken(err, "its samples after the break are skipped (training counts them in skipped_samples)")
            broken.add(shard.url)
            continue
        if actual != shard.num_samples:
            raise ShardError(
                f"{shard.url} holds {actual} samples but _info.json says {shard.num_samples}; re-run "
                f"tools/make_shards.py or tools/inspect_shards.py {spec}"
            )
    return broken


def _warn_broken(err: InfoError, consequence: str) -> None:
    """Training goes on without a broken shard's lost samples: one bad file should not stop a long run."""
    warnings.warn(f"{_one_line(err)}. Until then, {consequence}", stacklevel=2)


def _one_line(err: Exception) -> str:
    """An error's text on one line: tarfile lists each decompressor it tried on lines of their own."""
    return " ".join(str(err).split())


def is_local(url: str) -> bool:
    """A path or `file:` URL, as opposed to a URL webdataset opens (`pipe:`, `https:`, `s3:` ...); a local path may
    hold a colon itself."""
    return ":" not in url.split("/")[0] or url.startswith("file:") or Path(url).exists()


def local_path(url: str) -> Path:
    """The file of a local shard URL."""
    return Path(url.removeprefix("file:"))


def read_samples(url: str, start: int = 0, on_break: Callable[[str], None] | None = None,
                 expected: int | None = None) -> Iterator[dict[str, bytes]]:
    """Raw samples of one tar from sample index `start` on: {"__key__": key, "__url__": url, field: bytes, ...}.

    A truncated or corrupt tar (or a remote stream that breaks, or a `pipe:` command that fails) ends where it
    breaks; the callers know from the shard's sample count how many samples were lost, and count them as skipped.
    So does a stream that ends early but cleanly (a command that writes part of a shard and exits 0), when the
    shard's `expected` sample count is given. `on_break` gets the reason in one line; without it, the break is
    warned about here (`break_warning`).
    """
    source = url.removeprefix("file:") if is_local(url) else wds.gopen(url)
    read = start
    try:
        for sample in _tar_samples(source, start):
            read += 1
            sample["__url__"] = url  # webdataset's name for it: where a sample that cannot be used is
            yield sample
    except (tarfile.ReadError, OSError, EOFError, zlib.error) as err:  # zlib: a damaged .tar.gz (`_member_data`)
        _report_break(url, _break_reason(err, source), on_break)
        return
    if expected is not None and read < expected:
        held = f"{read}" if read > start else f"at most {start}"  # a read from `start` on never saw the earlier ones
        _report_break(url, f"it ended after {held} of its {expected} samples", on_break)


def padded(samples: Iterator[dict], count: int) -> Iterator[dict | None]:
    """The next `count` of `samples`, then None for each one a tar that broke or ended early did not hold."""
    read = 0
    for sample in itertools.islice(samples, count):
        read += 1
        yield sample
    yield from itertools.repeat(None, count - read)


def sample_name(sample: dict) -> str:
    """"SHARD:KEY" of a sample from `read_samples`, and the file make_shards made it from when its `.json` records
    one: what a user needs to find, fix or remove a sample that could not be used."""
    name = f"{sample['__url__']}:{sample['__key__']}"
    source = _recorded_source(sample.get("json"))
    return f"{name} (made from {source})" if source else name


def _recorded_source(meta: bytes | None) -> str | None:
    try:
        source = json.loads(meta)["source"]
    except (TypeError, ValueError, KeyError):  # no .json, not JSON, or no source: another tool wrote the shard
        return None
    return source if isinstance(source, str) else None


def _report_break(url: str, reason: str, on_break: Callable[[str], None] | None) -> None:
    if on_break is not None:
        on_break(reason)
    elif not is_local(url):  # a local file is checked, and a truncated one warned about, before it is read
        warnings.warn(break_warning(url, reason), stacklevel=2)


def break_warning(url: str, reason: str) -> str:
    """What to tell the user about a shard that broke while read."""
    return f"{url} broke ({reason}); its samples after the break are skipped"


def _tar_samples(source: str | IO[bytes], start: int) -> Iterator[dict[str, bytes]]:
    with _open_tar(source) as tar:
        limits = MemberLimits.of(tar)
        sample = {}
        for index, key, member in sample_members(tar):
            if index < start:  # earlier payloads are never read: a seekable tar just skips them
                continue
            if key != sample.get("__key__"):
                if sample:
                    yield sample
                sample = {"__key__": key}
            limits.check(member)
            sample[member.name[len(key) + 1 :].lower()] = _member_data(tar, member)
        if sample:
            yield sample


def _member_data(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    """A member's bytes, read from the archive directly: a third of the cost of `extractfile`, which wraps every
    member in two file objects. Sparse members (GNU tar's holes) need its map."""
    if member.sparse is not None:
        return tar.extractfile(member).read()
    tar.fileobj.seek(member.offset_data)  # a stream only moves forward: it is there already
    data = tar.fileobj.read(member.size)
    if len(data) != member.size:
        raise tarfile.ReadError("unexpected end of data")
    return data


@dataclass(frozen=True)
class MemberLimits:
    """What one tar's members may claim, checked before anything is allocated (a damaged header may claim
    gigabytes): no more than the bytes a plain local tar holds, nor than `max_member_bytes`."""

    file_size: int | None  # None for a stream or a .tar.gz, whose size is not known
    max_bytes: int

    @classmethod
    def of(cls, tar: tarfile.TarFile) -> MemberLimits:
        """Taken once per tar, not per member."""
        plain = isinstance(tar.fileobj, io.BufferedReader)
        return cls(os.fstat(tar.fileobj.fileno()).st_size if plain else None, max_member_bytes())

    def check(self, member: tarfile.TarInfo) -> None:
        """Raise ReadError (a break) for a member that claims too much."""
        stored = member.size if member.sparse is None else 0  # a sparse member stores less than its size
        if self.file_size is not None and member.offset_data + stored > self.file_size:
            raise tarfile.ReadError("unexpected end of data")
        if member.size > self.max_bytes:
            raise tarfile.ReadError(f"member {member.name} claims {member.size} bytes, more than any image within "
                                    "the pixel limit (data.max_image_pixels) takes")


def max_member_bytes() -> int:
    """The largest member read: an image at the pixel limit stored raw in 16-bit RGBA, plus 16 MiB of metadata (the
    bomb guard refuses any image that needs more)."""
    return (Image.MAX_IMAGE_PIXELS or DEFAULT_MAX_IMAGE_PIXELS) * 8 + 2**24


def _open_tar(source: str | IO[bytes]) -> tarfile.TarFile:
    if isinstance(source, str):
        return tarfile.open(source, mode="r:*")  # a local file, plain or gzip-compressed
    return tarfile.open(fileobj=source, mode="r|*")  # a stream: read once, in order


def _break_reason(err: Exception, source: str | IO[bytes]) -> str:
    """One line on why a shard broke: a failed command's exit status (webdataset runs `pipe:` URLs, and its remote
    reads, as a subprocess), else the read error."""
    command = getattr(source, "proc", None)
    if command is not None:
        try:
            status = command.wait(timeout=COMMAND_EXIT_WAIT)
        except subprocess.TimeoutExpired:  # still writing a stream nobody reads any more
            command.kill()
            status = None
        if status:
            return f"its command exited with status {status}"
    return _one_line(err)
