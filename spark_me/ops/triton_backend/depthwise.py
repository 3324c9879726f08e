"""Depthwise submanifold convolution (stride 1, odd kernel) as Triton kernels on
neighbour tables.

* forward (and the input grad where autograd wants it alone): a program per (row block,
  channel block) loops over taps with gathered loads and fp32 products, a few taps
  unrolled where the autotuner finds that faster;
* backward, both gradients in one pass (:func:`depthwise_backward`): a program per (row
  split, channel block) gathers the output gradient through the table once per tap, for
  the input grad (mirrored taps) and, times the input rows read in place, for the weight
  grad, whose per-tap column sums it keeps in registers and writes once as its split's
  partial; a sum over the splits gives the weight grad, with no atomics, the same bits on
  every run;
* the weight grad alone (or a kernel past ``FUSED_DEPTHWISE_MAX_TAPS`` taps): a program
  per (tap, channel block, row split) with atomics, as the conv's.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from spark_me.ops.tables import NeighbourTables
from spark_me.ops.triton_backend.common import (
    INTERPRETED,
    atomic_splits,
    check_operands,
    interpreter_tile,
    on_device,
    partial_splits,
    row_split,
)

# Row splits of the fused backward per SM (at 64 channels a program; each split writes a
# [taps, channels] fp32 partial), and in the interpreter.
DEPTHWISE_SPLITS_PER_SM, CPU_DEPTHWISE_SPLITS = 8, 4
# The fused backward's register accumulator has a row per tap (padded to a power of two);
# past this many taps (a kernel larger than 7×7) the backward runs the two kernels.
FUSED_DEPTHWISE_MAX_TAPS = 64


@triton.jit
def _depthwise_tap(src_ptr, table_ptr, weight_ptr, t, rows, cs, row_ok, c_ok, n_src, n_dst, channels, TAPS):
    """Tap ``t``'s operands of a depthwise kernel, in fp32: the ``[rows, cs]`` tile of
    ``src`` gathered through ``table[t]`` (zeros for the sentinel ``n_src``) and the
    ``cs`` entries of ``weight[t]``; both zeros for a tap past ``TAPS``."""
    tap_ok = t < TAPS
    idx = tl.load(table_ptr + t * n_dst + rows, mask=row_ok & tap_ok, other=n_src)
    present = idx < n_src
    x = tl.load(src_ptr + idx.to(tl.int64)[:, None] * channels + cs[None, :],
                mask=present[:, None] & c_ok[None, :], other=0.0)
    w = tl.load(weight_ptr + t * channels + cs, mask=c_ok & tap_ok, other=0.0)
    return x.to(tl.float32), w.to(tl.float32)


@triton.jit(do_not_specialize=["n_src", "n_dst"])  # row counts change every batch
def _depthwise_kernel(
    src_ptr, table_ptr, weight_ptr, out_ptr, n_src, n_dst, channels,
    TAPS: tl.constexpr, UNROLL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """``out[o, c] = Σ_t src[table[t, o], c] · weight[t, c]`` in fp32. The tap loop steps
    ``UNROLL`` taps at a time, unrolled, so that the compiler may issue their independent
    table and gathered loads before their products (taps one by one, each waits on its
    table load and then on its gathered load); a tap past ``TAPS`` loads nothing."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rows < n_dst
    c_ok = cs < channels
    acc = tl.full((BLOCK_M, BLOCK_C), 0.0, tl.float32)
    for t0 in range(0, TAPS, UNROLL):
        for u in tl.static_range(UNROLL):
            x, w = _depthwise_tap(src_ptr, table_ptr, weight_ptr, t0 + u, rows, cs, row_ok, c_ok, n_src, n_dst,
                                  channels, TAPS)
            acc += x * w[None, :]
    out = out_ptr + rows.to(tl.int64)[:, None] * channels + cs[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & c_ok[None, :])


