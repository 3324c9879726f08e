from __future__ import annotations

import pytest
import torch

from spark_me.masking import num_visible, random_patch_mask, upsample_mask


@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.6, 0.75, 0.9])
def test_exact_visible_count_per_sample(ratio):
    active = random_patch_mask(16, (7, 7), ratio, torch.Generator().manual_seed(0))
    assert active.dtype == torch.bool and active.shape == (16, 7, 7)
    assert (active.flatten(1).sum(1) == round(49 * (1 - ratio))).all()


def test_reproducible_from_generator_and_differs_per_sample():
    a = random_patch_mask(8, (7, 7), 0.6, torch.Generator().manual_seed(5))
    b = random_patch_mask(8, (7, 7), 0.6, torch.Generator().manual_seed(5))
    c = random_patch_mask(8, (7, 7), 0.6, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len({tuple(m.flatten().tolist()) for m in a}) == 8


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5])
def test_bad_ratio(ratio):
    with pytest.raises(ValueError, match=r"outside \[0, 1\)"):
        random_patch_mask(2, (7, 7), ratio)


def test_no_visible_patch_is_an_error():
    assert num_visible(4, 0.9) == 0
    with pytest.raises(ValueError, match="no visible patch"):
        random_patch_mask(2, (2, 2), 0.9)


def test_upsample_mask():
    m = torch.tensor([[[True, False]]])
    up = upsample_mask(m, 2)
    assert up.tolist() == [[[True, True, False, False], [True, True, False, False]]]
