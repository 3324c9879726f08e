"""spark_me: SparK masked pre-training for convnets with truly sparse (MinkowskiEngine) encoders."""
from spark_me.encoders import (
    SparseEncoder,
    build_sparse_encoder,
    import_encoder_modules,
    list_encoders,
    register_encoder,
)
from spark_me.masking import random_patch_mask
from spark_me.spark import SparK

__version__ = "0.1.0"

__all__ = [
    "SparK",
    "SparseEncoder",
    "build_sparse_encoder",
    "import_encoder_modules",
    "list_encoders",
    "random_patch_mask",
    "register_encoder",
]
