"""Prove spark_me on a CUDA machine in three phases, each under a time limit (make gpu-check).

    python tools/gpu_check.py build --wheelhouse DIR   # offline install, MinkowskiEngine for the GPUs present
    python tools/gpu_check.py test                     # the CUDA variants of the test suite
    python tools/gpu_check.py bench                    # GPU benchmarks + data pipeline throughput

Every phase writes its full output to ``build/gpu-check/<phase>.log`` (and to ``$OUT`` when
that is set, for machines whose results are copied back from there) and a summary to
``<phase>.json``, and stops after ``--limit`` seconds (default 540). A test or benchmark case
that crashes the process (e.g. an illegal instruction in a CUDA kernel) or hangs is reported
by name. On a machine without a GPU the phases still run and say plainly what was skipped.
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
LOG_DIR = REPO / "build" / "gpu-check"
_STARTED_TEST = re.compile(r"^(tests/\S+::\S+)")
_STARTED_CASE = re.compile(r"(\[\d+/\d+\] running .*)$")
_SUMMARY = re.compile(r"=+ (.*\d+ (passed|failed|skipped|error).*) in [\d.]+s")
_OUTCOME = re.compile(r"^tests/\S+::\S+ (PASSED|FAILED|ERROR|SKIPPED)")


def _python() -> str:
    venv = REPO / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def _cuda_status(python: str) -> tuple[bool, str]:
    """(usable, description) of torch's CUDA and MinkowskiEngine's CUDA build in ``python``."""
    code = ("import torch, json\n"
            "d = {'cuda': torch.cuda.is_available(), 'torch': torch.__version__}\n"
            "if d['cuda']: d['gpu'] = torch.cuda.get_device_name(0)\n"
            "try:\n import MinkowskiEngine as ME; d['me_cuda'] = ME.is_cuda_available()\n"
            "except Exception as e: d['me_cuda'] = None; d['me_error'] = repr(e)\n"
            "print(json.dumps(d))")
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        return False, f"cannot import torch with {python}: {proc.stderr.strip()[-300:]}"
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    if not info["cuda"]:
        return False, f"torch {info['torch']} sees no CUDA device"
    if not info.get("me_cuda"):
        return False, f"{info['gpu']} present, but MinkowskiEngine is not built with CUDA ({info.get('me_error', 'CPU build')})"
    return True, f"{info['gpu']}, torch {info['torch']}, MinkowskiEngine with CUDA"


class Phase:
    """Runs commands of one phase with a shared deadline, teeing output to the phase's logs."""

    def __init__(self, name: str, limit_s: float, log_dir: Path = LOG_DIR):
        self.name = name
        self.deadline = time.monotonic() + limit_s
        self.start = time.monotonic()
        self.log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        self.logs = [open(log_dir / f"{name}.log", "w")]
        if os.environ.get("OUT"):
            Path(os.environ["OUT"]).mkdir(parents=True, exist_ok=True)
            self.logs.append(open(Path(os.environ["OUT"]) / f"gpu-check-{name}.log", "w"))
        self.summary: dict = {"phase": name, "steps": []}
        self.last_lines: list[str] = []  # the output of the latest run()

    def say(self, line: str) -> None:
        for f in [sys.stdout, *self.logs]:
            f.write(line + "\n")
            f.flush()

    def run(self, label: str, cmd: list[str], started: Optional[re.Pattern] = None, env: Optional[dict] = None) -> dict:
        """Run ``cmd`` until the phase deadline; return rc, time, and what was running at a crash."""
        remaining = self.deadline - time.monotonic()
        self.say(f"gpu-check {self.name}: {label}: {' '.join(cmd)} (at most {remaining:.0f} s left)")
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO,
                                env={**os.environ, **(env or {})}, start_new_session=True)
        assert proc.stdout is not None
        chunks: queue.Queue = queue.Queue()

        def read() -> None:  # raw chunks, so a line still being written (a test's id) is seen
            while chunk := os.read(proc.stdout.fileno(), 65536):
                chunks.put(chunk)
            chunks.put(None)

        threading.Thread(target=read, daemon=True).start()
        current, lines, partial, timed_out = None, [], "", False
        while True:
            try:
                chunk = chunks.get(timeout=1.0)
            except queue.Empty:
                chunk = ""
            if chunk is None:
                break
            if time.monotonic() > self.deadline:
                timed_out = True
                os.killpg(proc.pid, signal.SIGKILL)
                break
            if not chunk:
                continue
            *done, partial = (partial + chunk.decode(errors="replace")).split("\n")
            for line in done:
                self.say(line)
                lines.append(line)
            # pytest -v writes a test's id when it starts and its outcome when it ends.
            for line in [*done, partial]:
                if started is not None and (m := started.search(line)):
                    current = m.group(1)
        if partial:
            self.say(partial)
            lines.append(partial)
        rc = proc.wait()
        result = {"label": label, "rc": rc, "seconds": round(time.monotonic() - t0, 1), "timed_out": timed_out}
        if timed_out or any("+ Timeout +" in line for line in lines[-200:]):  # phase limit, or pytest-timeout
            result["hung_in"] = current
            limit = "the phase limit" if timed_out else "its per-test timeout"
            self.say(f"gpu-check {self.name}: TIMEOUT: {label} did not finish within {limit}; "
                     f"it was running {current or 'an unknown step'}")
        elif rc < 0 or rc in (132, 134, 135, 139):  # killed by a signal: SIGILL, SIGABRT, SIGBUS, SIGSEGV
            sig = -rc if rc < 0 else rc - 128
            result["crashed_in"] = current
            self.say(f"gpu-check {self.name}: CRASH: {label} died of {signal.Signals(sig).name} "
                     f"while running {current or 'an unknown step'}")
        result["tail"] = lines[-5:]
        self.summary["steps"].append(result)
        self.last_lines = lines
        return result

    def finish(self, ok: bool, note: str) -> int:
        self.summary.update(ok=ok, note=note, seconds=round(time.monotonic() - self.start, 1))
        (self.log_dir / f"{self.name}.json").write_text(json.dumps(self.summary, indent=2))
        if os.environ.get("OUT"):
            shutil.copy(self.log_dir / f"{self.name}.json", Path(os.environ["OUT"]) / f"gpu-check-{self.name}.json")
        self.say(f"gpu-check {self.name}: {'PASSED' if ok else 'FAILED'} in {self.summary['seconds']:.0f} s: {note}")
        for f in self.logs:
            f.close()
        return 0 if ok else 1