@triton.jit(do_not_specialize=["n_src", "n_dst"])  # row counts change every batch
def _depthwise_weight_grad_kernel(
    src_ptr, table_ptr, grad_ptr, gw_ptr, n_src, n_dst, channels,
    INTERPRETER: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """``gw[t, c] += Σ_o src[table[t, o], c] · grad[o, c]`` over this program's row split
    (``gw`` fp32 ``[taps, channels]``; axis 1 of the grid splits the rows)."""
    n_cb = (channels + BLOCK_C - 1) // BLOCK_C
    t = tl.program_id(0) // n_cb
    cs = tl.program_id(0) % n_cb * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cs < channels
    start, end = row_split(n_dst, BLOCK_R, 1)
    acc = tl.full((BLOCK_R, BLOCK_C), 0.0, tl.float32)
    for r0 in range(start, end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        row_ok = rows < end
        idx = tl.load(table_ptr + t * n_dst + rows, mask=row_ok, other=n_src)
        present = idx < n_src
        g = tl.load(grad_ptr + rows.to(tl.int64)[:, None] * channels + cs[None, :],
                    mask=row_ok[:, None] & c_ok[None, :], other=0.0)
        x = tl.load(src_ptr + idx.to(tl.int64)[:, None] * channels + cs[None, :],
                    mask=present[:, None] & c_ok[None, :], other=0.0)
        acc += x.to(tl.float32) * g.to(tl.float32)
    if INTERPRETER:  # the column sums as a product with ones: the interpreter has no tl.sum
        ones = tl.full((16, BLOCK_R), 1.0, tl.float32)
        sums = tl.dot(ones, acc, input_precision="ieee")  # 16 equal rows; row 0 is added
        first = tl.arange(0, 16)[:, None] == 0
        tl.atomic_add(gw_ptr + t * channels + cs[None, :] + 0 * first, sums, mask=first & c_ok[None, :])
    else:
        tl.atomic_add(gw_ptr + t * channels + cs, tl.sum(acc, axis=0), mask=c_ok)


@triton.jit(do_not_specialize=["n_rows"])  # row counts change every batch
def _depthwise_backward_kernel(
    x_ptr, table_ptr, grad_ptr, weight_ptr, grad_in_ptr, partial_ptr, n_rows, channels,
    TAPS: tl.constexpr, UNROLL: tl.constexpr, INTERPRETER: tl.constexpr, TAPS_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Both gradients of a depthwise submanifold conv from one gathered read of ``grad``.

    With ``g_t[i] = grad[table[t, i]]`` (the forward table, square: stride 1),
    ``grad_in[i] = Σ_t g_t[i] ⊙ weight[t]`` (``weight``: the taps mirrored) and
    ``partial[s, t] = Σ_i x[i] ⊙ g_t[i]`` over row split ``s`` (axis 0 of the grid), which
    summed over the splits is the weight gradient of tap ``TAPS - 1 - t``. Every program
    writes its whole ``[TAPS, BLOCK_C]`` slice of ``partial`` (zeros where it has no rows),
    so the result needs no atomics and no zeroed buffer, and is the same on every run.
    The tap loop steps ``UNROLL`` taps at a time, unrolled (see :func:`_depthwise_kernel`).
    """
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cs < channels
    tap_ids = tl.arange(0, TAPS_PAD)
    start, end = row_split(n_rows, BLOCK_M, 0)
    acc_w = tl.full((TAPS_PAD, BLOCK_C), 0.0, tl.float32)
    for r0 in range(start, end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        row_ok = rows < end
        tile = rows.to(tl.int64)[:, None] * channels + cs[None, :]
        x = tl.load(x_ptr + tile, mask=row_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
        acc = tl.full((BLOCK_M, BLOCK_C), 0.0, tl.float32)
        for t0 in range(0, TAPS, UNROLL):
            for u in tl.static_range(UNROLL):
                t = t0 + u
                g, w = _depthwise_tap(grad_ptr, table_ptr, weight_ptr, t, rows, cs, row_ok, c_ok, n_rows, n_rows,
                                      channels, TAPS)
                acc += g * w[None, :]
                if INTERPRETER:  # the column sums into row t as a product with a one-hot: no tl.sum here
                    one_hot = ((tap_ids[:, None] == t) & (rows[None, :] >= 0)).to(tl.float32)
                    acc_w = tl.dot(one_hot, g * x, acc_w, input_precision="ieee")
                else:  # (a tap past TAPS adds zeros to a row that is not stored)
                    acc_w += tl.where(tap_ids[:, None] == t, tl.sum(g * x, axis=0)[None, :], 0.0)
        tl.store(grad_in_ptr + tile, acc.to(grad_in_ptr.dtype.element_ty), mask=row_ok[:, None] & c_ok[None, :])
    slice_ = partial_ptr + tl.program_id(0) * TAPS * channels + tap_ids[:, None] * channels + cs[None, :]
    tl.store(slice_, acc_w, mask=(tap_ids[:, None] < TAPS) & c_ok[None, :])


# The depthwise forward (and the input grad where autograd wants it alone): tile shapes with
# the tap loop one tap at a time or a few unrolled (_depthwise_kernel's UNROLL). One at a
# time, every tap waits for its table load and then its gathered load; unrolled, the
# compiler may issue several taps' loads ahead, at the cost of registers (in bf16, by ptxas
# for sm_90: 48 a thread one tap at a time, 66-172 unrolled, no spills; a whole 7×7
# unrolled spills). BLOCK_C 32 leaves no lanes idle at ConvNeXt's 96 channels. The
# autotuner picks per (channels, taps).
FORWARD_CONFIGS = [
    triton.Config({"BLOCK_M": m, "BLOCK_C": c, "UNROLL": unroll}, num_warps=warps, num_stages=3)
    for m, c, warps, unroll in ((32, 64, 4, 1), (64, 32, 4, 1), (32, 64, 4, 7), (64, 32, 2, 7), (32, 64, 4, 4),
                                (64, 64, 4, 4))
]
# The depthwise weight grad alone: fixed tiles.
DEPTHWISE_BLOCK_C, DEPTHWISE_BLOCK_R = 64, 64
# The fused depthwise backward holds a [taps (padded to 64), BLOCK_C] fp32 accumulator of
# the weight grad besides its tiles: 64-138 registers a thread at these configs in bf16
# (ptxas, sm_90, no spills), so fewer programs fit on an SM than the forward's rolled loop
# (48). Longer row tiles spread the per-tap column sums (a reduction across warps) over more
# rows; more warps share the accumulator; unrolled taps issue their loads ahead. The
# autotuner picks.
BACKWARD_CONFIGS = [
    triton.Config({"BLOCK_M": m, "BLOCK_C": c, "UNROLL": unroll}, num_warps=warps, num_stages=2)
    for m, c, warps, unroll in ((32, 64, 4, 1), (64, 64, 8, 1), (64, 64, 16, 1), (32, 128, 8, 1), (32, 32, 2, 1),
                                (64, 32, 4, 1), (32, 64, 4, 4), (64, 64, 8, 4), (64, 32, 4, 7), (64, 64, 16, 7))
]
tuned_depthwise = triton.autotune(configs=FORWARD_CONFIGS, key=["channels", "TAPS"])(_depthwise_kernel)
tuned_depthwise_backward = triton.autotune(configs=BACKWARD_CONFIGS, key=["channels", "TAPS"])(
    _depthwise_backward_kernel
)


def depthwise_forward(src: torch.Tensor, weight: torch.Tensor, table: torch.Tensor,
                      config: Optional[triton.Config] = None) -> torch.Tensor:
    """``out[o] = Σ_t src[table[t, o]] ⊙ weight[t]`` in fp32, rounded to ``src``'s dtype.
    ``config``: these tiles instead of the autotuned ones (tests, kernels_bench)."""
    taps, n_dst = table.shape
    channels = src.shape[1]
    out = src.new_empty(n_dst, channels)
    if n_dst == 0:
        return out

    def grid(meta: dict) -> tuple[int, int]:
        return triton.cdiv(n_dst, meta["BLOCK_M"]), triton.cdiv(channels, meta["BLOCK_C"])

    args = (src.contiguous(), table.contiguous(), weight.contiguous(), out, len(src), n_dst, channels)
    with on_device(src):
        if INTERPRETED:
            meta = config.kwargs if config is not None else {
                "BLOCK_M": interpreter_tile(n_dst, 1024), "BLOCK_C": interpreter_tile(channels, 128), "UNROLL": 1}
            _depthwise_kernel[grid(meta)](*args, TAPS=taps, **meta)
        elif config is not None:
            _depthwise_kernel[grid(config.kwargs)](*args, TAPS=taps, **config.kwargs, num_warps=config.num_warps,
                                                   num_stages=config.num_stages)
        else:
            tuned_depthwise[grid](*args, TAPS=taps)
    return out


def depthwise_weight_grad(src: torch.Tensor, table: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """fp32 ``[K, C]``: ``Σ_o src[table[t, o]] ⊙ grad[o]`` for every tap ``t``."""
    taps, n_dst = table.shape
    channels = src.shape[1]
    gw = torch.zeros(taps, channels, dtype=torch.float32, device=src.device)
    if n_dst == 0:
        return gw
    block_r, block_c = DEPTHWISE_BLOCK_R, DEPTHWISE_BLOCK_C
    if INTERPRETED:
        block_r, block_c = interpreter_tile(n_dst, 1024), interpreter_tile(channels, 128)
    tiles = taps * triton.cdiv(channels, block_c)
    grid = (tiles, atomic_splits(src.device, tiles, triton.cdiv(n_dst, block_r)))
    with on_device(src):
        _depthwise_weight_grad_kernel[grid](
            src.contiguous(), table.contiguous(), grad.contiguous(), gw, len(src), n_dst, channels,
            INTERPRETER=INTERPRETED, BLOCK_R=block_r, BLOCK_C=block_c,
        )
    return gw


def depthwise_backward(
    features: torch.Tensor, weight: torch.Tensor, table: torch.Tensor, grad: torch.Tensor,
    config: Optional[triton.Config] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input grad in ``grad``'s dtype, fp32 weight grad ``[K, C]``) of the depthwise conv
    ``out[o] = Σ_t features[table[t, o]] ⊙ weight[t]`` (stride 1, odd kernel) in one kernel.

    The input grad gathers ``grad`` through the table with the taps mirrored (the table is
    its own transpose); the weight grad of tap ``K-1-t`` is ``Σ_i features[i] ⊙ grad[table[t, i]]``,
    the same gathered rows times ``features`` read in place. So per tap and row tile one
    gathered tile of ``grad`` serves both gradients, where :func:`depthwise_forward` and
    :func:`depthwise_weight_grad` load three: the gathered ``grad``, the gathered
    ``features``, and ``grad`` itself.
    ``config``: these tiles instead of the autotuned ones (tests, kernels_bench)."""
    taps, n_rows = table.shape
    channels = features.shape[1]
    grad_in = grad.new_empty(n_rows, channels)
    if n_rows == 0:
        return grad_in, torch.zeros(taps, channels, dtype=torch.float32, device=features.device)
    # each split at least 64 rows, a program per 64 channels
    splits = partial_splits(features.device, triton.cdiv(n_rows, 64), DEPTHWISE_SPLITS_PER_SM, CPU_DEPTHWISE_SPLITS,
                            triton.cdiv(channels, 64))
    partial = torch.empty(splits, taps, channels, dtype=torch.float32, device=features.device)
    taps_pad = max(16, triton.next_power_of_2(taps))  # tl.dot (interpreter) wants 16 rows at least

    def grid(meta: dict) -> tuple[int, int]:
        return splits, triton.cdiv(channels, meta["BLOCK_C"])

    args = (features.contiguous(), table.contiguous(), grad.contiguous(), weight.flip(0).contiguous(), grad_in,
            partial, n_rows, channels)
    with on_device(features):
        if INTERPRETED:  # by default two row tiles per split on the tests' sizes
            meta = config.kwargs if config is not None else {
                "BLOCK_M": interpreter_tile(triton.cdiv(n_rows, 2 * splits), 256),
                "BLOCK_C": interpreter_tile(channels, 128), "UNROLL": 1}
            _depthwise_backward_kernel[grid(meta)](*args, TAPS=taps, INTERPRETER=True, TAPS_PAD=taps_pad, **meta)
        elif config is not None:
            _depthwise_backward_kernel[grid(config.kwargs)](*args, TAPS=taps, INTERPRETER=False, TAPS_PAD=taps_pad,
                                                            **config.kwargs, num_warps=config.num_warps,
                                                            num_stages=config.num_stages)
        else:
            tuned_depthwise_backward[grid](*args, TAPS=taps, INTERPRETER=False, TAPS_PAD=taps_pad)
    return grad_in, partial.sum(0).flip(0)


class TritonDepthwiseFunction(torch.autograd.Function):
    """Depthwise submanifold conv (stride 1, odd kernel). Backward: both gradients from
    :func:`depthwise_backward` (up to ``FUSED_DEPTHWISE_MAX_TAPS`` taps); one of them
    alone, or a larger kernel's, from each gradient's own kernel."""

    @staticmethod
    def forward(ctx, features: torch.Tensor, weight: torch.Tensor, tables: NeighbourTables):
        ctx.save_for_backward(features, weight)
        ctx.tables = tables
        return depthwise_forward(features, weight, tables.forward)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        features, weight = ctx.saved_tensors
        table = ctx.tables.forward
        grad = grad.contiguous()
        need_in, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if need_in and need_w and len(table) <= FUSED_DEPTHWISE_MAX_TAPS:
            grad_in, grad_w = depthwise_backward(features, weight, table, grad)
            return grad_in, grad_w.to(weight.dtype), None
        grad_in = depthwise_forward(grad, weight.flip(0), table) if need_in else None
        grad_w = depthwise_weight_grad(features, table, grad).to(weight.dtype) if need_w else None
        return grad_in, grad_w, None


def depthwise_conv(features: torch.Tensor, weight: torch.Tensor, tables: NeighbourTables) -> torch.Tensor:
    """Depthwise conv: ``features`` ``[N, C]``, ``weight`` ``[K, C]`` (PyTorch tap order)."""
    check_operands(features, weight)
    if tables.stride != 1 or tables.kernel_size % 2 == 0:
        raise ValueError(
            f"the depthwise conv is submanifold (stride 1, odd kernel), got {tables.kernel_size}/{tables.stride}"
        )
    return TritonDepthwiseFunction.apply(features, weight, tables)
