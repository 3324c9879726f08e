"""Sparse conv, depthwise conv and max-pool as gathers and dense matrix products.

Every op reads its neighbours through a :class:`~spark_me.ops.tables.NeighbourTables`
table (row ``n`` of the zero-padded input stands for an absent neighbour), runs on any
device and float dtype, and has a hand-written backward that keeps only the input, the
weight and the tables (no gathered ``[N, K·C]`` copy lives between forward and backward).

Convolution, with ``W`` ``[K, C_in, C_out]`` in PyTorch tap order and table ``T``:

* forward:       ``y[o] = Σ_t x[T[t, o]] · W[t]``;
* input grad:    stride 1: the same gather-product of ``g`` with the taps mirrored
  (``W[K-1-t]ᵀ``), as a centred kernel's neighbourhood is point-symmetric; overlapping
  strided: the gather-product of ``g`` through the backward table with ``W[t]ᵀ``;
  non-overlapping (``k <= stride``): one product ``g · Wᵀ`` scattered to the (unique)
  input rows;
* weight grad:   ``gW[t] = Σ_o x[T[t, o]]ᵀ · g[o]``.

Each gather-product runs as one of two algorithms:

* ``"gemm"``: gather all taps into ``[N, K·C]`` and do one matrix product (best when the
  channels are few: one large GEMM instead of K small ones);
* ``"loop"``: K gathers of ``[N, C]`` and K accumulating products (less memory traffic
  per product; the stride-1 centre tap needs no gather at all).

Reduced-precision inputs (bf16, fp16) always take ``"gemm"``, whose single product
accumulates in fp32 and rounds once.
"""
from __future__ import annotations

import torch

from spark_me.ops.tables import NeighbourTables

ALGORITHMS = ("auto", "gemm", "loop")
# "loop" pays from this many input channels on (measured: kernels_bench.ops, fp32, 1 thread).
LOOP_MIN_CHANNELS = 128


def choose_algorithm(channels: int, dtype: torch.dtype, algorithm: str = "auto") -> str:
    """The gather-product algorithm for ``channels`` gathered channels of ``dtype``."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown sparse conv algorithm {algorithm!r}; choose from {', '.join(ALGORITHMS)}")
    if dtype in (torch.bfloat16, torch.float16):
        return "gemm"
    if algorithm != "auto":
        return algorithm
    return "loop" if channels >= LOOP_MIN_CHANNELS else "gemm"


def _pad(x: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """``x`` with one extra row of ``fill``: the row an absent neighbour's index points to."""
    return torch.cat([x, x.new_full((1, x.shape[1]), fill)])


def _gather_product(
    src: torch.Tensor, weight: torch.Tensor, table: torch.Tensor, algorithm: str, centre_identity: bool
) -> torch.Tensor:
    """``out[n] = Σ_t src[table[t, n]] · weight[t]``: src ``[M, A]``, weight ``[K, A, B]``."""
    volume, a, b = weight.shape
    n = table.shape[1]
    padded = _pad(src)
    if choose_algorithm(a, src.dtype, algorithm) == "gemm":
        cols = padded.index_select(0, table.t().reshape(-1)).view(n, volume * a)
        return cols @ weight.reshape(volume * a, b)
    centre = volume // 2 if centre_identity else -1
    out = src @ weight[centre] if centre >= 0 else padded.index_select(0, table[0]) @ weight[0]
    for t in range(volume):
        if t != centre and not (centre < 0 and t == 0):
            out.addmm_(padded.index_select(0, table[t]), weight[t])
    return out


def _weight_grad(features: torch.Tensor, grad: torch.Tensor, table: torch.Tensor, algorithm: str) -> torch.Tensor:
    """``gW[t] = Σ_o x[table[t, o]]ᵀ · g[o]`` as ``[K, C_in, C_out]``."""
    volume, n = table.shape
    c_in = features.shape[1]
    padded = _pad(features)
    if choose_algorithm(c_in, features.dtype, algorithm) == "gemm":
        cols = padded.index_select(0, table.t().reshape(-1)).view(n, volume * c_in)
        return (cols.t() @ grad).view(volume, c_in, grad.shape[1])
    return torch.stack([padded.index_select(0, table[t]).t() @ grad for t in range(volume)])


class SparseConvFunction(torch.autograd.Function):
    """Sparse conv on neighbour tables; see the module docstring."""

    @staticmethod
    def forward(ctx, features: torch.Tensor, weight: torch.Tensor, tables: NeighbourTables, algorithm: str):
        ctx.save_for_backward(features, weight)
        ctx.tables, ctx.algorithm = tables, algorithm
        return _gather_product(features, weight, tables.forward, algorithm, centre_identity=tables.stride == 1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        features, weight = ctx.saved_tensors
        tables: NeighbourTables = ctx.tables
        grad = grad.contiguous()
        grad_in = grad_w = None
        if ctx.needs_input_grad[0]:
            if tables.stride == 1:
                w_t = weight.flip(0).transpose(1, 2)
                grad_in = _gather_product(grad, w_t, tables.forward, ctx.algorithm, centre_identity=True)
            elif tables.backward is not None:
                grad_in = _gather_product(grad, weight.transpose(1, 2), tables.backward, ctx.algorithm, False)
            else:  # non-overlapping: each input row feeds at most one (output, tap)
                volume, c_in, c_out = weight.shape
                per_tap = grad @ weight.permute(2, 0, 1).reshape(c_out, volume * c_in)
                padded = grad.new_zeros(tables.n_in + 1, c_in)
                padded.index_copy_(0, tables.forward.t().reshape(-1), per_tap.view(-1, c_in))
                grad_in = padded[: tables.n_in]
        if ctx.needs_input_grad[1]:
            grad_w = _weight_grad(features, grad, tables.forward, ctx.algorithm)
        return grad_in, grad_w, None, None


def sparse_conv(features: torch.Tensor, weight: torch.Tensor, tables: NeighbourTables, algorithm: str = "auto") -> torch.Tensor:
    """``features`` ``[n_in, C_in]``, ``weight`` ``[K, C_in, C_out]`` (PyTorch tap order) -> ``[n_out, C_out]``."""
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
