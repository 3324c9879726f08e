"""The benchmark suite: plans of cases, the numerical sanity check, running, saving.

Quick mode (CPU: small models and inputs, one timed run, in one process, so no per-case
memory on CPU) checks that everything works in under two minutes. Full mode runs the
sweeps of the issue; on CPU each case gets a fresh process so its peak RSS is its own.
"""
from __future__ import annotations

import csv
import dataclasses
import datetime
import json
import logging
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch

from kernels_bench.measure import Case, build_sparse_spark, make_inputs, run_case
from kernels_bench.report import option_labels
from kernels_bench.variants import as_dense, build_variant
from spark_me.cuda_graphs import cuda_context_lost

log = logging.getLogger(__name__)

MASK_SWEEP = (0.0, 0.25, 0.5, 0.6, 0.75, 0.9)
HEADLINE_MASK = 0.6
SANITY_TOL = 1e-3  # float32 relative error of features and loss; the tests prove 1e-10 in float64


@dataclasses.dataclass
class Plan:
    """What a run measures. ``models`` × mask sweep for the encoder parts, the whole step at
    the headline mask, plus batch and resolution sweeps at the headline mask."""

    device: str
    models: list[str]
    batch: int
    size: int
    masks: list[float]
    step_masks: list[float]
    extra_batches: list[int]
    extra_sizes: list[int]
    parts: list[str]
    warmup: int
    repeats: int
    threads: Optional[int]
    isolate: bool  # one process per case (CPU memory)
    cuda_extras: bool  # channels_last and bf16 rows for the dense baselines
    decoder_width: int = 768
    imports: tuple[str, ...] = ()  # users' encoder modules, imported in every case's process
    conv_impls: tuple[str, ...] = ("auto",)  # sparse conv backends, one set of sparse rows each
    # also sparse rows with the encoder's blocks recomputed in the backward, for the parts
    # with a backward at the headline mask, batch and size (bf16 on CUDA, fp32 on CPU; not
    # for the minkowski reference) ...
    grad_checkpointing: bool = False
    # ... and, with it, encoder forward+backward rows recomputing only the first N stages'
    # blocks, one per N (the encoder's own time and memory are what the choice trades), for
    # the first backend
    checkpoint_stages: tuple[int, ...] = ()
    # also headline sparse rows with the first conv dense on the zero-filled image
    # (SparseEncoder.set_dense_stem), for the first backend, bf16 on CUDA
    dense_stem: bool = False
    # also CUDA sparse rows replayed from CUDA graphs (SparseEncoder.set_cuda_graphs), for the
    # first backend in bf16: the step, the encoder forward+backward, and the encoder with the
    # first N stages recomputed for each of checkpoint_stages; with dense_stem, each of them
    # again with the dense stem (its conv and gathering before the replay)
    cuda_graphs: bool = False

    def cases(self) -> list[Case]:
        out: list[Case] = []
        common = dict(device=self.device, warmup=self.warmup, repeats=self.repeats, threads=self.threads,
                      decoder_width=self.decoder_width, imports=tuple(self.imports))

        def add(model: str, variant: str, part: str, batch: int, size: int, mask: float) -> None:
            if variant == "sparse":
                for impl in self.conv_impls:
                    out.append(Case(model, variant, part, batch, size, mask, conv_impl=impl, **common))
                    if self.cuda_extras and impl != "minkowski":  # ME's kernels are fp32-only
                        out.append(Case(model, variant, part, batch, size, mask, conv_impl=impl, amp="bf16", **common))
                    headline = (mask, batch, size) == (HEADLINE_MASK, self.batch, self.size)
                    amp = "bf16" if self.cuda_extras else None
                    first = impl == self.conv_impls[0]
                    if self.grad_checkpointing and part != "encoder_fwd" and headline and impl != "minkowski":
                        partial = self.checkpoint_stages if part == "encoder_fwd_bwd" and first else ()
                        for stages in (None, *partial):
                            out.append(Case(model, variant, part, batch, size, mask, conv_impl=impl, amp=amp,
                                            grad_checkpointing=True, checkpoint_stages=stages, **common))
                    if self.dense_stem and headline and first:
                        out.append(Case(model, variant, part, batch, size, mask, conv_impl=impl, amp=amp,
                                        dense_stem=True, **common))
                    if (self.cuda_graphs and self.cuda_extras and headline and first and part != "encoder_fwd"
                            and impl != "minkowski"):
                        partial = self.checkpoint_stages if part == "encoder_fwd_bwd" and self.grad_checkpointing else ()
                        for dense_stem in (False, True) if self.dense_stem else (False,):
                            graphed = dict(conv_impl=impl, amp=amp, cuda_graphs=True, dense_stem=dense_stem, **common)
                            out.append(Case(model, variant, part, batch, size, mask, **graphed))
                            for stages in partial:
                                out.append(Case(model, variant, part, batch, size, mask, grad_checkpointing=True,
                                                checkpoint_stages=stages, **graphed))
                return
            out.append(Case(model, variant, part, batch, size, mask, **common))
            if self.cuda_extras:  # the dense baselines at their fastest: channels_last, and bf16 in it
                out.append(Case(model, variant, part, batch, size, mask, channels_last=True, **common))
                out.append(Case(model, variant, part, batch, size, mask, channels_last=True, amp="bf16", **common))

        for model in self.models:
            for part in self.parts:
                masks = self.step_masks if part == "step" else self.masks
                for mask in masks:
                    for variant in ("sparse", "masked_dense"):
                        add(model, variant, part, self.batch, self.size, mask)
                add(model, "dense", part, self.batch, self.size, HEADLINE_MASK)  # sees no mask
            for batch in self.extra_batches:
                for variant in ("sparse", "masked_dense", "dense"):
                    add(model, variant, "encoder_fwd_bwd", batch, self.size, HEADLINE_MASK)
            for size in self.extra_sizes:
                for variant in ("sparse", "masked_dense", "dense"):
                    add(model, variant, "encoder_fwd_bwd", self.batch, size, HEADLINE_MASK)
        return out


