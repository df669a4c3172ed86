"""Dataset sources for the shard converter: list the samples of a dataset on disk and load each one.

A source is an indexable list of samples. ``source.record(i)`` returns a ``Record(source, payload, label)``:
``payload`` is the encoded bytes of an image file, or an in-memory uint8 array (IDX, CIFAR) of shape
``[H, W]`` or ``[H, W, 3]``. Listing is cheap and deterministic (sorted), and loading happens per sample, so
the converter can shuffle the index list first and load in its worker processes.

Formats (``detect_format`` picks one for ``--format auto``):

- ``imagefolder``: ``ROOT/<class>/**/<image>``; classes are the sorted sub-folder names.
- ``folder``: unlabeled images at any depth under ``ROOT``.
- ``list``: a text file with one path per line, or a CSV with a ``path`` header and an optional ``label``
  column (class names or integer ids); relative paths are relative to the list file.
- ``idx``: MNIST / Fashion-MNIST ``{train,t10k}-images-idx3-ubyte[.gz]`` plus the matching labels file.
- ``cifar``: CIFAR-10 (``data_batch_*``, ``test_batch``, ``batches.meta``) or CIFAR-100 (``train``,
  ``test``, ``meta``; fine labels) python batches.

In folders, files without an image extension (compared case-insensitively) are not loaded but reported in
``source.rejected``, so the converter lists them as skipped instead of dropping them silently.

References:
    IDX format: http://yann.lecun.com/exdb/mnist/ ("FILE FORMATS FOR THE MNIST DATABASE").
    CIFAR python batches: https://www.cs.toronto.edu/~kriz/cifar.html
    torchvision ``datasets.ImageFolder`` (sorted class folders).
"""

import codecs
import csv
import errno
import gzip
import math
import os
import pickle
import re
import stat
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .info import INFO_NAME

FORMATS = ("auto", "imagefolder", "folder", "list", "idx", "cifar")
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".pnm",
     ".avif", ".jp2", ".j2k", ".tga"}
)
# MNIST-style file prefixes per output split.
RELEASE_PARTS = {"train": "train", "val": "test", "test": "test"}
"""Split name -> the part of a fixed train/test release (IDX, CIFAR) it reads."""
IDX_PREFIXES = {"train": "train", "test": "t10k"}
IDX_UBYTE = 0x08
GZIP_MAGIC = b"\x1f\x8b"


class SourceError(ValueError):
    """The source dataset cannot be listed: missing files, wrong layout or inconsistent labels."""


class Record(NamedTuple):
    """One input sample: where it came from, its encoded bytes or uint8 pixels, and its label id (or None)."""

    source: str
    payload: bytes | np.ndarray
    label: int | None


@dataclass
class FileSource:
    """Images stored as files; ``paths`` are relative to ``root`` (or absolute) and double as source ids."""

    root: Path
    paths: list[str]
    labels: list[int] | None = None
    classes: list[str] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)

    def source_id(self, index: int) -> str:
        return self.paths[index]

    def record(self, index: int) -> Record:
        """Read the file's bytes (raises OSError when it is missing, unreadable or no regular file)."""
        label = None if self.labels is None else self.labels[index]
        path = self.root / self.paths[index]
        if not stat.S_ISREG(path.stat().st_mode):  # a named pipe waits for a writer forever, a device never ends
            raise OSError(errno.EINVAL, "not a regular file (a named pipe, socket or device)")
        return Record(self.paths[index], path.read_bytes(), label)


