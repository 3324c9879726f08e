"""The default pre-training recipe against the official SparK code.

The official values are read from github.com/keyu-tian/SparK at commit
a63e386f8e5186bc07ad7fce86e06b08f48a61ea (``pretrain/``); each table below cites the file
and lines it was taken from.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from hydra import compose, initialize_config_dir

import spark_me
from spark_me import SparK, build_sparse_encoder
from spark_me.data import ResumableSampler
from spark_me.decoder import LightDecoder
from spark_me.layers import SparseDropPath
from spark_me.optim import build_optimizer, peak_lr
from spark_me.preflight import ConfigError
from spark_me.pretrain import build_model
from spark_me.run_config import plan_batches, validate_config

CONFIG_DIR = Path(spark_me.__file__).parent / "configs"

# pretrain/models/__init__.py lines 34-43, ``pretrain_default_model_kwargs``: drop_path_rate
# per model. A model missing from that table gets the ``--dp`` default 0.0
# (pretrain/utils/arg_util.py line 37; the official build_sparse_encoder has no entry for it).
OFFICIAL_DROP_PATH = {
    "resnet50": 0.05,
    "resnet101": 0.08,
    "resnet152": 0.10,
    "resnet200": 0.15,
    "convnext_small": 0.2,
    "convnext_base": 0.3,
    "convnext_large": 0.4,
}
DP_DEFAULT = 0.0
# pretrain/utils/arg_util.py lines 123-129: ``args.ada`` (beta2 of LAMB and AdamW, main.py
# lines 78-79) is 0.95 for ResNets and 0.999 for ConvNeXts.
OFFICIAL_BETA2 = {"resnet": 0.95, "convnext": 0.999}
# pretrain/utils/arg_util.py line 33 (``bs = 4096``, the global batch, split over the
# processes at lines 120-121), line 38 (``base_lr = 2e-4``) and line 132
# (``lr = base_lr * glb_batch_size / 256``).
OFFICIAL_GLOBAL_BATCH = 4096
OFFICIAL_BASE_LR = 2e-4
OFFICIAL_PEAK_LR = OFFICIAL_BASE_LR * OFFICIAL_GLOBAL_BATCH / 256  # 3.2e-3

MODEL_CONFIGS = sorted(p.stem for p in (CONFIG_DIR / "model").glob("*.yaml") if p.stem != "custom")


def _cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("pretrain", overrides=list(overrides))


def _family(name: str) -> str:
    return "resnet" if name.startswith("resnet") else "convnext"


@pytest.fixture(scope="module")
def tiny_spark() -> SparK:
    return SparK(build_sparse_encoder("resnet18"), decoder_width=64)


def test_every_model_config_is_in_the_recipe_table():
    assert {_family(n) for n in MODEL_CONFIGS} == set(OFFICIAL_BETA2)
    assert set(OFFICIAL_DROP_PATH) <= set(MODEL_CONFIGS)


@pytest.mark.parametrize("name", MODEL_CONFIGS)
@pytest.mark.parametrize("optimizer", ["lamb", "adamw"])
def test_model_config_defaults_are_the_official_recipe(name, optimizer, tiny_spark):
    cfg = _cfg(f"model={name}", f"optimizer={optimizer}", "data.path=/unused")
    beta2 = OFFICIAL_BETA2[_family(name)]
    assert cfg.model.drop_path_rate == OFFICIAL_DROP_PATH.get(name, DP_DEFAULT)
    assert list(cfg.optimizer.betas) == [0.9, beta2]
    assert cfg.data.global_batch_size == OFFICIAL_GLOBAL_BATCH and cfg.trainer.grad_accum_steps == 1
    assert cfg.optimizer.base_lr == OFFICIAL_BASE_LR
    # the learning rate follows the global batch, not the number of processes
    for world in (1, 8, 32):
        plan = plan_batches(cfg.data.global_batch_size, world, cfg.trainer.grad_accum_steps)
        assert (plan.global_batch, plan.micro_batch) == (OFFICIAL_GLOBAL_BATCH, OFFICIAL_GLOBAL_BATCH // world)
        assert peak_lr(cfg.optimizer.base_lr, plan.global_batch) == pytest.approx(OFFICIAL_PEAK_LR, rel=1e-15)
    # the configured betas reach the optimizer
    opt = build_optimizer(cfg.optimizer, tiny_spark, 1e-3)
    assert all(group["betas"] == (0.9, beta2) for group in opt.param_groups)


@pytest.mark.parametrize("name", ["resnet50", "convnext_small"])
def test_drop_path_rate_reaches_the_encoder(name):
    model = build_model(_cfg(f"model={name}", "model.decoder_width=64", "data.path=/unused"))
    rates = [m.drop_prob for m in model.encoder.modules() if isinstance(m, SparseDropPath)]
    assert rates and max(rates) == pytest.approx(OFFICIAL_DROP_PATH[name], rel=1e-6)
    assert rates == sorted(rates)  # growing linearly over the blocks (timm's rule, as the official models)


def test_overrides_still_win():
    cfg = _cfg("model=convnext_base", "model.drop_path_rate=0.1", "optimizer.betas=[0.9,0.98]", "data.path=/x")
    assert cfg.model.drop_path_rate == 0.1 and list(cfg.optimizer.betas) == [0.9, 0.98]
    assert list(_cfg("model=resnet50", "model.optimizer_beta2=0.99", "data.path=/x").optimizer.betas) == [0.9, 0.99]


def test_global_batch_split_errors_name_the_fix():
    with pytest.raises(ConfigError, match=r"data.global_batch_size=4096 does not split into 3 process\(es\) x "
                                          r"trainer.grad_accum_steps=1 .* e.g. data.global_batch_size=4095 or 4098"):
        plan_batches(4096, 3, 1)
    with pytest.raises(ConfigError, match="trainer.grad_accum_steps=3"):
        validate_config(_cfg("experiment=demo", "trainer.grad_accum_steps=3"))  # 16 images in 3 micro-batches
    plan = plan_batches(4096, 8, 4)
    assert (plan.micro_batch, plan.per_process) == (128, 512)
    assert plan.describe() == "global batch 4096 = 8 process(es) x 4 micro-batch(es) x 128 images"


def test_steps_per_epoch_pad_the_last_global_batch_as_the_official_sampler():
    # pretrain/sampler.py line 29: iters_per_ep = ceil(dataset_len / glb_batch_size); lines
    # 44-46: the last global batch is completed with the first indices of the permutation.
    imagenet_train = range(1_281_167)
    assert ResumableSampler(imagenet_train, 512, 8, 0, seed=0).steps_per_epoch == 313
    assert ResumableSampler(imagenet_train, 128, 8, 0, seed=0, micro_batches_per_step=4).steps_per_epoch == 313
    # a small set, 2 ranks x 2 micro-batches x 3 images: 23 images -> 2 steps, 1 image repeated
    shards = [ResumableSampler(range(23), 3, 2, r, seed=1, micro_batches_per_step=2) for r in range(2)]
    indices = [list(s) for s in shards]
    assert all(len(i) == 12 and s.batches_per_epoch == 4 for i, s in zip(indices, shards))
    seen = indices[0] + indices[1]
    assert sorted(set(seen)) == list(range(23)) and len(seen) == 24
    # every step consumes one contiguous slice of the permutation: the padding is in the last step
    first_step = set(indices[0][:6] + indices[1][:6])
    assert len(first_step) == 12


def _std(t: torch.Tensor) -> float:
    return float(t.detach().double().std())


def test_decoder_initialisation_is_the_official_rule():
    # pretrain/decoder.py lines 58-74: Conv2d -> trunc_normal_(std=.02), bias 0; ConvTranspose2d
    # (not a Conv2d subclass: the elif branch) -> kaiming_normal_(mode='fan_out',
    # nonlinearity='relu'), bias 0 (the up-sampling conv has a bias, line 23); BatchNorm 1/0.
    torch.manual_seed(0)
    dec = LightDecoder(width=768)
    ups = [b.up for b in dec.blocks]
    assert all(isinstance(u, nn.ConvTranspose2d) and u.bias is not None for u in ups)
    for up in ups:
        cin = up.weight.shape[0]
        expected = math.sqrt(2.0 / (cin * 16))  # fan_out of a (cin, cin, 4, 4) transposed conv
        n = up.weight.numel()
        assert abs(_std(up.weight) / expected - 1) < 6 / math.sqrt(2 * n), (cin, _std(up.weight), expected)
        assert abs(float(up.weight.detach().mean())) < 6 * expected / math.sqrt(n)
        assert float(up.weight.abs().max()) > 3 * expected  # a normal, not a clipped distribution
        assert torch.count_nonzero(up.bias) == 0
    convs = [m for m in dec.modules() if type(m) is nn.Conv2d]
    assert len(convs) == 2 * len(dec.blocks) + 1
    for conv in convs:
        n = conv.weight.numel()
        assert abs(_std(conv.weight) / 0.02 - 1) < 6 / math.sqrt(2 * n) + 0.01, (conv, _std(conv.weight))
        assert conv.bias is None or torch.count_nonzero(conv.bias) == 0
    for bn in (m for m in dec.modules() if isinstance(m, nn.BatchNorm2d)):
        assert torch.all(bn.weight == 1) and torch.count_nonzero(bn.bias) == 0
    # the transposed convs are ~sqrt(2 / (16 cin)) / 0.02 times wider than trunc-normal .02 would be
    assert _std(ups[-1].weight) > 2 * 0.02


@pytest.mark.parametrize("name", ["resnet18", "convnext_atto"])
def test_densify_projections_keep_pytorchs_default_initialisation(name):
    # pretrain/spark.py line 66: nn.Conv2d(e_width, d_width, k, bias=True) with no
    # re-initialisation: weights and biases uniform in +-1/sqrt(fan_in) (PyTorch's default).
    # Lines 47-48: mask tokens trunc_normal_(std=.02, a=-.02, b=.02).
    torch.manual_seed(0)
    model = SparK(build_sparse_encoder(name), decoder_width=768)
    projs = [p for p in model.densify.projs if isinstance(p, nn.Conv2d)]
    assert len(projs) >= 3
    for proj in projs:
        fan_in = proj.weight[0].numel()
        bound = 1 / math.sqrt(fan_in)
        for t in (proj.weight, proj.bias):
            n = t.numel()
            assert float(t.abs().max()) <= bound * (1 + 1e-6)
            assert float(t.abs().max()) > bound * (1 - 20 / n)  # fills the interval
            # uniform(-b, b): std b/sqrt(3)
            assert abs(_std(t) / (bound / math.sqrt(3)) - 1) < 6 / math.sqrt(n), (proj, _std(t))
        assert torch.count_nonzero(proj.bias) == proj.bias.numel()
    for token in model.densify.mask_tokens:
        assert float(token.abs().max()) <= 0.02 and _std(token) > 0.005
