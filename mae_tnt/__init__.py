"""mae_tnt: MAE self-supervised pretraining for vision transformers (TNT, ViT, SReT) on webdataset shards."""

from .models import MaskedAutoencoder, create_model, list_models, load_weights

__version__ = "0.1.0"
__all__ = ["MaskedAutoencoder", "create_model", "list_models", "load_weights"]
