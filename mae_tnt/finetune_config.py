"""Typed configuration of the downstream runs: fine-tuning, linear probing and kNN evaluation.

Sections reuse the pretraining dataclasses of `mae_tnt.config` where they fit (`RunConfig` as is; `DataConfig`,
`OptimConfig` and `ScheduleConfig` subclassed only to change defaults or add fields), so one strict loader
(`load_config(FinetuneConfig, path, overrides)`) checks both kinds of recipe. Defaults are MAE's fine-tuning recipe;
linear-probe and kNN recipes override them.

References: facebookresearch/mae `main_finetune.py`, `main_linprobe.py` and FINETUNE.md (defaults); DINO
`eval_knn.py` (k = 20, T = 0.07).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .config import (
    MISSING_VALUE,
    ConfigError,
    DataConfig,
    OptimConfig,
    RunConfig,
    ScheduleConfig,
    check_bank_size,
    check_choice,
    check_knn,
    check_model_name,
    check_range,
    check_seed,
    home_expanded,
)

MODES = ("finetune", "linprobe", "knn")
OPTIMIZERS = ("adamw", "lars")


@dataclass
class ClassifierConfig:
    name: str = MISSING_VALUE
    """Registered classifier name, e.g. `vit_base_patch16_224`, `tnt_s_patch16_224`, `sret_s`."""
    num_classes: int | None = None
    """Output classes; None reads the `classes` list of the train shards' `_info.json`."""
    img_size: int = 224
    """Input resolution in pixels; position embeddings of the init checkpoint are resampled to it."""
    drop_path: float = 0.1
    """Stochastic depth rate (MAE: 0.1 for ViT-B, 0.2 for L, 0.3 for H)."""
    global_pool: str | None = "avg"
    """`avg` (MAE fine-tuning: norm of the mean patch token), `token` (cls token, MAE's linear probe), or None for the
    model's own pooling (SReT always averages: avg or None)."""
    head_init_std: float = 2e-5
    """Std of the truncated-normal init of a head the checkpoint lacks (MAE: 2e-5 fine-tune, 0.01 linear probe)."""
    bn_reestimate_batches: int = 0
    """SReT only: train batches used to recompute the stem BatchNorm statistics after loading (0 = keep them)."""

    def __post_init__(self) -> None:
        if self.name != MISSING_VALUE:
            check_model_name(self.name, masked_autoencoder=False)
        if self.num_classes is not None and self.num_classes < 1:
            raise ConfigError(f"model.num_classes must be >= 1, got {self.num_classes}")
        check_choice("model.global_pool", self.global_pool, ("avg", "token", None))
        check_range("model.drop_path", self.drop_path, 0, 1, "[)")
        check_range("model.head_init_std", self.head_init_std, 0, bounds="()")


@dataclass
class FinetuneDataConfig(DataConfig):
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    """RandomResizedCrop area range (MAE fine-tuning and linear probe: 0.08-1)."""
    eval_batch_size: int | None = None
    """Images per device per evaluation or feature batch; None = data.batch_size."""


