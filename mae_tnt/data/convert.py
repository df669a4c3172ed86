"""Convert an image dataset into pre-shuffled webdataset shards plus a timm-style ``_info.json``.

``convert(src, out, options)`` writes ``OUT/{split}-{000000..}.tar``. Sample ``i`` of the split has key
``{split}_{i:08d}`` (no dots) and members ``.jpg`` or ``.png``, ``.cls`` (ASCII label id, labeled data only)
and ``.json`` (source id, original width and height, label name), in sorted order with constant tar headers,
so the same command writes byte-identical shards.

Images: every one is fully decoded in a worker process to validate it, then kept as it is or re-encoded
(``mae_tnt.data.encode``). Unreadable files, undecodable bytes and files without an image extension are skipped and
reported, nothing else.

Order and resume: samples are shuffled with ``random.Random(seed)``; ``limit`` keeps the first N readable
samples of that order. A shard closes when one more sample would pass ``shard_size`` samples or
``shard_bytes`` payload bytes, so boundaries are a pure function of (source, options). Shards are renamed into place
only when complete and recorded in a journal, so re-running an interrupted command continues where it stopped: no
sample is duplicated or lost (``mae_tnt.data.shard_writer``).

References:
    webdataset ``TarWriter`` (sorted members, constant mtime) and key rules; timm ``reader_wds.py``.
    img2dataset (shard-per-file writing, resume by completed shards).
"""

import argparse
import fcntl
import hashlib
import itertools
import multiprocessing
import os
import random
import re
import signal
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from mae_tnt.config import DEFAULT_MAX_IMAGE_PIXELS
from mae_tnt.data.encode import EncodedImage, prepare_sample
from mae_tnt.data.images import pixel_limit, set_max_image_pixels
from mae_tnt.data.info import INFO_NAME, InfoError, check_classes, update_split
from mae_tnt.data.readers import (
    FORMATS,
    Source,
    SourceError,
    detect_format,
    layout_note,
    open_source,
    utf8_text,
)
from mae_tnt.data.shard_writer import (
    ConversionError,
    Journal,
    ShardWriter,
    discard_replaced_split,
    refuse_a_finished_split,
    replacing_split,
    shard_members,
)
from mae_tnt.progress import progress_bar
from mae_tnt.text import HelpWithDefaults, counted, disk_full_message, positive_int

LIST_LAYOUT = ("\nA list names one image per line (lines starting with # are comments), or is a CSV or TSV file whose "
               "first line is a header: `path`, or `path,label` (`path;label`, `path<TAB>label`); relative paths are "
               "read from the list's directory. Integer labels are class ids, unless --classes lists them all as names")
CHUNK = 16  # samples per worker task: large enough to amortise the inter-process transfer, small for even load
SPLIT_NAME = re.compile(r"[A-Za-z0-9_-]+")


