"""The triton backend's per-channel gradient sums: the bias gradients of ``spark_me.ops.linear``
and ``spark_me.ops.add_bias`` and the layer scale's backward (``spark_me.ops.layer_scale``),
against float64 and against PyTorch's own ops.

On CPU the kernels run in Triton's interpreter (imported interpreted by
:mod:`test_ops_triton`). Bounds, element by element, with ``u`` the unit roundoff: a sum
of ``N`` terms in float32, in whatever order (tiles, row splits, the sum of the splits),
is within ``N·u₃₂·Σ|terms|`` of the exact sum; a bf16/fp16 output is the float32 result
rounded once (``2u``: the interpreter truncates where the GPU rounds to nearest; below
the dtype's normal range, one step of its subnormals).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from conftest import rel_err  # noqa: E402
from test_ops import U_FP32  # noqa: E402
from test_ops_triton import INTERPRETER, _on_cuda, triton_backend  # noqa: E402
from spark_me import ops  # noqa: E402

UNIT = {torch.float32: 0.0, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}  # 0: no rounding of the output
# the spacing of the dtype's subnormals: below its normal range a rounding errs by up to that
SUBNORMAL = {torch.float32: 0.0, torch.bfloat16: 2.0**-133, torch.float16: 2.0**-24}


def _tensors(rows: int, channels: int, dtype: torch.dtype, device: str = "cpu", seed: int = 0, count: int = 2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, channels, generator=g).to(dtype).to(device) for _ in range(count)]


def _check_sum(got: torch.Tensor, terms: torch.Tensor):
    """``got`` (fp32) within ``N·u₃₂·Σ|terms|`` of ``terms`` summed over its rows in float64."""
    assert got.dtype == torch.float32
    terms = terms.double()
    error = (got.double() - terms.sum(0)).abs()
    bound = len(terms) * U_FP32 * terms.abs().sum(0)
    assert bool((error <= bound).all()), f"worst error/bound {(error / bound).max().item():.3g}"


def _check_rounded(got: torch.Tensor, expected: torch.Tensor):
    """``got`` is the float64 ``expected`` (a product, exact in fp32 up to one rounding)
    rounded once to ``got``'s dtype."""
    error = (got.double() - expected.double()).abs()
    bound = (2 * UNIT[got.dtype] + 4 * U_FP32) * expected.double().abs() + SUBNORMAL[got.dtype]
    assert bool((error <= bound).all()), f"worst error/bound {(error / bound).max().item():.3g}"


@INTERPRETER
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rows,channels", [(1100, 96), (300, 384), (37, 40), (0, 40)])
def test_column_sums_equal_float64(rows, channels, dtype):
    """Channel blocks of 32 (96 channels: three, 40: one part-filled), several row tiles per
    split, part-filled last tiles, no rows at all."""
    (grad,) = _tensors(rows, channels, dtype, count=1)
    sums, nothing = triton_backend.channel_sums.column_sums(grad)
    assert nothing is None and sums.shape == (channels,)
    _check_sum(sums, grad)


@INTERPRETER
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_layer_scale_equals_float64(dtype):
    """``features * gamma`` as PyTorch's product (an fp32 gamma promotes bf16 features to fp32);
    backward from one pass: the features' gradient ``grad * gamma`` rounded once to their
    dtype, gamma's ``Σ grad * features`` in fp32 (in gamma's dtype)."""
    features, _ = _tensors(1100, 96, dtype)
    gamma = torch.randn(96, generator=torch.Generator().manual_seed(1))
    leaf, g_leaf = features.clone().requires_grad_(), gamma.clone().requires_grad_()
    out = triton_backend.layer_scale(leaf, g_leaf)
    assert torch.equal(out, features * gamma)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(out.dtype)
    out.backward(grad)
    assert leaf.grad.dtype == dtype and g_leaf.grad.dtype == torch.float32
    _check_rounded(leaf.grad, grad.double() * gamma.double())
    _check_sum(g_leaf.grad, grad.double() * features.double())


@INTERPRETER
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_linear_and_bias_add_equal_pytorchs(dtype):
    """``linear``: PyTorch's products (the same values as ``F.linear``'s), its bias
    gradient the fp32 column sums of the output gradient, in the bias's dtype (fp32: not
    rounded to bf16 first, as autocast's sum would be). ``add_bias``: the same sum."""
    features, _ = _tensors(300, 96, dtype)
    g = torch.Generator().manual_seed(3)
    weight, bias = torch.randn(384, 96, generator=g).to(dtype), torch.randn(384, generator=g)
    leaves = [t.clone().requires_grad_() for t in (features, weight, bias)]
    out = triton_backend.linear(*leaves)
    refs = [t.clone().requires_grad_() for t in (features, weight, bias)]
    expected = F.linear(refs[0], refs[1], refs[2].to(dtype))
    assert out.dtype == dtype and rel_err(out, expected) <= 1e-6
    grad = torch.randn(out.shape, generator=g).to(dtype)
    out.backward(grad)
    expected.backward(grad)
    assert rel_err(leaves[0].grad, refs[0].grad) <= 1e-6 and rel_err(leaves[1].grad, refs[1].grad) <= 1e-6
    _check_sum(leaves[2].grad, grad)

    features_leaf, bias_leaf = features.clone().requires_grad_(), bias.clone()[:96].requires_grad_()
    out = triton_backend.add_bias(features_leaf, bias_leaf)
    assert torch.equal(out, features + bias[:96].to(dtype))
    out.backward(grad[:, :96])
    assert torch.equal(features_leaf.grad, grad[:, :96])
    _check_sum(bias_leaf.grad, grad[:, :96])


