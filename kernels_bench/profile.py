"""Where a training step's time goes: torch.profiler over a few steps of each case.

    python -m kernels_bench.profile --device cuda --models resnet50 convnext_tiny \\
        --amp bf16 --conv-impl torch triton --out kernels_bench/results/gpu-<name>/profile

Profiled per model: the sparse step with each backend, then the masked-dense emulation
(on CUDA in channels_last, its faster layout) as the baseline, at the same precision. For
the encoder parts, also the first backend on one batch gathered once and encoded again
and again (``…-reused_batch``): its tables exist, so the difference to the plain row is
what gathering a batch and building its maps and tables cost, syncs included.
For each case it reports, per step:

* the wall time, measured without the profiler (median), and the device time (the sum of
  the kernels' and copies' durations, from the profile); their ratio is how busy the GPU
  is: far below 1, the host (Python, dispatch, launches, synchronisations) bounds the step;
* kernels launched and host synchronisations (each stalls the host until the GPU drains);
* the host time inside spark_me's profiler ranges (``spark_me::to_sparse``, the gather
  into a ``SparseTensor``, and ``spark_me::neighbour_tables``, building a batch's tables
  through MinkowskiEngine's coordinate maps and their parts built on first use,
  synchronisations included: the work that MinkowskiEngine's C++ does outside the
  profiler's view is inside these ranges, which do not nest);
* the kernels with the most device time and the operators with the most self CPU time.

Ranges that code marks with ``record_function`` (the optimizer's step, spark_me's) also
show up on the device side, flagged as user annotations, spanning their kernels; they are
not kernels and are left out of the device time.

Results go to ``profile.json`` (rewritten after each case, so a case that kills the
process leaves the earlier ones) and one ``<case>.txt`` operator table per case; with
``--trace NAME``, the cases whose name contains NAME also leave the profiler's timeline of
their last profiled step, ``<case>.trace.json.gz`` (Chrome's trace format: chrome://tracing
or Perfetto open it), where the gaps between kernels and what the host did during them
can be read off.
``python -m kernels_bench report`` shows a results folder's ``profile/profile.json``.
"""
from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import logging
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Iterable, Optional, Protocol, Sequence

import torch

from kernels_bench.measure import Case, case_error, prepare_case, synchronize
from spark_me.cuda_graphs import cuda_context_lost

log = logging.getLogger(__name__)

# CUDA runtime and driver calls that launch a kernel (Triton launches through the driver),
# and those that block the host until the device is done.
_LAUNCH = re.compile(r"^cu(da)?Launch")
_SYNC = re.compile(r"^cu(da)?(Stream|Device|Event|Ctx)Synchronize$")
# spark_me's own profiler ranges (spark_me.gather.to_sparse, spark_me.ops.tables)
RANGE_PREFIX = "spark_me::"


class ProfiledEvent(Protocol):
    """The fields of ``torch.autograd.profiler_util.FunctionEventAvg`` that are read here."""

    key: str
    count: int
    cpu_time_total: float  # microseconds, children included
    self_cpu_time_total: float  # microseconds
    self_device_time_total: float  # microseconds
    device_type: torch.autograd.DeviceType


def summarise(events: Iterable[ProfiledEvent], steps: int, top: int = 10) -> dict:
    """Per-step totals and top entries of ``steps`` profiled steps' aggregated events."""
    events = list(events)
    on_host = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU]
    # A range's device-side span is flagged as a user annotation (PyTorch 2.5 on).
    on_device = [e for e in events if e.device_type != torch.autograd.DeviceType.CPU
                 and not getattr(e, "is_user_annotation", False)]
    device_us = sum(e.self_device_time_total for e in on_device)
    host_us = sum(e.self_cpu_time_total for e in on_host)
    kernels = sorted(on_device, key=lambda e: e.self_device_time_total, reverse=True)
    ops = sorted(on_host, key=lambda e: e.self_cpu_time_total, reverse=True)
    return {
        "device_s": device_us / 1e6 / steps if on_device else None,
        "host_self_s": host_us / 1e6 / steps,
        "kernels": sum(e.count for e in on_device) / steps,
        "launches": sum(e.count for e in on_host if _LAUNCH.match(e.key)) / steps,
        "syncs": sum(e.count for e in on_host if _SYNC.match(e.key)) / steps,
        "ranges": {e.key: e.cpu_time_total / 1e6 / steps for e in on_host if e.key.startswith(RANGE_PREFIX)},
        "top_kernels": [{"name": e.key, "calls": e.count / steps, "device_s": e.self_device_time_total / 1e6 / steps,
                         "share": e.self_device_time_total / device_us if device_us else 0.0} for e in kernels[:top]],
        "top_ops": [{"name": e.key, "calls": e.count / steps, "self_cpu_s": e.self_cpu_time_total / 1e6 / steps,
                     "share": e.self_cpu_time_total / host_us if host_us else 0.0} for e in ops[:top]],
    }


