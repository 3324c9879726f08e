"""kernels_bench.cpu_bf16: each part runs in the precision asked for; rounds alternate."""
from __future__ import annotations

import pytest
import torch

from kernels_bench.cpu_bf16 import compare, main, part_functions


def test_each_part_runs_under_autocast_exactly_when_asked():
    model, parts = part_functions("resnet18", batch=1, size=64, mask=0.6)
    assert list(parts) == ["sparse encoder", "densify", "decoder + loss"]
    seen: dict[str, list[bool]] = {}

    def record(name: str):
        return lambda module, args, out: seen.setdefault(name, []).append(torch.is_autocast_enabled("cpu"))

    for name in ("encoder", "densify", "decoder"):
        getattr(model, name).register_forward_hook(record(name))
    for part, fn in parts.items():
        for bf16 in (False, True):
            seen.clear()
            fn(bf16)
            owner = {"sparse encoder": "encoder", "densify": "densify", "decoder + loss": "decoder"}[part]
            assert seen == {owner: [bf16]}, part
            grads = [p.grad for p in getattr(model, owner).parameters() if p.requires_grad]
            assert grads and all(g is not None for g in grads), part  # the backward ran through the part


def test_rounds_alternate_after_one_warm_up_of_each():
    calls: list[bool] = []
    r = compare(calls.append, rounds=3)
    assert calls == [False, True] + [False, True] * 3
    assert r["fp32_s"] > 0 and r["bf16_s"] > 0 and r["ratio_min"] <= r["ratio"] <= r["ratio_max"]


def test_cli_logs_every_part_of_every_model(caplog):
    caplog.set_level("INFO", logger="kernels_bench.cpu_bf16")
    assert main(["--models", "resnet18", "--batch", "1", "--size", "64", "--rounds", "1"]) == 0
    lines = [r.getMessage() for r in caplog.records]
    assert sum(line.startswith("resnet18 ") and "bf16/fp32" in line for line in lines) == 3
    assert lines[-1].startswith("RESULTS [")


@pytest.mark.parametrize("args,message", [
    (["--models", "resnet999"], "unknown encoder(s) 'resnet999'"),
    (["--size", "100"], "size 100 is not a multiple of 32"),
    (["--rounds", "0"], "--rounds and --threads must be at least 1"),
])
def test_bad_arguments_are_refused(capsys, args, message):
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2 and message in capsys.readouterr().err
