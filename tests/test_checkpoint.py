"""Atomic checkpoint writes, keep-last-K, safe loading with clear errors, RNG round trips."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from spark_me.checkpoint import (
    FORMAT,
    CheckpointDamagedError,
    CheckpointError,
    CheckpointWriteError,
    capture_rng_state,
    check_model,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_file,
    restore_rng_state,
    save_atomic,
    save_checkpoint,
)


def _state(step, **extra):
    return {"format": FORMAT, "step": step, "model_name": "resnet18", "decoder_width": 64,
            "model": {"w": torch.full((3,), float(step))}, **extra}


def test_save_keeps_the_newest_k_and_orders_by_step(tmp_path):
    for step in (5, 10, 100, 1000):
        save_checkpoint(_state(step), tmp_path, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000100.pt", "step_00001000.pt"]
    assert latest_checkpoint(tmp_path).name == "step_00001000.pt"
    assert load_checkpoint(latest_checkpoint(tmp_path))["step"] == 1000
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left
    assert latest_checkpoint(tmp_path / "missing") is None


def test_a_failed_write_leaves_existing_checkpoints_intact(tmp_path, monkeypatch):
    good = save_checkpoint(_state(1), tmp_path, keep=1)
    before = good.read_bytes()

    def crash(obj, f, *a, **k):
        f.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(CheckpointWriteError, match=r"could not write .*step_00000002.pt: disk full \(\d+ MiB free"):
        save_checkpoint(_state(2), tmp_path, keep=1)
    assert list_checkpoints(tmp_path) == [good] and good.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [good.name]  # no temp file, no step_2

    def full_disk(obj, f, *a, **k):  # what torch raises when the disk fills mid-write
        f.write(b"partial bytes")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4544 vs 4432")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointWriteError, match=r"step_00000002.pt: the disk is probably full"):
        save_checkpoint(_state(2), tmp_path, keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == [good.name] and good.read_bytes() == before


def test_truncated_file_gets_a_clear_error(tmp_path):
    path = save_checkpoint(_state(3), tmp_path, keep=3)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cannot read checkpoint .*step_00000003.pt.*truncated"):
        load_checkpoint(path)


def test_a_plain_state_dict_is_not_taken_for_a_training_checkpoint(tmp_path):
    # Files whose unpickling would run code: tests/test_checkpoint_security.py.
    plain = tmp_path / "timm.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, plain)
    with pytest.raises(CheckpointError, match="not a spark_me training checkpoint.*model.init"):
        load_checkpoint(plain)


def test_checkpoint_of_another_model_is_rejected_with_the_fix(tmp_path):
    ckpt = _state(1)
    check_model(ckpt, "x.pt", "resnet18", 64)
    with pytest.raises(CheckpointError, match=r"is for model resnet18 .* builds resnet50 .*model=resnet18"):
        check_model(ckpt, "x.pt", "resnet50", 64)
    with pytest.raises(CheckpointError, match="decoder width 64"):
        check_model(ckpt, "x.pt", "resnet18", 768)


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    gen = torch.Generator().manual_seed(123)
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.randn()  # leaves a cached gaussian in numpy's legacy state
    state = capture_rng_state(gen)
    expected = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)],
                torch.rand(4, generator=gen), np.random.randn(3), random.gauss(0, 1))
    save_atomic({"rng": state}, tmp_path / "rng.pt")
    loaded = torch.load(tmp_path / "rng.pt", weights_only=True)["rng"]
    torch.manual_seed(99), np.random.seed(99), random.seed(99), gen.manual_seed(99)
    restore_rng_state(loaded, gen)
    got = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)],
           torch.rand(4, generator=gen), np.random.randn(3), random.gauss(0, 1))
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])
    assert got[2] == expected[2] and torch.equal(got[3], expected[3])
    assert np.array_equal(got[4], expected[4]) and got[5] == expected[5]
