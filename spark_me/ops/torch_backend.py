"""Sparse conv, depthwise conv and max-pool as gathers and dense matrix products.

Every op reads its neighbours through a :class:`~spark_me.ops.tables.NeighbourTables`
table (row ``n`` of the zero-padded input stands for an absent neighbour), runs on any
device and float dtype, and has a hand-written backward that keeps only the input, the
weight and the tables (no gathered ``[N, K·C]`` copy lives between forward and backward).

Convolution, with the tap ``t = ky*k + kx`` of PyTorch's weight written ``W[t]``
(``[C_out, C_in]``) and table ``T``:

* forward:       ``y[o] = Σ_t x[T[t, o]] · W[t]ᵀ``;
* input grad:    stride 1: the same gather-product of ``g`` with the taps mirrored
  (``W[K-1-t]``), as a centred kernel's neighbourhood is point-symmetric; overlapping
  strided: the gather-product of ``g`` through the backward table with ``W[t]``;
  non-overlapping (``k <= stride``): one product ``g · W`` scattered to the (unique)
  input rows;
* weight grad:   ``gW[t] = Σ_o g[o]ᵀ · x[T[t, o]]``.

Each gather-product runs as one of two algorithms:

* ``"gemm"``: gather all taps into ``[N, K·C]`` and do one matrix product;
* ``"loop"``: K gathers of ``[N, C]`` and K accumulating products (less memory traffic
  per product; the stride-1 centre tap needs no gather at all);
* ``"pairs"``: MinkowskiEngine's algorithm: per tap, gather only the neighbours that
  exist, multiply, scatter-add (fewest FLOPs where many neighbours are absent).

Non-overlapping convs always take ``"gemm"`` (no tap is absent, and the input gradient
is a single product). Reduced-precision inputs (bf16, fp16) always take ``"gemm"``, whose single product
accumulates in fp32 and rounds once.
"""
from __future__ import annotations

import torch

from spark_me.ops.tables import NeighbourTables

ALGORITHMS = ("auto", "gemm", "loop", "pairs")
# fp32 on CPU, 1 thread, 3×3 convs at ResNet-50 sizes (batch 8, 224 px, 40% visible),
# forward+backward: "loop" was fastest or tied up to 256 input channels, "gemm" at 512;
# "pairs" (MinkowskiEngine's algorithm) tied at 256 and lost elsewhere.
GEMM_MIN_CHANNELS = 512


def choose_algorithm(channels: int, dtype: torch.dtype, algorithm: str = "auto") -> str:
    """The gather-product algorithm for ``channels`` gathered channels of ``dtype``."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown sparse conv algorithm {algorithm!r}; choose from {', '.join(ALGORITHMS)}")
    if dtype in (torch.bfloat16, torch.float16):
        return "gemm"
    if algorithm != "auto":
        return algorithm
    return "gemm" if channels >= GEMM_MIN_CHANNELS else "loop"


def _pad(x: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """``x`` with one extra row of ``fill``: the row an absent neighbour's index points to."""
    return torch.cat([x, x.new_full((1, x.shape[1]), fill)])


def _gather_columns(src: torch.Tensor, table: torch.Tensor, complete: bool = False) -> torch.Tensor:
    """``[n, K·C]``: row ``n`` holds ``src[table[t, n]]`` for every tap ``t`` (zero if absent;
    ``complete``: no entry is absent, so no zero row is needed)."""
    volume, n = table.shape
    rows = src if complete else _pad(src)
    return rows.index_select(0, table.t().reshape(-1)).view(n, volume * src.shape[1])


def _loop_product(
    src: torch.Tensor, weight: torch.Tensor, table: torch.Tensor, taps: list[int], centre: int
) -> torch.Tensor:
    """``Σ_t src[table[t]] · weight[taps[t]]`` by tap (weight ``[K, A, B]``); tap ``centre``
    (if ``>= 0``) reads ``src`` itself, as a stride-1 table maps each site to itself there."""
    padded = _pad(src)
    out = None
    for t, w in enumerate(taps):
        rows = src if t == centre else padded.index_select(0, table[t])
        if out is None:
            out = rows @ weight[w]
        else:
            out.addmm_(rows, weight[w])
    return out


