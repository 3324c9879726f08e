"""Gradient checkpointing of sparse encoders: the same step, fewer saved tensors."""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import randomize_norms, rel_err
from kernels_bench.saved_memory import SavedTensorAccount
from spark_me import build_sparse_encoder
from spark_me.encoders.base import SparseEncoder
from spark_me.masking import random_patch_mask
from spark_me.recompute import observe_checkpoints


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(3, 3, 96, 64, generator=g, dtype=torch.float64)
    active = random_patch_mask(3, (3, 2), 0.5, g)
    return images, active


def _step(encoder: SparseEncoder, images: torch.Tensor, active: torch.Tensor, seed: int) -> list[torch.Tensor]:
    """Features of a training forward (random state ``seed``) after its backward."""
    torch.manual_seed(seed)  # stochastic depth draws from the global generator
    features = encoder(images, active)
    sum((f.F * torch.linspace(-1, 1, f.F.shape[1], dtype=f.F.dtype)).square().sum() for f in features).backward()
    return [f.F.detach() for f in features]


@pytest.mark.parametrize("name,kwargs,stages", [("resnet18", {"drop_path_rate": 0.3}, None), ("resnet50", {}, None),
                                                ("convnext_atto", {"drop_path_rate": 0.3}, None),
                                                ("resnet50", {}, 2), ("convnext_atto", {"drop_path_rate": 0.3}, 1)])
