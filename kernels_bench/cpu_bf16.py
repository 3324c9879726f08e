"""Whether bf16 pays on this CPU, per part of a sparse SparK step (issue #11).

    OMP_NUM_THREADS=1 python -m kernels_bench.cpu_bf16 --models resnet50 convnext_tiny --batch 2

Times the forward+backward of the sparse encoder, densify, and decoder + loss, each in
fp32 and under bf16 autocast, alternating in rounds (so a machine that slows down mid-run
slows both alike), and logs the medians and the spread of the per-round ratios. The
parts are kernels_bench/breakdown.py's (densify and decoder on detached inputs). A ratio
below 1 means bf16 pays for that part on this CPU: on a CPU with AVX2 only the medians were
11-16 (such a CPU runs fp32); on one with AMX 0.37-0.64, except ConvNeXt-T's encoder at 1.09
(such a CPU runs ``trainer.precision=bf16``; docs/training.md has the tables).
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from typing import Callable, Optional

import torch

from kernels_bench.breakdown import step_parts
from kernels_bench.measure import Case, build_sparse_spark, case_error, make_inputs
from spark_me import SparK

log = logging.getLogger(__name__)


def part_functions(model_name: str, batch: int, size: int, mask: float) -> tuple[SparK, dict[str, Callable[[bool], None]]]:
    """The model of a sparse step at this configuration, and its parts (breakdown.step_parts)."""
    case = Case(model_name, "sparse", "step", batch, size, mask)
    model = build_sparse_spark(case, torch.device("cpu"))
    images, active = make_inputs(case, torch.device("cpu"))
    return model, step_parts(model, images, active)


def compare(fn: Callable[[bool], None], rounds: int) -> dict:
    """One warm-up of each precision, then ``rounds`` alternating fp32/bf16 runs."""
    fn(False)
    fn(True)
    fp32, bf16 = [], []
    for _ in range(rounds):
        for times, flag in ((fp32, False), (bf16, True)):
            start = time.perf_counter()
            fn(flag)
            times.append(time.perf_counter() - start)
    ratios = [b / f for f, b in zip(fp32, bf16)]
    return {"fp32_s": statistics.median(fp32), "bf16_s": statistics.median(bf16),
            "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios)}


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kernels_bench.cpu_bf16", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["resnet50", "convnext_tiny"])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--mask", type=float, default=0.6)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if error := case_error(Case(m, "sparse", "step", args.batch, args.size, args.mask) for m in args.models):
        p.error(error)
    if args.rounds < 1 or args.threads < 1:
        p.error(f"--rounds and --threads must be at least 1, got {args.rounds} and {args.threads}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    log.info("torch %s, CPU capability %s, %d thread(s), batch %d, %d px, mask %g", torch.__version__,
             torch.backends.cpu.get_cpu_capability(), args.threads, args.batch, args.size, args.mask)
    results = []
    for model_name in args.models:
        _, parts = part_functions(model_name, args.batch, args.size, args.mask)
        for part, fn in parts.items():
            r = {"model": model_name, "part": part, **compare(fn, args.rounds)}
            results.append(r)
            log.info("%s %s: fp32 %.3f s, bf16 %.3f s, bf16/fp32 %.2f (rounds %.2f-%.2f)", model_name, part,
                     r["fp32_s"], r["bf16_s"], r["ratio"], r["ratio_min"], r["ratio_max"])
    log.info("RESULTS %s", json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
