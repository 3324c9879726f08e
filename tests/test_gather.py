from __future__ import annotations

import pytest
import torch

from conftest import rel_err
from masked_dense import mask_at
from spark_me.gather import conv_to_sparse, site_mask, to_dense, to_sparse
from spark_me.layers import SparseConv2d
from spark_me.masking import random_patch_mask


def test_visible_pixels_become_sparse_tensor():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(3, 3, 64, 96, generator=g)
    active = random_patch_mask(3, (2, 3), 0.5, g)
    x = to_sparse(images, active, 32)
    assert x.C.dtype == torch.int32 and x.C.shape[1] == 3
    assert x.tensor_stride == [1, 1]
    pixel = mask_at(active, 1)[:, 0]
    assert x.F.shape == (int(pixel.sum()), 3)
    # every coordinate is a visible pixel, and its features are that pixel's values
    b, y, xx = x.C.long().unbind(1)
    assert pixel[b, y, xx].all()
    assert torch.equal(x.F, images[b, :, y, xx])


def test_to_dense_round_trip_and_fill():
    images = torch.randn(2, 3, 64, 64)
    active = torch.tensor([[[True, False], [False, True]], [[False, True], [True, True]]])
    x = to_sparse(images, active, 32)
    m = mask_at(active, 1)
    assert torch.equal(to_dense(x, 2, (64, 64)), images * m)
    fill = torch.tensor([1.0, 2.0, 3.0])
    filled = to_dense(x, 2, (64, 64), fill=fill)
    assert torch.equal(filled, torch.where(m, images, fill.view(1, 3, 1, 1)))
    assert torch.equal(site_mask(x, 2, (64, 64)), m[:, 0])


@pytest.mark.parametrize("kernel,stride", [(7, 2), (4, 4), (3, 1), (2, 2)])
def test_a_first_conv_on_the_zero_filled_image_equals_the_sparse_conv(kernel, stride):
    """Same sites (the stride's sites in visible patches, at pixel coordinates), same
    features and, through both, the same weight gradient (float64)."""
    g = torch.Generator().manual_seed(kernel)
    images = torch.randn(3, 3, 64, 96, generator=g, dtype=torch.float64)
    active = random_patch_mask(3, (2, 3), 0.5, g)
    active[2] = False
    active[2, 1, 2] = True  # a sample with one visible patch, at the border
    conv = SparseConv2d(3, 8, kernel, stride, bias=True, conv_impl="torch").double()
    ref = conv(to_sparse(images, active, 32))
    ref_grad = torch.autograd.grad(ref.F.square().sum(), conv.weight)[0]
    got = conv_to_sparse(images, active, 32, conv.weight, conv.bias, stride)
    got_grad = torch.autograd.grad(got.F.square().sum(), conv.weight)[0]
    assert got.tensor_stride == [stride, stride] and len(got.F) == len(ref.F)
    size = (64 // stride, 96 // stride)
    assert torch.equal(site_mask(got, 3, size), mask_at(active, stride)[:, 0])
    assert rel_err(to_dense(got, 3, size), to_dense(ref, 3, size)) <= 1e-12
    assert rel_err(got_grad, ref_grad) <= 1e-12


def test_a_first_conv_that_cannot_run_before_gathering_is_refused():
    images, active = torch.randn(1, 3, 32, 32), torch.ones(1, 1, 1, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"a 3x3/3 conv .* the stride must divide the patch size 32"):
        conv_to_sparse(images, active, 32, torch.randn(8, 3, 3, 3), None, 3)
    with pytest.raises(ValueError, match=r"an even kernel must equal the stride"):
        conv_to_sparse(images, active, 32, torch.randn(8, 3, 4, 4), None, 2)
