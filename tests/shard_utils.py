"""Synthetic shards for tests: tiny PNGs whose first pixel encodes the sample id, so tests can tell samples apart."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from mae_tnt.data.info import update_split


def encode_png(sample_id: int, size: int = 16) -> bytes:
    """A PNG whose pixel (0, 0) stores the id in its R and G channels."""
    array = np.full((size, size, 3), 128, dtype=np.uint8)
    array[0, 0] = (sample_id // 256, sample_id % 256, 7)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def write_shards(root: Path, sizes: list[int], split: str = "train", corrupt: frozenset[int] = frozenset(),
                 size: int = 16, num_classes: int = 10) -> list[int]:
    """Write shards with `sizes` samples each (ids 0..N-1, label id % num_classes, made "from" img/ID.png as
    make_shards records it); ids in `corrupt` get garbage bytes."""
    root.mkdir(parents=True, exist_ok=True)
    names, sample_id = [], 0
    for shard_index, count in enumerate(sizes):
        name = f"{split}-{shard_index:06d}.tar"
        with tarfile.open(root / name, "w") as tar:
            for _ in range(count):
                payload = b"not an image" if sample_id in corrupt else encode_png(sample_id, size)
                fields = {"png": payload, "cls": str(sample_id % num_classes).encode(),
                          "json": json.dumps({"id": sample_id, "source": f"img/{sample_id}.png"}).encode()}
                for field, data in fields.items():
                    info = tarfile.TarInfo(f"s{sample_id:06d}.{field}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                sample_id += 1
        names.append(name)
    update_split(root, split, names, sizes, classes=[str(i) for i in range(num_classes)])
    return list(range(sample_id))


def drop_classes(root: Path) -> None:
    """Make a shard directory's `_info.json` declare unlabeled data (an empty class list)."""
    info = json.loads((root / "_info.json").read_text())
    (root / "_info.json").write_text(json.dumps({**info, "classes": []}))


def write_shards_damaged_at_their_size(root: Path, split: str = "train") -> Path:
    """Two shards of 8 samples with their sizes recorded, the first damaged without a change of size (bit rot): a
    byte of sample 3's member header checksum flipped, so the tar breaks there. Returns the damaged shard."""
    write_shards(root, [8, 8], split=split)
    names = [f"{split}-000000.tar", f"{split}-000001.tar"]
    update_split(root, split, names, [8, 8], shard_bytes=[(root / name).stat().st_size for name in names])
    victim = root / names[0]
    data = bytearray(victim.read_bytes())
    data[data.find(b"s000003.png") + 148] ^= 0x11
    victim.write_bytes(bytes(data))
    return victim