@dataclass(frozen=True)
class ConvertOptions:
    """Settings of one conversion (everything except ``workers``, ``progress`` and ``overwrite`` shapes the output)."""

    split: str = "train"
    fmt: str = "auto"
    shard_size: int = 1000
    shard_bytes: int | None = None
    max_size: int | None = None
    seed: int = 0
    limit: int | None = None
    compress: bool = False
    """gzip each shard (`.tar.gz`): tar pads every member to 512 bytes, which dominates for small images."""
    classes: tuple[str, ...] | None = None
    workers: int = os.cpu_count() or 1
    progress: bool = True
    overwrite: bool = False
    """Delete the split's shards, progress journal and ``_info.json`` entry first, instead of refusing or resuming."""
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    """Images over this many pixels are skipped as possible decompression bombs (PIL's guard)."""
    subset: tuple[float, float] | None = None
    """Keep only the inputs whose id hashes into [low, high) of [0, 1) (`in_subset`): disjoint ranges cut one source
    into parts that never share an input, such as train and val."""

    def __post_init__(self):
        if not SPLIT_NAME.fullmatch(self.split):
            raise ConversionError(f"split {self.split!r} must use only letters, digits, '_' and '-' (no dots)")
        if self.fmt not in FORMATS:
            raise ConversionError(f"format {self.fmt!r} is not one of {', '.join(FORMATS)}")
        for name in ("shard_size", "shard_bytes", "max_size", "limit", "max_image_pixels"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConversionError(f"{name} must be at least 1, got {value}")
        if self.workers < 0:
            raise ConversionError(f"workers must be 0 (in-process) or more, got {self.workers}")
        if self.subset is not None and not 0 <= self.subset[0] < self.subset[1] <= 1:
            raise ConversionError(f"subset must be LOW:HIGH with 0 <= LOW < HIGH <= 1, got "
                                  f"{self.subset[0]:g}:{self.subset[1]:g}")


@dataclass
class ConvertSummary:
    """What a conversion wrote: the split's shards and the inputs it skipped."""

    split: str
    num_samples: int
    filenames: list[str]
    shard_lengths: list[int]
    skipped: list[dict]
    resumed_shards: int
    fmt: str
    classes: list[str]
    classes_lost: list[str]
    """Classes that had inputs but have no sample in the split: every input skipped, or none in the subset (never
    judged under --limit, which stops early)."""
    subset: tuple[float, float] | None = None


def convert(src: str | os.PathLike, out: str | os.PathLike, options: ConvertOptions) -> ConvertSummary:
    """Convert ``src`` into shards of ``options.split`` in ``out`` and record them in ``out/_info.json``.

    Args:
        src: Dataset directory or list file (see ``mae_tnt.data.readers``).
        out: Shard directory; other splits already in it are kept.
        options: Conversion settings.

    Returns:
        The split's shard names, lengths and skipped inputs.

    Raises:
        SourceError: The source cannot be listed.
        ConversionError: ``out`` holds this split from another run, or no input was a readable image.
    """
    fmt = detect_format(src) if options.fmt == "auto" else options.fmt
    out = Path(out)
    if fmt in ("folder", "imagefolder") and out.resolve().is_relative_to(Path(src).resolve()):
        raise ConversionError(f"OUT {out} is inside SRC {src}, where the next run (a resume, --overwrite, another "
                              "split) would read the shards as part of the dataset; give an OUT outside it")
    if options.subset is not None and fmt in ("idx", "cifar"):  # --split picks the release's files there
        raise ConversionError(f"--subset cuts one set of inputs into parts, but {fmt.upper()} data is read by --split "
                              "(train reads the training files, val and test the test files), so a val subset would "
                              "come from the test files; convert --split train and --split test instead")
    source = open_source(src, fmt, options.split, options.classes)
    if out.exists() and not out.is_dir():
        raise ConversionError(f"{out} is a file; OUT must be a directory for the shards: give a new or existing one")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # e.g. a file where a parent directory should be, or no permission
        raise ConversionError(f"cannot create the output directory {out}: {err.strerror}") from err
    try:
        with one_conversion_at_a_time(out):
            return _convert_into(src, fmt, source, out, options)
    except BaseException:
        if created and not any(out.iterdir()):  # a failure that wrote nothing leaves nothing behind
            out.rmdir()
        raise


@contextmanager
def one_conversion_at_a_time(out: Path) -> Iterator[None]:
    """Hold OUT for this conversion: conversions read and rewrite its shared `_info.json`, so two at once (train and
    val started side by side) would lose a split. Another one waits here, saying so; the lock goes with the process,
    however it ends."""
    handle = os.open(out, os.O_RDONLY)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"note: another conversion is writing to {out}; waiting for it to finish", file=sys.stderr)
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        os.close(handle)


def _convert_into(src, fmt: str, source: Source, out: Path, options: ConvertOptions) -> ConvertSummary:
    """`convert` once OUT is held: check, then shard and record, replacing the split with `--overwrite`."""
    if not options.overwrite:
        refuse_a_finished_split(out, options.split)  # first: it is the news, whatever the classes
    check_classes(out, options.split, source.classes)  # now, not after hours of converting, and before replacing
    if options.overwrite:
        with replacing_split(out, options.split):
            return _shard_and_record(src, fmt, source, out, options)
    summary = _shard_and_record(src, fmt, source, out, options)
    discard_replaced_split(out, options.split)  # an --overwrite killed earlier, whose split this run completed
    return summary


def _shard_and_record(src, fmt: str, source: Source, out: Path, options: ConvertOptions) -> ConvertSummary:
    order = [i for i in shuffled_order(len(source), options.seed) if in_subset(source.source_id(i), options.subset)]
    job = _job_description(src, fmt, source, order, options)
    journal = Journal.open(out, options.split, job)
    resumed_shards = len(journal.shards)
    pending_skips = _write_remaining(source, order, journal, options)
    rejected = [skip for skip in source.rejected if in_subset(skip["source"], options.subset)]
    skipped = sorted(rejected + journal.skipped + pending_skips, key=lambda skip: skip["source"])
    if journal.num_samples == 0:
        journal.discard()
        examples = "".join(f"\n  {skip['source']}: {skip['reason']}" for skip in skipped[:5])
        layout = LIST_LAYOUT if fmt == "list" else ""
        raise ConversionError(f"no readable image in {src} ({counted(len(skipped), 'input')} skipped){examples}"
                              f"{layout}")
    filenames = [shard["filename"] for shard in journal.shards]
    lengths = [shard["num_samples"] for shard in journal.shards]
    classes = list(source.classes or [])
    update_split(out, options.split, filenames, lengths, classes=classes or None, skipped=skipped,
                 labeled=bool(classes), shard_bytes=[shard["num_bytes"] for shard in journal.shards])
    journal.discard()
    lost = classes_without_samples(source, order, skipped) if options.limit is None else []
    return ConvertSummary(options.split, sum(lengths), filenames, lengths, skipped, resumed_shards, fmt, classes, lost,
                          options.subset)


