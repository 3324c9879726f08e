"""kernels_bench.profile: per-step totals from profiler events, cases, files, report."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from conftest import NEEDS_CUDA
from kernels_bench.measure import Case
from kernels_bench import profile
from kernels_bench.profile import main, plan, profile_case, summarise
from kernels_bench.report import profile_lines

CPU, CUDA = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA


def _event(key: str, count: int, device_type, cpu_us: float = 0.0, device_us: float = 0.0,
           total_cpu_us: float | None = None) -> SimpleNamespace:
    return SimpleNamespace(key=key, count=count, device_type=device_type, self_cpu_time_total=cpu_us,
                           cpu_time_total=cpu_us if total_cpu_us is None else total_cpu_us,
                           self_device_time_total=device_us)


def test_summarise_counts_kernels_launches_and_syncs_per_step():
    events = [
        _event("gemm_kernel", 6, CUDA, device_us=3000.0),
        _event("gather_kernel", 3, CUDA, device_us=1000.0),
        _event("Memcpy DtoH (Device -> Pageable)", 3, CUDA, device_us=200.0),
        _event("cudaLaunchKernel", 6, CPU, cpu_us=60.0),
        _event("cuLaunchKernelEx", 3, CPU, cpu_us=30.0),  # Triton launches through the driver
        _event("cudaStreamSynchronize", 3, CPU, cpu_us=300.0),
        _event("cudaDeviceSynchronize", 1, CPU, cpu_us=10.0),
        _event("cudaMemcpyAsync", 3, CPU, cpu_us=15.0),  # not a synchronisation by itself
        _event("aten::mm", 9, CPU, cpu_us=585.0),
    ]
    s = summarise(events, steps=3, top=2)
    assert s["device_s"] == pytest.approx(4200e-6 / 3)
    assert s["host_self_s"] == pytest.approx(1000e-6 / 3)
    assert (s["kernels"], s["launches"], s["syncs"]) == (4.0, 3.0, pytest.approx(4 / 3))
    assert [k["name"] for k in s["top_kernels"]] == ["gemm_kernel", "gather_kernel"]
    assert s["top_kernels"][0]["calls"] == 2.0 and s["top_kernels"][0]["share"] == pytest.approx(3000 / 4200)
    assert [o["name"] for o in s["top_ops"]] == ["aten::mm", "cudaStreamSynchronize"]
    assert s["top_ops"][0]["share"] == pytest.approx(0.585)


def _annotation(key: str, count: int, device_us: float) -> SimpleNamespace:
    """A range's span on the device, as the profiler flags it."""
    return SimpleNamespace(**vars(_event(key, count, CUDA, device_us=device_us)), is_user_annotation=True)


def test_summarise_times_spark_me_ranges_and_leaves_their_device_spans_out_of_the_kernels():
    events = [
        _event("gemm_kernel", 6, CUDA, device_us=3000.0),
        _event("spark_me::neighbour_tables", 3, CPU, cpu_us=900.0, total_cpu_us=6000.0),
        _annotation("spark_me::neighbour_tables", 3, 2500.0),  # the range's span on the device
        _event("Optimizer.step#AdamW.step", 3, CPU, cpu_us=30.0, total_cpu_us=600.0),
        _annotation("Optimizer.step#AdamW.step", 3, 800.0),
        _event("fused_kernel", 3, CPU, cpu_us=30.0),  # a host event named like its kernel: the kernel counts
        _event("fused_kernel", 3, CUDA, device_us=600.0),
        _event("aten::mm", 6, CPU, cpu_us=300.0),
    ]
    s = summarise(events, steps=3)
    assert s["device_s"] == pytest.approx(3600e-6 / 3) and s["kernels"] == 3.0
    assert [k["name"] for k in s["top_kernels"]] == ["gemm_kernel", "fused_kernel"]
    assert s["ranges"] == {"spark_me::neighbour_tables": pytest.approx(2e-3)}  # children included
    line = profile.describe({"name": "x", "wall_s": 0.01, "device_s": None, "top_kernels": [], "top_ops": [],
                             "ranges": s["ranges"]})
    assert line == "x: 10.0 ms/step; host in neighbour_tables 2.0 ms"
    slower_after = profile.describe({"name": "x", "wall_s": 0.01, "wall_after_profile_s": 0.0125, "device_s": None,
                                     "top_kernels": [], "top_ops": []})
    assert slower_after == "x: 10.0 ms/step (12.5 ms timed again after profiling)"
    alike = profile.describe({"name": "x", "wall_s": 0.01, "wall_after_profile_s": 0.0105, "device_s": None,
                              "top_kernels": [], "top_ops": []})
    assert alike == "x: 10.0 ms/step"  # within 10%: not worth a word


