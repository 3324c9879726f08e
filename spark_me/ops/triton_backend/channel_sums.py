"""Per-channel gradient sums as a Triton kernel, and the layers whose backward needs them:
a bias's gradient (:func:`linear`, whose product stays cuBLAS's; :func:`add_bias`) and a
layer scale's (:func:`layer_scale`, whose backward also writes the features' gradient in
the same pass). A program per row split and channel block, a partial per split summed
afterwards (no atomics). PyTorch's own sum over the rows of a narrow ``[N, C]`` gradient
runs far below the GPU's bandwidth (kernels_bench/analysis.md).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from spark_me.ops.triton_backend.common import (
    INTERPRETED,
    SUPPORTED_DTYPES,
    check_device,
    check_operands,
    interpreter_tile,
    on_device,
    partial_splits,
    row_split,
)

# Tiles of COLUMN_SUM_TILE elements, about COLUMN_SUM_PROGRAMS_PER_SM programs per SM over
# the row splits and channel blocks, each writing a [channels] fp32 partial; row splits in
# the interpreter.
COLUMN_SUM_TILE, COLUMN_SUM_PROGRAMS_PER_SM, CPU_COLUMN_SUM_SPLITS = 4096, 8, 4


@triton.jit(do_not_specialize=["n_rows"])  # row counts change every batch
def _column_sums_kernel(
    grad_ptr, x_ptr, scale_ptr, grad_in_ptr, partial_ptr, n_rows, channels,
    PRODUCT: tl.constexpr, INTERPRETER: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Column sums of ``grad`` (``[n_rows, channels]``) over this program's row split (axis 0
    of the grid; axis 1 blocks the channels), in fp32, written as the split's partial
    (zeros where it has no rows). With ``PRODUCT``, the backward of ``x * scale`` (``scale``
    per channel) instead: the sums of ``grad * x`` (the scale's gradient) and, row by row,
    ``grad_in = grad * scale`` in ``grad_in``'s dtype, from one read of ``grad`` and ``x``."""
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cs < channels
    start, end = row_split(n_rows, BLOCK_R, 0)
    acc = tl.full((BLOCK_R, BLOCK_C), 0.0, tl.float32)
    if PRODUCT:
        scale = tl.load(scale_ptr + cs, mask=c_ok, other=0.0).to(tl.float32)
    for r0 in range(start, end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        ok = (rows < end)[:, None] & c_ok[None, :]
        tile = rows.to(tl.int64)[:, None] * channels + cs[None, :]
        g = tl.load(grad_ptr + tile, mask=ok, other=0.0).to(tl.float32)
        if PRODUCT:
            acc += g * tl.load(x_ptr + tile, mask=ok, other=0.0).to(tl.float32)
            tl.store(grad_in_ptr + tile, (g * scale[None, :]).to(grad_in_ptr.dtype.element_ty), mask=ok)
        else:
            acc += g
    out = partial_ptr + tl.program_id(0) * channels + cs
    if INTERPRETER:  # the column sums as a product with ones (16 equal rows; row 0 is stored): no tl.sum here
        first = (tl.arange(0, 16)[:, None] == 0) & c_ok[None, :]
        sums = tl.dot(tl.full((16, BLOCK_R), 1.0, tl.float32), acc, input_precision="ieee")
        tl.store(out[None, :] + 0 * first, sums, mask=first)
    else:
        tl.store(out, tl.sum(acc, axis=0), mask=c_ok)


def column_sums(grad: torch.Tensor, x: Optional[torch.Tensor] = None, scale: Optional[torch.Tensor] = None,
                ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(fp32 ``[C]`` column sums of ``grad`` ``[N, C]``, None), or with ``x`` and ``scale``
    (fp32 column sums of ``grad * x``, ``grad * scale`` in ``x``'s dtype): see
    :func:`_column_sums_kernel`. A kernel pass and a sum over its row splits' partials."""
    n_rows, channels = grad.shape
    product = x is not None
    grad_in = torch.empty_like(x) if product else None
    if n_rows == 0:
        return torch.zeros(channels, dtype=torch.float32, device=grad.device), grad_in
    block_c = 64 if channels % 64 == 0 else 32  # no idle lanes at 96 channels
    block_r = COLUMN_SUM_TILE // block_c
    if INTERPRETED:
        block_r, block_c = interpreter_tile(triton.cdiv(n_rows, 2 * CPU_COLUMN_SUM_SPLITS), 256), 32
    channel_blocks = triton.cdiv(channels, block_c)
    splits = partial_splits(grad.device, triton.cdiv(n_rows, block_r), COLUMN_SUM_PROGRAMS_PER_SM,
                            CPU_COLUMN_SUM_SPLITS, channel_blocks)
    partial = torch.empty(splits, channels, dtype=torch.float32, device=grad.device)
    grad = grad.contiguous()
    operands = (x.contiguous(), scale.contiguous(), grad_in) if product else (grad, grad, grad)
    with on_device(grad):
        _column_sums_kernel[(splits, channel_blocks)](
            grad, *operands, partial, n_rows, channels, PRODUCT=product, INTERPRETER=INTERPRETED, BLOCK_R=block_r,
            BLOCK_C=block_c, num_warps=4,
        )
    return partial.sum(0), grad_in


class TritonLinearFunction(torch.autograd.Function):
    """``features @ weight.T + bias`` (cuBLAS, as ``F.linear``), its bias gradient from
    :func:`column_sums`. The bias arrives in its own dtype (fp32 parameters under
    autocast) and is cast inside, so its gradient is the fp32 sums as they are."""

    @staticmethod
    def forward(ctx, features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor):
        ctx.save_for_backward(features, weight)
        ctx.bias_dtype = bias.dtype
        return torch.addmm(bias.to(features.dtype), features, weight.t())

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        features, weight = ctx.saved_tensors
        grad_in = grad @ weight if ctx.needs_input_grad[0] else None
        grad_w = grad.t() @ features if ctx.needs_input_grad[1] else None
        grad_b = column_sums(grad)[0].to(ctx.bias_dtype) if ctx.needs_input_grad[2] else None
        return grad_in, grad_w, grad_b


def linear(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``F.linear(features, weight, bias)`` on ``[N, C_in]`` features (``weight`` and
    ``features`` of one dtype; ``bias`` any float dtype), the bias gradient summed by a
    Triton kernel: PyTorch's sum over N rows of a narrow gradient runs far below the GPU's
    bandwidth (kernels_bench/analysis.md)."""
    check_operands(features, weight)
    if features.dim() != 2 or bias.shape != (weight.shape[0],):
        raise ValueError(f"linear takes [N, C_in] features and a [C_out] bias, got {tuple(features.shape)} and "
                         f"{tuple(bias.shape)}")
    return TritonLinearFunction.apply(features, weight, bias)


class TritonBiasFunction(torch.autograd.Function):
    """``features + bias`` per channel (the bias cast to the features' dtype, as a conv's
    bias is added), its gradient from :func:`column_sums` in the bias's own dtype."""

    @staticmethod
    def forward(ctx, features: torch.Tensor, bias: torch.Tensor):
        ctx.bias_dtype = bias.dtype
        return features + bias.to(features.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad_b = column_sums(grad)[0].to(ctx.bias_dtype) if ctx.needs_input_grad[1] else None
        return grad, grad_b


class TritonScaleFunction(torch.autograd.Function):
    """``features * scale`` per channel (a layer scale), in the dtype PyTorch's product
    would have; the backward's both gradients from one kernel (:func:`column_sums`)."""

    @staticmethod
    def forward(ctx, features: torch.Tensor, scale: torch.Tensor):
        ctx.save_for_backward(features, scale)
        return features * scale

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        features, scale = ctx.saved_tensors
        grad_scale, grad_in = column_sums(grad, features, scale)
        return grad_in, grad_scale.to(scale.dtype)


def _check_per_channel(features: torch.Tensor, vector: torch.Tensor, what: str) -> None:
    """Raise unless ``features`` are ``[N, C]`` of a supported dtype on a device the kernels
    run on, and ``vector`` is ``[C]``."""
    if features.dim() != 2 or vector.shape != (features.shape[1],):
        raise ValueError(f"{what} takes [N, C] features and a [C] vector, got {tuple(features.shape)} and "
                         f"{tuple(vector.shape)}")
    if features.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"the triton backend computes in {', '.join(map(str, SUPPORTED_DTYPES))}, got "
                         f"{features.dtype}; use conv_impl='torch'")
    check_device(features)


def add_bias(features: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``features + bias.to(features.dtype)`` with the bias gradient summed by a Triton kernel."""
    _check_per_channel(features, bias, "add_bias")
    return TritonBiasFunction.apply(features, bias)


def layer_scale(features: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """``features * gamma`` (per channel), both gradients from one Triton kernel pass."""
    _check_per_channel(features, gamma, "layer_scale")
    return TritonScaleFunction.apply(features, gamma)
