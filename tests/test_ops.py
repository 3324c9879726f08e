"""The sparse ops of every backend against dense references: forward and both gradients.

References are dense PyTorch layers on a map that is zero at absent sites, re-masked at
the output (the masked-dense semantics). Gradients are compared at the sites that exist.

bf16 bound. Inputs, weights and output gradients are rounded to bf16 first, so the
reference (float64 on the same values) sees exactly what the op sees. An op that
accumulates in fp32 and rounds its result once to bf16 then errs, per output element,
by at most ``u·|y| + n·2⁻²⁴·Σ|w·x|`` (``u = 2⁻⁸``, bf16's unit roundoff; ``n`` products
summed in fp32), hence in norm ``‖Δy‖/‖y‖ ≤ u + n·2⁻²⁴·‖A‖/‖y‖`` with ``A`` the same op on
``|x|`` and ``|w|`` (:func:`bf16_bound`). An op that rounded partial sums to bf16 would
exceed it. Under autocast the inputs are rounded inside the op, adding ``(2u+u²)·‖A‖/‖y‖``.
"""
from __future__ import annotations

import MinkowskiEngine as ME
import pytest
import torch
import torch.nn.functional as F

from conftest import CUDA_READY, NEEDS_CUDA, TOL, HostSyncAudit, rel_err
from masked_dense import mask_at
from spark_me import ops
from spark_me.ops import torch_backend
from spark_me import build_sparse_encoder
from spark_me.gather import site_mask, to_dense, to_sparse
from spark_me.layers import SparseBatchNorm2d, SparseConv2d, SparseLayerNorm, SparseMaxPool2d, set_conv_impl
from spark_me.masking import random_patch_mask

U_BF16 = 2.0**-8
U_FP32 = 2.0**-24
# (kernel, stride) of every conv the encoders use, plus other odd submanifold kernels.
CONV_SHAPES = [(3, 1), (5, 1), (7, 1), (3, 2), (7, 2), (1, 2), (4, 4), (2, 2)]
# (backend, gather algorithm); the algorithm only matters for "torch".
BACKENDS = [("torch", "gemm"), ("torch", "loop"), ("torch", "pairs"), ("torch", "dense"), ("minkowski", "auto")]


def _active(batch: int = 3, grid: tuple[int, int] = (2, 3), seed: int = 0) -> torch.Tensor:
    """A random patch mask where sample 0 has exactly one visible patch."""
    active = random_patch_mask(batch, grid, 0.5, torch.Generator().manual_seed(seed))
    active[0] = False
    active[0, -1, -1] = True
    return active


def _sparse(dense: torch.Tensor, active: torch.Tensor, tensor_stride: int) -> tuple[ME.SparseTensor, torch.Tensor]:
    """The sites of ``dense`` (B, C, h, w at ``tensor_stride``) under the patch mask, as a
    SparseTensor, and the leaf tensor of its features (its ``.grad`` is the input gradient)."""
    m = mask_at(active, tensor_stride)[:, 0]
    coords = m.nonzero().int()
    leaf = dense.permute(0, 2, 3, 1)[m].detach().clone().requires_grad_()
    coords[:, 1:] *= tensor_stride
    x = ME.SparseTensor(
        leaf, coordinates=coords.contiguous(), tensor_stride=tensor_stride,
        coordinate_manager=ops.new_coordinate_manager(coords),
    )
    return x, leaf


