"""Sparse arithmetic on MinkowskiEngine's coordinates: tables, ops and their backends.

Data flows down: ``spark_me.layers`` (modules, PyTorch weight layouts) -> :mod:`dispatch`
(backend choice, autocast) -> a backend (:mod:`torch_backend`, :mod:`triton_backend`,
:mod:`minkowski_backend`) -> :mod:`tables` (neighbour tables from MinkowskiEngine's kernel
maps, cached per batch). :mod:`mask_sites` derives the same tables from a SparK batch's
patch mask alone, for CUDA graph replays. :mod:`triton_backend` is imported on first use:
it needs Triton, which decides at that import whether its kernels run in the interpreter.
"""
from spark_me.ops.dispatch import (
    CONV_IMPLS,
    add_bias,
    check_conv_impl,
    conv,
    depthwise_conv,
    layer_norm,
    layer_scale,
    linear,
    max_pool,
    resolve_conv_impl,
)
from spark_me.ops.tables import (
    NeighbourTables,
    TableCache,
    kernel_tap_order,
    neighbour_tables,
    new_coordinate_manager,
    site_batch_index,
)

__all__ = [
    "CONV_IMPLS",
    "NeighbourTables",
    "TableCache",
    "add_bias",
    "check_conv_impl",
    "conv",
    "depthwise_conv",
    "kernel_tap_order",
    "layer_norm",
    "layer_scale",
    "linear",
    "max_pool",
    "neighbour_tables",
    "new_coordinate_manager",
    "resolve_conv_impl",
    "site_batch_index",
]