def quick_plan(device: str, threads: Optional[int]) -> Plan:
    small = device == "cpu"
    return Plan(
        device=device, models=["resnet18", "convnext_atto"] if small else ["resnet50", "convnext_tiny"],
        batch=4 if small else 32, size=128 if small else 224, masks=[0.0, 0.6, 0.9], step_masks=[HEADLINE_MASK],
        extra_batches=[], extra_sizes=[], parts=["encoder_fwd_bwd", "step"], warmup=1, repeats=1,
        threads=threads, isolate=False, cuda_extras=not small, decoder_width=256 if small else 768,
    )


def full_plan(device: str, threads: Optional[int]) -> Plan:
    if device == "cpu":
        return Plan(
            device=device, models=["resnet50", "convnext_tiny"], batch=8, size=224, masks=list(MASK_SWEEP),
            step_masks=[HEADLINE_MASK], extra_batches=[4, 16], extra_sizes=[384],
            parts=["encoder_fwd", "encoder_fwd_bwd", "step"], warmup=1, repeats=3, threads=threads,
            isolate=True, cuda_extras=False,
        )
    return Plan(
        device=device, models=["resnet50", "convnext_tiny", "resnet101", "convnext_base"], batch=128, size=224,
        masks=list(MASK_SWEEP), step_masks=list(MASK_SWEEP), extra_batches=[32, 64, 256], extra_sizes=[384],
        parts=["encoder_fwd", "encoder_fwd_bwd", "step"], warmup=3, repeats=10, threads=threads,
        isolate=False, cuda_extras=True,
    )


def sanity_check(model: str, batch: int, size: int, device: str, decoder_width: int, conv_impl: str = "auto") -> dict:
    """(a) sparse, with the ``conv_impl`` backend, and (b) masked-dense agree on features and
    loss, same weights and mask (compared as dense maps: row order does not matter)."""
    case = Case(model, "sparse", "step", batch, size, HEADLINE_MASK, device=device, decoder_width=decoder_width,
                conv_impl=conv_impl)
    dev = torch.device(device)
    sparse = build_sparse_spark(case, dev)
    emulated = build_variant(sparse, "masked_dense").to(dev).train()
    images, active = make_inputs(case, dev)
    # exact float32 on both sides: CUDA convolutions default to TF32 (~1e-3 relative error)
    with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        ours = as_dense(sparse.encoder(images, active), batch, (size, size))
        theirs = emulated.encode(images, active)
        errors = [float((a - b).norm() / b.norm()) for a, b in zip(ours, theirs)]
        loss_a, loss_b = float(sparse(images, active)), float(emulated(images, active))
    result = {"model": model, "conv_impl": conv_impl, "batch": batch, "size": size, "mask_ratio": HEADLINE_MASK,
              "feature_rel_err": errors, "loss_sparse": loss_a, "loss_masked_dense": loss_b,
              "loss_rel_err": abs(loss_a - loss_b) / abs(loss_b)}
    worst = max(errors + [result["loss_rel_err"]])
    result["passed"] = worst <= SANITY_TOL
    if not result["passed"]:
        raise RuntimeError(f"sparse[{conv_impl}] and masked-dense disagree for {model} (relative error {worst:.2e} > "
                           f"{SANITY_TOL}); timings would compare different computations: {result}")
    log.info("sanity %s[%s] b%d %dpx: features agree to %.1e, loss to %.1e", model, conv_impl, batch, size,
             max(errors), result["loss_rel_err"])
    return result


