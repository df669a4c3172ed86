"""Start-up check of a shard directory: shards of the recorded size are trusted, versus reading every tar header.

    python tools/bench/startup.py [--samples 20000] [--shard-size 1000] [--repeats 3]

Times `resolve_shards` (what training runs on every rank before its first step) on the same shards twice: with the
file sizes that make_shards records in `_info.json`, and with them left out, as in a directory made before sizes
were recorded, where every tar header is read. Samples carry make_shards' three members (image, class, metadata)
with small payloads: the header scan's cost is per member, not per byte, once the files are in the page cache.
Prints the ratio last; the trusted check's time does not grow with the samples, so the ratio grows with them.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import bench_parser, interleaved_times, medians, paired_ratio, print_table  # noqa: E402

from mae_tnt.data.info import update_split  # noqa: E402
from mae_tnt.data.shard_writer import ShardWriter  # noqa: E402
from mae_tnt.data.shards import resolve_shards  # noqa: E402
from mae_tnt.text import positive_int  # noqa: E402

PAYLOAD = os.urandom(2048)  # stands in for an encoded image; never decoded here


def write_split(root: Path, samples: int, shard_size: int) -> tuple[list[str], list[int], list[int]]:
    """Shards of `samples` samples in `root`: their file names, sample counts and sizes."""
    writer = ShardWriter(root, "train", first_shard=0)
    closed = []
    for index in range(samples):
        key = f"train_{index:08d}"
        writer.add({f"{key}.jpg": PAYLOAD, f"{key}.cls": b"0", f"{key}.json": b'{"source": "bench"}'})
        if writer.count == shard_size:
            closed.append(writer.close_shard())
    if writer.count:
        closed.append(writer.close_shard())
    names, counts, sizes = (list(column) for column in zip(*closed, strict=True))
    return names, counts, sizes


def main() -> None:
    parser = bench_parser(__doc__, repeats=3)
    parser.add_argument("--samples", type=positive_int, default=20000, help="samples in the split")
    parser.add_argument("--shard-size", type=positive_int, default=1000, help="samples per shard")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        recorded, unrecorded = Path(tmp) / "recorded", Path(tmp) / "unrecorded"
        recorded.mkdir()
        unrecorded.mkdir()
        names, counts, sizes = write_split(recorded, args.samples, args.shard_size)
        for name in names:  # the same files under both _info.json variants
            os.link(recorded / name, unrecorded / name)
        update_split(recorded, "train", names, counts, shard_bytes=sizes)
        update_split(unrecorded, "train", names, counts)
        times = interleaved_times({"sizes recorded (trusted)": lambda: resolve_shards(str(recorded)),
                                   "no sizes (every header read)": lambda: resolve_shards(str(unrecorded))},
                                  args.repeats)
    print_table([(name, f"{seconds * 1000:9.1f} ms") for name, seconds in medians(times).items()],
                f"resolve_shards on {args.samples} samples in {len(names)} shards, median of {args.repeats}")
    print(f"speedup of the start-up check: "
          f"{paired_ratio(times, 'no sizes (every header read)', 'sizes recorded (trusted)')}")


if __name__ == "__main__":
    main()