def test_checkpointed_step_equals_the_plain_one(name, kwargs, stages):
    """float64, train mode, stochastic depth on: features, every gradient and every buffer
    (batch-norm running statistics and counters: updated once, not twice) after two steps;
    every stage recomputed, or the first ``stages`` only."""
    torch.manual_seed(0)
    plain = build_sparse_encoder(name, **kwargs).double().train()
    randomize_norms(plain, torch.Generator().manual_seed(3))
    checkpointed = copy.deepcopy(plain)
    checkpointed.set_grad_checkpointing(True, stages=stages)
    assert checkpointed.grad_checkpointing and not plain.grad_checkpointing
    assert checkpointed.checkpoint_stages == stages
    for seed in (1, 2):
        images, active = _inputs(seed)
        got = _step(checkpointed, images, active, seed)
        ref = _step(plain, images, active, seed)
        for g, r in zip(got, ref):
            assert rel_err(g, r) <= 1e-12
    for (n, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        assert rel_err(q.grad, p.grad) <= 1e-10, n
    for (n, b), c in zip(plain.named_buffers(), checkpointed.buffers()):
        assert torch.equal(b, c), n


def test_checkpointing_keeps_a_fraction_of_the_encoders_saved_tensors():
    images, active = _inputs()
    torch.manual_seed(0)
    encoder = build_sparse_encoder("resnet18").double().train()
    saved = {}
    for on in (False, True):
        encoder.set_grad_checkpointing(on)
        with SavedTensorAccount(encoder) as account:  # with the inputs checkpoints hold
            features = encoder(images, active)
        sum(f.F.sum() for f in features).backward()
        saved[on] = account.summary()["activations_mib"]
    # 0.51 here (3.8 of 7.4 MiB): the stem's full-resolution maps are not in a block and
    # stay; ResNet-50 at 224 px keeps 0.35 of its encoder's (kernels_bench/results)
    assert 0 < saved[True] < 0.6 * saved[False]


def _stage_blocks(encoder: SparseEncoder) -> list[list[torch.nn.Module]]:
    if hasattr(encoder, "stages"):  # ConvNeXt
        return [list(stage.blocks) for stage in encoder.stages]
    return [list(stage) for stage in (encoder.layer1, encoder.layer2, encoder.layer3, encoder.layer4)]


@pytest.mark.parametrize("name", ["resnet18", "convnext_atto"])
def test_stages_recomputes_exactly_the_blocks_of_the_first_stages(name):
    images, active = _inputs()
    encoder = build_sparse_encoder(name).double().train()
    per_stage = _stage_blocks(encoder)
    for stages in (1, 2, 3, 4, None):
        encoder.set_grad_checkpointing(True, stages=stages)
        seen: list[torch.nn.Module] = []
        with observe_checkpoints(lambda block, x: seen.append(block)):
            encoder(images, active)
        assert seen == [b for stage in per_stage[:stages] for b in stage], stages
    encoder.set_grad_checkpointing(False)  # and off again: nothing recomputed, stages forgotten
    assert encoder.checkpoint_stages is None and not any(encoder.checkpoints_stage(i) for i in range(4))


def test_recomputing_more_stages_keeps_fewer_saved_tensors():
    images, active = _inputs()
    torch.manual_seed(0)
    encoder = build_sparse_encoder("resnet18").double().train()
    saved = []
    for stages in ("off", 1, 2, None):
        encoder.set_grad_checkpointing(stages != "off", stages=None if stages == "off" else stages)
        with SavedTensorAccount(encoder) as account:
            features = encoder(images, active)
        sum(f.F.sum() for f in features).backward()
        saved.append(account.summary()["activations_mib"])
    assert saved == sorted(saved, reverse=True) and len(set(saved)) == 4, saved


@pytest.mark.parametrize("stages,message", [
    (0, r"stages must be a whole number from 1 to 4 \(this encoder's stages\), or None for all, got 0"),
    (5, r"from 1 to 4 .* got 5"), (True, r"got True"), ("2", r"got '2'")])
def test_bad_stage_counts_are_refused_naming_the_range(stages, message):
    encoder = build_sparse_encoder("resnet18")
    with pytest.raises(ValueError, match=message):
        encoder.set_grad_checkpointing(True, stages=stages)
    with pytest.raises(ValueError, match=r"stages=2 recomputes part of the encoder: it needs enable=True"):
        encoder.set_grad_checkpointing(False, stages=2)
    assert not encoder.grad_checkpointing and encoder.checkpoint_stages is None  # refused: nothing changed


def test_observers_see_every_checkpointed_block_and_its_input_in_their_context_only():
    images, active = _inputs()
    encoder = build_sparse_encoder("resnet18").double().train()
    blocks = [b for stage in (encoder.layer1, encoder.layer2, encoder.layer3, encoder.layer4) for b in stage]
    seen, outer = [], []
    encoder.set_grad_checkpointing(True)
    with observe_checkpoints(lambda block, x: outer.append(block)):
        with observe_checkpoints(lambda block, x: seen.append((block, x.F.shape[1]))):
            encoder(images, active)
        encoder(images, active)  # the inner observer is gone
    encoder(images, active)  # and the outer one
    assert [b for b, _ in seen] == blocks and len(outer) == 2 * len(blocks)
    assert [c for _, c in seen] == [64, 64, 64, 128, 128, 256, 256, 512]  # each block's input channels
    encoder.set_grad_checkpointing(False)
    with observe_checkpoints(lambda block, x: seen.append(block)):
        encoder(images, active)
    assert len(seen) == len(blocks)  # plain blocks are not checkpointed


def test_evaluation_runs_the_blocks_plainly():
    images, active = _inputs()
    encoder = build_sparse_encoder("resnet18").double().eval()
    encoder.set_grad_checkpointing(True)
    with torch.no_grad():
        got = encoder(images, active)
    encoder.set_grad_checkpointing(False)
    with torch.no_grad():
        ref = encoder(images, active)
    assert all(torch.equal(g.F, r.F) for g, r in zip(got, ref))


def test_an_encoder_without_support_refuses_clearly():
    class Plain(SparseEncoder):
        feature_channels = [3]

        def forward_sparse(self, x):
            return [x]

    encoder = Plain()
    encoder.set_grad_checkpointing(False)  # turning it off is always fine
    with pytest.raises(ValueError, match="does not support gradient checkpointing: run its blocks through"):
        encoder.set_grad_checkpointing(True)

    class AllOrNothing(Plain):  # recomputes its blocks, but not stage by stage
        supports_grad_checkpointing = True

    encoder = AllOrNothing()
    encoder.set_grad_checkpointing(True)
    with pytest.raises(ValueError, match=r"AllOrNothing recomputes all its blocks or none .*checkpoints_stage\(i\)"):
        encoder.set_grad_checkpointing(True, stages=1)
