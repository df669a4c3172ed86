"""Typed run configuration: dataclasses, a strict YAML loader and dotted command-line overrides.

A recipe is YAML loaded into nested dataclasses. Unknown keys, wrong types and missing required fields are errors
that name the dotted key and the file, with a close-match suggestion. Overrides (`optim.base_lr=1e-4`) are parsed with
`yaml.safe_load` and checked just as strictly. Derived values (effective batch, absolute LR) are never written back:
see `mae_tnt.train.schedule.derive_plan`.

References: nanoGPT `configurator.py` (reject unknown keys), litgpt `args.py` (dataclass checks in `__post_init__`).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from .atomic import file_in_the_way
from .text import close_names, shown

DEFAULT_MAX_IMAGE_PIXELS = 178_956_970
"""PIL's own decompression-bomb limit (the size where it raises rather than warns); make_shards uses it too."""

MISSING_VALUE = "???"
DECIMAL_INTEGER = re.compile(r"[-+]?(0|[1-9][0-9_]*)")  # YAML 1.1 also reads 010 as octal 8 and 0x10 as 16


class ConfigError(ValueError):
    """A recipe or override that does not fit the schema."""


class UnknownKeyError(ConfigError):
    """A key the schema does not have: `key` is its dotted name, `source` the recipe or override that set it."""

    def __init__(self, message: str, key: str, source: str):
        super().__init__(message)
        self.key, self.source = key, source


