"""Sparse ConvNeXts against timm: dense equivalence, masked-dense semantics, weights."""
from __future__ import annotations

import pytest
import timm
import torch

from conftest import TOL, random_images, randomize_norms, rel_err
from masked_dense import mask_at, masked_dense_convnext
from spark_me import build_sparse_encoder
from spark_me.gather import site_mask, to_dense, to_sparse
from spark_me.layers import SparseDropPath, SparseLayerNorm
from spark_me.masking import random_patch_mask

DTYPES = [torch.float64, torch.float32]


def _pair(name, dtype, device, train=False, conv_impl="auto"):
    g = torch.Generator().manual_seed(1)
    dense = timm.create_model(name, pretrained=False)
    randomize_norms(dense, g)
    with torch.no_grad():  # non-trivial layer scale and biases (timm inits gamma=1e-6, biases 0)
        for n, p in dense.named_parameters():
            if n.endswith("gamma") or n.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    sparse = build_sparse_encoder(name, conv_impl=conv_impl)
    sparse.load_timm_state_dict(dense.state_dict())
    return dense.to(device, dtype).train(train), sparse.to(device, dtype).train(train)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("name", ["convnext_tiny", "convnext_atto"])
def test_all_visible_equals_timm(name, train, dtype, device):
    dense, sparse = _pair(name, dtype, device, train)
    x = random_images(2, (2, 3), dtype, device)
    active = torch.ones(2, 2, 3, dtype=torch.bool, device=device)
    expected = dense.forward_intermediates(x, indices=[0, 1, 2, 3], intermediates_only=True)
    got = sparse(x, active)
    assert [f.tensor_stride[0] for f in got] == [4, 8, 16, 32]
    for feat, ref in zip(got, expected):
        assert rel_err(to_dense(feat, 2, ref.shape[-2:]), ref) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("conv_impl,impl,dense_stem", [("torch", "gather", False), ("minkowski", "gather", False),
                                                       ("minkowski", "minkowski", False), ("torch", "gather", True)])
@pytest.mark.parametrize("name", ["convnext_tiny", "convnext_atto"])
def test_random_masks_equal_masked_dense(name, conv_impl, impl, dense_stem, dtype, device):
    dense, sparse = _pair(name, dtype, device, conv_impl=conv_impl)
    sparse.set_dense_stem(dense_stem)
    for m in sparse.modules():
        if hasattr(m, "depthwise_impl"):
            m.depthwise_impl = impl
    for seed, ratio in [(0, 0.6), (1, 0.3), (2, 0.85)]:
        x = random_images(3, (3, 4), dtype, device, seed)
        active = random_patch_mask(3, (3, 4), ratio, torch.Generator().manual_seed(seed)).to(device)
        for feat, ref in zip(sparse(x, active), masked_dense_convnext(dense, x, active)):
            size = ref.shape[-2:]
            assert torch.equal(site_mask(feat, 3, size), mask_at(active, feat.tensor_stride[0])[:, 0])
            assert rel_err(to_dense(feat, 3, size), ref) <= TOL[dtype]


@pytest.mark.parametrize("conv_impl,dense_stem", [("torch", False), ("minkowski", False), ("torch", True)])
def test_gradients_match_masked_dense(conv_impl, dense_stem):
    """Backward through the sparse convs equals autograd through the dense reference, for
    every parameter and the input pixels, on a mask where one sample shows a single patch;
    with the stem's conv sparse, or dense on the zero-filled image."""
    dense, sparse = _pair("convnext_atto", torch.float64, "cpu", conv_impl=conv_impl)
    sparse.set_dense_stem(dense_stem)
    x = random_images(2, (2, 3), torch.float64, "cpu")
    active = random_patch_mask(2, (2, 3), 0.5, torch.Generator().manual_seed(0))
    active[1] = False
    active[1, 0, 2] = True
    x_dense, x_sparse = x.clone().requires_grad_(), x.clone().requires_grad_()
    w = [torch.randn(f.shape, dtype=torch.float64) for f in masked_dense_convnext(dense, x, active)]
    sum(((f * wi).sum() for f, wi in zip(masked_dense_convnext(dense, x_dense, active), w))).backward()
    feats = sparse(x_sparse, active)
    sum(((to_dense(f, 2, wi.shape[-2:]) * wi).sum() for f, wi in zip(feats, w))).backward()
    sparse_grads = dict(sparse.named_parameters())
    for n, p in dense.named_parameters():
        if n.startswith("head"):
            continue
        assert rel_err(sparse_grads[n].grad, p.grad) <= TOL[torch.float64], n
    visible = mask_at(active, 1).double()
    assert rel_err(x_sparse.grad * visible, x_dense.grad * visible) <= TOL[torch.float64]


def test_drop_path_drops_whole_samples():
    """In a block with drop-path 0.5, each sample gets either no residual or twice it."""
    _, sparse = _pair("convnext_atto", torch.float64, "cpu")
    x = to_sparse(random_images(16, (1, 1), torch.float64, "cpu"), torch.ones(16, 1, 1, dtype=torch.bool), 32)
    stem = sparse.stem(x)
    block = sparse.stages[0].blocks[0].train()
    residual = block(stem).F - stem.F  # no drop-path yet
    block.drop_path = SparseDropPath(0.5)
    dropped = block(stem)
    batch = stem.C[:, 0].long()
    outcomes = []
    for b in range(16):
        rows = batch == b
        if torch.allclose(dropped.F[rows], stem.F[rows]):
            outcomes.append("dropped")
        else:
            assert torch.allclose(dropped.F[rows], stem.F[rows] + 2 * residual[rows])
            outcomes.append("kept")
    assert set(outcomes) == {"dropped", "kept"}  # fails with probability 2**-15


@pytest.mark.parametrize("name", ["convnext_atto", "convnext_tiny", "convnext_small", "convnext_base", "convnext_large"])
def test_timm_round_trip_is_exact(name):
    dense = timm.create_model(name, pretrained=False)
    sd = dense.state_dict()
    sparse = build_sparse_encoder(name)
    sparse.load_timm_state_dict(sd)
    headless = timm.create_model(name, pretrained=False, num_classes=0)
    headless.load_state_dict(sparse.timm_state_dict(), strict=True)
    for k, v in headless.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_densify_norm_is_layernorm():
    enc = build_sparse_encoder("convnext_tiny")
    assert isinstance(enc.densify_norm(96), SparseLayerNorm)
    assert enc.feature_channels == [96, 192, 384, 768]