@dataclass
class AugmentConfig:
    rand_augment: str | None = "rand-m9-mstd0.5-inc1"
    """timm RandAugment spec applied per sample after the crop (None = off)."""
    reprob: float = 0.25
    """Random-erasing probability per image (pixel mode, one box), applied on the device after normalisation."""
    mixup: float = 0.8
    """Mixup alpha (0 = off)."""
    cutmix: float = 1.0
    """CutMix alpha (0 = off)."""
    mixup_prob: float = 1.0
    """Probability of mixing a batch at all."""
    mixup_switch_prob: float = 0.5
    """Probability of CutMix instead of Mixup when both are on."""
    label_smoothing: float = 0.1
    """Label smoothing of the targets (mixed into Mixup/CutMix's soft targets when those are on)."""

    def __post_init__(self) -> None:
        for key in ("reprob", "mixup_prob", "mixup_switch_prob"):
            check_range(f"augment.{key}", getattr(self, key), 0, 1)
        check_range("augment.mixup", self.mixup, 0)
        check_range("augment.cutmix", self.cutmix, 0)
        check_range("augment.label_smoothing", self.label_smoothing, 0, 1, "[)")
        if self.rand_augment:
            from timm.data.auto_augment import rand_augment_transform

            try:  # timm asserts or fails deep inside on a malformed spec
                rand_augment_transform(self.rand_augment, {})
            except Exception:
                raise ConfigError(f"augment.rand_augment={self.rand_augment!r} is not a timm RandAugment spec such "
                                  "as 'rand-m9-mstd0.5-inc1' (null turns it off)") from None

    @property
    def mixup_active(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0

    @property
    def active(self) -> bool:
        return bool(self.rand_augment) or self.reprob > 0 or self.mixup_active or self.label_smoothing > 0


@dataclass
class FinetuneOptimConfig(OptimConfig):
    name: str = "adamw"
    """`adamw` (fine-tuning) or `lars` (linear probe: timm Lars, no adaptation or decay on 1-D parameters)."""
    base_lr: float = 1e-3
    """Learning rate per 256 images (MAE fine-tune blr; 0.1 for the linear probe)."""
    min_lr: float = 1e-6
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas (MAE fine-tuning keeps PyTorch's defaults)."""
    layer_decay: float | None = 0.75
    """Layer-wise LR decay of fine-tuning with AdamW: group i of n = depth + 1 gets decay^(n - i) (None = off). The
    linear probe trains its head alone, so it applies none, whatever this says."""
    momentum: float = 0.9
    """LARS momentum."""
    trust_coeff: float = 0.001
    """LARS trust coefficient."""
    ema_decay: float | None = None
    """Keep an EMA of the weights with this decay (timm ModelEmaV3) and evaluate it too (None = off)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("optim.name", self.name, OPTIMIZERS)
        if self.layer_decay is not None:
            check_range("optim.layer_decay", self.layer_decay, 0, 1, "(]")
        if self.ema_decay is not None:
            check_range("optim.ema_decay", self.ema_decay, 0, 1, "[)")
        check_range("optim.momentum", self.momentum, 0, 1, "[)")
        check_range("optim.trust_coeff", self.trust_coeff, 0, bounds="()")


@dataclass
class FinetuneScheduleConfig(ScheduleConfig):
    epochs: float = 100
    """Training length in epochs of the train split (MAE ViT-B: 100)."""
    warmup_epochs: float = 5
    """Linear warmup in epochs, then half-cosine to optim.min_lr."""


@dataclass
class KnnConfig:
    k: int = 20
    """Neighbours that vote (DINO: 20)."""
    temperature: float = 0.07
    """Votes are weighted by exp(cosine similarity / temperature)."""
    max_train: int | None = None
    """The feature bank holds the train split's first N samples in shard order, less any that do not decode
    (None = the whole split)."""

    def __post_init__(self) -> None:
        check_knn(self.k, self.temperature, "knn.")
        check_bank_size("knn.max_train", self.max_train)


@dataclass
class FinetuneConfig:
    mode: str = "finetune"
    """`finetune` (all weights), `linprobe` (frozen encoder, BatchNorm + linear head) or `knn` (no training)."""
    init: str | None = None
    """Weights to start from: a pretraining checkpoint directory, an export, or an official MAE/TNT/SReT file.
    A run directory, or its checkpoints/ folder, stands for its newest checkpoint, which the run's config.yaml
    records. None = random initialisation (a baseline)."""
    model: ClassifierConfig = field(default_factory=ClassifierConfig)
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: FinetuneOptimConfig = field(default_factory=FinetuneOptimConfig)
    schedule: FinetuneScheduleConfig = field(default_factory=FinetuneScheduleConfig)
    run: RunConfig = field(default_factory=RunConfig)
    knn: KnnConfig = field(default_factory=KnnConfig)
    seed: int = 0
    """Seed of the head's initialisation, the data order and every step's augmentations (`loop.seed_step`)."""

    def __post_init__(self) -> None:
        self.init = home_expanded(self.init)
        check_seed(self.seed)
        check_choice("mode", self.mode, MODES)
        if self.mode == "linprobe" and self.augment.active:
            raise ConfigError(
                "mode=linprobe trains on random-resized crops and flips only: set augment.rand_augment=null "
                "augment.reprob=0 augment.mixup=0 augment.cutmix=0 augment.label_smoothing=0 (see "
                "recipes/linprobe_vit_b.yaml)"
            )
        if self.mode == "finetune" and self.optim.name == "lars" and self.optim.layer_decay is not None:
            raise ConfigError("LARS applies no layer-wise LR decay: set optim.layer_decay=null with optim.name=lars, "
                              "or fine-tune with optim.name=adamw")
        if self.data.decode_device != "cpu":
            raise ConfigError("data.decode_device must be cpu for downstream runs: RandAugment works on PIL images, "
                              "so samples are decoded and augmented in the loader workers")
        if self.mode == "finetune" and self.augment.mixup_active and self.data.batch_size % 2:
            raise ConfigError(f"mixup/cutmix pair images in a batch: data.batch_size must be even, got "
                              f"{self.data.batch_size}")
