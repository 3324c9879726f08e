"""Sparse conv, depthwise conv and max-pool as gathers and dense matrix products.

Every op reads its neighbours through a :class:`~spark_me.ops.tables.NeighbourTables`
table (row ``n`` of the zero-padded input stands for an absent neighbour), runs on any
device and float dtype, and has a hand-written backward that keeps only the input, the
weight and the tables (no gathered ``[N, K·C]`` copy lives between forward and backward).

Convolution, with the tap ``t = ky*k + kx`` of PyTorch's weight written ``W[t]``
(``[C_out, C_in]``) and table ``T``:

* forward:       ``y[o] = Σ_t x[T[t, o]] · W[t]ᵀ``;
* input grad:    stride 1: the same gather-product of ``g`` with the taps mirrored
  (``W[K-1-t]``), as a centred kernel's neighbourhood is point-symmetric; strided: one
  product ``g · [W[0] … W[K-1]]`` for every (output, tap), scatter-added to the input rows
  (each tap's rows are distinct; a non-overlapping conv's are distinct over all taps);
* weight grad:   ``gW[t] = Σ_o g[o]ᵀ · x[T[t, o]]``.

Each gather-product runs as one of three gather algorithms:

* ``"gemm"``: gather all taps into ``[N, K·C]`` and do one matrix product;
* ``"loop"``: K gathers of ``[N, C]`` and K accumulating products (less memory traffic
  per product; the stride-1 centre tap needs no gather at all);
* ``"pairs"``: MinkowskiEngine's algorithm: per tap, gather only the neighbours that
  exist, multiply, scatter-add (fewest FLOPs where many neighbours are absent).

A fourth, ``"dense"``, skips the tables' gathers altogether: the dense conv of the
zero-filled map, read at the output sites (:class:`DenseConvFunction`); ``"auto"`` takes it
where nearly every site exists (:func:`choose_conv_path`), as at mask ratio 0.

Non-overlapping convs always take ``"gemm"`` (no tap is absent, and the input gradient
is a single product). Reduced-precision inputs (bf16, fp16) always take ``"gemm"`` (and a
materialised mirrored gather for the stride-1 input gradient): each single product
accumulates in fp32 and rounds once.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from spark_me.ops.tables import NeighbourTables

ALGORITHMS = ("auto", "gemm", "loop", "pairs", "dense")
LOW_PRECISION = (torch.bfloat16, torch.float16)
# fp32 on CPU, 1 thread, 3×3 convs at ResNet-50 sizes (batch 8, 224 px, 40% visible),
# forward+backward: "loop" was fastest or tied from 16 up to 256 input channels, "gemm" at
# 512; "pairs" (MinkowskiEngine's algorithm) tied at 256 and lost elsewhere. Below 16
# input channels a tap's product is too thin for BLAS: the ResNet stem (3 -> 64, 7×7/2,
# batch 8, 224 px) took 692 ms by "loop" and 75 ms by "gemm"; at 8 channels "gemm" still
# took 0.2-0.7× of "loop"'s time, at 16 "loop" won again.
GEMM_MIN_CHANNELS = 512
GEMM_MAX_NARROW_CHANNELS = 15
# Small gathers take "gemm" whatever the channels: "loop" runs about 9× as many ops per
# pass, and below this many gathered elements (rows × taps × channels) their fixed cost
# outweighs the smaller copies. 3×3 convs at `make bench-quick`'s sizes (ResNet-18, batch
# 4, 128 px: 0.1-0.9 M elements), forward+backward on an AVX-512 CPU: "gemm" took 0.60-0.79×
# of "loop"'s time (2 threads, OMP_WAIT_POLICY=PASSIVE), 0.71-0.79× (1 thread). With
# torch, MKL and oneDNN held to AVX2 on the same CPU: 0.95-1.08× per conv at 1 thread, and
# the whole ResNet-18 encoder at 2 threads (PASSIVE) 0.85× (0.130 s -> 0.111 s); at ResNet-50's
# sizes "loop" still won there at 64 and 128 channels (0.91-0.94× of "gemm"), as above.
GEMM_MAX_GATHERED = 2**20


def choose_algorithm(channels: int, dtype: torch.dtype, algorithm: str = "auto", gathered: Optional[int] = None) -> str:
    """The gather-product algorithm for ``channels`` gathered channels of ``dtype``;
    ``gathered``: the elements (rows × taps × channels) "gemm" would gather at once (None:
    unknown, taken as large)."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown sparse conv algorithm {algorithm!r}; choose from {', '.join(ALGORITHMS)}")
    if dtype in LOW_PRECISION:
        return "gemm"
    if algorithm != "auto":
        return algorithm
    small = gathered is not None and gathered <= GEMM_MAX_GATHERED
    wide, narrow = channels >= GEMM_MIN_CHANNELS, channels <= GEMM_MAX_NARROW_CHANNELS
    return "gemm" if small or wide or narrow else "loop"


