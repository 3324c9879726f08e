"""Benchmarks of true sparse SparK against dense masking.

    python -m kernels_bench --device cpu --quick     # smoke run, < 2 min on 2 cores
    python -m kernels_bench --device cpu             # full CPU sweep (about an hour on 2 cores)
    python -m kernels_bench --device cuda            # full GPU sweep
    python -m kernels_bench report                   # re-render docs/benchmarks.md from saved results

Results go to kernels_bench/results/<device>[-quick]/ (results.json, rows.csv, kernels.csv,
plots/); full runs also regenerate docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
REPORT = REPO / "docs" / "benchmarks.md"

log = logging.getLogger("kernels_bench")


def main(argv: list[str] | None = None) -> int | None:
    p = argparse.ArgumentParser(prog="python -m kernels_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", nargs="?", default="run", choices=("run", "report"))
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--quick", action="store_true", help="small models and inputs, one timed run: a smoke test")
    p.add_argument("--threads", type=int, default=None, help="torch/OpenMP threads per case (default: torch's)")
    p.add_argument("--models", nargs="+", default=None, help="override the plan's encoders (registered names)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per case (median reported)")
    p.add_argument("--parts", nargs="+", default=None, choices=("encoder_fwd", "encoder_fwd_bwd", "step"),
                   help="override the plan's parts (e.g. --parts step for a step-only run)")
    p.add_argument("--masks", nargs="+", type=float, default=None,
                   help="override the plan's mask ratios (encoder parts and step), e.g. --masks 0.6")
    p.add_argument("--no-sweeps", action="store_true", help="leave out the batch and resolution sweeps")
    p.add_argument("--out", type=Path, default=None, help="results folder (default kernels_bench/results/<device>)")
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE_OR_FILE",
                   help="import a module that registers your own encoder, then name it in --models")
    p.add_argument("--conv-impl", nargs="+", default=None, choices=("auto", "torch", "triton", "minkowski"),
                   help="sparse conv backend(s) of the sparse encoder; several give one set of sparse rows each")
    p.add_argument("--grad-checkpointing", action="store_true",
                   help="add sparse rows with the encoder's blocks recomputed in the backward (bf16 on CUDA)")
    p.add_argument("--checkpoint-stages", nargs="+", type=int, default=[], metavar="N",
                   help="with --grad-checkpointing, also encoder forward+backward rows recomputing only the "
                        "first N stages' blocks, one per N")
    p.add_argument("--dense-stem", action="store_true",
                   help="add sparse rows whose first conv runs densely on the zero-filled image (first backend)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="add CUDA sparse rows replayed from CUDA graphs (first backend, bf16; encoder rows also with "
                        "each --checkpoint-stages N)")
    p.add_argument("--skip", nargs="*", default=[], choices=("kernels", "breakdown"), help="parts of the run to leave out")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    from kernels_bench.report import write_report

    if args.command == "report":
        write_report(RESULTS, REPORT)
        return
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA device")
    if args.imports:
        from spark_me import import_encoder_modules

        try:
            import_encoder_modules(args.imports)
        except ValueError as e:
            p.error(str(e))

    from kernels_bench.breakdown import sparse_step_breakdown
    from kernels_bench.kernels import layer_backends, run_kernel_bench
    from kernels_bench.suite import (CudaContextLost, environment, full_plan, quick_plan, run_cases, sanity_check,
                                     save_results)

    plan = quick_plan(args.device, args.threads) if args.quick else full_plan(args.device, args.threads)
    if args.models:
        from kernels_bench.measure import unknown_encoders_error

        if error := unknown_encoders_error(args.models):
            p.error(f"{error} (add --import MODULE_OR_FILE for your own)")
        plan.models = args.models
    plan.imports = tuple(str(Path(i).resolve()) if i.endswith(".py") or "/" in i else i for i in args.imports)
    if args.conv_impl:
        plan.conv_impls = tuple(args.conv_impl)
    if args.repeats:
        plan.repeats = args.repeats
    plan.grad_checkpointing = args.grad_checkpointing
    plan.dense_stem = args.dense_stem
    if args.cuda_graphs and not args.device.startswith("cuda"):
        p.error("--cuda-graphs rows run on CUDA only: add --device cuda")
    plan.cuda_graphs = args.cuda_graphs
    if args.checkpoint_stages:
        if not args.grad_checkpointing:
            p.error("--checkpoint-stages adds rows to those of --grad-checkpointing: give both")
        if min(args.checkpoint_stages) < 1:
            p.error(f"--checkpoint-stages must be at least 1, got {args.checkpoint_stages}")
        plan.checkpoint_stages = tuple(sorted(set(args.checkpoint_stages)))
    if args.parts:
        plan.parts = args.parts
    if args.masks:
        if not all(0.0 <= m < 1.0 for m in args.masks):
            p.error(f"--masks must be in [0, 1), got {args.masks}")
        plan.masks = plan.step_masks = sorted(set(args.masks))
    if args.no_sweeps:
        plan.extra_batches, plan.extra_sizes = [], []
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or RESULTS / (args.device.split(":")[0] + ("-quick" if args.quick else ""))
    start = time.perf_counter()
    cases = plan.cases()
    log.info("kernels_bench: %d cases on %s (%s mode)", len(cases), args.device, "quick" if args.quick else "full")
    # The baselines first; then each backend in the order given, right after its sanity check
    # (rows must compare equal computations); the CUDA-graph rows last, as the newest code.
    # A backend that breaks the process or the CUDA context costs only the rows after it
    # (rows are saved as they come; a lost context ends the run, its rows saved).
    sanity: list[dict] = []
    rows: list[dict] = []
    left_out = 0

    def save_partial(new_rows: list[dict]) -> None:
        partial = {"plan": {**dataclasses.asdict(plan), "quick": args.quick}, "sanity": sanity, "partial": True}
        save_results(out, {"environment": environment(), **partial, "rows": rows + new_rows, "kernels": [],
                           "breakdown": None})

    try:
        rows += run_cases([c for c in cases if c.variant != "sparse"], plan.isolate, on_row=save_partial,
                          numbering=(0, len(cases)))
        broken: set[tuple[str, str]] = set()
        for impl in plan.conv_impls:
            for m in plan.models:
                try:
                    sanity.append(sanity_check(m, plan.batch, plan.size, args.device, plan.decoder_width, impl))
                except Exception as e:  # a wrong or unusable backend costs its own rows, not the run
                    log.error("sanity %s[%s] failed, its cases are left out: %s", m, impl, e)
                    sanity.append({"model": m, "conv_impl": impl, "passed": False, "error": str(e)[:500]})
                    broken.add((m, impl))
            save_partial([])
            mine = [c for c in cases if c.variant == "sparse" and c.conv_impl == impl and not c.cuda_graphs]
            kept = [c for c in mine if (c.model, impl) not in broken]
            if len(kept) < len(mine):
                log.warning("kernels_bench: %d %s cases left out after failed sanity checks", len(mine) - len(kept), impl)
            left_out += len(mine) - len(kept)
            rows += run_cases(kept, plan.isolate, on_row=save_partial, numbering=(len(rows) + left_out, len(cases)))
        graphed = [c for c in cases if c.cuda_graphs and (c.model, c.conv_impl) not in broken]
        left_out += sum(c.cuda_graphs for c in cases) - len(graphed)
        rows += run_cases(graphed, plan.isolate, on_row=save_partial, numbering=(len(rows) + left_out, len(cases)))
    except CudaContextLost as e:
        log.error("kernels_bench: stopped: %s; the rows so far are in %s", e, out / "results.json")
        return 1
    if plan.isolate is False and not args.device.startswith("cuda"):
        for r in rows:  # peak RSS of a shared process says nothing about one case
            r["peak_mib"] = r["peak_growth_mib"] = None
    kernels = [] if "kernels" in args.skip else run_kernel_bench(
        args.device, quick=args.quick, batch=plan.batch, conv_impls=layer_backends(plan.conv_impls, args.device),
        dtypes=(torch.float32, torch.bfloat16) if plan.cuda_extras else (torch.float32,))
    breakdown = None
    if "breakdown" not in args.skip and args.device == "cpu":
        b, s = (plan.batch, plan.size)
        breakdown = sparse_step_breakdown(plan.models[0], b, s, 0.6, repeats=plan.repeats, decoder_width=plan.decoder_width)
    payload = {
        "environment": environment(),
        "plan": {**dataclasses.asdict(plan), "quick": args.quick},
        "sanity": sanity,
        "rows": rows,
        "kernels": kernels,
        "breakdown": breakdown,
        "wall_s": time.perf_counter() - start,
    }
    save_results(out, payload)
    if not args.quick and args.out is None:
        write_report(RESULTS, REPORT)
    log.info("kernels_bench: done in %.0f s", payload["wall_s"])


if __name__ == "__main__":
    sys.exit(main())