def phase_build(args: argparse.Namespace) -> int:
    phase = Phase("build", args.limit, args.log_dir)
    if not args.wheelhouse:
        return phase.finish(False, "--wheelhouse DIR is required (make wheelhouse on a connected machine)")
    r = phase.run("install", ["bash", str(REPO / "tools" / "install_offline.sh"), "--wheelhouse", args.wheelhouse,
                              "--python", args.python])
    ok = r["rc"] == 0 and not r["timed_out"]
    compile_s = next((int(m.group(1)) for line in phase.last_lines
                      if (m := re.search(r"MinkowskiEngine ready in (\d+) s", line))), None)
    phase.summary["compile_s"] = compile_s
    # A wheel compiled beforehand (make wheelhouse-minkowski) is used when its key matches.
    prebuilt = any("using the prebuilt wheel" in line for line in phase.last_lines)
    compiled = any("compiling MinkowskiEngine" in line for line in phase.last_lines)
    phase.summary["minkowski"] = "compiled" if compiled else "prebuilt" if prebuilt else "cached"
    usable, what = _cuda_status(_python()) if ok else (False, "install failed")
    phase.summary["cuda"] = what
    how = phase.summary["minkowski"]
    return phase.finish(ok, f"MinkowskiEngine ({how}) ready in {compile_s} s; {what}" if ok else "offline install failed")


