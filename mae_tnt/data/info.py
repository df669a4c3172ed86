"""Read and write a shard directory's ``_info.json`` (timm's webdataset format) and count samples in a tar.

Layout of ``_info.json``::

    {"name": "fashion_mnist",
     "splits": {"train": {"name": "train", "num_samples": 2000,
                          "filenames": ["train-000000.tar", ...], "shard_lengths": [250, ...],
                          "shard_bytes": [1843200, ...], "skipped": [{"source": "...", "reason": "..."}]}},
     "classes": ["T-shirt/top", ...]}

``classes`` is empty for unlabeled data; ``skipped`` is written by the converter and optional for readers.
``shard_bytes`` (each shard's file size, written by the converter, optional for readers) lets training trust a shard
of the recorded size without reading its headers, so start-up does not grow with the dataset.
A sample in a tar is a run of consecutive members sharing a key: the member path up to the first dot of its
basename, directory included (webdataset's rule), so keys must contain no dots.

References:
    timm ``timm/data/readers/reader_wds.py`` (``_info.json`` splits, ``num_samples``, ``shard_lengths``).
    webdataset ``tariterators.base_plus_ext`` (sample keys).
"""

import json
import os
import tarfile
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path, PurePosixPath

from ..atomic import write_json_atomic

INFO_NAME = "_info.json"
JOURNAL_PREFIX = "_progress_"
TAR_BLOCK = 512
MAX_GZIP_RATIO = 1032  # the most deflate can shrink data (runs of one byte)


class InfoError(ValueError):
    """A malformed ``_info.json`` or a damaged shard."""


def load_info(root: str | os.PathLike) -> dict:
    """Load and check ``ROOT/_info.json``.

    Args:
        root: Shard directory.

    Returns:
        The parsed info dict; every split has ``num_samples``, ``filenames`` and ``shard_lengths`` that agree.

    Raises:
        FileNotFoundError: There is no ``_info.json`` in ``root``.
        InfoError: The file is not valid JSON or does not have timm's layout.
    """
    path = Path(root) / INFO_NAME
    if Path(root).is_file():
        parent = Path(root).parent
        beside = f" ({parent})" if (parent / INFO_NAME).is_file() else ""
        raise FileNotFoundError(f"{root} is a file: give the shard directory made by tools/make_shards.py that holds "
                                f"{INFO_NAME}{beside}")
    if not Path(root).exists():
        raise FileNotFoundError(f"{root} does not exist: give a shard directory made by tools/make_shards.py")
    if not path.is_file():
        if journals := unfinished_journals(root):  # make_shards writes _info.json last
            raise FileNotFoundError(f"{path} not found: the conversion into {root} was interrupted ({journals[0].name} "
                                    "records it); re-run tools/make_shards.py with the same arguments to finish it")
        raise FileNotFoundError(
            f"{path} not found: point to a directory made by tools/make_shards.py, or run it to create one"
        )
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InfoError(f"{path} is not valid JSON ({err}); regenerate it with tools/make_shards.py") from err
    _check_info(info, path)
    return info


def _check_info(info: object, path: Path) -> None:
    """Raise InfoError naming ``path`` unless ``info`` has the timm ``_info.json`` layout."""
    if not isinstance(info, dict) or not isinstance(info.get("splits"), dict):
        raise InfoError(f"{path}: expected an object with a 'splits' object; regenerate it with tools/make_shards.py")
    if not isinstance(info.get("classes", []), list):
        raise InfoError(f"{path}: 'classes' must be a list of names; regenerate it with tools/make_shards.py")
    for split, entry in info["splits"].items():
        where = f"{path}: split '{split}'"
        if not isinstance(entry, dict) or not {"num_samples", "filenames", "shard_lengths"} <= entry.keys():
            raise InfoError(f"{where} needs 'num_samples', 'filenames' and 'shard_lengths'")
        filenames, lengths = entry["filenames"], entry["shard_lengths"]
        if (not _list_of(filenames, str) or not _list_of(lengths, int) or len(filenames) != len(lengths)
                or min(lengths, default=0) < 0):
            raise InfoError(f"{where}: 'filenames' and 'shard_lengths' must be lists of equal length, of file names "
                             "and of sample counts")
        if odd := [name for name in filenames if not _inside_directory(name)]:
            raise InfoError(f"{where}: shard file name {odd[0]!r} is not a path inside {path.parent} (no URL, no "
                            "absolute path, no '..'); regenerate it with tools/make_shards.py")
        if sum(lengths) != entry["num_samples"]:
            raise InfoError(f"{where}: shard_lengths sum to {sum(lengths)} but num_samples is {entry['num_samples']}")
        if "shard_bytes" in entry and not (_list_of(entry["shard_bytes"], int)
                                           and len(entry["shard_bytes"]) == len(filenames)):
            raise InfoError(f"{where}: 'shard_bytes' must be a list with one size in bytes per file name")
        if "shard_bytes" in entry and (crowded := _more_samples_than_fit(entry)):
            raise InfoError(f"{where}: {crowded}; regenerate it with tools/make_shards.py")