def classes_without_samples(source: Source, order: list[int], skipped: list[dict]) -> list[str]:
    """Names of the source's classes that no sample of the split (`order`, less `skipped`) has (empty class
    folders are refused up front)."""
    if source.labels is None or not source.classes:
        return []
    skipped_ids = {skip["source"] for skip in skipped}
    kept = Counter(int(source.labels[i]) for i in order if source.source_id(i) not in skipped_ids)
    return [source.classes[label] for label in sorted({int(label) for label in source.labels}) if not kept[label]]


def in_subset(source_id: str, subset: tuple[float, float] | None) -> bool:
    """Whether the input `source_id` belongs to `subset` (always without one): its SHA-256, read as a fraction of
    [0, 1), lies in [low, high). The position depends on the id alone, not on the shuffle's seed or on the other
    inputs, so conversions of one source with disjoint ranges never share an input."""
    if subset is None:
        return True
    position = int.from_bytes(hashlib.sha256(source_id.encode("utf-8", "surrogateescape")).digest()[:8], "big") / 2**64
    return subset[0] <= position < subset[1]


def shuffled_order(num_samples: int, seed: int) -> list[int]:
    """Source indices in the seeded shuffled order that the shards store them in."""
    order = list(range(num_samples))
    random.Random(seed).shuffle(order)
    return order


def _job_description(src, fmt: str, source: Source, order: list[int], options: ConvertOptions) -> dict:
    """Everything that determines the output; a resumed run must match it exactly."""
    labels = source.labels  # in the digest too: a list whose labels were edited gives other samples
    samples = "\n".join(source.source_id(i) + ("" if labels is None else f"\t{int(labels[i])}") for i in order)
    digest = hashlib.sha256(samples.encode("utf-8", "surrogateescape")).hexdigest()  # names need not be UTF-8
    return {
        "source": str(Path(src).resolve()),
        "format": fmt,
        "split": options.split,
        "seed": options.seed,
        "shard_size": options.shard_size,
        "shard_bytes": options.shard_bytes,
        "max_size": options.max_size,
        "max_image_pixels": options.max_image_pixels,
        "limit": options.limit,
        "compress": options.compress,
        "subset": None if options.subset is None else list(options.subset),  # as JSON holds it
        "classes": source.classes,
        "samples_sha256": digest,
    }


def _write_remaining(source: Source, order: list[int], journal: Journal, options: ConvertOptions) -> list[dict]:
    """Encode and write the samples after the journal's position; return skips not recorded in a shard."""
    target = min(options.limit or len(order), len(order))
    done, skipped_before = journal.num_samples, len(journal.skipped)
    writer = ShardWriter(journal.path.parent, options.split, first_shard=len(journal.shards), compress=options.compress)
    skips, end = [], journal.next_position  # end: first order position not consumed yet
    counts_inputs = options.limit is None  # the bar counts inputs read, or with --limit the images kept
    bar = progress_bar(total=target, initial=journal.next_position if counts_inputs else done, unit="img",
                       desc=options.split, disable=not options.progress or not order)  # none: the error says so
    stream = _prepared(source, order, journal.next_position, options)
    try:
        for position, result in stream:
            if done >= target:
                break
            end = position + 1
            if isinstance(result, dict):
                skips.append(result)
                bar.set_postfix(skipped=skipped_before + len(skips))
                bar.update(counts_inputs)
                continue
            members = shard_members(f"{options.split}_{done:08d}", result, source.classes)
            if writer.count and _is_full(writer, members, options):
                journal.add(*writer.close_shard(), end=position, skipped=skips)
                skips = []
            writer.add(members)
            done += 1
            bar.update()
    finally:
        stream.close()
        bar.close()
    if writer.count:
        journal.add(*writer.close_shard(), end=end, skipped=skips)
        skips = []
    return skips


def _is_full(writer: ShardWriter, members: dict[str, bytes], options: ConvertOptions) -> bool:
    """Whether adding ``members`` would push the open shard past the sample or byte limit."""
    size = sum(len(data) for data in members.values())
    too_many = writer.count + 1 > options.shard_size
    too_big = options.shard_bytes is not None and writer.payload_bytes + size > options.shard_bytes
    return too_many or too_big


