"""One entry point per sparse op, dispatching to a backend and applying autocast.

Backends (``conv_impl``):

* ``"torch"``: gathers and matrix products (:mod:`spark_me.ops.torch_backend`), any
  device and float dtype;
* ``"minkowski"``: MinkowskiEngine's own kernels, float32/float64 only;
* ``"triton"``: fused implicit-GEMM Triton kernels (:mod:`spark_me.ops.triton_backend`)
  on CUDA tensors, float32/bfloat16/float16; on CPU tensors only under the Triton
  interpreter (``TRITON_INTERPRET=1`` when the backend is first imported), which is how
  the tests check it. Its per-layer tests passed on an H200, where its fp32 encoders ran
  faster than the torch backend's (docs/gpu.md);
* ``"auto"``: ``"triton"`` for float32/bfloat16/float16 features on CUDA where Triton is
  installed, else ``"torch"`` (float64, CPU). On an H100 (docs/gpu.md, third and fourth
  runs) Triton's bf16 training steps took 0.84-1.01x of the torch backend's time, its fp32
  ConvNeXt-T encoder half, and every CUDA test of it passed.

Under ``torch.autocast`` the gather backends (torch, triton) compute in the autocast
dtype, as autocast runs dense convs; MinkowskiEngine's kernels compute in float32. The
triton backend's max-pool is the torch backend's. The per-site layer norm
(:func:`layer_norm`) computes in float32 under autocast, as autocast runs dense layer
norms; the triton backend's reads and writes the features in their own dtype, without
autocast's float32 copies. :func:`linear`, :func:`add_bias` and :func:`layer_scale` are
PyTorch's ops except that on the triton backend their per-channel gradients are summed by
a kernel of its own.
"""
from __future__ import annotations

import functools
import importlib.util
from types import ModuleType
from typing import Optional

import MinkowskiEngine as ME
import torch
import torch.nn.functional as F

from spark_me.ops import minkowski_backend, torch_backend
from spark_me.ops.tables import neighbour_tables

CONV_IMPLS = ("auto", "torch", "triton", "minkowski")
LOW_PRECISION = (torch.bfloat16, torch.float16)


# The dtypes the triton backend computes in (spark_me.ops.triton_backend.SUPPORTED_DTYPES,
# repeated here so that resolving "auto" does not import Triton on machines without CUDA).
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.lru_cache(maxsize=None)
def triton_installed() -> bool:
    """Whether the triton package can be imported (looked up once per process)."""
    return importlib.util.find_spec("triton") is not None


def check_conv_impl(conv_impl: str) -> None:
    """Raise unless ``conv_impl`` names a backend that is installed (the device is checked
    when an op runs: :func:`resolve_conv_impl`)."""
    if conv_impl not in CONV_IMPLS:
        raise ValueError(f"conv_impl must be one of {', '.join(CONV_IMPLS)}, got {conv_impl!r}")
    if conv_impl == "triton" and not triton_installed():
        raise ImportError(
            "conv_impl='triton' needs the triton package (it comes with PyTorch's CUDA wheels); "
            "use conv_impl='torch'"
        )


def load_triton_backend(device: torch.device) -> ModuleType:
    """:mod:`spark_me.ops.triton_backend`, imported on first use, if it can run on ``device``:
    CUDA, or CPU under the Triton interpreter."""
    try:
        from spark_me.ops import triton_backend as backend
    except ImportError as e:
        raise ImportError(f"conv_impl='triton' could not import Triton ({e}); use conv_impl='torch'") from e
    if device.type == "cuda" or (device.type == "cpu" and backend.INTERPRETED):
        return backend
    raise ValueError(
        f"conv_impl='triton' runs on CUDA tensors, got {device.type} tensors (CPU runs it only under the "
        "Triton interpreter: TRITON_INTERPRET=1 before spark_me.ops.triton_backend is first imported); "
        "use conv_impl='torch' on CPU"
    )


