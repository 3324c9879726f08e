"""kernels_bench.timeline: the device's busy time and idle gaps in a profiler trace, and
what the host was doing during each gap."""
from __future__ import annotations

import gzip
import json

import pytest

from kernels_bench.timeline import analyse, format_report, load, main


def _x(name: str, cat: str, ts: float, dur: float) -> dict:
    return {"ph": "X", "name": name, "cat": cat, "ts": ts, "dur": dur, "pid": 0, "tid": 0}


EVENTS = [
    _x("gemm", "kernel", 0, 100),
    _x("copy", "gpu_memcpy", 50, 100),  # overlaps the gemm: merged, busy 0-150
    _x("spark_me::neighbour_tables", "user_annotation", 120, 580),  # ends as the gelu starts
    _x("aten::nonzero", "cpu_op", 140, 560),
    _x("aten::index", "cpu_op", 130, 600),  # encloses nonzero: not the innermost
    _x("cudaStreamSynchronize", "cuda_runtime", 160, 500),
    _x("gelu", "kernel", 700, 50),  # a 550 µs gap before it
    _x("add", "kernel", 770, 30),  # a 20 µs gap
    _x("short", "kernel", 805, 5),  # a 5 µs gap: below the 10 µs floor
    {"ph": "i", "name": "marker", "ts": 10},  # not a complete event
]


def test_busy_time_gaps_and_what_the_host_did_meanwhile():
    r = analyse([e for e in EVENTS if e.get("ph") == "X"], top=5)
    assert r["device_events"] == 5 and r["span_us"] == 810
    assert r["busy_us"] == 150 + 50 + 30 + 5 and r["idle_us"] == 810 - 235
    assert r["gaps_total"] == 2 and r["gaps_us"] == 570
    first, second = r["gaps"]
    assert (first["gap_us"], first["at_us"]) == (550, 150)
    assert first["ranges"] == ["spark_me::neighbour_tables"] and first["operator"] == "aten::nonzero"
    assert first["runtime"] == ["cudaStreamSynchronize"]
    assert second["gap_us"] == 20 and second["operator"] is None and second["ranges"] == []
    text = format_report(r)
    assert "busy 0.23 ms (29%)" in text and "spark_me::neighbour_tables | aten::nonzero | cudaStreamSynchronize" in text


def test_reads_gzipped_traces_and_says_when_there_is_no_device(tmp_path, capsys):
    path = tmp_path / "case.trace.json.gz"
    path.write_bytes(gzip.compress(json.dumps({"traceEvents": EVENTS}).encode()))
    assert len(load(path)) == 9
    assert main([str(path), "--top", "1"]) == 0
    out = capsys.readouterr().out
    assert "5 device events over 0.81 ms" in out and len(out.strip().splitlines()) == 3  # summary, header, 1 gap
    cpu_only = tmp_path / "cpu.trace.json"
    cpu_only.write_text(json.dumps({"traceEvents": [_x("aten::mm", "cpu_op", 0, 10)]}))
    assert main([str(cpu_only)]) == 0
    assert "no device events in this trace" in capsys.readouterr().out


def test_a_missing_or_broken_file_is_refused_clearly(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "nope.json")])
    assert e.value.code == 2 and "no such file" in capsys.readouterr().err
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(SystemExit) as e:
        main([str(broken)])
    assert e.value.code == 2 and "is not a readable Chrome trace" in capsys.readouterr().err
