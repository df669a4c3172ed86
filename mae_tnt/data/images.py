"""Decode encoded image bytes into fully loaded PIL images and convert any PIL mode to 8-bit RGB.

Both the shard converter (to validate every image) and the training loader (to decode samples) use these
functions, so a file the converter accepted always decodes the same way at training time.

Decoding is strict on purpose: ``ImageFile.LOAD_TRUNCATED_IMAGES`` stays False and every image is fully
loaded, so a truncated JPEG or PNG raises instead of coming back with a grey bottom half. PIL's
decompression-bomb guard stays on; an image over the limit is a bad image, not a crash.

EXIF orientation is not applied anywhere (converter or loader): images are used in their stored orientation,
consistently, as torchvision's ``decode_jpeg`` does by default.

References:
    Pillow image modes: https://pillow.readthedocs.io/en/stable/handbook/concepts.html#modes
"""

import io
import re
import struct
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

# Modes holding greyscale values wider than 8 bits: 16-bit PNG/TIFF ("I;16*"; older Pillow and 32-bit integer TIFF
# give "I") and 32-bit float TIFF ("F").
WIDE_GREY_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})
# Modes with an alpha channel; "transparency" in img.info (palette or colour-key tRNS) is handled too.
ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "PA"})
WHITE = (255, 255, 255, 255)

# What PIL raises on corrupt data: OSError (truncated, UnidentifiedImageError), SyntaxError (broken PNG
# chunks), ValueError/struct.error/zlib.error/EOFError from decoders; the bomb guard raises its own error.
DECODE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    struct.error,
    zlib.error,
    Image.DecompressionBombError,
    Image.DecompressionBombWarning,
)


IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif", "ppm", "pgm", "img")
"""Shard member extensions that hold an encoded image, in order of preference when a sample has several."""


def image_bytes(sample: dict) -> bytes:
    """The encoded image of a raw shard sample ({field: bytes}).

    Raises:
        BadImageError: the sample has no image member; it is skipped like an undecodable image.
    """
    data = next((sample[field] for field in IMAGE_FIELDS if field in sample), None)
    if data is None:
        raise BadImageError("it has no image member")
    return data


PIL_PIXELS = re.compile(r"\((\d+) pixels\)")


class BadImageError(ValueError):
    """Bytes that are not a readable image: unknown format, truncated, corrupt or over the pixel limit."""


@contextmanager
def pixel_limit(max_pixels: int) -> Iterator[None]:
    """`set_max_image_pixels` for the block only: in-process callers (tests, notebooks) keep their own limit."""
    previous = Image.MAX_IMAGE_PIXELS
    set_max_image_pixels(max_pixels)
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def set_max_image_pixels(max_pixels: int) -> None:
    """Set PIL's decompression-bomb limit for this process.

    Args:
        max_pixels: Largest accepted width * height. Images above it raise ``BadImageError`` in ``decode``.
            The guard cannot be switched off here (``None``), because one hostile file would then exhaust memory.
    """
    if not isinstance(max_pixels, int) or max_pixels <= 0:
        raise ValueError(f"max_pixels must be a positive int, got {max_pixels!r}; the bomb guard stays on")
    Image.MAX_IMAGE_PIXELS = max_pixels


def decode(data: bytes) -> Image.Image:
    """Decode image bytes into a fully loaded PIL image in its stored mode.

    Args:
        data: Encoded image (any format PIL reads).

    Returns:
        The loaded image; ``img.format`` names the encoded format ("JPEG", "PNG", ...).

    Raises:
        BadImageError: The bytes are not a complete, readable image within the pixel limit.
    """
    return load_image(open_image(data))


# JPEG frame markers libjpeg-turbo decodes (Huffman baseline, extended and progressive), and the markers that have no
# length field (TEM and the restart markers RST0-7).
PLAIN_JPEG_FRAMES = frozenset({0xC0, 0xC1, 0xC2})
STANDALONE_MARKERS = frozenset({0x01, *range(0xD0, 0xD8)})