# Per-process state of the encoding workers, set once by _init_worker (the source can be large).
_worker_source: Source | None = None
_worker_max_size: int | None = None


def _init_worker(source: Source, max_size: int | None, max_pixels: int) -> None:
    global _worker_source, _worker_max_size
    set_max_image_pixels(max_pixels)
    _worker_source, _worker_max_size = source, max_size


def _init_pool_worker(owner: int, source: Source, max_size: int | None, max_pixels: int) -> None:
    # When one worker dies, the pool ends the others with SIGTERM; a handler forked from the caller (a training run's
    # preemption flag, a notebook's) would keep them alive, and the pool would wait for them forever.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # Ctrl-C reaches the whole process group: the main process alone stops the pool, without a worker traceback each.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    exit_with_parent(owner)
    _init_worker(source, max_size, max_pixels)


def exit_with_parent(parent: int, poll_s: float = 0.5) -> None:
    """End this process, forked by `parent`, once `parent` is gone (at once if it went before this call). A
    conversion killed alone (the OOM killer, a `kill PID`) left its workers waiting on their task queue forever,
    holding OUT's lock, so that the run of the same command that should finish the job waited for them."""

    def watch() -> None:
        while os.getppid() == parent:  # an orphan is handed to another parent
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _prepare_index(index: int) -> EncodedImage | dict:
    return prepare_sample(_worker_source, index, _worker_max_size)


def _prepare_chunk(indices: list[int]) -> list[EncodedImage | dict]:
    return [_prepare_index(index) for index in indices]