def profile_case(case: Case, steps: int = 3, table_rows: int = 30, trace: Optional[Path] = None) -> tuple[dict, str]:
    """Profile ``steps`` runs of a case's part after ``case.warmup`` runs; returns the
    summary (with the case's fields) and the profiler's operator table. With ``trace``, the
    last step is profiled once more, alone, and its timeline written there (gzipped)."""
    fn, _ = prepare_case(case)
    device = torch.device(case.device)
    for _ in range(case.warmup):
        fn()
    synchronize(device)
    walls = _walls(fn, device, case.repeats)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        synchronize(device)
        profiled = time.perf_counter() - start
    # Timed again after profiling: on the H100 a Triton case profiled after another case
    # took 82 ms per step by this wall clock and 58 ms in the suite. If a profiler session
    # leaves per-launch overhead behind, the walls of later cases read high, and this says so.
    walls_after = _walls(fn, device, case.repeats)
    averages = prof.key_averages()
    wall = statistics.median(walls)
    summary = summarise(averages, steps)
    if summary["syncs"] and device.type == "cuda":
        summary["syncs"] -= 1 / steps  # the synchronize after the last step is this function's
    summary.update(
        wall_s=wall, wall_after_profile_s=statistics.median(walls_after), profiled_wall_s=profiled / steps, steps=steps,
        busy=summary["device_s"] / wall if summary["device_s"] is not None else None,
    )
    sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = averages.table(sort_by=sort_by, row_limit=table_rows, max_name_column_width=80)
    if trace is not None:
        write_trace(fn, device, activities, trace)
    return {**dataclasses.asdict(case), **summary}, table


def _walls(fn, device: torch.device, repeats: int) -> list[float]:
    """Wall seconds of ``repeats`` runs of ``fn``, each ended by a device synchronisation."""
    walls = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        walls.append(time.perf_counter() - start)
    return walls


def write_trace(fn, device: torch.device, activities: list, path: Path) -> None:
    """The timeline of one run of ``fn`` in Chrome's trace format, gzipped to ``path``."""
    with torch.profiler.profile(activities=activities) as prof:
        fn()
        synchronize(device)
    raw = path.with_name(path.name.removesuffix(".gz"))
    prof.export_chrome_trace(str(raw))
    with open(raw, "rb") as src, gzip.open(path, "wb") as dst:
        dst.write(src.read())
    raw.unlink()


def plan(models: list[str], conv_impls: list[str], device: str, batch: int, size: int, mask: float,
         amp: Optional[str], part: str, warmup: int, repeats: int, decoder_width: int) -> list[Case]:
    """Per model: the sparse part with each backend; the first backend again with the first
    conv dense on the zero-filled image (``dense_stem``: no full-resolution coordinates,
    maps or tables), and on CUDA, for a part with a backward, replayed from a CUDA graph
    with either stem (``cuda_graphs``: the host issues one replay instead of every kernel);
    for an encoder part, the first backend on a batch gathered once
    (``reuse_batch``: no gather, no new maps or tables, the difference being what every new
    batch costs); then the masked-dense baseline."""
    cuda = device.startswith("cuda")
    common = dict(part=part, batch=batch, size=size, mask_ratio=mask, device=device, amp=amp,
                  warmup=warmup, repeats=repeats, decoder_width=decoder_width)
    cases, graphed = [], []
    for model in models:
        cases += [Case(model, "sparse", conv_impl=impl, **common) for impl in conv_impls]
        cases.append(Case(model, "sparse", conv_impl=conv_impls[0], dense_stem=True, **common))
        if cuda and part != "encoder_fwd" and conv_impls[0] != "minkowski":
            graphed += [Case(model, "sparse", conv_impl=conv_impls[0], cuda_graphs=True, dense_stem=dense_stem, **common)
                        for dense_stem in (False, True)]
        if part != "step":
            cases.append(Case(model, "sparse", conv_impl=conv_impls[0], reuse_batch=True, **common))
        cases.append(Case(model, "masked_dense", channels_last=cuda, **common))
    return cases + graphed  # the newest code last: a case that loses the CUDA context ends the run


def case_name(case: Case) -> str:
    backend = case.conv_impl if case.variant == "sparse" else ("channels_last" if case.channels_last else "nchw")
    reused = "-reused_batch" if case.reuse_batch else ""
    stem = "-dense_stem" if case.dense_stem else ""
    graphs = "-cuda_graphs" if case.cuda_graphs else ""
    return f"{case.model}-{case.variant}-{backend}{stem}{graphs}{reused}-{case.part}-{case.amp or 'fp32'}"


