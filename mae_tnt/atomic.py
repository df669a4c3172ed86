"""Replacing files and directories so that readers, and a run stopped mid-write, see the old one or the new one whole.

Everything is written under `temporary_name(final)` beside its final path, then renamed over it: a rename within one
directory is atomic on POSIX file systems. The data and the rename are flushed to disk, so a power cut cannot leave the
new name pointing at a file whose data never reached it. `write_json_atomic` writes JSON this way (`json_bytes`
keeps any file name it holds), and `file_in_the_way` finds what would keep an output directory from being created.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def temporary_name(final: Path) -> Path:
    """Where `final` is written before it replaces the old one: hidden, in the same directory, with the same suffix
    (PIL picks an image's format from it)."""
    return final.with_name(f".tmp-{final.name}")


@contextmanager
def atomic_file(final: Path) -> Iterator[Path]:
    """Yield the temporary path to write; once the block returns, it replaces `final`. A block that raises leaves
    `final` as it was and removes the partial file."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(final)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync(final.parent)


def replace_dir(tmp: Path, final: Path) -> None:
    """Put the complete directory `tmp` in place of `final`, both flushed to disk.

    A directory cannot be renamed over a non-empty one, so an older `final` is renamed aside first and removed
    last: a run stopped between the two renames leaves it whole under `aside_name(final)`, which `restore_aside`
    (called here, and by the run that continues) puts back.
    """
    sync_tree(tmp)
    restore_aside(final)
    aside = aside_name(final)
    shutil.rmtree(aside, ignore_errors=True)  # left by a run stopped after both renames: `final` is whole
    if final.exists():
        os.replace(final, aside)
    os.replace(tmp, final)
    _fsync(final.parent)
    shutil.rmtree(aside, ignore_errors=True)


def aside_name(final: Path) -> Path:
    """Where `replace_dir` keeps the directory it replaces until the new one is in place."""
    return final.with_name(f".old-{final.name}")


def restore_aside(final: Path) -> None:
    """Put back the older `final` that a `replace_dir` stopped between its renames left aside (main process only, as
    `replace_dir`)."""
    if not final.exists() and aside_name(final).is_dir():
        os.replace(aside_name(final), final)


def sync_tree(root: Path) -> None:
    """Flush every file and directory under `root` to disk (torch and safetensors do not)."""
    for folder, _, files in os.walk(root):
        for name in files:
            _fsync(Path(folder) / name)
        _fsync(Path(folder))


def file_in_the_way(directory: str | Path) -> Path | None:
    """The file at `directory` or at one of its parents, which would keep it from being created; None if none."""
    path = Path(directory).absolute()
    for candidate in (path, *path.parents):
        if candidate.exists():
            return None if candidate.is_dir() else candidate
    return None


def json_bytes(obj: object, indent: int | None = None) -> bytes:
    """``obj`` as UTF-8 JSON. A file name that is not valid UTF-8 reaches Python holding lone surrogates, which UTF-8
    cannot encode; each becomes the JSON escape ``\\udcXX``, which `json.loads` reads back to the same name (and
    `os.fsencode` to the file's bytes)."""
    return json.dumps(obj, indent=indent, ensure_ascii=False).encode("utf-8", "backslashreplace")


def write_json_atomic(path: Path, obj: object) -> None:
    """Write ``obj`` as JSON; readers never see a partial file."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(json_bytes(obj, indent=2) + b"\n")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
