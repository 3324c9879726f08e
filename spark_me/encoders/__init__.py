"""Sparse encoders and their registry; importing this registers the built-in families."""
from spark_me.encoders import convnext, resnet  # noqa: F401  (register the built-in families)
from spark_me.encoders.base import SparseEncoder
from spark_me.encoders.plugins import import_encoder_modules
from spark_me.encoders.registry import build_sparse_encoder, list_encoders, register_encoder

__all__ = ["SparseEncoder", "build_sparse_encoder", "import_encoder_modules", "list_encoders", "register_encoder"]