def _inputs(channels: int, dtype: torch.dtype, tensor_stride: int = 1, seed: int = 0, positive: bool = False):
    """(dense zero-filled input requiring grad, sparse input, active) at ``tensor_stride``."""
    active = _active(seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    h, w = 64 // tensor_stride, 96 // tensor_stride
    x = torch.randn(3, channels, h, w, generator=g, dtype=torch.float64)
    if positive:  # distinct positive values: max-pool has no ties
        x = x.abs() + 0.1
    x = (x * mask_at(active, tensor_stride)).to(dtype)
    xs, leaf = _sparse(x, active, tensor_stride)
    return x.clone().requires_grad_(), xs, leaf, active


def _dense_conv(x: torch.Tensor, weight: torch.Tensor, stride: int, groups: int = 1) -> torch.Tensor:
    k = weight.shape[-1]
    return F.conv2d(x, weight, stride=stride, padding=k // 2 if k % 2 else 0, groups=groups)


def _compare(out: ME.SparseTensor, features: torch.Tensor, weight: torch.Tensor, x: torch.Tensor,
             dense_w: torch.Tensor, expected: torch.Tensor, active: torch.Tensor, in_stride: int,
             out_stride: int, tol: float) -> None:
    """Forward, input gradient and weight gradient of a sparse op against the dense one."""
    b, _, h, w = expected.shape
    assert torch.equal(site_mask(out, b, (h, w)), mask_at(active, out_stride)[:, 0])
    assert rel_err(to_dense(out, b, (h, w)), expected) <= tol
    grad_out = torch.randn(expected.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    grad_out = (grad_out * mask_at(active, out_stride)).to(expected.dtype)
    (to_dense(out, b, (h, w)) * grad_out).sum().backward()
    (expected * grad_out).sum().backward()
    m = mask_at(active, in_stride)
    got_grad_in = _scatter(features.grad, x.shape, active, in_stride)
    assert rel_err(got_grad_in, x.grad * m) <= tol
    if weight is not None:
        assert rel_err(weight.grad.reshape(dense_w.grad.shape), dense_w.grad) <= tol


def _scatter(features: torch.Tensor, shape, active: torch.Tensor, stride: int) -> torch.Tensor:
    """Rows in the site order of :func:`_sparse` back into a dense (B, C, h, w) map."""
    m = mask_at(active, stride)[:, 0]
    dense = features.new_zeros(shape[0], shape[2], shape[3], shape[1])
    dense[m] = features
    return dense.permute(0, 3, 1, 2)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("backend,algorithm", BACKENDS)
@pytest.mark.parametrize("kernel,stride", CONV_SHAPES)
def test_conv_forward_and_gradients(kernel, stride, backend, algorithm, dtype):
    tensor_stride = 2 if stride == 2 and kernel == 3 else 1  # also a strided conv on a strided map
    x, xs, leaf, active = _inputs(5, dtype, tensor_stride)
    dense_w = torch.randn(6, 5, kernel, kernel, dtype=dtype, requires_grad=True)
    weight = dense_w.detach().clone().requires_grad_()
    if algorithm == "dense" and kernel == 1:
        with pytest.raises(ValueError, match="kernel > 1"):
            ops.conv(xs, weight, stride, backend, algorithm)
        return
    features, key = ops.conv(xs, weight, stride, backend, algorithm)
    out = ME.SparseTensor(features, coordinate_map_key=key, coordinate_manager=xs.coordinate_manager)
    expected = _dense_conv(x, dense_w, stride) * mask_at(active, tensor_stride * stride)
    _compare(out, leaf, weight, x, dense_w, expected, active, tensor_stride, tensor_stride * stride, TOL[dtype])


@pytest.mark.parametrize("kernel,stride", [(3, 1), (3, 2), (1, 2), (2, 2)])
def test_gather_algorithms_equal_minkowski(kernel, stride):
    """Every gather algorithm gives MinkowskiEngine's own result (float64, same sites)."""
    _, xs, _, _ = _inputs(4, torch.float64, seed=3)
    weight = torch.randn(5, 4, kernel, kernel, dtype=torch.float64)
    ref, ref_key = ops.conv(xs, weight, stride, "minkowski")
    for algorithm in ("gemm", "loop", "pairs") + (("dense",) if kernel > 1 else ()):
        got, key = ops.conv(xs, weight, stride, "torch", algorithm)
        assert key == ref_key
        assert rel_err(got, ref) <= 1e-12


def _depthwise(xs: ME.SparseTensor, weight: torch.Tensor, backend: str, algorithm: str) -> torch.Tensor:
    """The depthwise op through the dispatcher, or the torch backend with a given algorithm."""
    if backend == "minkowski" or algorithm == "auto":
        return ops.depthwise_conv(xs, weight, backend)
    tables = ops.neighbour_tables(xs, weight.shape[-1], 1)
    return torch_backend.depthwise_conv(xs.F, weight.flatten(1).t(), tables, algorithm)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("backend,algorithm", [("torch", "gather"), ("torch", "dense"), ("minkowski", "auto")])
@pytest.mark.parametrize("kernel", [3, 7])
def test_depthwise_forward_and_gradients(kernel, backend, algorithm, dtype):
    x, xs, leaf, active = _inputs(4, dtype)
    dense_w = torch.randn(4, 1, kernel, kernel, dtype=dtype, requires_grad=True)
    weight = dense_w.detach().clone().requires_grad_()
    features = _depthwise(xs, weight, backend, algorithm)
    out = ME.SparseTensor(features, coordinate_map_key=xs.coordinate_map_key, coordinate_manager=xs.coordinate_manager)
    expected = _dense_conv(x, dense_w, 1, groups=4) * mask_at(active, 1)
    _compare(out, leaf, weight, x, dense_w, expected, active, 1, 1, TOL[dtype])


@pytest.mark.parametrize("algorithm", ["gather", "dense"])
def test_depthwise_bf16_within_derived_bound(algorithm):
    x64, xs, leaf, active = _bf16_inputs(16)
    check_depthwise_bf16(x64, xs, leaf, active, 1, 7, lambda x, w: _depthwise(x, w, "torch", algorithm))


@pytest.mark.parametrize("method", ["backward", "correlate"])
@pytest.mark.parametrize("shape,kernel", [((2, 5, 9, 7), 3), ((3, 4, 1, 1), 7), ((2, 3, 5, 6), 5), ((1, 2, 12, 3), 7)])
def test_depthwise_weight_grad_methods_equal_autograd(shape, kernel, method):
    """Both ways of summing the dense depthwise weight gradient give autograd's (float64;
    maps smaller than the kernel and non-square ones included), and float32 in channels_last
    (the torch backend's maps; ``"auto"`` takes ``"correlate"`` there) is within TOL."""
    g = torch.Generator().manual_seed(sum(shape) + kernel)
    x, grad = (torch.randn(*shape, dtype=torch.float64, generator=g) for _ in range(2))
    c = shape[1]
    weight = torch.zeros(c, 1, kernel, kernel, dtype=torch.float64, requires_grad=True)
    F.conv2d(x, weight, padding=kernel // 2, groups=c).backward(grad)
    expected = weight.grad.reshape(c, kernel * kernel)
    assert rel_err(torch_backend.depthwise_weight_grad(grad, x, kernel, method), expected) <= TOL[torch.float64]
    x32, grad32 = (t.float().contiguous(memory_format=torch.channels_last) for t in (x, grad))
    got = torch_backend.depthwise_weight_grad(grad32, x32, kernel, method)
    assert got.dtype == torch.float32 and rel_err(got, expected) <= TOL[torch.float32]
    if method == "correlate":
        assert torch.equal(torch_backend.depthwise_weight_grad(grad32, x32, kernel), got)  # what "auto" runs on CPU
    with pytest.raises(ValueError, match="unknown depthwise weight-gradient method 'gemm'"):
        torch_backend.depthwise_weight_grad(grad, x, kernel, "gemm")


@pytest.mark.parametrize("kernel,stride", [(3, 1), (7, 2), (3, 2), (2, 2)])
def test_dense_algorithms_on_a_complete_map(kernel, stride):
    """Where every site exists the dense algorithms scatter into uninitialised memory (no
    zero fill): forward and both gradients must still equal the gathers'. A freed map of
    NaNs of the same size goes first, so that stale memory would show."""
    b, c, h, w = 2, 3, 8, 12
    x = torch.randn(b, c, h, w, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    coords = torch.ones(b, h, w, dtype=torch.bool).nonzero().int().contiguous()
    grad = torch.randn(b * (h // stride) * (w // stride), c, dtype=torch.float64)
    results = []
    for algorithm in ("gemm", "dense"):
        xs = ME.SparseTensor(x.permute(0, 2, 3, 1).reshape(-1, c).clone(), coordinates=coords,
                             coordinate_manager=ops.new_coordinate_manager(coords))
        leaf = xs.F.detach().clone().requires_grad_()
        tables = ops.neighbour_tables(xs, kernel, stride)
        if algorithm == "dense":
            assert len(tables.dense_grid.in_flat) == b * h * w  # the uninitialised-memory case
        depthwise = kernel % 2 == 1 and stride == 1
        weight = torch.randn(c, c, kernel, kernel, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        weight = (weight[:, 0].flatten(1).t() if depthwise else weight).contiguous().requires_grad_()
        stale = torch.full((b * h * w, c), float("nan"), dtype=torch.float64)
        del stale  # freed just before the op allocates its map of the same size
        if depthwise:
            out = torch_backend.depthwise_conv(leaf, weight, tables, "gather" if algorithm == "gemm" else "dense")
        else:
            out = torch_backend.sparse_conv(leaf, weight, tables, algorithm)
        out.backward(grad[: len(out)])
        results.append((out.detach(), leaf.grad, weight.grad))
    for got, ref in zip(results[1], results[0]):
        assert torch.isfinite(got).all() and rel_err(got, ref) <= 1e-12


def test_auto_takes_the_dense_conv_only_where_nearly_every_site_exists():
    images = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    full = torch.ones(2, 2, 2, dtype=torch.bool)
    half = full.clone()
    half[:, 0] = False
    from spark_me.gather import to_sparse

    for active, path in ((full, "dense"), (half, "gather")):
        xs = to_sparse(images, active, 32)
        for k, s in ((3, 1), (3, 2), (2, 2)):
            assert torch_backend.choose_conv_path(xs.F, ops.neighbour_tables(xs, k, s)) == path
    xs = to_sparse(images, full, 32)
    assert torch_backend.choose_conv_path(xs.F, ops.neighbour_tables(xs, 4, 2)) == "gather"  # unsupported
    assert torch_backend.choose_conv_path(xs.F.bfloat16(), ops.neighbour_tables(xs, 3, 1)) == "gather"
    with pytest.raises(ValueError, match="kernel > 1, odd or equal to the stride"):
        torch_backend.choose_conv_path(xs.F, ops.neighbour_tables(xs, 4, 2), "dense")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_depthwise_auto_is_the_dense_conv_and_bf16_on_cpu_computes_in_fp32(dtype):
    """"auto" runs the dense depthwise conv in every dtype (the gathers lost everywhere
    measured); on CPU bf16 runs it in fp32 and rounds once, so its output is the fp32
    result rounded to bf16."""
    _, xs, _, _ = _inputs(4, torch.float64)
    tables = ops.neighbour_tables(xs, 7, 1)
    weight = torch.randn(49, 4, dtype=torch.float64)
    features = xs.F.to(dtype).requires_grad_()
    out = torch_backend.depthwise_conv(features, weight.to(dtype), tables)
    assert type(out.grad_fn).__name__ == "DenseDepthwiseConvFunctionBackward" and out.dtype == dtype
    fp32 = torch_backend.depthwise_conv(features.detach().float(), weight.to(dtype).float(), tables, "dense")
    assert torch.equal(out.detach(), fp32.to(dtype))
    with pytest.raises(ValueError, match="unknown depthwise algorithm 'loop'"):
        torch_backend.depthwise_conv(features, weight.to(dtype), tables, "loop")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("backend", ["torch", "minkowski"])
@pytest.mark.parametrize("stride", [1, 2])
def test_max_pool_forward_and_gradient(stride, backend, dtype):
    x, xs, leaf, active = _inputs(4, dtype, positive=True)
    features, key = ops.max_pool(xs, 3, stride, backend)
    out = ME.SparseTensor(features, coordinate_map_key=key, coordinate_manager=xs.coordinate_manager)
    expected = F.max_pool2d(x, 3, stride, 1) * mask_at(active, stride)
    _compare(out, leaf, None, x, None, expected, active, 1, stride, TOL[dtype])


def bf16_bound(y: torch.Tensor, abs_y: torch.Tensor, terms: int, inputs_rounded: bool) -> float:
    """The norm-wise bf16 error bound of the module docstring for result ``y`` and the
    same op on absolute values ``abs_y``; ``terms`` products per output element."""
    spread = float(abs_y.detach().double().norm() / y.detach().double().norm())
    input_rounding = 0.0 if inputs_rounded else 2 * U_BF16 + U_BF16**2
    return U_BF16 + (terms * U_FP32 + input_rounding) * spread


def check_conv_bf16(x64: torch.Tensor, xs: ME.SparseTensor, leaf: torch.Tensor, active: torch.Tensor,
                    tensor_stride: int, kernel: int, stride: int, conv) -> None:
    """A bf16 conv (``conv(xs, weight) -> (features, key)``) of bf16-exact inputs against
    float64 on the same values: forward and both gradients within :func:`bf16_bound`."""
    c_in = x64.shape[1]
    w64 = torch.randn(8, c_in, kernel, kernel, dtype=torch.float64).to(torch.bfloat16).double().requires_grad_()
    w = w64.detach().to(torch.bfloat16).requires_grad_()
    features, key = conv(xs, w)
    assert features.dtype == torch.bfloat16
    out = ME.SparseTensor(features, coordinate_map_key=key, coordinate_manager=xs.coordinate_manager)
    m_out = mask_at(active, tensor_stride * stride)
    expected = _dense_conv(x64, w64, stride) * m_out
    abs_expected = _dense_conv(x64.detach().abs(), w64.detach().abs(), stride) * m_out
    b, _, h, wd = expected.shape
    terms = c_in * kernel * kernel
    assert rel_err(to_dense(out, b, (h, wd)), expected) <= bf16_bound(expected, abs_expected, terms, True)
    grad_out = (torch.randn(expected.shape, dtype=torch.float64) * m_out).to(torch.bfloat16)
    (to_dense(out, b, (h, wd)) * grad_out).sum().backward()
    (expected * grad_out.double()).sum().backward()
    m_in = mask_at(active, tensor_stride)
    got = _scatter(leaf.grad, x64.shape, active, tensor_stride)
    # the same op on absolute values gives the bounds' A for both gradients
    x_abs = x64.detach().abs().requires_grad_()
    w_abs = w64.detach().abs().requires_grad_()
    (_dense_conv(x_abs, w_abs, stride) * m_out * grad_out.double().abs()).sum().backward()
    assert rel_err(got, x64.grad * m_in) <= bf16_bound(x64.grad * m_in, x_abs.grad * m_in, terms, True)
    n_sites = int(m_out.sum())
    assert rel_err(w.grad.double(), w64.grad) <= bf16_bound(w64.grad, w_abs.grad, n_sites, True)


def check_depthwise_bf16(x64: torch.Tensor, xs: ME.SparseTensor, leaf: torch.Tensor, active: torch.Tensor,
                         tensor_stride: int, kernel: int, depthwise) -> None:
    """As :func:`check_conv_bf16` for a depthwise conv (``depthwise(xs, weight) -> features``)."""
    c = x64.shape[1]
    w64 = torch.randn(c, 1, kernel, kernel, dtype=torch.float64).to(torch.bfloat16).double().requires_grad_()
    w = w64.detach().to(torch.bfloat16).requires_grad_()
    out = ME.SparseTensor(depthwise(xs, w), coordinate_map_key=xs.coordinate_map_key,
                          coordinate_manager=xs.coordinate_manager)
    assert out.F.dtype == torch.bfloat16
    m = mask_at(active, tensor_stride)
    expected = _dense_conv(x64, w64, 1, groups=c) * m
    abs_expected = _dense_conv(x64.detach().abs(), w64.detach().abs(), 1, groups=c) * m
    b, _, h, wd = expected.shape
    terms = kernel * kernel
    assert rel_err(to_dense(out, b, (h, wd)), expected) <= bf16_bound(expected, abs_expected, terms, True)
    grad_out = (torch.randn(expected.shape, dtype=torch.float64) * m).to(torch.bfloat16)
    (to_dense(out, b, (h, wd)) * grad_out).sum().backward()
    (expected * grad_out.double()).sum().backward()
    x_abs, w_abs = x64.detach().abs().requires_grad_(), w64.detach().abs().requires_grad_()
    (_dense_conv(x_abs, w_abs, 1, groups=c) * m * grad_out.double().abs()).sum().backward()
    got = _scatter(leaf.grad, x64.shape, active, tensor_stride)
    assert rel_err(got, x64.grad * m) <= bf16_bound(x64.grad * m, x_abs.grad * m, terms, True)
    assert rel_err(w.grad.double(), w64.grad) <= bf16_bound(w64.grad, w_abs.grad, int(m.sum()), True)


def _bf16_inputs(channels: int) -> tuple[torch.Tensor, ME.SparseTensor, torch.Tensor, torch.Tensor]:
    """bf16-exact float64 input (requiring grad), its bf16 SparseTensor and leaf, the mask."""
    x64, _, _, active = _inputs(channels, torch.float64)
    x64 = x64.detach().to(torch.bfloat16).double().requires_grad_()
    xs, leaf = _sparse(x64.detach().to(torch.bfloat16), active, 1)
    return x64, xs, leaf, active


@pytest.mark.parametrize("kernel,stride,algorithm", [
    (k, s, a) for k, s in CONV_SHAPES for a in ("auto", "dense") if a == "auto" or k > 1])  # dense: no 1×1
def test_conv_bf16_within_derived_bound(kernel, stride, algorithm):
    x64, xs, leaf, active = _bf16_inputs(16)
    check_conv_bf16(x64, xs, leaf, active, 1, kernel, stride, lambda x, w: ops.conv(x, w, stride, "torch", algorithm))


def test_autocast_runs_convs_in_bf16_and_norms_as_for_dense_layers():
    x, xs, leaf, active = _inputs(16, torch.float32)
    conv = SparseConv2d(16, 8, 3, 1, bias=True)
    bn, ln = SparseBatchNorm2d(8), SparseLayerNorm(8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(xs)
        assert y.F.dtype == torch.bfloat16
        # batch norm: the input's dtype, float32 statistics (as for nn.BatchNorm2d); layer norm: float32
        normed = bn(y)
        assert normed.F.dtype == torch.bfloat16 and bn.running_mean.dtype == torch.float32
        assert ln(y).F.dtype == torch.float32
        ref = torch.nn.functional.batch_norm(y.F.detach().double(), None, None, training=True)
        assert rel_err(normed.F, ref) <= 2 * U_BF16  # statistics in fp32, the output rounded once
        assert SparseMaxPool2d(3, 2)(y).F.dtype == torch.bfloat16
    m = mask_at(active, 1)
    expected = (_dense_conv(x.detach(), conv.weight.detach(), 1) + conv.bias.detach().view(1, -1, 1, 1)) * m
    abs_expected = (_dense_conv(x.detach().abs(), conv.weight.detach().abs(), 1) + conv.bias.detach().abs().view(1, -1, 1, 1)) * m
    # the bias is added after the product's rounding: one more rounding of the sum
    bound = bf16_bound(expected, abs_expected, 16 * 9, inputs_rounded=False) + U_BF16
    assert rel_err(to_dense(y, 3, (64, 96)), expected) <= bound
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the reference backend runs in fp32
        assert set_conv_impl(conv, "minkowski")(xs).F.dtype == torch.float32


def test_tables_are_cached_per_batch_and_shared_by_strided_ops():
    _, xs, _, _ = _inputs(3, torch.float64)
    t1 = ops.neighbour_tables(xs, 3, 2)
    assert ops.neighbour_tables(xs, 3, 2) is t1
    assert ops.neighbour_tables(xs, 3, 1) is not t1
    assert ops.neighbour_tables(xs, 1, 2).out_key == t1.out_key  # same output sites
    # a plain CoordinateManager gets equal tables, built afresh
    plain = ME.SparseTensor(xs.F.detach(), coordinates=xs.C)
    p1, p2 = ops.neighbour_tables(plain, 3, 2), ops.neighbour_tables(plain, 3, 2)
    assert p1 is not p2 and torch.equal(p1.forward, t1.forward)
    # the pairs are the table's present entries
    for t, (in_rows, out_rows) in enumerate(t1.pairs):
        assert torch.equal(t1.forward[t, out_rows], in_rows)
        assert int((t1.forward[t] < t1.n_in).sum()) == len(in_rows)


# Every table shape the built-in encoders ask for, plus a strided 7×7 (ResNet's stem).
_ENCODER_TABLES = [(7, 2), (3, 2), (3, 1), (1, 2), (7, 1), (2, 2), (4, 4)]


def _build_every_table(x: ME.SparseTensor) -> None:
    """Build the tables of :data:`_ENCODER_TABLES` on ``x``'s sites and again on the strided
    sites, with the parts the backends build on first use (the dense-map positions)."""
    for kernel_size, stride in _ENCODER_TABLES:
        tables = ops.neighbour_tables(x, kernel_size, stride)
        tables.dense_grid
        strided = ME.SparseTensor(torch.zeros(tables.n_out, 1, dtype=x.F.dtype, device=x.F.device),
                                  coordinate_map_key=tables.out_key, coordinate_manager=x.coordinate_manager)
        ops.neighbour_tables(strided, 3, 1)


def test_a_batchs_tables_are_built_on_the_device_reading_nothing_back():
    """A batch's tables (a TableCache that knows the batch's extent) are built from its
    coordinates by device ops alone: no tensor made on the host and copied over (a stream
    synchronisation per copy on a GPU; under a CUDA graph the tables are built per batch in
    front of each replay) and no value read back. On the CPU: every tensor made without the
    coordinates' device lands on the meta device, where copying it out fails; the audit
    lists the ops that would read back."""
    g = torch.Generator().manual_seed(0)
    x = to_sparse(torch.randn(2, 3, 64, 96, generator=g), random_patch_mask(2, (2, 3), 0.5, g), 32)
    with torch.device("meta"), HostSyncAudit() as audit:
        _build_every_table(x)
    assert audit.ops == [], list(zip(audit.ops, audit.sources))
    assert len(x.coordinate_manager.neighbour_tables) > len(_ENCODER_TABLES)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA_READY, reason="needs a CUDA GPU and MinkowskiEngine built with CUDA")
def test_cuda_tables_make_no_synchronisation_that_pytorch_sees():
    """The GPU twin of the test above: PyTorch's sync debug mode turns any synchronisation
    its ops make (a blocking host-to-device copy, a value read back) into an error while a
    batch's tables are built. MinkowskiEngine's strided maps are made beforehand (it keeps
    them per tensor stride and hands them out again): building a new map synchronises
    inside its extension, which is not this code's to audit."""
    g = torch.Generator().manual_seed(0)
    images, active = torch.randn(2, 3, 64, 96, generator=g).cuda(), random_patch_mask(2, (2, 3), 0.5, g).cuda()
    x = to_sparse(images, active, 32)
    for stride in {s for _, s in _ENCODER_TABLES if s > 1}:
        x.coordinate_manager.stride(x.coordinate_map_key, stride)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _build_every_table(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for kernel_size, stride in _ENCODER_TABLES:  # the pairs of MinkowskiEngine's CUDA kernel maps
        tables = ops.neighbour_tables(x, kernel_size, stride)
        assert torch.equal(tables.forward.cpu().long(), _tables_from_kernel_map(x, kernel_size, stride))


@pytest.mark.parametrize("kernel_size,stride", [(3, 1), (7, 2), (3, 2), (4, 4), (1, 2)])
def test_tables_from_the_known_extent_equal_tables_from_the_coordinates(kernel_size, stride):
    """The batch's extent sizes the index grid without reading the coordinates back (GPU
    syncs); the tables must not change, at the input's and at coarser tensor strides."""
    from spark_me.gather import to_sparse

    active = _active(seed=3)
    images = torch.randn(3, 3, 64, 96, dtype=torch.float64)
    xs = to_sparse(images, active, 32)
    assert xs.coordinate_manager.extent == (3, 64, 96)
    plain = ME.SparseTensor(xs.F, coordinates=xs.C)  # no extent: sized from the coordinates
    for _ in range(2):  # at tensor stride 1, then at the strided sites
        ours, ref = ops.neighbour_tables(xs, kernel_size, stride), ops.neighbour_tables(plain, kernel_size, stride)
        assert torch.equal(ours.forward, ref.forward)
        xs = ME.SparseTensor(torch.zeros(ours.n_out, 1, dtype=torch.float64), coordinate_map_key=ours.out_key,
                             coordinate_manager=xs.coordinate_manager)
        plain = ME.SparseTensor(torch.zeros(ref.n_out, 1, dtype=torch.float64), coordinate_map_key=ref.out_key,
                                coordinate_manager=plain.coordinate_manager)
        kernel_size, stride = 3, 2


def test_index_dtype_falls_back_to_int64_beyond_int32():
    from spark_me.ops.tables import INT32_MAX, index_dtype

    assert index_dtype(INT32_MAX) == torch.int32
    assert index_dtype(INT32_MAX + 1) == torch.int64


def _with_int64_tables(tables: ops.NeighbourTables) -> ops.NeighbourTables:
    """The same tables with int64 indices: the form batches past int32's range get."""
    wide = ops.NeighbourTables(tables.forward.long(), tables.out_key, tables.kernel_size, tables.stride, tables.n_in,
                               tables.n_out, sites=tables._sites, tensor_stride=tables._tensor_stride,
                               extent=tables._extent)
    assert wide.pairs[0][0].dtype == torch.int64
    return wide


@pytest.mark.parametrize("kernel,stride", [(3, 1), (3, 2), (2, 2)])
@pytest.mark.parametrize("algorithm", ["gemm", "loop", "pairs", "dense"])
def test_int64_tables_give_the_same_results(kernel, stride, algorithm):
    """Every torch-backend path on int64 tables (the fallback) equals the int32 tables' result,
    forward and both gradients, bit for bit."""
    _, xs, _, _ = _inputs(4, torch.float64, seed=2)
    weight = torch.randn(5, 4, kernel, kernel, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    narrow = ops.neighbour_tables(xs, kernel, stride)
    wide = _with_int64_tables(narrow)
    results = []
    for tables in (narrow, wide):
        f, w = xs.F.detach().clone().requires_grad_(), weight.clone().requires_grad_()
        out = torch_backend.sparse_conv(f, w, tables, algorithm)
        out.backward(torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out))
        pooled = torch_backend.gather_max(f.detach().clone().requires_grad_(), tables)
        results.append((out, f.grad, w.grad, pooled))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_tables_hold_indices_only_and_read_sites_while_their_batch_lives():
    """A cached table keeps no coordinates (:meth:`TableCache.table_bytes` counts what it
    holds); the dense-map ops read the sites from the manager, which must still exist."""
    import gc

    _, xs, _, _ = _inputs(3, torch.float64)
    cm = xs.coordinate_manager
    tables = ops.neighbour_tables(xs, 3, 2)
    assert cm.table_bytes() == tables.forward.untyped_storage().nbytes()
    assert tables.dense_shape == (3, 64, 96)  # from the batch's extent, building nothing
    assert cm.table_bytes() == tables.forward.untyped_storage().nbytes()
    plain = ops.neighbour_tables(ME.SparseTensor(xs.F.detach(), coordinates=xs.C), 3, 2)  # no extent: the sites
    assert plain.dense_shape == plain.dense_grid.in_shape == (3, 64, 96)
    grid = tables.dense_grid
    assert grid.in_shape == (3, 64, 96)
    assert cm.table_bytes() == sum(t.untyped_storage().nbytes() for t in (tables.forward, grid.in_flat, grid.out_flat))
    orphan = ops.neighbour_tables(xs, 5, 1)
    del xs, cm
    gc.collect()
    with pytest.raises(RuntimeError, match="freed with its batch"):
        orphan.dense_grid


def test_a_batch_prints_without_minkowskiengines_map_printer():
    """repr of a batch's SparseTensor describes its TableCache from Python state (the C++
    printer crashed a CUDA test run while pytest formatted a failed assertion)."""
    _, xs, _, _ = _inputs(3, torch.float64)
    ops.neighbour_tables(xs, 3, 1)
    text = repr(xs)
    assert "coordinate_manager=TableCache(D=2, CoordinateMapManagerCPU, extent=None, patch_size=None, 1 neighbour tables)" in text
    assert "CoordinateMapCPU" not in text  # the C++ map printer's output


def test_stride_one_tables_are_point_symmetric():
    """The mirrored-tap input gradient relies on: T[t, o] = i  <=>  T[K-1-t, i] = o."""
    _, xs, _, _ = _inputs(3, torch.float64)
    table = ops.neighbour_tables(xs, 5, 1).forward
    n = table.shape[1]
    for t in range(table.shape[0]):
        present = table[t] < n
        outs = present.nonzero().flatten()
        assert torch.equal(table[table.shape[0] - 1 - t, table[t, present]], outs)


def test_conv_impl_choices():
    with pytest.raises(ValueError, match="conv_impl must be one of"):
        SparseConv2d(3, 4, 3, conv_impl="cuda")
    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # resolving needs no GPU
    for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        assert ops.resolve_conv_impl("auto", cpu, dtype) == "torch"
    assert ops.resolve_conv_impl("auto", cuda, torch.float64) == "torch"  # Triton computes in fp32/bf16/fp16 only
    pytest.importorskip("triton")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):  # auto: Triton on CUDA (docs/gpu.md, fourth run)
        assert ops.resolve_conv_impl("auto", cuda, dtype) == "triton"
    from spark_me.ops import dispatch, triton_backend

    assert dispatch.TRITON_DTYPES == triton_backend.SUPPORTED_DTYPES
    SparseConv2d(3, 4, 3, conv_impl="triton")  # built anywhere; the device is checked when it runs
    assert ops.resolve_conv_impl("triton", cuda) == "triton"
    if triton_backend.INTERPRETED:  # tests/test_ops_triton.py imported it under the interpreter
        assert ops.resolve_conv_impl("triton", torch.device("cpu")) == "triton"
    else:
        with pytest.raises(ValueError, match="use conv_impl='torch' on CPU"):
            ops.resolve_conv_impl("triton", torch.device("cpu"))


@pytest.mark.parametrize("conv_impl", ["torch", "minkowski"])
def test_bf16_step_autocasts_the_encoder(conv_impl):
    """SparKStep with bf16 runs the encoder's convs in bf16 (the gather backend) or fp32
    (MinkowskiEngine), and its loss stays near the fp32 loss."""
    from spark_me import SparK, build_sparse_encoder
    from spark_me.pretrain import SparKStep

    torch.manual_seed(0)
    model = SparK(build_sparse_encoder("resnet18", conv_impl=conv_impl), decoder_width=64)
    images = torch.randn(2, 3, 64, 64)
    active = _active(2, (2, 2), seed=1)
    seen: list[torch.dtype] = []
    hook = model.encoder.layer1[0].conv1.register_forward_hook(lambda m, i, o: seen.append(o.F.dtype))
    loss = SparKStep(model, torch.bfloat16)(images, active)
    hook.remove()
    assert seen == [torch.bfloat16 if conv_impl == "torch" else torch.float32]
    loss.backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.encoder.parameters() if p.requires_grad)
    reference = SparKStep(model)(images, active).detach()
    assert abs(float(loss.detach()) - float(reference)) <= 0.05 * abs(float(reference))


def test_autocast_leaves_float64_alone():
    """As for dense layers, autocast does not lower float64 sparse convs and norms."""
    _, xs, _, _ = _inputs(4, torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert SparseConv2d(4, 3, 3).double()(xs).F.dtype == torch.float64
        assert SparseBatchNorm2d(4).double()(xs).F.dtype == torch.float64


def _tables_from_kernel_map(x: ME.SparseTensor, kernel_size: int, stride: int) -> torch.Tensor:
    """The reference ``[K, n_out]`` table straight from MinkowskiEngine's kernel map."""
    cm, key = x.coordinate_manager, x.coordinate_map_key
    out_key = key if stride == 1 else cm.stride(key, stride)
    kmap = cm.kernel_map(key, out_key, stride=stride, kernel_size=kernel_size, dilation=1)
    n_in = x.F.shape[0]
    table = torch.full((kernel_size**2, cm.size(out_key)), n_in, dtype=torch.long)
    taps = ops.kernel_tap_order(kernel_size)
    for offset, in_out in kmap.items():
        table[taps[offset], in_out[1].long().cpu()] = in_out[0].long().cpu()
    return table


@pytest.mark.parametrize("tensor_stride", [1, 4])
@pytest.mark.parametrize("kernel,stride", CONV_SHAPES + [(3, 4)])
def test_tables_equal_minkowski_kernel_maps(kernel, stride, tensor_stride):
    _, xs, _, _ = _inputs(2, torch.float64, tensor_stride, seed=5)
    tables = ops.neighbour_tables(xs, kernel, stride)
    assert tables.forward.dtype == torch.int32  # half an int64 table's bytes, for the whole step
    assert torch.equal(tables.forward.long(), _tables_from_kernel_map(xs, kernel, stride))
    assert tables.complete == bool((tables.forward < tables.n_in).all())


def test_auto_algorithm_by_channels_and_size():
    """The measured choice (torch_backend's comment): one wide product for narrow inputs
    (the 3-channel stem), for 512+ channels and for small gathers, per-tap products
    between; always one product in bf16/fp16."""
    choose = torch_backend.choose_algorithm
    assert [choose(c, torch.float32) for c in (1, 3, 15, 16, 64, 256, 511, 512, 2048)] == [
        "gemm", "gemm", "gemm", "loop", "loop", "loop", "loop", "gemm", "gemm"]
    limit = torch_backend.GEMM_MAX_GATHERED
    assert choose(64, torch.float32, gathered=limit) == "gemm" and choose(64, torch.float32, gathered=limit + 1) == "loop"
    assert choose(3, torch.float64, gathered=limit + 1) == "gemm" and choose(64, torch.float64, "loop", 9) == "loop"
    assert choose(64, torch.bfloat16) == choose(3, torch.float16) == "gemm"
    assert choose(3, torch.float32, "loop") == "loop" and choose(512, torch.float64, "pairs") == "pairs"
    with pytest.raises(ValueError, match="unknown sparse conv algorithm"):
        choose(64, torch.float32, "fft")


_NO_WAIT_CASES = [
    *(pytest.param("cpu", "torch", None, c, id=f"cpu-{c}") for c in ("plain", "recompute")),
    # on CUDA only with recomputation, which runs every block's forward twice (a short GPU test phase)
    *(pytest.param("cuda", impl, "bf16", "recompute", marks=NEEDS_CUDA, id=f"cuda-{impl}-bf16-recompute")
      for impl in ("torch", "triton")),
]


@pytest.mark.parametrize("device,conv_impl,amp,checkpointing", _NO_WAIT_CASES)
@pytest.mark.parametrize("name", ["resnet18", "convnext_atto"])
def test_once_a_batchs_tables_exist_the_encoder_never_waits_for_the_device(name, device, conv_impl, amp, checkpointing):
    """Forward+backward of a sparse encoder (drop path on, as the recipe's ResNet-50 has) on
    a batch whose tables are built calls no op that would stall a GPU's host (read a value
    back, or size an output by the data): the step's syncs are the gather's and each
    table's first use, not one per layer or block. On CUDA, PyTorch's sync debug mode
    also turns any synchronisation it sees into an error."""
    torch.manual_seed(0)
    encoder = build_sparse_encoder(name, drop_path_rate=0.3, conv_impl=conv_impl).to(device).train()
    encoder.set_grad_checkpointing(checkpointing == "recompute")
    g = torch.Generator().manual_seed(0)
    images = torch.randn(4, 3, 64, 64, generator=g).to(device)
    gathered = to_sparse(images, random_patch_mask(4, (2, 2), 0.5, g).to(device), encoder.downsample_ratio)
    gathered = ME.SparseTensor(gathered.F.requires_grad_(), coordinate_map_key=gathered.coordinate_map_key,
                               coordinate_manager=gathered.coordinate_manager)

    def step() -> None:
        encoder.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=amp == "bf16"):
            features = encoder.forward_sparse(gathered)
        sum(f.F.float().sum() for f in features).backward()

    with HostSyncAudit() as first:
        step()
    with HostSyncAudit() as again:
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            step()
        finally:
            if device == "cuda":
                torch.cuda.set_sync_debug_mode("default")
    assert again.ops == [], again.ops
    if conv_impl == "torch":  # its first pass reads `complete` once per table, and nothing else
        assert len(first.ops) <= len(gathered.coordinate_manager.neighbour_tables), first.ops
    assert gathered.F.grad is not None