def test_a_cpu_encoder_profile_times_the_gather_and_the_tables():
    summary, _ = profile_case(_tiny(part="encoder_fwd_bwd"), steps=1)
    assert set(summary["ranges"]) == {"spark_me::to_sparse", "spark_me::neighbour_tables"}
    assert all(0 < v < summary["profiled_wall_s"] for v in summary["ranges"].values())


def test_summarise_without_device_events_reports_no_device_time():
    s = summarise([_event("aten::add", 4, CPU, cpu_us=40.0)], steps=2)
    assert s["device_s"] is None and s["top_kernels"] == [] and s["kernels"] == 0
    assert s["top_ops"] == [{"name": "aten::add", "calls": 2.0, "self_cpu_s": 20e-6, "share": 1.0}]


def _tiny(**kw) -> Case:
    base = dict(model="resnet18", variant="sparse", part="step", batch=2, size=64, mask_ratio=0.6, warmup=1,
                repeats=1, decoder_width=32)
    return Case(**{**base, **kw})


def test_a_cpu_step_profile_names_its_operators():
    summary, table = profile_case(_tiny(), steps=1)
    assert summary["wall_s"] > 0 and summary["profiled_wall_s"] > 0 and summary["busy"] is None
    assert summary["wall_after_profile_s"] > 0
    assert summary["device_s"] is None and summary["kernels"] == 0
    names = [o["name"] for o in summary["top_ops"]]
    assert any(n.startswith("aten::") for n in names)
    assert 0 < sum(o["share"] for o in summary["top_ops"]) <= 1 + 1e-9
    assert "Self CPU" in table


def test_plan_puts_the_baseline_after_each_models_backends_and_the_graphs_last():
    cases = plan(["resnet18", "convnext_atto"], ["torch", "triton"], "cuda", 8, 64, 0.6, "bf16", "step", 1, 1, 32)
    assert [(c.model, c.variant, c.conv_impl, c.dense_stem, c.cuda_graphs) for c in cases] == [
        ("resnet18", "sparse", "torch", False, False), ("resnet18", "sparse", "triton", False, False),
        ("resnet18", "sparse", "torch", True, False), ("resnet18", "masked_dense", "auto", False, False),
        ("convnext_atto", "sparse", "torch", False, False), ("convnext_atto", "sparse", "triton", False, False),
        ("convnext_atto", "sparse", "torch", True, False), ("convnext_atto", "masked_dense", "auto", False, False),
        ("resnet18", "sparse", "torch", False, True), ("resnet18", "sparse", "torch", True, True),
        ("convnext_atto", "sparse", "torch", False, True), ("convnext_atto", "sparse", "torch", True, True)]
    assert all(c.amp == "bf16" for c in cases) and [c.channels_last for c in cases] == ([False] * 3 + [True]) * 2 + [False] * 4
    assert not any(c.reuse_batch for c in cases)  # a step always gathers its batch
    assert profile.case_name(cases[2]) == "resnet18-sparse-torch-dense_stem-step-bf16"
    assert profile.case_name(cases[8]) == "resnet18-sparse-torch-cuda_graphs-step-bf16"
    assert profile.case_name(cases[9]) == "resnet18-sparse-torch-dense_stem-cuda_graphs-step-bf16"
    on_cpu = plan(["resnet18"], ["torch"], "cpu", 2, 64, 0.6, None, "step", 1, 1, 32)
    assert not any(c.cuda_graphs for c in on_cpu)  # graphs are CUDA's


