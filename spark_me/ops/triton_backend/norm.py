"""Layer norm over each site's channels (no table) as Triton kernels: a program per tile
of several whole rows normalises them in fp32, reading the features in their dtype and
writing the output in the one asked for (under autocast the caller asks for bf16 where a
linear layer or a conv would cast the float32 output to it anyway); the backward computes
the input grad row by row and sums the parameter gradients per row split, a partial per
split summed afterwards (no atomics).
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
    interpreter_tile,
    on_device,
    partial_splits,
    row_split,
)

# A program's [rows, channels] tile holds about LAYER_NORM_TILE elements (at most
# LAYER_NORM_MAX_ROWS rows); a row is one tile row, so at most LAYER_NORM_MAX_CHANNELS
# channels. The backward's row splits per SM (each writes a [2, channels] fp32 partial),
# and in the interpreter.
LAYER_NORM_TILE, LAYER_NORM_MAX_ROWS, LAYER_NORM_MAX_CHANNELS = 4096, 64, 8192
LAYER_NORM_SPLITS_PER_SM, CPU_LAYER_NORM_SPLITS = 8, 4


@triton.jit
def _row_sums(x, BLOCK_C: tl.constexpr, INTERPRETER: tl.constexpr):
    """The row sums of an fp32 ``[rows, BLOCK_C]`` tile, broadcastable against it: on the
    GPU a ``[rows, 1]`` column; in the interpreter (no ``tl.sum`` there) the product with a
    ``[BLOCK_C, BLOCK_C]`` matrix of ones, whose every column is the row sums."""
    if INTERPRETER:
        sums = tl.dot(x, tl.full((BLOCK_C, BLOCK_C), 1.0, tl.float32), input_precision="ieee")
    else:
        sums = tl.sum(x, axis=1)[:, None]
    return sums


@triton.jit(do_not_specialize=["n_rows"])  # row counts change every batch
def _layer_norm_kernel(
    x_ptr, weight_ptr, bias_ptr, y_ptr, mean_ptr, rstd_ptr, n_rows, channels, eps,
    INTERPRETER: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """``y = (x - mean) * rstd * weight + bias`` over the channels of ``BLOCK_R`` rows, in
    fp32 (two passes over the row tile in registers: the mean, then the centred squares),
    rounded once to ``y``'s dtype; each row's mean and ``rstd`` kept for the backward."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cs = tl.arange(0, BLOCK_C)
    row_ok = rows < n_rows
    c_ok = cs < channels
    ok = row_ok[:, None] & c_ok[None, :]
    tile = rows.to(tl.int64)[:, None] * channels + cs[None, :]
    x = tl.load(x_ptr + tile, mask=ok, other=0.0).to(tl.float32)
    mean = _row_sums(x, BLOCK_C, INTERPRETER) / channels
    centred = tl.where(c_ok[None, :], x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(_row_sums(centred * centred, BLOCK_C, INTERPRETER) / channels + eps)
    w = tl.load(weight_ptr + cs, mask=c_ok, other=0.0).to(tl.float32)
    b = tl.load(bias_ptr + cs, mask=c_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + tile, (centred * rstd * w[None, :] + b[None, :]).to(y_ptr.dtype.element_ty), mask=ok)
    first = row_ok[:, None] & (cs[None, :] == 0)  # one store per row, from column 0
    tl.store(mean_ptr + rows[:, None] + 0 * cs[None, :], mean, mask=first)
    tl.store(rstd_ptr + rows[:, None] + 0 * cs[None, :], rstd, mask=first)


@triton.jit(do_not_specialize=["n_rows"])  # row counts change every batch
def _layer_norm_backward_kernel(
    x_ptr, weight_ptr, grad_ptr, mean_ptr, rstd_ptr, grad_in_ptr, partial_ptr, n_rows, channels,
    INTERPRETER: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """The layer norm's gradients over this program's row split (axis 0 of the grid), in fp32:
    with ``x̂ = (x - mean) * rstd`` and ``h = grad * weight``, the input grad
    ``rstd * (h - x̂ * mean_c(h * x̂) - mean_c(h))`` row by row, and the column sums
    ``Σ grad * x̂`` (weight) and ``Σ grad`` (bias) written as this split's ``[2, channels]``
    partial, zeros where it has no rows: summed over the splits they are the parameter
    gradients, with no atomics, the same on every run."""
    cs = tl.arange(0, BLOCK_C)
    c_ok = cs < channels
    w = tl.load(weight_ptr + cs, mask=c_ok, other=0.0).to(tl.float32)
    start, end = row_split(n_rows, BLOCK_R, 0)
    acc_w = tl.full((BLOCK_R, BLOCK_C), 0.0, tl.float32)
    acc_b = tl.full((BLOCK_R, BLOCK_C), 0.0, tl.float32)
    for r0 in range(start, end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        row_ok = rows < end
        ok = row_ok[:, None] & c_ok[None, :]
        tile = rows.to(tl.int64)[:, None] * channels + cs[None, :]
        x = tl.load(x_ptr + tile, mask=ok, other=0.0).to(tl.float32)
        g = tl.load(grad_ptr + tile, mask=ok, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        x_hat = tl.where(ok, (x - mean[:, None]) * rstd[:, None], 0.0)
        h = g * w[None, :]  # zero outside the tile's rows and channels: g loaded zeros there
        mean_hx = _row_sums(h * x_hat, BLOCK_C, INTERPRETER) / channels
        mean_h = _row_sums(h, BLOCK_C, INTERPRETER) / channels
        grad_in = (h - x_hat * mean_hx - mean_h) * rstd[:, None]
        tl.store(grad_in_ptr + tile, grad_in.to(grad_in_ptr.dtype.element_ty), mask=ok)
        acc_w += g * x_hat
        acc_b += g
    out = partial_ptr + tl.program_id(0) * 2 * channels + cs
    if INTERPRETER:  # the column sums as a product with ones (16 equal rows; row 0 is stored): no tl.sum here
        ones = tl.full((16, BLOCK_R), 1.0, tl.float32)
        first = (tl.arange(0, 16)[:, None] == 0) & c_ok[None, :]
        tl.store(out[None, :] + 0 * first, tl.dot(ones, acc_w, input_precision="ieee"), mask=first)
        tl.store(out[None, :] + channels + 0 * first, tl.dot(ones, acc_b, input_precision="ieee"), mask=first)
    else:
        tl.store(out, tl.sum(acc_w, axis=0), mask=c_ok)
        tl.store(out + channels, tl.sum(acc_b, axis=0), mask=c_ok)


def layer_norm_tiles(n_rows: int, channels: int, interpreted: bool = INTERPRETED) -> tuple[int, int, int]:
    """(rows, channels, warps) of a layer norm tile: every channel (padded to a power of
    two) of ``LAYER_NORM_TILE // channels`` rows, so that a program moves a few thousand
    elements however few the channels are (one row per program would leave most lanes idle
    at ConvNeXt's 96). The interpreter's: 16+ rows (``tl.dot``), a few large tiles."""
    block_c = triton.next_power_of_2(channels)
    if interpreted:
        return interpreter_tile(n_rows, 256), max(16, block_c), 4
    block_r = max(1, min(LAYER_NORM_MAX_ROWS, LAYER_NORM_TILE // block_c))
    return block_r, block_c, max(4, min(16, block_r * block_c // 512))  # 16 elements a thread, 8 warps at 4096


def layer_norm_forward(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                       out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(``[N, C]`` output in ``out_dtype``, fp32 per-row means, fp32 per-row ``rstd``) of a
    layer norm over the channels of ``features`` (any of :data:`SUPPORTED_DTYPES`; the
    parameters may be another), computed in fp32."""
    n_rows, channels = features.shape
    out = torch.empty(n_rows, channels, dtype=out_dtype, device=features.device)
    mean = torch.empty(n_rows, dtype=torch.float32, device=features.device)
    rstd = torch.empty_like(mean)
    if n_rows == 0:
        return out, mean, rstd
    block_r, block_c, warps = layer_norm_tiles(n_rows, channels)
    with on_device(features):
        _layer_norm_kernel[(triton.cdiv(n_rows, block_r),)](
            features.contiguous(), weight.contiguous(), bias.contiguous(), out, mean, rstd, n_rows, channels, eps,
            INTERPRETER=INTERPRETED, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=warps,
        )
    return out, mean, rstd


def layer_norm_backward(features: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                        grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input grad in ``features``' dtype, fp32 weight grad, fp32 bias grad) of
    :func:`layer_norm_forward`, from one kernel and a sum over its row splits."""
    n_rows, channels = features.shape
    grad_in = torch.empty_like(features)
    if n_rows == 0:
        zeros = torch.zeros(channels, dtype=torch.float32, device=features.device)
        return grad_in, zeros, zeros.clone()
    block_r, block_c, warps = layer_norm_tiles(n_rows, channels)
    splits = partial_splits(features.device, triton.cdiv(n_rows, block_r), LAYER_NORM_SPLITS_PER_SM,
                            CPU_LAYER_NORM_SPLITS)
    partial = torch.empty(splits, 2, channels, dtype=torch.float32, device=features.device)
    with on_device(features):
        _layer_norm_backward_kernel[(splits,)](
            features.contiguous(), weight.contiguous(), grad.contiguous(), mean, rstd, grad_in, partial, n_rows,
            channels, INTERPRETER=INTERPRETED, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=warps,
        )
    grad_w, grad_b = partial.sum(0)
    return grad_in, grad_w, grad_b


class TritonLayerNormFunction(torch.autograd.Function):
    """Layer norm over the channels of ``[N, C]`` features; keeps the input (in its own
    dtype), the weight and the per-row statistics for the backward."""

    @staticmethod
    def forward(ctx, features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                out_dtype: torch.dtype):
        out, mean, rstd = layer_norm_forward(features, weight, bias, eps, out_dtype)
        ctx.save_for_backward(features, weight, mean, rstd)
        ctx.bias_dtype = bias.dtype
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        features, weight, mean, rstd = ctx.saved_tensors
        grad_in, grad_w, grad_b = layer_norm_backward(features, weight, mean, rstd, grad)
        return grad_in, grad_w.to(weight.dtype), grad_b.to(ctx.bias_dtype), None, None


def layer_norm(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
               out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``F.layer_norm(features, (C,), weight, bias, eps)`` per site (``features`` ``[N, C]``)
    computed in fp32 whatever the dtypes, the output rounded once to ``out_dtype``
    (default: ``features``' dtype)."""
    if features.dim() != 2 or weight.shape != (features.shape[1],) or bias.shape != weight.shape:
        raise ValueError(f"layer_norm takes [N, C] features with [C] weight and bias, got {tuple(features.shape)}, "
                         f"{tuple(weight.shape)} and {tuple(bias.shape)}")
    if features.dtype not in SUPPORTED_DTYPES or (out_dtype or features.dtype) not in SUPPORTED_DTYPES:
        raise ValueError(f"the triton layer norm reads and writes {', '.join(map(str, SUPPORTED_DTYPES))}, got "
                         f"{features.dtype} -> {out_dtype}; use conv_impl='torch'")
    check_device(features)
    if features.shape[1] > LAYER_NORM_MAX_CHANNELS:
        raise ValueError(f"the triton layer norm holds a row in registers: at most {LAYER_NORM_MAX_CHANNELS} "
                         f"channels, got {features.shape[1]}; use conv_impl='torch'")
    return TritonLayerNormFunction.apply(features, weight, bias, eps, out_dtype or features.dtype)
