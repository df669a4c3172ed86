"""MAE's training crop on uint8: the JPEG frame-header reader and the crop that every decode path must produce."""

import io
import math
import random
import statistics

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import RandomResizedCrop

from mae_tnt.data.images import BadImageError, decode_rgb, pixel_limit, plain_jpeg_size
from mae_tnt.data.transforms import (
    decode_jpeg_tensor,
    normalize,
    random_resized_crop_box,
    resize_box,
    sample_crop,
    stack_images,
    train_crop,
)

SCALE = (0.2, 1.0)


def photo(width: int, height: int, mode: str = "RGB") -> Image.Image:
    """Stripes plus noise: any shift, flip or channel swap of a crop shows in the pixels."""
    yy, xx = np.mgrid[0:height, 0:width]  # [H, W]
    noise = np.random.default_rng(width * height).normal(0, 8, (height, width, 1))  # [H, W, 1]
    rgb = np.stack([xx * 7 % 256, yy * 5 % 256, (xx + 2 * yy) % 256], axis=-1) + noise  # [H, W, 3]
    return Image.fromarray(rgb.clip(0, 255).astype(np.uint8)).convert(mode)


def encode(image: Image.Image, fmt: str = "JPEG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


@pytest.mark.parametrize("mode, options", [
    ("RGB", {}),
    ("L", {}),
    ("RGB", {"progressive": True}),
    ("RGB", {"exif": Image.Exif().tobytes(), "icc_profile": b"\0" * 300, "comment": b"made by a test"}),
    ("RGB", {"subsampling": 0, "restart_marker_blocks": 1}),
])
def test_plain_jpeg_size_reads_the_frame_header_like_pil(mode, options):
    data = encode(photo(37, 23, mode), quality=90, **options)
    assert plain_jpeg_size(data) == Image.open(io.BytesIO(data)).size == (37, 23)


def test_plain_jpeg_size_steps_over_fill_bytes_before_a_marker():
    data = encode(photo(20, 10))
    padded = data[:2] + b"\xff\xff\xff" + data[2:]  # fill bytes are allowed before any marker
    assert plain_jpeg_size(padded) == (20, 10)


@pytest.mark.parametrize("data", [
    encode(photo(20, 10, "CMYK")),  # four channels: PIL's conversion, not libjpeg-turbo's
    encode(photo(20, 10), "PNG"),
    b"\xff\xd8\xff\xe0\x00\x10JFIF",  # cut off before the frame header
    b"\xff\xd8\xff\xda\x00\x02",  # scan data before any frame header
    b"\xff\xd8garbage",
    b"",
])
def test_anything_but_a_plain_jpeg_has_no_plain_size(data):
    assert plain_jpeg_size(data) is None


def test_a_jpeg_over_the_pixel_limit_has_no_plain_size_so_pil_guards_it():
    data = encode(photo(20, 10))
    with pixel_limit(199):
        assert plain_jpeg_size(data) is None
    with pixel_limit(200):
        assert plain_jpeg_size(data) == (20, 10)


@pytest.mark.parametrize("fmt, mode", [
    ("JPEG", "RGB"),  # libjpeg-turbo + torch's resize
    ("JPEG", "L"),
    ("JPEG", "CMYK"),  # PIL
    ("PNG", "RGB"),
])
def test_train_crop_is_the_sampled_box_resized_and_flipped(fmt, mode):
    """Every decode path gives MAE's crop: the box and flip drawn by `sample_crop`, resized bicubic from the image."""
    data = encode(photo(90, 70, mode), fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    for seed in range(8):
        ours = train_crop(data, random.Random(seed), size=48, scale=SCALE)  # crops under 96 px: no DCT draft
        expected = reference_crop(data, random.Random(seed), size=48)
        assert ours.shape == (3, 48, 48) and ours.dtype == torch.uint8
        error = (ours.float() - expected.float()).abs()  # [3, S, S]; torch's and PIL's resize round apart
        assert error.max() <= 3 and error.mean() <= 0.5


@pytest.mark.parametrize("box", [(0, 0, 90, 70), (13, 4, 50, 61), (30, 20, 38, 29)])
def test_the_cpu_resize_gives_torchvisions_result_which_the_gpu_path_uses(box):
    from torchvision.transforms.v2.functional import InterpolationMode, resize

    image = torch.from_numpy(np.array(photo(90, 70))).permute(2, 0, 1)  # [3, H, W], channels-last like decode_jpeg
    left, top, right, bottom = box
    expected = resize(image[:, top:bottom, left:right], [24, 24], InterpolationMode.BICUBIC, antialias=True)
    assert torch.equal(resize_box(image, box, 24), expected)


def test_without_torchvisions_jpeg_decoder_jpegs_take_the_pil_path(monkeypatch):
    """torchvision 0.29 deprecated its image decoders; once they are gone, JPEGs must still decode, through PIL."""
    from mae_tnt.data import transforms

    monkeypatch.setattr(transforms, "decode_jpeg", None)
    data = encode(photo(90, 70), quality=95)
    for seed in range(4):  # PIL on the same box gives the reference's pixels exactly, unlike libjpeg-turbo + torch
        assert torch.equal(train_crop(data, random.Random(seed), size=48, scale=SCALE),
                           reference_crop(data, random.Random(seed), size=48))


def test_a_crop_twice_the_output_size_is_decoded_at_a_reduced_scale_and_stays_close():
    yy, xx = np.mgrid[0:70, 0:90]  # [H, W]: smooth, as a reduced DCT scale only keeps low frequencies
    smooth = np.stack([xx * 2, yy * 3, (xx + yy) * 3 // 2], axis=-1).astype(np.uint8)  # [H, W, 3]
    data = encode(Image.fromarray(smooth), quality=95)
    for seed in range(8):
        ours = train_crop(data, random.Random(seed), size=12, scale=SCALE)  # crops of 30 px and more: 1/2 or 1/4
        error = (ours.float() - reference_crop(data, random.Random(seed), size=12).float()).abs()  # [3, S, S]
        assert 0 < error.mean() <= 4  # a box off by a pixel costs about 6 (the gradients' steps are 2-3)


def test_crops_are_drawn_as_torchvisions_random_resized_crop_draws_them_and_half_are_flipped():
    draws = 4000
    rng = random.Random(0)
    ours = [sample_crop(200, 150, (0.2, 1.0), rng) for _ in range(draws)]
    torch.manual_seed(0)
    theirs = [RandomResizedCrop.get_params(torch.zeros(1, 150, 200), [0.2, 1.0], [3 / 4, 4 / 3]) for _ in range(draws)]
    sizes = {"ours": [(right - left, bottom - top) for (left, top, right, bottom), _ in ours],
             "torchvision": [(w, h) for _, _, h, w in theirs]}  # (width, height)
    areas = {name: [w * h / 30000 for w, h in pairs] for name, pairs in sizes.items()}
    aspects = {name: [math.log(w / h) for w, h in pairs] for name, pairs in sizes.items()}
    for values in (areas, aspects):  # same distribution: means and spreads agree to a few standard errors
        assert statistics.mean(values["ours"]) == pytest.approx(statistics.mean(values["torchvision"]), abs=0.015)
        assert statistics.pstdev(values["ours"]) == pytest.approx(statistics.pstdev(values["torchvision"]), abs=0.015)
    assert all(box[0] >= 0 and box[1] >= 0 and box[2] <= 200 and box[3] <= 150 for box, _ in ours)
    assert min(areas["ours"]) > 0.19 and max(abs(a) for a in aspects["ours"]) < math.log(4 / 3) + 0.02
    assert 0.46 < sum(flip for _, flip in ours) / draws < 0.54


def test_crop_areas_stay_within_a_crop_scale_whose_upper_bound_is_below_one():
    """data.crop_scale bounds the area from above too: (0.1, 0.3) never crops more than 30% of the image."""
    rng = random.Random(0)
    areas = [(right - left) * (bottom - top) / 30000 for (left, top, right, bottom), _ in
             (sample_crop(200, 150, (0.1, 0.3), rng) for _ in range(1000))]
    # Rounding each side to whole pixels moves the area by well under 0.01 of a 200 x 150 image.
    assert 0.09 < min(areas) < 0.11 and 0.29 < max(areas) < 0.31


def test_an_image_no_crop_fits_falls_back_to_the_centre_with_the_aspect_ratio_clamped():
    assert random_resized_crop_box(1000, 10, (0.9, 1.0), random.Random(0)) == (493, 0, 506, 10)  # 13 = 10 x 4/3
    assert random_resized_crop_box(10, 1000, (0.9, 1.0), random.Random(0)) == (0, 493, 10, 506)


def reference_crop(data: bytes, rng: random.Random, size: int) -> torch.Tensor:
    """PIL on the fully decoded image: the crop box and flip as drawn by `sample_crop`."""
    box, flip = sample_crop(90, 70, SCALE, rng)
    crop = decode_rgb(data).resize((size, size), Image.BICUBIC, box=box)
    crop = torch.from_numpy(np.array(crop)).permute(2, 0, 1)  # [3, S, S]
    return crop.flip(-1) if flip else crop


def test_a_truncated_jpeg_is_a_bad_image_whose_reason_reads_plainly():
    data = encode(photo(64, 48), quality=90)
    with pytest.raises(BadImageError, match=r"^OSError: image file is truncated \(\d+ bytes not processed\)$"):
        train_crop(data[: len(data) // 2], random.Random(0), size=32, scale=SCALE)


def test_a_damaged_jpeg_that_pil_reads_trains_whichever_crop_is_drawn():
    """libjpeg-turbo refuses zeroed data that PIL, the converter's judge, reads: such a file must not be
    skipped only when a small crop sends it down the libjpeg-turbo path."""
    data = encode(photo(90, 70), quality=90)
    damaged = data[: len(data) // 2] + bytes(len(data) - len(data) // 2)  # its second half zeroed
    assert decode_jpeg_tensor(damaged) is None and decode_rgb(damaged).size == (90, 70)
    for seed in range(6):  # every crop of a 90x70 image is under 96 px: at 48 px each would take libjpeg-turbo
        crop = train_crop(damaged, random.Random(seed), size=48, scale=SCALE)
        assert torch.equal(crop, reference_crop(damaged, random.Random(seed), 48))  # PIL's pixels, exactly


def test_a_batch_is_stacked_channels_last_and_normalised_into_the_layout_asked_for():
    images = [train_crop(encode(photo(90, 70), quality=95), random.Random(seed), size=48, scale=SCALE)
              for seed in range(3)]
    batch = stack_images(images)  # [3, 3, 48, 48]
    assert torch.equal(batch, torch.stack(images)) and batch.is_contiguous(memory_format=torch.channels_last)
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    expected = (torch.stack(images).float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(
        1, 3, 1, 1)  # [3, 3, 48, 48]
    for memory_format in (torch.contiguous_format, torch.channels_last):
        normalised = normalize(batch, mean, std, memory_format)
        assert normalised.dtype == torch.float32 and normalised.is_contiguous(memory_format=memory_format)
        torch.testing.assert_close(normalised, expected)


def test_normalize_never_changes_the_tensor_it_is_given():
    """It works in place on its float copy; a float input of the asked layout would otherwise be that copy."""
    images = torch.rand(2, 3, 4, 4) * 255
    given = images.clone()
    out = normalize(images, [0.5] * 3, [0.25] * 3)
    assert torch.equal(images, given)
    assert torch.allclose(out, (given / 255 - 0.5) / 0.25, atol=1e-5)
