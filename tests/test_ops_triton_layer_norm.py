"""The triton backend's per-site layer norm (``spark_me.ops.layer_norm``, ``conv_impl="triton"``)
against float64 and against the torch backend: output, input gradient and parameter
gradients, float32, bfloat16 and float16, and its dtypes under autocast.

On CPU the kernels run in Triton's interpreter (imported interpreted by
:mod:`test_ops_triton`). Bounds, element by element, with ``u`` the unit roundoff:

* float32 arithmetic: a row's mean and variance are sums of ``C`` terms, so the forward
  and the input grad are within ``(C + 16)·u₃₂`` of float64 relative to the sum of their
  terms' magnitudes, where ``x̂ = (x - mean)·rstd`` counts as ``(|x| + |mean|)·rstd``
  (its error follows ``x`` and the mean, not their difference): ``|x̂|·|w| + |b|``; for
  the input grad ``rstd·(|h| + |x̂|·mean|h·x̂| + mean|h|)``, ``h = grad·w`` (it cancels,
  so its own magnitude bounds nothing); the parameter grads, sums over the rows in tiles
  and splits, likewise relative to ``Σ|grad|·|x̂|`` and ``Σ|grad|``, with the same
  allowance (a few dozen sequential adds);
* a bf16/fp16 output rounds that once: one more unit of ``2u`` (the interpreter truncates
  where the GPU rounds to nearest: ``u`` on the GPU, ``2u`` here).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from test_ops import U_FP32, _inputs  # noqa: E402
from test_ops_triton import INTERPRETER, _on_cuda, triton_backend  # noqa: E402
from spark_me import ops  # noqa: E402
from spark_me.layers import SparseLayerNorm, set_conv_impl  # noqa: E402

UNIT = {torch.float32: 0.0, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}  # 0: no rounding of the output
EPS = 1e-6


def _case(rows: int, channels: int, dtype: torch.dtype, device: str = "cpu", seed: int = 0):
    """Features (offset, so that the mean matters, and one constant row: variance 0), a
    weight, a bias and an output gradient; the features and gradient in ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, channels, generator=g) * 3 + 1
    if rows:
        x[rows // 2] = 0.5
    weight, bias = torch.randn(channels, generator=g), torch.randn(channels, generator=g)
    grad = torch.randn(rows, channels, generator=g)
    return [t.to(device) for t in (x.to(dtype), weight, bias, grad.to(dtype))]


def _run(x, weight, bias, grad, out_dtype=None):
    """(output, input grad, weight grad, bias grad) of the triton layer norm."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias)]
    out = triton_backend.layer_norm(*leaves, EPS, out_dtype)
    out.backward(grad.to(out.dtype))
    return out.detach(), *(t.grad for t in leaves)


def _float64(x, weight, bias, grad):
    """The float64 reference of :func:`_run` and each result's bound scale (module docstring)."""
    leaves = [t.detach().double().requires_grad_() for t in (x, weight, bias)]
    out = F.layer_norm(leaves[0], (x.shape[1],), leaves[1], leaves[2], EPS)
    grad = grad.double()
    out.backward(grad)
    with torch.no_grad():
        x64, w64, b64 = (t.detach() for t in leaves)
        mean, var = x64.mean(1, keepdim=True), x64.var(1, unbiased=False, keepdim=True)
        rstd = (var + EPS).rsqrt()
        x_hat = (x64 - mean) * rstd
        h = grad * w64
        centring = (x64.abs() + mean.abs()) * rstd  # the magnitude that x̂'s rounding error follows
        scales = (centring * w64.abs() + b64.abs(),
                  rstd * (h.abs() + centring * (h * x_hat).abs().mean(1, keepdim=True) + h.abs().mean(1, keepdim=True)),
                  (grad.abs() * centring).sum(0), grad.abs().sum(0))
    return (out.detach(), *(t.grad for t in leaves)), scales


def _check(got, expected, scales, channels: int, out_dtype: torch.dtype, in_dtype: torch.dtype):
    """Every result within its bound (module docstring)."""
    arithmetic = (channels + 16) * U_FP32
    rounding = (2 * UNIT[out_dtype], 2 * UNIT[in_dtype], 0.0, 0.0)  # output, input grad, fp32 parameter grads
    for name, g, e, scale, unit in zip(("output", "input grad", "weight grad", "bias grad"), got, expected, scales,
                                       rounding):
        assert g.shape == e.shape, name
        error = (g.double() - e).abs()
        bound = unit * e.abs() + arithmetic * scale
        assert bool((error <= bound).all()), f"{name}: worst error/bound {(error / bound).max().item():.3g}"


@INTERPRETER
@pytest.mark.parametrize("channels", [40, 96, 200])
def test_layer_norm_float32_equals_float64(channels):
    """1 100 rows: several row tiles per split and a part-filled last tile; 40, 96 and 200
    channels: tiles padded to a power of two."""
    x, weight, bias, grad = _case(1100, channels, torch.float32)
    expected, scales = _float64(x, weight, bias, grad)
    got = _run(x, weight, bias, grad)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    _check(got, expected, scales, channels, torch.float32, torch.float32)


@INTERPRETER
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("out", ["same", "fp32"])
def test_layer_norm_low_precision_rounds_once(dtype, out):
    """bf16/fp16 features read as they are: the output (in their dtype, or fp32 as autocast
    returns it) and the input grad (their dtype) are the fp32 results rounded once; the
    parameter grads fp32."""
    x, weight, bias, grad = _case(300, 96, dtype)
    out_dtype = dtype if out == "same" else torch.float32
    expected, scales = _float64(x, weight, bias, grad.to(out_dtype))
    got = _run(x, weight, bias, grad, out_dtype)
    assert (got[0].dtype, got[1].dtype, got[2].dtype) == (out_dtype, dtype, torch.float32)
    _check(got, expected, scales, 96, out_dtype, dtype)


@INTERPRETER
def test_layer_norm_reruns_give_the_same_bits():
    """The parameter grads are sums of per-split partials (no atomics): the same every run."""
    case = _case(1100, 96, torch.bfloat16)
    first, second = _run(*case), _run(*case)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@INTERPRETER
def test_layer_norm_without_rows():
    x, weight, bias, grad = _case(0, 96, torch.float32)
    out, grad_in, grad_w, grad_b = _run(x, weight, bias, grad)
    assert out.shape == grad_in.shape == (0, 96)
    assert torch.equal(grad_w, torch.zeros(96)) and torch.equal(grad_b, torch.zeros(96))


@INTERPRETER
@pytest.mark.parametrize("low_precision_output", [False, True])
def test_sparse_layer_norm_under_autocast(low_precision_output):
    """``SparseLayerNorm`` on bf16 features under bf16 autocast: float32 out, as autocast
    runs a dense layer norm, or bf16 with ``low_precision_output`` from the triton backend
    (the torch backend stays float32), within the bounds above of float64 as
    :func:`triton_backend.layer_norm` is; bf16 gradients for the features, fp32 for the
    parameters."""
    _, xs, _, _ = _inputs(96, torch.float32)
    features = xs.F.detach().to(torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    grad = torch.randn(features.shape, generator=g).to(torch.bfloat16)  # the same values in either output dtype
    for impl in ("triton", "torch"):
        norm = SparseLayerNorm(96, eps=EPS, low_precision_output=low_precision_output, conv_impl=impl)
        with torch.no_grad():
            norm.weight.copy_(torch.randn(96, generator=g))
            norm.bias.copy_(torch.randn(96, generator=g))
        leaf = features.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = norm.forward_features(leaf)
        out.backward(grad.to(out.dtype))
        if impl == "torch":
            assert out.dtype == torch.float32
            continue
        out_dtype = torch.bfloat16 if low_precision_output else torch.float32
        assert (out.dtype, leaf.grad.dtype, norm.weight.grad.dtype) == (out_dtype, torch.bfloat16, torch.float32)
        expected, scales = _float64(features, norm.weight, norm.bias, grad)
        got = (out.detach(), leaf.grad, norm.weight.grad, norm.bias.grad)
        _check(got, expected, scales, 96, out_dtype, torch.bfloat16)


@INTERPRETER
def test_the_encoders_layer_norms_switch_backend_with_the_convs():
    """``set_conv_impl`` switches the norms too; a ConvNeXt's block and downsampling norms
    feed a linear layer or a conv and so return the autocast dtype, its stem norm (the
    residual stream) and densify's (the mask embedding's dtype) float32, as autocast's."""
    from spark_me import build_sparse_encoder

    encoder = set_conv_impl(build_sparse_encoder("convnext_atto"), "triton")
    norms = {n: m for n, m in encoder.named_modules() if isinstance(m, SparseLayerNorm)}
    assert {m.conv_impl for m in norms.values()} == {"triton"}
    low = {n for n, m in norms.items() if m.low_precision_output}
    assert low == {n for n in norms if n.endswith(".norm") or n.endswith("downsample.0")}
    assert "stem.1" in norms and "stem.1" not in low
    assert not encoder.densify_norm(40).low_precision_output


@INTERPRETER  # conv_impl="triton" on CPU tensors
def test_layer_norm_falls_back_to_torch_where_the_kernel_does_not_apply():
    """float64 (under autocast too), no affine parameters, or the torch/minkowski
    backends: ``F.layer_norm``."""
    x = torch.randn(50, 8, dtype=torch.float64)
    w, b = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    expected = F.layer_norm(x, (8,), w, b, EPS)
    assert torch.equal(ops.layer_norm(x, (8,), w, b, EPS, "triton"), expected)
    assert torch.equal(ops.layer_norm(x, (8,), None, None, EPS, "triton"), F.layer_norm(x, (8,), None, None, EPS))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # float64 stays float64, as autocast leaves it
        assert torch.equal(ops.layer_norm(x, (8,), w, b, EPS, "triton", low_precision_output=True), expected)
    norm = SparseLayerNorm(8, EPS, dtype=torch.float64, conv_impl="triton")  # nn.LayerNorm's factory arguments
    assert norm.weight.dtype == torch.float64
    assert torch.equal(norm.forward_features(x), F.layer_norm(x, (8,), norm.weight, norm.bias, EPS))
    x32 = x.float()
    for impl in ("torch", "minkowski", "auto"):  # auto on CPU: torch
        assert torch.equal(ops.layer_norm(x32, (8,), w.float(), b.float(), EPS, impl),
                           F.layer_norm(x32, (8,), w.float(), b.float(), EPS))


@INTERPRETER
def test_layer_norm_refuses_what_it_cannot_compute():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"\[C\] weight and bias"):
        triton_backend.layer_norm(x, torch.ones(7), torch.zeros(7), EPS)
    with pytest.raises(ValueError, match="conv_impl='torch'"):
        triton_backend.layer_norm(x.double(), torch.ones(8), torch.zeros(8), EPS)
    wide = triton_backend.LAYER_NORM_MAX_CHANNELS + 1
    with pytest.raises(ValueError, match="conv_impl='torch'"):
        triton_backend.layer_norm(torch.randn(2, wide), torch.ones(wide), torch.zeros(wide), EPS)


# (rows, channels): ConvNeXt-T's four stages at batch 32 of 224 px under a 60 % mask
CUDA_LAYER_NORM_SHAPES = [(40960, 96), (10240, 192), (2560, 384), (640, 768)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@_on_cuda
def test_cuda_layer_norm_equals_float64(dtype):
    """The compiled kernels (``tl.sum``, the GPU's tiles and row splits) at ConvNeXt-T's
    widths: within the bounds above, the same bits on a rerun."""
    for rows, channels in CUDA_LAYER_NORM_SHAPES:
        x, weight, bias, grad = _case(rows, channels, dtype, "cuda")
        expected, scales = _float64(x, weight, bias, grad)
        got = _run(x, weight, bias, grad)
        _check(got, expected, scales, channels, dtype, dtype)
        assert all(torch.equal(a, b) for a, b in zip(got, _run(x, weight, bias, grad)))
