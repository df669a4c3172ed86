"""Fine-tuning's augmentation: MAE's crop + flip and RandAugment per sample in the loader workers, random erasing and
mixup/cutmix on the normalised device batch, and the loss that matches the targets they produce.

All of it is timm's (RandAugment, RandomErasing, Mixup, the cross-entropies); this module seeds and wires it so every
sample's augmentation is a function of its stream seed and every batch's of (seed, rank, micro-step).
"""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch
from PIL import Image
from timm.data import Mixup
from timm.data.auto_augment import posterize as timm_posterize
from timm.data.auto_augment import rand_augment_transform
from timm.data.random_erasing import RandomErasing
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn

from ..data.transforms import to_tensor, train_crop
from ..finetune_config import AugmentConfig


class FinetuneTransform:
    """Per-sample train transform: random-resized crop + flip (uint8), then RandAugment when configured.

    timm's RandAugment draws from the global `random` / NumPy RNGs, so they are seeded from the sample's own RNG
    (and restored), which keeps every sample's augmentation a function of its stream seed. Picklable.
    """

    def __init__(self, size: int, scale: list[float], rand_augment: str | None, mean: list[float]):
        self.size, self.scale = size, tuple(scale)
        self.rand_augment = None
        if rand_augment:
            # The hyper-parameters timm's create_transform passes for MAE's `rand-m9-mstd0.5-inc1`.
            hparams = dict(translate_const=int(size * 0.45), img_mean=tuple(min(255, round(255 * m)) for m in mean),
                           interpolation=Image.BICUBIC)
            self.rand_augment = rand_augment_transform(rand_augment, hparams)
            for op in self.rand_augment.ops:
                if op.aug_fn is timm_posterize:
                    op.aug_fn = posterize_any_bits

    def __call__(self, data: bytes, rng: random.Random) -> torch.Tensor:
        """Encoded image -> uint8 [3, size, size]."""
        image = train_crop(data, rng, size=self.size, scale=self.scale)  # [3, S, S]
        if self.rand_augment is None:
            return image
        with seeded_global_rngs(rng.getrandbits(32)):
            augmented = self.rand_augment(Image.fromarray(image.permute(1, 2, 0).numpy()))  # [S, S, 3] in
        return to_tensor(augmented)


def posterize_any_bits(image: Image.Image, bits_to_keep: int, **kwargs) -> Image.Image:
    """timm's posterize, with 0 bits giving the black image older Pillow gave.

    timm's `PosterizeIncreasing` keeps 0 bits at magnitude 10, which `rand-m9-mstd0.5` reaches whenever the sampled
    magnitude is clipped there; Pillow 13 raises on 0 bits and would stop the run.
    """
    if bits_to_keep <= 0:
        return image.point(lambda _: 0)
    return timm_posterize(image, bits_to_keep, **kwargs)


@contextlib.contextmanager
def seeded_global_rngs(seed: int):
    """Seed Python's and NumPy's global RNGs for the block, then restore their previous states."""
    py_state, np_state = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


class BatchAugment:
    """Device-side augmentation of a normalised batch: random erasing, then mixup/cutmix with label smoothing.

    Returns (images [B, 3, S, S], targets): class indices [B], or soft targets [B, C] when mixup is on.
    """

    def __init__(self, cfg: AugmentConfig, num_classes: int, device: torch.device):
        self.erasing = None
        if cfg.reprob > 0:
            self.erasing = RandomErasing(cfg.reprob, mode="pixel", max_count=1, device=device)
        self.mixup = None
        if cfg.mixup_active:
            self.mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                               switch_prob=cfg.mixup_switch_prob, label_smoothing=cfg.label_smoothing,
                               num_classes=num_classes)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.erasing is not None:
            images = self.erasing(images)
        if self.mixup is not None:
            return self.mixup(images, labels)
        return images, labels


def build_criterion(cfg: AugmentConfig) -> nn.Module:
    """Soft-target CE under mixup (smoothing is inside the targets), else label-smoothing CE, else plain CE."""
    if cfg.mixup_active:
        return SoftTargetCrossEntropy()
    if cfg.label_smoothing > 0:
        return LabelSmoothingCrossEntropy(cfg.label_smoothing)
    return nn.CrossEntropyLoss()
