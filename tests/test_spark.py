"""The SparK model end to end: densify, gradients, loss masking, reconstruct, bad input."""
from __future__ import annotations

import pytest
import torch

from spark_me import SparK, build_sparse_encoder
from spark_me.gather import to_dense
from spark_me.loss import masked_reconstruction_loss
from spark_me.masking import random_patch_mask, upsample_mask


def _model(width=64, ratio=0.6, name="resnet18"):
    torch.manual_seed(0)
    return SparK(build_sparse_encoder(name), decoder_width=width, mask_ratio=ratio)


def _batch(b=2, grid=(2, 3), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, 32 * grid[0], 32 * grid[1], generator=g)


@pytest.mark.parametrize("name", ["resnet18", "convnext_atto"])
def test_backward_reaches_encoder_mask_tokens_and_decoder(name):
    model = _model(name=name)
    x = _batch()
    active = random_patch_mask(2, (2, 3), 0.5, torch.Generator().manual_seed(0))
    loss = model(x, active)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    groups = {
        "encoder": model.encoder.parameters(),
        "mask tokens": model.densify.mask_tokens.parameters(),
        "densify projections": model.densify.projs.parameters(),
        "decoder": model.decoder.parameters(),
    }
    for group, params in groups.items():
        grads = [p.grad for p in params]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads), group
        assert sum(float(g.abs().sum()) for g in grads) > 0, group
    # each scale's mask token gets gradient (every scale has masked sites here)
    for i, token in enumerate(model.densify.mask_tokens):
        assert token.grad.abs().sum() > 0, i


def test_reconstruction_on_visible_patches_does_not_change_loss():
    model = _model().eval()
    x = _batch()
    active = random_patch_mask(2, (2, 3), 0.5, torch.Generator().manual_seed(1))
    rec = model.forward_reconstruction(x, active)
    visible = upsample_mask(active, 32).unsqueeze(1)
    loss = masked_reconstruction_loss(rec, x, active, 32)
    changed = masked_reconstruction_loss(rec + 5.0 * visible, x, active, 32)
    assert torch.equal(loss, changed)
    assert torch.equal(model(x, active), loss)


def test_densify_fills_masked_sites_with_mask_token():
    model = _model().eval()
    x = _batch()
    active = random_patch_mask(2, (2, 3), 0.5, torch.Generator().manual_seed(2))
    feats = model.encoder(x, active)
    model.densify.projs = torch.nn.ModuleList(torch.nn.Identity() for _ in model.densify.projs)
    dense = model.densify(feats, 2, (64, 96))
    for i, d in enumerate(dense):  # coarsest first
        stride = 32 // 2**i
        m = upsample_mask(active, 32 // stride).unsqueeze(1)
        token = model.densify.mask_tokens[i].expand_as(d)
        assert torch.equal(torch.where(m, 0, d), torch.where(m, 0, token))
        normed = to_dense(model.densify.norms[i](feats[3 - i]), 2, d.shape[-2:])
        assert torch.equal(torch.where(m, d, 0), torch.where(m, normed, 0))


def test_random_mask_when_none_given_is_reproducible():
    model = _model()
    x = _batch()
    a = model.random_mask(x, torch.Generator().manual_seed(3))
    assert a.shape == (2, 2, 3) and (a.flatten(1).sum(1) == round(6 * 0.4)).all()
    model.eval()
    l1 = model(x, generator=torch.Generator().manual_seed(3))
    l2 = model(x, a)
    assert torch.equal(l1, l2)


def test_reconstruct_outputs():
    model = _model().eval()
    x = _batch()
    active = random_patch_mask(2, (2, 3), 0.5, torch.Generator().manual_seed(4))
    out = model.reconstruct(x, active)
    assert set(out) == {"input", "masked", "reconstruction", "pasted"}
    visible = upsample_mask(active, 32).unsqueeze(1).expand_as(x)
    viewed = x * model.image_std + model.image_mean
    assert torch.allclose(out["input"], viewed)
    assert torch.equal(out["masked"][~visible], torch.zeros_like(out["masked"][~visible]))
    assert torch.allclose(out["pasted"][visible], viewed[visible])
    assert torch.allclose(out["pasted"][~visible], out["reconstruction"][~visible])


@pytest.mark.parametrize(
    "images,active,match",
    [
        (torch.randn(2, 3, 60, 64), None, "not a multiple of the encoder's downsample ratio 32"),
        (torch.randn(2, 1, 64, 64), None, "3 channels"),
        (torch.zeros(2, 3, 64, 64, dtype=torch.uint8), None, "floating point and ImageNet-normalised.*normalize"),
        (torch.randn(3, 64, 64), None, r"\(B, 3, H, W\)"),
        (torch.randn(2, 3, 64, 64), torch.ones(2, 3, 3, dtype=torch.bool), "mask shape"),
        (torch.randn(2, 3, 64, 64), torch.ones(2, 2, 2), "bool"),
        (torch.randn(2, 3, 64, 64), torch.tensor([[[True, True], [True, True]], [[False] * 2] * 2]), "no visible patch"),
    ],
)
def test_bad_input(images, active, match):
    model = _model()
    if active is None:
        active = torch.ones(images.shape[0], 2, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match=match):
        model(images, active)


@pytest.mark.parametrize("ratio", [-0.1, 1.0])
def test_bad_mask_ratio(ratio):
    with pytest.raises(ValueError, match=r"outside \[0, 1\)"):
        SparK(build_sparse_encoder("resnet18"), decoder_width=64, mask_ratio=ratio)


def test_random_mask_rejects_bad_size():
    with pytest.raises(ValueError, match="225x224 is not a multiple"):
        _model().random_mask(torch.randn(1, 3, 225, 224))


@pytest.mark.parametrize("dense_stem", [False, True])
def test_a_step_makes_the_host_wait_only_to_gather_and_on_each_tables_first_use(dense_stem):
    """Forward+backward of a whole SparK step (drop path on) on a fresh batch: the only ops
    that would stall a GPU's host are the gather's (the mask check and the visible
    coordinates, of the pixels or, with the dense stem, of the stem's output sites) and
    each neighbour table's one read of ``complete``; densify, the decoder and the loss add
    none. (MinkowskiEngine's own C++ waits are invisible here: on an H100 a ResNet-50 bf16
    step made 56 host syncs, this audit sees 8 of them: docs/gpu.md.)"""
    from conftest import HostSyncAudit

    torch.manual_seed(0)
    encoder = build_sparse_encoder("resnet18", drop_path_rate=0.1, conv_impl="torch", dense_stem=dense_stem)
    model = SparK(encoder, decoder_width=64).train()
    images = torch.randn(2, 3, 96, 64)
    active = random_patch_mask(2, (3, 2), 0.5, torch.Generator().manual_seed(0))
    with HostSyncAudit() as audit:
        model(images, active).backward()
    waits = sorted(zip(audit.ops, audit.sources))
    gather = "gather.py:conv_to_sparse" if dense_stem else "gather.py:to_sparse"
    assert [w for w in waits if w[0] == "aten::nonzero"] == [
        ("aten::nonzero", "gather.py:check_inputs"), ("aten::nonzero", gather)]
    complete = [w for w in waits if w[0] != "aten::nonzero"]
    assert complete and set(complete) == {("aten::_local_scalar_dense", "tables.py:complete")}, waits
