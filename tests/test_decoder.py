from __future__ import annotations

import pytest
import torch

from spark_me.decoder import LightDecoder


def test_shapes_and_widths():
    dec = LightDecoder(width=64, upsample_ratio=32)
    assert dec.channels == [64, 32, 16, 8, 4, 2]
    assert len(dec.blocks) == 5
    feats = [torch.randn(2, c, 2 * 2**i, 3 * 2**i) for i, c in enumerate(dec.channels[:4])]
    out = dec(feats)
    assert out.shape == (2, 3, 64, 96)


def test_every_feature_is_used():
    dec = LightDecoder(width=64).train()  # batch statistics keep activations O(1)
    feats = [torch.randn(2, c, 2**i, 2**i) for i, c in enumerate(dec.channels[:4])]
    base = dec(feats)
    for i in range(4):
        changed = [f.clone() for f in feats]
        changed[i][0] += torch.randn_like(changed[i][0])
        assert (dec(changed) - base).abs().max() > 1e-3 * base.abs().max(), i


def test_bad_width():
    with pytest.raises(ValueError, match="divisible"):
        LightDecoder(width=100)
