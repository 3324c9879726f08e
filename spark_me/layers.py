"""Sparse building blocks: PyTorch-layout layers that compute only at visible sites.

Every layer takes and returns a MinkowskiEngine ``SparseTensor`` whose coordinates are
``[b, y, x]`` in input pixels. Parameters are stored exactly as the dense PyTorch layer
stores them (a conv's ``weight`` is ``[out, in/groups, kh, kw]``), so a timm state dict
loads into a sparse network unchanged and exports back unchanged.

Semantics (each one proven against a dense reference in ``tests/test_layers.py``):

* convolutions and pools compute only at output sites that exist, and absent neighbours
  contribute nothing, as zero padding would;
* a stride-1 layer outputs exactly its input sites; a stride-s layer outputs the input
  sites floored to the new stride;
* odd kernels are centred (PyTorch ``padding=k//2``); even kernels cover offsets
  ``[0, k)`` (PyTorch's non-overlapping ``k×k/k`` convs with no padding);
* normalisation statistics are taken over existing sites only.

Writing the sparse twin of a new convnet means replacing ``nn.Conv2d`` by
:class:`SparseConv2d`, ``nn.BatchNorm2d`` by :class:`SparseBatchNorm2d`, and so on, and
keeping the attribute names, so the state dicts stay interchangeable. (A k×k conv keeps its
weight in channels_last memory; shape, values and state-dict entries are PyTorch's.)
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import MinkowskiEngine as ME
import torch
import torch.nn as nn
import torch.nn.functional as F

from spark_me import ops

DIMENSION = 2  # images: coordinates are [b, y, x]


def with_features(x: ME.SparseTensor, features: torch.Tensor) -> ME.SparseTensor:
    """A SparseTensor on the same sites as ``x`` carrying ``features``."""
    return ME.SparseTensor(
        features, coordinate_map_key=x.coordinate_map_key, coordinate_manager=x.coordinate_manager
    )


class SparseConv2d(nn.Module):
    """Sparse twin of ``nn.Conv2d(in, out, k, stride, padding=k//2 or 0, bias=...)``.

    ``groups`` may be 1 or ``in_channels`` (depthwise, stride 1). ``conv_impl`` picks the
    backend (:data:`spark_me.ops.CONV_IMPLS`: ``"auto"``, ``"torch"``, ``"minkowski"``,
    ``"triton"``: CUDA, or CPU under the Triton interpreter). A depthwise conv runs on the
    gather backend (torch, or triton with ``conv_impl="triton"``) unless
    ``depthwise_impl="minkowski"`` asks for MinkowskiEngine 0.5.4's channel-wise loop (kept
    as a baseline; MinkowskiEngine has no other depthwise conv). The weight lives in
    PyTorch's layout, so state dicts stay timm-compatible.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        bias: bool = True,
        groups: int = 1,
        depthwise_impl: str = "gather",
        conv_impl: str = "auto",
    ) -> None:
        super().__init__()
        if groups not in (1, in_channels):
            raise ValueError(f"SparseConv2d supports groups=1 or depthwise, got groups={groups}")
        if groups != 1 and out_channels != in_channels:
            raise ValueError("a depthwise SparseConv2d needs out_channels == in_channels")
        if groups != 1 and (stride != 1 or kernel_size % 2 == 0):
            raise ValueError("a depthwise SparseConv2d must be stride 1 with an odd kernel")
        if depthwise_impl not in ("gather", "minkowski"):
            raise ValueError(f"depthwise_impl must be 'gather' or 'minkowski', got {depthwise_impl!r}")
        if kernel_size % 2 == 0 and stride != kernel_size:
            raise ValueError(
                f"an even kernel ({kernel_size}) is supported only as a non-overlapping "
                f"patchify conv with stride == kernel_size, got stride {stride}"
            )
        ops.check_conv_impl(conv_impl)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.groups = groups
        self.depthwise_impl = depthwise_impl
        self.conv_impl = conv_impl
        weight = torch.empty(out_channels, in_channels // groups, kernel_size, kernel_size)
        if groups == 1 and kernel_size > 1:
            # channels_last memory, same shape and values: the torch backend reads the weight
            # as [out, kh·kw·in] rows (a view now, a copy per call before), and the dense
            # conv path's oneDNN/cuDNN kernels take channels_last maps and weights without
            # reordering the weight (CPU, 1 thread: 20-34 ms less per 3×3 conv forward +
            # backward at 256-512 channels, mask 0)
            weight = weight.contiguous(memory_format=torch.channels_last)
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Conv2d``'s default initialisation."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight[0].numel()
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: ME.SparseTensor) -> ME.SparseTensor:
        if self.groups != 1:
            impl = "minkowski" if self.depthwise_impl == "minkowski" else self._gather_impl()
            features, key = ops.depthwise_conv(x, self.weight, impl), x.coordinate_map_key
        else:
            features, key = ops.conv(x, self.weight, self.stride, self.conv_impl)
        if self.bias is not None:
            features = ops.add_bias(features, self.bias, self.conv_impl)
        return ME.SparseTensor(features, coordinate_map_key=key, coordinate_manager=x.coordinate_manager)

    def _gather_impl(self) -> str:
        """The depthwise backend: the conv backend, with ``minkowski`` meaning the gathers."""
        return "torch" if self.conv_impl == "minkowski" else self.conv_impl

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        return s + f", bias={self.bias is not None}, conv_impl={self.conv_impl!r}"


