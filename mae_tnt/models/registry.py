"""One model registry, separate from timm's: name -> builder.

`register_model` raises on a duplicate name, `create_model` suggests close matches for an unknown one and can load a
checkpoint with an exact key check, and `list_models` takes `fnmatch` patterns.

References: timm `_registry.py` (register/create/list), with a hard error on duplicates instead of a warning.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable
from pathlib import Path

from torch import nn

from ..text import close_names

_BUILDERS: dict[str, Callable[..., nn.Module]] = {}
UNKNOWN_ARGUMENT = re.compile(r"unexpected keyword argument '(\w+)'")  # how Python words a builder's TypeError


class ModelError(ValueError):
    """A model that cannot be built: a name that is not registered, or arguments its builder refuses."""


def register_model(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register `builder` under its function name."""
    name = builder.__name__
    if name in _BUILDERS:
        raise ValueError(f"model {name!r} is registered twice")
    _BUILDERS[name] = builder
    return builder


def list_models(pattern: str | None = "*") -> list[str]:
    """Sorted names of the registered models matching an `fnmatch` pattern, e.g. `mae_tnt_*`; every one for an empty
    pattern or None, as timm's `list_models` gives."""
    return sorted(name for name in _BUILDERS if fnmatch.fnmatch(name, pattern or "*"))


def classifier_name_for(mae_name: str) -> str:
    """The registered classifier of an MAE model: `mae_vit_base_patch16` -> `vit_base_patch16_224`."""
    stem = mae_name.removeprefix("mae_")
    if stem in _BUILDERS:
        return stem
    candidates = [name for name in list_models(f"{stem}_*") if not name.startswith("mae_")]
    if len(candidates) != 1:
        raise ModelError(f"cannot tell the classifier of {mae_name!r} (candidates {candidates}); pass --model NAME")
    return candidates[0]


def create_model(name: str, checkpoint_path: str | Path | None = None, **kwargs) -> nn.Module:
    """Build a registered model; kwargs override its config table.

    Args:
        name: a name from `list_models()`.
        checkpoint_path: optional weights to load with an exact key check: a training checkpoint directory, an
            export (`model.safetensors`), or a file written by `tools/convert_checkpoint.py`. An export or a training
            checkpoint also gives the `img_size` its weights were trained at and, when written by `name`, the
            `num_classes` and `global_pool` it was built with, or a pretraining run's every `model.*` setting (an
            encoder loaded from a pretraining checkpoint gets num_classes=0), unless kwargs set them. A description
            that builds a model far larger than its weights is refused before the model is built
            (`loading.refuse_oversized_build`).
    """
    if name not in _BUILDERS:
        close = close_names(name, _BUILDERS)
        hint = f" Did you mean {', '.join(close)}?" if close else " See mae_tnt.list_models()."
        raise ModelError(f"unknown model {name!r}.{hint}")
    if checkpoint_path is None:
        return _build(name, kwargs)
    from .loading import (
        load_weights,
        read_state_dict,
        recorded_build_kwargs,
        refuse_oversized_build,
        refuse_resampled,
    )

    recorded = recorded_build_kwargs(checkpoint_path, name)
    untrusted = sorted(recorded.keys() - kwargs.keys())  # the caller's own arguments are theirs to size
    given, kwargs = kwargs, {**recorded, **kwargs}
    weights = read_state_dict(checkpoint_path)
    if untrusted:
        refuse_oversized_build(name, kwargs, weights, checkpoint_path,
                               f"restore it, or pass {', '.join(untrusted)} to create_model yourself", given=given)
    model = _build(name, kwargs)
    report = load_weights(model, weights)
    if "img_size" not in given:  # a recorded size that differs from the weights' is a corrupt record, not a request
        recorded_size = kwargs.get("img_size")
        built = f"{name} at the {recorded_size} px its description records" if recorded_size else f"{name}'s default"
        refuse_resampled(report, str(checkpoint_path), built, "img_size=")
    return model


def _build(name: str, kwargs: dict) -> nn.Module:
    """Registered model `name` built with `kwargs`, whose refusal by its builder is a ModelError."""
    try:
        return _BUILDERS[name](**kwargs)
    # E.g. an image size the patch size does not divide; timm asserts that heads divide a width.
    except (TypeError, ValueError, AssertionError) as err:
        unknown = UNKNOWN_ARGUMENT.search(str(err))
        if unknown:
            raise ModelError(f"{name} takes no argument {unknown[1]!r}: leave it out (in a recipe, remove model."
                             f"{unknown[1]} or set it back to its default)") from err
        raise ModelError(f"cannot build {name} with {kwargs}: {err}") from err
