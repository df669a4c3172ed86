"""Setting up accelerate for a run: the precision it trains in, a check that the launcher's processes train together,
and what DeepSpeed's config needs from the recipe; plus the questions other modules ask of the set-up engine.

The recipe's `run.precision` decides the precision, over the launcher's `--mixed_precision` and over a DeepSpeed
config's `"auto"` entries; a DeepSpeed config that fixes another precision is refused rather than silently obeyed.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import parse_flag_from_env

from ..config import ConfigError, PretrainConfig


def build_accelerator(cfg: PretrainConfig) -> Accelerator:
    """The run's Accelerator in the precision `resolve_precision` settles, once the launch is known to be sound."""
    precision = resolve_precision(cfg.run.precision)
    accelerator = Accelerator(mixed_precision="no" if precision == "fp32" else precision,
                              gradient_accumulation_steps=cfg.optim.accum_steps)
    check_launch(os.environ.get("WORLD_SIZE"), accelerator.num_processes)
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")  # accelerate launch --mixed_precision, or its config
    if launched != "no" and launched != training_precision(accelerator) and accelerator.is_main_process:
        print(f"warning: the launcher asks for mixed precision {launched}, but the recipe's run.precision="
              f"{cfg.run.precision} decides: training in {training_precision(accelerator)} (set run.precision="
              f"{launched} to use it)")
    if accelerator.device.type == "cpu" and precision == "fp16":
        if accelerator.state.deepspeed_plugin is not None:  # its engine would stop at its first step
            raise ConfigError("run.precision=fp16: DeepSpeed has no fp16 on CPU; set run.precision=bf16 or fp32")
        if accelerator.is_main_process:
            print("warning: run.precision=fp16 has no effect on CPU, which autocasts to bf16 only: training in fp32 "
                  "(set run.precision=bf16 or fp32)")
    if accelerator.device.type == "cpu":
        # accelerate imports DeepSpeed whenever it is installed (e.g. in unwrap_model); told the device, DeepSpeed
        # skips its GPU probe and the warning that it found none.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = cfg.run.tf32
        torch.backends.cudnn.allow_tf32 = cfg.run.tf32
    return accelerator


def auto_precision() -> str:
    """What run.precision=auto means here: bf16 on a GPU, fp32 on the CPU, where `accelerate launch --cpu`
    (ACCELERATE_USE_CPU) trains beside a GPU too."""
    on_gpu = torch.cuda.is_available() and not parse_flag_from_env("ACCELERATE_USE_CPU")
    return "bf16" if on_gpu else "fp32"


def resolve_precision(requested: str) -> str:
    """What `run.precision` trains in here; a DeepSpeed config file's `"enabled": true/false` decides `auto`, and
    one that contradicts an explicit setting is refused: accelerate would silently train in the file's precision
    (or stop naming a --mixed_precision flag that was never given)."""
    fixed = deepspeed_file_modes()
    turned_on = [mode for mode, enabled in fixed.items() if enabled]
    precision = (turned_on[0] if turned_on else auto_precision()) if requested == "auto" else requested
    if turned_on not in ([], [precision]) or fixed.get(precision) is False:
        settings = ", ".join(f"{mode}.enabled={str(enabled).lower()}" for mode, enabled in fixed.items())
        asked = requested if requested == precision else f"{requested} ({precision} here)"
        raise ConfigError(f"run.precision={asked}, but the DeepSpeed config "
                          f"{os.environ['ACCELERATE_DEEPSPEED_CONFIG_FILE']} sets {settings}: write \"enabled\": "
                          '"auto" in its bf16 and fp16 sections so that the recipe decides (as recipes/deepspeed/'
                          "*.json do), or set the run.precision it allows")
    return precision


def deepspeed_file_modes() -> dict[str, bool]:
    """The half precisions (`bf16`, `fp16`) that this launch's DeepSpeed config file turns on or off; those it
    leaves `"auto"` or does not name are the recipe's to choose."""
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if not parse_flag_from_env("ACCELERATE_USE_DEEPSPEED") or not path or not Path(path).is_file():
        return {}  # no DeepSpeed, or its settings inline in the accelerate config, which follow the recipe
    try:
        settings = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"the DeepSpeed config {path} is not valid JSON: {err}") from err
    fixed = {}
    for mode in ("bf16", "fp16"):
        section = settings.get(mode)
        enabled = str(section.get("enabled", "auto")).lower() if isinstance(section, dict) else "auto"
        if enabled in ("true", "false"):
            fixed[mode] = enabled == "true"
    return fixed


