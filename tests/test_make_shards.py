"""Tests of the shard converter, the image decoding it shares with the loader, _info.json and inspect_shards."""

import errno
import fcntl
import gzip
import hashlib
import io
import json
import multiprocessing
import os
import pickle
import random
import re
import runpy
import signal
import struct
import subprocess
import sys
import tarfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager, nullcontext
from pathlib import Path
from unittest.mock import Mock

import numpy as np
import pytest
import yaml
from PIL import Image
from run_utils import descendants, stops_running
from shard_utils import encode_png

from mae_tnt.data import convert as convert_module
from mae_tnt.data import shard_writer
from mae_tnt.data.convert import ConversionError, ConvertOptions, convert
from mae_tnt.data.convert import main as make_shards_main
from mae_tnt.data.images import BadImageError, decode, decode_rgb, set_max_image_pixels
from mae_tnt.data.info import InfoError, count_tar_samples, load_info, update_split
from mae_tnt.data.inspect import inspect_shards
from mae_tnt.data.inspect import main as inspect_main
from mae_tnt.data.readers import SourceError, detect_format
from mae_tnt.data.shards import ShardError, labeled_classes, read_samples, resolve_shards

REPO = Path(__file__).resolve().parents[1]


def encoded(img: Image.Image, fmt: str, **save_args) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **save_args)
    return buffer.getvalue()


def gradient(width: int, height: int) -> Image.Image:
    """An RGB image with distinct pixels, so resizing and re-encoding are visible."""
    x, y = np.meshgrid(np.arange(width), np.arange(height))
    pixels = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], axis=-1)
    return Image.fromarray(pixels.astype(np.uint8))  # [H, W, 3] -> RGB


def palette_with_transparency() -> Image.Image:
    """Left column palette index 0 (fully transparent), the rest index 1 (opaque blue)."""
    img = Image.new("P", (6, 6), 1)
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    img.paste(0, (0, 0, 1, 6))
    img.info["transparency"] = 0
    return img


def write_mixed_folder(root: Path) -> dict[str, bytes]:
    """Good and bad files of every kind the converter must handle; returns the readable ones' bytes."""
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 128))
    rgba.putpixel((0, 0), (0, 255, 0, 0))
    good = {
        "good one.jpg": encoded(gradient(20, 12), "JPEG", quality=90),
        "photo.v2.final.JPG": encoded(gradient(9, 7), "JPEG"),
        "sub dir/pic.png": encoded(gradient(5, 5), "PNG"),
        "cmyk.jpg": encoded(Image.new("CMYK", (8, 8), (0, 128, 255, 64)), "JPEG", quality=95),
        "deep16.png": encoded(Image.fromarray(np.full((4, 4), 40000, np.uint16)), "PNG"),
        "alpha.png": encoded(rgba, "PNG"),
        "palette.png": encoded(palette_with_transparency(), "PNG", transparency=0),
    }
    bad = {
        "broken.jpg": encoded(gradient(32, 32), "JPEG")[:300],
        "fake.jpg": b"this is a text file, not a JPEG\n",
        "notes.txt": b"shot on a sunny day\n",
    }
    for name, data in {**good, **bad}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return good


def read_split(out: Path, split: str = "train") -> list[tuple[str, dict[str, bytes]]]:
    """All samples of a split, in shard order, from the shards _info.json lists."""
    entry = load_info(out)["splits"][split]
    samples = [sample for name in entry["filenames"] for sample in read_samples(str(out / name))]
    return [(sample.pop("__key__"), sample) for sample in samples]


def image_of(fields: dict[str, bytes]) -> bytes:
    return fields.get("jpg") or fields["png"]


def by_source(out: Path, split: str = "train") -> dict[str, dict[str, bytes]]:
    return {json.loads(fields["json"])["source"]: fields for _, fields in read_split(out, split)}


def options(**overrides) -> ConvertOptions:
    return ConvertOptions(**{"workers": 0, "progress": False, **overrides})


def test_mixed_folder_keeps_every_readable_image_and_reports_the_rest(tmp_path, capsys):
    good = write_mixed_folder(tmp_path / "src")
    out = tmp_path / "out"
    assert make_shards_main([str(tmp_path / "src"), str(out), "--shard-size", "3", "--workers", "2"]) == 0
    samples = read_split(out)
    assert sorted(json.loads(fields["json"])["source"] for _, fields in samples) == sorted(good)
    assert [key for key, _ in samples] == [f"train_{i:08d}" for i in range(len(good))]
    for name in (out / "train-000000.tar", out / "train-000002.tar"):
        with tarfile.open(name) as tar:
            assert all(re.fullmatch(r"train_\d{8}\.(cls|jpg|json|png)", m.name) for m in tar.getmembers())
    entry = load_info(out)["splits"]["train"]
    assert entry["shard_lengths"] == [3, 3, 1]
    assert [skip["source"] for skip in entry["skipped"]] == ["broken.jpg", "fake.jpg", "notes.txt"]
    reasons = [skip["reason"] for skip in entry["skipped"]]
    assert "truncated" in reasons[0].lower() and "unknown image format" in reasons[1] and ".txt" in reasons[2]
    assert load_info(out)["classes"] == []
    assert inspect_main([str(out)]) == 0
    assert "train: 100%" in capsys.readouterr().err  # decoding every image takes a while: a bar shows it


def test_jpegs_under_every_common_extension_are_read_from_folders(tmp_path):
    for name in ("a.jpg", "b.JPEG", "c.jpe", "d.jfif"):  # .jfif: what some browsers save JPEGs as
        (tmp_path / "src").mkdir(exist_ok=True)
        (tmp_path / "src" / name).write_bytes(encoded(gradient(6, 4), "JPEG"))
    assert convert(tmp_path / "src", tmp_path / "out", options()).num_samples == 4
    assert load_info(tmp_path / "out")["splits"]["train"]["skipped"] == []


def test_shards_store_the_samples_in_the_order_the_seeded_shuffle_gives(tmp_path):
    names = [f"img{i:02d}.png" for i in range(20)]  # a flat folder is read in name order
    (tmp_path / "src").mkdir()
    for name in names:
        (tmp_path / "src" / name).write_bytes(encoded(gradient(4, 4), "PNG"))
    stored = {}
    for seed in (0, 1):
        convert(tmp_path / "src", tmp_path / f"out{seed}", options(seed=seed, shard_size=6))
        stored[seed] = [json.loads(fields["json"])["source"] for _, fields in read_split(tmp_path / f"out{seed}")]
        order = list(range(20))
        random.Random(seed).shuffle(order)  # the documented shuffle: random.Random(seed) over the source order
        assert stored[seed] == [names[i] for i in order]
    assert stored[0] != stored[1] and stored[0] != names


def test_colours_of_cmyk_16bit_alpha_and_palette_images(tmp_path):
    write_mixed_folder(tmp_path / "src")
    convert(tmp_path / "src", tmp_path / "out", options())
    samples = by_source(tmp_path / "out")
    rgb = {source: np.asarray(decode_rgb(image_of(fields))) for source, fields in samples.items()}
    assert np.abs(rgb["cmyk.jpg"][4, 4].astype(int) - (191, 95, 0)).max() <= 6  # 255 * (1 - C) * (1 - K)
    assert (rgb["deep16.png"] == 156).all()  # 40000 / 65535 * 255, not clipped to 255
    assert tuple(rgb["alpha.png"][4, 4]) == (255, 127, 127)  # half-transparent red over white
    assert tuple(rgb["alpha.png"][0, 0]) == (255, 255, 255)  # fully transparent
    assert tuple(rgb["palette.png"][0, 0]) == (255, 255, 255) and tuple(rgb["palette.png"][0, 3]) == (0, 0, 255)


def test_a_16_bit_grey_colour_key_is_transparent_even_where_8_bits_cannot_tell_it_apart():
    grey = np.array([[0, 65535, 32768, 256, 128]], np.uint16)  # 0 and 128 both scale to 8-bit 0
    rgb = np.asarray(decode_rgb(encoded(Image.fromarray(grey), "PNG", transparency=0)))
    assert rgb[0, :, 0].tolist() == [255, 255, 128, 1, 0] and (rgb == rgb[..., :1]).all()


def tiff_of(pixels: np.ndarray) -> bytes:
    """A greyscale TIFF of `pixels` ([H, W]; float32 -> mode "F", int32 -> mode "I")."""
    return encoded(Image.fromarray(pixels), "TIFF")


def test_float_greyscale_is_read_as_0_to_1_and_32_bit_integers_as_16_bit():
    floats = np.array([[0.0, 0.5, 1.0, 0.2]], np.float32)
    assert np.asarray(decode_rgb(tiff_of(floats)))[0, :, 0].tolist() == [0, 128, 255, 51]  # not clipped to black
    integers = np.array([[0, 65535, 257]], np.int32)
    assert np.asarray(decode_rgb(tiff_of(integers)))[0, :, 0].tolist() == [0, 255, 1]


@pytest.mark.parametrize("pixels, shown", [
    (np.array([[0.0, 2.5]], np.float32), "float greyscale with values from 0 to 2.5"),
    (np.array([[np.nan, 0.5]], np.float32), "float greyscale with values from nan"),
    (np.array([[-1, 7]], np.int32), "32-bit integer greyscale with values from -1 to 7"),
    (np.array([[0, 70000]], np.int32), "values from 0 to 70000"),
])
def test_wide_greyscale_outside_its_range_is_refused_not_clipped(pixels, shown):
    with pytest.raises(BadImageError, match=re.escape(shown)):
        decode_rgb(tiff_of(pixels))