def test_an_encoder_plan_adds_the_first_backend_on_a_reused_batch():
    cases = plan(["resnet18"], ["torch", "triton"], "cuda", 8, 64, 0.6, "bf16", "encoder_fwd_bwd", 1, 1, 32)
    assert [(c.variant, c.conv_impl, c.reuse_batch) for c in cases] == [
        ("sparse", "torch", False), ("sparse", "triton", False), ("sparse", "torch", False), ("sparse", "torch", True),
        ("masked_dense", "auto", False), ("sparse", "torch", False), ("sparse", "torch", False)]
    assert cases[2].dense_stem and cases[5].cuda_graphs and cases[6].cuda_graphs and cases[6].dense_stem
    assert profile.case_name(cases[3]) == "resnet18-sparse-torch-reused_batch-encoder_fwd_bwd-bf16"


def test_a_reused_batch_builds_no_tables_after_its_first_run():
    """The reused-batch row times the encoder alone: its first run gathers and builds the
    tables, the later ones neither gather nor build any (the profile's ranges say so)."""
    summary, _ = profile_case(_tiny(part="encoder_fwd_bwd", reuse_batch=True), steps=2)
    assert summary["ranges"] == {}
    (row,) = [line for line in profile_lines({"cases": [{"name": "reused", **summary}]}) if line.startswith("| reused")]
    assert row.split(" | ")[7] == "0.0 / 0.0"  # none of a step's time in the gather or the tables
    fresh, _ = profile_case(_tiny(part="encoder_fwd_bwd"), steps=2)
    assert set(fresh["ranges"]) == {"spark_me::to_sparse", "spark_me::neighbour_tables"}


def test_a_dense_stem_case_still_gathers_and_builds_tables():
    """The dense stem gathers at the stem's stride and the later layers build their tables:
    both ranges are timed (the gather range holds the gathering, not the dense conv)."""
    dense, _ = profile_case(_tiny(part="encoder_fwd", dense_stem=True), steps=2)
    assert set(dense["ranges"]) == {"spark_me::to_sparse", "spark_me::neighbour_tables"}
    with pytest.raises(ValueError, match="dense_stem rows are sparse rows that gather each batch"):
        _tiny(part="encoder_fwd", dense_stem=True, reuse_batch=True).validate()


def test_cli_records_a_failing_case_goes_on_and_the_report_shows_both(tmp_path, monkeypatch):
    real = profile.profile_case

    def failing_triton(case: Case, steps: int, **kw):  # whether Triton runs on CPU depends on the process
        if case.conv_impl == "triton":
            raise RuntimeError("an illegal instruction, say")
        return real(case, steps, **kw)

    monkeypatch.setattr(profile, "profile_case", failing_triton)
    argv = ["--device", "cpu", "--models", "resnet18", "--conv-impl", "torch", "triton", "--batch", "2",
            "--size", "64", "--decoder-width", "32", "--warmup", "1", "--repeats", "1", "--steps", "1",
            "--out", str(tmp_path)]
    assert main(argv) == 1
    cases = json.loads((tmp_path / "profile.json").read_text())["cases"]
    assert [c["name"] for c in cases] == [
        "resnet18-sparse-torch-step-fp32", "resnet18-sparse-triton-step-fp32", "resnet18-sparse-torch-dense_stem-step-fp32",
        "resnet18-masked_dense-nchw-step-fp32"]
    assert cases[1]["error"] == "RuntimeError: an illegal instruction, say"
    assert not any("error" in c for c in cases[:1] + cases[2:])
    assert sorted(p.name for p in tmp_path.glob("*.txt")) == [
        "resnet18-masked_dense-nchw-step-fp32.txt", "resnet18-sparse-torch-dense_stem-step-fp32.txt",
        "resnet18-sparse-torch-step-fp32.txt"]
    lines = profile_lines({"cases": cases})
    rows = [line for line in lines if line.startswith("| resnet18")]
    assert len(rows) == 4 and "failed: RuntimeError: an illegal instruction, say" in rows[1]
    assert rows[0].split(" | ")[2] == f"{cases[0]['wall_s'] * 1e3:.1f}"