class SparseBatchNorm2d(nn.BatchNorm1d):
    """Sparse twin of ``nn.BatchNorm2d``: statistics over existing (visible) sites only.

    Under autocast it runs as autocast runs a dense ``BatchNorm2d``: in the input's dtype
    with float32 parameters and statistics (PyTorch's mixed-precision batch norm computes
    in float32 and rounds its output once), so a bf16 conv's output stays bf16 through the
    norm and the activation after it, and is saved for backward at half the bytes.
    """

    def forward(self, x: ME.SparseTensor) -> ME.SparseTensor:  # type: ignore[override]
        return with_features(x, super().forward(x.F))


class SparseLayerNorm(nn.LayerNorm):
    """Sparse twin of timm's ``LayerNorm2d`` / channels-last ``nn.LayerNorm``: per site.

    Under autocast it computes in float32 and returns float32, as autocast runs a dense
    layer norm, unless ``low_precision_output``: then it returns the autocast dtype, for a
    consumer that casts to it anyway (a linear layer, a conv), the same values without a
    float32 copy. ``conv_impl`` picks the backend as for the convs (:func:`set_conv_impl`
    switches it with them): on CUDA the triton backend's kernel reads and writes the
    features in their own dtype (:func:`spark_me.ops.layer_norm`).
    :meth:`forward_features` takes and returns the ``[N, C]`` features themselves.
    """

    def __init__(self, normalized_shape: int, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True,
                 device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None, *,
                 low_precision_output: bool = False, conv_impl: str = "auto") -> None:
        super().__init__(normalized_shape, eps=eps, elementwise_affine=elementwise_affine, bias=bias, device=device,
                         dtype=dtype)
        ops.check_conv_impl(conv_impl)
        self.low_precision_output = low_precision_output
        self.conv_impl = conv_impl

    def forward_features(self, features: torch.Tensor) -> torch.Tensor:
        return ops.layer_norm(features, self.normalized_shape, self.weight, self.bias, self.eps, self.conv_impl,
                              self.low_precision_output)

    def forward(self, x: ME.SparseTensor) -> ME.SparseTensor:  # type: ignore[override]
        return with_features(x, self.forward_features(x.F))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", low_precision_output={self.low_precision_output}, conv_impl={self.conv_impl!r}"


class SparseMaxPool2d(nn.Module):
    """Sparse twin of ``nn.MaxPool2d(k, stride, padding=k//2)``: max over existing neighbours.

    Equal to the dense pool on a map that is zero at absent sites whenever the input is
    non-negative (as after ReLU), because every output site sees its own centre.
    """

    def __init__(self, kernel_size: int, stride: int, conv_impl: str = "auto") -> None:
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"SparseMaxPool2d needs an odd kernel, got {kernel_size}")
        ops.check_conv_impl(conv_impl)
        self.kernel_size = kernel_size
        self.stride = stride
        self.conv_impl = conv_impl

    def forward(self, x: ME.SparseTensor) -> ME.SparseTensor:
        features, key = ops.max_pool(x, self.kernel_size, self.stride, self.conv_impl)
        return ME.SparseTensor(features, coordinate_map_key=key, coordinate_manager=x.coordinate_manager)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, conv_impl={self.conv_impl!r}"


def set_conv_impl(module: nn.Module, conv_impl: str) -> nn.Module:
    """Switch every module of ``module`` that has a ``conv_impl`` attribute (the sparse
    convs, pools and layer norms; an encoder's own blocks that run ``spark_me.ops``) to
    backend ``conv_impl``; returns ``module``."""
    ops.check_conv_impl(conv_impl)
    for m in module.modules():
        if isinstance(getattr(m, "conv_impl", None), str):
            m.conv_impl = conv_impl
    return module


class SparseActivation(nn.Module):
    """Applies a pointwise function (ReLU, GELU, ...) to the features."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor] = F.relu) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: ME.SparseTensor) -> ME.SparseTensor:
        return with_features(x, self.fn(x.F))

    def extra_repr(self) -> str:
        return getattr(self.fn, "__name__", repr(self.fn))


class SparseDropPath(nn.Module):
    """Stochastic depth: in training, zero whole samples with probability ``drop_prob``.

    Survivors are scaled by ``1/(1-drop_prob)`` (timm's ``DropPath`` convention). The
    decision is per sample (batch index of each site), as the dense layer's.
    """

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True) -> None:
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"drop_prob must be in [0, 1), got {drop_prob}")
        self.drop_prob = drop_prob
        self.scale_by_keep = scale_by_keep

    def forward(self, x: ME.SparseTensor) -> ME.SparseTensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep_prob = 1.0 - self.drop_prob
        batch_index, batch_size = ops.site_batch_index(x)  # on a batch's TableCache: no host sync
        keep = x.F.new_empty(batch_size).bernoulli_(keep_prob)
        if self.scale_by_keep:
            keep = keep / keep_prob
        return with_features(x, x.F * keep[batch_index].unsqueeze(1))

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


def sparse_add(a: ME.SparseTensor, b: ME.SparseTensor) -> ME.SparseTensor:
    """Residual add of two tensors on the same sites (same coordinate map)."""
    if a.coordinate_map_key != b.coordinate_map_key:
        raise ValueError(
            f"cannot add sparse tensors on different sites ({a.coordinate_map_key} vs "
            f"{b.coordinate_map_key}); both branches must end at the same stride"
        )
    return with_features(a, a.F + b.F)