def _pad(x: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """``x`` with one extra row of ``fill``: the row an absent neighbour's index points to."""
    return torch.cat([x, x.new_full((1, x.shape[1]), fill)])


def _gather_columns(src: torch.Tensor, table: torch.Tensor, complete: bool = False) -> torch.Tensor:
    """``[n, K·C]``: row ``n`` holds ``src[table[t, n]]`` for every tap ``t`` (zero if absent;
    ``complete``: no entry is absent, so no zero row is needed)."""
    volume, n = table.shape
    rows = src if complete else _pad(src)
    return rows.index_select(0, table.t().reshape(-1)).view(n, volume * src.shape[1])


def _tap_block(w_rows: torch.Tensor, t: int, c_in: int) -> torch.Tensor:
    """Tap ``t``'s ``[C_out, C_in]`` weight: a column block of ``[C_out, K·C_in]`` (a strided
    view that matrix products read in place)."""
    return w_rows[:, t * c_in : (t + 1) * c_in]


def _loop_product(
    src: torch.Tensor, weights: list[torch.Tensor], table: torch.Tensor, centre: int
) -> torch.Tensor:
    """``Σ_t src[table[t]] · weights[t]`` by tap; tap ``centre`` (if ``>= 0``) reads ``src``
    itself, as a stride-1 table maps each site to itself there."""
    padded = _pad(src)
    out = src @ weights[centre] if centre >= 0 else padded.index_select(0, table[0]) @ weights[0]
    for t, w in enumerate(weights):
        if t != centre and (centre >= 0 or t > 0):
            out.addmm_(padded.index_select(0, table[t]), w)
    return out


def _pairs_product(
    src: torch.Tensor, weights: list[torch.Tensor], pairs: list[tuple[torch.Tensor, torch.Tensor]], centre: int,
    n_dst: int, forward: bool,
) -> torch.Tensor:
    """MinkowskiEngine's algorithm: per tap, gather the rows that exist, multiply, scatter-add.

    ``forward``: ``dst[o] += src[i] · weights[t]`` over tap t's pairs (i, o); otherwise the
    transposed direction ``dst[i] += src[o] · weights[t]``. Tap ``centre`` (stride 1, if
    ``>= 0``) pairs every site with itself and initialises ``dst``.
    """
    dst = src @ weights[centre] if centre >= 0 else src.new_zeros(n_dst, weights[0].shape[1])
    for t, (in_rows, out_rows) in enumerate(pairs):
        if t == centre or len(in_rows) == 0:
            continue
        read, write = (in_rows, out_rows) if forward else (out_rows, in_rows)
        dst.index_add_(0, write, src.index_select(0, read) @ weights[t])
    return dst


class SparseConvFunction(torch.autograd.Function):
    """Sparse conv on neighbour tables with a PyTorch-layout weight; see the module docstring.

    Every algorithm reads the weight as ``[C_out, K·C_in]`` (columns ``t·C_in + i``): one
    per-output-channel reordering of PyTorch's ``[C_out, C_in, kh, kw]``, saved for
    backward; a tap's ``[C_out, C_in]`` weight is a column block of it, which matrix
    products read in place (no other weight copy in forward or backward).
    """

    @staticmethod
    def forward(ctx, features: torch.Tensor, weight: torch.Tensor, tables: NeighbourTables, algorithm: str):
        c_out, c_in, k, _ = weight.shape
        volume = k * k
        gathered = tables.n_out * volume * c_in
        algorithm = "gemm" if tables.stride >= k else choose_algorithm(c_in, features.dtype, algorithm, gathered)
        w_rows = weight.permute(0, 2, 3, 1).reshape(c_out, volume * c_in)
        ctx.save_for_backward(features, w_rows)
        ctx.tables, ctx.algorithm, ctx.shape = tables, algorithm, weight.shape
        if algorithm == "gemm":
            return _gather_columns(features, tables.forward, tables.complete) @ w_rows.t()
        taps = [_tap_block(w_rows, t, c_in).t() for t in range(volume)]
        centre = volume // 2 if tables.stride == 1 else -1
        if algorithm == "loop":
            return _loop_product(features, taps, tables.forward, centre)
        return _pairs_product(features, taps, tables.pairs, centre, tables.n_out, forward=True)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        features, w_rows = ctx.saved_tensors
        tables: NeighbourTables = ctx.tables
        c_out, c_in, k, _ = ctx.shape
        volume = k * k
        centre = volume // 2 if tables.stride == 1 else -1
        grad = grad.contiguous()
        grad_in = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_in = _input_grad(grad, w_rows, tables, ctx.algorithm, c_in)
        if ctx.needs_input_grad[1]:
            if ctx.algorithm == "gemm":
                grad_rows = grad.t() @ _gather_columns(features, tables.forward, tables.complete)
            else:
                grad_rows = grad.new_empty(c_out, volume * c_in)
                padded = _pad(features) if ctx.algorithm == "loop" else None
                for t in range(volume):
                    if t == centre:
                        block = grad.t() @ features
                    elif padded is not None:
                        block = grad.t() @ padded.index_select(0, tables.forward[t])
                    else:
                        in_rows, out_rows = tables.pairs[t]
                        block = grad.index_select(0, out_rows).t() @ features.index_select(0, in_rows)
                    _tap_block(grad_rows, t, c_in).copy_(block)
            # [out, in, kh, kw] in channels_last memory: a view, the layout SparseConv2d keeps
            grad_w = grad_rows.view(c_out, k, k, c_in).permute(0, 3, 1, 2)
        return grad_in, grad_w, None, None


def _input_grad(grad: torch.Tensor, w_rows: torch.Tensor, tables: NeighbourTables, algorithm: str, c_in: int) -> torch.Tensor:
    """The input gradient of :class:`SparseConvFunction`."""
    volume = tables.forward.shape[0]
    stride_one = tables.stride == 1
    low_precision = grad.dtype in LOW_PRECISION
    if stride_one:  # T is its own transpose with the taps mirrored
        if low_precision:  # one product, accumulated in fp32, rounded once
            c_out = w_rows.shape[0]
            w_cols = w_rows.view(c_out, volume, c_in).flip(1).transpose(0, 1).reshape(volume * c_out, c_in)
            return _gather_columns(grad, tables.forward) @ w_cols
        mirrored = [_tap_block(w_rows, volume - 1 - t, c_in) for t in range(volume)]
        if algorithm == "pairs":
            return _pairs_product(grad, [_tap_block(w_rows, t, c_in) for t in range(volume)], tables.pairs,
                                  volume // 2, tables.n_in, forward=False)
        return _loop_product(grad, mirrored, tables.forward, volume // 2)
    if algorithm == "pairs":
        taps = [_tap_block(w_rows, t, c_in) for t in range(volume)]
        return _pairs_product(grad, taps, tables.pairs, -1, tables.n_in, forward=False)
    # strided: one product g · W for every (output, tap), scattered to the input rows
    per_tap = (grad @ w_rows).view(-1, c_in)
    padded = torch.zeros(tables.n_in + 1, c_in, dtype=torch.promote_types(grad.dtype, torch.float32), device=grad.device)
    if tables.stride * tables.stride >= volume:  # non-overlapping: each input row feeds at most one (output, tap)
        padded.index_copy_(0, tables.forward.t().reshape(-1).long(), per_tap.to(padded.dtype))
    else:
        padded.index_add_(0, tables.forward.t().reshape(-1), per_tap.to(padded.dtype))
    return padded[: tables.n_in].to(grad.dtype)


class DenseConvFunction(torch.autograd.Function):
    """Sparse conv by the dense conv of the zero-filled map, read at the output sites.

    Exact (absent sites are zero, and a site's output only reads its neighbourhood), and
    the choice where nearly every site exists: one oneDNN/cuDNN kernel beats K gathers and
    products once the masked sites' wasted arithmetic is small. Odd kernels pad by k//2
    (centred taps), even ones (k = stride, MinkowskiEngine's [0, k) taps) not at all. Only
    the sparse features, the weight and the tables are kept for backward.

    bf16/fp16 features (only where the caller asks for ``"dense"``: ``"auto"`` gathers
    them) are convolved in fp32 and rounded once, forward and backward: on CPUs with AMX,
    torch 2.14.1's oneDNN bf16 conv returns wrong values for some small-channel shapes
    (relative error about 1 at 16 -> 8 channels, 4×4/4, and at 8 channels, 8×8/1; found by
    tests/test_ops.py's bf16 bound), and its bf16 input gradient of a 3×3 conv missed that
    bound by 6%.
    """

    @staticmethod
    def forward(ctx, features: torch.Tensor, weight: torch.Tensor, tables: NeighbourTables):
        grid = tables.dense_grid
        k, s = tables.kernel_size, tables.stride
        dtype = torch.promote_types(features.dtype, torch.float32)
        dense = _scatter_dense(features.to(dtype), grid.in_shape, grid.in_flat)
        out = F.conv2d(dense, weight.to(dtype), stride=s, padding=k // 2 if k % 2 else 0)
        ctx.save_for_backward(features, weight)
        ctx.tables = tables
        return _gather_sites(out, grid.out_flat).to(features.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        features, weight = ctx.saved_tensors
        tables: NeighbourTables = ctx.tables
        grid = tables.dense_grid
        k, s = tables.kernel_size, tables.stride
        pad = k // 2 if k % 2 else 0
        dtype = torch.promote_types(grad.dtype, torch.float32)  # bf16/fp16: in fp32 (see above)
        grad_in, grad_w, _ = torch.ops.aten.convolution_backward(
            _scatter_dense(grad.contiguous().to(dtype), grid.out_shape, grid.out_flat),
            _scatter_dense(features.to(dtype), grid.in_shape, grid.in_flat), weight.to(dtype), None,
            [s, s], [pad, pad], [1, 1], False, [0, 0], 1, [ctx.needs_input_grad[0], ctx.needs_input_grad[1], False],
        )
        grad_in = _gather_sites(grad_in, grid.in_flat).to(features.dtype) if ctx.needs_input_grad[0] else None
        return grad_in, (grad_w.to(weight.dtype) if grad_w is not None else None), None


# The densest share of existing sites at which the gather algorithms still beat the dense
# conv of the zero-filled map (see choose_conv_path); below it sparse arithmetic pays.
DENSE_MIN_DENSITY = 0.9


def choose_conv_path(features: torch.Tensor, tables: NeighbourTables, algorithm: str = "auto") -> str:
    """``"dense"`` (:class:`DenseConvFunction`) or ``"gather"`` (:class:`SparseConvFunction`).

    ``"auto"`` takes the dense conv where at least ``DENSE_MIN_DENSITY`` of the input map's
    sites exist (at SparK's mask ratios, 0.25-0.9 of the patches are hidden: the gathers),
    except in bf16/fp16 (whose dense backward runs in fp32)."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown sparse conv algorithm {algorithm!r}; choose from {', '.join(ALGORITHMS)}")
    k, s = tables.kernel_size, tables.stride
    # 1×1 convs gain nothing from it (one gather and one product already), and torch
    # 2.14.1's CPU weight gradient of a channels_last 1×1/2 conv is wrong for some channel
    # counts (0.95 relative error at 3 -> 64 channels; seen in tests/test_ops.py).
    supported = k > 1 and (k % 2 == 1 or k == s)
    if algorithm == "dense":
        if not supported:
            raise ValueError(f"the dense algorithm needs a kernel > 1, odd or equal to the stride, got {k}×{k}/{s}")
        return "dense"
    if algorithm != "auto" or not supported or features.dtype in LOW_PRECISION:
        return "gather"
    b, h, w = tables.dense_shape
    return "dense" if features.shape[0] >= DENSE_MIN_DENSITY * b * h * w else "gather"


def sparse_conv(features: torch.Tensor, weight: torch.Tensor, tables: NeighbourTables, algorithm: str = "auto") -> torch.Tensor:
    """``features`` ``[n_in, C_in]``, PyTorch-layout ``weight`` ``[C_out, C_in, k, k]`` -> ``[n_out, C_out]``."""
    if choose_conv_path(features, tables, algorithm) == "dense":
        return DenseConvFunction.apply(features, weight, tables)
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


def _scatter_dense(features: torch.Tensor, shape: tuple[int, int, int], flat: torch.Tensor) -> torch.Tensor:
    """``[N, C]`` rows into a zero ``(B, C, H, W)`` map in channels_last memory at ``flat``."""
    b, h, w = shape
    if len(flat) == b * h * w:  # every site exists: the copy writes every row, no zero fill
        dense = features.new_empty(b * h * w, features.shape[1])
    else:
        dense = features.new_zeros(b * h * w, features.shape[1])
    dense.index_copy_(0, flat, features)
    return dense.view(b, h, w, -1).permute(0, 3, 1, 2)


def _gather_sites(dense: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """The rows at ``flat`` of a ``(B, C, H, W)`` map, as ``[N, C]``."""
    return dense.permute(0, 2, 3, 1).reshape(-1, dense.shape[1]).index_select(0, flat)


class DenseDepthwiseConvFunction(torch.autograd.Function):
    """Depthwise submanifold conv by a dense depthwise conv on the zero-filled map.

    A submanifold conv's output at a site is the dense conv of the map that is zero at
    absent sites, read at that site: exact, not an approximation. Per site it does K
    multiply-adds per channel over the whole map instead of the visible sites only, but
    as one cuDNN/oneDNN kernel rather than K gathers and K elementwise kernels (on a GPU
    the per-tap launches, not the arithmetic, dominated: 49 taps × 3 passes per 7×7
    layer). Only the sparse features, the weight and the tables are kept for backward;
    the dense maps are rebuilt there. The input gradient is the forward conv with the taps
    mirrored (a dense backward-input kernel missed the bf16 bound of tests/test_ops.py on
    CPU, the forward kernel meets it); the weight gradient is :func:`depthwise_weight_grad`.
    bf16/fp16 on CPU compute in float32 (:func:`_dense_depthwise_dtype`).
    """

    @staticmethod
    def forward(ctx, features: torch.Tensor, weight: torch.Tensor, tables: NeighbourTables):
        grid = tables.dense_grid
        shape, flat = grid.in_shape, grid.in_flat
        k = tables.kernel_size
        dtype = _dense_depthwise_dtype(features)
        w = weight.to(dtype).t().reshape(-1, 1, k, k)
        out = F.conv2d(_scatter_dense(features.to(dtype), shape, flat), w, padding=k // 2, groups=w.shape[0])
        ctx.save_for_backward(features, weight)
        ctx.tables = tables
        return _gather_sites(out, flat).to(features.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        features, weight = ctx.saved_tensors
        tables: NeighbourTables = ctx.tables
        grid = tables.dense_grid
        shape, flat = grid.in_shape, grid.in_flat
        k = tables.kernel_size
        dtype = _dense_depthwise_dtype(features)
        w = weight.to(dtype).t().reshape(-1, 1, k, k)
        grad_dense = _scatter_dense(grad.contiguous().to(dtype), shape, flat)
        grad_in = grad_weight = None
        if ctx.needs_input_grad[0]:  # the forward conv with the taps mirrored (stride 1, centred kernel)
            grad_in = F.conv2d(grad_dense, w.flip(-2, -1), padding=k // 2, groups=w.shape[0])
            grad_in = _gather_sites(grad_in, flat).to(features.dtype)
        if ctx.needs_input_grad[1]:
            features_dense = _scatter_dense(features.to(dtype), shape, flat)
            grad_weight = depthwise_weight_grad(grad_dense, features_dense, k).t().to(weight.dtype)
        return grad_in, grad_weight, None


def _dense_depthwise_dtype(features: torch.Tensor) -> torch.dtype:
    """The dtype :class:`DenseDepthwiseConvFunction` computes ``features`` in: float32 for
    bf16/fp16 on CPU (rounded once at the end), where oneDNN's bf16 depthwise conv took
    2.4-9× its float32 time even on a CPU with AMX (forward+backward, 1 thread, 7×7 at
    ConvNeXt-T's stages, batch 8); their own dtype elsewhere."""
    if features.device.type == "cpu" and features.dtype in LOW_PRECISION:
        return torch.float32
    return features.dtype


DEPTHWISE_WEIGHT_GRAD_METHODS = ("auto", "backward", "correlate")


def depthwise_weight_grad(
    grad: torch.Tensor, features: torch.Tensor, kernel_size: int, method: str = "auto"
) -> torch.Tensor:
    """The ``[C, K]`` weight gradient (PyTorch tap order) of a stride-1 depthwise conv with
    a centred ``kernel_size`` kernel, from the ``(B, C, H, W)`` input map and output gradient.

    ``"backward"`` is the framework's depthwise weight-gradient kernel. ``"correlate"`` is
    the same sum as a forward depthwise conv: with every (sample, channel) pair a group,
    the padded input map correlated with the output gradient as the kernel gives the k×k
    gradient of that pair, summed over the samples. ``"auto"`` takes ``"correlate"`` for
    float32 on CPU: oneDNN's forward depthwise kernel takes any kernel size, while its
    weight-gradient kernel for the channels_last maps the torch backend builds is a slow
    generic one. Measured on an AVX-512 CPU, 1 thread, 7×7 at ConvNeXt-T's stages (batch 8,
    224 px; maps 56² to 7², 96 to 768 channels), layout copies included: 0.78×, 0.50×, 0.40×
    and 0.10× of ``"backward"``'s time; with oneDNN held to its AVX2 kernels on the same CPU
    (``ONEDNN_MAX_CPU_ISA=AVX2``): 1.03×, 0.56×, 0.56× and 0.39×. CUDA (cuDNN) and float64
    keep ``"backward"``.
    """
    if method not in DEPTHWISE_WEIGHT_GRAD_METHODS:
        raise ValueError(f"unknown depthwise weight-gradient method {method!r}; "
                         f"choose from {', '.join(DEPTHWISE_WEIGHT_GRAD_METHODS)}")
    b, c, h, w = features.shape
    k, pad = kernel_size, kernel_size // 2
    if method == "auto":
        method = "correlate" if features.device.type == "cpu" and features.dtype == torch.float32 else "backward"
    if method == "backward":
        _, grad_w, _ = torch.ops.aten.convolution_backward(
            grad, features, features.new_zeros(c, 1, k, k), None,  # only its shape is read
            [1, 1], [pad, pad], [1, 1], False, [0, 0], c, [False, True, False],
        )
        return grad_w.reshape(c, k * k)
    padded = features.new_zeros(b, c, h + 2 * pad, w + 2 * pad)  # contiguous: one group per (sample, channel)
    padded[:, :, pad : pad + h, pad : pad + w] = features
    kernels = grad.contiguous().view(b * c, 1, h, w)
    per_pair = F.conv2d(padded.view(1, b * c, h + 2 * pad, w + 2 * pad), kernels, groups=b * c)
    return per_pair.view(b, c, k * k).sum(0)


DEPTHWISE_ALGORITHMS = ("auto", "gather", "dense")


def depthwise_conv(features: torch.Tensor, weight: torch.Tensor, tables: NeighbourTables, algorithm: str = "auto") -> torch.Tensor:
    """Depthwise conv: ``features`` ``[N, C]``, ``weight`` ``[K, C]`` (PyTorch tap order).

    ``algorithm``: ``"dense"`` (also ``"auto"``) runs one dense depthwise kernel per pass on
    the zero-filled map (:class:`DenseDepthwiseConvFunction`), ``"gather"`` K gathers and
    multiply-adds per pass (:class:`DepthwiseConvFunction`). The gathers lost everywhere they
    were measured: on CPU (1 thread, 7×7 forward+backward at ConvNeXt-T's stages, batch 8,
    mask 0.6) they took 2.3-5.7× the dense conv's time in fp32 and 3.4-5.5× in bf16 (on a
    CPU with AMX, the dense conv computing in fp32); on CUDA they cost K launches per pass,
    about 11 ms per 7×7 layer at ConvNeXt-T's batch 128 in bf16 (profiled on an H200).
    """
    if algorithm not in DEPTHWISE_ALGORITHMS:
        raise ValueError(f"unknown depthwise algorithm {algorithm!r}; choose from {', '.join(DEPTHWISE_ALGORITHMS)}")
    if tables.stride != 1:
        raise ValueError(f"the depthwise conv is submanifold (stride 1), got stride {tables.stride}")
    if algorithm == "gather":
        return DepthwiseConvFunction.apply(features, weight, tables)
    return DenseDepthwiseConvFunction.apply(features, weight, tables)


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
        rows = torch.gather(tables.forward.t().long(), 1, best.long())  # [n_out, C] input row of each max
        grad_in = grad.new_zeros(tables.n_in + 1, grad.shape[1])
        grad_in.scatter_add_(0, rows, grad.contiguous())
        return grad_in[: tables.n_in], None


def gather_max(features: torch.Tensor, tables: NeighbourTables) -> torch.Tensor:
    """Max-pool ``features`` ``[n_in, C]`` over each output site's existing neighbours."""
    if tables.forward.shape[0] > 256:
        raise ValueError(f"gather_max supports kernels of at most 256 taps, got {tables.forward.shape[0]}")
    return GatherMaxFunction.apply(features, tables)
