"""make gpu-check's runner (tools/gpu_check.py): time limits, crash and hang attribution,
and the phases' behaviour on a machine without a GPU."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gpu_check", REPO / "tools" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_check)


def _script(body: str) -> list[str]:
    return [sys.executable, "-c", body]


def test_a_crash_is_attributed_to_the_test_that_was_running(tmp_path):
    phase = gpu_check.Phase("t", limit_s=60, log_dir=tmp_path)
    # pytest -v writes a test's id (no newline yet) before running it.
    body = ("import os, signal, sys\n"
            "print('tests/test_a.py::test_ok[cuda] PASSED', flush=True)\n"
            "sys.stdout.write('tests/test_a.py::test_conv[cuda] '); sys.stdout.flush()\n"
            "os.kill(os.getpid(), signal.SIGILL)\n")
    result = phase.run("fake pytest", _script(body), started=gpu_check._STARTED_TEST)
    assert result["crashed_in"] == "tests/test_a.py::test_conv[cuda]"
    assert "CRASH" in (tmp_path / "t.log").read_text() and "SIGILL" in (tmp_path / "t.log").read_text()


def test_a_crashed_test_run_resumes_without_the_tests_that_ran(tmp_path, monkeypatch):
    """A crash no longer costs every test after it: pytest runs again with the tests that
    ran (the crashed one included) deselected, and the phase reports both runs."""
    phase = gpu_check.Phase("t", limit_s=60, log_dir=tmp_path)
    body = ("import os, signal, sys\n"
            "skip = {a.split('=', 1)[1] for a in sys.argv[1:] if a.startswith('--deselect=')}\n"
            "ids = ['tests/test_a.py::test_ok[cuda]', 'tests/test_a.py::test_conv[cuda]', 'tests/test_b.py::test_c']\n"
            "for t in ids:\n"
            "    if t in skip: continue\n"
            "    sys.stdout.write(t + ' '); sys.stdout.flush()\n"
            "    if t.endswith('test_conv[cuda]'): os.kill(os.getpid(), signal.SIGSEGV)\n"
            "    print('PASSED', flush=True)\n"
            "print('==== %d passed in 0.1s ====' % (len(ids) - len(skip)), flush=True)\n")
    result, crashes = gpu_check.run_pytest(phase, _script(body))
    assert crashes == ["tests/test_a.py::test_conv[cuda]"]
    assert result["rc"] == 0  # the resumed run
    assert phase.summary["pytest"] == ("run 1 crashed in tests/test_a.py::test_conv[cuda] after 1 passed, 0 failed; "
                                       "run 2: 1 passed")
    log = (tmp_path / "t.log").read_text()
    assert "resuming pytest without the 2 tests that ran" in log
    # with no resumes left, the summary says the rest did not run (not a run that never happened)
    monkeypatch.setattr(gpu_check, "MAX_RESUMES", 0)
    phase = gpu_check.Phase("u", limit_s=60, log_dir=tmp_path)
    result, crashes = gpu_check.run_pytest(phase, _script(body))
    assert result["crashed_in"] == crashes[0] and len(crashes) == 1
    assert phase.summary["pytest"].endswith("not resumed (0 resumes done or under 30 s left): the tests after the "
                                            "crash did not run")
    assert "--deselect=tests/test_a.py::test_ok[cuda] --deselect=tests/test_a.py::test_conv[cuda]" in log


def test_a_hang_is_stopped_at_the_phase_limit_and_named(tmp_path):
    phase = gpu_check.Phase("t", limit_s=3, log_dir=tmp_path)
    body = ("import time\n"
            "print('[3/8] running resnet50 sparse step b128 224px mask 0.60', flush=True)\n"
            "time.sleep(60)\n")
    result = phase.run("fake bench", _script(body), started=gpu_check._STARTED_CASE)
    assert result["timed_out"] and result["seconds"] < 30
    assert result["hung_in"] == "[3/8] running resnet50 sparse step b128 224px mask 0.60"
    assert phase.finish(False, "x") == 1
    assert json.loads((tmp_path / "t.json").read_text())["steps"][0]["timed_out"] is True


def test_build_phase_without_a_wheelhouse_fails_clearly(tmp_path):
    assert gpu_check.main(["build", "--log-dir", str(tmp_path)]) == 1
    assert "--wheelhouse DIR is required" in (tmp_path / "build.log").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="rehearses the no-GPU path")
def test_test_phase_without_a_gpu_skips_every_cuda_test_and_says_so(tmp_path):
    """The CPU rehearsal of `make gpu-check-test`: the CUDA tests are collected, all skip."""
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "gpu_check.py"), "test", "--limit", "600",
                           "--log-dir", str(tmp_path / "logs")],
                          capture_output=True, text=True, timeout=900, cwd=REPO, env={**os.environ, "OUT": str(tmp_path)})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "SKIPPED, nothing GPU-side verified" in out and "sees no CUDA device" in out
    summary = json.loads((tmp_path / "gpu-check-test.json").read_text())
    assert "skipped" in summary["pytest"] and "passed" not in summary["pytest"], summary["pytest"]
    assert (tmp_path / "gpu-check-test.log").read_text().count("SKIPPED") >= 50


def test_data_pipeline_is_compared_with_the_fastest_step(tmp_path):
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"rows": [
        {"part": "step", "model": "resnet50", "variant": "sparse", "amp": "bf16", "images_per_s": 2000.0},
        {"part": "step", "model": "resnet50", "variant": "dense", "amp": None, "images_per_s": 900.0},
        {"part": "encoder_fwd", "model": "resnet50", "variant": "sparse", "images_per_s": 9000.0},
    ]}))
    slow = gpu_check.data_vs_step({"images_per_s": 800.0, "workers": 16}, results)
    assert "2.5x slower than the fastest step (resnet50 sparse bf16, 2000 img/s)" in slow
    fast = gpu_check.data_vs_step({"images_per_s": 2500.0, "workers": 16}, results)
    assert "keeps up with the fastest step" in fast


@pytest.mark.skipif(torch.cuda.is_available(), reason="rehearses the no-GPU path")
def test_bench_phase_without_data_or_a_gpu_measures_nothing_and_says_so(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "data_throughput.json").write_text('{"images_per_s": 1.0}')  # an earlier run's
    assert gpu_check.main(["bench", "--no-data", "--limit", "120", "--log-dir", str(logs)]) == 0
    log = (logs / "bench.log").read_text()
    assert "data pipeline not measured (--no-data)" in log and "kernels_bench.data_throughput" not in log
    assert "GPU benchmarks SKIPPED" in log
    assert not (logs / "data_throughput.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="rehearses the no-GPU path")
def test_the_test_phase_can_run_the_unproven_files_alone(tmp_path):
    assert gpu_check.main(["test", "--first-only", "--limit", "300", "--log-dir", str(tmp_path)]) == 0
    log = (tmp_path / "test.log").read_text()
    assert f"--first-only: the CUDA tests of {', '.join(gpu_check.FIRST_TESTS)} (" in log
    command = next(line for line in log.splitlines() if "-m pytest" in line)
    assert command.split("thread ", 1)[1].split(" (at most")[0].split() == list(gpu_check.FIRST_TESTS)


def test_failures_at_once_prints_a_traceback_before_the_next_test_runs(tmp_path):
    """make gpu-check's pytest option: a phase limit that ends pytest before its summary
    must not take the failures' tracebacks with it."""
    (tmp_path / "conftest.py").write_text((REPO / "tests" / "conftest.py").read_text())
    (tmp_path / "test_two.py").write_text(
        "def test_fails():\n    assert 1 + 1 == 3, 'the reason it failed'\n\n\ndef test_after():\n    pass\n")
    cmd = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-o", "addopts=", "--tb=short",
           "test_two.py"]
    proc = subprocess.run([*cmd, "--failures-at-once"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    out = proc.stdout
    assert proc.returncode == 1, out + proc.stderr
    assert "---- test_two.py::test_fails failed (call)" in out
    at_once = out.index("---- test_two.py::test_fails failed (call)")
    assert out.index("the reason it failed", at_once) < out.index("---- end of test_two.py::test_fails")
    assert out.index("---- end of test_two.py::test_fails") < out.index("test_two.py::test_after PASSED")
    plain = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=120).stdout
    assert "---- test_two.py::test_fails failed" not in plain  # off unless asked for


def test_the_test_phase_runs_every_test_file_once_the_unproven_ones_first():
    paths = gpu_check.test_paths()
    assert paths[:len(gpu_check.FIRST_TESTS)] == list(gpu_check.FIRST_TESTS)
    on_disk = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py"))
    assert sorted(p for p in paths if "::" not in p) == on_disk  # every file, each once
    for first in gpu_check.FIRST_TESTS:  # a file, or one test of a file (pytest runs it once)
        path, _, name = first.partition("::")
        assert (REPO / path).is_file() and (not name or f"def {name}(" in (REPO / path).read_text()), first


def test_bench_results_come_back_as_one_archive_that_unpacks_in_a_checkout(tmp_path, monkeypatch):
    """$OUT takes few files and shallow folders; the node's working tree does not come back."""
    import tarfile

    repo = tmp_path / "repo"
    results = repo / "kernels_bench" / "results" / "gpu-x"
    (results / "profile" / "deep").mkdir(parents=True)
    (results / "results.json").write_text('{"rows": []}')
    (results / "profile" / "deep" / "trace.txt").write_text("kernels")
    monkeypatch.setattr(gpu_check, "REPO", repo)
    monkeypatch.delenv("OUT", raising=False)
    assert gpu_check.bundle_results(results) is None  # nowhere to put it
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setenv("OUT", str(out))
    assert gpu_check.bundle_results(repo / "missing") is None
    archive = gpu_check.bundle_results(results)
    assert archive == out / gpu_check.BUNDLE and [p.name for p in out.iterdir()] == [gpu_check.BUNDLE]
    checkout = tmp_path / "checkout"
    with tarfile.open(archive) as tar:
        tar.extractall(checkout, filter="data")
    restored = checkout / "kernels_bench" / "results" / "gpu-x"
    assert (restored / "results.json").read_text() == '{"rows": []}'
    assert (restored / "profile" / "deep" / "trace.txt").read_text() == "kernels"


def test_bench_phase_on_a_gpu_runs_its_steps_most_telling_first(tmp_path, monkeypatch):
    """The GPU branch's plan, with every step faked: the suite (no per-layer rows of its
    own), the encoder profile, the Triton GEMM configs (bf16, batch 128), the per-layer bench
    (each backend, fp32 and bf16, at batch 128, into the suite's folder, where the report
    finds kernels.json), the step profile, the report; the results are bundled after each
    measuring step."""
    monkeypatch.setattr(gpu_check, "_cuda_status", lambda python: (True, "fake GPU"))
    monkeypatch.setattr(gpu_check.subprocess, "run",
                        lambda *a, **k: subprocess.CompletedProcess(a, 0, stdout="Fake GPU 80GB\n", stderr=""))
    ran: list[tuple[str, list[str]]] = []

    def run(self, label, cmd, started=None, env=None):
        ran.append((label, cmd))
        if label == "encoder profile":  # it leaves one timeline, which the phase then reads into its log twice
            folder = Path(cmd[cmd.index("--out") + 1])
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "c.trace.json.gz").write_bytes(b"")
        return {"label": label, "rc": 0, "seconds": 0.0, "timed_out": False}

    bundles: list[int] = []
    monkeypatch.setattr(gpu_check, "REPO", tmp_path / "repo")
    monkeypatch.setattr(gpu_check.Phase, "run", run)
    monkeypatch.setattr(gpu_check, "bundle_results", lambda out: bundles.append(len(ran)))
    committed = tmp_path / "repo/kernels_bench/results/gpu-fake-gpu-80gb/profile-encoder/old.trace.json.gz"
    committed.parent.mkdir(parents=True)
    committed.write_bytes(b"")  # an earlier run's trace, in the checkout: not this run's to read
    assert gpu_check.main(["bench", "--no-data", "--limit", "60", "--log-dir", str(tmp_path)]) == 0
    assert [label for label, _ in ran] == ["kernels_bench", "encoder profile", "timeline c.trace.json.gz",
                                           "attribute c.trace.json.gz", "refill", "refill (dense stem)", "gemm configs",
                                           "depthwise backward", "per-layer", "profile", "report"]
    steps = dict(ran)
    suite, layers = " ".join(steps["kernels_bench"]), steps["per-layer"]
    assert "--skip breakdown kernels" in suite
    assert "--part encoder_fwd_bwd" in " ".join(steps["encoder profile"])
    assert " ".join(steps["encoder profile"]).endswith("--trace convnext_tiny-sparse-triton-encoder")
    assert " ".join(layers[1:3]) == "-m kernels_bench.kernels"
    assert " ".join(layers[layers.index("--conv-impl"):]).startswith("--conv-impl torch triton minkowski --dtype float32 bfloat16")
    assert layers[layers.index("--batch") + 1] == "128"
    folder = layers[layers.index("--out") + 1]
    assert folder.endswith("kernels_bench/results/gpu-fake-gpu-80gb") and f"--out {folder}" in suite
    for label, file in (("refill", "refill.json"), ("refill (dense stem)", "refill-dense-stem.json")):
        refill = " ".join(steps[label])
        assert "-m kernels_bench.refill --device cuda --models resnet50 convnext_tiny --batch 128" in refill
        assert refill.endswith(f"--out {folder}/refill/{file}") and ("--dense-stem" in refill) == ("dense" in label)
    gemm = " ".join(steps["gemm configs"])
    assert "-m kernels_bench.gemm_configs --device cuda --batch 128 --dtype bfloat16" in gemm
    assert gemm.endswith(f"--out {folder}/gemm-configs")
    depthwise = " ".join(steps["depthwise backward"])
    assert "-m kernels_bench.depthwise_backward --device cuda --batch 128 --dtype bfloat16" in depthwise
    assert depthwise.endswith(f"--out {folder}/depthwise-backward")
    # after the suite, the encoder profile (and its timeline and attribution), the refills, the GEMM configs,
    # the depthwise backward, the per-layer bench, the profile
    assert bundles[:7] == [1, 4, 6, 7, 8, 9, 10]
    assert steps["attribute c.trace.json.gz"][1:3] == ["-m", "kernels_bench.attribute"]

    ran.clear()
    assert gpu_check.main(["bench", "--no-data", "--only", "per-layer", "encoder-profile", "--limit", "60",
                           "--log-dir", str(tmp_path)]) == 0  # a loan that has the suite already: the rest first
    assert [label for label, _ in ran] == ["per-layer", "encoder profile", "timeline c.trace.json.gz",
                                           "attribute c.trace.json.gz", "report"]
    assert "steps, in order: per-layer, encoder-profile" in (tmp_path / "bench.log").read_text()
    ran.clear()
    assert gpu_check.main(["bench", "--no-data", "--only", "encoder-profile", "--conv-impl", "torch", "--limit", "60",
                           "--log-dir", str(tmp_path)]) == 0
    assert "--trace" not in ran[0][1]  # no Triton case to trace
    ran.clear()
    assert gpu_check.main(["bench", "--no-data", "--only", "gemm-configs", "--conv-impl", "torch", "--limit", "60",
                           "--log-dir", str(tmp_path)]) == 0
    assert [label for label, _ in ran] == ["report"]  # no Triton: nothing to time
    assert "gemm-configs skipped" in (tmp_path / "bench.log").read_text()
    ran.clear()
    assert gpu_check.main(["bench", "--no-data", "--only", "depthwise-backward", "--conv-impl", "torch",
                           "--limit", "60", "--log-dir", str(tmp_path)]) == 0
    assert [label for label, _ in ran] == ["report"]
    assert "depthwise-backward skipped" in (tmp_path / "bench.log").read_text()
    with pytest.raises(SystemExit):
        gpu_check.main(["bench", "--only", "suites"])