@INTERPRETER
def test_under_autocast_the_ops_compute_as_pytorchs():
    """bf16 autocast on CPU: ``ops.linear`` with the triton backend gives autocast's bf16
    output and fp32 weight gradient, and a bias gradient within one bf16 rounding of
    autocast's (which rounds its sum to bf16); ``ops.layer_scale`` and ``ops.add_bias``
    return PyTorch's dtypes."""
    features, _ = _tensors(300, 96, torch.float32)
    g = torch.Generator().manual_seed(4)
    weight, bias = torch.randn(384, 96, generator=g), torch.randn(384, generator=g)
    grad = torch.randn(300, 384, generator=g).to(torch.bfloat16)
    results = {}
    for impl in ("triton", "torch"):
        leaves = [t.clone().requires_grad_() for t in (features, weight, bias)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = ops.linear(*leaves, conv_impl=impl)
            assert out.dtype == torch.bfloat16
            assert ops.layer_scale(out, bias, impl).dtype == torch.float32
            assert ops.add_bias(out, bias, impl).dtype == torch.bfloat16
        out.backward(grad)
        results[impl] = (out.detach(), *(t.grad for t in leaves))
    got, ref = results["triton"], results["torch"]
    assert torch.equal(got[0], ref[0])
    assert rel_err(got[1], ref[1]) <= 1e-6 and rel_err(got[2], ref[2]) <= 1e-6
    assert got[3].dtype == ref[3].dtype == torch.float32
    error = (got[3] - ref[3]).abs()
    assert bool((error <= 2 * UNIT[torch.bfloat16] * ref[3].abs() + 300 * U_FP32 * grad.float().abs().sum(0)).all())


@INTERPRETER  # conv_impl="triton" on CPU tensors
def test_the_ops_are_pytorchs_where_the_kernels_do_not_apply():
    """float64, the torch/minkowski backends and ``auto`` on CPU run PyTorch's own ops."""
    x = torch.randn(20, 8, dtype=torch.float64)
    w, b = torch.randn(4, 8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    for impl, dtype in (("triton", torch.float64), ("torch", torch.float32), ("minkowski", torch.float32),
                        ("auto", torch.float32)):
        xd, wd, bd = x.to(dtype), w.to(dtype), b.to(dtype)
        assert torch.equal(ops.linear(xd, wd, bd[:4], impl), F.linear(xd, wd, bd[:4]))
        assert torch.equal(ops.add_bias(xd, bd, impl), xd + bd)
        assert torch.equal(ops.layer_scale(xd, bd, impl), xd * bd)


@INTERPRETER
def test_the_kernels_refuse_what_they_cannot_compute():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"\[C\] vector"):
        triton_backend.layer_scale(x, torch.ones(7))
    with pytest.raises(ValueError, match="conv_impl='torch'"):
        triton_backend.add_bias(x.double(), torch.ones(8))
    with pytest.raises(ValueError, match=r"\[C_out\] bias"):
        triton_backend.linear(x, torch.ones(3, 8), torch.ones(4))


@INTERPRETER
def test_a_convnext_switches_every_op_with_set_conv_impl():
    """The block's layer scale and the MLP's linear layers follow ``set_conv_impl`` like
    the convs and norms (every module with a ``conv_impl``)."""
    from spark_me import build_sparse_encoder
    from spark_me.layers import set_conv_impl

    encoder = build_sparse_encoder("convnext_atto")
    holders = [m for m in encoder.modules() if hasattr(m, "conv_impl")]
    kinds = {type(m).__name__ for m in holders}
    assert {"SparseConvNeXtBlock", "MlpOnFeatures", "SparseLayerNorm", "SparseConv2d"} <= kinds
    set_conv_impl(encoder, "triton")
    assert {m.conv_impl for m in holders} == {"triton"}


# (rows, channels): ConvNeXt-T's stage 1 and 4 at batch 32 of 224 px under a 60 % mask, and
# stage 1's hidden width
CUDA_SUM_SHAPES = [(40960, 96), (640, 768), (40960, 384)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@_on_cuda
def test_cuda_column_sums_and_layer_scale_equal_float64(dtype):
    """The compiled kernels (``tl.sum``, the GPU's tiles and splits): the column sums and
    the layer scale's backward within the bounds above, the same bits on a rerun."""
    for rows, channels in CUDA_SUM_SHAPES:
        grad, features = _tensors(rows, channels, dtype, "cuda")
        sums, _ = triton_backend.channel_sums.column_sums(grad)
        _check_sum(sums, grad)
        assert torch.equal(sums, triton_backend.channel_sums.column_sums(grad)[0])
        gamma = torch.randn(channels, device="cuda")
        grad32 = grad.float()  # the promoted product's gradient
        grad_gamma, grad_in = triton_backend.channel_sums.column_sums(grad32, features, gamma)
        _check_sum(grad_gamma, grad32.double() * features.double())
        _check_rounded(grad_in, grad32.double() * gamma.double())