@dataclass
class ArraySource:
    """Images held in memory as uint8 arrays, ``images`` of shape [N, H, W] or [N, H, W, 3]."""

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]
    ids: list[str]
    rejected: list[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    def source_id(self, index: int) -> str:
        return self.ids[index]

    def record(self, index: int) -> Record:
        return Record(self.ids[index], np.ascontiguousarray(self.images[index]), int(self.labels[index]))


Source = FileSource | ArraySource


def open_source(
    src: str | os.PathLike, fmt: str = "auto", split: str = "train", classes: Sequence[str] | None = None
) -> Source:
    """List a dataset.

    Args:
        src: Dataset directory, or list file for ``fmt="list"``.
        fmt: One of ``FORMATS``; "auto" calls ``detect_format``.
        split: Output split; selects the files for IDX ("train" or "val"/"test") and CIFAR.
        classes: Class names in label order, to fix the class list (imagefolder, list) or to name integer
            labels (idx, list). CIFAR names its own classes.

    Returns:
        A ``FileSource`` or ``ArraySource``.

    Raises:
        SourceError: Unknown format, or the source does not match it.
    """
    src = Path(src)
    fmt = detect_format(src) if fmt == "auto" else fmt
    classes = None if classes is None else _distinct_classes(list(classes))
    if fmt == "imagefolder":
        return read_imagefolder(src, classes)
    if fmt == "folder":
        _reject_classes(classes, fmt)
        return read_folder(src)
    if fmt == "list":
        return read_list(src, classes)
    if fmt == "idx":
        return read_idx(src, split, classes)
    if fmt == "cifar":
        _reject_classes(classes, fmt)
        return read_cifar(src, split)
    raise SourceError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")


def _distinct_classes(classes: list[str]) -> list[str]:
    """`classes` when no name repeats: a repeated one would leave a label id that no sample carries."""
    if repeated := sorted({name for name in classes if classes.count(name) > 1}):
        raise SourceError(f"--classes names {', '.join(repeated)} more than once; give each class once, in label order")
    return classes


def _reject_classes(classes: list[str] | None, fmt: str) -> None:
    if classes is not None:
        raise SourceError(f"--classes does not apply to format {fmt!r}: it is unlabeled or names its own classes")


def detect_format(src: str | os.PathLike) -> str:
    """Guess the format of ``src`` for ``--format auto``.

    A file is a list; a directory with IDX or CIFAR files is that; a directory with sub-folders and no image
    files at its top level is an ImageFolder; any other directory is an unlabeled folder. Pass ``--format
    folder`` for unlabeled images that are only sorted into sub-folders.

    Raises:
        SourceError: ``src`` does not exist, is a shard directory, or holds both IDX and CIFAR files.
    """
    src = Path(src)
    if src.is_file():
        return "list"
    if not src.is_dir():
        raise SourceError(f"{src} does not exist; give a dataset directory or a list file")
    if release := _release_format(src):  # its files are read by name: shards written beside them do not matter
        return release
    if (src / INFO_NAME).is_file():  # read as a folder, its tars and JSON would all be skipped as non-images
        raise SourceError(f"{src} holds shards already ({INFO_NAME}): train on them as data.train={src}, or check "
                          "them with tools/inspect_shards.py; SRC is the dataset the shards are made from")
    has_dirs, top_images = _top_level(src)
    return "imagefolder" if has_dirs and not top_images else "folder"


def _release_format(folder: Path) -> str | None:
    """"idx" or "cifar" when ``folder`` holds the files of that release format (file checks only: cheap).

    Raises:
        SourceError: ``folder`` holds both, and either could be the one meant.
    """
    idx = any(_find_idx_file(folder, prefix, "images", 3) for prefix in set(IDX_PREFIXES.values()))
    cifar = _cifar_layout(folder) is not None
    if idx and cifar:
        raise SourceError(f"{folder} holds both IDX (MNIST-style) and CIFAR batch files; pass --format idx or "
                          "--format cifar to say which to read")
    return "idx" if idx else "cifar" if cifar else None


SPLIT_NAMES = frozenset({"train", "training", "val", "valid", "validation", "test", "testing"})


def layout_note(src: str | os.PathLike, fmt: str) -> str | None:
    """What SRC holds that its reading leaves out or may have misread, said before a conversion that could take
    hours; None when nothing."""
    src = Path(src)
    if src.is_file():
        return _unread_columns_note(src) if fmt in ("auto", "list") else None
    return _folder_layout_note(src) if fmt == "auto" else None


def _unread_columns_note(list_file: Path) -> str | None:
    """The columns of a CSV or TSV list that are not read: labels under another name (`class`, `target`) would be
    lost without a word, and a `split` column does not choose the rows converted."""
    with open(list_file, encoding="utf-8-sig", errors="replace") as file:
        header = next((line for line in file if line.strip()), "")
    if not _has_csv_header(header):
        return None
    columns = [name.strip() for name in next(csv.reader([header], delimiter=_delimiter(header)))]
    unread = [name for name in columns[1:] if name and name.lower() != "label"]
    if not unread:
        return None
    if len(unread) < len([name for name in columns[1:] if name]):  # a label column is there
        return (f"{list_file}: its column(s) {', '.join(unread)} are not read (only `path` and `label` are); every "
                "row is converted")
    return (f"{list_file} has no `label` column, so its images are converted unlabeled and its column(s) "
            f"{', '.join(unread)} are not read; to keep labels, name their column `label`")


def _folder_layout_note(src: Path) -> str | None:
    """Why `--format auto` may have misread a directory: sub-folders of images next to images at its top level (one
    stray file there is enough to turn the labels off), or sub-folders named like splits (read as classes)."""
    if not src.is_dir() or detect_format(src) not in ("folder", "imagefolder"):
        return None
    releases = [(src / name, fmt) for name in _visible_folders(src) if (fmt := _release_format(src / name))]
    if releases:
        folder, fmt = releases[0]
        return f"{folder} holds {fmt.upper()} files, which are read from their own folder: pass it as SRC"
    has_dirs, top_images = _top_level(src)
    if has_dirs and top_images:
        return (f"{src} has sub-folders but also {len(top_images)} image(s) at its top level (e.g. {top_images[0]}), "
                "so it is read as unlabeled images; pass --format imagefolder to label them by sub-folder (top-level "
                "images are then skipped and listed)")
    folders = _visible_folders(src)
    if folders and set(name.lower() for name in folders) <= SPLIT_NAMES:
        first = folders[0]
        return (f"the sub-folders of {src} ({', '.join(folders)}) look like splits but are read as classes; to shard "
                f"each split, run this tool on each of them, e.g. {src / first} --split {first.lower()}, into a new "
                "OUT (or into this one with --overwrite)")
    return None


def _visible_folders(root: Path) -> list[str]:
    """The sorted names of the sub-folders of ``root`` that are not hidden (``.git``, ``.ipynb_checkpoints``)."""
    return sorted(entry.name for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith("."))


def _top_level(src: Path) -> tuple[bool, list[str]]:
    """Whether ``src`` has sub-folders, and the sorted names of the images at its top level (hidden entries aside)."""
    entries = [entry for entry in src.iterdir() if not entry.name.startswith(".")]
    images = sorted(entry.name for entry in entries if entry.is_file() and _is_image_name(entry.name))
    return any(entry.is_dir() for entry in entries), images


def _is_image_name(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS


def _walk_files(root: Path) -> tuple[list[str], list[dict]]:
    """All files under ``root`` at any depth, as sorted POSIX paths relative to ``root``, and skip records of the
    hidden entries (``.ipynb_checkpoints/``, ``.DS_Store``: tool state or copies, never data).

    Linked folders are followed, as they are in ImageFolder; a folder reached again through a link (a cycle, or a
    second route to it) is read once.
    """
    if not root.is_dir():
        raise SourceError(f"{root} is not a directory")
    found, skipped, walked = [], [], {}
    for directory, folders, files in os.walk(root, followlinks=True, onerror=_unreadable):
        here = Path(directory).relative_to(root).as_posix().removeprefix(".")  # "" for the root itself
        real = os.path.realpath(directory)
        if real in walked:
            skipped.append({"source": f"{here}/", "reason": f"the same folder as {walked[real] or root}/, read there"})
            folders[:] = []
            continue
        walked[real] = here
        skipped += [{"source": f"{_joined(here, name)}/", "reason": "hidden folder, not read"}
                    for name in folders if name.startswith(".")]
        folders[:] = sorted(name for name in folders if not name.startswith("."))  # which route is read: the first
        skipped += [{"source": _joined(here, name), "reason": "hidden file"} for name in files if name.startswith(".")]
        found += [_joined(here, name) for name in files if not name.startswith(".")]
    return sorted(found), skipped


def _unreadable(err: OSError) -> None:
    """Stop at a folder that cannot be listed, which os.walk would pass over silently, with all its images."""
    raise SourceError(f"{err.filename} cannot be read ({err.strerror}); fix its permissions, or move it out of the "
                      "dataset, and run the same command again")


def _joined(folder: str, name: str) -> str:
    """`name` in `folder`, a POSIX path relative to the walk's root ("" for the root itself)."""
    return f"{folder}/{name}" if folder else name


def _split_by_extension(paths: list[str]) -> tuple[list[str], list[dict]]:
    """Keep image paths; turn the others into skip records."""
    images = [path for path in paths if _is_image_name(path)]
    rejected = [
        {"source": path, "reason": f"not an image file extension ({Path(path).suffix or 'none'})"}
        for path in paths
        if not _is_image_name(path)
    ]
    return images, rejected


def read_folder(root: Path) -> FileSource:
    """Unlabeled images at any depth under ``root``."""
    all_paths, hidden = _walk_files(root)
    images, rejected = _split_by_extension(all_paths)
    return FileSource(root=root, paths=images, rejected=hidden + rejected)


def read_imagefolder(root: Path, classes: list[str] | None = None) -> FileSource:
    """``root/<class>/**/<image>``; labels index the sorted class folder names (or ``classes``).

    Raises:
        SourceError: a class folder holds no image (without ``classes``, which may name classes the data lacks),
            since its class would be one the model is trained to predict but never sees.
    """
    all_paths, hidden = _walk_files(root)
    outside = [path for path in all_paths if "/" not in path]
    images, rejected = _split_by_extension([path for path in all_paths if "/" in path])
    rejected += [{"source": path, "reason": "not inside a class folder"} for path in outside]
    names = [path.split("/", 1)[0] for path in images]
    if classes is None:
        classes = _visible_folders(root)
        if empty := sorted(set(classes) - set(names)):
            aliases = {skip["source"].rstrip("/"): skip["reason"] for skip in hidden if "read there" in skip["reason"]}
            named = [f"{name}/ ({aliases[name]})" if name in aliases else f"{name}/" for name in empty]
            raise SourceError(f"{root}: class folder(s) {', '.join(named)} hold no image; remove them, or pass "
                              "--classes to keep them in the class list")
    labels = _label_ids(names, classes, where=str(root))
    return FileSource(root=root, paths=images, labels=labels, classes=classes, rejected=hidden + rejected)


def _label_ids(names: list[str], classes: list[str], where: str) -> list[int]:
    """Map label names to their index in ``classes``."""
    index = {name: i for i, name in enumerate(classes)}
    unknown = sorted(set(names) - index.keys())
    if unknown:
        raise SourceError(f"{where}: labels {unknown[:5]} are not among the classes {classes}; fix --classes")
    return [index[name] for name in names]


def _int_classes(labels: Sequence[int], classes: list[str] | None, where: str, names_hint: str = "") -> list[str]:
    """Class names for integer labels: ``classes`` if it covers them all, else "0".."max". `names_hint` ends the
    error of labels that leave ids out or lie beyond ``classes``: what to do if the labels are names."""
    top = max(labels, default=-1)
    if classes is None:
        if unused := sorted(set(range(top + 1)) - set(labels)):  # e.g. labels from 1: class 0 would never be seen
            shown = ", ".join(map(str, unused[:5])) + (f" and {len(unused) - 5} more" if len(unused) > 5 else "")
            raise SourceError(f"{where}: no sample has label {shown}, so classes 0..{top} would include some that the "
                              "model never sees; number the classes from 0 without gaps, or pass --classes with a "
                              f"name for every id from 0{names_hint}")
        return [str(i) for i in range(top + 1)]
    if top >= len(classes):
        raise SourceError(f"{where}: label {top} has no name in --classes ({len(classes)} names given){names_hint}")
    return classes


INT_LABEL = re.compile(r"-?[0-9]+")


def _names_hint(labels: list[str]) -> str:
    """How to have integer labels read as class names ("3" and "7" of a 3-versus-7 subset, years)."""
    distinct = sorted(set(labels), key=int)
    given = ",".join(distinct) if len(distinct) <= 10 else "FILE (one name per line)"
    return f"; if the labels are class names rather than ids, name every one with --classes {given}"


def read_list(list_file: Path, classes: list[str] | None = None) -> FileSource:
    """A list file: plain paths, one per line (``#`` comments allowed), or CSV / TSV with a ``path[,label]`` header.

    Integer labels are used as ids (named by ``classes``, else "0".."max") unless ``classes`` lists every label;
    other labels are class names, indexed in sorted order unless ``classes`` fixes the order.
    """
    text = _list_text(list_file)
    if not _has_csv_header(text):
        # Read as plain paths, "x.jpg,cat" would name a file that is not there (and no path holds a tab).
        if list_file.suffix.lower() in (".csv", ".tsv") or "\t" in _first_line(text):
            raise SourceError(f"{list_file}: a CSV or TSV list needs a header line whose first column is `path` (then "
                              f"`label`, if any), but its first line is {_first_line(text)!r}")
        rows = [(number, line.strip(), None) for number, line in enumerate(text.splitlines(), start=1)
                if line.strip() and not line.lstrip().startswith("#")]
    else:
        rows = _parse_csv(text, list_file)
    rows, repeats = _without_repeats(rows, list_file)
    paths = [path for _, path, _ in rows]
    names = [label for _, _, label in rows]
    if all(label is None for label in names):
        if classes:
            raise SourceError(f"{list_file} has no label column, so --classes has no labels to name: add labels to "
                              "the list, or leave --classes out")
        return FileSource(root=list_file.parent, paths=paths, rejected=repeats)
    named = classes is not None and set(names) <= set(classes)  # "3" and "7" listed by --classes 3,7 are names
    if not named and all(INT_LABEL.fullmatch(label) for label in names):
        labels = [int(label) for label in names]
        if min(labels) < 0:
            raise SourceError(f"{list_file}: label {min(labels)} is negative; labels are class ids from 0 or class "
                              "names")
        classes = _int_classes(labels, classes, where=str(list_file), names_hint=_names_hint(names))
    else:
        classes = sorted(set(names)) if classes is None else classes
        labels = _label_ids(names, classes, where=str(list_file))
    return FileSource(root=list_file.parent, paths=paths, labels=labels, classes=classes, rejected=repeats)


def _list_text(list_file: Path) -> str:
    """The text of a list file; anything else given as one (a directory, an image, a compressed IDX file) is refused
    with what to pass instead."""
    if list_file.is_dir():
        raise SourceError(f"{list_file} is a directory; --format list reads a list file (or leave --format auto)")
    with open(list_file, "rb") as file:
        start = file.read(4096)
    if b"\0" in start and not start.startswith(UTF16_BOMS):
        raise SourceError(f"{list_file} is a file but not a text list of image paths; pass the dataset's directory "
                          "(IDX and CIFAR files are read from their folder) or a list file")
    return utf8_text(list_file, "the list")


UTF16_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)


def utf8_text(path: Path, what: str) -> str:
    """The text of a UTF-8 file, without the byte-order mark that spreadsheets put before "CSV UTF-8"; text in another
    encoding is refused, saying how to save `what` instead."""
    raw = path.read_bytes()
    if raw.startswith(UTF16_BOMS):
        raise SourceError(f'{path} is UTF-16 text (as Windows PowerShell\'s > and a spreadsheet\'s "Unicode Text" '
                          f'write it); save {what} as UTF-8')
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:  # e.g. a spreadsheet's "CSV" on Windows (cp1252)
        line = raw[:err.start].count(b"\n") + 1
        raise SourceError(f"{path}:{line}: byte 0x{raw[err.start]:02x} is not UTF-8; save {what} as UTF-8 (a "
                          'spreadsheet\'s "CSV UTF-8")') from None


def _without_repeats(rows: list[tuple[int, str, str | None]], list_file: Path) -> tuple[list, list[dict]]:
    """The rows without files listed again (kept once, the later lines reported as skipped: usually two lists
    joined by mistake, which would weigh those images twice); a file listed with two labels is an error."""
    first: dict[str, tuple[int, str | None]] = {}
    kept, repeats = [], []
    for number, path, label in rows:
        key = os.path.abspath(os.path.join(list_file.parent, path))  # one file named relatively and absolutely
        if key not in first:
            first[key] = (number, label)
            kept.append((number, path, label))
        elif first[key][1] != label:
            raise SourceError(f"{list_file}:{number}: {path} is listed with label {label!r} here and "
                              f"{first[key][1]!r} on line {first[key][0]}; give each file one label")
        else:
            repeats.append({"source": path, "reason": f"listed again on line {number} (first on line {first[key][0]})"})
    return kept, repeats


def _first_line(text: str) -> str:
    return next((line for line in text.splitlines() if line.strip()), "")


def _delimiter(text: str) -> str:
    """Tab for a tab-separated list (a header `path<TAB>label`), semicolon for a header `path;label` (spreadsheets
    write CSV so where the comma is the decimal separator), else comma."""
    header = _first_line(text)
    return "\t" if "\t" in header else ";" if ";" in header and "," not in header else ","


def _has_csv_header(text: str) -> bool:
    """True when the first non-empty line is a CSV (or TSV) header starting with the column ``path``."""
    header = csv.reader([_first_line(text)], delimiter=_delimiter(text))
    first_field = (next(header) or [""])[0]  # unquotes `"path","label"`; an empty line gives []
    return first_field.strip().lower() == "path"


def _parse_csv(text: str, list_file: Path) -> list[tuple[int, str, str | None]]:
    """(line number, path, label) rows of a CSV or TSV list with a ``path`` column and an optional ``label`` column
    (all or none labeled)."""
    lines = [(number, line) for number, line in enumerate(text.splitlines(), start=1) if line.strip()]
    reader = csv.DictReader((line for _, line in lines), delimiter=_delimiter(text))
    reader.fieldnames = [name.strip().lower() for name in reader.fieldnames]
    has_label = "label" in reader.fieldnames
    rows = []
    for row in reader:
        number = lines[reader.line_num - 1][0]  # the file's line: blank lines never reach the reader
        if None in row:  # the fields beyond the header's columns
            raise SourceError(f"{list_file}:{number}: more fields than the {len(reader.fieldnames)} header columns; "
                              'put a path that holds a comma in double quotes: "a,b.jpg",label')
        path = (row.get("path") or "").strip()
        label = (row.get("label") or "").strip() if has_label else None
        if not path or label == "":
            raise SourceError(f"{list_file}:{number}: every row needs a path and, with a label column, a label")
        rows.append((number, path, label))
    return rows


def read_idx(root: Path, split: str, classes: list[str] | None = None) -> ArraySource:
    """MNIST-style IDX image/label pair: ``train-*`` for split "train", ``t10k-*`` for "val"/"test"."""
    prefix = IDX_PREFIXES[_release_part(split, "IDX")]
    images_file = _find_idx_file(root, prefix, "images", 3)
    labels_file = _find_idx_file(root, prefix, "labels", 1)
    if images_file is None or labels_file is None:
        raise SourceError(f"{root}: need {prefix}-images-idx3-ubyte[.gz] and {prefix}-labels-idx1-ubyte[.gz]")
    images, labels = _read_idx_array(images_file, ndim=3), _read_idx_array(labels_file, ndim=1)
    if len(images) != len(labels):
        raise SourceError(f"{images_file} has {len(images)} images but {labels_file} has {len(labels)} labels")
    classes = _int_classes(labels.tolist(), classes, where=str(labels_file))
    ids = [f"{images_file.name}[{i}]" for i in range(len(images))]
    return ArraySource(images=images, labels=labels, classes=classes, ids=ids)


def _release_part(split: str, fmt: str) -> str:
    """The part of a train/test release that `split` names; any other name is refused (likely a typo)."""
    if split not in RELEASE_PARTS:
        raise SourceError(f"{fmt} data has splits {sorted(RELEASE_PARTS)}, not {split!r}; pass --split train or val")
    return RELEASE_PARTS[split]


def _find_idx_file(root: Path, prefix: str, kind: str, ndim: int) -> Path | None:
    """``{prefix}-{kind}-idx{ndim}-ubyte`` (also with "." before idx, and gzipped), if present."""
    for sep in ("-", "."):
        for suffix in ("", ".gz"):
            path = root / f"{prefix}-{kind}{sep}idx{ndim}-ubyte{suffix}"
            if path.is_file():
                return path
    return None


def _read_idx_array(path: Path, ndim: int) -> np.ndarray:
    """Parse an unsigned-byte IDX file: 2 zero bytes, type 0x08, ndim, big-endian uint32 dims, then data."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise SourceError(f"{path}: {err}; download it again") from None
    if raw[:2] == GZIP_MAGIC:
        raise SourceError(f"{path} is gzip-compressed: name it {path.name}.gz, or decompress it")
    zeros, type_code, file_ndim = struct.unpack(">HBB", raw[:4].ljust(4, b"\xff"))  # padded: too short for IDX
    if zeros != 0 or type_code != IDX_UBYTE or file_ndim != ndim:
        raise SourceError(f"{path}: not an unsigned-byte IDX file with {ndim} dimensions")
    header_size = 4 + 4 * ndim
    dims = struct.unpack(f">{ndim}I", raw[4:header_size])
    data = np.frombuffer(raw, dtype=np.uint8, offset=header_size)
    if data.size != math.prod(dims):  # Python ints: np.prod wraps around at 2**64
        raise SourceError(f"{path}: header says {dims} but holds {data.size} values; download it again")
    return data.reshape(dims)  # [N, H, W] images or [N] labels


# CIFAR layouts: meta file, class-name key, label key, train batches (glob), test batches (glob).
CIFAR_LAYOUTS = (
    ("batches.meta", "label_names", "labels", "data_batch_*", "test_batch"),
    ("meta", "fine_label_names", "fine_labels", "train", "test"),
)


def _cifar_layout(root: Path) -> tuple[str, str, str, str, str] | None:
    """The CIFAR-10 or CIFAR-100 layout whose meta file and some batches (train or test) are in ``root``, if any."""
    for layout in CIFAR_LAYOUTS:
        meta, _, _, train_pattern, test_pattern = layout
        batches = (path for pattern in (train_pattern, test_pattern) for path in root.glob(pattern))
        if (root / meta).is_file() and any(path.is_file() for path in batches):
            return layout
    return None


CIFAR_PICKLE_GLOBALS = {
    (module, name)
    for package in ("numpy.core", "numpy._core")  # numpy 1 and numpy 2 name the same functions
    for module, name in ((f"{package}.multiarray", "_reconstruct"), (f"{package}.numeric", "_frombuffer"),
                         (f"{package}.multiarray", "scalar"))
} | {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}
"""What a CIFAR batch pickle may call: numpy's array and scalar rebuilders (labels saved as `list(array)` are numpy
scalars), and the bytes decoder of protocol-2 pickles."""


class _CifarUnpickler(pickle.Unpickler):
    """An unpickler that builds arrays, lists, dicts and strings only: any other callable a file names (the way a
    pickle runs code) is refused before it is looked up."""

    def find_class(self, module: str, name: str):
        if (module, name) not in CIFAR_PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"it asks for {module}.{name}, which no CIFAR batch holds")
        return super().find_class(module, name)


def _load_cifar_pickle(path: Path) -> dict:
    """A CIFAR batch, read with `_CifarUnpickler` (these files exist only as pickles). latin1 decodes the Python 2
    pickles of the official download; Python 3 pickles (`encoding="bytes"` layout) have bytes keys and names."""
    try:
        with open(path, "rb") as f:
            raw = _CifarUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError) as err:
        raise SourceError(f"{path} is not a readable CIFAR python batch ({err}); download the python version of "
                          "the dataset again, or convert its images from a folder") from None
    if not isinstance(raw, dict):
        raise SourceError(f"{path} is not a CIFAR batch (a pickled dict), got {type(raw).__name__}")
    return {_text(key): value for key, value in raw.items()}


def _text(value):
    return value.decode() if isinstance(value, bytes) else value


def _cifar_field(batch: dict, key: str, path: Path):
    if key not in batch:
        raise SourceError(f"{path} has no {key!r} entry (it has {sorted(batch)}); is it a CIFAR python batch?")
    return batch[key]


def read_cifar(root: Path, split: str) -> ArraySource:
    """CIFAR-10/100 python batches; "train" reads the training batches, "val" or "test" the test batch."""
    part = _release_part(split, "CIFAR")
    layout = _cifar_layout(root)
    if layout is None:
        raise SourceError(f"{root}: no CIFAR batches (batches.meta with data_batch_* or test_batch, or meta with "
                          "train or test) found")
    meta_name, names_key, labels_key, train_pattern, test_pattern = layout
    classes = [_text(name) for name in _cifar_field(_load_cifar_pickle(root / meta_name), names_key, root / meta_name)]
    pattern = train_pattern if part == "train" else test_pattern
    batch_files = sorted(root.glob(pattern))
    if not batch_files:
        raise SourceError(f"{root}: no {pattern} files for {split!r}")
    images, labels, ids = [], [], []
    for batch_file in batch_files:
        batch = _load_cifar_pickle(batch_file)
        data, batch_labels = _cifar_batch(batch, batch_file, labels_key, len(classes))
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # [N, 3, 32, 32] -> [N, 32, 32, 3]
        labels.append(batch_labels)
        ids.extend(f"{batch_file.name}[{i}]" for i in range(len(data)))
    return ArraySource(images=np.concatenate(images), labels=np.concatenate(labels), classes=classes, ids=ids)


def _cifar_batch(batch: dict, path: Path, labels_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """A batch's pixels, uint8 [N, 3 * 32 * 32] channel-major, and its N labels, each naming one of the classes."""
    data = np.asarray(_cifar_field(batch, "data", path))
    if data.dtype != np.uint8:  # a cast would wrap values above 255 and blacken floats in [0, 1]
        raise SourceError(f"{path}: 'data' holds {data.dtype} values, not the uint8 pixels (0-255) of a CIFAR batch")
    labels = np.asarray(_cifar_field(batch, labels_key, path), dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise SourceError(f"{path}: 'data' has shape {list(data.shape)}, not [N, 3072] (32x32 RGB images)")
    if labels.shape != (len(data),):
        raise SourceError(f"{path} has {len(data)} images but {labels.size} labels")
    if labels.size and not 0 <= labels.min() <= labels.max() < num_classes:
        bad = labels.max() if labels.max() >= num_classes else labels.min()
        raise SourceError(f"{path}: label {bad} names none of the {num_classes} classes of its meta file")
    return data, labels
