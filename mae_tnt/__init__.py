"""mae_tnt: MAE self-supervised pretraining for vision transformers (TNT, ViT, SReT) on webdataset shards.

The model API is imported lazily so that data tools (`make_shards`, `inspect_shards`) start without torch.
"""

__version__ = "0.1.0"
__all__ = ["MaskedAutoencoder", "create_model", "list_models", "load_weights"]


def __getattr__(name: str):
    if name in __all__:
        from . import models

        return getattr(models, name)
    raise AttributeError(f"module 'mae_tnt' has no attribute {name!r}")