def _more_samples_than_fit(entry: dict) -> str | None:
    """The first shard said to hold more samples than a tar of its recorded size can: each sample takes a 512-byte
    header at least, and gzip shrinks data at most 1032-fold. Trusted by its size, such a count would have training
    count one lost sample after another for as long as it claims (minutes to forever)."""
    for name, count, size in zip(entry["filenames"], entry["shard_lengths"], entry["shard_bytes"], strict=True):
        if count * TAR_BLOCK > size * (MAX_GZIP_RATIO if name.endswith((".gz", ".tgz")) else 1):
            return f"shard {name} is said to hold {count} samples in {size} bytes, more than a tar of that size can"
    return None


def _inside_directory(name: str) -> bool:
    """A relative path with no `..` and no URL scheme: joined to the directory `.`, `pipe:CMD` would be run as a
    shell command, and `/x.tar` or `../x.tar` would read files the directory does not hold."""
    parts = PurePosixPath(name).parts
    return bool(parts) and not PurePosixPath(name).is_absolute() and ".." not in parts and ":" not in parts[0]


def _list_of(value: object, kind: type) -> bool:
    """`value` is a list of `kind` (a bool is no count, though Python's bool is an int)."""
    return isinstance(value, list) and all(isinstance(v, kind) and not isinstance(v, bool) for v in value)


def update_split(
    root: str | os.PathLike,
    split: str,
    filenames: Sequence[str],
    shard_lengths: Sequence[int],
    classes: Sequence[str] | None = None,
    name: str | None = None,
    *,
    skipped: Sequence[dict] | None = None,
    labeled: bool | None = None,
    shard_bytes: Sequence[int] | None = None,
) -> dict:
    """Add or replace one split in ``ROOT/_info.json``, keeping the other splits, and write it atomically.

    Args:
        root: Shard directory (created if missing).
        split: Split name, e.g. "train".
        filenames: Shard file names relative to ``root``, in order.
        shard_lengths: Samples in each shard.
        classes: Class names indexed by label; None keeps the existing list (empty for unlabeled data).
        name: Dataset name; None keeps the existing one, or uses the directory name for a new file.
        skipped: ``{"source", "reason"}`` records of inputs left out of this split.
        labeled: whether the split's samples carry labels (``split_classes``); None leaves it unsaid.
        shard_bytes: each shard's file size in bytes; None leaves them unrecorded (their headers are then read at
            every start of training).

    Returns:
        The info dict as written.

    Raises:
        InfoError: ``classes`` differ from the classes of splits already in the file (labels would disagree),
            or the existing file is malformed.
    """
    root = Path(root)
    info = load_info(root) if (root / INFO_NAME).is_file() else {"name": root.resolve().name, "splits": {}}
    if classes is not None:
        _check_classes(info, root, split, classes)
        info["classes"] = list(classes)
    info.setdefault("classes", [])
    if name is not None:
        info["name"] = name
    entry = {"name": split, "num_samples": sum(shard_lengths), "filenames": list(filenames)}
    entry["shard_lengths"] = list(shard_lengths)
    if shard_bytes is not None:
        entry["shard_bytes"] = list(shard_bytes)
    if skipped is not None:
        entry["skipped"] = list(skipped)
    if labeled is not None:
        entry["labeled"] = labeled
    info["splits"][split] = entry
    write_json_atomic(root / INFO_NAME, info)
    return info


def listed_shards(entry: dict) -> list[tuple[str, int, int | None]]:
    """A split entry's shards as (file name, sample count, recorded file size or None when none is recorded)."""
    sizes = entry.get("shard_bytes", [None] * len(entry["filenames"]))
    return list(zip(entry["filenames"], entry["shard_lengths"], sizes, strict=True))


def split_classes(info: dict, split: str) -> list[str]:
    """The classes labelling `split`'s samples: the dataset's, or [] for a split of unlabeled images (e.g. STL-10's
    `unlabeled` beside its labeled `train`), which make_shards marks `"labeled": false`."""
    return info.get("classes", []) if info["splits"].get(split, {}).get("labeled", True) else []


def check_classes(root: str | os.PathLike, split: str, classes: Sequence[str] | None) -> None:
    """Refuse, before any work, a split whose classes differ from those of the splits already in ``ROOT``.

    Raises:
        InfoError: as ``update_split`` would after the conversion.
    """
    root = Path(root)
    if classes and (root / INFO_NAME).is_file():
        _check_classes(load_info(root), root, split, classes)


def _classes_option(classes: Sequence[str]) -> str:
    """The make_shards option that gives a split these classes, in this order."""
    listed = ",".join(classes)
    if len(listed) <= 200 and not any("," in name for name in classes):
        return f"--classes {listed}"
    return "--classes FILE with those classes, one per line in that order"


