"""The benchmarks' masked-dense baseline computes exactly what the sparse encoder does."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from conftest import TOL, randomize_norms, rel_err
from kernels_bench.emulation import MaskContext, MaskedBatchNorm2d, MaskedDenseEncoder
from kernels_bench.variants import as_dense, build_variant
from spark_me import SparK, build_sparse_encoder
from spark_me.masking import random_patch_mask, upsample_mask

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "custom_encoder.py"


def _load_example() -> None:
    spec = importlib.util.spec_from_file_location("custom_encoder_for_bench", EXAMPLE)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))


def _setup(name: str, dtype: torch.dtype, grid: int, batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    sparse = SparK(build_sparse_encoder(name), decoder_width=64, mask_ratio=0.6)
    randomize_norms(sparse, g)
    sparse = sparse.to(dtype)
    images = torch.randn(batch, 3, grid * 32, grid * 32, generator=g, dtype=dtype)
    active = random_patch_mask(batch, (grid, grid), 0.6, g)
    return sparse, images, active


@pytest.mark.parametrize("name", ["resnet18", "convnext_atto", "tiny_convnet"])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_masked_dense_features_equal_sparse(name, train, dtype):
    if name == "tiny_convnet":
        _load_example()
    sparse, images, active = _setup(name, dtype, grid=4, batch=4)
    emulated = MaskedDenseEncoder(sparse.encoder).to(dtype)
    sparse.train(train), emulated.train(train)
    expected = as_dense(sparse.encoder(images, active), 4, (128, 128))
    actual = emulated(images, active)
    assert len(actual) == len(expected) == 4
    for a, e in zip(actual, expected):
        assert a.shape == e.shape
        assert rel_err(a, e) <= TOL[dtype]
        hidden = ~upsample_mask(active, a.shape[-1] // 4).unsqueeze(1).expand_as(a)
        assert a[hidden].abs().max() == 0  # nothing leaks into masked sites


@pytest.mark.parametrize("name", ["resnet18", "convnext_atto"])
def test_masked_dense_step_equals_sparse_step(name):
    sparse, images, active = _setup(name, torch.float64, grid=4, batch=4, seed=1)
    emulated = build_variant(sparse, "masked_dense").double().train()
    twin = build_variant(sparse, "sparse").train()
    loss_s, loss_e = twin(images, active), emulated(images, active)
    assert abs(loss_s.item() - loss_e.item()) <= 1e-10 * abs(loss_s.item())
    loss_s.backward(), loss_e.backward()
    # Gradients reach the same decoder, projections and mask embeddings alike. (Train-mode
    # BN backward cancels large terms, so float64 gradients agree to ~1e-8, not 1e-14.)
    pairs = [(emulated.decoder, sparse.decoder), (emulated.projs, sparse.densify.projs),
             (emulated.mask_tokens, sparse.densify.mask_tokens)]
    for a, e in pairs:
        for (na, pa), (_, pe) in zip(a.named_parameters(), e.named_parameters()):
            assert rel_err(pa.grad, pe.grad) <= 1e-6, na
    # and the masked-dense BN running statistics moved exactly like the sparse ones
    dense_bn = [m for m in emulated.encoder.modules() if isinstance(m, MaskedBatchNorm2d)]
    sparse_bn = [m for m in sparse.encoder.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    if name == "resnet18":
        assert len(dense_bn) == len(sparse_bn) > 0
        for d, s in zip(dense_bn, sparse_bn):
            assert rel_err(d.running_var, s.running_var) <= 1e-10


def test_plain_dense_runs_the_unmasked_image():
    sparse, images, active = _setup("resnet18", torch.float64, grid=2, batch=2)
    dense = build_variant(sparse, "dense").double().eval()
    masked = build_variant(sparse, "masked_dense").double().eval()
    # Same weights, but the dense encoder sees the masked pixels, so its features differ.
    f_dense, f_masked = dense.encode(images, active), masked.encode(images, active)
    assert [f.shape for f in f_dense] == [f.shape for f in f_masked]
    assert rel_err(f_dense[-1], f_masked[-1]) > 1e-3
    assert torch.isfinite(dense(images, active))


def test_masked_layer_outside_a_forward_is_an_error():
    bn = MaskedBatchNorm2d(4, MaskContext())
    with pytest.raises(RuntimeError, match="outside MaskedDenseEncoder.forward"):
        bn(torch.randn(1, 4, 2, 2))
