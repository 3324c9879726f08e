"""Each sparse layer against its dense PyTorch layer on masked inputs (float64 and float32)."""
from __future__ import annotations

import MinkowskiEngine as ME
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import TOL, HostSyncAudit, rel_err
from masked_dense import mask_at
from spark_me.gather import site_mask, to_dense, to_sparse
from spark_me.layers import (
    SparseActivation,
    SparseBatchNorm2d,
    SparseConv2d,
    SparseDropPath,
    SparseMaxPool2d,
    sparse_add,
)
from spark_me.masking import random_patch_mask
from spark_me.ops import TableCache

DTYPES = [torch.float64, torch.float32]


def _sparse_input(batch=2, channels=5, grid=(3, 4), ratio=0.5, dtype=torch.float64, device="cpu", seed=0):
    """A random image-like tensor and mask; returns (dense zeroed input, sparse input, active)."""
    g = torch.Generator().manual_seed(seed)
    h, w = grid[0] * 32, grid[1] * 32
    x = torch.randn(batch, channels, h, w, generator=g, dtype=dtype).to(device)
    active = random_patch_mask(batch, grid, ratio, g).to(device)
    return x * mask_at(active, 1).to(dtype), to_sparse(x, active, 32), active


def _check(out_sparse, expected_dense, active, stride, dtype):
    b, _, h, w = expected_dense.shape
    assert out_sparse.tensor_stride == [stride, stride]
    # sites are exactly the visible patches at this stride
    assert torch.equal(site_mask(out_sparse, b, (h, w)).cpu(), mask_at(active, stride)[:, 0].cpu())
    got = to_dense(out_sparse, b, (h, w))
    assert rel_err(got, expected_dense) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "k,stride,bias",
    [(1, 1, False), (3, 1, True), (7, 1, False), (3, 2, False), (7, 2, True), (1, 2, False), (4, 4, True), (2, 2, True)],
)
def test_conv_matches_masked_dense(k, stride, bias, dtype, device):
    x, xs, active = _sparse_input(dtype=dtype, device=device)
    dense = nn.Conv2d(5, 6, k, stride, padding=k // 2 if k % 2 else 0, bias=bias).to(device, dtype)
    sparse = SparseConv2d(5, 6, k, stride, bias=bias).to(device, dtype)
    sparse.load_state_dict(dense.state_dict())
    expected = dense(x) * mask_at(active, stride).to(dtype)
    _check(sparse(xs), expected, active, stride, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_conv_chain_keeps_stride_and_sites(dtype, device):
    """Two strided convs in a row (stride 1 -> 2 -> 4): tensor stride composes."""
    x, xs, active = _sparse_input(dtype=dtype, device=device)
    d1, d2 = nn.Conv2d(5, 4, 3, 2, 1).to(device, dtype), nn.Conv2d(4, 3, 3, 2, 1).to(device, dtype)
    s1, s2 = SparseConv2d(5, 4, 3, 2).to(device, dtype), SparseConv2d(4, 3, 3, 2).to(device, dtype)
    s1.load_state_dict(d1.state_dict())
    s2.load_state_dict(d2.state_dict())
    m2, m4 = mask_at(active, 2).to(dtype), mask_at(active, 4).to(dtype)
    expected = d2(d1(x) * m2) * m4
    _check(s2(s1(xs)), expected, active, 4, dtype)


@pytest.mark.parametrize("conv_impl", ["torch", "minkowski"])
def test_conv_weight_layout_channels_last_with_pytorch_state_dict(conv_impl):
    """A k×k conv keeps its weight in channels_last memory (depthwise and 1×1 convs do not),
    across ``.to()``; its state dict loads into nn.Conv2d and back unchanged; and its weight
    gradient comes back in the weight's own strides (no copy when autograd stores it)."""
    _, xs, _ = _sparse_input()
    conv = SparseConv2d(5, 6, 3, 2, conv_impl=conv_impl).double()
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert not conv.weight.is_contiguous()
    assert SparseConv2d(5, 6, 1).weight.is_contiguous()
    assert SparseConv2d(5, 5, 7, groups=5).weight.is_contiguous()
    dense = nn.Conv2d(5, 6, 3, 2, 1).double()
    dense.load_state_dict(conv.state_dict())
    assert torch.equal(dense.weight, conv.weight) and dense.weight.is_contiguous()
    conv.load_state_dict(nn.Conv2d(5, 6, 3, 2, 1).double().state_dict())
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    conv(xs).F.square().sum().backward()
    assert conv.weight.grad.stride() == conv.weight.stride()


def test_conv_bias_only_at_visible_sites():
    """A bias must not leak into masked sites: with zero weight the output is the bias, at visible sites only."""
    _, xs, active = _sparse_input()
    conv = SparseConv2d(5, 2, 3, 1).double()
    nn.init.zeros_(conv.weight)
    out = conv(xs)
    assert torch.allclose(out.F, conv.bias.expand_as(out.F))
    assert out.F.shape[0] == int(mask_at(active, 1).sum())


def test_even_kernel_needs_matching_stride():
    with pytest.raises(ValueError, match="stride == kernel_size"):
        SparseConv2d(3, 4, 4, 2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("stride", [1, 2])
def test_maxpool_matches_masked_dense_after_relu(stride, dtype, device):
    x, xs, active = _sparse_input(dtype=dtype, device=device)
    x, xs = F.relu(x), SparseActivation(F.relu)(xs)
    expected = F.max_pool2d(x, 3, stride, 1) * mask_at(active, stride).to(dtype)
    _check(SparseMaxPool2d(3, stride)(xs), expected, active, stride, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("train", [True, False])
def test_batchnorm_statistics_over_visible_sites(train, dtype, device):
    x, xs, active = _sparse_input(dtype=dtype, device=device)
    bn = SparseBatchNorm2d(5).to(device, dtype).train(train)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    running_mean0 = bn.running_mean.clone()
    m = mask_at(active, 1)
    visible = x.permute(0, 2, 3, 1)[m[:, 0]]
    mean, var = (visible.mean(0), visible.var(0, unbiased=False)) if train else (bn.running_mean, bn.running_var)
    expected = ((x - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + bn.eps)) * bn.weight.view(
        1, -1, 1, 1
    ) + bn.bias.view(1, -1, 1, 1)
    _check(bn(xs), expected * m.to(dtype), active, 1, dtype)
    if train:  # running stats move towards the visible-site mean
        assert rel_err(bn.running_mean, 0.9 * running_mean0 + 0.1 * visible.mean(0)) <= TOL[dtype]


def test_drop_path_drops_whole_samples():
    _, xs, _ = _sparse_input(batch=64, grid=(1, 1), ratio=0.0, channels=2)
    dp = SparseDropPath(0.5).train()
    out = dp(xs)
    batch = xs.C[:, 0].long()
    kept = torch.zeros(64, dtype=torch.bool)
    for b in range(64):
        ratio = out.F[batch == b] / xs.F[batch == b]
        assert torch.allclose(ratio, torch.zeros_like(ratio)) or torch.allclose(ratio, torch.full_like(ratio, 2.0))
        kept[b] = ratio.abs().sum() > 0
    assert 0 < int(kept.sum()) < 64  # some dropped, some kept (probability of failure ~1e-19)
    assert dp.eval()(xs) is xs


def _drop_path_reference(xs, drop_prob: float, seed: int) -> torch.Tensor:
    """Whole samples dropped by a Bernoulli draw per sample, survivors scaled by 1/keep."""
    batch = xs.C[:, 0].long()
    torch.manual_seed(seed)
    keep = xs.F.new_empty(int(batch.max()) + 1).bernoulli_(1 - drop_prob) / (1 - drop_prob)
    return xs.F * keep[batch].unsqueeze(1)


def test_drop_path_on_a_batch_reads_the_coordinates_once_and_never_syncs():
    """On the batch's TableCache the per-site batch index is read once per map and the batch
    size comes from its extent: a drop path in every block costs no host synchronisation."""
    _, xs, _ = _sparse_input(batch=16, grid=(2, 2), ratio=0.5, channels=3)
    cm = xs.coordinate_manager
    assert isinstance(cm, TableCache) and cm.extent[0] == 16
    reads = []
    get_coordinates = cm.get_coordinates
    cm.get_coordinates = lambda key: reads.append(key) or get_coordinates(key)
    dp = SparseDropPath(0.4).train()
    for seed in (1, 2):
        expected = _drop_path_reference(xs, 0.4, seed)
        torch.manual_seed(seed)
        with HostSyncAudit() as audit:
            out = dp(xs)
        assert torch.equal(out.F, expected) and audit.ops == []
    assert len(reads) == 1 and len(cm.batch_indices) == 1
    assert cm.table_bytes() == 8 * len(xs.F)  # the cached int64 index is counted with the tables


def test_drop_path_on_a_plain_manager_reads_the_coordinates():
    _, xs, _ = _sparse_input(batch=8, grid=(2, 2), ratio=0.5, channels=3)
    plain = ME.SparseTensor(xs.F, coordinates=xs.C)  # MinkowskiEngine's own manager
    expected = _drop_path_reference(plain, 0.25, 3)
    torch.manual_seed(3)
    assert torch.equal(SparseDropPath(0.25).train()(plain).F, expected)


def test_sparse_add_checks_sites():
    _, xs, _ = _sparse_input()
    down = SparseConv2d(5, 5, 1, 2).double()(xs)
    with pytest.raises(ValueError, match="different sites"):
        sparse_add(xs, down)
    assert torch.equal(sparse_add(xs, xs).F, 2 * xs.F)


def test_stride_two_outputs_share_sites():
    """A 3x3/2 conv and a 1x1/2 conv of the same input land on the same coordinate map."""
    _, xs, _ = _sparse_input()
    a, b = SparseConv2d(5, 3, 3, 2).double()(xs), SparseConv2d(5, 3, 1, 2).double()(xs)
    assert a.coordinate_map_key == b.coordinate_map_key