def phase_test(args: argparse.Namespace) -> int:
    phase = Phase("test", args.limit, args.log_dir)
    python = _python()
    usable, what = _cuda_status(python)
    phase.summary["cuda"] = what
    if not usable:
        phase.say(f"gpu-check test: {what}: the CUDA tests are collected and every one is skipped")
    # -m cuda: the CUDA variants of the device-parametrised tests and the CUDA-only tests.
    # pytest-timeout's thread method ends a hung test with its stack; -v names each test
    # as it starts, so a crash is attributed to the test that was running.
    paths = list(FIRST_TESTS) if args.first_only else test_paths()
    if args.first_only:
        phase.say(f"gpu-check test: --first-only: the CUDA tests of {', '.join(FIRST_TESTS)} (the rest passed on the "
                  "last full run)")
    # --durations: the slowest tests' times, to size the next loan's phase limits.
    # --failures-at-once (tests/conftest.py): a failure's traceback right after its outcome,
    # since a phase limit can end pytest before its summary (the sixth run lost all of them).
    cmd = [python, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-m", "cuda", "-o", "addopts=-ra",
           "--tb=short", "--failures-at-once", "--durations", "10", "--timeout", str(args.test_timeout),
           "--timeout-method", "thread", *paths]
    r, crashes = run_pytest(phase, cmd)
    counts = phase.summary["pytest"]
    if not usable:
        ok = r["rc"] == 0 and "passed" not in counts
        return phase.finish(ok, f"SKIPPED, nothing GPU-side verified ({what}); pytest: {counts}")
    ok = r["rc"] == 0 and not r["timed_out"] and not crashes
    return phase.finish(ok, f"{what}; pytest: {counts}")


# Test files (or tests) whose CUDA tests have not yet all passed on a GPU run first, so a
# phase limit costs the tests already proven there (CUDA graphs; the GPU pre-training runs,
# with and without graphs; every tile config and loop form of the Triton gather-GEMM and
# every config of the fused depthwise backward; the layer norm and column-sum kernels;
# tables built without PyTorch-visible synchronisations); --first-only runs these alone. (Where a
# whole file follows that holds one of these tests, pytest runs it once, in the file's order.)
FIRST_TESTS = ("tests/test_ops.py::test_cuda_tables_make_no_synchronisation_that_pytorch_sees",
               "tests/test_mask_sites.py::test_cuda_mask_tables_make_no_synchronisation_that_pytorch_sees",
               "tests/test_ops_triton.py::test_cuda_every_gemm_config_equals_the_gathered_product",
               "tests/test_ops_triton.py::test_cuda_depthwise_forward_every_config_equals_float64",
               "tests/test_ops_triton.py::test_cuda_fused_depthwise_backward_equals_float64",
               "tests/test_ops_triton_layer_norm.py::test_cuda_layer_norm_equals_float64",
               "tests/test_ops_triton_column_sums.py::test_cuda_column_sums_and_layer_scale_equal_float64",
               "tests/test_cuda_graphs.py", "tests/test_gpu.py")


def test_paths() -> list[str]:
    """Every test file, :data:`FIRST_TESTS` first, the rest in pytest's (alphabetical) order."""
    rest = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py"))
    return [*FIRST_TESTS, *(p for p in rest if p not in FIRST_TESTS)]


# A crashed test run is resumed at most this often, and only with this much time left.
MAX_RESUMES = 3
RESUME_MIN_S = 30


def run_pytest(phase: Phase, cmd: list[str]) -> tuple[dict, list[str]]:
    """Run pytest ``cmd``; when it crashes (a signal in a CUDA kernel or extension kills the
    process, and every test after it would go unrun), run it again without the tests that
    already ran, up to :data:`MAX_RESUMES` times. Returns the last run's result and the
    tests that crashed; ``phase.summary["pytest"]`` gets the outcomes of all runs."""
    deselected: list[str] = []
    crashes: list[str] = []
    earlier: list[str] = []  # the outcomes of the crashed runs
    while True:
        r = phase.run("pytest", cmd + [f"--deselect={t}" for t in deselected], started=_STARTED_TEST,
                      env={"OMP_WAIT_POLICY": "PASSIVE"})
        counts = next((m.group(1) for line in reversed(r["tail"]) if (m := _SUMMARY.search(line))), "no summary")
        crashed = r.get("crashed_in")
        if crashed is None:
            break
        crashes.append(crashed)
        started = [m.group(1) for line in phase.last_lines if (m := _STARTED_TEST.search(line))]
        ran = [t for t in dict.fromkeys(started) if t not in deselected]
        outcomes = [o for line in phase.last_lines if (o := _OUTCOME.search(line))]
        earlier.append(f"run {len(crashes)} crashed in {crashed} after {sum(o.group(1) == 'PASSED' for o in outcomes)} "
                       f"passed, {sum(o.group(1) == 'FAILED' for o in outcomes)} failed")
        deselected += ran if crashed in ran else [*ran, crashed]
        left = phase.deadline - time.monotonic()
        if len(crashes) > MAX_RESUMES or left < RESUME_MIN_S:
            earlier.append(f"not resumed ({MAX_RESUMES} resumes done or under {RESUME_MIN_S} s left): "
                           "the tests after the crash did not run")
            break
        phase.say(f"gpu-check {phase.name}: resuming pytest without the {len(deselected)} tests that ran "
                  f"(the crashed one included)")
    last_run = [] if crashed is not None else [f"run {len(crashes) + 1}: {counts}" if earlier else counts]
    phase.summary["pytest"] = "; ".join([*earlier, *last_run])
    phase.summary["crashed_tests"] = crashes
    return r, crashes