@dataclass
class ModelConfig:
    name: str = MISSING_VALUE
    """Registered model name, e.g. `mae_vit_base_patch16` (see `mae_tnt.list_models()`)."""
    mask_ratio: float = 0.75
    """Fraction of mask units hidden from the encoder."""
    img_size: int = 224
    """Input resolution in pixels (square)."""
    norm_pix_loss: bool = True
    """Normalise each target unit by its own mean and variance (MAE's best setting)."""
    decoder_dim: int | None = None
    """Decoder width; None keeps the registered default."""
    decoder_depth: int | None = None
    """Decoder blocks; None keeps the registered default."""
    decoder_heads: int | None = None
    """Decoder attention heads; None keeps the registered default."""
    drop_path: float = 0.0
    """Stochastic depth rate of the encoder (MAE pretraining uses none)."""
    word_mask_ratio: float = 0.0
    """TNT only, experimental: fraction of words masked inside visible sentences (0 = off)."""
    dense_stem: bool = False
    """SReT only: run the conv stem on the full image with masked pixels zeroed instead of per visible unit."""

    def __post_init__(self) -> None:
        if self.name != MISSING_VALUE:
            check_model_name(self.name, masked_autoencoder=True)
        check_range("model.mask_ratio", self.mask_ratio, 0, 1, "()")
        check_range("model.word_mask_ratio", self.word_mask_ratio, 0, 1, "[)")
        check_range("model.drop_path", self.drop_path, 0, 1, "[)")
        for key in ("decoder_dim", "decoder_depth", "decoder_heads"):
            if getattr(self, key) is not None:
                check_range(f"model.{key}", getattr(self, key), 1)

    def build_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `create_model`: only what the recipe sets beyond the registered defaults."""
        # mask_ratio too: the reconstruction grids call the model without one
        kwargs: dict[str, Any] = {"img_size": self.img_size, "norm_pix_loss": self.norm_pix_loss,
                                  "mask_ratio": self.mask_ratio}
        for key in ("decoder_dim", "decoder_depth", "decoder_heads"):
            if getattr(self, key) is not None:
                kwargs[key] = getattr(self, key)
        if self.drop_path:
            kwargs["drop_path_rate"] = self.drop_path
        if self.word_mask_ratio:
            kwargs["word_mask_ratio"] = self.word_mask_ratio
        if self.dense_stem:
            kwargs["dense_stem"] = True
        return kwargs


@dataclass
class DataConfig:
    train: str = MISSING_VALUE
    """Shard directory holding `_info.json`, or a brace URL such as `shards/train-{000000..000099}.tar`."""
    split: str = "train"
    """Split of `_info.json` to read when `train` is a directory."""
    val: str | None = None
    """Labeled validation shards (directory or URL) for reconstructions and the kNN monitor."""
    val_split: str = "val"
    """Split of `_info.json` to read when `val` is a directory."""
    batch_size: int = 64
    """Images per device per micro-step."""
    num_workers: int = 4
    """Data-loader worker processes per device (0 = load in the main process)."""
    crop_scale: list[float] = field(default_factory=lambda: [0.2, 1.0])
    """RandomResizedCrop area range (MAE: 0.2-1)."""
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    """Per-channel RGB mean that inputs are normalised with (ImageNet's by default); exports record it for timm."""
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    """Per-channel RGB standard deviation, as `mean`."""
    shuffle_chunk: int = 512
    """Samples read ahead and shuffled together inside each worker (seeded, so resume stays exact)."""
    allow_pipe: bool = False
    """Allow `pipe:` shard URLs, which run a shell command. Off unless you trust the recipe."""
    info: str | None = None
    """For `pipe:`/remote shard URLs: a local `_info.json` (or its directory) with their sample counts, found by the
    shard file name each URL holds (else by position). Not needed for a local shard directory."""
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    """PIL decompression-bomb limit in pixels (PIL's own default); larger images are skipped and counted."""
    decode_device: str = "cpu"
    """`cpu`, or `cuda` to decode JPEGs in batches on the GPU (falls back to CPU when unavailable)."""

    def __post_init__(self) -> None:
        self.train, self.val, self.info = map(home_expanded, (self.train, self.val, self.info))
        for key, low in (("batch_size", 1), ("shuffle_chunk", 1), ("num_workers", 0)):
            check_range(f"data.{key}", getattr(self, key), low)
        if len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ConfigError(f"data.crop_scale must be [low, high] within (0, 1], got {self.crop_scale}")
        check_choice("data.decode_device", self.decode_device, ("cpu", "cuda"))
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ConfigError(f"data.mean and data.std need one value per RGB channel (std > 0), got {self.mean} "
                              f"and {self.std}")
        check_range("data.max_image_pixels", self.max_image_pixels, 1)


@dataclass
class OptimConfig:
    base_lr: float = 1.5e-4
    """Learning rate per 256 images; the absolute LR is base_lr * effective_batch / 256."""
    min_lr: float = 0.0
    """LR at the end of the half-cosine (absolute, not per 256 images)."""
    weight_decay: float = 0.05
    """AdamW decoupled weight decay. Never of 1-D parameters (norms, biases, SReT's LRC scalars); fine-tuning also
    spares what the classifier's `no_weight_decay()` names (class token, position tables), while MAE pretraining
    decays its class and mask tokens, as MAE does, and spares only learned position tables (TNT's, SReT's)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW's (beta1, beta2); MAE pretrains with beta2 = 0.95."""
    accum_steps: int = 1
    """Micro-steps accumulated per optimizer step."""
    grad_clip: float | None = None
    """Clip the global gradient norm to this value (None = off, as in MAE)."""
    fused: bool = True
    """Fused AdamW kernel when the device supports it."""

    def __post_init__(self) -> None:
        check_range("optim.accum_steps", self.accum_steps, 1)
        check_range("optim.base_lr", self.base_lr, 0, bounds="(]")
        check_range("optim.min_lr", self.min_lr, 0)
        check_range("optim.weight_decay", self.weight_decay, 0)
        if len(self.betas) != 2 or not all(0 <= beta < 1 for beta in self.betas):
            raise ConfigError(f"optim.betas must be two values in [0, 1), got {self.betas}")
        if self.grad_clip is not None:  # a negative norm would flip every gradient
            check_range("optim.grad_clip", self.grad_clip, 0, bounds="()")


@dataclass
class ScheduleConfig:
    epochs: float = 800
    """Training length in epochs of the train split."""
    warmup_epochs: float = 40
    """Linear warmup length in epochs, then half-cosine to optim.min_lr."""

    def __post_init__(self) -> None:
        if not 0 < self.epochs < math.inf:
            raise ConfigError(f"schedule.epochs must be finite and > 0, got {self.epochs} (use run.max_steps for a "
                              "short run)")
        if not 0 <= self.warmup_epochs <= self.epochs:
            raise ConfigError(f"schedule.warmup_epochs must be in [0, schedule.epochs = {self.epochs}], "
                              f"got {self.warmup_epochs}")


@dataclass
class RunConfig:
    output_dir: str = "runs/default"
    """Run directory: config.yaml, metrics.jsonl, tensorboard/, recon/ and checkpoints/ (README, "run directory")."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (None = the whole schedule)."""
    log_every: int = 20
    """Optimizer steps between metric lines."""
    checkpoint_every: int = 1000
    """Optimizer steps between checkpoints (one is always written at the end)."""
    preempt_check_every: int = 10
    """With several processes, optimizer steps between the ranks' agreement on a SIGTERM (one scalar all-reduce);
    the run saves and exits within this many steps of it, so keep them inside the scheduler's grace period (and
    within 30 s when the SIGTERM also reaches `accelerate launch`, whose agent then kills the ranks)."""
    keep_checkpoints: int = 3
    """Newest checkpoints kept on disk (0 = keep every one)."""
    resume: str | None = "auto"
    """`auto` continues from the newest readable checkpoint in output_dir, `none` (or null) starts fresh, or a
    checkpoint, a run directory or its checkpoints/ folder (their newest checkpoint)."""
    precision: str = "auto"
    """`auto` (bf16 on GPU, fp32 on CPU), `fp32`, `bf16` or `fp16`."""
    compile: bool = False
    """torch.compile the model (the compile time is logged)."""
    grad_checkpointing: bool = False
    """Recompute every transformer block in the backward pass instead of keeping its activations: room for larger
    batches or models, for one more forward pass of the blocks (1.25-1.3x the step time on CPU,
    tools/bench/grad_checkpointing.py)."""
    fused_attn: bool = True
    """Attention through `scaled_dot_product_attention` (flash / memory-efficient kernels on GPU); false: plain
    matmuls in every backbone."""
    channels_last: bool = True
    """On GPU, keep 4-D activations channels-last (speeds up SReT's conv stem; no effect on CPU or under DeepSpeed)."""
    tf32: bool = True
    """Allow TF32 matmuls on Ampere and newer GPUs."""

    def __post_init__(self) -> None:
        self.output_dir, self.resume = home_expanded(self.output_dir), home_expanded(self.resume)
        keyword = str(self.resume).lower()
        if keyword in ("auto", "none", "null"):  # YAML's null, Python's None and other spellings of the two keywords
            self.resume = "auto" if keyword == "auto" else "none"
        check_choice("run.precision", self.precision, ("auto", "fp32", "bf16", "fp16"))
        for key in ("log_every", "checkpoint_every", "preempt_check_every"):
            check_range(f"run.{key}", getattr(self, key), 1)
        if blocker := file_in_the_way(self.output_dir):
            raise ConfigError(f"run.output_dir={self.output_dir} cannot be a directory: {blocker} is a file")
        if self.max_steps is not None:
            check_range("run.max_steps", self.max_steps, 1)
        check_range("run.keep_checkpoints", self.keep_checkpoints, 0)


@dataclass
class PretrainRunConfig(RunConfig):
    recon_every: int = 0
    """Optimizer steps between extra reconstruction grids; grids are also drawn at every checkpoint and at the end
    (0 = only there)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("run.recon_every", self.recon_every, 0)


@dataclass
class EvalConfig:
    knn_every: float = 0
    """Epochs between online kNN evaluations on data.val (0 = off)."""
    knn_k: int = 20
    """Neighbours that vote in the kNN monitor."""
    knn_temperature: float = 0.07
    """Temperature T of the votes, exp(cosine similarity / T) (DINO's weighted kNN)."""
    knn_max_train: int | None = 10_000
    """Train images in the online kNN bank, at most: the split's first N samples in shard order, less any that do not
    decode (null = every one); keeps the monitor cheap on big datasets."""

    def __post_init__(self) -> None:
        check_knn(self.knn_k, self.knn_temperature, "eval.knn_")
        check_range("eval.knn_every", self.knn_every, 0)
        check_bank_size("eval.knn_max_train", self.knn_max_train)


def home_expanded(path: str | None) -> str | None:
    """`path` with a leading `~` expanded as a shell would: recipes, quoted words and zsh's `key=~/x` leave it to us,
    and a literal `~` folder in the working directory would look like the home directory in every message."""
    return os.path.expanduser(path) if path else path


def check_model_name(name: str, masked_autoencoder: bool, key: str = "model.name") -> None:
    """Refuse a `model.name` that is not a registered model of the kind the run trains (pretraining: an mae_* masked
    autoencoder; fine-tuning: a classifier) before any work, suggesting the names it may have meant."""
    from .models.registry import classifier_name_for, list_models  # imports torch: only when checked

    names, mae_names = list_models(), list_models("mae_*")
    wanted = mae_names if masked_autoencoder else [n for n in names if n not in mae_names]
    if name in wanted:
        return
    if name in mae_names:  # fine-tuning the pretraining model's name
        advice = f"it is a masked autoencoder; the classifier of its encoder is {classifier_name_for(name)}"
    elif name in names:  # pretraining the classifier's name
        maes = [mae for mae in mae_names if classifier_name_for(mae) == name]
        advice = "it is a classifier" + (f"; the masked autoencoder of its encoder is {maes[0]}" if maes else "")
    else:
        close = close_names(name, wanted)
        advice = f"did you mean {', '.join(close)}?" if close else "no registered name is close"
    kind, pattern = ("masked autoencoder", "'mae_*'") if masked_autoencoder else ("classifier", "")
    raise ConfigError(f"{key}={name!r} is not a registered {kind} ({advice}); list them with python -c "
                      f"\"import mae_tnt; print(mae_tnt.list_models({pattern}))\"")


def check_range(key: str, value: float, low: float, high: float = math.inf, bounds: str = "[]") -> None:
    """Raise a ConfigError naming `key` unless `value` lies in the interval; `bounds` tells which ends are closed,
    e.g. '[)' for low <= value < high."""
    above = value >= low if bounds[0] == "[" else value > low
    below = value <= high if bounds[1] == "]" else value < high
    if not (above and below):
        raise ConfigError(f"{key} must be in {bounds[0]}{low:g}, {high:g}{bounds[1]}, got {value}")


def check_choice(key: str, value: object, choices: tuple) -> None:
    """Raise a ConfigError naming `key`, its choices and the closest ones, unless `value` is one of them."""
    if value in choices:
        return
    names = [str(choice).replace("None", "null") for choice in choices]
    close = close_names(str(value), names)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    raise ConfigError(f"{key} must be one of {', '.join(names)}, got {value!r}{hint}")


def check_knn(k: int, temperature: float, prefix: str) -> None:
    check_range(f"{prefix}k", k, 1)
    check_range(f"{prefix}temperature", temperature, 0, bounds="(]")


def check_bank_size(key: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise ConfigError(f"{key} must be at least 1, or null for every train image, got {value}")


def check_seed(seed: int) -> None:
    if not 0 <= seed < 2**63:  # torch.manual_seed's range
        raise ConfigError(f"seed must be a whole number from 0 to 2**63 - 1, got {seed}")


@dataclass
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    run: PretrainRunConfig = field(default_factory=PretrainRunConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0
    """Seed of the model's initialisation, the data order and every step's masks (`loop.seed_step`)."""

    def __post_init__(self) -> None:
        check_seed(self.seed)


def load_config(cls: type, path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """Build a config dataclass from a YAML recipe plus dotted `key=value` overrides.

    Raises:
        ConfigError: for an unknown key (with a suggestion), a wrong type or a missing required value.
    """
    raw: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text()
        except (OSError, UnicodeDecodeError) as err:
            reason = err.strerror if isinstance(err, OSError) else "not a text file"
            raise ConfigError(f"cannot read the recipe {path} ({reason}): give a YAML file, e.g. "
                              "recipes/demo_mae_vit.yaml") from None
        raw = _parse_yaml(text, source) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: a recipe must be a YAML mapping at the top level")
    given: dict[str, str] = {}
    for item in overrides:
        apply_override(cls, raw, item, given)
    return _build(cls, raw, prefix="", source=source, overrides=tuple(overrides))


def config_section(cls: type, raw: dict[str, Any], prefix: str, source: str) -> Any:
    """A config section rebuilt from its saved form (e.g. `model` in a checkpoint's state.json), checked as a
    recipe's is; `prefix` (`model.`) names its keys in errors."""
    return _build(cls, raw, prefix=prefix, source=source)


def _parse_yaml(text: str, source: str) -> Any:
    """`yaml.safe_load`, with a syntax error or a repeated key as a ConfigError naming the file (or override) and
    line."""
    try:
        _refuse_repeated_key(text, source)
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        where = _located(source, text, getattr(err, "problem_mark", None))
        raise ConfigError(f"{where}: not valid YAML ({problem}); check the brackets, quotes and indentation "
                          "there") from None


def _refuse_repeated_key(text: str, source: str) -> None:
    """A key written twice in one mapping is refused: `yaml.safe_load` would keep the last silently.

    Composing builds only the node tree (no Python objects), so this reads the text as safely as `safe_load`.
    """
    nodes, visited = [yaml.compose(text, Loader=yaml.SafeLoader)], set()
    while nodes:
        node = nodes.pop()
        if id(node) in visited:  # an alias repeats a node, and may even point back at its parent
            continue
        visited.add(id(node))
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key in (key for key, _ in node.value if isinstance(key, yaml.ScalarNode)):
                if key.value in seen:
                    raise ConfigError(f"{_located(source, text, key.start_mark)}: key `{key.value}` is written "
                                      "twice in the same mapping; keep one (YAML would silently use the last)")
                seen.add(key.value)
            nodes.extend(value for _, value in node.value)
        elif isinstance(node, yaml.SequenceNode):
            nodes.extend(node.value)


def _located(source: str, text: str, mark: yaml.Mark | None) -> str:
    """`source:line` for a place in a file; an override is one line, so its source alone."""
    return f"{source}:{mark.line + 1}" if mark is not None and "\n" in text else source


def apply_override(cls: type, raw: dict[str, Any], item: str, given: dict[str, str] | None = None) -> None:
    """Set `a.b.c=value` in the raw mapping, checking the key and the value's type against the schema of `cls`.

    A section given as a mapping (`data={batch_size: 32}`) is merged into the recipe's, each of its keys checked
    and set as if given alone: replacing it would silently reset the keys it does not name to the code's defaults.
    `given` (dotted key -> the override that set it) refuses a key set twice on the command line, however spelled,
    rather than silently taking the last value.
    """
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} is not of the form key=value (e.g. optim.base_lr=1e-4)")
    parts = key.split(".")
    leaf = _check_key_exists(cls, parts, source="command line")
    _set_override(cls, raw, parts, leaf, _override_value(key, text, leaf), item, {} if given is None else given)


def _set_override(cls: type, raw: dict[str, Any], parts: list[str], leaf: Any, value: Any, item: str,
                  given: dict[str, str]) -> None:
    key = ".".join(parts)
    if dataclasses.is_dataclass(leaf):  # a section's mapping: each of its keys as an override of its own
        for name, member in value.items():
            member_parts = [*parts, str(name)]
            member_leaf = _check_key_exists(cls, member_parts, source="command line")
            _set_override(cls, raw, member_parts, member_leaf, member, item, given)
        return
    if key in given:
        raise ConfigError(f"command line: `{key}` is given twice ({given[key]} and {item}); keep one")
    given[key] = item
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"command line: cannot set {key!r}: {part!r} is not a section")
    node[parts[-1]] = _check_type(value, leaf, key, source="command line")  # a wrong type is the command line's


def _override_value(key: str, text: str, leaf: Any) -> Any:
    """The value an override's text gives the key `key` of type `leaf`."""
    if not text.strip():  # an unset shell variable (`run.resume=$CKPT`): taken for null, it would start afresh
        raise ConfigError(f"command line: {key}= has no value (an unset shell variable?); give one, or {key}=null "
                          "for none")
    allowed = (leaf, *typing.get_args(leaf))
    if type(None) in allowed and text in ("None", "none"):
        return None  # a Python user's null: no path, name or number is spelled so
    value = _parse_yaml(text, f"override {key + '=' + text!r}")
    if str in allowed:
        return value if value is None or isinstance(value, str) else text  # run.output_dir=2024 is a name
    if isinstance(value, int) and not isinstance(value, bool) and not DECIMAL_INTEGER.fullmatch(text.strip()):
        raise ConfigError(f"command line: write {key} as a decimal number, not {text!r} (which YAML reads as {value})")
    if dataclasses.is_dataclass(leaf) and not isinstance(value, dict):
        raise ConfigError(f"command line: {key} is a section, not a value: set its keys one by one (e.g. "
                          f"{key}.{dataclasses.fields(leaf)[0].name}=...), or give a mapping ({key}={{...}})")
    return value


def all_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key the schema accepts, sections included."""
    keys = []
    for f in dataclasses.fields(cls):
        dotted = prefix + f.name
        keys.append(dotted)
        sub = _field_types(cls)[f.name]
        if dataclasses.is_dataclass(sub):
            keys += all_keys(sub, dotted + ".")
    return keys


def to_dict(config: Any) -> dict[str, Any]:
    """Plain nested dict of a config (safe for YAML, JSON and `torch.load(weights_only=True)`)."""
    return dataclasses.asdict(config)


def save_config(config: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def _check_key_exists(cls: type, parts: list[str], source: str) -> Any:
    """The type of the dotted key's field; an unknown key raises, naming it whole (`eval.knn_k`, whose words find
    `knn.k`, rather than its unknown section `eval`)."""
    node = cls
    for depth, part in enumerate(parts):
        names = {f.name for f in dataclasses.fields(node)}
        if part not in names:
            _unknown_key(cls, ".".join(parts), source)
        node = _field_types(node)[part]
        if depth < len(parts) - 1 and not dataclasses.is_dataclass(node):
            _unknown_key(cls, ".".join(parts), source)
    return node


def _unknown_key(cls: type, dotted: str, source: str) -> typing.NoReturn:
    close = _meant_keys(dotted, all_keys(cls))
    hint = f"; did you mean {' or '.join(f'`{key}`' for key in close)}?" if close else ""
    raise UnknownKeyError(f"{source}: unknown config key `{dotted}`{hint}", dotted, source)


def _meant_keys(dotted: str, keys: list[str]) -> list[str]:
    """Up to three keys that `dotted` may have meant: those whose words include all of its name's, closest first
    (`optim.lr`: optim.base_lr, optim.min_lr; `optim.clip_grad`: optim.grad_clip; `eval.knn_k`: knn.k), else the
    closest spelling (`data.trian`: data.train). The spelling alone led `optim.lr` to optim.min_lr, the final LR."""
    words = set(dotted.rpartition(".")[2].split("_"))
    sharing = [key for key in keys if words <= set(re.split(r"[._]", key))]
    ranked = sorted(sharing, key=lambda key: -difflib.SequenceMatcher(None, dotted, key).ratio())
    return ranked[:3] or difflib.get_close_matches(dotted, keys, n=1, cutoff=0.5)


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _build(cls: type, raw: Any, prefix: str, source: str, root: type | None = None,
           overrides: tuple[str, ...] = ()) -> Any:
    root = root or cls
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: `{prefix.rstrip('.') or '<root>'}` must be a mapping, got {shown(raw)}")
    types_ = _field_types(cls)
    for name in raw:  # first: a misspelled section would otherwise surface as its required keys being missing
        if name not in types_:
            _unknown_key(root, prefix + str(name), source)
    # Absent sections are built from {} too, so their required keys are still checked.
    sections = {name: {} for name, kind in types_.items() if dataclasses.is_dataclass(kind)}
    values = {}
    for name, value in {**sections, **raw}.items():
        dotted = prefix + str(name)
        expected = types_[name]
        if dataclasses.is_dataclass(expected):
            values[name] = _build(expected, value if value is not None else {}, dotted + ".", source, root, overrides)
        else:
            values[name] = _check_type(value, expected, dotted, source)
    try:
        built = cls(**values)
    except ConfigError as err:
        raise ConfigError(f"{_value_source(source, overrides, prefix, str(err))}: {err}") from None
    for f in dataclasses.fields(built):
        if getattr(built, f.name) == MISSING_VALUE:
            raise ConfigError(f"{source}: required key `{prefix + f.name}` is missing")
    return built


def _value_source(source: str, overrides: tuple[str, ...], prefix: str, message: str) -> str:
    """Where the values a section's check refused (`message`) came from: the recipe, plus the command-line overrides
    that reached the section. Every override reaches the top level, whose checks (`seed`, `mode`, and some across
    sections) name the keys they concern: there, only the overrides of keys the message names, if it names any."""
    used = [item for item in overrides if _reaches(item.partition("=")[0], prefix)]
    if not prefix:
        used = [item for item in used if _names(message, item.partition("=")[0])] or used
    if not used:
        return source
    typed = f"command line {' '.join(used)}"
    return typed if source == "<defaults>" else f"{source} with {typed}"


def _names(message: str, key: str) -> bool:
    """Whether `message` names `key` (`seed`, `data.batch_size`) as a whole, not as part of another key."""
    return re.search(rf"(?<![\w.]){re.escape(key)}(?![\w])", message) is not None


def _reaches(key: str, prefix: str) -> bool:
    """Whether an override of `key` sets something in the section `prefix` (`optim.`): a key inside it, or the
    section itself given as a mapping."""
    return key.startswith(prefix) or prefix.startswith(key + ".")


def _check_type(value: Any, expected: Any, dotted: str, source: str) -> Any:
    origin = typing.get_origin(expected)
    if origin in (Union, types.UnionType):
        options = typing.get_args(expected)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_type(value, option, dotted, source)
            except ConfigError as err:
                errors.append(err)
        raise errors[0]
    if origin is list:
        (item_type,) = typing.get_args(expected)
        if not isinstance(value, list):
            raise ConfigError(f"{source}: `{dotted}` must be a list, got {shown(value)}; write it in brackets, e.g. "
                              f"{dotted}=[0.9,0.95] on the command line")
        return [_check_type(v, item_type, f"{dotted}[{i}]", source) for i, v in enumerate(value)]
    if expected is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:  # YAML 1.1 reads `1e-4` (no dot) as a string.
            number = float(value)
        except ValueError:
            pass  # not a number: the type check below names it
        else:
            if not math.isfinite(number):  # nan would train silently into nan weights
                raise ConfigError(f"{source}: `{dotted}` must be a finite number, got {shown(value)}")
            return number
    if isinstance(value, bool) and expected is not bool:
        raise ConfigError(f"{source}: `{dotted}` must be {expected.__name__}, got {shown(value)}")
    if not isinstance(value, expected):
        raise ConfigError(f"{source}: `{dotted}` must be {expected.__name__}, got {shown(value)}")
    return value