def run(cases: list[Case], out: Path, steps: int, trace: Sequence[str] = ()) -> list[dict]:
    """Profile every case in turn; a case that raises is recorded with its error. Cases
    whose name contains one of ``trace`` also leave their timeline (:func:`write_trace`)."""
    out.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    for i, case in enumerate(cases, 1):
        name = case_name(case)
        log.info("[%d/%d] running %s", i, len(cases), name)
        try:
            timeline = out / f"{name}.trace.json.gz" if any(t in name for t in trace) else None
            summary, table = profile_case(case, steps, trace=timeline)
        except Exception as e:  # one backend failing must not cost the other cases
            log.error("%s failed: %s: %s", name, type(e).__name__, e)
            summary, table = {**dataclasses.asdict(case), "error": f"{type(e).__name__}: {e}"}, None
            if cuda_context_lost(torch.device(case.device)):
                results.append({"name": name, **summary})
                results += [{"name": case_name(c), **dataclasses.asdict(c), "error": f"not run: case {i} lost the "
                             "CUDA context"} for c in cases[i:]]
                (out / "profile.json").write_text(json.dumps({"environment": _environment(), "cases": results}, indent=1))
                log.error("%s lost the CUDA context: the %d cases after it are not run", name, len(cases) - i)
                break
        results.append({"name": name, **summary})
        if table is not None:
            (out / f"{name}.txt").write_text(f"{name}: {steps} steps\n{table}\n")
            log.info("%s", describe(results[-1]))
        (out / "profile.json").write_text(json.dumps({"environment": _environment(), "cases": results}, indent=1))
        if case.device.startswith("cuda"):
            torch.cuda.empty_cache()
    return results


def describe(r: dict) -> str:
    """One line per case, as the log and the report give it."""
    if "error" in r:
        return f"{r['name']}: {r['error']}"
    line = f"{r['name']}: {r['wall_s'] * 1e3:.1f} ms/step"
    after = r.get("wall_after_profile_s")
    if after is not None and abs(after - r["wall_s"]) > 0.1 * r["wall_s"]:
        line += f" ({after * 1e3:.1f} ms timed again after profiling)"
    if r["device_s"] is not None:
        line += (f", device {r['device_s'] * 1e3:.1f} ms (busy {r['busy']:.0%}), {r['kernels']:.0f} kernels, "
                 f"{r['syncs']:.0f} host syncs")
    if r.get("ranges"):
        line += "; host in " + ", ".join(f"{k.removeprefix(RANGE_PREFIX)} {v * 1e3:.1f} ms" for k, v in r["ranges"].items())
    top = r["top_kernels"] or r["top_ops"]
    if top:
        line += "; top: " + ", ".join(f"{t['name'][:48]} {t['share']:.0%}" for t in top[:3])
    return line


def _environment() -> dict:
    return {"torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kernels_bench.profile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda[:N] or cpu")
    p.add_argument("--models", nargs="+", default=["resnet50", "convnext_tiny"])
    p.add_argument("--conv-impl", nargs="+", default=["torch", "triton"],
                   choices=("auto", "torch", "triton", "minkowski"), help="sparse backends, one case each")
    p.add_argument("--part", default="step", choices=("encoder_fwd", "encoder_fwd_bwd", "step"))
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--mask", type=float, default=0.6)
    p.add_argument("--amp", default=None, choices=("bf16", "fp16"), help="autocast dtype (CUDA only)")
    p.add_argument("--decoder-width", type=int, default=768)
    p.add_argument("--warmup", type=int, default=3, help="runs before anything is measured (Triton autotunes here)")
    p.add_argument("--repeats", type=int, default=3, help="unprofiled timed runs (median: the wall time)")
    p.add_argument("--steps", type=int, default=3, help="profiled runs")
    p.add_argument("--out", type=Path, required=True, help="folder for profile.json and the tables")
    p.add_argument("--trace", nargs="+", default=[], metavar="NAME",
                   help="also write the timeline of one step of each case whose name contains NAME")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: torch {torch.__version__} sees no CUDA device")
    if args.amp and not args.device.startswith("cuda"):
        p.error("--amp is for CUDA (on the development CPU bf16 was 11-16x slower than fp32: python -m kernels_bench.cpu_bf16)")
    cases = plan(args.models, args.conv_impl, args.device, args.batch, args.size, args.mask, args.amp,
                 args.part, args.warmup, args.repeats, args.decoder_width)
    if error := case_error(cases):
        p.error(error)
    if args.steps < 1 or args.repeats < 1 or args.warmup < 0:
        p.error(f"--steps and --repeats must be at least 1 and --warmup at least 0, got {args.steps}, "
                f"{args.repeats} and {args.warmup}")
    names = [case_name(c) for c in cases]
    unmatched = [t for t in args.trace if not any(t in n for n in names)]
    if unmatched:
        p.error(f"--trace {' '.join(unmatched)} names no case; the cases are: {', '.join(names)}")
    results = run(cases, args.out, args.steps, args.trace)
    failed = [r["name"] for r in results if "error" in r]
    if failed:
        log.error("%d of %d cases failed: %s", len(failed), len(results), ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
