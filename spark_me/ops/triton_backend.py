"""Sparse conv and depthwise conv as fused Triton kernels (implicit GEMM on neighbour tables),
and the per-site layer norm and per-channel gradient sums around them.

Same maths and signatures as :mod:`spark_me.ops.torch_backend` (read its docstring), with
no gathered ``[N, K·C]`` copy anywhere: each kernel reads its neighbours through the
``[K, N]`` table inside the tile loads (an absent neighbour, the sentinel, is a masked
load of zeros).

* conv forward: a program per ``[BLOCK_M rows × BLOCK_N output channels]`` tile loops
  over taps and ``BLOCK_K`` input-channel blocks (nested, or as one flat loop that Triton
  pipelines across taps: the autotuner picks), loads the input tile gathered through
  ``table[t, rows]`` and the weight tile of tap ``t``, and accumulates ``tl.dot`` in fp32;
* conv input grad: the same kernel on ``grad``: stride 1 (odd kernel) with the forward
  table and the taps mirrored (``W[K-1-t]``); strided with the inverse table
  (:func:`inverse_table`, built once per tables object) and the taps as they are;
* conv weight grad: a program per (tap, ``C_out`` block, ``C_in`` block, row split)
  reduces ``g[o]ᵀ · x[T[t, o]]`` over its rows in fp32 and adds its tile to an fp32
  buffer with ``tl.atomic_add``. Splitting the rows keeps the GPU busy where channels are
  few (64×64×9 is 9 tiles; ResNet-50's stage 1 needs hundreds of programs); without a
  split the partial sums would need a buffer per split sized by the tile config. The
  order of the atomic adds varies, so the last bits of the weight grad do too, as with
  the ``index_add_`` of the torch backend on CUDA; under
  ``torch.use_deterministic_algorithms(True)`` one split per tile keeps it exact;
* depthwise: a program per (row block, channel block) loops over taps with gathered loads
  and fp32 products, a few taps unrolled where the autotuner finds that faster. Backward,
  both gradients in one pass (:func:`depthwise_backward`): a program per (row split,
  channel block) gathers the output gradient through the table once per tap, for the input
  grad (mirrored taps) and, times the input rows read in place, for the weight grad, whose
  per-tap column sums it keeps in registers and writes once as its split's partial; a sum
  over the splits gives the weight grad, with no atomics, the same bits on every run.
  Where autograd wants one gradient alone: the gathered conv (input), or a weight grad per
  (tap, channel block, row split) with atomics, as the conv's;
* max-pool: :func:`gather_max` is :func:`spark_me.ops.torch_backend.gather_max` (a
  comparison per tap; nothing to fuse worth a kernel yet);
* layer norm over each site's channels (:func:`layer_norm`; no table): a program per tile
  of several whole rows normalises them in fp32, reading the features in their dtype and
  writing the output in the one asked for (under autocast the caller asks for bf16 where
  a linear layer or a conv would cast the float32 output to it anyway); the backward
  computes the input grad row by row and sums the parameter gradients per row split, a
  partial per split summed afterwards (no atomics);
* per-channel gradient sums (:func:`_column_sums`): a bias's gradient (:func:`linear`,
  whose product stays cuBLAS's; :func:`add_bias`) and a layer scale's (:func:`layer_scale`,
  whose backward also writes the features' gradient in the same pass), a program per row
  split and channel block, a partial per split summed afterwards (no atomics). PyTorch's
  own sum over the rows of a narrow ``[N, C]`` gradient runs far below the GPU's bandwidth.

Precision: inputs load in their dtype (float32, bfloat16, float16), every product
accumulates in fp32 and rounds once to the output dtype. float32 tiles multiply with
``tl.dot(..., input_precision="ieee")`` (exact fp32 FMAs, no TF32, whatever
``allow_tf32`` says), so float32 matches the torch backend to ~1e-6; that kwarg exists
from Triton 3.0 (3.6 on the GPU nodes, 3.8 here; the older ``allow_tf32=`` is deprecated).
bf16/fp16 tiles take ``tl.dot``'s default (tensor cores, fp32 accumulator). float64 is
refused with an error naming ``conv_impl="torch"`` (fp64 training is no use case here,
and fp64 ``tl.dot`` is not in every Triton this project meets).

Tiles: ``triton.autotune`` over a few configs, keyed on the channel counts (and tap
count): each new key costs one benchmark of every config (once per process), so the
lists stay short (the gather-GEMM's: four tile shapes, each in both loop forms; the
depthwise forward's and fused backward's: tile shapes with the tap loop one tap at a time
or a few taps unrolled). The depthwise weight grad alone has fixed tiles.

The Triton interpreter (CPU tensors; ``TRITON_INTERPRET=1`` in the environment when this
module is imported, as Triton decides at decoration; :data:`INTERPRETED`) runs tiles as
NumPy arrays, which makes three differences, all behind the ``INTERPRETER`` constexpr or
on the host side:

* tiles are sized to the problem, large (:func:`_interpreter_tile`), without autotuning:
  the interpreter pays per operation, not per element;
* ``tl.dot`` operands go to fp32 first: the interpreter's ``tl.dot`` multiplies bfloat16
  tiles as their raw uint16 bits (Triton 3.8). The products are the same (a bf16 or fp16
  product is exact in fp32), as is the fp32 accumulation;
* Triton's standard library (``tl.sum``, ``tl.zeros``, ``tl.cdiv`` ...) is decorated when
  ``triton`` is first imported, usually by torch without the interpreter, and cannot run
  in it then; so the kernels use builtins only, and sum a tile's columns or rows by a
  product with ones (or a one-hot row) in the interpreter (``tl.sum`` on the GPU);
* its casts from fp32 to bf16 truncate where the GPU rounds to nearest, so an interpreted
  bf16 output may be one unit of the last place off where the GPU's is half a unit at most.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import triton
import triton.language as tl

from spark_me.ops import torch_backend
from spark_me.ops.tables import NeighbourTables

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Programs per streaming multiprocessor the weight-grad row split aims at.
PROGRAMS_PER_SM = 4
# Row splits of a weight grad on CPU (interpreter): enough to exercise the atomics.
CPU_SPLIT_PROGRAMS = 32
# Row splits of the fused depthwise backward per SM (at 64 channels a program; each split
# writes a [taps, channels] fp32 partial), and in the interpreter.
DEPTHWISE_SPLITS_PER_SM, CPU_DEPTHWISE_SPLITS = 8, 4
# Layer norm tiles: a program's [rows, channels] tile holds about LAYER_NORM_TILE elements
# (at most LAYER_NORM_MAX_ROWS rows); a row is one tile row, so at most
# LAYER_NORM_MAX_CHANNELS channels. Its backward's row splits per SM (each writes a
# [2, channels] fp32 partial), and in the interpreter.
LAYER_NORM_TILE, LAYER_NORM_MAX_ROWS, LAYER_NORM_MAX_CHANNELS = 4096, 64, 8192
LAYER_NORM_SPLITS_PER_SM, CPU_LAYER_NORM_SPLITS = 8, 4
# Column sums (bias and layer-scale gradients): tiles of COLUMN_SUM_TILE elements, about
# COLUMN_SUM_PROGRAMS_PER_SM programs per SM over the row splits and channel blocks, each
# writing a [channels] fp32 partial; row splits in the interpreter.
COLUMN_SUM_TILE, COLUMN_SUM_PROGRAMS_PER_SM, CPU_COLUMN_SUM_SPLITS = 4096, 8, 4
# The fused depthwise backward's register accumulator has a row per tap (padded to a power
# of two); past this many taps (a kernel larger than 7×7) the backward runs the two kernels.
FUSED_DEPTHWISE_MAX_TAPS = 64


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


@triton.jit
def _row_split(n_rows, BLOCK: tl.constexpr, AXIS: tl.constexpr):
    """This program's rows ``[start, end)`` where axis ``AXIS`` of the grid splits
    ``n_rows`` rows into chunks of whole ``BLOCK``-row tiles."""
    row_blocks = (n_rows + BLOCK - 1) // BLOCK
    chunk = (row_blocks + tl.num_programs(AXIS) - 1) // tl.num_programs(AXIS) * BLOCK
    start = tl.program_id(AXIS) * chunk
    return start, tl.minimum(start + chunk, n_rows)


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
    start, end = _row_split(n_dst, BLOCK_R, 1)
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
    start, end = _row_split(n_dst, BLOCK_R, 1)
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
    start, end = _row_split(n_rows, BLOCK_M, 0)
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
    start, end = _row_split(n_rows, BLOCK_R, 0)
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
    start, end = _row_split(n_rows, BLOCK_R, 0)
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


# Triton decided at decoration whether these run in its interpreter (TRITON_INTERPRET=1).
INTERPRETED = not isinstance(_gather_gemm_kernel, triton.runtime.JITFunction)

# Each tile shape in both loop forms (_gather_gemm_kernel's FLAT): the autotuner keeps the
# fastest per (c_in, c_out, taps), so a shape runs the flat form only where it timed faster.
_GEMM_CONFIGS = [
    triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "FLAT": flat}, num_warps=warps, num_stages=3)
    for flat in (False, True)
    for m, n, k, warps in ((64, 64, 32, 4), (128, 64, 32, 4), (128, 128, 32, 8), (128, 128, 64, 8))
]
_WGRAD_CONFIGS = [
    triton.Config({"BLOCK_CO": 64, "BLOCK_CI": 64, "BLOCK_R": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_CO": 128, "BLOCK_CI": 64, "BLOCK_R": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_CO": 128, "BLOCK_CI": 128, "BLOCK_R": 32}, num_warps=8, num_stages=3),
]
_gather_gemm = triton.autotune(configs=_GEMM_CONFIGS, key=["c_in", "c_out", "taps"])(_gather_gemm_kernel)
_weight_grad = triton.autotune(configs=_WGRAD_CONFIGS, key=["c_in", "c_out"], reset_to_zero=["gw_ptr"])(
    _weight_grad_kernel
)
# The depthwise forward (and the input grad where autograd wants it alone): tile shapes with
# the tap loop one tap at a time or a few unrolled (_depthwise_kernel's UNROLL). One at a
# time, every tap waits for its table load and then its gathered load; unrolled, the
# compiler may issue several taps' loads ahead, at the cost of registers (in bf16, by ptxas
# for sm_90: 48 a thread one tap at a time, 66-172 unrolled, no spills; a whole 7×7
# unrolled spills). BLOCK_C 32 leaves no lanes idle at ConvNeXt's 96 channels. The
# autotuner picks per (channels, taps).
_DW_FORWARD_CONFIGS = [
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
_DW_BACKWARD_CONFIGS = [
    triton.Config({"BLOCK_M": m, "BLOCK_C": c, "UNROLL": unroll}, num_warps=warps, num_stages=2)
    for m, c, warps, unroll in ((32, 64, 4, 1), (64, 64, 8, 1), (64, 64, 16, 1), (32, 128, 8, 1), (32, 32, 2, 1),
                                (64, 32, 4, 1), (32, 64, 4, 4), (64, 64, 8, 4), (64, 32, 4, 7), (64, 64, 16, 7))
]
_depthwise_forward = triton.autotune(configs=_DW_FORWARD_CONFIGS, key=["channels", "TAPS"])(_depthwise_kernel)
_depthwise_backward = triton.autotune(configs=_DW_BACKWARD_CONFIGS, key=["channels", "TAPS"])(
    _depthwise_backward_kernel
)


def _interpreter_tile(size: int, cap: int) -> int:
    """A tile edge for the interpreter: the power of two covering ``size`` (at least 16, as
    ``tl.dot`` wants), at most ``cap``. The interpreter pays per operation, not per
    element, so a few large tiles run far faster than many small ones."""
    return max(16, min(cap, triton.next_power_of_2(max(size, 1))))


def _check(features: torch.Tensor, weight: torch.Tensor) -> None:
    """Raise unless the kernels can run on these tensors."""
    if features.dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"the triton backend computes in float32, bfloat16 or float16 (tl.dot has no float64), "
            f"got {features.dtype}; use conv_impl='torch'"
        )
    if weight.dtype != features.dtype:
        raise ValueError(f"features ({features.dtype}) and weight ({weight.dtype}) must have one dtype")
    _check_device(features)


def _check_device(features: torch.Tensor) -> None:
    """Raise unless the kernels can run on ``features``' device."""
    if features.device.type != "cuda" and not INTERPRETED:
        raise ValueError(
            "the triton backend runs on CUDA tensors (on CPU only under the Triton interpreter, "
            "TRITON_INTERPRET=1 before spark_me.ops.triton_backend is imported); use conv_impl='torch' on CPU"
        )