def _check_classes(info: dict, root: Path, split: str, classes: Sequence[str]) -> None:
    """Compare with the classes of the other labeled splits: a split that replaces the only one may bring its own."""
    old_classes = info.get("classes", [])
    others = {name for name in info.get("splits", {}) if name != split and split_classes(info, name)}
    if old_classes and others and list(classes) != old_classes:
        raise InfoError(
            f"{root / INFO_NAME} already has classes {old_classes}; split '{split}' has {list(classes)}. Labels "
            f"must mean the same in every split: pass {_classes_option(old_classes)}, or convert it into a separate "
            "directory."
        )


def remove_split(root: str | os.PathLike, split: str) -> None:
    """Drop ``split`` from ``ROOT/_info.json`` (the file goes with its last split, and the class list with it)."""
    path = Path(root) / INFO_NAME
    if not path.is_file():
        return
    info = load_info(root)
    info["splits"].pop(split, None)
    if info["splits"]:
        write_json_atomic(path, info)
    else:
        path.unlink()


def journal_path(root: str | os.PathLike, split: str) -> Path:
    """The progress journal ``make_shards`` keeps while a split's conversion is unfinished."""
    return Path(root) / f"{JOURNAL_PREFIX}{split}.json"


def unfinished_journals(root: str | os.PathLike) -> list[Path]:
    return sorted(Path(root).glob(f"{JOURNAL_PREFIX}*.json"))


REPLACED_PREFIX = ".replaced-"
REPLACEMENT_STAGES = (".tmp", "", ".back", ".done")
"""Suffixes of `replaced_split_dir` as `shard_writer.replacing_split` moves the old split: being set aside, set
aside, being put back, being deleted."""


def replaced_split_dir(out: Path, split: str, stage: str = "") -> Path:
    """Where `make_shards --overwrite` keeps the split it replaces until the new one is complete (`stage`: one of
    REPLACEMENT_STAGES)."""
    return out / f"{REPLACED_PREFIX}{split}{stage}"


def unfinished_conversion(root: Path, split: str) -> str | None:
    """What an interrupted make_shards left of `split` in `root` (its progress journal, or the earlier split an
    `--overwrite` set aside), with what finishes it; None when nothing is left."""
    if (journal := journal_path(root, split)).is_file():
        return (f"the conversion of split {split!r} into {root} was interrupted ({journal.name} records it); re-run "
                "tools/make_shards.py with the same arguments to finish it")
    if aside := [path for stage in REPLACEMENT_STAGES if (path := replaced_split_dir(root, split, stage)).is_dir()]:
        return (f"an interrupted tools/make_shards.py --overwrite of split {split!r} left it aside in {aside[0]}; "
                "re-run that command to finish it")
    return None


def sample_key(member_name: str) -> str | None:
    """Sample key of a tar member: the path up to the first dot of the basename; None without an extension."""
    directory, _, basename = member_name.rpartition("/")
    stem, dot, _ = basename.partition(".")
    if not dot or not stem:
        return None
    return f"{directory}/{stem}" if directory else stem


def sample_members(tar: tarfile.TarFile) -> Iterator[tuple[int, str, tarfile.TarInfo]]:
    """(sample index, sample key, member) of each member that belongs to a sample, in archive order.

    Consecutive regular files with the same key form one sample, as webdataset groups them; other members (folders,
    names without an extension) belong to none. Counting and reading share this, so their sample offsets agree.
    """
    index, previous_key = -1, None
    for member in tar:
        key = sample_key(member.name) if member.isreg() else None
        if key is None:
            continue
        if key != previous_key:
            index, previous_key = index + 1, key
        yield index, key, member


def count_tar_samples(path: str | os.PathLike) -> int:
    """Count the samples in a tar by reading member headers only (no member data).

    Samples are grouped as `sample_members` groups them.

    Args:
        path: A ``.tar`` shard.

    Returns:
        Number of samples.

    Raises:
        InfoError: The file is not a tar, or is truncated (a member's data or the end-of-archive block is
            missing); re-create the shard.
    """
    count = 0
    try:
        with tarfile.open(path, "r:*") as tar:  # plain or gzip-compressed
            for index, _, _ in sample_members(tar):
                count = index + 1
            end_offset = tar.offset
            tar.fileobj.seek(end_offset)
            end_block = tar.fileobj.read(TAR_BLOCK)
    except (tarfile.TarError, EOFError, zlib.error) as err:  # tarfile does not wrap a damaged .tar.gz's errors here
        raise InfoError(f"{path}: not a readable tar ({err}); it is truncated or corrupt, re-create it") from err
    # tarfile stops quietly at a header cut short or missing; a complete archive ends with zero blocks.
    if end_block != bytes(TAR_BLOCK):
        raise InfoError(f"{path}: truncated tar (no end-of-archive block at byte {end_offset}); re-create it")
    return count