def resolve_conv_impl(conv_impl: str, device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """The backend that ``conv_impl`` runs on ``device`` for features computed in
    ``dtype``: ``"torch"``, ``"triton"`` or ``"minkowski"``; raises where ``"triton"``
    cannot run on ``device``. ``"auto"`` is ``"triton"`` for :data:`TRITON_DTYPES` on CUDA
    with Triton installed, else ``"torch"``."""
    check_conv_impl(conv_impl)
    if conv_impl == "auto":
        return "triton" if device.type == "cuda" and dtype in TRITON_DTYPES and triton_installed() else "torch"
    if conv_impl == "triton":
        load_triton_backend(device)
    return conv_impl


def compute_dtype(features: torch.Tensor) -> torch.dtype:
    """The autocast dtype where autocast is on for ``features``' device, else their dtype
    (float64 stays float64, as autocast leaves float64 dense layers alone)."""
    device_type = features.device.type
    if features.dtype != torch.float64 and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return features.dtype


def _tap_major(weight: torch.Tensor) -> torch.Tensor:
    """PyTorch ``[out, in, kh, kw]`` -> ``[K, in, out]`` with taps in ``ky*k + kx`` order."""
    return weight.flatten(2).permute(2, 1, 0)


def conv(
    x: ME.SparseTensor, weight: torch.Tensor, stride: int, conv_impl: str, algorithm: str = "auto"
) -> tuple[torch.Tensor, ME.CoordinateMapKey]:
    """Sparse conv of ``x`` with a PyTorch-layout ``weight``; returns (features, output key).
    ``algorithm`` picks the torch backend's gather algorithm (the others ignore it)."""
    kernel_size = weight.shape[-1]
    dtype = compute_dtype(x.F)
    impl = resolve_conv_impl(conv_impl, x.F.device, dtype)
    if kernel_size == 1 and stride == 1:  # pointwise: a plain product, autocast applies itself
        return x.F @ weight.flatten(1).t(), x.coordinate_map_key
    device_type = x.F.device.type
    if impl == "minkowski":
        dtype = torch.float32 if dtype in LOW_PRECISION else dtype
        if x.F.dtype != dtype:
            x = ME.SparseTensor(x.F.to(dtype), coordinate_map_key=x.coordinate_map_key, coordinate_manager=x.coordinate_manager)
        with torch.autocast(device_type, enabled=False):
            return minkowski_backend.sparse_conv(x, _tap_major(weight.to(dtype)).contiguous(), kernel_size, stride)
    tables = neighbour_tables(x, kernel_size, stride)
    with torch.autocast(device_type, enabled=False):
        if impl == "triton":  # no gather algorithms to choose: the kernels gather inside their tiles
            return load_triton_backend(x.F.device).sparse_conv(x.F.to(dtype), weight.to(dtype), tables), tables.out_key
        return torch_backend.sparse_conv(x.F.to(dtype), weight.to(dtype), tables, algorithm), tables.out_key


def depthwise_conv(x: ME.SparseTensor, weight: torch.Tensor, conv_impl: str) -> torch.Tensor:
    """Depthwise stride-1 conv of ``x`` with a PyTorch-layout ``[C, 1, k, k]`` ``weight``."""
    kernel_size = weight.shape[-1]
    dtype = compute_dtype(x.F)
    impl = resolve_conv_impl(conv_impl, x.F.device, dtype)
    device_type = x.F.device.type
    w = weight.to(dtype).flatten(1).t()  # [K, C]
    with torch.autocast(device_type, enabled=False):
        if impl == "minkowski":
            return minkowski_backend.depthwise_conv(x, w.contiguous(), kernel_size).to(dtype)
        tables = neighbour_tables(x, kernel_size, 1)
        backend = load_triton_backend(x.F.device) if impl == "triton" else torch_backend
        return backend.depthwise_conv(x.F.to(dtype), w.contiguous(), tables)


def max_pool(x: ME.SparseTensor, kernel_size: int, stride: int, conv_impl: str) -> tuple[torch.Tensor, ME.CoordinateMapKey]:
    """Max over each output site's existing neighbours; returns (features, output key)."""
    impl = resolve_conv_impl(conv_impl, x.F.device, x.F.dtype)
    if impl == "minkowski":
        if x.F.dtype in LOW_PRECISION:
            x = ME.SparseTensor(x.F.float(), coordinate_map_key=x.coordinate_map_key, coordinate_manager=x.coordinate_manager)
        return minkowski_backend.max_pool(x, kernel_size, stride)
    tables = neighbour_tables(x, kernel_size, stride)
    backend = load_triton_backend(x.F.device) if impl == "triton" else torch_backend
    return backend.gather_max(x.F, tables), tables.out_key


def _triton_for(features: torch.Tensor, conv_impl: str) -> Optional[ModuleType]:
    """The triton backend where ``conv_impl`` resolves to it for ``[N, C]`` ``features`` of
    a dtype it reads, else None (then PyTorch's own op runs)."""
    impl = resolve_conv_impl(conv_impl, features.device, compute_dtype(features))
    if impl == "triton" and features.dtype in TRITON_DTYPES and features.dim() == 2:
        return load_triton_backend(features.device)
    return None


def layer_norm(features: torch.Tensor, normalized_shape: tuple[int, ...], weight: Optional[torch.Tensor],
               bias: Optional[torch.Tensor], eps: float, conv_impl: str = "auto",
               low_precision_output: bool = False) -> torch.Tensor:
    """Layer norm over the channels of ``[N, C]`` features, computed in (at least) float32.

    Its output dtype is autocast's for a dense layer norm, float32 under autocast (else the
    features' dtype), unless ``low_precision_output`` asks for the autocast dtype: for a
    consumer that casts to it anyway (a linear layer, a conv) that is the same values
    without the float32 copy. The triton backend computes it in one kernel from the
    features as they are; the others (and affine-free norms, float64, more than
    ``LAYER_NORM_MAX_CHANNELS`` channels) run ``F.layer_norm``, on a float32 copy under
    autocast (float64 stays float64), whatever ``low_precision_output`` says."""
    device_type = features.device.type
    autocast = torch.is_autocast_enabled(device_type)
    backend = _triton_for(features, conv_impl)
    channels = features.shape[-1]
    if (backend is not None and weight is not None and bias is not None and tuple(normalized_shape) == (channels,)
            and channels <= backend.LAYER_NORM_MAX_CHANNELS):
        out_dtype = features.dtype
        if autocast:
            out_dtype = torch.get_autocast_dtype(device_type) if low_precision_output else torch.float32
        with torch.autocast(device_type, enabled=False):
            return backend.layer_norm(features, weight, bias, eps, out_dtype)
    if not autocast:
        return F.layer_norm(features, normalized_shape, weight, bias, eps)
    with torch.autocast(device_type, enabled=False):
        return F.layer_norm(features.to(torch.promote_types(features.dtype, torch.float32)), normalized_shape,
                            weight, bias, eps)


def linear(features: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
           conv_impl: str = "auto") -> torch.Tensor:
    """``F.linear`` on ``[N, C]`` features, in the autocast dtype under autocast. The triton
    backend's sums its bias gradient in a kernel of its own (PyTorch's sum over the sites
    of a narrow gradient runs far below the GPU's bandwidth) and returns it in the bias's
    dtype without rounding it to the autocast dtype first."""
    backend = _triton_for(features, conv_impl)
    if backend is None or bias is None:
        return F.linear(features, weight, bias)
    dtype = compute_dtype(features)
    with torch.autocast(features.device.type, enabled=False):
        return backend.linear(features.to(dtype), weight.to(dtype), bias)


def add_bias(features: torch.Tensor, bias: torch.Tensor, conv_impl: str = "auto") -> torch.Tensor:
    """``features + bias`` per channel, the bias cast to the features' dtype (a conv's bias);
    the triton backend's sums the bias gradient in a kernel of its own (see :func:`linear`)."""
    backend = _triton_for(features, conv_impl)
    if backend is None:
        return features + bias.to(features.dtype)
    with torch.autocast(features.device.type, enabled=False):
        return backend.add_bias(features, bias)


def layer_scale(features: torch.Tensor, gamma: torch.Tensor, conv_impl: str = "auto") -> torch.Tensor:
    """``features * gamma`` per channel (ConvNeXt's layer scale), in PyTorch's promoted
    dtype; the triton backend's backward gives both gradients from one pass over the
    output gradient and the features."""
    backend = _triton_for(features, conv_impl)
    if backend is None:
        return features * gamma
    with torch.autocast(features.device.type, enabled=False):
        return backend.layer_scale(features, gamma)