class CudaContextLost(RuntimeError):
    """A case broke the process's CUDA context; its rows and the rest are recorded."""


def _run_isolated(case: Case) -> dict:
    repo = str(Path(__file__).resolve().parents[1])  # so `-m kernels_bench.measure` resolves from any cwd
    path = os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"), "PYTHONPATH": path}
    if case.threads:
        env["OMP_NUM_THREADS"] = str(case.threads)
    proc = subprocess.run([sys.executable, "-m", "kernels_bench.measure", json.dumps(dataclasses.asdict(case))],
                          capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"case {case} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def run_cases(cases: Iterable[Case], isolate: bool, on_row: Optional[Callable[[list[dict]], None]] = None,
              numbering: Optional[tuple[int, int]] = None) -> list[dict]:
    """Measure every case, logging one line each (the progress of a long run); ``on_row``
    gets the rows so far after each case (to save them: a run cut short keeps its rows);
    ``numbering`` = (cases before these, all cases), for the progress of a run measured
    in several calls."""
    cases = list(cases)
    before, total = numbering or (0, len(cases))
    rows = []
    for i, case in enumerate(cases, before + 1):
        log.info("[%d/%d] running %s %s %s b%d %dpx mask %.2f", i, total, case.model, case.variant,
                 case.part, case.batch, case.size, case.mask_ratio)
        try:
            row = _run_isolated(case) if isolate else run_case(case)
        except torch.cuda.OutOfMemoryError:  # a big dense baseline may not fit: say so, go on
            torch.cuda.empty_cache()
            rows.append({**dataclasses.asdict(case), "error": "out of memory"})
            log.warning("[%d/%d] %s: out of memory, skipped", i, total, case)
            continue
        except Exception as e:  # one broken backend must not cost the other rows of a GPU run
            rows.append({**dataclasses.asdict(case), "error": f"{type(e).__name__}: {str(e)[:500]}"})
            lost = not isolate and cuda_context_lost(torch.device(case.device))
            if lost:  # nothing after it can run in this process
                rest = cases[i - before:]
                rows += [{**dataclasses.asdict(c), "error": f"not run: case {i} lost the CUDA context"} for c in rest]
                log.error("[%d/%d] %s failed and lost the CUDA context (%s: %s); the %d cases after it are not run",
                          i, total, case, type(e).__name__, str(e)[:300], len(rest))
            else:
                log.exception("[%d/%d] %s failed; recorded, going on", i, total, case)
            if on_row is not None:
                on_row(rows)
            if lost:
                raise CudaContextLost(f"case {i} of {total} lost the CUDA context: {type(e).__name__}: {str(e)[:300]}")
            continue
        rows.append(row)
        if on_row is not None:
            on_row(rows)
        extra = "".join(f" {k}" for k, v in (("channels_last", case.channels_last), (case.amp, case.amp)) if v)
        variant = case.variant + (f"[{case.conv_impl}]" if case.variant == "sparse" else "")
        variant += option_labels(dataclasses.asdict(case))
        log.info("[%d/%d] %s %s %s b%d %dpx mask %.2f%s: %.3f s (%.1f img/s), peak +%.0f MiB", i, total,
                 case.model, variant, case.part, case.batch, case.size, case.mask_ratio, extra,
                 row["median_s"], row["images_per_s"], row["peak_growth_mib"])
    return rows


def environment() -> dict:
    """Machine, versions and threads, recorded with every result file."""
    import MinkowskiEngine as ME
    import timm

    info = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "minkowskiengine": ME.__version__,
        "timm": timm.__version__,
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", *args], capture_output=True, text=True, cwd=Path(__file__).parent).stdout.strip()

        commit = git("rev-parse", "--short", "HEAD")
        # results measured with uncommitted changes to tracked files say so
        info["git_commit"] = (commit + ("+uncommitted" if git("status", "--porcelain", "--untracked-files=no") else "")) or None
    except OSError:
        info["git_commit"] = None
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def save_results(out_dir: Path, payload: dict) -> None:
    """results.json (everything) plus one CSV per table."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(payload, indent=1))
    for key in ("rows", "kernels"):
        if payload.get(key):
            write_csv(out_dir / f"{key}.csv", payload[key])
    log.info("wrote %s", out_dir / "results.json")


def write_csv(path: Path, rows: list[dict]) -> None:
    """``rows`` as CSV, one column per scalar field any row has (lists and dicts left out)."""
    fields = list(dict.fromkeys(k for r in rows for k in r if not isinstance(r[k], (list, dict))))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
