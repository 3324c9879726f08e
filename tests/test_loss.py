from __future__ import annotations

import torch

from spark_me.loss import masked_reconstruction_loss, patch_statistics, patchify, unpatchify


def test_patchify_round_trip_and_layout():
    x = torch.randn(2, 3, 64, 96)
    p = patchify(x, 32)
    assert p.shape == (2, 6, 32 * 32 * 3)
    assert torch.equal(unpatchify(p, 32, (2, 3)), x)
    # patch 4 = row 1, column 1; first pixel is (y=32, x=32), channels last
    assert torch.equal(p[1, 4, :3], x[1, :, 32, 32])


def test_loss_matches_direct_formula():
    g = torch.Generator().manual_seed(0)
    x, rec = torch.randn(2, 3, 64, 64, generator=g), torch.randn(2, 3, 64, 64, generator=g)
    active = torch.tensor([[[True, False], [False, True]], [[False, False], [True, True]]])
    expected, n = 0.0, 0
    for b in range(2):
        for i in range(2):
            for j in range(2):
                if active[b, i, j]:
                    continue
                t = x[b, :, 32 * i : 32 * i + 32, 32 * j : 32 * j + 32]
                t = (t - t.mean()) / (t.var() + 1e-6).sqrt()
                r = rec[b, :, 32 * i : 32 * i + 32, 32 * j : 32 * j + 32]
                expected += ((r - t) ** 2).mean()
                n += 1
    assert torch.allclose(masked_reconstruction_loss(rec, x, active, 32), expected / n)


def test_visible_patches_do_not_count_and_perfect_prediction_is_zero():
    x = torch.randn(2, 3, 64, 64)
    active = torch.tensor([[[True, False], [False, True]]] * 2)
    target = patchify(x, 32)
    mean, std = patch_statistics(target)
    perfect = unpatchify((target - mean) / std, 32, (2, 2))
    assert masked_reconstruction_loss(perfect, x, active, 32) < 1e-10
    changed = perfect + 10 * active.repeat_interleave(32, 1).repeat_interleave(32, 2).unsqueeze(1)
    assert masked_reconstruction_loss(changed, x, active, 32) < 1e-10
