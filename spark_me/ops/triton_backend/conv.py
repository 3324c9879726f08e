"""Sparse convolution as a fused Triton implicit GEMM on neighbour tables: the gathered
rows are read inside the tile loads, no ``[N, K·C]`` copy anywhere.

* forward: a program per ``[BLOCK_M rows × BLOCK_N output channels]`` tile loops over
  taps and ``BLOCK_K`` input-channel blocks (nested, or as one flat loop that Triton
  pipelines across taps: the autotuner picks), loads the input tile gathered through
  ``table[t, rows]`` and the weight tile of tap ``t``, and accumulates ``tl.dot`` in fp32;
* input grad: the same kernel on ``grad``: stride 1 (odd kernel) with the forward table
  and the taps mirrored (``W[K-1-t]``); strided with the inverse table
  (:func:`inverse_table`, built once per tables object) and the taps as they are;
* weight grad: a program per (tap, ``C_out`` block, ``C_in`` block, row split) reduces
  ``g[o]ᵀ · x[T[t, o]]`` over its rows in fp32 and adds its tile to an fp32 buffer with
  ``tl.atomic_add``. Splitting the rows keeps the GPU busy where channels are few (64×64×9
  is 9 tiles; ResNet-50's stage 1 needs hundreds of programs); without a split the partial
  sums would need a buffer per split sized by the tile config. The order of the atomic
  adds varies, so the last bits of the weight grad do too, as with the ``index_add_`` of
  the torch backend on CUDA; under ``torch.use_deterministic_algorithms(True)`` one split
  per tile keeps it exact.
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
    row_split,
)


@triton.jit
def _gather_gemm_step(
    acc, src_ptr, idx, weight_ptr, n_src, c_in, c_out, t, k0, cols, col_ok, ks, INTERPRETER: tl.constexpr,
):
    """``acc += src[idx, k0:k0+BLOCK_K] · weight[t, k0:k0+BLOCK_K, cols]`` (``idx``: tap
    ``t``'s table entries of the tile's rows, ``n_src`` where absent)."""
    present = idx < n_src
    k = k0 + ks
    k_ok = k < c_in
    a = tl.load(src_ptr + idx.to(tl.int64)[:, None] * c_in + k[None, :], mask=present[:, None] & k_ok[None, :],
                other=0.0)
    b = tl.load(weight_ptr + t * c_in * c_out + k[:, None] * c_out + cols[None, :],
                mask=k_ok[:, None] & col_ok[None, :], other=0.0)
    if INTERPRETER:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if a.dtype == tl.float32:  # exact fp32 products, not TF32
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit(do_not_specialize=["n_src", "n_dst"])  # row counts change every batch
def _gather_gemm_kernel(
    src_ptr, table_ptr, weight_ptr, out_ptr, n_src, n_dst, c_in, c_out, taps,
    INTERPRETER: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    FLAT: tl.constexpr,
):
    """``out[o] = Σ_t src[table[t, o]] · weight[t]``: src ``[n_src, c_in]``, table
    ``[taps, n_dst]`` (sentinel ``n_src``), weight ``[taps, c_in, c_out]``.

    ``FLAT``: one loop over every (tap, channel block) pair instead of a loop over channel
    blocks inside a loop over taps. Triton software-pipelines a loop's tile loads over its
    iterations; with few channel blocks per tap (64 input channels and BLOCK_K 64: one) the
    nested form's inner loop is too short to keep ``num_stages`` loads in flight, where the
    flat one pipelines across taps. The autotuner times both forms (the configs carry
    ``FLAT``).
    """
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < n_dst
    col_ok = cols < c_out
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    if FLAT:  # the tap's table entries are read again per channel block (cached, BLOCK_M ints)
        k_blocks = (c_in + BLOCK_K - 1) // BLOCK_K
        for i in range(taps * k_blocks):
            t = i // k_blocks
            idx = tl.load(table_ptr + t * n_dst + rows, mask=row_ok, other=n_src)
            acc = _gather_gemm_step(acc, src_ptr, idx, weight_ptr, n_src, c_in, c_out, t, (i - t * k_blocks) * BLOCK_K,
                                    cols, col_ok, ks, INTERPRETER)
    else:
        for t in range(taps):
            idx = tl.load(table_ptr + t * n_dst + rows, mask=row_ok, other=n_src)
            for k0 in range(0, c_in, BLOCK_K):
                acc = _gather_gemm_step(acc, src_ptr, idx, weight_ptr, n_src, c_in, c_out, t, k0, cols, col_ok, ks,
                                        INTERPRETER)
    out = out_ptr + rows.to(tl.int64)[:, None] * c_out + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit(do_not_specialize=["n_src", "n_dst"])  # row counts change every batch
def _weight_grad_kernel(
    src_ptr, table_ptr, grad_ptr, gw_ptr, n_src, n_dst, c_in, c_out,
    INTERPRETER: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """``gw[t] += Σ_o grad[o]ᵀ · src[table[t, o]]`` over this program's row split:
    ``gw`` fp32 ``[taps, c_out, c_in]``, axis 1 of the grid splits the rows."""
    n_co = (c_out + BLOCK_CO - 1) // BLOCK_CO
    n_ci = (c_in + BLOCK_CI - 1) // BLOCK_CI
    pid = tl.program_id(0)
    t = pid // (n_co * n_ci)
    co = (pid // n_ci) % n_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    ci = pid % n_ci * BLOCK_CI + tl.arange(0, BLOCK_CI)
    co_ok = co < c_out
    ci_ok = ci < c_in
    start, end = row_split(n_dst, BLOCK_R, 1)
    acc = tl.full((BLOCK_CO, BLOCK_CI), 0.0, tl.float32)
    for r0 in range(start, end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        row_ok = rows < end
        idx = tl.load(table_ptr + t * n_dst + rows, mask=row_ok, other=n_src)
        present = idx < n_src
        g = tl.load(grad_ptr + rows.to(tl.int64)[:, None] * c_out + co[None, :],
                    mask=row_ok[:, None] & co_ok[None, :], other=0.0)
        x = tl.load(src_ptr + idx.to(tl.int64)[:, None] * c_in + ci[None, :],
                    mask=present[:, None] & ci_ok[None, :], other=0.0)
        if INTERPRETER:
            g = g.to(tl.float32)
            x = x.to(tl.float32)
        if x.dtype == tl.float32:  # exact fp32 products, not TF32
            acc = tl.dot(tl.trans(g), x, acc, input_precision="ieee")
        else:
            acc = tl.dot(tl.trans(g), x, acc)
    gw = gw_ptr + t * c_out * c_in + co[:, None] * c_in + ci[None, :]
    tl.atomic_add(gw, acc, mask=co_ok[:, None] & ci_ok[None, :])


# Each tile shape in both loop forms (_gather_gemm_kernel's FLAT): the autotuner keeps the
# fastest per (c_in, c_out, taps), so a shape runs the flat form only where it timed faster.
GEMM_CONFIGS = [
    triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "FLAT": flat}, num_warps=warps, num_stages=3)
    for flat in (False, True)
    for m, n, k, warps in ((64, 64, 32, 4), (128, 64, 32, 4), (128, 128, 32, 8), (128, 128, 64, 8))
]
WEIGHT_GRAD_CONFIGS = [
    triton.Config({"BLOCK_CO": 64, "BLOCK_CI": 64, "BLOCK_R": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_CO": 128, "BLOCK_CI": 64, "BLOCK_R": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_CO": 128, "BLOCK_CI": 128, "BLOCK_R": 32}, num_warps=8, num_stages=3),
]
tuned_gather_gemm = triton.autotune(configs=GEMM_CONFIGS, key=["c_in", "c_out", "taps"])(_gather_gemm_kernel)
tuned_weight_grad = triton.autotune(configs=WEIGHT_GRAD_CONFIGS, key=["c_in", "c_out"], reset_to_zero=["gw_ptr"])(
    _weight_grad_kernel
)


def gather_gemm(
    src: torch.Tensor, table: torch.Tensor, weight: torch.Tensor, n_dst: int, config: Optional[triton.Config] = None,
) -> torch.Tensor:
    """``out[o] = Σ_t src[table[t, o]] · weight[t]`` (``weight`` ``[K, C_in, C_out]``, sentinel
    ``len(src)``) -> ``[n_dst, C_out]`` in ``src``'s dtype, accumulated in fp32.

    ``config``: run these tiles and loop form instead of the autotuned ones (tests run every
    config of ``GEMM_CONFIGS``, in the interpreter too; without one the interpreter runs
    the flat form on tiles sized to the problem)."""
    taps, c_in, c_out = weight.shape
    out = src.new_empty(n_dst, c_out)
    if n_dst == 0:
        return out
    if len(src) == 0 or c_in == 0:
        return out.zero_()
    src, table, weight = src.contiguous(), table.contiguous(), weight.contiguous()

    def grid(meta: dict) -> tuple[int, int]:
        return triton.cdiv(n_dst, meta["BLOCK_M"]), triton.cdiv(c_out, meta["BLOCK_N"])

    args = (src, table, weight, out, len(src), n_dst, c_in, c_out, taps)
    with on_device(src):
        if INTERPRETED:
            meta = config.kwargs if config is not None else {
                "BLOCK_M": interpreter_tile(n_dst, 1024), "BLOCK_N": interpreter_tile(c_out, 256),
                "BLOCK_K": interpreter_tile(c_in, 128), "FLAT": True}
            _gather_gemm_kernel[grid(meta)](*args, INTERPRETER=INTERPRETED, **meta)
        elif config is not None:
            _gather_gemm_kernel[grid(config.kwargs)](*args, INTERPRETER=INTERPRETED, **config.kwargs,
                                                     num_warps=config.num_warps, num_stages=config.num_stages)
        else:
            tuned_gather_gemm[grid](*args, INTERPRETER=INTERPRETED)
    return out


def gather_weight_grad(src: torch.Tensor, table: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """fp32 ``[K, C_out, C_in]``: ``Σ_o grad[o]ᵀ · src[table[t, o]]`` for every tap ``t``."""
    taps, n_dst = table.shape
    c_in, c_out = src.shape[1], grad.shape[1]
    gw = torch.zeros(taps, c_out, c_in, dtype=torch.float32, device=src.device)
    if n_dst == 0 or len(src) == 0:
        return gw
    src, table, grad = src.contiguous(), table.contiguous(), grad.contiguous()

    def grid(meta: dict) -> tuple[int, int]:
        tiles = taps * triton.cdiv(c_out, meta["BLOCK_CO"]) * triton.cdiv(c_in, meta["BLOCK_CI"])
        return tiles, atomic_splits(src.device, tiles, triton.cdiv(n_dst, meta["BLOCK_R"]))

    args = (src, table, grad, gw, len(src), n_dst, c_in, c_out)
    with on_device(src):
        if INTERPRETED:
            meta = {"BLOCK_CO": interpreter_tile(c_out, 256), "BLOCK_CI": interpreter_tile(c_in, 128),
                    "BLOCK_R": interpreter_tile(n_dst, 1024)}
            _weight_grad_kernel[grid(meta)](*args, INTERPRETER=INTERPRETED, **meta)
        else:
            tuned_weight_grad[grid](*args, INTERPRETER=INTERPRETED)
    return gw


def inverse_table(tables: NeighbourTables) -> torch.Tensor:
    """``[K, n_in]``: the output row ``o`` with ``forward[t, o] == i``, else ``n_out``.

    For a fixed tap each input row feeds at most one output row (the output site is the
    input site minus the tap's offset, floored to the stride), so the inverse is a table
    again and the strided input grad is one more gather-GEMM. Built once per tables object
    and kept on it (tables live as long as their batch).
    """
    inverse = tables._triton_inverse
    if inverse is None:
        forward = tables.forward
        taps = forward.shape[0]
        padded = torch.full((taps, tables.n_in + 1), tables.n_out, dtype=forward.dtype, device=forward.device)
        outputs = torch.arange(tables.n_out, dtype=forward.dtype, device=forward.device).expand(taps, -1)
        padded.scatter_(1, forward.long(), outputs)  # absent neighbours land in column n_in, dropped
        inverse = padded[:, : tables.n_in].contiguous()
        tables._triton_inverse = inverse
    return inverse


def input_grad_operands(tables: NeighbourTables, taps_out_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(table, weight) of a conv's input gradient as a gather-GEMM of the output gradient,
    given the taps ``W[t]`` as ``[K, C_out, C_in]``: stride 1 (odd kernel) reads the forward
    table with the taps mirrored (the table is its own transpose); strided convs read the
    inverse table with the taps as they are."""
    if tables.stride == 1:
        return tables.forward, taps_out_in.flip(0)
    return inverse_table(tables), taps_out_in


class TritonConvFunction(torch.autograd.Function):
    """Sparse conv on neighbour tables with a PyTorch-layout weight; see the module
    docstring. Keeps the input, the weight and the tables for backward."""

    @staticmethod
    def forward(ctx, features: torch.Tensor, weight: torch.Tensor, tables: NeighbourTables):
        ctx.save_for_backward(features, weight)
        ctx.tables = tables
        taps_in_out = weight.flatten(2).permute(2, 1, 0)  # [K, C_in, C_out]
        return gather_gemm(features, tables.forward, taps_in_out, tables.n_out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        features, weight = ctx.saved_tensors
        tables: NeighbourTables = ctx.tables
        c_out, c_in, k, _ = weight.shape
        grad = grad.contiguous()
        grad_in = grad_w = None
        if ctx.needs_input_grad[0]:
            taps_out_in = weight.flatten(2).permute(2, 0, 1)  # [K, C_out, C_in]: W[t]
            grad_in = gather_gemm(grad, *input_grad_operands(tables, taps_out_in), tables.n_in)
        if ctx.needs_input_grad[1]:
            gw = gather_weight_grad(features, tables.forward, grad)  # [K, C_out, C_in] fp32
            grad_w = gw.permute(1, 2, 0).reshape(c_out, c_in, k, k).to(weight.dtype)
        return grad_in, grad_w, None


def sparse_conv(features: torch.Tensor, weight: torch.Tensor, tables: NeighbourTables) -> torch.Tensor:
    """``features`` ``[n_in, C_in]``, PyTorch-layout ``weight`` ``[C_out, C_in, k, k]`` -> ``[n_out, C_out]``."""
    check_operands(features, weight)
    if tables.stride == 1 and tables.kernel_size % 2 == 0:
        raise ValueError(f"a stride-1 sparse conv needs an odd kernel, got {tables.kernel_size}")
    return TritonConvFunction.apply(features, weight, tables)