class SparseConvFunction(torch.autograd.Function):
    """Sparse conv on neighbour tables with a PyTorch-layout weight; see the module docstring.

    Weight layouts per algorithm, chosen so that every product reads its operands in place
    (a transposed view costs a GEMM nothing): ``"gemm"`` uses ``[C_out, K·C_in]`` (a cheap
    per-output-channel reordering of PyTorch's ``[C_out, C_in, kh, kw]``), ``"loop"`` and
    ``"pairs"`` use ``[K, C_out, C_in]``.
    """

    @staticmethod
    def forward(ctx, features: torch.Tensor, weight: torch.Tensor, tables: NeighbourTables, algorithm: str):
        c_out, c_in, k, _ = weight.shape
        volume = k * k
        algorithm = "gemm" if tables.stride >= k else choose_algorithm(c_in, features.dtype, algorithm)
        ctx.tables, ctx.algorithm, ctx.shape = tables, algorithm, weight.shape
        if algorithm == "gemm":
            ctx.save_for_backward(features, weight)
            w_rows = weight.permute(0, 2, 3, 1).reshape(c_out, volume * c_in)
            return _gather_columns(features, tables.forward, tables.complete) @ w_rows.t()
        taps_weight = weight.permute(2, 3, 0, 1).reshape(volume, c_out, c_in)
        ctx.save_for_backward(features, taps_weight)
        centre = volume // 2 if tables.stride == 1 else -1
        if algorithm == "loop":
            return _loop_product(features, taps_weight.transpose(1, 2), tables.forward, list(range(volume)), centre)
        return _pairs_product(features, taps_weight.transpose(1, 2), tables.pairs, centre, tables.n_out, forward=True)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        features, w = ctx.saved_tensors
        tables: NeighbourTables = ctx.tables
        c_out, c_in, k, _ = ctx.shape
        volume = k * k
        centre = volume // 2 if tables.stride == 1 else -1
        grad = grad.contiguous()
        grad_in = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_in = _input_grad(grad, w, tables, ctx.algorithm, ctx.shape)
        if ctx.needs_input_grad[1]:
            if ctx.algorithm == "gemm":
                grad_rows = grad.t() @ _gather_columns(features, tables.forward, tables.complete)  # [C_out, K·C_in]
                return grad_in, grad_rows.view(c_out, k, k, c_in).permute(0, 3, 1, 2).contiguous(), None, None
            if ctx.algorithm == "loop":
                padded = _pad(features)
                per_tap = [
                    grad.t() @ (features if t == centre else padded.index_select(0, tables.forward[t]))
                    for t in range(volume)
                ]
            else:
                per_tap = [
                    grad.t() @ features if t == centre
                    else grad.index_select(0, out_rows).t() @ features.index_select(0, in_rows)
                    for t, (in_rows, out_rows) in enumerate(tables.pairs)
                ]
            grad_w = torch.stack(per_tap).view(k, k, c_out, c_in).permute(2, 3, 0, 1).contiguous()
        return grad_in, grad_w, None, None


def _pairs_product(
    src: torch.Tensor, weight: torch.Tensor, pairs: list[tuple[torch.Tensor, torch.Tensor]], centre: int,
    n_dst: int, forward: bool,
) -> torch.Tensor:
    """MinkowskiEngine's algorithm: per tap, gather the rows that exist, multiply, scatter-add.

    ``forward``: ``dst[o] += src[i] · weight[t]`` over tap t's pairs (i, o); otherwise the
    transposed direction ``dst[i] += src[o] · weight[t]``. Tap ``centre`` (stride 1, if
    ``>= 0``) pairs every site with itself and initialises ``dst``.
    """
    if centre >= 0:
        dst = src @ weight[centre]
    else:
        dst = src.new_zeros(n_dst, weight.shape[2])
    for t, (in_rows, out_rows) in enumerate(pairs):
        if t == centre or len(in_rows) == 0:
            continue
        read, write = (in_rows, out_rows) if forward else (out_rows, in_rows)
        dst.index_add_(0, write, src.index_select(0, read) @ weight[t])
    return dst