def check_launch(launched: str | None, num_processes: int) -> None:
    """Refuse processes that the launcher started together but that each train alone: they would all write the same
    run directory as its only process. accelerate does that on a machine without GPUs, with a DeepSpeed config or
    with a multi-GPU one unless told to use the CPU."""
    if launched is None or int(launched) == num_processes:
        return
    cpu_processes = "ACCELERATE_USE_CPU=1 accelerate launch --config_file recipes/accelerate/cpu_2proc.yaml ..."
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        cause = (f"on CPU, DeepSpeed runs one process only: add --num_processes 1 to the launch, or train several CPU "
                 f"processes without DeepSpeed with {cpu_processes}")
    else:
        cause = f"there is no GPU for each; to run CPU processes, launch with {cpu_processes}"
    raise ConfigError(f"the launcher started {launched} processes, but accelerate set this one up as 1 of "
                      f"{num_processes}, so each would train alone: {cause}")


def training_precision(accelerator) -> str:
    """What the forward passes run in: fp32, bf16 or fp16 (which autocast on the CPU ignores)."""
    precision = accelerator.mixed_precision
    return "fp32" if precision == "no" or (precision == "fp16" and accelerator.device.type == "cpu") else precision


def uses_deepspeed(accelerator) -> bool:
    return accelerator.distributed_type.name == "DEEPSPEED"


def deepspeed_layout(accelerator) -> dict | None:
    """The ZeRO stage and precision (as run.precision names it) of a DeepSpeed engine; None without DeepSpeed."""
    if not uses_deepspeed(accelerator):
        return None
    precision = {"no": "fp32"}.get(accelerator.mixed_precision, accelerator.mixed_precision)
    return {"zero_stage": accelerator.state.deepspeed_plugin.zero_stage, "precision": precision}


def splits_weights(accelerator) -> bool:
    """ZeRO-3 splits the weights across ranks and every forward gathers them: a forward that one rank runs alone
    waits for the others forever."""
    return uses_deepspeed(accelerator) and accelerator.state.deepspeed_plugin.zero_stage == 3


def configure_deepspeed(accelerator: Accelerator, cfg: PretrainConfig, model: torch.nn.Module) -> torch.dtype | None:
    """Fill what DeepSpeed cannot infer without a prepared loader; returns the input dtype its engine needs.

    DeepSpeed's bf16/fp16 modes store the parameters in half precision, so inputs must be cast (facts §4):
    fine-tuning casts its batches; an MAE model casts its encoder's input itself and keeps its target's precision.

    Raises:
        ConfigError: a half mode for a model with affine BatchNorm (SReT's stem): DeepSpeed casts its weights but
            not its running statistics, which torch's batch_norm refuses to mix at the first forward.
    """
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return None
    ds_config = plugin.deepspeed_config
    ds_config["train_micro_batch_size_per_gpu"] = cfg.data.batch_size
    ds_config["gradient_accumulation_steps"] = cfg.optim.accum_steps
    clip = cfg.optim.grad_clip or 0.0
    if ds_config.get("gradient_clipping", "auto") not in ("auto", clip):
        warnings.warn(f"the DeepSpeed config sets gradient_clipping {ds_config['gradient_clipping']}; the recipe's "
                      f"optim.grad_clip={cfg.optim.grad_clip} applies, as its batch settings do (set it there)",
                      stacklevel=2)
    ds_config["gradient_clipping"] = clip
    precision = accelerator.mixed_precision
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is not None and any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.affine
                                 for m in model.modules()):
        raise ConfigError(f"{cfg.model.name} has BatchNorm layers, whose weights DeepSpeed's {precision} mode casts "
                          "but not their running statistics, which torch refuses to mix: train it under DeepSpeed "
                          f"with run.precision=fp32, or without DeepSpeed, where {precision} autocast keeps them in "
                          "fp32")
    return dtype
