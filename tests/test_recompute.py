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


@pytest.mark.parametrize("name,kwargs", [("resnet18", {"drop_path_rate": 0.3}), ("resnet50", {}),
                                         ("convnext_atto", {"drop_path_rate": 0.3})])
def test_checkpointed_step_equals_the_plain_one(name, kwargs):
    """float64, train mode, stochastic depth on: features, every gradient and every buffer
    (batch-norm running statistics and counters: updated once, not twice) after two steps."""
    torch.manual_seed(0)
    plain = build_sparse_encoder(name, **kwargs).double().train()
    randomize_norms(plain, torch.Generator().manual_seed(3))
    checkpointed = copy.deepcopy(plain)
    checkpointed.set_grad_checkpointing(True)
    assert checkpointed.grad_checkpointing and not plain.grad_checkpointing
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