BUNDLE = "gpu-check-bench-results.tar.gz"
# The bench phase's GPU steps, most telling first in the default order.
BENCH_STEPS = ("suite", "encoder-profile", "refill", "gemm-configs", "depthwise-backward", "per-layer", "step-profile")


def bundle_results(out: Path) -> Optional[Path]:
    """Pack the bench's result folder into ``$OUT/gpu-check-bench-results.tar.gz``, paths
    relative to the repository (``tar xzf`` in a checkout puts them back), and return it.

    A lent node's working tree is not copied back, and ``$OUT`` takes a limited number of
    files and folders only a few levels deep, so one archive is what survives the node."""
    if not os.environ.get("OUT") or not out.is_dir():
        return None
    target = Path(os.environ["OUT"]) / BUNDLE
    partial = target.with_name(target.name + ".part")
    with tarfile.open(partial, "w:gz") as tar:
        tar.add(out, arcname=str(out.relative_to(REPO)))
    partial.replace(target)  # a limit that ends the phase mid-write leaves the last whole archive
    return target


def phase_bench(args: argparse.Namespace) -> int:
    phase = Phase("bench", args.limit, args.log_dir)
    python = _python()
    usable, what = _cuda_status(python)
    phase.summary["cuda"] = what
    data_json = phase.log_dir / "data_throughput.json"
    if args.no_data:
        data_json.unlink(missing_ok=True)  # not an earlier run's figure
        data = {"rc": 0}
        phase.say("gpu-check bench: data pipeline not measured (--no-data)")
    else:
        data = phase.run("data pipeline", [python, "-m", "kernels_bench.data_throughput", "--seconds", "20",
                                           "--out", str(data_json)])
    if not usable:
        data_note = "data pipeline not measured (--no-data)" if args.no_data else "data pipeline measured on this machine's cores"
        return phase.finish(data["rc"] == 0, f"GPU benchmarks SKIPPED ({what}); {data_note}")
    gpu = subprocess.run([python, "-c", "import torch; print(torch.cuda.get_device_name(0))"],
                         capture_output=True, text=True).stdout.strip()
    out = REPO / "kernels_bench" / "results" / ("gpu-" + re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-"))
    bf16_impls = [c for c in args.conv_impl if c != "minkowski"] or ["torch"]

    def suite() -> list[dict]:
        """Sparse vs masked-dense vs dense, encoder and step, every backend, fp32 and bf16."""
        bench = phase.run("kernels_bench", [
            python, "-m", "kernels_bench", "--device", "cuda", "--models", *args.models, "--masks", "0.6",
            "--conv-impl", *args.conv_impl, "--parts", "encoder_fwd_bwd", "step",
            "--no-sweeps", "--repeats", str(args.repeats), "--skip", "breakdown", "kernels", "--grad-checkpointing",
            "--checkpoint-stages", "2", "3",  # ResNet-50's encoder: time and memory both <= 0.5x of (b)?
            "--dense-stem",  # and without full-resolution coordinates and tables?
            "--cuda-graphs",  # and with the host out of the encoder's loop (also with stages 1-2, 1-3 recomputed)?
            "--out", str(out),
        ], started=_STARTED_CASE)
        if data["rc"] == 0 and data_json.exists() and out.is_dir():
            shutil.copy(data_json, out / "data_throughput.json")
        return [bench]

    def encoder_profile() -> list[dict]:
        """The bf16 encoder alone: device time against wall time says whether the GPU or the
        host sets its pace; the timeline of one ConvNeXt-T step with the default CUDA backend
        (Triton) shows where the GPU waits and what each operator's kernels took, read into
        the log."""
        traced = "convnext_tiny" in args.models and "triton" in bf16_impls  # else --trace would name no case
        traces = out / "profile-encoder"
        before = {t: t.stat().st_mtime_ns for t in traces.glob("*.trace.json.gz")}  # earlier runs' (committed)
        steps = [phase.run("encoder profile", [
            python, "-m", "kernels_bench.profile", "--device", "cuda", "--models", *args.models, "--batch", "128",
            "--amp", "bf16", "--conv-impl", *bf16_impls, "--part", "encoder_fwd_bwd", "--out", str(out / "profile-encoder"),
            *(["--trace", "convnext_tiny-sparse-triton-encoder"] if traced else []),
        ], started=_STARTED_CASE)]
        fresh = [t for t in sorted(traces.glob("*.trace.json.gz")) if before.get(t) != t.stat().st_mtime_ns]
        for trace in fresh:  # this run's only: where the GPU waits, and its time per (operator, kernel)
            phase.run(f"timeline {trace.name}", [python, "-m", "kernels_bench.timeline", str(trace)])
            phase.run(f"attribute {trace.name}", [python, "-m", "kernels_bench.attribute", str(trace)])
        return steps

    def refill() -> list[dict]:
        """The tables a CUDA graph's replay refills per batch, built through MinkowskiEngine's
        maps (as before 2026-11-27) and from the patch mask (now), side by side at batch 128,
        both stems: the host's share of a graphed encoder step in front of its replay."""
        return [phase.run(f"refill{' (dense stem)' if dense else ''}", [
            python, "-m", "kernels_bench.refill", "--device", "cuda", "--models", *args.models, "--batch", "128",
            "--rounds", "10", *(["--dense-stem"] if dense else []),
            "--out", str(out / "refill" / f"refill{'-dense-stem' if dense else ''}.json"),
        ]) for dense in (False, True)]

    def per_layer() -> list[dict]:
        """Each layer kind per backend, fp32 and bf16, against (b) and (c) at the training
        density and at full density (kernels.json beside results.json; the report shows both)."""
        return [phase.run("per-layer", [
            python, "-m", "kernels_bench.kernels", "--device", "cuda", "--batch", "128", "--conv-impl", *args.conv_impl,
            "--dtype", "float32", "bfloat16", "--densities", "0.4", "1.0", "--repeats", str(args.repeats),
            "--out", str(out),
        ], started=_STARTED_CASE)]

    def gemm_configs() -> list[dict]:
        """Every tile config and loop form of the Triton gather-GEMM on the encoders' conv
        shapes, bf16, against each other (what the autotuner chooses between)."""
        if "triton" not in bf16_impls:
            phase.say("gpu-check bench: gemm-configs skipped (triton is not among --conv-impl)")
            return []
        return [phase.run("gemm configs", [python, "-m", "kernels_bench.gemm_configs", "--device", "cuda",
                                           "--batch", "128", "--dtype", "bfloat16", "--out", str(out / "gemm-configs")])]

    def depthwise_backward() -> list[dict]:
        """ConvNeXt-T's depthwise convs, bf16: the forward (autotuned, and each config), and
        the one-pass backward (likewise) against the two kernels it replaced, per stage and
        per encoder step."""
        if "triton" not in bf16_impls:
            phase.say("gpu-check bench: depthwise-backward skipped (triton is not among --conv-impl)")
            return []
        return [phase.run("depthwise backward", [
            python, "-m", "kernels_bench.depthwise_backward", "--device", "cuda", "--batch", "128",
            "--dtype", "bfloat16", "--out", str(out / "depthwise-backward")])]

    def step_profile() -> list[dict]:
        """Where a bf16 step's GPU time goes, per backend and for the emulation
        (MinkowskiEngine's kernels are fp32-only). What a step keeps for backward
        (kernels_bench.saved_memory) counts the same on any device: the CPU machine measures it."""
        return [phase.run("profile", [
            python, "-m", "kernels_bench.profile", "--device", "cuda", "--models", *args.models, "--batch", "128",
            "--amp", "bf16", "--conv-impl", *bf16_impls, "--out", str(out / "profile"),
        ], started=_STARTED_CASE)]

    plan = {"suite": suite, "encoder-profile": encoder_profile, "refill": refill, "gemm-configs": gemm_configs,
            "depthwise-backward": depthwise_backward, "per-layer": per_layer, "step-profile": step_profile}
    phase.say(f"gpu-check bench: steps, in order: {', '.join(args.only)} (a phase limit cuts from the end)")
    ran: list[dict] = []
    for name in args.only:
        ran += plan[name]()
        bundle_results(out)  # after every step: a limit that ends the phase keeps what was measured
    report = phase.run("report", [python, "-m", "kernels_bench", "report"])
    ok = all(step["rc"] == 0 and not step["timed_out"] for step in (*ran, report))
    if ok and data_json.exists() and (out / "results.json").exists():
        phase.say(f"gpu-check bench: {data_vs_step(json.loads(data_json.read_text()), out / 'results.json')}")
    bundled = f" (and {BUNDLE} in $OUT)" if bundle_results(out) else ""
    return phase.finish(ok, f"{what}; results in {out.relative_to(REPO)}{bundled}")


def data_vs_step(data: dict, results_json: Path) -> str:
    """Whether the data pipeline keeps up with the fastest measured training step."""
    rows = [r for r in json.loads(results_json.read_text())["rows"] if r.get("part") == "step" and "images_per_s" in r]
    if not rows:
        return "no step rows to compare the data pipeline with"
    fastest = max(rows, key=lambda r: r["images_per_s"])
    need, have = fastest["images_per_s"], data["images_per_s"]
    name = f"{fastest['model']} {fastest['variant']}{' ' + fastest['amp'] if fastest.get('amp') else ''}"
    if have >= need:
        return f"the data pipeline ({have:.0f} img/s on {data['workers']} workers) keeps up with the fastest step ({name}, {need:.0f} img/s)"
    return (f"the data pipeline ({have:.0f} img/s on {data['workers']} workers) is {need / have:.1f}x slower than the "
            f"fastest step ({name}, {need:.0f} img/s): the GPU would wait for data. More loader cores, JPEGs stored "
            "pre-resized to about 256 px, or decoding on the GPU (torchvision.io.decode_jpeg on CUDA) would close it")


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="tools/gpu_check.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("phase", choices=("build", "test", "bench"))
    p.add_argument("--limit", type=float, default=540, help="seconds the whole phase may take (default 540)")
    p.add_argument("--log-dir", type=Path, default=LOG_DIR, help="where <phase>.log and <phase>.json go")
    p.add_argument("--wheelhouse", default=None, help="build: the folder made by make wheelhouse")
    p.add_argument("--python", default="python3", help="build: the Python that holds the machine's torch")
    p.add_argument("--test-timeout", type=int, default=240, help="test: seconds one test may take")
    p.add_argument("--first-only", action="store_true",
                   help="test: only the CUDA tests of the files not yet proven on a GPU (FIRST_TESTS), for a short loan")
    p.add_argument("--models", nargs="+", default=["resnet50", "convnext_tiny"], help="bench: encoders")
    p.add_argument("--conv-impl", nargs="+", default=["torch", "triton", "minkowski"],
                   choices=("auto", "torch", "triton", "minkowski"), help="bench: sparse backends, one row set each")
    p.add_argument("--repeats", type=int, default=5, help="bench: timed runs per case (median reported)")
    p.add_argument("--only", nargs="+", default=list(BENCH_STEPS), choices=BENCH_STEPS, metavar="STEP",
                   help=f"bench: the GPU steps to run, in this order (default: {' '.join(BENCH_STEPS)}); "
                        "the report is regenerated after them")
    p.add_argument("--no-data", action="store_true",
                   help="bench: leave out the data pipeline's images/s (CPU-side, about 30 s; measured once per node is enough)")
    args = p.parse_args(argv)
    return {"build": phase_build, "test": phase_test, "bench": phase_bench}[args.phase](args)


if __name__ == "__main__":
    sys.exit(main())
