"""The documented custom-encoder example: dense equivalence, registry, and a SparK step."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from conftest import TOL, randomize_norms, rel_err
from masked_dense import mask_at
from spark_me import SparK, build_sparse_encoder, list_encoders
from spark_me.gather import to_dense
from spark_me.masking import random_patch_mask

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "custom_encoder.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("custom_encoder", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_dense_equivalence(example, dtype):
    dense = example.TinyConvNet()
    randomize_norms(dense, torch.Generator().manual_seed(0))
    sparse = build_sparse_encoder("tiny_convnet")
    sparse.load_state_dict(dense.state_dict())
    dense, sparse = dense.to(dtype).train(), sparse.to(dtype).train()
    x = torch.randn(2, 3, 64, 96, dtype=dtype)
    got = sparse(x, torch.ones(2, 2, 3, dtype=torch.bool))
    for feat, ref in zip(got, dense.forward_features(x)):
        assert rel_err(to_dense(feat, 2, ref.shape[-2:]), ref) <= TOL[dtype]


def test_masked_features_match_dense_on_visible_patches_eval(example):
    """In eval mode (no batch statistics), each visible site's feature depends only on
    visible inputs, so it equals the dense net run on the zeroed image with re-masking."""
    dense = example.TinyConvNet().double().eval()
    randomize_norms(dense, torch.Generator().manual_seed(1))
    sparse = build_sparse_encoder("tiny_convnet").double().eval()
    sparse.load_state_dict(dense.state_dict())
    x = torch.randn(2, 3, 96, 96, dtype=torch.float64)
    active = random_patch_mask(2, (3, 3), 0.5, torch.Generator().manual_seed(0))
    # masked-dense reference written out for this net
    h = dense.stem(x * mask_at(active, 1).double()) * mask_at(active, 4)
    stride = 4
    for i, (down, conv, bn) in enumerate(zip(dense.downs, dense.convs, dense.bns)):
        if i:
            stride *= 2
        h = down(h) * mask_at(active, stride)
        h = torch.relu(h + bn(conv(h)) * mask_at(active, stride))
        feat = sparse(x, active)[i]
        assert rel_err(to_dense(feat, 2, h.shape[-2:]), h) <= TOL[torch.float64]


def test_registered_and_trains(example):
    assert "tiny_convnet" in list_encoders()
    model = SparK(build_sparse_encoder("tiny_convnet"), decoder_width=64)
    loss = model(torch.randn(2, 3, 64, 64), generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and model.encoder.stem.weight.grad.abs().sum() > 0


def test_options_it_does_not_implement_are_refused_naming_the_hook(example):
    """The example implements neither stage-wise recomputation nor a dense stem: asking
    for them says what to implement (model.dense_stem=true reaches this through build_model,
    which names the config key in front)."""
    encoder = build_sparse_encoder("tiny_convnet")
    with pytest.raises(ValueError, match=r"SparseTinyConvNet has no dense stem: implement stem_conv_to_sparse\(images, "
                                         r"active\) with spark_me.gather.conv_to_sparse and forward_after_stem_conv\(x\)"):
        encoder.set_dense_stem(True)
    encoder.set_dense_stem(False)  # turning it off is always fine
    assert not encoder.dense_stem


def test_a_dense_stem_claimed_but_not_written_names_the_missing_method(example):
    """An encoder that sets supports_dense_stem without the two methods fails on its first
    batch naming the one to write."""
    encoder = build_sparse_encoder("tiny_convnet")
    type(encoder).supports_dense_stem = True
    try:
        encoder.set_dense_stem(True)
        images, active = torch.randn(2, 3, 64, 64), torch.ones(2, 2, 2, dtype=torch.bool)
        with pytest.raises(NotImplementedError, match=r"SparseTinyConvNet sets supports_dense_stem but does not "
                                                      r"implement stem_conv_to_sparse\(images, active\)"):
            encoder(images, active)
    finally:
        del type(encoder).supports_dense_stem