def test_converter_and_inspect_report_a_float_image_they_cannot_read(tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    (src / "unit.tif").write_bytes(tiff_of(np.full((4, 4), 0.25, np.float32)))
    (src / "raw.tif").write_bytes(tiff_of(np.full((4, 4), 900.0, np.float32)))
    convert(src, out, options())
    assert np.asarray(decode_rgb(image_of(by_source(out)["unit.tif"]))).max() == 64  # 0.25 * 255, rounded
    [skip] = load_info(out)["splits"]["train"]["skipped"]
    assert skip["source"] == "raw.tif" and "rescale it to that range" in skip["reason"]
    # A shard written by other tools may hold the float TIFF itself; training would skip it, so inspect says so.
    with tarfile.open(out / "train-000000.tar", "a") as tar:
        data = (src / "raw.tif").read_bytes()
        member = tarfile.TarInfo("handmade.tif")
        member.size = len(data)
        tar.addfile(member, io.BytesIO(data))
    update_split(out, "train", ["train-000000.tar"], [2], classes=[])
    capsys.readouterr()
    assert inspect_main([str(out)]) == 1
    assert "handmade: float greyscale with values from 900 to 900" in capsys.readouterr().err


@pytest.mark.parametrize("tool, argv", [("make_shards", ["SRC", "OUT", "--shard-size", "0"]),
                                         ("make_shards", ["SRC", "OUT", "--limit", "-2"]),
                                         ("inspect_shards", ["OUT", "--max-image-pixels", "0"])])
def test_counts_below_one_are_usage_errors_naming_the_option(capsys, tool, argv):
    main = make_shards_main if tool == "make_shards" else inspect_main
    with pytest.raises(SystemExit) as done:
        main(argv)
    option, value = argv[-2:]
    assert done.value.code == 2 and f"error: argument {option}: must be at least 1, got {value}" in (
        capsys.readouterr().err)


def test_classes_for_a_list_without_labels_are_refused(tmp_path):
    (tmp_path / "a.png").write_bytes(encoded(gradient(4, 4), "PNG"))
    (tmp_path / "list.txt").write_text("a.png\n")
    with pytest.raises(SourceError, match="list.txt has no label column, so --classes has no labels to name"):
        convert(tmp_path / "list.txt", tmp_path / "out", options(classes=["cat", "dog"]))


def test_decode_rejects_truncated_images_and_decompression_bombs(monkeypatch):
    png = encoded(gradient(16, 16), "PNG")
    with pytest.raises(BadImageError):
        decode(png[: len(png) // 2])
    with pytest.raises(BadImageError, match="unknown image format"):
        decode(b"plain text")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after the test
    set_max_image_pixels(200)
    with pytest.raises(BadImageError):  # over 2x the limit: PIL's error
        decode(encoded(gradient(32, 32), "PNG"))
    with pytest.raises(BadImageError):  # between 1x and 2x: PIL only warns, we refuse
        decode(encoded(gradient(15, 15), "PNG"))
    with pytest.raises(ValueError, match="stays on"):
        set_max_image_pixels(None)


def crash_after(shards: int, error: BaseException | None = None):
    """A ShardWriter.close_shard that fails after ``shards`` shards with ``error``, by default an interruption as of
    a run killed mid-way."""
    close_shard, left = convert_module.ShardWriter.close_shard, [shards]

    def close_or_crash(writer):
        if left[0] == 0:
            raise error or KeyboardInterrupt("simulated interruption")
        left[0] -= 1
        return close_shard(writer)

    return close_or_crash


@pytest.mark.parametrize("limits", [{"shard_size": 3}, {"shard_size": 100, "shard_bytes": 900}])
def test_interrupted_conversion_resumes_without_duplicates_or_losses(tmp_path, monkeypatch, limits):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(14):
        (src / f"img{i:02d}.png").write_bytes(encoded(gradient(4 + i, 5), "PNG"))
    (src / "bad.png").write_bytes(b"broken")
    convert(src, tmp_path / "reference", options(**limits))

    with monkeypatch.context() as patch:
        patch.setattr(convert_module.ShardWriter, "close_shard", crash_after(shards=2))
        with pytest.raises(KeyboardInterrupt):
            convert(src, tmp_path / "out", options(**limits))
    assert (tmp_path / "out" / "train-000002.tar.tmp").exists()  # the shard being written when it stopped
    with pytest.raises(FileNotFoundError, match=r"was interrupted \(_progress_train.json records it\); re-run"):
        load_info(tmp_path / "out")  # what pretraining on the unfinished directory says
    (tmp_path / "out" / "train-000007.tar.tmp").write_bytes(b"junk from an earlier crash")
    journal = tmp_path / "out" / "_progress_train.json"
    recorded = json.loads(journal.read_text())
    for shard in recorded["shards"]:
        del shard["num_bytes"]  # as a version that recorded no sizes wrote its journal
    journal.write_text(json.dumps(recorded))
    with pytest.raises(ConversionError, match="other settings"):
        convert(src, tmp_path / "out", options(**limits, seed=1))

    summary = convert(src, tmp_path / "out", options(**limits))
    assert summary.resumed_shards == 2
    sources = [json.loads(fields["json"])["source"] for _, fields in read_split(tmp_path / "out")]
    assert sorted(sources) == sorted(f"img{i:02d}.png" for i in range(14))
    assert [skip["source"] for skip in summary.skipped] == ["bad.png"]
    assert load_info(tmp_path / "out") == load_info(tmp_path / "reference") | {"name": "out"}
    sizes = [(tmp_path / "out" / name).stat().st_size for name in summary.filenames]
    assert load_info(tmp_path / "out")["splits"]["train"]["shard_bytes"] == sizes
    for name in summary.filenames:  # byte-identical to an uninterrupted run
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "reference" / name).read_bytes()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(summary.filenames + ["_info.json"])


def interrupted(src: Path, out: Path, monkeypatch, after: int, **settings) -> None:
    """Run a conversion that an interruption stops once it has closed ``after`` more shards."""
    with monkeypatch.context() as patch:
        patch.setattr(convert_module.ShardWriter, "close_shard", crash_after(shards=after))
        with pytest.raises(KeyboardInterrupt):
            convert(src, out, options(**settings))


def test_a_conversion_interrupted_twice_resumes_without_duplicates_or_losses(tmp_path, monkeypatch):
    """The second resume continues from the positions the first resume recorded, so those must count from where it
    started, not from 0 (in-process encoding, workers=0, numbers them itself)."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(14):
        (src / f"img{i:02d}.png").write_bytes(encoded(gradient(4 + i, 5), "PNG"))
    (src / "bad.png").write_bytes(b"broken")
    reference = convert(src, tmp_path / "reference", options(shard_size=3))
    for _ in range(2):  # shards 0-1, then 2-3; the last of the 5 shards is left to the final run
        interrupted(src, tmp_path / "out", monkeypatch, after=2, shard_size=3)

    summary = convert(src, tmp_path / "out", options(shard_size=3))
    assert summary.resumed_shards == 4 and summary.filenames == reference.filenames
    sources = [json.loads(fields["json"])["source"] for _, fields in read_split(tmp_path / "out")]
    assert sorted(sources) == sorted(f"img{i:02d}.png" for i in range(14))  # each exactly once
    assert [skip["source"] for skip in summary.skipped] == ["bad.png"]
    for name in summary.filenames:  # byte-identical to an uninterrupted run
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "reference" / name).read_bytes()


@pytest.mark.parametrize("setting, value", [
    ("max_size", 8),  # would mix resized and full-size images in one split
    ("shard_size", 4),
    ("shard_bytes", 10_000),
    ("max_image_pixels", 100_000),
    ("limit", 5),
    ("compress", True),
])
def test_resuming_with_another_output_setting_is_refused_naming_it(tmp_path, monkeypatch, setting, value):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(6):
        (src / f"img{i}.png").write_bytes(encoded(gradient(10 + i, 12), "PNG"))
    interrupted(src, tmp_path / "out", monkeypatch, after=1, shard_size=3)
    old = getattr(options(shard_size=3), setting)
    with pytest.raises(ConversionError, match=re.escape(f"other settings ({setting}: {old!r} -> {value!r})")):
        convert(src, tmp_path / "out", options(**{"shard_size": 3, setting: value}))
    assert convert(src, tmp_path / "out", options(shard_size=3)).resumed_shards == 1  # the original one finishes


# Run by the tests below in a process of their own: if the pool hangs, only that process is killed.
CONVERT_UNDER_A_SIGTERM_IGNORING_CALLER = """
import multiprocessing, os, signal, sys
from mae_tnt.data import convert as convert_module

def disk_full(writer, members):
    raise OSError(28, "No space left on device")

def end_workers_then_add(writer, members, add=convert_module.ShardWriter.add):  # as a scheduler's SIGTERM
    for worker in multiprocessing.active_children():
        try:
            os.kill(worker.pid, signal.SIGTERM)
        except ProcessLookupError:  # the pool, seeing the first one die, has already ended and reaped it
            pass
    add(writer, members)

signal.signal(signal.SIGTERM, lambda signum, frame: print("the caller's handler ran in a worker", flush=True))
convert_module.ShardWriter.add = {"disk_full": disk_full, "sigterm": end_workers_then_add}[sys.argv[3]]
try:
    convert_module.convert(sys.argv[1], sys.argv[2], convert_module.ConvertOptions(workers=2, progress=False))
except (OSError, convert_module.ConversionError) as err:
    print("raised:", err)
"""


@pytest.mark.parametrize(("failure", "message"), [
    ("disk_full", "[Errno 28] No space left on device"),
    ("sigterm", "an encoding worker died (killed by a signal or out of memory); run the same command again to "
                "resume from the last finished shard"),
])
def test_a_failing_conversion_stops_its_workers_under_a_caller_that_handles_sigterm(tmp_path, failure, message):
    """A handler forked from the caller (a training run's, a notebook's) kept the workers alive when the pool ended
    them with SIGTERM, and the pool waited forever; `multiprocessing.Pool` also waited forever for the tasks of
    workers that a scheduler's SIGTERM had ended."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(300):  # enough queued work that workers are still busy when the first shard write fails
        (src / f"{i}.png").write_bytes(encoded(gradient(4, 4), "PNG"))
    command = [sys.executable, "-c", CONVERT_UNDER_A_SIGTERM_IGNORING_CALLER, str(src), str(tmp_path / "out"), failure]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.stdout == f"raised: {message}\n", result.stderr


def test_workers_of_a_conversion_killed_alone_exit_so_that_the_same_command_finishes_it(tmp_path):
    """The OOM killer or a `kill PID` ends the main process alone: its forked workers, which share its lock on OUT,
    waited on their task queue forever, and the command run again waited for them."""
    (tmp_path / "idx").mkdir()
    count = 20000  # work for a few seconds, so that the workers are caught while they encode
    write_idx(tmp_path / "idx" / "train-images-idx3-ubyte.gz", np.zeros((count, 8, 8)))
    write_idx(tmp_path / "idx" / "train-labels-idx1-ubyte.gz", np.zeros(count))
    command = [sys.executable, str(REPO / "tools" / "make_shards.py"), str(tmp_path / "idx"), str(tmp_path / "out"),
               "--workers", "2"]
    main = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: list[int] = []
    while len(workers) < 2 and main.poll() is None:
        workers = descendants(main.pid)
    main.kill()
    main.wait()
    assert len(workers) == 2
    assert all(stops_running(pid, within=10) for pid in workers)
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    assert load_info(tmp_path / "out")["splits"]["train"]["num_samples"] == count


ORPHANED_BEFORE_WATCHING = """
import os, sys, time
from mae_tnt.data.convert import exit_with_parent
parent = os.getpid()
if os.fork() == 0:  # a worker whose parent is killed before the worker starts watching it
    time.sleep(0.5)
    with open(sys.argv[1] + ".tmp", "w") as file:
        file.write(str(os.getpid()))
    os.replace(sys.argv[1] + ".tmp", sys.argv[1])
    exit_with_parent(parent)
    time.sleep(60)
"""


def test_a_worker_whose_parent_went_before_it_started_watching_exits_at_once(tmp_path):
    subprocess.run([sys.executable, "-c", ORPHANED_BEFORE_WATCHING, str(tmp_path / "pid")], check=True, cwd=REPO,
                   timeout=60)  # returns at once: the parent is gone
    deadline = time.monotonic() + 30
    while not (tmp_path / "pid").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stops_running(int((tmp_path / "pid").read_text()), within=10)


def test_a_corrupt_record_of_an_unfinished_conversion_is_named_with_the_way_out(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.png").write_bytes(encoded(gradient(4, 4), "PNG"))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "_progress_train.json").write_text('{"job": ')  # cut short by a full disk, say
    with pytest.raises(ConversionError, match=r"_progress_train.json, the record of an unfinished conversion, is "
                                              r"corrupt \(.*\); pass --overwrite to start the split over"):
        convert(tmp_path / "src", tmp_path / "out", options())
    assert convert(tmp_path / "src", tmp_path / "out", options(overwrite=True)).num_samples == 1


def test_existing_shards_of_a_finished_run_are_not_overwritten(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.png").write_bytes(encoded(gradient(4, 4), "PNG"))
    convert(tmp_path / "src", tmp_path / "out", options(split="train-extra"))
    convert(tmp_path / "src", tmp_path / "out", options())  # "train-*" names of split "train-extra" are not its own
    with pytest.raises(ConversionError, match="already holds shards"):
        convert(tmp_path / "src", tmp_path / "out", options())
    assert sorted(load_info(tmp_path / "out")["splits"]) == ["train", "train-extra"]
    assert inspect_main([str(tmp_path / "out")]) == 0


def write_imagefolder(root: Path, classes: list[str], per_class: int) -> None:
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            (root / name / f"{i}.png").write_bytes(encoded(gradient(4 + i, 4), "PNG"))


def test_overwrite_replaces_one_split_and_keeps_the_others(tmp_path, capsys):
    out, old, new = tmp_path / "out", tmp_path / "old", tmp_path / "new"
    write_imagefolder(old, ["cat", "dog"], per_class=2)
    write_imagefolder(new, ["cat", "dog"], per_class=3)
    for split in ("train", "val"):
        convert(old, out, options(split=split, shard_size=1))
    (out / "train-000009.tar.tmp").write_bytes(b"left by a crash")
    args = [str(new), str(out), "--workers", "0", "--shard-size", "2"]
    assert make_shards_main(args) == 1
    assert "Pass --overwrite" in capsys.readouterr().err
    assert make_shards_main(args + ["--overwrite"]) == 0
    info = load_info(out)
    assert (info["splits"]["train"]["num_samples"], info["splits"]["val"]["num_samples"]) == (6, 4)
    assert sorted(by_source(out)) == [f"{c}/{i}.png" for c in ("cat", "dog") for i in range(3)]
    assert sorted(p.name for p in out.glob("train-*")) == [f"train-00000{i}.tar" for i in range(3)]
    assert inspect_main([str(out)]) == 0

    write_imagefolder(tmp_path / "birds", ["owl", "tit", "wren"], per_class=1)  # the only split: classes may change
    convert(old, tmp_path / "solo", options())
    convert(tmp_path / "birds", tmp_path / "solo", options(overwrite=True))
    assert load_info(tmp_path / "solo")["classes"] == ["owl", "tit", "wren"]


def test_a_stray_top_level_image_in_an_imagefolder_is_pointed_out(tmp_path, capsys):
    write_imagefolder(tmp_path / "src", ["cat", "dog"], per_class=2)
    (tmp_path / "src" / "stray.png").write_bytes(encoded(gradient(4, 4), "PNG"))
    assert make_shards_main([str(tmp_path / "src"), str(tmp_path / "out"), "--workers", "0"]) == 0
    out, err = capsys.readouterr()
    assert "train: 5 samples (folder, unlabeled)" in out
    assert "also 1 image(s) at its top level (e.g. stray.png)" in err and "--format imagefolder" in err
    args = [str(tmp_path / "src"), str(tmp_path / "labeled"), "--workers", "0", "--format", "imagefolder"]
    assert make_shards_main(args) == 0
    assert "train: 4 samples (imagefolder, 2 classes)" in capsys.readouterr().out


def test_a_shard_directory_given_as_the_source_is_refused_saying_how_to_use_it(tmp_path, capsys):
    write_imagefolder(tmp_path / "src", ["cat", "dog"], per_class=1)
    assert make_shards_main([str(tmp_path / "src"), str(tmp_path / "shards"), "--workers", "0"]) == 0
    capsys.readouterr()
    assert make_shards_main([str(tmp_path / "shards"), str(tmp_path / "again"), "--workers", "0"]) == 1
    assert capsys.readouterr().err == (f"error: {tmp_path / 'shards'} holds shards already (_info.json): train on "
                                       f"them as data.train={tmp_path / 'shards'}, or check them with "
                                       "tools/inspect_shards.py; SRC is the dataset the shards are made from\n")
    assert not (tmp_path / "again").exists()


def test_split_folders_read_as_classes_are_pointed_out(tmp_path, capsys):
    for split in ("train", "val"):
        write_imagefolder(tmp_path / "src" / split, ["cat", "dog"], per_class=1)
    assert make_shards_main([str(tmp_path / "src"), str(tmp_path / "out"), "--workers", "0"]) == 0
    out, err = capsys.readouterr()
    assert "train: 4 samples (imagefolder, 2 classes)" in out  # train and val, as asked for
    assert err.startswith(f"note: the sub-folders of {tmp_path / 'src'} (train, val) look like splits but are read "
                          "as classes; to shard each split, run this tool on each of them, e.g. "
                          f"{tmp_path / 'src' / 'train'} --split train, into a new OUT (or into this one with "
                          "--overwrite)\n")
    args = [str(tmp_path / "src" / "train"), str(tmp_path / "out"), "--workers", "0", "--overwrite"]
    assert make_shards_main(args) == 0  # as the note says
    assert "NOTE" not in capsys.readouterr().err and load_info(tmp_path / "out")["classes"] == ["cat", "dog"]


def test_a_split_with_other_classes_is_refused_before_any_shard_is_written(tmp_path):
    write_imagefolder(tmp_path / "a", ["cat", "dog"], per_class=1)
    write_imagefolder(tmp_path / "b", ["cat", "cow", "dog"], per_class=1)
    convert(tmp_path / "a", tmp_path / "out", options())
    with pytest.raises(InfoError, match=r"already has classes \['cat', 'dog'\]; split 'val' has \['cat', 'cow', "
                                        r"'dog'\]\. Labels must mean the same in every split: pass --classes "
                                        r"cat,dog, or convert it into a separate directory\.$"):
        convert(tmp_path / "b", tmp_path / "out", options(split="val"))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["_info.json", "train-000000.tar"]
    write_imagefolder(tmp_path / "c", ["cat"], per_class=1)  # a split missing a class takes the full list
    with pytest.raises(InfoError, match=r"split 'val' has \['cat'\]\. .* pass --classes cat,dog, or"):
        convert(tmp_path / "c", tmp_path / "out", options(split="val"))
    assert convert(tmp_path / "c", tmp_path / "out", options(split="val", classes=("cat", "dog"))).num_samples == 1


def test_a_mistyped_classes_file_is_an_error_not_one_class_name(tmp_path, capsys):
    write_imagefolder(tmp_path / "src", ["cat", "dog"], per_class=1)
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    args = [str(tmp_path / "src"), str(tmp_path / "out"), "--workers", "0", "--classes"]
    assert make_shards_main(args + [str(tmp_path / "clases.txt")]) == 1
    assert "looks like a file, but there is none" in capsys.readouterr().err
    assert make_shards_main(args + [str(tmp_path / "classes.txt")]) == 0
    assert load_info(tmp_path / "out")["classes"] == ["cat", "dog"]


def test_a_classes_file_saved_with_a_byte_order_mark_names_its_first_class_without_it(tmp_path):
    write_imagefolder(tmp_path / "src", ["cat", "dog"], per_class=1)
    (tmp_path / "classes.txt").write_text("cat\ndog\n", encoding="utf-8-sig")  # as Windows Notepad saves it
    args = [str(tmp_path / "src"), str(tmp_path / "out"), "--workers", "0", "--classes", str(tmp_path / "classes.txt")]
    assert make_shards_main(args) == 0
    assert load_info(tmp_path / "out")["classes"] == ["cat", "dog"]


def test_a_class_named_twice_is_refused_before_anything_is_written(tmp_path, capsys):
    write_imagefolder(tmp_path / "src", ["a", "b"], per_class=1)
    assert make_shards_main([str(tmp_path / "src"), str(tmp_path / "out"), "--classes", "a,b,a"]) == 1
    assert "--classes names a more than once" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_file_names_that_are_not_utf8_are_converted_and_listed(tmp_path):
    """Names from old archives or Windows shares may be Latin-1; Python holds their bytes as lone surrogates."""
    latin1 = os.fsdecode(b"caf\xe9")
    (tmp_path / "src").mkdir()
    for name in ("plain.png", f"{latin1}.png"):
        (tmp_path / "src" / name).write_bytes(encoded(gradient(4, 4), "PNG"))
    (tmp_path / "src" / f"{latin1}.txt").write_text("notes")
    summary = convert(tmp_path / "src", tmp_path / "out", options())
    assert sorted(by_source(tmp_path / "out")) == sorted(["plain.png", f"{latin1}.png"])
    skipped = load_info(tmp_path / "out")["splits"]["train"]["skipped"]
    assert [skip["source"] for skip in skipped] == [f"{latin1}.txt"] == [skip["source"] for skip in summary.skipped]
    assert os.fsencode(skipped[0]["source"]) == b"caf\xe9.txt"  # the name read back is the file's


def test_an_output_path_that_is_a_file_is_one_error_line(tmp_path, capsys):
    write_imagefolder(tmp_path / "src", ["cat"], per_class=1)
    (tmp_path / "out").write_text("notes")
    assert make_shards_main([str(tmp_path / "src"), str(tmp_path / "out"), "--workers", "0"]) == 1
    assert capsys.readouterr().err == f"error: {tmp_path / 'out'} is a file; OUT must be a directory for the shards: " \
                                      "give a new or existing one\n"
    assert (tmp_path / "out").read_text() == "notes"
    assert make_shards_main([str(tmp_path / "src"), str(tmp_path / "out" / "shards"), "--workers", "0"]) == 1
    assert capsys.readouterr().err == f"error: cannot create the output directory {tmp_path / 'out' / 'shards'}: " \
                                      "Not a directory\n"


@pytest.mark.parametrize("workers", [0, 2])
def test_images_over_the_pixel_limit_are_skipped_naming_the_option_that_raises_it(tmp_path, workers):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "big.png").write_bytes(encoded(gradient(100, 100), "PNG"))  # 10,000 pixels
    (tmp_path / "src" / "small.png").write_bytes(encoded(gradient(50, 50), "PNG"))
    before = Image.MAX_IMAGE_PIXELS
    summary = convert(tmp_path / "src", tmp_path / "out", options(workers=workers, max_image_pixels=5000))
    assert summary.num_samples == 1 and [skip["source"] for skip in summary.skipped] == ["big.png"]
    assert summary.skipped[0]["reason"].endswith("10000 pixels, over the limit of 5000 (PIL's decompression-bomb "
                                                 "guard); if you trust the image, raise it: make_shards "
                                                 "--max-image-pixels, or data.max_image_pixels")
    assert Image.MAX_IMAGE_PIXELS == before  # the caller's limit is its own again
    raised = convert(tmp_path / "src", tmp_path / "raised", options(workers=workers, max_image_pixels=10_000))
    assert (raised.num_samples, raised.skipped) == (2, [])


def test_max_size_resizes_large_images_and_passes_the_rest_through_byte_identical(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    files = {
        "big.jpg": encoded(gradient(64, 48), "JPEG"),
        "big.png": encoded(gradient(30, 60), "PNG"),
        "small.jpg": encoded(gradient(20, 10), "JPEG"),
        "small.png": encoded(gradient(16, 16), "PNG"),
        "small.bmp": encoded(gradient(8, 6), "BMP"),
    }
    for name, data in files.items():
        (src / name).write_bytes(data)
    convert(src, tmp_path / "out", options(max_size=32))
    samples = by_source(tmp_path / "out")
    assert samples["small.jpg"]["jpg"] == files["small.jpg"] and samples["small.png"]["png"] == files["small.png"]
    assert decode(samples["big.jpg"]["jpg"]).size == (32, 24) and decode(samples["big.png"]["png"]).size == (16, 32)
    assert json.loads(samples["big.jpg"]["json"])["width"] == 64  # the original size
    bmp = decode(samples["small.bmp"]["png"])
    assert bmp.size == (8, 6) and np.array_equal(np.asarray(bmp), np.asarray(gradient(8, 6)))


def test_a_folder_scan_reads_every_photo_format_pillow_decodes_and_stores_it_as_png(tmp_path):
    (tmp_path / "src").mkdir()
    image = gradient(8, 6)
    for name, fmt in (("a.avif", "AVIF"), ("b.jp2", "JPEG2000"), ("c.j2k", "JPEG2000"), ("d.tga", "TGA"),
                      ("e.WEBP", "WEBP")):
        (tmp_path / "src" / name).write_bytes(encoded(image, fmt))
    summary = convert(tmp_path / "src", tmp_path / "out", options())
    assert (summary.num_samples, summary.skipped) == (5, [])
    samples = by_source(tmp_path / "out")
    assert all(decode(fields["png"]).size == (8, 6) for fields in samples.values())
    assert np.array_equal(np.asarray(decode(samples["d.tga"]["png"])), np.asarray(image))  # a lossless source


def test_imagefolder_labels_and_class_map(tmp_path):
    src = tmp_path / "src"
    for path in ("dog/b.png", "cat/a.png", "dog/puppies/c.jpg", "bird/d.png"):
        (src / path).parent.mkdir(parents=True, exist_ok=True)
        (src / path).write_bytes(encoded(gradient(4, 4), "JPEG" if path.endswith("jpg") else "PNG"))
    (src / "README.txt").write_text("labels are folder names")
    assert detect_format(src) == "imagefolder"
    summary = convert(src, tmp_path / "out", options())
    assert load_info(tmp_path / "out")["classes"] == ["bird", "cat", "dog"]
    labels = {
        source: (int(f["cls"]), json.loads(f["json"])["label"]) for source, f in by_source(tmp_path / "out").items()
    }
    assert labels == {
        "bird/d.png": (0, "bird"),
        "cat/a.png": (1, "cat"),
        "dog/b.png": (2, "dog"),
        "dog/puppies/c.jpg": (2, "dog"),
    }
    assert summary.skipped == [{"source": "README.txt", "reason": "not inside a class folder"}]


def test_file_lists_with_names_ints_and_no_labels(tmp_path):
    (tmp_path / "imgs").mkdir()
    for name in ("a.png", "b.png", "c.png"):
        (tmp_path / "imgs" / name).write_bytes(encoded(gradient(4, 4), "PNG"))
    (tmp_path / "named.csv").write_text("path,label\nimgs/a.png,zebra\nimgs/b.png,ant\nimgs/missing.png,ant\n")
    summary = convert(tmp_path / "named.csv", tmp_path / "named", options())
    assert load_info(tmp_path / "named")["classes"] == ["ant", "zebra"]
    assert {s: int(f["cls"]) for s, f in by_source(tmp_path / "named").items()} == {"imgs/a.png": 1, "imgs/b.png": 0}
    assert summary.skipped[0]["source"] == "imgs/missing.png" and "unreadable" in summary.skipped[0]["reason"]

    (tmp_path / "ints.csv").write_text("path,label\nimgs/a.png,2\nimgs/c.png,0\n")
    convert(tmp_path / "ints.csv", tmp_path / "ints", options(classes=("x", "y", "z")))
    assert load_info(tmp_path / "ints")["classes"] == ["x", "y", "z"]
    assert json.loads(by_source(tmp_path / "ints")["imgs/a.png"]["json"])["label"] == "z"

    (tmp_path / "comma.csv").write_text("path,label\nimgs/a.png,zebra\nimgs/a,b.png,ant\n")  # an unquoted comma
    with pytest.raises(SourceError, match=r"comma.csv:3: more fields than the 2 header columns; put a path that "
                                          r'holds a comma in double quotes: "a,b.jpg",label'):
        convert(tmp_path / "comma.csv", tmp_path / "comma", options())

    (tmp_path / "headless.csv").write_text("imgs/a.png,zebra\n")
    with pytest.raises(SourceError, match="needs a header line whose first column is `path` .*its first line is "
                                          "'imgs/a.png,zebra'"):
        convert(tmp_path / "headless.csv", tmp_path / "headless", options())
    (tmp_path / "headless.txt").write_text("imgs/a.png\tzebra\n")  # a TSV, whatever its name
    with pytest.raises(SourceError, match=r"needs a header line whose first column is `path` .*its first line is "
                                          r"'imgs/a.png\\tzebra'"):
        convert(tmp_path / "headless.txt", tmp_path / "headless", options())

    (tmp_path / "plain.txt").write_text(f"# comment\nimgs/a.png\n{tmp_path / 'imgs' / 'b.png'}\n")
    assert convert(tmp_path / "plain.txt", tmp_path / "plain", options()).num_samples == 2
    assert all("cls" not in fields for _, fields in read_split(tmp_path / "plain"))


def test_a_file_listed_twice_is_kept_once_and_one_listed_with_two_labels_is_an_error(tmp_path):
    (tmp_path / "imgs").mkdir()
    for name in ("a.png", "b.png"):
        (tmp_path / "imgs" / name).write_bytes(encoded(gradient(4, 4), "PNG"))
    absolute_b = tmp_path / "imgs" / "b.png"
    (tmp_path / "joined.txt").write_text(f"imgs/a.png\nimgs/b.png\n\n./imgs/a.png\n{absolute_b}\n")  # lists pasted
    summary = convert(tmp_path / "joined.txt", tmp_path / "joined", options())
    assert summary.num_samples == 2
    assert summary.skipped == [{"source": "./imgs/a.png", "reason": "listed again on line 4 (first on line 1)"},
                               {"source": str(absolute_b), "reason": "listed again on line 5 (first on line 2)"}]

    (tmp_path / "clash.csv").write_text("path,label\nimgs/a.png,cat\n\nimgs/b.png,dog\nimgs/a.png,dog\n")
    with pytest.raises(SourceError, match=r"clash.csv:5: imgs/a.png is listed with label 'dog' here and 'cat' on "
                                          r"line 2; give each file one label"):
        convert(tmp_path / "clash.csv", tmp_path / "clash", options())


def test_file_lists_as_spreadsheets_save_them_and_negative_labels(tmp_path):
    (tmp_path / "imgs").mkdir()
    for name in ("a.png", "b.png"):
        (tmp_path / "imgs" / name).write_bytes(encoded(gradient(4, 4), "PNG"))
    # Excel's "CSV UTF-8" starts with a byte-order mark and may quote the header.
    (tmp_path / "excel.csv").write_bytes('\ufeff"path","label"\r\nimgs/a.png,cat\r\nimgs/b.png,dog\r\n'.encode())
    assert convert(tmp_path / "excel.csv", tmp_path / "excel", options()).num_samples == 2
    assert load_info(tmp_path / "excel")["classes"] == ["cat", "dog"]
    (tmp_path / "bom.txt").write_bytes("\ufeffimgs/a.png\nimgs/b.png\n".encode())
    summary = convert(tmp_path / "bom.txt", tmp_path / "bom", options())
    assert (summary.num_samples, summary.skipped) == (2, [])  # the first path is not lost to the mark
    (tmp_path / "negative.csv").write_text("path,label\nimgs/a.png,-1\nimgs/b.png,0\n")
    with pytest.raises(SourceError, match="label -1 is negative"):
        convert(tmp_path / "negative.csv", tmp_path / "negative", options())
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ConversionError, match="no readable image in"):  # not an IndexError from the header check
        convert(tmp_path / "empty.txt", tmp_path / "empty", options())
    assert not (tmp_path / "empty").exists()  # a failed conversion leaves no empty OUT behind
    (tmp_path / "mine").mkdir()
    with pytest.raises(ConversionError, match="no readable image in"):
        convert(tmp_path / "empty.txt", tmp_path / "mine", options())
    assert (tmp_path / "mine").is_dir()  # but an OUT it did not create stays
    (tmp_path / "tabs.tsv").write_text("path\tlabel\nimgs/a.png\tcat\nimgs/b.png\tdog\n")
    assert convert(tmp_path / "tabs.tsv", tmp_path / "tabs", options()).num_samples == 2
    assert load_info(tmp_path / "tabs")["classes"] == ["cat", "dog"]
    (tmp_path / "spaced.txt").write_text("imgs/a.png 0\nimgs/b.png 1\n")  # ImageNet-style "path label" lines
    with pytest.raises(ConversionError, match="(?s)no readable image in .*spaced.txt .*\nA list names one image per "
                                              r"line \(lines starting with # are comments\), or is a CSV or TSV"):
        convert(tmp_path / "spaced.txt", tmp_path / "spaced", options())


def write_idx(path: Path, array: np.ndarray) -> None:
    """An unsigned-byte IDX file: zero, type 0x08, ndim, big-endian dims, data."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def test_idx_dims_whose_product_passes_2_to_the_64_are_a_header_that_disagrees_with_its_data(tmp_path):
    header = struct.pack(">HBB", 0, 0x08, 3) + struct.pack(">3I", 2**31, 2**31, 4)  # 2**64 values: np.prod gives 0
    (tmp_path / "train-images-idx3-ubyte").write_bytes(header)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(2))
    with pytest.raises(SourceError, match=r"header says \(2147483648, 2147483648, 4\) but holds 0 values"):
        convert(tmp_path, tmp_path / "out", options())


def test_idx_files_and_a_later_split_keep_the_first(tmp_path):
    rng = np.random.default_rng(0)
    splits = {"train": rng.integers(0, 256, (7, 5, 4)), "t10k": rng.integers(0, 256, (3, 5, 4))}
    for prefix, images in splits.items():
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(len(images)) % 3)
    assert detect_format(tmp_path) == "idx"
    out = tmp_path / "out"
    assert make_shards_main([str(tmp_path), str(out), "--limit", "5", "--workers", "0", "--classes", "a,b,c"]) == 0
    assert make_shards_main([str(tmp_path), str(out), "--split", "val", "--workers", "0", "--classes", "a,b,c"]) == 0
    info = load_info(out)
    assert {name: entry["num_samples"] for name, entry in info["splits"].items()} == {"train": 5, "val": 3}
    assert info["classes"] == ["a", "b", "c"] and info["name"] == "out"
    for source, fields in by_source(out, "val").items():
        index = int(re.fullmatch(r"t10k-images-idx3-ubyte.gz\[(\d)\]", source).group(1))
        assert np.array_equal(np.asarray(decode(fields["png"])), splits["t10k"][index])  # lossless, [H, W]
        assert int(fields["cls"]) == index % 3
    assert make_shards_main([str(tmp_path), str(tmp_path / "bad"), "--split", "val", "--classes", "a"]) == 1
    with pytest.raises(SourceError, match=r"IDX data has splits \['test', 'train', 'val'\], not 'Train'"):
        convert(tmp_path, tmp_path / "typo", options(split="Train"))
    for split in ("train", "val"):  # into the IDX folder itself: the second split found the first one's _info.json
        assert make_shards_main([str(tmp_path), str(tmp_path), "--split", split, "--workers", "0"]) == 0
    assert {name: entry["num_samples"] for name, entry in load_info(tmp_path)["splits"].items()} == {"train": 7,
                                                                                                     "val": 3}


@pytest.mark.parametrize(
    ("meta_name", "meta", "batches", "label_key"),
    [
        ("batches.meta", {"label_names": ["cat", "dog"]}, ("data_batch_1", "test_batch"), "labels"),
        ("meta", {"fine_label_names": ["apple", "bee"], "coarse_label_names": ["x"]}, ("train", "test"), "fine_labels"),
    ],
)
@pytest.mark.parametrize("python3_bytes", [False, True], ids=["str-keys", "bytes-keys"])
@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])  # 2: that of the official Python 2 files
def test_cifar_batches(tmp_path, meta_name, meta, batches, label_key, python3_bytes, protocol):
    images = np.random.default_rng(1).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    rows = images.transpose(0, 3, 1, 2).reshape(4, 3072)  # [N, H, W, 3] -> [N, 3 * H * W], channel planes
    batch = {"data": rows, label_key: [1, 0, 1, 1], "coarse_labels": [0, 0, 0, 0]}
    for name, content in ((meta_name, meta), (batches[0], batch), (batches[1], batch)):
        if python3_bytes:  # keys and class names as a Python 3 pickle of the `encoding="bytes"` layout has them
            content = {k.encode(): [n.encode() for n in v] if k.endswith("names") else v for k, v in content.items()}
        (tmp_path / name).write_bytes(pickle.dumps(content, protocol=protocol))
    assert detect_format(tmp_path) == "cifar"
    convert(tmp_path, tmp_path / "out", options())
    assert load_info(tmp_path / "out")["classes"] == list(meta.values())[0]
    fields = by_source(tmp_path / "out")[f"{batches[0]}[2]"]
    assert np.array_equal(np.asarray(decode(fields["png"])), images[2]) and fields["cls"] == b"1"
    with pytest.raises(SourceError, match=r"CIFAR data has splits \['test', 'train', 'val'\], not 'trian'"):
        convert(tmp_path, tmp_path / "typo", options(split="trian"))  # not the test batch under a misspelt name
    (tmp_path / batches[1]).unlink()  # the training batches alone are CIFAR data too
    assert detect_format(tmp_path) == "cifar"
    convert(tmp_path, tmp_path / "train_only", options())
    assert load_info(tmp_path / "train_only")["splits"]["train"]["num_samples"] == 4
    with pytest.raises(SourceError, match=rf"no {batches[1]} files for 'val'"):
        convert(tmp_path, tmp_path / "no_test", options(split="val"))
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", images[..., 0])  # a second dataset in the same folder
    with pytest.raises(SourceError, match="holds both IDX .* and CIFAR batch files; pass --format idx or --format cif"):
        detect_format(tmp_path)
    convert(tmp_path, tmp_path / "told", options(fmt="cifar"))


def test_class_names_with_commas_are_given_back_as_a_file_in_the_advice(tmp_path):
    update_split(tmp_path, "train", ["train-000000.tar"], [2], classes=["red, green", "blue"])
    with pytest.raises(InfoError, match=r"pass --classes FILE with those classes, one per line in that order, or"):
        update_split(tmp_path, "val", ["val-000000.tar"], [1], classes=["blue"])


def test_update_split_is_atomic_and_checks_classes(tmp_path):
    update_split(tmp_path, "train", ["train-000000.tar"], [4], classes=["a", "b"], name="toy")
    update_split(tmp_path, "val", ["val-000000.tar", "val-000001.tar"], [2, 1])
    info = load_info(tmp_path)
    assert info["name"] == "toy" and info["classes"] == ["a", "b"] and info["splits"]["val"]["num_samples"] == 3
    assert info["splits"]["train"]["shard_lengths"] == [4]
    with pytest.raises(InfoError, match="already has classes"):
        update_split(tmp_path, "test", ["t.tar"], [1], classes=["b", "a"])

    assert sorted(p.name for p in tmp_path.iterdir()) == ["_info.json"]
    update_split(tmp_path, "val", ["val-000000.tar"], [3], labeled=False)  # unlabeled: its classes do not count
    assert update_split(tmp_path, "train", ["train-000000.tar"], [4], classes=["c", "d"])["classes"] == ["c", "d"]
    (tmp_path / "_info.json").write_text('{"splits": {"train": {"num_samples": 3}}}')
    with pytest.raises(InfoError, match="_info.json: split 'train' needs"):
        load_info(tmp_path)
    with pytest.raises(FileNotFoundError, match="make_shards"):
        load_info(tmp_path / "nowhere")


def test_count_tar_samples_rejects_truncated_tars(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / f"{i}.png").write_bytes(encoded(gradient(20, 20), "PNG"))
    convert(src, tmp_path / "out", options())
    shard = (tmp_path / "out" / "train-000000.tar").read_bytes()
    assert count_tar_samples(tmp_path / "out" / "train-000000.tar") == 3
    with tarfile.open(tmp_path / "out" / "train-000000.tar") as tar:
        last = tar.getmembers()[-1]
        end_of_members = last.offset_data + -(-last.size // 512) * 512
    for cut in (len(shard) // 2, end_of_members):  # inside a member, and exactly at a member boundary
        (tmp_path / "cut.tar").write_bytes(shard[:cut])
        with pytest.raises(InfoError, match="truncated"):
            count_tar_samples(tmp_path / "cut.tar")


def two_shards_of_pngs(tmp_path: Path) -> Path:
    """OUT of a conversion of four PNGs into two shards."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(4):
        (src / f"{i}.png").write_bytes(encoded(gradient(6, 6), "PNG"))
    convert(src, tmp_path / "out", options(shard_size=2))
    return tmp_path / "out"


def hash_position(source_id: str) -> float:
    """Where --subset places an input: its path's SHA-256 as a fraction of [0, 1) (the documented rule)."""
    return int.from_bytes(hashlib.sha256(source_id.encode()).digest()[:8], "big") / 2**64


def test_subsets_cut_one_folder_into_parts_that_share_no_input_whatever_their_seeds(tmp_path):
    names = [f"img{i:02d}.png" for i in range(30)]
    (tmp_path / "src").mkdir()
    for name in names:
        (tmp_path / "src" / name).write_bytes(encoded(gradient(4, 4), "PNG"))
    (tmp_path / "src" / "notes.txt").write_text("not an image")
    convert(tmp_path / "src", tmp_path / "out", options(split="train", subset=(0, 0.7), seed=1))
    convert(tmp_path / "src", tmp_path / "out", options(split="val", subset=(0.7, 1), seed=2))
    parts = {split: set(by_source(tmp_path / "out", split)) for split in ("train", "val")}
    assert parts["train"] == {name for name in names if hash_position(name) < 0.7}
    assert parts["val"] == set(names) - parts["train"] and parts["val"]
    splits = load_info(tmp_path / "out")["splits"].values()
    skipped = [[skip["source"] for skip in entry["skipped"]] for entry in splits]
    assert sorted(skipped) == [[], ["notes.txt"]]  # a rejected input is listed by the part its path falls in


@pytest.mark.parametrize("value, error", [
    ("0.8", "argument --subset: expected LOW:HIGH such as 0:0.9, got '0.8'"),
    ("0.8:0.2", "error: subset must be LOW:HIGH with 0 <= LOW < HIGH <= 1, got 0.8:0.2"),
    ("0:1.5", "error: subset must be LOW:HIGH with 0 <= LOW < HIGH <= 1, got 0:1.5"),
])
def test_a_subset_that_is_no_range_within_0_1_is_refused(tmp_path, capsys, value, error):
    two_shards_of_pngs(tmp_path)
    with pytest.raises(SystemExit) if ":" not in value else nullcontext():
        assert make_shards_main([str(tmp_path / "src"), str(tmp_path / "more"), "--subset", value]) == 1
    assert error in capsys.readouterr().err and not (tmp_path / "more").exists()


def test_a_subset_of_idx_data_is_refused_since_its_split_picks_the_files(tmp_path, capsys):
    (tmp_path / "idx").mkdir()
    for prefix in ("train", "t10k"):
        write_idx(tmp_path / "idx" / f"{prefix}-images-idx3-ubyte.gz", np.zeros((4, 5, 5), dtype=np.uint8))
        write_idx(tmp_path / "idx" / f"{prefix}-labels-idx1-ubyte.gz", np.arange(4) % 2)
    assert make_shards_main([str(tmp_path / "idx"), str(tmp_path / "out"), "--split", "val", "--subset", "0.9:1"]) == 1
    assert ("error: --subset cuts one set of inputs into parts, but IDX data is read by --split (train reads the "
            "training files, val and test the test files)") in capsys.readouterr().err


def test_resuming_with_another_subset_is_refused_naming_it(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(12):
        (src / f"img{i:02d}.png").write_bytes(encoded(gradient(4 + i, 5), "PNG"))
    interrupted(src, tmp_path / "out", monkeypatch, after=1, shard_size=2, subset=(0, 0.9))
    with pytest.raises(ConversionError, match=re.escape("other settings (subset: [0, 0.9] -> [0, 0.5]")):
        convert(src, tmp_path / "out", options(shard_size=2, subset=(0, 0.5)))


def test_a_class_left_out_of_a_subset_is_warned_about(tmp_path, capsys):
    for name in ("cat", "dog"):
        (tmp_path / "src" / name).mkdir(parents=True)
        for i in range(12):
            (tmp_path / "src" / name / f"{i}.png").write_bytes(encoded(gradient(4, 4), "PNG"))
    (tmp_path / "src" / "fish").mkdir()
    (tmp_path / "src" / "fish" / "0.png").write_bytes(encoded(gradient(4, 4), "PNG"))
    fish = hash_position("fish/0.png")
    part = "0:0.5" if fish >= 0.5 else "0.5:1"  # the half without the only fish
    assert make_shards_main([str(tmp_path / "src"), str(tmp_path / "out"), "--workers", "0", "--subset", part]) == 0
    assert ("warning: every input of class fish was skipped or lies outside --subset, so a classifier trained on "
            "these shards has a class it never sees; fix or remove skipped files or widen the subset") in (
        capsys.readouterr().err)


def test_inspect_fails_when_a_shard_count_disagrees(tmp_path, capsys):
    two_shards_of_pngs(tmp_path)
    info = load_info(tmp_path / "out")
    info["splits"]["train"]["shard_lengths"] = [3, 1]
    (tmp_path / "out" / "_info.json").write_text(json.dumps(info))
    assert inspect_main([str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "train-000000.tar: holds 2 samples but _info.json says 3" in err and err.endswith("FAILED: 2 problems\n")
    assert inspect_main([str(tmp_path / "out" / "_info.json")]) == 1
    assert capsys.readouterr().err == (f"error: {tmp_path / 'out' / '_info.json'} is a file: give the shard directory "
                                       f"made by tools/make_shards.py that holds _info.json ({tmp_path / 'out'})\n")


def test_inspect_reports_the_temporary_files_of_interrupted_writes(tmp_path, capsys):
    two_shards_of_pngs(tmp_path)
    out = tmp_path / "out"
    (out / "train-000002.tar.tmp").write_bytes(b"a shard being written")
    (out / ".tmp-_info.json").write_text("{")
    assert inspect_main([str(out)]) == 1
    err = capsys.readouterr().err
    for name in ("train-000002.tar.tmp", ".tmp-_info.json"):
        assert f"{out / name}: temporary file left by an interrupted write" in err
    assert err.endswith("FAILED: 2 problems\n")


def test_inspect_fails_when_a_shard_size_differs_from_the_recorded_one(tmp_path, capsys):
    """A shard rewritten after conversion, still whole: training would re-read its headers at every start."""
    two_shards_of_pngs(tmp_path)
    shard = tmp_path / "out" / "train-000001.tar"
    recorded = shard.stat().st_size
    with shard.open("ab") as file:  # more end-of-archive padding: same members, other size
        file.write(bytes(1024))
    assert inspect_main([str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert f"train-000001.tar: {recorded + 1024} bytes but _info.json records {recorded}" in err
    assert err.endswith("FAILED: 1 problem\n")


def test_inspect_checks_the_samples_before_a_truncated_shards_break_as_training_uses_them(tmp_path, capsys):
    from mae_tnt.data.inspect import inspect_shards

    out = two_shards_of_pngs(tmp_path)
    shard = out / "train-000001.tar"
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    second = next(member for member in members if member.name.split(".")[0] != members[0].name.split(".")[0])
    shard.write_bytes(shard.read_bytes()[: second.offset_data + 10])  # cut inside the second sample's data
    report = inspect_shards(out)
    assert report.problems == [f"{shard}: not a readable tar (unexpected end of data); it is truncated or corrupt, "
                               "re-create it (until then, training uses the 1 of its 2 samples before the break)"]
    assert report.splits["train"].formats == {"PNG": 3}  # the first shard's 2, and the one before the break


def test_inspect_prints_the_normalisation_of_the_images_each_weighted_alike(tmp_path, capsys):
    """A 2x2 red and a 6x6 blue image: per image, R and B are 0 or 1 half the time (mean 0.5, std 0.5); per pixel,
    red would have mean 0.1."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "red.png").write_bytes(encoded(Image.new("RGB", (2, 2), (255, 0, 0)), "PNG"))
    (src / "blue.png").write_bytes(encoded(Image.new("RGB", (6, 6), (0, 0, 255)), "PNG"))
    convert(src, tmp_path / "out", options())
    assert inspect_main([str(tmp_path / "out")]) == 0
    # Green is 0 everywhere: its std of 0 is printed as 0.001, the smallest data.std takes.
    assert "  pixels (RGB, 0-1): data.mean=[0.5,0,0.5] data.std=[0.5,0.001,0.5]\n" in capsys.readouterr().out


@pytest.mark.skipif(not (REPO / "data" / "fashion_mnist").exists(), reason="bundled Fashion-MNIST sample missing")
def test_the_demo_recipes_normalise_with_the_bundled_sample_s_statistics(capsys):
    assert inspect_main([str(REPO / "data" / "fashion_mnist")]) == 0
    train = re.search(r"train: .*\n(?:  .*\n)*?  pixels \(RGB, 0-1\): data.mean=\[(.*)\] data.std=\[(.*)\]\n",
                      capsys.readouterr().out)
    measured = [[float(v) for v in train[i].split(",")] for i in (1, 2)]
    for recipe in REPO.glob("recipes/demo_*.yaml"):
        data = yaml.safe_load(recipe.read_text())["data"]
        np.testing.assert_allclose([data["mean"], data["std"]], measured, atol=0.005, err_msg=recipe.name)


@pytest.mark.parametrize("labeled_first", [True, False])
def test_an_unlabeled_split_beside_labeled_ones_stays_unlabeled(tmp_path, capsys, labeled_first):
    """STL-10's layout: labeled `train` and `unlabeled` splits in one directory, in either order."""
    for name in ("cat/a.png", "dog/b.png", "flat/c.png", "flat/d.png", "flat/e.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(encoded(gradient(6, 6), "PNG"))
    (tmp_path / "flat" / "notes.txt").write_text("not an image")
    (tmp_path / "labeled").mkdir()
    for name in ("cat", "dog"):
        (tmp_path / name).rename(tmp_path / "labeled" / name)
    conversions = [(tmp_path / "labeled", options(split="train")), (tmp_path / "flat", options(split="unlabeled"))]
    for src, settings in conversions if labeled_first else conversions[::-1]:
        convert(src, tmp_path / "out", settings)
    assert inspect_main([str(tmp_path / "out")]) == 0, capsys.readouterr().err
    assert "unlabeled: 3 samples in 1 shard, unlabeled\n" in capsys.readouterr().out
    assert labeled_classes(str(tmp_path / "out"), None, "train", "data.split", "kNN") == ["cat", "dog"]
    with pytest.raises(InfoError, match=r"kNN needs labeled shards, but .*/_info.json gives split 'unlabeled' "
                                         r"\(data.split\) no classes; set data.split to a labeled split \(train\)"):
        labeled_classes(str(tmp_path / "out"), None, "unlabeled", "data.split", "kNN")


def test_tool_wrappers_exit_with_the_status_of_main(tmp_path, monkeypatch):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.png").write_bytes(encoded(gradient(4, 4), "PNG"))
    for tool, args in (("make_shards.py", ["src", "out", "--workers", "0"]), ("inspect_shards.py", ["out"])):
        monkeypatch.chdir(tmp_path)
        monkeypatch.setattr(sys, "argv", [tool, *args])
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_path(str(REPO / "tools" / tool), run_name="__main__")
        assert exit_info.value.code == 0


def test_compressed_shards_are_reproducible_and_stream(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(12):
        (src / f"img{i}.png").write_bytes(encode_png(i))
    for out in ("a", "b"):
        convert(src, tmp_path / out, ConvertOptions(shard_size=5, workers=0, progress=False, compress=True))
    names = sorted(p.name for p in (tmp_path / "a").glob("*.tar.gz"))
    assert names == ["train-000000.tar.gz", "train-000001.tar.gz", "train-000002.tar.gz"]
    assert all((tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes() for n in names)
    assert [s.num_samples for s in resolve_shards(str(tmp_path / "a"))] == [5, 5, 2]
    assert inspect_shards(tmp_path / "a").problems == []


def test_ctrl_c_in_make_shards_is_one_line_saying_what_running_it_again_does(tmp_path, monkeypatch, capsys):
    (tmp_path / "src").mkdir()
    for i in range(4):
        (tmp_path / "src" / f"img{i}.png").write_bytes(encoded(gradient(4, 4), "PNG"))
    argv = [str(tmp_path / "src"), str(tmp_path / "out"), "--shard-size", "2"]
    with monkeypatch.context() as patch:
        patch.setattr(convert_module.ShardWriter, "close_shard", crash_after(shards=1))
        assert make_shards_main(argv) == 130
    assert capsys.readouterr().err.splitlines()[-1] == ("interrupted; run the same command again: it keeps the "
                                                        "finished shards and writes the rest")
    assert make_shards_main(argv) == 0
    before = {path.name: path.read_bytes() for path in (tmp_path / "out").iterdir()}
    with monkeypatch.context() as patch:  # an --overwrite puts the split it replaces back
        patch.setattr(convert_module.ShardWriter, "close_shard", crash_after(shards=1))
        assert make_shards_main(argv + ["--overwrite"]) == 130
    assert capsys.readouterr().err.splitlines()[-1] == (
        "interrupted; run the same command again: it converts the split anew (what OUT held of split train stays until "
        "the new one is complete)")
    assert {path.name: path.read_bytes() for path in (tmp_path / "out").iterdir()} == before


def test_a_full_disk_in_make_shards_is_one_line_saying_to_free_space_and_the_rerun_finishes(tmp_path, monkeypatch,
                                                                                          capsys):
    (tmp_path / "src").mkdir()
    for i in range(5):
        (tmp_path / "src" / f"img{i}.png").write_bytes(encoded(gradient(4 + i, 4), "PNG"))
    argv = [str(tmp_path / "src"), str(tmp_path / "out"), "--shard-size", "2"]
    with monkeypatch.context() as patch:
        patch.setattr(convert_module.ShardWriter, "close_shard",
                      crash_after(shards=1, error=OSError(errno.ENOSPC, "No space left on device")))
        assert make_shards_main(argv) == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        "error: [Errno 28] No space left on device; free some disk space and run the same command again: it keeps "
        "the finished shards and writes the rest")
    assert make_shards_main(argv) == 0
    sources = [json.loads(fields["json"])["source"] for _, fields in read_split(tmp_path / "out")]
    assert sorted(sources) == [f"img{i}.png" for i in range(5)]


def test_a_shard_renamed_but_never_recorded_is_deleted_before_the_rerun_writes_anything(tmp_path, monkeypatch):
    """A full disk between a shard's rename and its journal entry: the rerun rewrites that shard and needs its space."""
    write_imagefolder(tmp_path / "src", ["cat", "dog"], per_class=2)
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        patch.setattr(shard_writer.Journal, "add", Mock(side_effect=OSError(errno.ENOSPC, "No space left on device")))
        with pytest.raises(OSError, match="No space"):
            convert(tmp_path / "src", out, options(shard_size=2))
    assert (out / "train-000000.tar").is_file()
    with monkeypatch.context() as patch:
        patch.setattr(convert_module.ShardWriter, "close_shard", crash_after(0))
        with pytest.raises(KeyboardInterrupt):
            convert(tmp_path / "src", out, options(shard_size=2))
    assert shard_writer.shard_files(out, "train") == []
    assert convert(tmp_path / "src", out, options(shard_size=2)).num_samples == 4
    assert inspect_shards(out).problems == []


def test_a_dangling_link_is_skipped_as_one_naming_its_target(tmp_path):
    write_imagefolder(tmp_path / "src", ["cat"], per_class=1)
    (tmp_path / "src" / "cat" / "moved.png").symlink_to(tmp_path / "gone.png")
    summary = convert(tmp_path / "src", tmp_path / "out", options())
    assert summary.num_samples == 1
    assert summary.skipped == [{"source": "cat/moved.png",
                                "reason": f"unreadable file: broken symbolic link to {tmp_path / 'gone.png'}"}]


@pytest.mark.timeout(30)  # reading the pipe would wait for a writer forever
def test_a_named_pipe_named_like_an_image_is_skipped_not_read(tmp_path):
    write_imagefolder(tmp_path / "src", ["cat"], per_class=1)
    os.mkfifo(tmp_path / "src" / "cat" / "pipe.png")
    summary = convert(tmp_path / "src", tmp_path / "out", options())
    assert summary.num_samples == 1
    assert summary.skipped == [{"source": "cat/pipe.png", "reason": "unreadable file: [Errno 22] not a regular file "
                                                                    "(a named pipe, socket or device)"}]


def test_linked_folders_are_read_once_and_hidden_entries_are_listed_not_read(tmp_path):
    write_imagefolder(tmp_path / "elsewhere", ["bird"], per_class=2)
    write_imagefolder(tmp_path / "src", ["cat"], per_class=1)
    (tmp_path / "src" / "bird").symlink_to(tmp_path / "elsewhere" / "bird")  # a class folder kept elsewhere
    (tmp_path / "src" / "cat" / "again").symlink_to(tmp_path / "src" / "bird")  # a second route: read once
    (tmp_path / "src" / "cat" / "loop").symlink_to(tmp_path / "src" / "cat")  # a cycle
    write_imagefolder(tmp_path / "src" / "cat" / ".ipynb_checkpoints", ["copies"], per_class=1)
    (tmp_path / "src" / "cat" / ".hidden.png").write_bytes(encoded(gradient(4, 4), "PNG"))
    write_imagefolder(tmp_path / "src" / ".git", ["objects"], per_class=1)  # a hidden folder is no class
    summary = convert(tmp_path / "src", tmp_path / "out", options())
    assert summary.classes == ["bird", "cat"]
    assert {source: int(fields["cls"]) for source, fields in by_source(tmp_path / "out").items()} == {
        "bird/0.png": 0, "bird/1.png": 0, "cat/0.png": 1}
    assert summary.skipped == [
        {"source": ".git/", "reason": "hidden folder, not read"},
        {"source": "cat/.hidden.png", "reason": "hidden file"},
        {"source": "cat/.ipynb_checkpoints/", "reason": "hidden folder, not read"},
        {"source": "cat/again/", "reason": "the same folder as bird/, read there"},
        {"source": "cat/loop/", "reason": "the same folder as cat/, read there"},
    ]
    flat = convert(tmp_path / "src" / "bird", tmp_path / "flat", options())  # a linked folder as SRC, unlabeled
    assert flat.num_samples == 2
    (tmp_path / "src" / "a_bird").symlink_to(tmp_path / "src" / "bird")  # a class folder's alias, read first
    with pytest.raises(SourceError, match=r"class folder\(s\) bird/ \(the same folder as a_bird/, read there\) hold "
                                          "no image"):
        convert(tmp_path / "src", tmp_path / "aliased", options())


def test_an_empty_class_folder_is_refused_unless_the_classes_are_given(tmp_path):
    write_imagefolder(tmp_path / "src", ["cat", "dog"], per_class=1)
    (tmp_path / "src" / "cow").mkdir()
    with pytest.raises(SourceError, match=r"class folder\(s\) cow/ hold no image; remove them, or pass --classes"):
        convert(tmp_path / "src", tmp_path / "out", options())
    assert convert(tmp_path / "src", tmp_path / "out", options(classes=("cat", "cow", "dog"))).num_samples == 2


def test_a_rerun_into_a_finished_split_says_so_before_comparing_classes(tmp_path):
    write_imagefolder(tmp_path / "a", ["cat", "dog"], per_class=1)
    write_imagefolder(tmp_path / "b", ["cow", "pig"], per_class=1)
    for split in ("train", "val"):
        convert(tmp_path / "a", tmp_path / "out", options(split=split))
    with pytest.raises(ConversionError, match="already holds shards of split 'train'.*Pass --overwrite"):
        convert(tmp_path / "b", tmp_path / "out", options())


def test_an_overwrite_refused_for_its_classes_leaves_the_split_it_would_replace(tmp_path):
    write_imagefolder(tmp_path / "a", ["cat", "dog"], per_class=1)
    write_imagefolder(tmp_path / "b", ["cow", "pig"], per_class=1)
    for split in ("train", "val"):
        convert(tmp_path / "a", tmp_path / "out", options(split=split))
    before = {path.name: path.read_bytes() for path in (tmp_path / "out").iterdir()}
    with pytest.raises(InfoError, match="already has classes"):
        convert(tmp_path / "b", tmp_path / "out", options(split="val", overwrite=True))
    assert {path.name: path.read_bytes() for path in (tmp_path / "out").iterdir()} == before


def test_an_overwrite_that_fails_or_is_interrupted_puts_the_split_it_replaces_back(tmp_path, monkeypatch):
    write_imagefolder(tmp_path / "a", ["cat", "dog"], per_class=3)
    for split in ("train", "val"):
        convert(tmp_path / "a", tmp_path / "out", options(split=split, shard_size=2))
    before = {path.name: path.read_bytes() for path in (tmp_path / "out").iterdir()}
    (tmp_path / "unreadable").mkdir()
    (tmp_path / "unreadable" / "x.png").write_bytes(b"not an image")
    with pytest.raises(ConversionError, match="no readable image"):
        convert(tmp_path / "unreadable", tmp_path / "out", options(overwrite=True))
    assert {path.name: path.read_bytes() for path in (tmp_path / "out").iterdir()} == before
    write_imagefolder(tmp_path / "b", ["cat", "dog"], per_class=4)
    monkeypatch.setattr(convert_module.ShardWriter, "close_shard", crash_after(1))  # Ctrl-C after one new shard
    with pytest.raises(KeyboardInterrupt):
        convert(tmp_path / "b", tmp_path / "out", options(overwrite=True, shard_size=2))
    assert {path.name: path.read_bytes() for path in (tmp_path / "out").iterdir()} == before


def test_an_overwrite_interrupted_over_an_unfinished_conversion_leaves_it_resumable(tmp_path, monkeypatch):
    write_imagefolder(tmp_path / "a", ["cat", "dog"], per_class=3)
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        patch.setattr(convert_module.ShardWriter, "close_shard", crash_after(1))
        with pytest.raises(KeyboardInterrupt):
            convert(tmp_path / "a", out, options(shard_size=2))
        finished = {path.name: path.read_bytes() for path in out.iterdir() if not path.name.endswith(".tmp")}
        assert "_progress_train.json" in finished
        with pytest.raises(KeyboardInterrupt):
            convert(tmp_path / "a", out, options(shard_size=2, overwrite=True))
    assert {path.name: path.read_bytes() for path in out.iterdir()} == finished
    summary = convert(tmp_path / "a", out, options(shard_size=2))  # without --overwrite: it resumes
    assert (summary.num_samples, summary.resumed_shards) == (6, 1)


@contextmanager
def killed_midway(out: Path, split: str):
    """`replacing_split` as SIGKILL leaves it: the old split set aside, and no handler left to put it back."""
    shard_writer._set_split_aside(out, split)  # noqa: SLF001
    yield


@pytest.mark.parametrize("rerun_overwrites", [True, False])  # run again as it was, or resumed without --overwrite
def test_an_overwrite_killed_outright_keeps_the_old_split_aside_until_a_rerun_replaces_it(tmp_path, monkeypatch,
                                                                                          rerun_overwrites, capsys):
    write_imagefolder(tmp_path / "a", ["cat", "dog"], per_class=3)
    write_imagefolder(tmp_path / "b", ["cat", "dog"], per_class=4)
    for split in ("train", "val"):
        convert(tmp_path / "a", tmp_path / "out", options(split=split, shard_size=2))
    old_train = sorted((tmp_path / "out").glob("train-*.tar"))
    with monkeypatch.context() as patch:
        patch.setattr(convert_module, "replacing_split", killed_midway)
        patch.setattr(convert_module.ShardWriter, "close_shard", crash_after(1))
        with pytest.raises(KeyboardInterrupt):
            convert(tmp_path / "b", tmp_path / "out", options(overwrite=True, shard_size=2))
    kept = tmp_path / "out" / ".replaced-train"
    assert sorted(path.name for path in kept.glob("train-*.tar")) == [path.name for path in old_train]
    # training is told to finish the conversion, not to train on the split that is there (val)
    with pytest.raises(ShardError, match=r"^the conversion of split 'train' into \S+ was interrupted "
                                         r"\(_progress_train.json records it\); re-run tools/make_shards.py with the "
                                         r"same arguments to finish it$"):
        resolve_shards(str(tmp_path / "out"))
    journal = (tmp_path / "out" / "_progress_train.json").read_bytes()
    (tmp_path / "out" / "_progress_train.json").unlink()  # as if killed before its first shard
    with pytest.raises(ShardError, match=rf"^an interrupted tools/make_shards.py --overwrite of split 'train' left it "
                                         rf"aside in {re.escape(str(kept))}; re-run that command to finish it$"):
        resolve_shards(str(tmp_path / "out"))
    assert inspect_main([str(tmp_path / "out")]) == 1
    assert (f"{kept}: a split set aside by an interrupted make_shards --overwrite; re-run that command to finish it"
            in capsys.readouterr().err)
    (tmp_path / "out" / "_progress_train.json").write_bytes(journal)
    rerun = options(overwrite=rerun_overwrites, shard_size=2)
    assert convert(tmp_path / "b", tmp_path / "out", rerun).num_samples == 8
    assert not kept.exists() and load_info(tmp_path / "out")["splits"]["train"]["num_samples"] == 8
    assert inspect_main([str(tmp_path / "out")]) == 0


@pytest.mark.parametrize("stage", [".tmp", ".back"])
def test_a_split_half_set_aside_or_half_put_back_by_a_killed_overwrite_is_whole_again(tmp_path, stage):
    write_imagefolder(tmp_path / "a", ["cat", "dog"], per_class=3)
    for split in ("train", "val"):
        convert(tmp_path / "a", tmp_path / "out", options(split=split, shard_size=2))
    out = tmp_path / "out"
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    if stage == ".back":  # killed while putting back: one shard is back, the rest and the _info.json entry aside
        shard_writer._set_split_aside(out, "train")  # noqa: SLF001
        (out / ".replaced-train").rename(out / ".replaced-train.back")
        (out / ".replaced-train.back" / "train-000000.tar").rename(out / "train-000000.tar")
    else:  # killed while setting aside: one shard is aside, the rest and the _info.json entry still in OUT
        (out / ".replaced-train.tmp").mkdir()
        (out / "train-000001.tar").rename(out / ".replaced-train.tmp" / "train-000001.tar")
    (tmp_path / "unreadable").mkdir()
    (tmp_path / "unreadable" / "x.png").write_bytes(b"not an image")
    with pytest.raises(ConversionError, match="no readable image"):  # finishes the stage first, then fails
        convert(tmp_path / "unreadable", out, options(overwrite=True))
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before


def test_a_cifar_batch_whose_labels_are_numpy_scalars_converts(tmp_path):
    """A batch built by hand with `list(labels_array)` pickles each label as a numpy scalar."""
    images = np.random.default_rng(2).integers(0, 256, (3, 3072), dtype=np.uint8)
    batch = {"data": images, "labels": list(np.array([1, 0, 1]))}
    for name, content in (("batches.meta", {"label_names": ["cat", "dog"]}), ("data_batch_1", batch)):
        (tmp_path / name).write_bytes(pickle.dumps(content))
    convert(tmp_path, tmp_path / "out", options())
    assert sorted(int(fields["cls"]) for fields in by_source(tmp_path / "out").values()) == [0, 1, 1]


@pytest.mark.parametrize(("change", "message"), [
    (lambda batch: {**batch, "labels": batch["labels"] + [0, 1]}, "data_batch_1 has 4 images but 6 labels"),
    (lambda batch: {**batch, "labels": batch["labels"][:3]}, "data_batch_1 has 4 images but 3 labels"),
    (lambda batch: {**batch, "labels": [0, 1, 2, 1]}, "data_batch_1: label 2 names none of the 2 classes"),
    (lambda batch: {**batch, "data": batch["data"][:, :1000]}, r"data_batch_1: 'data' has shape \[4, 1000\], not"),
    (lambda batch: {**batch, "data": batch["data"] / 255}, "data_batch_1: 'data' holds float64 values, not the uint8"),
    (lambda batch: {**batch, "data": batch["data"].astype(np.int64) + 200},
     "data_batch_1: 'data' holds int64 values, not the uint8"),
], ids=["more-labels", "fewer-labels", "label-out-of-range", "not-32x32-rgb", "float-pixels", "int64-pixels"])
def test_a_cifar_batch_that_does_not_add_up_is_refused_naming_the_file(tmp_path, change, message):
    batch = {"data": np.zeros((4, 3072), np.uint8), "labels": [0, 1, 1, 0]}
    for name, content in (("batches.meta", {"label_names": ["cat", "dog"]}), ("test_batch", batch),
                          ("data_batch_1", change(batch)), ("data_batch_2", batch)):
        (tmp_path / name).write_bytes(pickle.dumps(content))
    with pytest.raises(SourceError, match=message):
        convert(tmp_path, tmp_path / "out", options())


class RunsCode:
    """Pickles into a call of os.system, as a malicious file would."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("payload, why", [
    (lambda marker: pickle.dumps({"data": RunsCode(marker), "labels": [0]}),
     r"it asks for (posix|os)\.system, which no CIFAR batch holds"),
    (lambda marker: b"\x80\x04not a pickle", "invalid load key"),
], ids=["code", "garbage"])
def test_a_cifar_batch_that_would_run_code_or_is_not_a_pickle_is_refused(tmp_path, payload, why):
    (tmp_path / "batches.meta").write_bytes(pickle.dumps({"label_names": ["cat", "dog"]}))
    (tmp_path / "test_batch").write_bytes(pickle.dumps({"data": np.zeros((1, 3072), np.uint8), "labels": [0]}))
    (tmp_path / "data_batch_1").write_bytes(payload(tmp_path / "ran"))
    with pytest.raises(SourceError, match=rf"data_batch_1 is not a readable CIFAR python batch \({why}"):
        convert(tmp_path, tmp_path / "out", options())
    assert not (tmp_path / "ran").exists()


def test_sources_given_the_wrong_way_are_refused_with_what_to_pass(tmp_path, capsys):
    images = np.zeros((2, 5, 4), np.uint8)
    (tmp_path / "idx").mkdir()
    write_idx(tmp_path / "idx" / "train-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "idx" / "train-labels-idx1-ubyte.gz", np.arange(2))
    cases = [
        (tmp_path / "idx" / "train-images-idx3-ubyte.gz", "auto", "is a file but not a text list of image paths; "
                                                                  "pass the dataset's directory"),
        (tmp_path / "idx", "list", "is a directory; --format list reads a list file"),
    ]
    for src, fmt, message in cases:
        with pytest.raises(SourceError, match=message):
            convert(src, tmp_path / "out", options(fmt=fmt))
    labels = tmp_path / "idx" / "train-labels-idx1-ubyte.gz"
    labels.write_bytes(labels.read_bytes()[:-4])  # a cut download
    with pytest.raises(SourceError, match="train-labels-idx1-ubyte.gz: Compressed file ended .* download it again"):
        convert(tmp_path / "idx", tmp_path / "out", options())
    (tmp_path / "gz").mkdir()
    write_idx(tmp_path / "gz" / "train-labels-idx1-ubyte.gz", np.arange(2))
    write_idx(tmp_path / "gz" / "train-images-idx3-ubyte.gz", images)
    (tmp_path / "gz" / "train-images-idx3-ubyte.gz").rename(tmp_path / "gz" / "train-images-idx3-ubyte")
    with pytest.raises(SourceError, match="train-images-idx3-ubyte is gzip-compressed: name it "
                                          "train-images-idx3-ubyte.gz"):
        convert(tmp_path / "gz", tmp_path / "out", options())
    (tmp_path / "parent").mkdir()
    (tmp_path / "idx").rename(tmp_path / "parent" / "fashion")  # one level too high
    assert make_shards_main([str(tmp_path / "parent"), str(tmp_path / "out"), "--workers", "0"]) == 1
    assert capsys.readouterr().err.startswith(f"note: {tmp_path / 'parent' / 'fashion'} holds IDX files, which are "
                                              "read from their own folder: pass it as SRC\n")


def test_a_second_conversion_into_the_same_output_waits_for_the_first(tmp_path, capsys):
    write_imagefolder(tmp_path / "src", ["cat", "dog"], per_class=1)
    convert(tmp_path / "src", tmp_path / "out", options())
    held = os.open(tmp_path / "out", os.O_RDONLY)  # as a conversion running in another process holds it
    fcntl.flock(held, fcntl.LOCK_EX)
    second = threading.Thread(target=convert, args=(tmp_path / "src", tmp_path / "out", options(split="val")))
    second.start()
    second.join(timeout=2)
    assert second.is_alive() and "val" not in load_info(tmp_path / "out")["splits"]
    os.close(held)
    second.join(timeout=30)
    assert sorted(load_info(tmp_path / "out")["splits"]) == ["train", "val"]
    assert capsys.readouterr().err == f"note: another conversion is writing to {tmp_path / 'out'}; waiting for it " \
                                      "to finish\n"


def test_an_interrupt_stops_every_encoding_worker_and_workers_leave_ctrl_c_to_the_main_process(tmp_path, monkeypatch):
    started = []

    def interrupted_while_starting_workers(*args, **kwargs):
        worker = multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,))
        worker.start()  # as a pool worker that the interrupt caught before the pool knew of it
        started.append(worker)
        raise KeyboardInterrupt

    monkeypatch.setattr(convert_module, "convert", interrupted_while_starting_workers)
    assert make_shards_main([str(tmp_path), str(tmp_path / "out")]) == 130
    assert not started[0].is_alive()
    with ProcessPoolExecutor(1, initializer=convert_module._init_pool_worker, initargs=(os.getpid(), None, None, 1)
                             ) as pool:
        assert pool.submit(signal.getsignal, signal.SIGINT).result() == signal.SIG_IGN


def scandir_refusing(monkeypatch, refused: Path) -> None:
    """os.scandir as for a user without permission to list `refused` (the tests may run as root, who has it)."""
    real = os.scandir

    def scandir(path="."):
        if Path(path) == refused:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)


@pytest.mark.parametrize("fmt", ["folder", "imagefolder"])
def test_a_folder_that_cannot_be_listed_stops_the_conversion_naming_it(tmp_path, monkeypatch, capsys, fmt):
    for name in ("a/1.png", "b/2.png", "b/sub/3.png"):
        (tmp_path / "src" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "src" / name).write_bytes(encoded(gradient(4, 4), "PNG"))
    scandir_refusing(monkeypatch, tmp_path / "src" / "b" / "sub")  # os.walk would leave its images out silently
    assert make_shards_main([str(tmp_path / "src"), str(tmp_path / "out"), "--format", fmt, "--workers", "0"]) == 1
    assert capsys.readouterr().err == (f"error: {tmp_path / 'src' / 'b' / 'sub'} cannot be read (Permission denied); "
                                       "fix its permissions, or move it out of the dataset, and run the same command "
                                       "again\n")
    assert not (tmp_path / "out").exists()


def test_a_permission_error_while_looking_at_the_source_is_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "src").mkdir()

    def refused(src, fmt):
        raise PermissionError(errno.EACCES, "Permission denied", str(Path(src) / "sub" / "train-images-idx3-ubyte"))

    monkeypatch.setattr(convert_module, "layout_note", refused)
    assert make_shards_main([str(tmp_path / "src"), str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err == (f"error: {tmp_path / 'src' / 'sub' / 'train-images-idx3-ubyte'}: Permission "
                                       "denied; fix its permissions, then run the same command again\n")


def test_an_output_inside_the_source_folder_is_refused(tmp_path):
    (tmp_path / "src" / "cat").mkdir(parents=True)
    (tmp_path / "src" / "cat" / "1.png").write_bytes(encoded(gradient(4, 4), "PNG"))
    for out in (tmp_path / "src" / "shards", tmp_path / "src"):
        with pytest.raises(ConversionError, match=r"OUT .* is inside SRC .*, where the next run .* would read the "
                                                  "shards as part of the dataset; give an OUT outside it"):
            convert(tmp_path / "src", out, options())
    assert not (tmp_path / "src" / "shards").exists()
    (tmp_path / "list.txt").write_text("src/cat/1.png\n")  # a list is not walked: its folder may hold OUT
    assert convert(tmp_path / "list.txt", tmp_path / "shards", options()).num_samples == 1


def test_an_interrupted_list_conversion_resumed_with_edited_labels_is_refused(tmp_path, monkeypatch):
    (tmp_path / "imgs").mkdir()
    rows = []
    for i in range(6):
        (tmp_path / "imgs" / f"{i}.png").write_bytes(encoded(gradient(4 + i, 4), "PNG"))
        rows.append(f"imgs/{i}.png,{'cat' if i % 2 else 'dog'}")
    (tmp_path / "list.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    with monkeypatch.context() as patch:
        patch.setattr(convert_module.ShardWriter, "close_shard", crash_after(shards=1))
        with pytest.raises(KeyboardInterrupt):
            convert(tmp_path / "list.csv", tmp_path / "out", options(shard_size=2))
    swapped = "\n".join(row.replace("cat", "x").replace("dog", "cat").replace("x", "dog") for row in rows)
    (tmp_path / "list.csv").write_text("path,label\n" + swapped + "\n")  # same paths, same classes, other labels
    with pytest.raises(ConversionError, match=r"unfinished conversion with other settings \(samples_sha256: "):
        convert(tmp_path / "list.csv", tmp_path / "out", options(shard_size=2))


def test_inspect_accepts_the_images_that_make_shards_accepted_under_a_raised_pixel_limit(tmp_path, capsys):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "big.png").write_bytes(encoded(gradient(100, 100), "PNG"))  # 10,000 pixels
    before = Image.MAX_IMAGE_PIXELS
    convert(tmp_path / "src", tmp_path / "out", options(max_image_pixels=10_000))
    assert inspect_main([str(tmp_path / "out"), "--max-image-pixels", "5000"]) == 1
    # The sample is named by its shard and key, and by the file it was made from
    assert re.search(r"/train-000000\.tar:\S+ \(made from big\.png\): .*over the limit of 5000",
                     capsys.readouterr().err)
    assert inspect_main([str(tmp_path / "out"), "--max-image-pixels", "10000"]) == 0
    assert Image.MAX_IMAGE_PIXELS == before


@pytest.mark.parametrize(("labels", "message"), [
    ([1, 2, 3], "no sample has label 0, so classes 0..3 would include some"),  # numbered from 1
    ([0, 9], "no sample has label 1, 2, 3, 4, 5 and 3 more, so classes 0..9"),
])
def test_integer_labels_that_leave_a_class_without_samples_are_refused_unless_named(tmp_path, labels, message):
    (tmp_path / "imgs").mkdir()
    rows = []
    for i, label in enumerate(labels):
        (tmp_path / "imgs" / f"{i}.png").write_bytes(encoded(gradient(4, 4), "PNG"))
        rows.append(f"imgs/{i}.png,{label}")
    (tmp_path / "list.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    with pytest.raises(SourceError, match=rf"list.csv: {message} .*pass --classes with a name for every id from 0"):
        convert(tmp_path / "list.csv", tmp_path / "out", options())
    names = tuple(f"class{i}" for i in range(max(labels) + 1))
    assert convert(tmp_path / "list.csv", tmp_path / "out", options(classes=names)).classes == list(names)


def test_a_list_saved_in_another_encoding_than_utf8_is_named_with_its_line(tmp_path):
    (tmp_path / "list.csv").write_bytes("path,label\nimgs/a.png,cat\nimgs/café.png,dog\n".encode("cp1252"))
    with pytest.raises(SourceError, match=r"list.csv:3: byte 0xe9 is not UTF-8; save the list as UTF-8"):
        convert(tmp_path / "list.csv", tmp_path / "out", options())
    (tmp_path / "list.txt").write_bytes("imgs/a.png\r\n".encode("utf-16"))  # PowerShell 5's `>`: NUL bytes, a mark
    with pytest.raises(SourceError, match=r"list.txt is UTF-16 text .*; save the list as UTF-8"):
        convert(tmp_path / "list.txt", tmp_path / "out", options())


@pytest.mark.parametrize(("content", "error"), [
    ("café\ndog\n".encode("cp1252"), r"classes.txt:1: byte 0xe9 is not UTF-8; save the class names as UTF-8"),
    ("cat\ndog\n".encode("utf-16"), r"classes.txt is UTF-16 text .*; save the class names as UTF-8"),
], ids=["cp1252", "utf-16"])
def test_a_classes_file_in_another_encoding_than_utf8_is_one_line_saying_how_to_save_it(tmp_path, capsys, content,
                                                                                          error):
    write_imagefolder(tmp_path / "src", ["cat", "dog"], per_class=1)
    (tmp_path / "classes.txt").write_bytes(content)
    args = [str(tmp_path / "src"), str(tmp_path / "out"), "--workers", "0", "--classes", str(tmp_path / "classes.txt")]
    assert make_shards_main(args) == 1
    err = capsys.readouterr().err
    assert re.fullmatch(f"error: .*{error}.*\n", err) and not (tmp_path / "out").exists()


def test_a_semicolon_separated_list_reads_its_labels(tmp_path):
    """Spreadsheets where the comma is the decimal separator save CSV with semicolons."""
    (tmp_path / "imgs").mkdir()
    for name in ("a.png", "b,2.png"):
        (tmp_path / "imgs" / name).write_bytes(encoded(gradient(4, 4), "PNG"))
    (tmp_path / "list.csv").write_text("path;label\nimgs/a.png;cat\nimgs/b,2.png;dog\n")
    convert(tmp_path / "list.csv", tmp_path / "out", options())
    assert {s: int(f["cls"]) for s, f in by_source(tmp_path / "out").items()} == {"imgs/a.png": 0, "imgs/b,2.png": 1}


def test_a_list_whose_labels_are_under_another_column_name_or_with_columns_not_read_is_pointed_out_before_converting(
        tmp_path, capsys):
    (tmp_path / "a.png").write_bytes(encoded(gradient(4, 4), "PNG"))
    (tmp_path / "list.csv").write_text("path,class,width\na.png,cat,4\n")
    assert make_shards_main([str(tmp_path / "list.csv"), str(tmp_path / "out"), "--workers", "0"]) == 0
    captured = capsys.readouterr()
    assert captured.err.startswith(f"note: {tmp_path / 'list.csv'} has no `label` column, so its images are "
                                   "converted unlabeled and its column(s) class, width are not read; to keep labels, "
                                   "name their column `label`\n")
    assert "(list, unlabeled)" in captured.out
    (tmp_path / "labeled.csv").write_text("path,label,split\na.png,cat,val\n")  # a split column selects nothing
    assert make_shards_main([str(tmp_path / "labeled.csv"), str(tmp_path / "labeled"), "--workers", "0"]) == 0
    assert capsys.readouterr().err.startswith(f"note: {tmp_path / 'labeled.csv'}: its column(s) split are not read "
                                              "(only `path` and `label` are); every row is converted\n")
    (tmp_path / "plain.csv").write_text("path,Label\na.png,cat\n")
    assert make_shards_main([str(tmp_path / "plain.csv"), str(tmp_path / "plain"), "--workers", "0"]) == 0
    assert "note:" not in capsys.readouterr().err


def test_integer_labels_that_the_classes_name_are_class_names(tmp_path):
    """A 3-versus-7 subset, or classes named by year, from a list: folders `3/` and `7/` convert too."""
    (tmp_path / "imgs").mkdir()
    for name in ("a.png", "b.png"):
        (tmp_path / "imgs" / name).write_bytes(encoded(gradient(4, 4), "PNG"))
    (tmp_path / "list.csv").write_text("path,label\nimgs/a.png,7\nimgs/b.png,3\n")
    with pytest.raises(SourceError, match=r"no sample has label 0, 1, 2, 4, 5 and 1 more, .*; if the labels are class "
                                          r"names rather than ids, name every one with --classes 3,7$"):
        convert(tmp_path / "list.csv", tmp_path / "ids", options())
    convert(tmp_path / "list.csv", tmp_path / "named", options(classes=("3", "7")))
    assert load_info(tmp_path / "named")["classes"] == ["3", "7"]
    assert {s: int(f["cls"]) for s, f in by_source(tmp_path / "named").items()} == {"imgs/a.png": 1, "imgs/b.png": 0}


def test_a_colour_profile_of_another_colour_space_is_not_stored_with_rgb_pixels(tmp_path):
    (tmp_path / "src").mkdir()
    cmyk, rgb = Image.new("CMYK", (6, 6), (0, 128, 255, 64)), gradient(6, 6)
    (tmp_path / "src" / "cmyk.tif").write_bytes(encoded(cmyk, "TIFF", icc_profile=b"a CMYK profile"))
    (tmp_path / "src" / "rgb.tif").write_bytes(encoded(rgb, "TIFF", icc_profile=b"an RGB profile"))
    convert(tmp_path / "src", tmp_path / "out", options())
    stored = {source: Image.open(io.BytesIO(image_of(fields)))
              for source, fields in by_source(tmp_path / "out").items()}
    assert "icc_profile" not in stored["cmyk.tif"].info  # decoders warn about a CMYK profile on RGB pixels
    assert stored["rgb.tif"].info["icc_profile"] == b"an RGB profile"


def test_the_progress_bar_counts_skipped_inputs_so_it_ends_full(tmp_path, capsys):
    write_mixed_folder(tmp_path / "src")  # 7 images, 2 unreadable ones (and a .txt file, not read)
    convert(tmp_path / "src", tmp_path / "out", options(progress=True))
    assert "9/9" in capsys.readouterr().err.replace("\r", "\n").splitlines()[-1]


def test_a_source_with_no_input_shows_no_empty_progress_bar_before_its_error(tmp_path, capsys):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "notes.txt").write_text("not an image")
    with pytest.raises(ConversionError, match=r"no readable image in \S+ \(1 input skipped\)"):
        convert(tmp_path / "src", tmp_path / "out", options(progress=True))
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("layout", ["imagefolder", "list"])
def test_a_class_whose_every_input_is_skipped_is_named_in_a_warning(tmp_path, capsys, layout):
    """An empty class folder is refused up front; a class emptied by unreadable files shows only after decoding."""
    write_imagefolder(tmp_path / "src", ["cat", "dog", "fish"], per_class=2)
    for name in os.listdir(tmp_path / "src" / "fish"):
        (tmp_path / "src" / "fish" / name).write_bytes(b"")  # zero bytes: unreadable
    (tmp_path / "src" / "dog" / sorted(os.listdir(tmp_path / "src" / "dog"))[0]).write_bytes(b"")  # one of two
    source = tmp_path / "src"
    if layout == "list":
        rows = [f"{path.relative_to(source)},{path.parent.name}" for path in source.rglob("*.*")]
        source = source / "files.csv"  # relative paths are read from the list's folder
        source.write_text("path,label\n" + "\n".join(rows) + "\n")
    assert make_shards_main([str(source), str(tmp_path / "out"), "--workers", "0"]) == 0
    err = capsys.readouterr().err
    assert ("warning: every input of class fish was skipped, so a classifier trained on these shards has a class it "
            "never sees") in err
    assert load_info(tmp_path / "out")["classes"] == ["cat", "dog", "fish"]
    assert make_shards_main([str(source), str(tmp_path / "out"), "--split", "val", "--workers", "0",
                             "--limit", "1"]) == 0
    assert "warning" not in capsys.readouterr().err  # --limit stops early: the classes it left out are not lost
