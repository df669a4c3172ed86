"""Verify a shard directory against its ``_info.json`` and summarise what it holds.

``inspect_shards(root)`` checks that every listed shard exists, holds exactly ``shard_lengths[i]`` samples and,
where recorded, has ``shard_bytes[i]`` bytes, and that no temporary file, unfinished-conversion journal or unlisted
shard is left; it then decodes every image and counts labels, sizes and formats, and measures the RGB statistics
that ``data.mean`` and ``data.std`` normalise with. ``main`` prints the summary and exits non-zero on any problem.
"""

import argparse
import statistics
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from mae_tnt.cli import quiet_on_ctrl_c
from mae_tnt.config import DEFAULT_MAX_IMAGE_PIXELS
from mae_tnt.data.images import IMAGE_FIELDS, BadImageError, decode, pixel_limit, to_rgb
from mae_tnt.data.info import (
    INFO_NAME,
    REPLACED_PREFIX,
    InfoError,
    count_tar_samples,
    listed_shards,
    load_info,
    split_classes,
    unfinished_journals,
)
from mae_tnt.data.shards import read_samples, sample_name
from mae_tnt.data.stream import BadLabelError, label_of
from mae_tnt.progress import progress_bar
from mae_tnt.text import HelpWithDefaults, counted, positive_int

MAX_PRINTED_PROBLEMS = 50
LEVEL_MOMENTS = np.stack([np.arange(256) / 255, np.square(np.arange(256) / 255)], axis=1)  # [256, 2]
"""Each 8-bit level's 0-1 value and its square: a histogram times these gives the mean and the mean square."""


@dataclass
class SplitReport:
    """What one split holds, from reading every sample."""

    num_samples: int
    num_shards: int
    classes: list[str]
    """The classes labelling this split; [] for an unlabeled split (`info.split_classes`)."""
    label_counts: Counter = field(default_factory=Counter)
    formats: Counter = field(default_factory=Counter)
    widths: list[int] = field(default_factory=list)
    heights: list[int] = field(default_factory=list)
    mean_sum: np.ndarray = field(default_factory=lambda: np.zeros(3))
    """Sum over the images of each one's RGB means, on a 0-1 scale."""
    square_sum: np.ndarray = field(default_factory=lambda: np.zeros(3))
    """Sum over the images of each one's RGB means of squares."""

    def add_image(self, rgb: Image.Image) -> None:
        """Count one RGB image in the statistics, through its histograms: exact, and 40x faster than the pixels at
        500 x 375."""
        histograms = np.asarray(rgb.histogram(), dtype=np.float64).reshape(3, 256)  # [3, 256]: R, G, B counts
        mean, square = (histograms @ LEVEL_MOMENTS / (rgb.width * rgb.height)).T  # [3, 2] -> two [3]
        self.mean_sum += mean
        self.square_sum += square

    def pixel_statistics(self) -> tuple[list[float], list[float]]:
        """RGB mean and std, each image weighted alike (training takes one crop per image, whatever its size)."""
        mean = self.mean_sum / len(self.widths)
        std = np.sqrt(np.maximum(self.square_sum / len(self.widths) - np.square(mean), 0))
        # A constant channel has std 0, which data.std refuses (it divides): print the smallest it takes.
        return [round(float(v), 3) for v in mean], [max(round(float(v), 3), 0.001) for v in std]


@dataclass
class InspectReport:
    """The dataset name, classes, per-split summaries and every problem found (empty when all is well)."""

    name: str
    classes: list[str]
    splits: dict[str, SplitReport]
    problems: list[str]


