"""Where the GPU waits in a profiler timeline, and what the host was doing meanwhile.

    python -m kernels_bench.timeline kernels_bench/results/gpu-<name>/profile-encoder/<case>.trace.json.gz

Reads a Chrome-format trace (``kernels_bench.profile --trace``; gzipped or not) and reports
the span from the first to the last device event, how much of it the device was busy
(kernels, copies and fills, overlapping ones merged), and the longest idle gaps between
them, each with the host events that were running during it: the enclosing profiler
ranges (``spark_me::neighbour_tables``, ``Optimizer.step``...), the innermost operator, and
the CUDA runtime or driver call (a ``...Synchronize`` there means the host was waiting
for the device, which then waited for the host). A host-bound step shows many short gaps
under Python and dispatch; a synchronisation-bound one a few long gaps after each
synchronisation.
"""
from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path
from typing import Optional

DEVICE_CATEGORIES = {"kernel", "gpu_memcpy", "gpu_memset"}
RANGE_CATEGORIES = {"user_annotation"}
OPERATOR_CATEGORIES = {"cpu_op"}
RUNTIME_CATEGORIES = {"cuda_runtime", "cuda_driver"}


def load(path: Path) -> list[dict]:
    """The complete ("X") events of a Chrome trace, gzipped or plain."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    events = json.loads(raw)
    events = events.get("traceEvents", []) if isinstance(events, dict) else events
    return [e for e in events if e.get("ph") == "X" and "ts" in e and "dur" in e]


def busy_intervals(events: list[dict]) -> list[tuple[float, float]]:
    """The device's busy intervals (µs), overlapping events merged, in time order."""
    spans = sorted((float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in events
                   if e.get("cat") in DEVICE_CATEGORIES)
    merged: list[tuple[float, float]] = []
    for start, end in spans:
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _during(events: list[dict], categories: set[str], start: float, end: float) -> list[dict]:
    """Events of ``categories`` that overlap [start, end], shortest (innermost) first."""
    hits = [e for e in events if e.get("cat") in categories
            and float(e["ts"]) < end and float(e["ts"]) + float(e["dur"]) > start]
    return sorted(hits, key=lambda e: float(e["dur"]))


def analyse(events: list[dict], top: int = 15, min_gap_us: float = 10.0) -> dict:
    """Span, busy time and the ``top`` longest gaps of at least ``min_gap_us``, with the
    host's ranges, innermost operator and runtime calls during each."""
    busy = busy_intervals(events)
    if not busy:
        return {"device_events": 0, "span_us": 0.0, "busy_us": 0.0, "busy": None, "idle_us": 0.0, "gaps": []}
    span = busy[-1][1] - busy[0][0]
    busy_us = sum(end - start for start, end in busy)
    gaps = [(b[0] - a[1], a[1], b[0]) for a, b in zip(busy, busy[1:]) if b[0] - a[1] >= min_gap_us]
    longest = sorted(gaps, reverse=True)[:top]
    described = []
    for length, start, end in longest:
        ranges = _during(events, RANGE_CATEGORIES, start, end)
        ops = _during(events, OPERATOR_CATEGORIES, start, end)
        runtime = _during(events, RUNTIME_CATEGORIES, start, end)
        described.append({
            "gap_us": length, "at_us": start - busy[0][0],
            "ranges": sorted({e["name"] for e in ranges}),
            "operator": ops[0]["name"] if ops else None,
            "runtime": sorted({e["name"] for e in runtime}),
        })
    return {
        "device_events": sum(1 for e in events if e.get("cat") in DEVICE_CATEGORIES),
        "span_us": span, "busy_us": busy_us, "busy": busy_us / span if span else None,
        "idle_us": span - busy_us, "gaps_total": len(gaps), "gaps_us": sum(g[0] for g in gaps), "gaps": described,
    }


def format_report(result: dict) -> str:
    if not result["device_events"]:
        return "no device events in this trace (a CPU profile?): nothing to say about the GPU's gaps"
    lines = [
        f"{result['device_events']} device events over {result['span_us'] / 1e3:.2f} ms: busy {result['busy_us'] / 1e3:.2f} ms "
        f"({result['busy']:.0%}), idle {result['idle_us'] / 1e3:.2f} ms; {result['gaps_total']} gaps of 10 µs or more, "
        f"{result['gaps_us'] / 1e3:.2f} ms together",
        "longest gaps (µs, at ms from the first device event): host ranges | innermost operator | runtime calls",
    ]
    for g in result["gaps"]:
        lines.append(f"  {g['gap_us']:8.0f} at {g['at_us'] / 1e3:7.2f}: {', '.join(g['ranges']) or '-'} | "
                     f"{g['operator'] or '-'} | {', '.join(g['runtime']) or '-'}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kernels_bench.timeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trace", type=Path, help="a .trace.json(.gz) written by kernels_bench.profile --trace")
    p.add_argument("--top", type=int, default=15, help="how many of the longest gaps to describe")
    args = p.parse_args(argv)
    print(format_report(analyse(read_trace(p, args.trace), args.top)))
    return 0


def read_trace(parser: argparse.ArgumentParser, path: Path) -> list[dict]:
    """:func:`load` of ``path``, or ``parser``'s error (exit 2) saying what is wrong with it."""
    if not path.is_file():
        parser.error(f"{path}: no such file (python -m kernels_bench.profile --trace NAME writes one)")
    try:
        return load(path)
    except (OSError, ValueError) as e:
        parser.error(f"{path} is not a readable Chrome trace: {e}")


if __name__ == "__main__":
    sys.exit(main())
