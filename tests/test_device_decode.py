"""The deferred (GPU) decode path: same augmentation as the CPU path, CPU fallback, corrupt JPEGs dropped."""

import io
import random
import tarfile
import warnings
from functools import partial

import numpy as np
import pytest
import torch
from PIL import Image
from shard_utils import encode_png, write_shards

from mae_tnt.config import DataConfig
from mae_tnt.data.device_decode import DeferredCrop, EncodedCrop, decode_batch
from mae_tnt.data.images import decode_rgb
from mae_tnt.data.info import update_split
from mae_tnt.data.loader import build_train_stream, mae_transform
from mae_tnt.data.shards import StreamError, resolve_shards
from mae_tnt.data.stream import ShardStream
from mae_tnt.data.transforms import decode_jpeg, resize_box, to_tensor, train_crop


def jpeg(seed: int, size=(64, 56), subsampling: int = 2) -> bytes:
    """Random pixels as a JPEG; subsampling 2 is 4:2:0 chroma (PIL's default), 0 is 4:4:4."""
    array = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "JPEG", quality=90, subsampling=subsampling)
    return buffer.getvalue()


def deferred_vs_cpu(device: str, subsampling: int = 2):
    data = [jpeg(i, subsampling=subsampling) for i in range(6)]
    transform = DeferredCrop(48, (0.2, 1.0))
    items = [transform(image, random.Random(i)) for i, image in enumerate(data)]
    assert all(isinstance(item, EncodedCrop) for item in items)
    images, dropped = decode_batch(items, 48, torch.device(device))
    expected = torch.stack([train_crop(image, random.Random(i), size=48, scale=(0.2, 1.0))
                            for i, image in enumerate(data)])
    return images.cpu(), expected, dropped


def test_deferred_decode_reproduces_the_cpu_augmentation():
    images, expected, dropped = deferred_vs_cpu("cpu")
    assert dropped == 0 and torch.equal(images, expected)


def test_non_jpeg_images_are_decoded_in_the_worker_as_on_the_cpu_path():
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(buffer, "PNG")
    item = DeferredCrop(32, (0.2, 1.0))(buffer.getvalue(), random.Random(0))
    assert isinstance(item, torch.Tensor) and item.shape == (3, 32, 32)
    assert torch.equal(item, train_crop(buffer.getvalue(), random.Random(0), size=32, scale=(0.2, 1.0)))


def test_corrupt_jpeg_data_is_dropped_and_counted():
    transform = DeferredCrop(48, (0.2, 1.0))
    good = transform(jpeg(0), random.Random(0))
    broken = jpeg(1)
    bad = EncodedCrop(broken[:300] + bytes(200), good.box, False)
    images, dropped = decode_batch([good, bad, good], 48, torch.device("cpu"))
    assert images.shape[0] == 2 and dropped == 1
    with pytest.raises(StreamError, match="none of the 2 JPEGs of a batch decodes; .* data.decode_device=cpu"):
        decode_batch([bad, bad], 48, torch.device("cpu"))


