"""Sparse ResNets against timm: dense equivalence, masked-dense semantics, weights."""
from __future__ import annotations

import pytest
import timm
import torch

from conftest import TOL, random_images, randomize_norms, rel_err
from masked_dense import mask_at, masked_dense_resnet
from spark_me import build_sparse_encoder, list_encoders
from spark_me.gather import site_mask, to_dense
from spark_me.masking import random_patch_mask

DTYPES = [torch.float64, torch.float32]
CONV_IMPLS = ["torch", "minkowski"]


def _pair(name: str, dtype: torch.dtype, device: torch.device, train: bool, conv_impl: str = "auto"):
    """A timm model with random weights/BN stats and the sparse encoder carrying the same weights."""
    g = torch.Generator().manual_seed(1)
    dense = timm.create_model(name, pretrained=False)
    randomize_norms(dense, g)
    sparse = build_sparse_encoder(name, conv_impl=conv_impl)
    sparse.load_timm_state_dict(dense.state_dict())
    return dense.to(device, dtype).train(train), sparse.to(device, dtype).train(train)


@pytest.mark.parametrize("conv_impl", CONV_IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_all_visible_equals_timm(name, train, dtype, conv_impl, device):
    dense, sparse = _pair(name, dtype, device, train, conv_impl)
    x = random_images(2, (3, 2), dtype, device)
    active = torch.ones(2, 3, 2, dtype=torch.bool, device=device)
    expected = dense.forward_intermediates(x, indices=[1, 2, 3, 4], intermediates_only=True)
    got = sparse(x, active)
    assert [f.tensor_stride[0] for f in got] == [4, 8, 16, 32]
    assert [f.F.shape[1] for f in got] == sparse.feature_channels
    for feat, ref in zip(got, expected):
        assert rel_err(to_dense(feat, 2, ref.shape[-2:]), ref) <= TOL[dtype]


@pytest.mark.parametrize("conv_impl,dense_stem", [(c, False) for c in CONV_IMPLS] + [("torch", True)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_random_masks_equal_masked_dense(name, train, dtype, conv_impl, dense_stem, device):
    dense, sparse = _pair(name, dtype, device, train, conv_impl)
    sparse.set_dense_stem(dense_stem)
    # Train-mode BN divides by the std of the visible sites; with very few sites in the
    # last stage, float32 rounding differences get amplified, so keep >= 16 sites there.
    for seed, ratio in [(0, 0.6), (1, 0.3), (2, 0.75)]:
        g = torch.Generator().manual_seed(seed)
        x = random_images(4, (4, 4), dtype, device, seed)
        active = random_patch_mask(4, (4, 4), ratio, g).to(device)
        expected = masked_dense_resnet(dense, x, active)
        got = sparse(x, active)
        for feat, ref in zip(got, expected):
            stride = feat.tensor_stride[0]
            size = ref.shape[-2:]
            # sites are exactly the visible patches, and nothing exists at a masked site
            assert torch.equal(site_mask(feat, 4, size), mask_at(active, stride)[:, 0])
            assert feat.F.shape[0] == int(active.sum()) * (32 // stride) ** 2
            assert rel_err(to_dense(feat, 4, size), ref) <= TOL[dtype]


@pytest.mark.parametrize("conv_impl,dense_stem", [(c, False) for c in CONV_IMPLS] + [("torch", True)])
def test_gradients_match_masked_dense(conv_impl, dense_stem):
    """float64 gradients of every parameter and of the input pixels equal the masked-dense
    reference's, on a mask where one sample shows a single patch; with the stem's conv
    sparse, or dense on the zero-filled image."""
    dense, sparse = _pair("resnet18", torch.float64, torch.device("cpu"), True, conv_impl)
    sparse.set_dense_stem(dense_stem)
    x = random_images(2, (2, 3), torch.float64, "cpu")
    active = random_patch_mask(2, (2, 3), 0.5, torch.Generator().manual_seed(4))
    active[0] = False
    active[0, 1, 1] = True
    x_dense, x_sparse = x.clone().requires_grad_(), x.clone().requires_grad_()
    refs = masked_dense_resnet(dense, x_dense, active)
    weights = [torch.randn(r.shape, dtype=torch.float64) for r in refs]
    sum((r * w).sum() for r, w in zip(refs, weights)).backward()
    feats = sparse(x_sparse, active)
    sum((to_dense(f, 2, w.shape[-2:]) * w).sum() for f, w in zip(feats, weights)).backward()
    grads = dict(sparse.named_parameters())
    for n, p in dense.named_parameters():
        if not n.startswith("fc."):
            assert rel_err(grads[n].grad, p.grad) <= TOL[torch.float64], n
    visible = mask_at(active, 1).double()
    assert rel_err(x_sparse.grad * visible, x_dense.grad * visible) <= TOL[torch.float64]


def test_masked_sites_do_not_influence_visible_features():
    """Changing pixels under the mask changes no feature (the input is truly sparse)."""
    _, sparse = _pair("resnet18", torch.float64, torch.device("cpu"), train=True)
    x = random_images(2, (2, 3), torch.float64, "cpu")
    active = random_patch_mask(2, (2, 3), 0.5, torch.Generator().manual_seed(3))
    noise = torch.randn_like(x) * (1 - mask_at(active, 1).double())
    for a, b in zip(sparse(x, active), sparse(x + noise, active)):
        # same up to summation order (a separate forward may enumerate sites differently)
        size = (64 // a.tensor_stride[0], 96 // a.tensor_stride[0])
        assert rel_err(to_dense(b, 2, size), to_dense(a, 2, size)) <= 1e-13


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnet200"])
def test_timm_round_trip_is_exact(name):
    dense = timm.create_model(name, pretrained=False)
    sd = dense.state_dict()
    sparse = build_sparse_encoder(name)
    sparse.load_timm_state_dict(sd)
    exported = sparse.timm_state_dict()
    headless = timm.create_model(name, pretrained=False, num_classes=0)
    headless.load_state_dict(exported, strict=True)
    for k, v in headless.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_feature_channels_and_ratio():
    assert build_sparse_encoder("resnet50").feature_channels == [256, 512, 1024, 2048]
    assert build_sparse_encoder("resnet18").feature_channels == [64, 128, 256, 512]
    assert build_sparse_encoder("resnet18").downsample_ratio == 32


def test_weights_from_another_model_are_rejected():
    sparse = build_sparse_encoder("resnet18")
    with pytest.raises(ValueError, match="another model"):
        sparse.load_timm_state_dict(timm.create_model("resnet50").state_dict())


def test_unknown_model_lists_supported():
    with pytest.raises(ValueError, match="resnet50") as e:
        build_sparse_encoder("resnet51")
    assert "unknown sparse encoder 'resnet51'" in str(e.value)
    assert {"resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnet200"} <= set(list_encoders())


def test_drop_path_schedule_matches_timm():
    sparse = build_sparse_encoder("resnet50", drop_path_rate=0.1)
    dense = timm.create_model("resnet50", drop_path_rate=0.1)
    sparse_rates = [b.drop_path.drop_prob if b.drop_path else 0.0 for l in (1, 2, 3, 4) for b in getattr(sparse, f"layer{l}")]
    dense_rates = [b.drop_path.drop_prob if b.drop_path else 0.0 for l in (1, 2, 3, 4) for b in getattr(dense, f"layer{l}")]
    assert sparse_rates == pytest.approx(dense_rates)


def test_a_dense_stem_leaves_no_full_resolution_table():
    """With the stem's conv dense on the zero-filled image, the batch's first map is at the
    stem's stride: no table is built on pixels (the 7×7 stem's is the largest of a step)."""
    _, sparse = _pair("resnet18", torch.float64, torch.device("cpu"), train=True)
    x = random_images(2, (2, 3), torch.float64, "cpu")
    active = random_patch_mask(2, (2, 3), 0.5, torch.Generator().manual_seed(3))
    built = {}
    for dense_stem in (False, True):
        sparse.set_dense_stem(dense_stem)
        features = sparse(x, active)
        built[dense_stem] = {key[0] for key in features[0].coordinate_manager.neighbour_tables}  # input strides
    assert (1, 1) in built[False] and (1, 1) not in built[True]
    assert built[True] == built[False] - {(1, 1)}
