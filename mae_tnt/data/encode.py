"""One source sample -> the bytes a shard stores: every image is fully decoded to validate it, then kept or re-encoded.

JPEG and PNG bytes are copied untouched unless ``max_size`` asks for a resize; resized images and other formats (BMP,
TIFF, WebP, GIF, ...) are converted to RGB and re-encoded: JPEG sources as JPEG quality 95, everything else as PNG
(lossless, so no second round of compression artefacts). In-memory arrays (IDX, CIFAR) are encoded as PNG. Unreadable
files and undecodable bytes become skip records, so the converter can report them.
"""

import io
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

from mae_tnt.data.images import BadImageError, decode, to_rgb
from mae_tnt.data.readers import Record, Source

PASS_THROUGH_EXTENSIONS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png"}  # MPO: camera JPEG with extra frames
JPEG_QUALITY = 95


@dataclass
class EncodedImage:
    """A validated image ready for a shard: the bytes to store and what the ``.json`` member reports."""

    source: str
    data: bytes
    extension: str
    label: int | None
    width: int
    height: int


def prepare_sample(source: Source, index: int, max_size: int | None) -> EncodedImage | dict:
    """Load, validate and (if needed) re-encode sample ``index`` of ``source``.

    Returns:
        The encoded image, or a ``{"source", "reason"}`` skip record for unreadable or undecodable input.
    """
    try:
        record = source.record(index)
    except OSError as err:
        return {"source": source.source_id(index), "reason": f"unreadable file: {_os_reason(err)}"}
    if isinstance(record.payload, np.ndarray):
        return _encode_array(record, max_size)
    try:
        return _encode_file(record, max_size)
    except BadImageError as err:
        return {"source": record.source, "reason": f"not a readable image: {err}"}


def _os_reason(err: OSError) -> str:
    """Why a file could not be opened; a dangling link is named as one, since `ls` shows the link itself."""
    path = err.filename
    if isinstance(path, str) and os.path.islink(path) and not os.path.exists(path):
        return f"broken symbolic link to {os.readlink(path)}"
    return str(err)


def _encode_file(record: Record, max_size: int | None) -> EncodedImage:
    """Validate encoded bytes; keep them as they are when possible, else re-encode."""
    img = decode(record.payload)
    width, height = img.size
    extension = PASS_THROUGH_EXTENSIONS.get(img.format)
    if extension is not None and not _needs_resize(img.size, max_size):
        data = record.payload
    else:
        extension = "jpg" if extension == "jpg" else "png"
        data = _encode(_resized(to_rgb(img), max_size), extension)
    return EncodedImage(record.source, data, extension, record.label, width, height)


def _encode_array(record: Record, max_size: int | None) -> EncodedImage:
    """Encode uint8 pixels ([H, W] greyscale or [H, W, 3] RGB) losslessly as PNG."""
    img = Image.fromarray(record.payload)
    width, height = img.size
    return EncodedImage(record.source, _encode(_resized(img, max_size), "png"), "png", record.label, width, height)


def _needs_resize(size: tuple[int, int], max_size: int | None) -> bool:
    return max_size is not None and max(size) > max_size


def _resized(img: Image.Image, max_size: int | None) -> Image.Image:
    """Shrink so the longer side is ``max_size`` (Lanczos, aspect ratio kept); smaller images are unchanged."""
    if not _needs_resize(img.size, max_size):
        return img
    scale = max_size / max(img.size)
    size = tuple(max(1, round(side * scale)) for side in img.size)
    return img.resize(size, Image.Resampling.LANCZOS)


def _encode(img: Image.Image, extension: str) -> bytes:
    buffer = io.BytesIO()
    if extension == "jpg":
        img.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    else:
        img.save(buffer, format="PNG")
    return buffer.getvalue()