def plain_jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of an 8-bit greyscale or three-channel Huffman JPEG within the pixel limit, from its frame
    header; None for anything else (CMYK, 12-bit, other formats, garbage), which then goes through `open_image`.

    A handful of byte reads instead of PIL's header parse (about 0.3 ms), for the JPEGs that libjpeg-turbo decodes
    straight to RGB.
    """
    if not data.startswith(b"\xff\xd8"):
        return None
    pos = 2
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xFF:  # a fill byte before the marker
            pos += 1
        elif marker in STANDALONE_MARKERS:
            pos += 2
        elif 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # a frame header (C4/C8/CC are not)
            return _plain_frame_size(data, pos + 4) if marker in PLAIN_JPEG_FRAMES else None
        elif marker in (0xD9, 0xDA):  # end of image, or scan data, before any frame header
            return None
        else:  # a segment with a big-endian length that counts itself
            pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return None


def _plain_frame_size(data: bytes, pos: int) -> tuple[int, int] | None:
    if pos + 6 > len(data):
        return None
    precision, height, width, components = struct.unpack_from(">BHHB", data, pos)
    limit = Image.MAX_IMAGE_PIXELS
    plain = precision == 8 and components in (1, 3) and width > 0 and height > 0
    return (width, height) if plain and (limit is None or width * height <= limit) else None


def open_image(data: bytes) -> Image.Image:
    """Open image bytes lazily: only the header is read, so size and format are known before any pixel is decoded.

    Raises:
        BadImageError: The bytes are no image PIL knows, or the image is over the pixel limit.
    """
    try:
        with warnings.catch_warnings():
            # Between 1x and 2x MAX_IMAGE_PIXELS PIL only warns; treat that as a bomb too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    except UnidentifiedImageError as err:
        # Its message holds the buffer's memory address; keep skip reasons reproducible and readable.
        raise BadImageError("unknown image format") from err
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        size = PIL_PIXELS.search(str(err))  # PIL's own text quotes twice the limit for its error
        raise BadImageError(f"{size[1] + ' pixels, ' if size else ''}over the limit of {Image.MAX_IMAGE_PIXELS} "
                            "(PIL's decompression-bomb guard); if you trust the image, raise it: make_shards "
                            "--max-image-pixels, or data.max_image_pixels") from err
    except DECODE_ERRORS as err:
        raise BadImageError(f"{type(err).__name__}: {err}") from err


def load_image(img: Image.Image) -> Image.Image:
    """Decode every pixel of an image from `open_image` (after an optional `draft`); returns it.

    Raises:
        BadImageError: The pixel data is truncated or corrupt.
    """
    # A truncated file must fail here, not be silently padded, whatever other code set this global to.
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        img.load()
    except DECODE_ERRORS as err:
        raise BadImageError(f"{type(err).__name__}: {err}") from err
    return img


def decode_rgb(data: bytes) -> Image.Image:
    """Decode image bytes into a fully loaded 8-bit RGB image.

    Args:
        data: Encoded image (any format PIL reads).

    Returns:
        An RGB image (``to_rgb`` applied; calling ``to_rgb`` again returns it unchanged).

    Raises:
        BadImageError: The bytes are not a complete, readable image within the pixel limit, or its values are
            outside the range its mode is read in (``to_rgb``).
    """
    return to_rgb(decode(data))


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert an image of any mode to 8-bit RGB with the colours a viewer would show.

    - RGB without transparency is returned as is (no copy).
    - 16/32-bit integer greyscale is scaled from the full 16-bit range to 8 bits (65535 -> 255), not clipped at 255;
      float greyscale from 0-1. Values outside those ranges raise ``BadImageError`` (see ``_wide_grey_to_l``).
    - Alpha (RGBA, LA, PA, or palette/colour-key transparency) is composited over white.
    - Everything else (CMYK, palette, L, 1, YCbCr, ...) uses PIL's conversion; CMYK -> RGB there is
      R = 255 * (1 - C) * (1 - K) per channel (embedded ICC profiles are not applied, and a profile of another
      colour space is dropped, since it would not describe the RGB pixels).

    Args:
        img: A loaded PIL image.

    Returns:
        The RGB image.

    Raises:
        BadImageError: Wide greyscale with values outside the range its mode is read in.
    """
    has_alpha = img.mode in ALPHA_MODES or "transparency" in img.info
    if img.mode == "RGB" and not has_alpha:
        return img
    narrow = _wide_grey_to_l(img) if img.mode in WIDE_GREY_MODES else img
    rgb = _composite_over_white(narrow.convert("RGBA")) if has_alpha else narrow.convert("RGB")
    if img.mode not in ("RGB", "RGBA"):  # a CMYK or grey colour profile does not describe the RGB pixels
        rgb.info.pop("icc_profile", None)
    return rgb


def _wide_grey_to_l(img: Image.Image) -> Image.Image:
    """Scale wide greyscale to 8-bit "L" with rounding, or to "LA" when a colour key marks the transparent value (read
    before scaling: several 16-bit values share one 8-bit value).

    Integer modes are read as 16-bit (0-65535) and float mode "F" as intensities in 0-1, as scikit-image reads float
    images. A value outside that range has no defined brightness, so the image is refused rather than clipped: one
    rule for every image keeps a dataset's images comparable.
    """
    wide = np.asarray(img)  # [H, W], uint16 (any byte order), int32 or float32
    full_scale = 1.0 if img.mode == "F" else 65535
    low, high = wide.min(), wide.max()
    if not 0 <= low <= high <= full_scale:  # NaN fails every comparison, so it is refused too
        kind = "float" if img.mode == "F" else "32-bit integer"
        raise BadImageError(f"{kind} greyscale with values from {low:g} to {high:g}; {kind} images are read as "
                            f"0-{full_scale:g}: rescale it to that range, or save it as 8- or 16-bit")
    scaled = Image.fromarray(np.rint(wide * (255 / full_scale)).astype(np.uint8))  # mode "L"
    if "transparency" not in img.info:
        return scaled
    opaque = Image.fromarray(np.where(wide == img.info["transparency"], 0, 255).astype(np.uint8))  # [H, W] alpha
    return Image.merge("LA", (scaled, opaque))


def _composite_over_white(rgba: Image.Image) -> Image.Image:
    """Blend an RGBA image over an opaque white background, as a viewer shows transparent areas."""
    background = Image.new("RGBA", rgba.size, WHITE)
    return Image.alpha_composite(background, rgba).convert("RGB")