def test_a_damaged_jpeg_that_pil_reads_is_decoded_as_on_the_cpu_path_not_dropped():
    transform = DeferredCrop(48, (0.2, 1.0))
    data = jpeg(2)
    damaged = data[: len(data) // 2] + bytes(len(data) - len(data) // 2)  # libjpeg-turbo and nvJPEG refuse it, PIL not
    items = [transform(data, random.Random(i)) for i, data in enumerate([jpeg(0), damaged])]
    images, dropped = decode_batch(items, 48, torch.device("cpu"))
    expected = resize_box(to_tensor(decode_rgb(damaged)), items[1].box, 48)  # PIL's pixels, the device's resize
    assert dropped == 0 and torch.equal(images[1], expected.flip(-1) if items[1].flip else expected)


def test_a_batch_mixing_jpegs_and_other_images_decodes_as_on_the_cpu_path(tmp_path):
    with tarfile.open(tmp_path / "train-000000.tar", "w") as tar:
        for i in range(8):  # a PNG first, so the worker's batch starts with an image it decoded itself
            field, data = ("png", encode_png(i, size=40)) if i % 2 == 0 else ("jpg", jpeg(i))
            for name, payload in {field: data, "cls": b"0"}.items():
                member = tarfile.TarInfo(f"s{i:06d}.{name}")
                member.size = len(payload)
                tar.addfile(member, io.BytesIO(payload))
    update_split(tmp_path, "train", ["train-000000.tar"], [8], classes=["0"])

    def batches(transform) -> list[dict]:
        return list(ShardStream(resolve_shards(str(tmp_path)), batch_size=4, transform=transform, seed=0, chunk=8))

    deferred = batches(DeferredCrop(32, (0.2, 1.0)))
    # Encoded JPEGs leave the worker as bytes: a shared-memory tensor each would hold a file descriptor apiece
    assert {type(item.data) for batch in deferred for item in batch["images"] if isinstance(item, EncodedCrop)} == {
        bytes}
    decoded = [decode_batch(batch["images"], 32, torch.device("cpu"))[0] for batch in deferred]
    on_cpu = [batch["images"] for batch in batches(partial(train_crop, size=32, scale=(0.2, 1.0)))]
    assert len(decoded) == 2 and all(torch.equal(a, b) for a, b in zip(decoded, on_cpu, strict=True))


def test_a_jpeg_the_device_refuses_is_decoded_on_the_cpu(monkeypatch):
    """nvJPEG does not take every valid JPEG; such an image must not be dropped as corrupt."""
    from mae_tnt.data import device_decode

    def device_refuses(data, mode, device):
        if isinstance(data, list) or torch.device(device).type != "cpu":
            raise RuntimeError("nvjpeg: unsupported")
        return decode_jpeg(data, mode=mode)

    monkeypatch.setattr(device_decode, "decode_jpeg", device_refuses)
    items = [DeferredCrop(48, (0.2, 1.0))(jpeg(i), random.Random(i)) for i in range(3)]
    images, dropped = decode_batch(items, 48, torch.device("meta"))  # any device but the CPU
    assert dropped == 0 and images.shape == (3, 3, 48, 48)


def test_cuda_decode_falls_back_to_the_cpu_without_a_gpu(tmp_path, monkeypatch):
    monkeypatch.setattr("mae_tnt.data.loader.gpu_decode_available", lambda: False)
    write_shards(tmp_path, [8])
    data = DataConfig(train=str(tmp_path), batch_size=4, num_workers=0, decode_device="cuda")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stream = build_train_stream(data, mae_transform(data, 16), seed=0, rank=0, world_size=1)
    assert any("decoding on the CPU" in str(w.message) for w in caught)
    assert isinstance(next(iter(stream))["images"], torch.Tensor)


@pytest.mark.parametrize("device, gpu", [("cpu", True), ("cuda", False), ("cuda", True)])
def test_the_crop_scale_reaches_the_transform_on_the_cpu_or_deferred_to_the_gpu(monkeypatch, device, gpu):
    monkeypatch.setattr("mae_tnt.data.loader.gpu_decode_available", lambda: gpu)
    data = DataConfig(train="x", crop_scale=[0.35, 0.9], decode_device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback's warning: tested above
        transform = mae_transform(data, 24)
    deferred = device == "cuda" and gpu
    assert isinstance(transform, DeferredCrop) == deferred
    size, scale = (transform.size, transform.scale) if deferred else (transform.keywords["size"],
                                                                          transform.keywords["scale"])
    assert (size, scale) == (24, (0.35, 0.9))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_decode_matches_the_cpu_path():
    # Full-resolution chroma: nvJPEG and libjpeg-turbo upsample 4:2:0 chroma differently (on these random pixels by
    # 13 grey levels on average, measured on an H100), but decode 4:4:4 alike, leaving the resize kernels' rounding.
    images, expected, dropped = deferred_vs_cpu("cuda", subsampling=0)
    assert dropped == 0
    assert (images.int() - expected.int()).abs().float().mean() < 1.0
