"""Optimizer construction: lr scaling, weight-decay exemptions, clipping."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from timm.optim import Lamb

from spark_me import SparK, build_sparse_encoder
from spark_me.optim import build_optimizer, clip_gradients, param_groups, peak_lr


@pytest.fixture(scope="module")
def model():
    return SparK(build_sparse_encoder("resnet18"), decoder_width=64)


def test_peak_lr_follows_the_linear_scaling_rule():
    assert peak_lr(2e-4, 4096) == pytest.approx(3.2e-3)
    assert peak_lr(2e-4, 256) == pytest.approx(2e-4)


def test_biases_1d_params_and_mask_tokens_get_no_weight_decay(model):
    decay, no_decay = param_groups(model, 0.04)
    assert decay["weight_decay"] == 0.04 and no_decay["weight_decay"] == 0.0
    ids_decay = {id(p) for p in decay["params"]}
    ids_no = {id(p) for p in no_decay["params"]}
    assert not ids_decay & ids_no
    assert ids_decay | ids_no == {id(p) for p in model.parameters()}
    for name, p in model.named_parameters():
        exempt = p.ndim <= 1 or name.endswith(".bias") or name.startswith("densify.mask_tokens")
        assert (id(p) in ids_no) == exempt, name
    assert all(id(t) in ids_no for t in model.densify.mask_tokens)
    assert id(model.encoder.conv1.weight) in ids_decay and id(model.encoder.bn1.weight) in ids_no


def test_build_optimizer_lamb_without_internal_clipping_and_adamw(model):
    cfg = OmegaConf.create(dict(name="lamb", betas=[0.9, 0.95], eps=1e-6, weight_decay=0.04))
    opt = build_optimizer(cfg, model, lr=1e-3)
    assert isinstance(opt, Lamb) and opt.defaults["max_grad_norm"] is None
    assert opt.param_groups[0]["betas"] == (0.9, 0.95) and opt.param_groups[0]["lr"] == 1e-3
    cfg.name = "adamw"
    assert isinstance(build_optimizer(cfg, model, lr=1e-3), torch.optim.AdamW)
    cfg.name = "sgd"
    with pytest.raises(ValueError, match="optimizer=lamb"):
        build_optimizer(cfg, model, lr=1e-3)


def test_clip_gradients_bounds_the_global_norm():
    layer = torch.nn.Linear(4, 4)
    for p in layer.parameters():
        p.grad = torch.full_like(p, 10.0)
    norm = clip_gradients(layer, 5.0)
    assert float(norm) == pytest.approx(10.0 * 20**0.5, rel=1e-5)
    after = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in layer.parameters()]))
    assert float(after) == pytest.approx(5.0, rel=1e-4)
    assert float(clip_gradients(layer, None)) == pytest.approx(5.0, rel=1e-4)
