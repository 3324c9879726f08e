"""The depthwise bench (kernels_bench.depthwise_backward): the ways it times compute the same
forward and the same gradients (in Triton's interpreter here), its summary adds a ConvNeXt-T step up
right, and it refuses to run without a GPU. The timings themselves need CUDA."""
from __future__ import annotations

import pytest
import torch

from kernels_bench import depthwise_backward
from kernels_bench.depthwise_backward import DepthwiseShape, backward_calls, summary
from test_ops_triton import INTERPRETER  # noqa: F401  (imports the backend interpreted where no GPU is ready)
from test_ops_triton import triton_backend  # (after it: interpreted here)
from conftest import rel_err


@INTERPRETER
def test_every_timed_way_computes_the_same_gradients():
    """``separate``, ``fused`` and each config's ``fused`` give one input grad and one weight
    grad (float32, to summation order), on a stride-4 map of two 224 px images."""
    rows, calls = backward_calls(DepthwiseShape("s", 8, 16, 1), 2, torch.float32, "cpu",
                                 torch.Generator().manual_seed(0))
    assert rows > 0 and {"forward", "separate", "fused"} <= set(calls)
    assert sum(way.startswith("forward ") for way in calls) == len(triton_backend.depthwise.FORWARD_CONFIGS)
    assert sum(way.startswith("fused ") for way in calls) == len(triton_backend.depthwise.BACKWARD_CONFIGS)
    grad_in, grad_w = calls["separate"]()
    out = calls["forward"]()
    assert grad_in.shape == (rows, 8) and grad_w.shape == (49, 8) and out.shape == (rows, 8)
    for way, call in calls.items():
        if way.startswith("fused"):
            got_in, got_w = call()
            assert rel_err(got_in, grad_in) <= 1e-6 and rel_err(got_w, grad_w) <= 1e-6, way
        elif way.startswith("forward "):
            assert rel_err(call(), out) <= 1e-6, way


def test_the_summary_weighs_each_stage_by_its_blocks():
    def row(name: str, blocks: int, way: str, ms: float) -> dict:
        picked = "32x64-w4-u1" if way.startswith("fused") else "64x32-w2-u7"
        return {"name": name, "blocks": blocks, "rows": 10, "way": way, "ms": ms, "autotuned": picked}

    rows = [row("a", 3, "forward", 1.0), row("a", 3, "forward 32x64-w4-u1", 1.2),
            row("a", 3, "forward 64x32-w2-u7", 0.9),
            row("a", 3, "separate", 4.0), row("a", 3, "fused", 2.0),
            row("a", 3, "fused 32x64-w4-u1", 2.0), row("a", 3, "fused 64x64-w8-u4", 1.5),
            row("b", 9, "forward", 0.5), row("b", 9, "forward 32x64-w4-u1", 0.5),
            row("b", 9, "forward 64x32-w2-u7", 0.6),
            row("b", 9, "separate", 1.0), row("b", 9, "fused", 1.0),
            row("b", 9, "fused 32x64-w4-u1", 1.0), row("b", 9, "fused 64x64-w8-u4", 1.2)]
    lines = summary(rows).splitlines()
    a = lines[1].split()
    assert a[:2] == ["a", "10"] and [float(v) for v in a[2:6]] == [1.0, 4.0, 2.0, 0.5]
    assert " ".join(a[6:]) == "64x32-w2-u7 0.900 (autotuned 64x32-w2-u7); 64x64-w8-u4 1.500 (autotuned 32x64-w4-u1)"
    b = lines[2].split()
    assert b[6:8] == ["32x64-w4-u1", "0.500"] and b[10:12] == ["32x64-w4-u1", "1.000"]
    total = lines[-1].split()
    assert [float(v) for v in total[-4:]] == [3 * 1.0 + 9 * 0.5, 3 * 4.0 + 9 * 1.0, 3 * 2.0 + 9 * 1.0,
                                              round((6.0 + 9.0) / 21.0, 2)]


def test_it_refuses_to_run_without_a_gpu(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit) as raised:
        depthwise_backward.main(["--device", "cpu", "--out", str(tmp_path)])
    assert raised.value.code == 2 and "needs --device cuda" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
