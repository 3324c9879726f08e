from __future__ import annotations

import torch

from masked_dense import mask_at
from spark_me.gather import site_mask, to_dense, to_sparse
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