def test_a_traced_case_leaves_the_timeline_of_one_step(tmp_path):
    import gzip

    argv = ["--device", "cpu", "--models", "resnet18", "--conv-impl", "torch", "--part", "encoder_fwd_bwd",
            "--batch", "2", "--size", "64", "--warmup", "1", "--repeats", "1", "--steps", "1",
            "--trace", "sparse-torch-encoder", "--out", str(tmp_path)]
    assert main(argv) == 0
    traces = sorted(p.name for p in tmp_path.glob("*.trace.json.gz"))
    assert traces == ["resnet18-sparse-torch-encoder_fwd_bwd-fp32.trace.json.gz"]  # not the reused or dense cases
    events = json.loads(gzip.decompress((tmp_path / traces[0]).read_bytes()))["traceEvents"]
    names = [e.get("name", "") for e in events]
    assert names.count("spark_me::to_sparse") == 1 and "spark_me::neighbour_tables" in names  # one step
    assert not list(tmp_path.glob("*.trace.json"))  # only the gzipped file is left


@pytest.mark.parametrize("args,message", [
    (["--amp", "bf16"], "--amp is for CUDA"),
    (["--models", "resnet999"], "unknown encoder(s) 'resnet999'; registered: "),
    (["--size", "100"], "size 100 is not a multiple of 32"),
    (["--batch", "0"], "batch must be at least 1, got 0"),
    (["--steps", "0"], "--steps and --repeats must be at least 1"),
    (["--trace", "vit_"], "--trace vit_ names no case; the cases are: resnet50-sparse-torch-step-fp32"),
])
def test_bad_arguments_are_refused_before_anything_runs(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        main(["--device", "cpu", "--out", str(tmp_path / "out"), *args])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("conv_impl", [pytest.param(c, marks=NEEDS_CUDA) for c in ("torch", "triton")])
def test_a_cuda_step_profile_sees_kernels_launches_and_device_time(conv_impl):
    summary, _ = profile_case(_tiny(device="cuda", conv_impl=conv_impl, amp="bf16"), steps=2)
    assert summary["device_s"] > 0 and 0 < summary["busy"]
    assert summary["kernels"] > 0 and summary["launches"] > 0 and summary["top_kernels"]
    assert summary["syncs"] >= 0


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=NEEDS_CUDA)])
def test_a_cuda_encoder_profile_times_its_ranges_and_counts_no_annotation_as_a_kernel(device):
    fresh, _ = profile_case(_tiny(device=device, part="encoder_fwd_bwd", amp="bf16"), steps=2)
    assert set(fresh["ranges"]) == {"spark_me::to_sparse", "spark_me::neighbour_tables"}
    assert all(0 < v < fresh["profiled_wall_s"] for v in fresh["ranges"].values())
    assert not any(k["name"].startswith(("spark_me::", "Optimizer.")) for k in fresh["top_kernels"])
    reused, _ = profile_case(_tiny(device=device, part="encoder_fwd_bwd", amp="bf16", reuse_batch=True), steps=2)
    assert reused["ranges"] == {} and reused["device_s"] > 0


def test_a_case_that_loses_the_cuda_context_ends_the_profile_with_the_rest_recorded(tmp_path, monkeypatch):
    """After a sticky CUDA error nothing more can run in the process: the cases after it are
    recorded as not run, in profile.json, instead of each failing the same way."""
    def lost(case, steps, trace=None):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(profile, "profile_case", lost)
    monkeypatch.setattr(profile, "cuda_context_lost", lambda device: True)
    cases = plan(["resnet18"], ["torch"], "cpu", 2, 64, 0.6, None, "encoder_fwd_bwd", 0, 1, 32)
    results = profile.run(cases, tmp_path, steps=1)
    assert len(results) == len(cases) > 2
    assert "illegal memory access" in results[0]["error"]
    assert all(r["error"] == "not run: case 1 lost the CUDA context" for r in results[1:])
    saved = json.loads((tmp_path / "profile.json").read_text())["cases"]
    assert [r["name"] for r in saved] == [profile.case_name(c) for c in cases]
