"""Which operator each kernel of a profiler trace ran for: device time per (operator, kernel).

    python -m kernels_bench.attribute kernels_bench/results/gpu-<name>/profile-encoder/<case>.trace.json.gz

Reads a Chrome-format trace (``kernels_bench.profile --trace``; gzipped or not). Each kernel
carries the External id of the operator that launched it (its innermost one); the report
names the outermost operator around that one on the same thread, past the autograd
engine's wrappers: ``aten::layer_norm`` or ``NativeLayerNormBackward0`` rather than the
``aten::empty`` or ``aten::copy_`` inside them. So a kernel that PyTorch launches from
several places (a reduction, a copy) is split by what it was for: ``aten::sum`` at the top
is autograd reducing a broadcast gradient (a bias's), ``ToCopyBackward0`` a cast's
gradient. The profiler's own ranges (``spark_me::...``) are not operators and are skipped.
"""
from __future__ import annotations

import argparse
import bisect
import sys
from collections import defaultdict
from pathlib import Path
from typing import Optional

from kernels_bench.timeline import read_trace

WRAPPER_PREFIX = "autograd::engine::"  # evaluate_function: <node>, around the node itself


def attribute(events: list[dict]) -> dict[tuple[str, str], tuple[int, float]]:
    """{(outermost operator, kernel name): (calls, device µs)} over the trace's kernels.
    A kernel whose launching operator is not in the trace counts under ``"?"``."""
    operators = [e for e in events if e.get("cat") == "cpu_op"]
    by_id: dict[object, dict] = {}
    for op in operators:
        by_id.setdefault(op.get("args", {}).get("External id"), op)
    by_thread: dict[object, list[dict]] = defaultdict(list)
    for op in operators:
        by_thread[op.get("tid")].append(op)
    starts: dict[object, list[float]] = {}
    for tid, ops in by_thread.items():
        ops.sort(key=lambda e: (float(e["ts"]), -float(e["dur"])))
        starts[tid] = [float(e["ts"]) for e in ops]
    totals: dict[tuple[str, str], list] = defaultdict(lambda: [0, 0.0])
    for kernel in events:
        if kernel.get("cat") != "kernel":
            continue
        op = by_id.get(kernel.get("args", {}).get("External id"))
        name = "?" if op is None else _outermost(op, by_thread[op.get("tid")], starts[op.get("tid")])
        entry = totals[(name, kernel["name"])]
        entry[0] += 1
        entry[1] += float(kernel["dur"])
    return {key: (calls, us) for key, (calls, us) in totals.items()}


def _outermost(op: dict, ops: list[dict], starts: list[float]) -> str:
    """The name of the outermost operator on ``op``'s thread that encloses ``op`` (itself
    if none does), autograd's wrappers skipped. ``ops`` sorted by start, longest first."""
    begin, end = float(op["ts"]), float(op["ts"]) + float(op["dur"])
    for other in ops[:bisect.bisect_right(starts, begin)]:
        if float(other["ts"]) + float(other["dur"]) >= end and not other["name"].startswith(WRAPPER_PREFIX):
            return other["name"]
    return op["name"]


def format_report(totals: dict[tuple[str, str], tuple[int, float]], top: int) -> str:
    """The ``top`` (operator, kernel) pairs by device time, with the trace's total."""
    total_us = sum(us for _, us in totals.values())
    lines = [f"device time of all kernels: {total_us / 1000:.3f} ms", "",
             f"{'ms':>9} {'calls':>6} {'share':>6}  operator :: kernel"]
    for (operator, kernel), (calls, us) in sorted(totals.items(), key=lambda kv: -kv[1][1])[:top]:
        share = us / total_us if total_us else 0.0
        lines.append(f"{us / 1000:9.3f} {calls:6d} {share:6.1%}  {operator} :: {kernel[:90]}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kernels_bench.attribute", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trace", type=Path, help="a .trace.json(.gz) written by kernels_bench.profile --trace")
    p.add_argument("--top", type=int, default=40, help="how many (operator, kernel) pairs to list")
    args = p.parse_args(argv)
    print(format_report(attribute(read_trace(p, args.trace)), args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