def _on_device(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """Make ``tensor``'s GPU the current one for a launch (Triton launches on the current
    device); nothing to do on the CPU."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def _row_splits(device: torch.device, tiles: int, row_blocks: int) -> int:
    """Row splits of a weight grad: about ``PROGRAMS_PER_SM`` programs per SM over all
    tiles, at most one per row block; one under deterministic algorithms (each element
    then gets exactly one atomic add onto zero)."""
    if torch.are_deterministic_algorithms_enabled():
        return 1
    if device.type == "cuda":
        target = PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = CPU_SPLIT_PROGRAMS
    return max(1, min(row_blocks, triton.cdiv(target, tiles)))


def gather_gemm(
    src: torch.Tensor, table: torch.Tensor, weight: torch.Tensor, n_dst: int, config: Optional[triton.Config] = None,
) -> torch.Tensor:
    """``out[o] = Σ_t src[table[t, o]] · weight[t]`` (``weight`` ``[K, C_in, C_out]``, sentinel
    ``len(src)``) -> ``[n_dst, C_out]`` in ``src``'s dtype, accumulated in fp32.

    ``config``: run these tiles and loop form instead of the autotuned ones (tests run every
    config of ``_GEMM_CONFIGS``, in the interpreter too; without one the interpreter runs
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
    with _on_device(src):
        if INTERPRETED:
            meta = config.kwargs if config is not None else {
                "BLOCK_M": _interpreter_tile(n_dst, 1024), "BLOCK_N": _interpreter_tile(c_out, 256),
                "BLOCK_K": _interpreter_tile(c_in, 128), "FLAT": True}
            _gather_gemm_kernel[grid(meta)](*args, INTERPRETER=INTERPRETED, **meta)
        elif config is not None:
            _gather_gemm_kernel[grid(config.kwargs)](*args, INTERPRETER=INTERPRETED, **config.kwargs,
                                                     num_warps=config.num_warps, num_stages=config.num_stages)
        else:
            _gather_gemm[grid](*args, INTERPRETER=INTERPRETED)
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
        return tiles, _row_splits(src.device, tiles, triton.cdiv(n_dst, meta["BLOCK_R"]))

    args = (src, table, grad, gw, len(src), n_dst, c_in, c_out)
    with _on_device(src):
        if INTERPRETED:
            meta = {"BLOCK_CO": _interpreter_tile(c_out, 256), "BLOCK_CI": _interpreter_tile(c_in, 128),
                    "BLOCK_R": _interpreter_tile(n_dst, 1024)}
            _weight_grad_kernel[grid(meta)](*args, INTERPRETER=INTERPRETED, **meta)
        else:
            _weight_grad[grid](*args, INTERPRETER=INTERPRETED)
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
    _check(features, weight)
    if tables.stride == 1 and tables.kernel_size % 2 == 0:
        raise ValueError(f"a stride-1 sparse conv needs an odd kernel, got {tables.kernel_size}")
    return TritonConvFunction.apply(features, weight, tables)


def _depthwise(src: torch.Tensor, weight: torch.Tensor, table: torch.Tensor,
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
    with _on_device(src):
        if INTERPRETED:
            meta = config.kwargs if config is not None else {
                "BLOCK_M": _interpreter_tile(n_dst, 1024), "BLOCK_C": _interpreter_tile(channels, 128), "UNROLL": 1}
            _depthwise_kernel[grid(meta)](*args, TAPS=taps, **meta)
        elif config is not None:
            _depthwise_kernel[grid(config.kwargs)](*args, TAPS=taps, **config.kwargs, num_warps=config.num_warps,
                                                   num_stages=config.num_stages)
        else:
            _depthwise_forward[grid](*args, TAPS=taps)
    return out


def _depthwise_weight_grad(src: torch.Tensor, table: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """fp32 ``[K, C]``: ``Σ_o src[table[t, o]] ⊙ grad[o]`` for every tap ``t``."""
    taps, n_dst = table.shape
    channels = src.shape[1]
    gw = torch.zeros(taps, channels, dtype=torch.float32, device=src.device)
    if n_dst == 0:
        return gw
    block_r, block_c = DEPTHWISE_BLOCK_R, DEPTHWISE_BLOCK_C
    if INTERPRETED:
        block_r, block_c = _interpreter_tile(n_dst, 1024), _interpreter_tile(channels, 128)
    tiles = taps * triton.cdiv(channels, block_c)
    grid = (tiles, _row_splits(src.device, tiles, triton.cdiv(n_dst, block_r)))
    with _on_device(src):
        _depthwise_weight_grad_kernel[grid](
            src.contiguous(), table.contiguous(), grad.contiguous(), gw, len(src), n_dst, channels,
            INTERPRETER=INTERPRETED, BLOCK_R=block_r, BLOCK_C=block_c,
        )
    return gw


def _split_rows(device: torch.device, row_tiles: int, per_sm: int, cpu_splits: int, programs_per_split: int = 1,
                ) -> int:
    """Row splits of a kernel whose programs each sum their split's rows into a partial
    (``programs_per_split`` programs a split, e.g. one per channel block): about ``per_sm``
    programs per SM in all, ``cpu_splits`` in the interpreter, at most one split per
    ``row_tiles``."""
    if device.type != "cuda":
        return max(1, min(cpu_splits, row_tiles))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(row_tiles, triton.cdiv(per_sm * sms, programs_per_split)))


def depthwise_backward(
    features: torch.Tensor, weight: torch.Tensor, table: torch.Tensor, grad: torch.Tensor,
    config: Optional[triton.Config] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input grad in ``grad``'s dtype, fp32 weight grad ``[K, C]``) of the depthwise conv
    ``out[o] = Σ_t features[table[t, o]] ⊙ weight[t]`` (stride 1, odd kernel) in one kernel.

    The input grad gathers ``grad`` through the table with the taps mirrored (the table is
    its own transpose); the weight grad of tap ``K-1-t`` is ``Σ_i features[i] ⊙ grad[table[t, i]]``,
    the same gathered rows times ``features`` read in place. So per tap and row tile one
    gathered tile of ``grad`` serves both gradients, where :func:`_depthwise` and
    :func:`_depthwise_weight_grad` load three: the gathered ``grad``, the gathered
    ``features``, and ``grad`` itself.
    ``config``: these tiles instead of the autotuned ones (tests, kernels_bench)."""
    taps, n_rows = table.shape
    channels = features.shape[1]
    grad_in = grad.new_empty(n_rows, channels)
    if n_rows == 0:
        return grad_in, torch.zeros(taps, channels, dtype=torch.float32, device=features.device)
    # each split at least 64 rows, a program per 64 channels
    splits = _split_rows(features.device, triton.cdiv(n_rows, 64), DEPTHWISE_SPLITS_PER_SM, CPU_DEPTHWISE_SPLITS,
                         triton.cdiv(channels, 64))
    partial = torch.empty(splits, taps, channels, dtype=torch.float32, device=features.device)
    taps_pad = max(16, triton.next_power_of_2(taps))  # tl.dot (interpreter) wants 16 rows at least

    def grid(meta: dict) -> tuple[int, int]:
        return splits, triton.cdiv(channels, meta["BLOCK_C"])

    args = (features.contiguous(), table.contiguous(), grad.contiguous(), weight.flip(0).contiguous(), grad_in,
            partial, n_rows, channels)
    with _on_device(features):
        if INTERPRETED:  # by default two row tiles per split on the tests' sizes
            meta = config.kwargs if config is not None else {
                "BLOCK_M": _interpreter_tile(triton.cdiv(n_rows, 2 * splits), 256),
                "BLOCK_C": _interpreter_tile(channels, 128), "UNROLL": 1}
            _depthwise_backward_kernel[grid(meta)](*args, TAPS=taps, INTERPRETER=True, TAPS_PAD=taps_pad, **meta)
        elif config is not None:
            _depthwise_backward_kernel[grid(config.kwargs)](*args, TAPS=taps, INTERPRETER=False, TAPS_PAD=taps_pad,
                                                            **config.kwargs, num_warps=config.num_warps,
                                                            num_stages=config.num_stages)
        else:
            _depthwise_backward[grid](*args, TAPS=taps, INTERPRETER=False, TAPS_PAD=taps_pad)
    return grad_in, partial.sum(0).flip(0)


class TritonDepthwiseFunction(torch.autograd.Function):
    """Depthwise submanifold conv (stride 1, odd kernel). Backward: both gradients from
    :func:`depthwise_backward` (up to ``FUSED_DEPTHWISE_MAX_TAPS`` taps); one of them
    alone, or a larger kernel's, from each gradient's own kernel."""

    @staticmethod
    def forward(ctx, features: torch.Tensor, weight: torch.Tensor, tables: NeighbourTables):
        ctx.save_for_backward(features, weight)
        ctx.tables = tables
        return _depthwise(features, weight, tables.forward)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        features, weight = ctx.saved_tensors
        table = ctx.tables.forward
        grad = grad.contiguous()
        need_in, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if need_in and need_w and len(table) <= FUSED_DEPTHWISE_MAX_TAPS:
            grad_in, grad_w = depthwise_backward(features, weight, table, grad)
            return grad_in, grad_w.to(weight.dtype), None
        grad_in = _depthwise(grad, weight.flip(0), table) if need_in else None
        grad_w = _depthwise_weight_grad(features, table, grad).to(weight.dtype) if need_w else None
        return grad_in, grad_w, None


def depthwise_conv(features: torch.Tensor, weight: torch.Tensor, tables: NeighbourTables) -> torch.Tensor:
    """Depthwise conv: ``features`` ``[N, C]``, ``weight`` ``[K, C]`` (PyTorch tap order)."""
    _check(features, weight)
    if tables.stride != 1 or tables.kernel_size % 2 == 0:
        raise ValueError(
            f"the depthwise conv is submanifold (stride 1, odd kernel), got {tables.kernel_size}/{tables.stride}"
        )
    return TritonDepthwiseFunction.apply(features, weight, tables)


def _layer_norm_tiles(n_rows: int, channels: int, interpreted: bool = INTERPRETED) -> tuple[int, int, int]:
    """(rows, channels, warps) of a layer norm tile: every channel (padded to a power of
    two) of ``LAYER_NORM_TILE // channels`` rows, so that a program moves a few thousand
    elements however few the channels are (one row per program would leave most lanes idle
    at ConvNeXt's 96). The interpreter's: 16+ rows (``tl.dot``), a few large tiles."""
    block_c = triton.next_power_of_2(channels)
    if interpreted:
        return _interpreter_tile(n_rows, 256), max(16, block_c), 4
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
    block_r, block_c, warps = _layer_norm_tiles(n_rows, channels)
    with _on_device(features):
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
    block_r, block_c, warps = _layer_norm_tiles(n_rows, channels)
    splits = _split_rows(features.device, triton.cdiv(n_rows, block_r), LAYER_NORM_SPLITS_PER_SM,
                         CPU_LAYER_NORM_SPLITS)
    partial = torch.empty(splits, 2, channels, dtype=torch.float32, device=features.device)
    with _on_device(features):
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
    _check_device(features)
    if features.shape[1] > LAYER_NORM_MAX_CHANNELS:
        raise ValueError(f"the triton layer norm holds a row in registers: at most {LAYER_NORM_MAX_CHANNELS} "
                         f"channels, got {features.shape[1]}; use conv_impl='torch'")
    return TritonLayerNormFunction.apply(features, weight, bias, eps, out_dtype or features.dtype)


def _column_sums(grad: torch.Tensor, x: Optional[torch.Tensor] = None, scale: Optional[torch.Tensor] = None,
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
        block_r, block_c = _interpreter_tile(triton.cdiv(n_rows, 2 * CPU_COLUMN_SUM_SPLITS), 256), 32
    channel_blocks = triton.cdiv(channels, block_c)
    splits = _split_rows(grad.device, triton.cdiv(n_rows, block_r), COLUMN_SUM_PROGRAMS_PER_SM, CPU_COLUMN_SUM_SPLITS,
                         channel_blocks)
    partial = torch.empty(splits, channels, dtype=torch.float32, device=grad.device)
    grad = grad.contiguous()
    operands = (x.contiguous(), scale.contiguous(), grad_in) if product else (grad, grad, grad)
    with _on_device(grad):
        _column_sums_kernel[(splits, channel_blocks)](
            grad, *operands, partial, n_rows, channels, PRODUCT=product, INTERPRETER=INTERPRETED, BLOCK_R=block_r,
            BLOCK_C=block_c, num_warps=4,
        )
    return partial.sum(0), grad_in


class TritonLinearFunction(torch.autograd.Function):
    """``features @ weight.T + bias`` (cuBLAS, as ``F.linear``), its bias gradient from
    :func:`_column_sums`. The bias arrives in its own dtype (fp32 parameters under
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
        grad_b = _column_sums(grad)[0].to(ctx.bias_dtype) if ctx.needs_input_grad[2] else None
        return grad_in, grad_w, grad_b


def linear(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``F.linear(features, weight, bias)`` on ``[N, C_in]`` features (``weight`` and
    ``features`` of one dtype; ``bias`` any float dtype), the bias gradient summed by a
    Triton kernel: PyTorch's sum over N rows of a narrow gradient runs far below the GPU's
    bandwidth (kernels_bench/analysis.md)."""
    _check(features, weight)
    if features.dim() != 2 or bias.shape != (weight.shape[0],):
        raise ValueError(f"linear takes [N, C_in] features and a [C_out] bias, got {tuple(features.shape)} and "
                         f"{tuple(bias.shape)}")
    return TritonLinearFunction.apply(features, weight, bias)


class TritonBiasFunction(torch.autograd.Function):
    """``features + bias`` per channel (the bias cast to the features' dtype, as a conv's
    bias is added), its gradient from :func:`_column_sums` in the bias's own dtype."""

    @staticmethod
    def forward(ctx, features: torch.Tensor, bias: torch.Tensor):
        ctx.bias_dtype = bias.dtype
        return features + bias.to(features.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad_b = _column_sums(grad)[0].to(ctx.bias_dtype) if ctx.needs_input_grad[1] else None
        return grad, grad_b


class TritonScaleFunction(torch.autograd.Function):
    """``features * scale`` per channel (a layer scale), in the dtype PyTorch's product
    would have; the backward's both gradients from one kernel (:func:`_column_sums`)."""

    @staticmethod
    def forward(ctx, features: torch.Tensor, scale: torch.Tensor):
        ctx.save_for_backward(features, scale)
        return features * scale

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        features, scale = ctx.saved_tensors
        grad_scale, grad_in = _column_sums(grad, features, scale)
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
    _check_device(features)


def add_bias(features: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``features + bias.to(features.dtype)`` with the bias gradient summed by a Triton kernel."""
    _check_per_channel(features, bias, "add_bias")
    return TritonBiasFunction.apply(features, bias)


def layer_scale(features: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """``features * gamma`` (per channel), both gradients from one Triton kernel pass."""
    _check_per_channel(features, gamma, "layer_scale")
    return TritonScaleFunction.apply(features, gamma)


def gather_max(features: torch.Tensor, tables: NeighbourTables) -> torch.Tensor:
    """Max-pool: :func:`spark_me.ops.torch_backend.gather_max` (no Triton kernel of its own)."""
    return torch_backend.gather_max(features, tables)
