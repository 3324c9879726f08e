"""The per-iteration lr and weight-decay schedules and how they reach the optimizer."""
from __future__ import annotations

import math

import pytest
import torch

from spark_me.schedule import CosineSchedule


def _schedule(**kw):
    args = dict(peak_lr=1e-3, total_steps=1000, warmup_steps=100, weight_decay=0.04, weight_decay_end=0.2)
    args.update(kw)
    return CosineSchedule(**args)


def test_lr_warms_up_linearly_then_follows_a_cosine_to_the_floor():
    s = _schedule()
    assert s.lr(0) == pytest.approx(0.005 * 1e-3)
    assert s.lr(50) == pytest.approx(1e-3 * (0.005 + 0.995 * 0.5))
    assert s.lr(100) == pytest.approx(1e-3)
    warm = [s.lr(i) for i in range(101)]
    assert all(b > a for a, b in zip(warm, warm[1:]))
    decay = [s.lr(i) for i in range(100, 1000)]
    assert all(b < a for a, b in zip(decay, decay[1:]))
    mid = 100 + (999 - 100) / 2
    assert s.lr(int(mid)) == pytest.approx(1e-3 * (0.001 + 0.999 * 0.5), rel=1e-2)
    assert s.lr(999) == pytest.approx(0.001 * 1e-3)
    assert s.lr(5000) == pytest.approx(0.001 * 1e-3)  # clamped past the end


def test_weight_decay_rises_on_a_cosine_from_start_to_end():
    s = _schedule()
    assert s.weight_decay_at(0) == pytest.approx(0.04)
    assert s.weight_decay_at(999) == pytest.approx(0.2)
    assert s.weight_decay_at(round(999 / 2)) == pytest.approx(0.12, abs=1e-3)
    wds = [s.weight_decay_at(i) for i in range(1000)]
    assert all(b >= a for a, b in zip(wds, wds[1:]))


def test_no_warmup_and_single_step_schedules_are_well_defined():
    s = _schedule(warmup_steps=0)
    assert s.lr(0) == pytest.approx(1e-3)
    one = _schedule(total_steps=1, warmup_steps=0)
    assert math.isfinite(one.lr(0)) and math.isfinite(one.weight_decay_at(0))
    with pytest.raises(ValueError, match="at least one step"):
        _schedule(total_steps=0)


def test_apply_sets_lr_everywhere_and_weight_decay_only_on_decayed_groups():
    w, b = torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([
        {"params": [w], "weight_decay": 0.04, "apply_decay": True},
        {"params": [b], "weight_decay": 0.0, "apply_decay": False},
    ])
    s = _schedule()
    lr, wd = s.apply(opt, 999)
    assert [g["lr"] for g in opt.param_groups] == [lr, lr] == [s.lr(999)] * 2
    assert opt.param_groups[0]["weight_decay"] == wd == pytest.approx(0.2)
    assert opt.param_groups[1]["weight_decay"] == 0.0
