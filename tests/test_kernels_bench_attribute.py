"""kernels_bench.attribute: each kernel's device time under the outermost operator that
launched it, autograd's wrappers skipped."""
from __future__ import annotations

import gzip
import json

import pytest

from kernels_bench.attribute import attribute, format_report, main


def _op(name: str, ts: float, dur: float, ext: int, tid: int = 1) -> dict:
    return {"ph": "X", "cat": "cpu_op", "name": name, "ts": ts, "dur": dur, "pid": 0, "tid": tid,
            "args": {"External id": ext}}


def _kernel(name: str, ts: float, dur: float, ext: int) -> dict:
    return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur, "pid": 0, "tid": 7,
            "args": {"External id": ext}}


EVENTS = [
    # a backward node: the engine's wrapper, the node, the matmul that launched the kernel
    _op("autograd::engine::evaluate_function: AddmmBackward0", 0, 100, 1),
    _op("AddmmBackward0", 1, 98, 2),
    _op("aten::mm", 10, 20, 3),
    _kernel("gemm", 200, 40, 3),
    # autograd reducing a broadcast gradient: the sum at the top, under the wrapper only
    _op("autograd::engine::evaluate_function: AddmmBackward0", 110, 50, 4),
    _op("aten::sum", 120, 10, 5),
    _kernel("reduce", 250, 80, 5),
    _kernel("reduce", 400, 20, 5),
    # a cast inside a layer norm: counted for the layer norm
    _op("aten::layer_norm", 300, 60, 6),
    _op("aten::to", 305, 20, 7),
    _op("aten::copy_", 310, 5, 8),
    _kernel("copy", 500, 10, 8),
    # a longer operator on another thread at the same time encloses nothing here
    _op("aten::linear", 0, 1000, 9, tid=2),
    # a profiler range is not an operator; a kernel of an unknown operator counts under "?"
    {"ph": "X", "cat": "user_annotation", "name": "spark_me::neighbour_tables", "ts": 0, "dur": 1000, "tid": 1},
    _kernel("orphan", 600, 5, 99),
]


def test_kernels_count_under_their_outermost_operator():
    totals = attribute(EVENTS)
    assert totals == {
        ("AddmmBackward0", "gemm"): (1, 40.0),
        ("aten::sum", "reduce"): (2, 100.0),
        ("aten::layer_norm", "copy"): (1, 10.0),
        ("?", "orphan"): (1, 5.0),
    }
    text = format_report(totals, top=2)
    assert "device time of all kernels: 0.155 ms" in text
    lines = text.splitlines()
    assert "aten::sum :: reduce" in lines[3] and "64.5%" in lines[3]
    assert "AddmmBackward0 :: gemm" in lines[4] and len(lines) == 5


def test_main_reads_gzipped_traces_and_names_a_missing_one(tmp_path, capsys):
    path = tmp_path / "case.trace.json.gz"
    path.write_bytes(gzip.compress(json.dumps({"traceEvents": EVENTS}).encode()))
    assert main([str(path), "--top", "1"]) == 0
    assert "aten::sum :: reduce" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main([str(tmp_path / "missing.json")])
    assert "no such file" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("not json")
    with pytest.raises(SystemExit):
        main([str(bad)])
    assert "is not a readable Chrome trace" in capsys.readouterr().err
