"""The saved-tensor account: exact bytes on a toy network, and the step parts of SparK."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from kernels_bench.saved_memory import SavedTensorAccount, count_saved, main, markdown, part_of, ratios


class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(8, 16), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.encoder(x)
        return (y * y).sum()  # saves y twice, outside any module


def test_each_storage_counts_once_and_parameters_not_at_all():
    model = _Toy()
    x = torch.randn(4, 8)
    with SavedTensorAccount(model) as account:
        loss = model(x)
    loss.backward()
    s = account.summary()
    # Linear saves its input (4×8 fp32); ReLU its output (4×16), which the product saves
    # again (counted once, under ReLU where it was first saved); the weight is a parameter
    assert dict(((r["part"], r["layer"]), r["mib"] * 2**20) for r in s["layers_mib"]) == {
        ("encoder", "Linear"): 4 * 8 * 4, ("encoder", "ReLU"): 4 * 16 * 4}
    assert s["activations_mib"] * 2**20 == 4 * 24 * 4 and s["weight_casts_mib"] == 0


def test_autocast_weight_copies_are_counted_apart():
    model = _Toy()
    with SavedTensorAccount(model) as account, torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(torch.randn(4, 8, requires_grad=True))  # so the weight is saved for the input grad
    s = account.summary()
    assert s["weight_casts_mib"] * 2**20 == 16 * 8 * 2  # the bf16 copy of the Linear weight
    assert ("encoder", "Linear") in {(r["part"], r["layer"]) for r in s["layers_mib"]}  # its bf16 input
    loss.float().backward()


def test_inputs_held_by_a_checkpoint_are_counted():
    """Activation checkpointing keeps a block's input outside autograd's saved tensors;
    the account counts it as the block's, and nothing saved inside the block."""
    from spark_me.recompute import checkpoint_block

    model = _Toy()
    x = torch.randn(4, 8, requires_grad=True)
    with SavedTensorAccount(model) as account:
        y = checkpoint_block(model.encoder, x)
    y.sum().backward()
    s = account.summary()
    assert s["activations_mib"] * 2**20 == 4 * 8 * 4  # x only
    assert [(r["part"], r["layer"]) for r in s["layers_mib"]] == [("encoder", "Sequential")]


def test_neighbour_tables_of_the_batch_are_counted():
    """The tables a sparse forward builds on its batch's manager, counted exactly."""
    from spark_me.gather import to_sparse
    from spark_me.layers import SparseConv2d
    from spark_me.masking import random_patch_mask

    active = random_patch_mask(2, (2, 3), 0.5, generator=torch.Generator().manual_seed(0))
    xs = to_sparse(torch.randn(2, 3, 64, 96), active, 32)
    conv = nn.Sequential(SparseConv2d(3, 4, 3, stride=2), SparseConv2d(4, 4, 3))
    with SavedTensorAccount(conv) as account:
        conv(xs).F.sum().backward()
    tables = xs.coordinate_manager.neighbour_tables.values()
    assert len(tables) == 2
    expected = sum(t.forward.untyped_storage().nbytes() for t in tables)  # the gathers need no dense grid
    assert account.summary()["tables_mib"] * 2**20 == xs.coordinate_manager.table_bytes() == expected > 0


def test_part_names():
    assert part_of("model.encoder.layer1.0.conv1") == part_of("encoder.layer1") == "encoder"
    assert part_of("model.densify.projs.0") == part_of("projs.0") == part_of("norms.1") == "densify"
    assert part_of("model") == part_of("") == "loss"


@pytest.fixture(scope="module")
def resnet18_account():
    return count_saved("resnet18", batch=2, size=64, mask_ratio=0.6, decoder_width=64)


def test_sparse_encoder_saves_less_and_the_rest_is_shared(resnet18_account):
    r = resnet18_account
    s, d = r["variants"]["sparse"], r["variants"]["masked_dense"]
    assert s["parts_mib"]["decoder"] == d["parts_mib"]["decoder"] > 0  # one decoder, same inputs
    q = ratios(r)
    assert q["parts"]["encoder"] < 0.8 and q["total"] < 1.0
    assert s["tables_mib"] > 0 and d["tables_mib"] == 0  # only the sparse step has tables
    assert q["with_tables"] > q["total"]
    assert "| encoder |" in markdown([r]) and "| neighbour tables |" in markdown([r])


def test_the_dense_stem_holds_no_stem_table(resnet18_account):
    """The 7×7 stem's table is the largest of a ResNet batch; with the dense stem it is never
    built, and the encoder's other saved tensors are unchanged but for the stem's input."""
    dense_stem = count_saved("resnet18", batch=2, size=64, mask_ratio=0.6, decoder_width=64, dense_stem=True)
    plain, dense = resnet18_account["variants"]["sparse"], dense_stem["variants"]["sparse"]
    assert 0 < dense["tables_mib"] < 0.5 * plain["tables_mib"]
    assert dense_stem["variants"]["masked_dense"] == resnet18_account["variants"]["masked_dense"]
    assert "with a dense stem" in markdown([dense_stem]) and "dense stem" not in markdown([resnet18_account])


def test_cli_writes_json_and_markdown(tmp_path):
    main(["--models", "resnet18", "--batch", "1", "--size", "64", "--amp", "none", "--out", str(tmp_path)])
    assert (tmp_path / "saved_memory.json").exists() and "all activations" in (tmp_path / "saved_memory.md").read_text()
    for bad in (["--mask", "1.0"], ["--batch", "0"], ["--models", "resnet5"]):
        with pytest.raises(SystemExit):
            main([*bad, "--out", str(tmp_path)])
