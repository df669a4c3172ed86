"""Models: the registry, the MAE wrapper and the encoder families (ViT, TNT, SReT)."""

from . import (
    sret,  # noqa: F401
    tnt,  # noqa: F401
    vit,  # noqa: F401  (registers the ViT family)
)
from .loading import CheckpointError, load_weights, read_state_dict
from .mae import MaskedAutoencoder
from .registry import ModelError, create_model, list_models, register_model

__all__ = [
    "CheckpointError",
    "MaskedAutoencoder",
    "ModelError",
    "create_model",
    "list_models",
    "load_weights",
    "read_state_dict",
    "register_model",
]