def _prepared(source: Source, order: list[int], start: int, options: ConvertOptions) -> Iterator:
    """Yield ``(position, EncodedImage or skip record)`` for order positions from ``start``, in order.

    Workers encode chunks of CHUNK samples, at most two chunks per worker in flight. A process pool, not
    ``multiprocessing.Pool``: a worker that dies (a scheduler's SIGTERM, the OOM killer) breaks it with an error,
    where ``Pool`` waits forever for the lost tasks.
    """
    indices = order[start:]
    if options.workers <= 1:
        with pixel_limit(options.max_image_pixels):  # the caller's own limit comes back afterwards
            _init_worker(source, options.max_size, options.max_image_pixels)
            yield from enumerate(map(_prepare_index, indices), start)
        return
    chunks = (indices[i : i + CHUNK] for i in range(0, len(indices), CHUNK))
    # Forked on every Python (3.14 would use a fork server): the workers share the source the main process read, and
    # their parent is the main process, which they watch.
    pool = ProcessPoolExecutor(options.workers, mp_context=multiprocessing.get_context("fork"),
                               initializer=_init_pool_worker,
                               initargs=(os.getpid(), source, options.max_size, options.max_image_pixels))
    try:
        in_flight = deque(pool.submit(_prepare_chunk, chunk) for chunk in itertools.islice(chunks, 2 * options.workers))
        position = start
        while in_flight:
            results = in_flight.popleft().result()
            if (chunk := next(chunks, None)) is not None:
                in_flight.append(pool.submit(_prepare_chunk, chunk))
            for result in results:
                yield position, result
                position += 1
    except BrokenProcessPool as err:
        raise ConversionError("an encoding worker died (killed by a signal or out of memory); run the same "
                              "command again to resume from the last finished shard") from err
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Convert an image dataset into webdataset shards plus _info.json.",
        formatter_class=HelpWithDefaults,
    )
    parser.add_argument("src", help="dataset directory, or a list file (paths, # comment lines allowed; or CSV or "
                                    "TSV with a path[,label] header line; relative paths are read from the list's "
                                    "directory)")
    parser.add_argument("out", help="output directory for {split}-NNNNNN.tar and _info.json")
    parser.add_argument("--format", dest="fmt", default="auto", choices=FORMATS, help="source layout")
    parser.add_argument("--split", default="train", help="split name; IDX/CIFAR read train or test files by it")
    parser.add_argument("--shard-size", type=positive_int, default=1000, help="max samples per shard")
    parser.add_argument("--shard-bytes", type=positive_int, default=None, help="max payload bytes per shard")
    parser.add_argument("--max-size", type=positive_int, default=None, help="resize so the longer side is at most PX")
    parser.add_argument("--max-image-pixels", type=positive_int, default=DEFAULT_MAX_IMAGE_PIXELS,
                        help="skip images over this many pixels, as possible decompression bombs (PIL's limit)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="encoding processes (0: none; default: the CPU count, %(default)s here)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample shuffle")
    parser.add_argument("--limit", type=positive_int, default=None,
                        help="keep the first N readable samples of the shuffle")
    parser.add_argument("--subset", type=_parse_subset, default=None, metavar="LOW:HIGH",
                        help="keep only the inputs whose path (as the folder or list gives it) hashes into "
                             "[LOW, HIGH) of [0, 1), e.g. --split train --subset 0:0.9 and --split val --subset 0.9:1 "
                             "cut one folder in two parts that never share an input, whatever --seed (not for IDX or "
                             "CIFAR data, whose --split picks the files)")
    parser.add_argument("--compress", action="store_true", help="write gzip-compressed .tar.gz shards")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace this split if OUT already holds it (otherwise refused, or resumed if unfinished)")
    parser.add_argument(
        "--classes", default=None, help="class names in label order: a file with one per line, or comma-separated"
    )
    return parser


def _parse_subset(value: str) -> tuple[float, float]:
    low, _, high = value.partition(":")
    try:
        return float(low), float(high)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW:HIGH such as 0:0.9, got {value!r}") from None


def _parse_classes(value: str | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    path = Path(value)
    if not path.is_file() and "," not in value and ("/" in value or path.suffix):
        raise ConversionError(f"--classes {value!r} looks like a file, but there is none; give an existing file with "
                              "one name per line, or the names separated by commas")
    names = utf8_text(path, "the class names").splitlines() if path.is_file() else value.split(",")
    return tuple(name.strip() for name in names if name.strip())


def _rerun_effect(args: argparse.Namespace) -> str:
    """What running a failed or interrupted conversion's command again does: `--overwrite` put the split it was
    replacing back, so it starts over."""
    if args.overwrite:
        return f"it converts the split anew (what OUT held of split {args.split} stays until the new one is complete)"
    return "it keeps the finished shards and writes the rest"


def _print_summary(summary: ConvertSummary, out: str) -> None:
    resumed = f", {summary.resumed_shards} kept from an interrupted run" if summary.resumed_shards else ""
    labels = counted(len(summary.classes), "class") if summary.classes else "unlabeled"
    print(f"{summary.split}: {counted(summary.num_samples, 'sample')} ({summary.fmt}, {labels}) in "
          f"{counted(len(summary.filenames), 'shard')} in {out}{resumed}")
    if summary.skipped:
        print(f"skipped {counted(len(summary.skipped), 'input')} (also listed in {INFO_NAME}):", file=sys.stderr)
        for skip in summary.skipped:
            print(f"  {skip['source']}: {skip['reason']}", file=sys.stderr)
    if summary.classes_lost:
        which = "class" if len(summary.classes_lost) == 1 else "classes"
        cause, fix = (("was skipped", "fix or remove those files") if summary.subset is None else
                      ("was skipped or lies outside --subset", "fix or remove skipped files or widen the subset"))
        print(f"warning: every input of {which} {', '.join(summary.classes_lost)} {cause}, so a classifier trained "
              f"on these shards has a class it never sees; {fix}, then convert again with --overwrite",
              file=sys.stderr)


def stop_workers() -> None:
    """End the encoding workers an interrupt left behind: one that the pool was starting when the interrupt came is
    not the pool's yet, so its shutdown misses it, and the interpreter would wait for it at exit forever."""
    for worker in multiprocessing.active_children():
        worker.terminate()
        worker.join()


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point (``tools/make_shards.py`` and ``mae-tnt-make-shards``)."""
    args = build_parser().parse_args(argv)
    try:
        options = ConvertOptions(
            split=args.split,
            fmt=args.fmt,
            shard_size=args.shard_size,
            shard_bytes=args.shard_bytes,
            max_size=args.max_size,
            seed=args.seed,
            limit=args.limit,
            compress=args.compress,
            classes=_parse_classes(args.classes),
            workers=args.workers,
            overwrite=args.overwrite,
            max_image_pixels=args.max_image_pixels,
            subset=args.subset,
        )
        if note := layout_note(args.src, args.fmt):
            print(f"note: {note}", file=sys.stderr)
        summary = convert(args.src, args.out, options)
    except (ConversionError, SourceError, InfoError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except PermissionError as err:  # a folder --format auto looks into, or OUT
        print(f"error: {err.filename}: {err.strerror}; fix its permissions, then run the same command again",
              file=sys.stderr)
        return 1
    except OSError as err:
        if (message := disk_full_message(err, _rerun_effect(args))) is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        stop_workers()
        print(f"interrupted; run the same command again: {_rerun_effect(args)}", file=sys.stderr)
        return 130
    _print_summary(summary, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