def inspect_shards(root: str | Path, progress: bool = False,
                   max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> InspectReport:
    """Check every shard listed in ``root/_info.json`` and decode every image (``progress``: a bar per split), with
    the pixel limit that make_shards applied (``--max-image-pixels``), so that what it accepted passes.

    Raises:
        FileNotFoundError: ``_info.json`` is missing.
        InfoError: ``_info.json`` is malformed.
    """
    root = Path(root)
    info = load_info(root)
    classes = info.get("classes", [])
    problems = _leftover_problems(root, info)
    splits = {}
    with pixel_limit(max_image_pixels):
        for split, entry in info["splits"].items():
            report = splits[split] = SplitReport(entry["num_samples"], len(entry["filenames"]),
                                                 split_classes(info, split))
            with progress_bar(total=entry["num_samples"], unit="img", desc=split, disable=not progress) as bar:
                for filename, length, size in listed_shards(entry):
                    problems += _inspect_shard(root / filename, length, size, report)
                    bar.update(length)
    return InspectReport(info.get("name", root.name), classes, splits, problems)


def _leftover_problems(root: Path, info: dict) -> list[str]:
    """Temporary files, unfinished-conversion journals and tars that no split lists."""
    listed = {name for entry in info["splits"].values() for name in entry["filenames"]}
    temporary = sorted({*root.glob("*.tmp"), *root.glob(".tmp-*")})  # a shard's, `_info.json`'s or a journal's
    problems = [f"{path}: temporary file left by an interrupted write" for path in temporary]
    problems += [
        f"{path}: unfinished conversion; re-run the make_shards command that wrote it"
        for path in unfinished_journals(root)
    ]
    problems += [f"{path}: a split set aside by an interrupted make_shards --overwrite; re-run that command to "
                 "finish it" for path in sorted(root.glob(f"{REPLACED_PREFIX}*"))]
    shards = [path for pattern in ("*.tar", "*.tar.gz") for path in sorted(root.glob(pattern))]
    problems += [f"{path}: shard not listed in {INFO_NAME}" for path in shards if path.name not in listed]
    return problems


def _inspect_shard(path: Path, expected: int, expected_bytes: int | None, report: SplitReport) -> list[str]:
    """Problems of one shard (``expected_bytes``: its recorded size, if any); adds its samples' labels, sizes and
    formats to ``report``."""
    if not path.is_file():
        return [f"{path}: listed in {INFO_NAME} but missing"]
    try:
        count = count_tar_samples(path)
    except InfoError as err:  # a break: training still uses the samples before it, so they are checked too
        read, problems = _inspect_samples(path, report)
        return [f"{err} (until then, training uses the {read} of its {expected} samples before the break)",
                *problems]
    problems = [] if count == expected else [f"{path}: holds {count} samples but {INFO_NAME} says {expected}"]
    if expected_bytes is not None and (size := path.stat().st_size) != expected_bytes:
        # Training trusts a shard of the recorded size without reading it, and re-reads every other one at each start.
        problems.append(f"{path}: {size} bytes but {INFO_NAME} records {expected_bytes}; the file changed after "
                        "make_shards wrote it: re-run tools/make_shards.py into a new directory")
    return problems + _inspect_samples(path, report)[1]


def _inspect_samples(path: Path, report: SplitReport) -> tuple[int, list[str]]:
    """(samples read, their problems) of a shard, up to its break if it has one."""
    read, problems = 0, []
    for fields in read_samples(str(path)):
        read += 1
        problems += _inspect_sample(sample_name(fields), fields, report)
    return read, problems


def _inspect_sample(where: str, fields: dict[str, bytes], report: SplitReport) -> list[str]:
    """Problems of one sample (image count, decodability, label); records what it holds in ``report``."""
    images = [name for name in fields if name in IMAGE_FIELDS]
    if len(images) != 1:
        return [f"{where}: expected one image member, found {images or 'none'}"]
    try:
        img = decode(fields[images[0]])
        rgb = to_rgb(img)  # training converts every image so: a value range it refuses is a problem here too
    except BadImageError as err:
        return [f"{where}: {err}"]
    report.add_image(rgb)
    report.formats[img.format] += 1
    report.widths.append(img.width)
    report.heights.append(img.height)
    classes = report.classes
    try:
        label = label_of(fields)  # as training reads it
    except BadLabelError as err:
        return [f"{where}: {err}"]
    if label < 0:
        return [f"{where}: no .cls label although the split is labeled"] if classes else []
    if classes and label >= len(classes):
        return [f"{where}: label {label} is not an index into the {len(classes)} classes"]
    report.label_counts[label] += 1
    return []


def format_report(report: InspectReport) -> str:
    """Human-readable summary: per split counts, per-class counts, image sizes and formats."""
    lines = [f"{report.name}: {counted(len(report.splits), 'split')}, {counted(len(report.classes), 'class')}"]
    for split, summary in report.splits.items():
        unlabeled = ", unlabeled" if report.classes and not summary.classes else ""
        lines.append(f"{split}: {counted(summary.num_samples, 'sample')} in {counted(summary.num_shards, 'shard')}"
                     f"{unlabeled}")
        if summary.widths:
            lines.append(f"  width  {_min_median_max(summary.widths)}")
            lines.append(f"  height {_min_median_max(summary.heights)}")
            mean, std = summary.pixel_statistics()
            lines.append(f"  pixels (RGB, 0-1): data.mean={_listed(mean)} data.std={_listed(std)}")
        lines.append("  formats: " + ", ".join(f"{name} {count}" for name, count in sorted(summary.formats.items())))
        if summary.label_counts:
            names = report.classes or [str(label) for label in range(max(summary.label_counts) + 1)]
            counts = ", ".join(f"{names[label]} {summary.label_counts[label]}" for label in range(len(names)))
            lines.append(f"  classes: {counts}")
    return "\n".join(lines)


def _listed(values: list[float]) -> str:
    """A list as a command-line override writes it, with no spaces."""
    return f"[{','.join(f'{v:g}' for v in values)}]"


def _min_median_max(values: list[int]) -> str:
    return f"min {min(values)} median {statistics.median(values):g} max {max(values)}"


@quiet_on_ctrl_c("run the same command again to check the shards")
def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point (``tools/inspect_shards.py`` and ``mae-tnt-inspect-shards``)."""
    parser = argparse.ArgumentParser(description="Verify shards against _info.json.",
                                     formatter_class=HelpWithDefaults)
    parser.add_argument("root", help="shard directory holding _info.json")
    parser.add_argument("--max-image-pixels", type=positive_int, default=DEFAULT_MAX_IMAGE_PIXELS,
                        help="the limit the shards were made with (make_shards --max-image-pixels)")
    args = parser.parse_args(argv)
    try:
        report = inspect_shards(args.root, progress=True, max_image_pixels=args.max_image_pixels)
    except (FileNotFoundError, InfoError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(format_report(report))
    if not report.problems:
        print("OK: every shard matches _info.json and every image decodes")
        return 0
    for problem in report.problems[:MAX_PRINTED_PROBLEMS]:
        print(f"problem: {problem}", file=sys.stderr)
    hidden = len(report.problems) - MAX_PRINTED_PROBLEMS
    print(f"FAILED: {counted(len(report.problems), 'problem')}{f', {hidden} more not shown' if hidden > 0 else ''}",
          file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