def _input_grad(grad: torch.Tensor, w: torch.Tensor, tables: NeighbourTables, algorithm: str, shape) -> torch.Tensor:
    """The input gradient of :class:`SparseConvFunction` (``w`` as saved for ``algorithm``)."""
    c_out, c_in, k, _ = shape
    volume = k * k
    stride_one = tables.stride == 1
    if algorithm == "pairs":
        return _pairs_product(grad, w, tables.pairs, volume // 2 if stride_one else -1, tables.n_in, forward=False)
    if not stride_one:  # one product g · W for every (output, tap), scattered to the input rows
        w_rows = w.permute(0, 2, 3, 1) if algorithm == "gemm" else w.view(k, k, c_out, c_in).permute(2, 0, 1, 3)
        per_tap = (grad @ w_rows.reshape(c_out, volume * c_in)).view(-1, c_in)
        padded = grad.new_zeros(tables.n_in + 1, c_in)
        if tables.stride >= k:  # non-overlapping: each input row feeds at most one (output, tap)
            padded.index_copy_(0, tables.forward.t().reshape(-1), per_tap)
        else:
            padded.index_add_(0, tables.forward.t().reshape(-1), per_tap)
        return padded[: tables.n_in]
    # stride 1: T is its own transpose with the taps mirrored
    if algorithm == "gemm":
        w_cols = w.flip(2, 3).permute(2, 3, 0, 1).reshape(volume * c_out, c_in)
        return _gather_columns(grad, tables.forward) @ w_cols
    return _loop_product(grad, w, tables.forward, list(range(volume - 1, -1, -1)), volume // 2)


def sparse_conv(features: torch.Tensor, weight: torch.Tensor, tables: NeighbourTables, algorithm: str = "auto") -> torch.Tensor:
    """``features`` ``[n_in, C_in]``, PyTorch-layout ``weight`` ``[C_out, C_in, k, k]`` -> ``[n_out, C_out]``."""
    return SparseConvFunction.apply(features, weight, tables, algorithm)


def _depthwise_product(src: torch.Tensor, weight: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``out[n] = Σ_t src[table[t, n]] ⊙ weight[t]``, accumulated in at least fp32."""
    padded = _pad(src)
    acc_dtype = torch.promote_types(src.dtype, torch.float32)
    out = torch.zeros(table.shape[1], src.shape[1], dtype=acc_dtype, device=src.device)
    for t in range(table.shape[0]):
        out.addcmul_(padded.index_select(0, table[t]), weight[t])
    return out.to(src.dtype)


class DepthwiseConvFunction(torch.autograd.Function):
    """Depthwise submanifold conv (stride 1, odd kernel): input grad by the mirrored kernel."""

    @staticmethod
    def forward(ctx, features: torch.Tensor, weight: torch.Tensor, tables: NeighbourTables):
        ctx.save_for_backward(features, weight)
        ctx.tables = tables
        return _depthwise_product(features, weight, tables.forward)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        features, weight = ctx.saved_tensors
        table = ctx.tables.forward
        grad = grad.contiguous()
        grad_in = _depthwise_product(grad, weight.flip(0), table) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            padded = _pad(features)
            acc_dtype = torch.promote_types(features.dtype, torch.float32)
            grad_w = torch.stack(
                [(padded.index_select(0, table[t]).to(acc_dtype) * grad).sum(0) for t in range(table.shape[0])]
            ).to(weight.dtype)
        return grad_in, grad_w, None


def depthwise_conv(features: torch.Tensor, weight: torch.Tensor, tables: NeighbourTables) -> torch.Tensor:
    """Depthwise conv: ``features`` ``[N, C]``, ``weight`` ``[K, C]`` (PyTorch tap order)."""
    if tables.stride != 1:
        raise ValueError(f"the depthwise conv is submanifold (stride 1), got stride {tables.stride}")
    return DepthwiseConvFunction.apply(features, weight, tables)


class GatherMaxFunction(torch.autograd.Function):
    """Max over the existing neighbours; the gradient goes to the first maximal tap."""

    @staticmethod
    def forward(ctx, features: torch.Tensor, tables: NeighbourTables):
        table = tables.forward
        padded = _pad(features, float("-inf"))
        out = padded.index_select(0, table[0])
        best = torch.zeros(out.shape, dtype=torch.uint8, device=out.device)
        for t in range(1, table.shape[0]):
            candidate = padded.index_select(0, table[t])
            better = candidate > out
            out = torch.where(better, candidate, out)
            best.masked_fill_(better, t)
        ctx.save_for_backward(best)
        ctx.tables = tables
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (best,) = ctx.saved_tensors
        tables: NeighbourTables = ctx.tables
        rows = torch.gather(tables.forward.t(), 1, best.long())  # [n_out, C] input row of each max
        grad_in = grad.new_zeros(tables.n_in + 1, grad.shape[1])
        grad_in.scatter_add_(0, rows, grad.contiguous())
        return grad_in[: tables.n_in], None


def gather_max(features: torch.Tensor, tables: NeighbourTables) -> torch.Tensor:
    """Max-pool ``features`` ``[n_in, C]`` over each output site's existing neighbours."""
    if tables.forward.shape[0] > 256:
        raise ValueError(f"gather_max supports kernels of at most 256 taps, got {tables.forward.shape[0]}")
    return GatherMaxFunction.apply(features, tables)
