"""MinkowskiEngine's own kernels (float32/float64 only): the reference and the baseline.

Weights arrive in PyTorch tap order and are rearranged into MinkowskiEngine's kernel
offset order here.
"""
from __future__ import annotations

import MinkowskiEngine as ME
import torch
from MinkowskiEngine.MinkowskiConvolution import MinkowskiConvolutionFunction
from MinkowskiEngine.MinkowskiPooling import MinkowskiLocalPoolingFunction
from MinkowskiEngineBackend._C import ConvolutionMode

from spark_me.ops.tables import kernel_tap_order


def _generator(kernel_size: int, stride: int, dimension: int) -> ME.KernelGenerator:
    return ME.KernelGenerator(kernel_size=kernel_size, stride=stride, dilation=1, dimension=dimension)


def sparse_conv(x: ME.SparseTensor, weight: torch.Tensor, kernel_size: int, stride: int) -> tuple[torch.Tensor, ME.CoordinateMapKey]:
    """``weight`` ``[K, C_in, C_out]`` in PyTorch tap order; returns (features, output key)."""
    me_weight = weight[kernel_tap_order(kernel_size).to(weight.device)]
    out_key = ME.CoordinateMapKey(x.coordinate_map_key.get_coordinate_size())
    features = MinkowskiConvolutionFunction.apply(
        x.F,
        me_weight,
        _generator(kernel_size, stride, x.D),
        ConvolutionMode.DEFAULT,
        x.coordinate_map_key,
        out_key,
        x.coordinate_manager,
    )
    return features, out_key


def max_pool(x: ME.SparseTensor, kernel_size: int, stride: int) -> tuple[torch.Tensor, ME.CoordinateMapKey]:
    """MinkowskiEngine's local max-pool; returns (features, output key)."""
    out_key = ME.CoordinateMapKey(x.coordinate_map_key.get_coordinate_size())
    features = MinkowskiLocalPoolingFunction.apply(
        x.F,
        ME.PoolingMode.LOCAL_MAX_POOLING,
        _generator(kernel_size, stride, x.D),
        x.coordinate_map_key,
        out_key,
        x.coordinate_manager,
    )
    return features, out_key


def depthwise_conv(x: ME.SparseTensor, weight: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """MinkowskiEngine 0.5.4's channel-wise algorithm (an autograd-recorded indexed
    multiply-add per kernel offset); ``weight`` ``[K, C]`` in PyTorch tap order."""
    me_weight = weight[kernel_tap_order(kernel_size).to(weight.device)]
    cm, key = x.coordinate_manager, x.coordinate_map_key
    kmap = cm.kernel_map(key, key, stride=1, kernel_size=kernel_size, dilation=1)
    out = x.F.new_zeros(x.F.shape)
    for k, in_out in kmap.items():
        in_out = in_out.long().to(x.F.device)
        out[in_out[1]] += x.F[in_out[0]] * me_weight[k]
    return out
