"""The benchmark suite end to end on a tiny plan: cases, sanity, isolation, files, report."""
from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from kernels_bench.measure import Case, run_case
from kernels_bench.report import headline, option_labels, write_report
from kernels_bench.suite import Plan, _run_isolated, run_cases, sanity_check, save_results, environment


def _plan(**kw) -> Plan:
    base = dict(device="cpu", models=["resnet18"], batch=4, size=128, masks=[0.0, 0.6], step_masks=[0.6],
                extra_batches=[], extra_sizes=[], parts=["encoder_fwd_bwd"], warmup=0, repeats=1, threads=1,
                isolate=False, cuda_extras=False, decoder_width=64)
    return Plan(**{**base, **kw})


def test_plan_covers_every_variant_and_sweep():
    cases = _plan(parts=["encoder_fwd", "step"], extra_batches=[2], extra_sizes=[160]).cases()
    keys = {(c.variant, c.part, c.batch, c.size, c.mask_ratio) for c in cases}
    assert ("sparse", "encoder_fwd", 4, 128, 0.0) in keys and ("masked_dense", "encoder_fwd", 4, 128, 0.0) in keys
    assert ("dense", "step", 4, 128, 0.6) in keys and ("sparse", "step", 4, 128, 0.0) not in keys
    assert {("sparse", 2, 128), ("masked_dense", 2, 128), ("dense", 2, 128), ("dense", 4, 160)} <= {
        (c.variant, c.batch, c.size) for c in cases}
    gpu = _plan(device="cuda", cuda_extras=True).cases()
    assert any(c.amp == "bf16" and c.variant == "sparse" for c in gpu)
    assert any(c.channels_last for c in gpu) and not any(c.channels_last and c.variant == "sparse" for c in gpu)
    # the dense baselines in bf16 run channels_last (their fastest); ME's fp32-only kernels get no bf16 row
    assert all(c.channels_last for c in gpu if c.amp == "bf16" and c.variant != "sparse")
    both = _plan(device="cuda", cuda_extras=True, conv_impls=("torch", "minkowski")).cases()
    assert {(c.conv_impl, c.amp) for c in both if c.variant == "sparse"} == {
        ("torch", None), ("torch", "bf16"), ("minkowski", None)}


def test_bad_cases_are_rejected():
    with pytest.raises(ValueError, match="variant 'sparce' is unknown"):
        Case("resnet18", "sparce", "step", 2, 64, 0.6).validate()
    with pytest.raises(ValueError, match="not a multiple of 32"):
        Case("resnet18", "sparse", "step", 2, 100, 0.6).validate()
    with pytest.raises(ValueError, match="CUDA only"):
        Case("resnet18", "dense", "step", 2, 64, 0.6, amp="bf16").validate()


def test_sanity_check_agrees_and_records_errors():
    result = sanity_check("resnet18", 4, 128, "cpu", 64)
    assert result["passed"] and max(result["feature_rel_err"]) < 1e-3 and len(result["feature_rel_err"]) == 4


def test_isolated_case_reports_its_own_memory():
    row = _run_isolated(Case("resnet18", "sparse", "encoder_fwd_bwd", 2, 64, 0.5, warmup=0, repeats=1, threads=1,
                             decoder_width=64))
    assert row["median_s"] > 0 and row["peak_mib"] > 100 and row["peak_growth_mib"] >= 0
    assert row["memory_kind"] == "cpu_peak_rss" and row["visible_fraction"] == 0.5


def test_step_case_runs_every_variant():
    for variant in ("sparse", "masked_dense", "dense"):
        row = run_case(Case("resnet18", variant, "step", 2, 64, 0.5, warmup=0, repeats=1, decoder_width=64))
        assert row["images_per_s"] > 0 and len(row["runs_s"]) == 1


def test_results_files_and_report(tmp_path):
    plan = _plan()
    seen: list[int] = []
    rows = run_cases(plan.cases(), isolate=False, on_row=lambda so_far: seen.append(len(so_far)))
    assert seen == list(range(1, len(rows) + 1))  # saved after every case: a cut-short run keeps its rows
    payload = {"environment": environment(), "plan": {**plan.__dict__, "quick": False},
               "sanity": [sanity_check("resnet18", 4, 128, "cpu", 64)], "rows": rows, "kernels": [], "breakdown": None}
    save_results(tmp_path / "results" / "cpu", payload)
    saved = json.loads((tmp_path / "results" / "cpu" / "results.json").read_text())
    assert saved["environment"]["torch"] and len(saved["rows"]) == 5  # 2 masks x (a, b) + (c)
    with open(tmp_path / "results" / "cpu" / "rows.csv") as f:
        table = list(csv.DictReader(f))
    assert {r["variant"] for r in table} == {"sparse", "masked_dense", "dense"}
    head = [h for h in headline(saved) if h["part"] == "encoder_fwd_bwd"]
    assert len(head) == 1 and head[0]["time_a_over_b"] > 0
    report = write_report(tmp_path / "results", tmp_path / "docs" / "benchmarks.md").read_text()
    assert "| resnet18 | encoder forward+backward | 4 | 128 | auto | fp32 |" in report
    assert "GPU rows are missing" in report and "Where a step's time goes" not in report
    assert (tmp_path / "results" / "cpu" / "plots" / "resnet18_encoder_fwd_bwd.png").stat().st_size > 1000
    # a profile (kernels_bench.profile) in the results folder is shown in that folder's section
    (tmp_path / "results" / "cpu" / "profile").mkdir()
    (tmp_path / "results" / "cpu" / "profile" / "profile.json").write_text(json.dumps({"cases": [
        {"name": "resnet18-sparse-torch-step-fp32", "amp": None, "steps": 3, "wall_s": 0.125, "device_s": None,
         "busy": None, "kernels": 0.0, "syncs": 0.0, "top_kernels": [],
         "top_ops": [{"name": "aten::mm", "share": 0.5}]}]}))
    # and the encoder's profile (tools/gpu_check.py's bench phase), after it
    (tmp_path / "results" / "cpu" / "profile-encoder").mkdir()
    (tmp_path / "results" / "cpu" / "profile-encoder" / "profile.json").write_text(json.dumps({"cases": [
        {"name": "resnet18-sparse-torch-encoder_fwd_bwd-fp32", "part": "encoder_fwd_bwd", "amp": None, "steps": 3,
         "wall_s": 0.05, "device_s": None, "busy": None, "kernels": 0.0, "syncs": 0.0, "top_kernels": [],
         "top_ops": [{"name": "aten::mm", "share": 0.6}],
         "ranges": {"spark_me::to_sparse": 0.002, "spark_me::neighbour_tables": 0.0125}}]}))
    report = write_report(tmp_path / "results", tmp_path / "docs" / "benchmarks.md").read_text()
    assert "Where a step's time goes" in report
    assert "| resnet18-sparse-torch-step-fp32 | fp32 | 125.0 | n/a | n/a | 0 | 0 | n/a | `aten::mm` 50% |" in report
    assert report.index("Where a step's time goes") < report.index("Where the encoder's forward+backward time goes")
    assert ("| resnet18-sparse-torch-encoder_fwd_bwd-fp32 | fp32 | 50.0 | n/a | n/a | 0 | 0 | 2.0 / 12.5 | "
            "`aten::mm` 60% |") in report


def test_user_encoder_case_in_its_own_process():
    example = str(Path(__file__).resolve().parents[1] / "examples" / "custom_encoder.py")
    row = _run_isolated(Case("tiny_convnet", "masked_dense", "encoder_fwd_bwd", 2, 64, 0.5, warmup=0, repeats=1,
                             threads=1, decoder_width=64, imports=(example,)))
    assert row["model"] == "tiny_convnet" and row["median_s"] > 0


def _row(variant: str, part: str, seconds: float, mib: float, amp=None, channels_last=False, conv_impl="auto") -> dict:
    return {"model": "resnet50", "variant": variant, "part": part, "batch": 128, "size": 224, "mask_ratio": 0.6,
            "amp": amp, "channels_last": channels_last, "conv_impl": conv_impl, "median_s": seconds,
            "images_per_s": 128 / seconds, "peak_growth_mib": mib}


def test_headline_pairs_each_backend_with_the_fastest_baseline_of_its_precision():
    from kernels_bench.report import gpu_targets

    rows = [
        _row("sparse", "encoder_fwd_bwd", 0.10, 5000, "bf16", conv_impl="torch"),
        _row("sparse", "encoder_fwd_bwd", 0.16, 5200, conv_impl="minkowski"),
        _row("masked_dense", "encoder_fwd_bwd", 0.14, 7500),
        _row("masked_dense", "encoder_fwd_bwd", 0.13, 7400, channels_last=True),
        _row("masked_dense", "encoder_fwd_bwd", 0.20, 4000, "bf16"),  # slower than channels_last: not the baseline
        _row("masked_dense", "encoder_fwd_bwd", 0.125, 4200, "bf16", channels_last=True),
        _row("sparse", "step", 0.11, 12000, "bf16", conv_impl="torch"),
        _row("masked_dense", "step", 0.285, 22000),
        _row("masked_dense", "step", 0.18, 11000, "bf16", channels_last=True),
    ]
    results = {"plan": {"batch": 128, "size": 224, "device": "cuda"}, "rows": rows}
    head = {(h["part"], h["backend"], h["setting"]): h for h in headline(results)}
    bf16 = head[("encoder_fwd_bwd", "torch", "bf16")]
    assert bf16["b_layout"] == "channels_last" and bf16["time_a_over_b"] == pytest.approx(0.10 / 0.125)
    assert bf16["mem_a_over_b"] == pytest.approx(5000 / 4200)
    fp32 = head[("encoder_fwd_bwd", "minkowski", "fp32")]
    assert fp32["time_a_over_b"] == pytest.approx(0.16 / 0.13)
    met = {t["target"]: (t["value"], t["met"]) for t in gpu_targets(results)}
    assert met["whole step time, a/b (bf16)"] == (pytest.approx(0.11 / 0.18), True)
    assert met["whole step memory, a/b (bf16)"][1] is False
    assert met["whole step images/s vs the official fp32 masked-dense"] == (pytest.approx(0.285 / 0.11), True)
    assert met["encoder forward+backward time, a/b (bf16)"][1] is False


def test_a_failing_case_is_recorded_and_the_run_goes_on():
    """A backend that raises (a Triton kernel that does not compile, say) costs its own row only."""
    bad = Case("resnet18", "sparse", "encoder_fwd_bwd", 2, 64, 0.5, warmup=0, repeats=1, decoder_width=64,
               conv_impl="no_such_backend")
    good = Case("resnet18", "dense", "encoder_fwd_bwd", 2, 64, 0.5, warmup=0, repeats=1, decoder_width=64)
    seen: list[int] = []
    rows = run_cases([bad, good], isolate=False, on_row=lambda so_far: seen.append(len(so_far)))
    assert seen == [1, 2] and "no_such_backend" in rows[0]["error"] and rows[0]["conv_impl"] == "no_such_backend"
    assert "error" not in rows[1] and rows[1]["median_s"] > 0


def test_a_case_that_loses_the_cuda_context_ends_the_run_with_every_row_saved(monkeypatch):
    """After a sticky CUDA error (an illegal memory access) every later CUDA call fails: the
    run stops there, the cases after it recorded as not run, instead of timing each error."""
    import kernels_bench.suite as suite

    bad = Case("resnet18", "sparse", "encoder_fwd_bwd", 2, 64, 0.5, warmup=0, repeats=1, decoder_width=64,
               conv_impl="no_such_backend")
    rest = [Case("resnet18", "dense", "encoder_fwd_bwd", 2, 64, 0.5, warmup=0, repeats=1, decoder_width=64)] * 2
    monkeypatch.setattr(suite, "cuda_context_lost", lambda device: True)
    saved: list[list[dict]] = []
    with pytest.raises(suite.CudaContextLost, match="case 4 of 6 lost the CUDA context"):
        run_cases([bad, *rest], isolate=False, on_row=lambda so_far: saved.append(list(so_far)), numbering=(3, 6))
    [rows] = saved
    assert len(rows) == 3 and "no_such_backend" in rows[0]["error"]
    assert [r["error"] for r in rows[1:]] == ["not run: case 4 lost the CUDA context"] * 2


@pytest.mark.parametrize("part", ["encoder_fwd", "encoder_fwd_bwd", "step"])
@pytest.mark.parametrize("variant", ["sparse", "masked_dense", "dense"])
def test_an_amp_case_runs_every_variants_convolutions_under_autocast(variant, part):
    """A bf16 row must measure bf16 convolutions, the sparse encoder's included. CPU autocast
    stands in for CUDA's here (run_case refuses amp on CPU; _step_fn follows the device)."""
    from kernels_bench.measure import _step_fn, build_sparse_spark, make_inputs
    from kernels_bench.variants import build_variant

    case = Case("resnet18", variant, part, 2, 64, 0.5, amp="bf16", warmup=0, repeats=1, decoder_width=64)
    model = build_variant(build_sparse_spark(case, torch.device("cpu")), variant).train()
    seen: list[bool] = []
    convs = [m for m in model.modules() if "Conv" in type(m).__name__ and not list(m.children())]
    for m in convs:
        m.register_forward_pre_hook(lambda *_: seen.append(torch.is_autocast_enabled("cpu")))
    images, active = make_inputs(case, torch.device("cpu"))
    _step_fn(case, model, images, active)()
    assert len(seen) >= 20 and all(seen), f"{seen.count(False)} of {len(seen)} convolutions ran outside autocast"


def test_a_backend_failing_its_sanity_check_loses_only_its_rows(tmp_path, monkeypatch):
    """Each backend is checked against masked-dense before timing; one that fails (here
    minkowski, made to disagree) is reported and its cases left out, the rest measured."""
    import kernels_bench.suite as suite
    from kernels_bench.__main__ import main

    real = suite.sanity_check

    def check(model, batch, size, device, decoder_width, conv_impl="auto"):
        if conv_impl == "minkowski":
            raise RuntimeError("sparse[minkowski] and masked-dense disagree (relative error 1.0e+00 > 1e-03)")
        return real(model, batch, size, device, decoder_width, conv_impl)

    monkeypatch.setattr(suite, "sanity_check", check)
    main(["--quick", "--models", "resnet18", "--parts", "encoder_fwd", "--masks", "0.6", "--threads", "1",
          "--conv-impl", "torch", "minkowski", "--skip", "breakdown", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "results.json").read_text())
    # the per-layer rows compare the run's backends (MinkowskiEngine's among them), fp32 on CPU
    assert {(k["conv_impl"], k["dtype"]) for k in saved["kernels"]} == {("torch", "float32"), ("minkowski", "float32")}
    by_impl = {s["conv_impl"]: s for s in saved["sanity"]}
    assert by_impl["torch"]["passed"] and max(by_impl["torch"]["feature_rel_err"]) < 1e-4
    assert not by_impl["minkowski"]["passed"] and "disagree" in by_impl["minkowski"]["error"]
    sparse = [r for r in saved["rows"] if r["variant"] == "sparse"]
    assert sparse and {r["conv_impl"] for r in sparse} == {"torch"} and all("error" not in r for r in saved["rows"])
    assert {r["variant"] for r in saved["rows"]} == {"sparse", "masked_dense", "dense"}


def test_a_backend_that_ends_the_run_leaves_the_rows_measured_before_it(tmp_path, monkeypatch):
    """Baselines run first, then each backend right after its sanity check, in the order
    given; a backend that ends the process (a crashed kernel, a broken CUDA context) leaves
    the saved rows and checks of everything before it."""
    import kernels_bench.suite as suite
    from kernels_bench.__main__ import main

    class ProcessKilled(BaseException):  # not caught per case, as a signal would not be
        pass

    real = suite.run_case

    def run(case):
        if case.variant == "sparse" and case.conv_impl == "minkowski":
            raise ProcessKilled
        return real(case)

    monkeypatch.setattr(suite, "run_case", run)
    with pytest.raises(ProcessKilled):
        main(["--quick", "--models", "resnet18", "--parts", "encoder_fwd", "--masks", "0.6", "--threads", "1",
              "--conv-impl", "torch", "minkowski", "--skip", "kernels", "breakdown", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["partial"]
    assert [(r["variant"], r["conv_impl"] if r["variant"] == "sparse" else None) for r in saved["rows"]] == [
        ("masked_dense", None), ("dense", None), ("sparse", "torch")]
    assert all("error" not in r for r in saved["rows"])
    assert [(c["conv_impl"], c["passed"]) for c in saved["sanity"]] == [("torch", True), ("minkowski", True)]


def test_recompute_rows_are_sparse_headline_rows_and_named_apart(caplog):
    cases = _plan(parts=["encoder_fwd", "encoder_fwd_bwd", "step"], extra_batches=[2], grad_checkpointing=True).cases()
    recompute = [c for c in cases if c.grad_checkpointing]
    assert {(c.variant, c.part, c.mask_ratio, c.batch, c.amp) for c in recompute} == {
        ("sparse", "encoder_fwd_bwd", 0.6, 4, None), ("sparse", "step", 0.6, 4, None)}
    gpu = _plan(device="cuda", cuda_extras=True, parts=["step"], grad_checkpointing=True).cases()
    assert {c.amp for c in gpu if c.grad_checkpointing} == {"bf16"}
    with pytest.raises(ValueError, match="grad_checkpointing rows are sparse rows"):
        Case("resnet18", "masked_dense", "step", 2, 64, 0.5, grad_checkpointing=True).validate()
    caplog.set_level("INFO", logger="kernels_bench.suite")
    [row] = run_cases([Case("resnet18", "sparse", "encoder_fwd_bwd", 2, 64, 0.6, warmup=0, repeats=1,
                            decoder_width=64, grad_checkpointing=True)], isolate=False)
    assert "resnet18 sparse[auto]+recompute encoder_fwd_bwd" in caplog.records[-1].getMessage()
    assert row["grad_checkpointing"] and row["median_s"] > 0
    results = {"plan": {"batch": 2, "size": 64}, "rows": [row, {**row, "grad_checkpointing": False}]}
    assert {h["backend"] for h in headline(results)} == {"auto", "auto+recompute"}


def test_partial_recompute_rows_follow_each_full_encoder_row_and_are_named_by_their_stages(caplog):
    cases = _plan(parts=["encoder_fwd_bwd", "step"], grad_checkpointing=True, checkpoint_stages=(1, 2)).cases()
    assert [(c.part, c.checkpoint_stages) for c in cases if c.grad_checkpointing] == [
        ("encoder_fwd_bwd", None), ("encoder_fwd_bwd", 1), ("encoder_fwd_bwd", 2), ("step", None)]
    with pytest.raises(ValueError, match="checkpoint_stages=2 needs grad_checkpointing"):
        Case("resnet18", "sparse", "step", 2, 64, 0.5, checkpoint_stages=2).validate()
    caplog.set_level("INFO", logger="kernels_bench.suite")
    [row] = run_cases([Case("resnet18", "sparse", "encoder_fwd_bwd", 2, 64, 0.6, warmup=0, repeats=1,
                            decoder_width=64, grad_checkpointing=True, checkpoint_stages=2)], isolate=False)
    assert "resnet18 sparse[auto]+recompute[1-2] encoder_fwd_bwd" in caplog.records[-1].getMessage()
    assert row["checkpoint_stages"] == 2
    results = {"plan": {"batch": 2, "size": 64}, "rows": [row, {**row, "checkpoint_stages": 1},
                                                         {**row, "checkpoint_stages": None}]}
    assert {h["backend"] for h in headline(results)} == {"auto+recompute[1-2]", "auto+recompute[1]", "auto+recompute"}


def test_dense_stem_rows_are_headline_rows_of_the_first_backend_and_named_apart(caplog):
    cases = _plan(parts=["encoder_fwd_bwd", "step"], conv_impls=("torch", "minkowski"), dense_stem=True).cases()
    assert [(c.part, c.conv_impl, c.mask_ratio) for c in cases if c.dense_stem] == [
        ("encoder_fwd_bwd", "torch", 0.6), ("step", "torch", 0.6)]
    caplog.set_level("INFO", logger="kernels_bench.suite")
    [row] = run_cases([Case("resnet18", "sparse", "encoder_fwd_bwd", 2, 64, 0.6, warmup=0, repeats=1,
                            decoder_width=64, conv_impl="torch", dense_stem=True)], isolate=False)
    assert "resnet18 sparse[torch]+dense_stem encoder_fwd_bwd" in caplog.records[-1].getMessage()
    results = {"plan": {"batch": 2, "size": 64}, "rows": [row, {**row, "dense_stem": False}]}
    assert {h["backend"] for h in headline(results)} == {"torch", "torch+dense_stem"}


def test_cuda_graph_rows_are_cuda_headline_rows_of_the_first_backend_and_named_apart():
    cases = _plan(device="cuda", cuda_extras=True, parts=["encoder_fwd", "encoder_fwd_bwd", "step"],
                  conv_impls=("torch", "triton"), grad_checkpointing=True, checkpoint_stages=(2, 3),
                  cuda_graphs=True).cases()
    graphed = [(c.part, c.conv_impl, c.amp, c.mask_ratio, c.checkpoint_stages) for c in cases if c.cuda_graphs]
    assert graphed == [("encoder_fwd_bwd", "torch", "bf16", 0.6, None), ("encoder_fwd_bwd", "torch", "bf16", 0.6, 2),
                       ("encoder_fwd_bwd", "torch", "bf16", 0.6, 3), ("step", "torch", "bf16", 0.6, None)]
    assert all(c.grad_checkpointing == (c.checkpoint_stages is not None) for c in cases if c.cuda_graphs)
    assert not any(c.dense_stem for c in cases)
    assert not any(c.cuda_graphs for c in _plan(cuda_graphs=True).cases())  # no CUDA rows on a CPU plan
    # with dense-stem rows asked for too, every graphed row comes again with the dense stem
    both = _plan(device="cuda", cuda_extras=True, parts=["encoder_fwd_bwd", "step"], conv_impls=("triton",),
                 grad_checkpointing=True, checkpoint_stages=(2,), dense_stem=True, cuda_graphs=True).cases()
    assert [(c.part, c.dense_stem, c.checkpoint_stages) for c in both if c.cuda_graphs] == [
        ("encoder_fwd_bwd", False, None), ("encoder_fwd_bwd", False, 2), ("encoder_fwd_bwd", True, None),
        ("encoder_fwd_bwd", True, 2), ("step", False, None), ("step", True, None)]
    Case(model="resnet18", variant="sparse", part="step", batch=2, size=64, mask_ratio=0.6, device="cuda",
         cuda_graphs=True, dense_stem=True).validate()
    assert option_labels({"model": "resnet18", "variant": "sparse", "conv_impl": "triton", "cuda_graphs": True,
                          "dense_stem": True}) == "+dense_stem+cuda_graphs"
    for bad in (dict(device="cpu"), dict(part="encoder_fwd"), dict(conv_impl="minkowski"), dict(reuse_batch=True, part="encoder_fwd_bwd"),
                dict(variant="masked_dense")):
        with pytest.raises(ValueError, match="cuda_graphs rows are CUDA sparse rows"):
            Case(**{**dict(model="resnet18", variant="sparse", part="step", batch=2, size=64, mask_ratio=0.6,
                           device="cuda", cuda_graphs=True), **bad}).validate()
    row = {"model": "resnet18", "variant": "sparse", "conv_impl": "torch", "cuda_graphs": True,
           "grad_checkpointing": True, "checkpoint_stages": 2}
    assert option_labels(row) == "+recompute[1-2]+cuda_graphs"


def test_the_cli_refuses_stage_rows_without_recompute_rows(capsys):
    from kernels_bench.__main__ import main

    with pytest.raises(SystemExit):
        main(["--quick", "--models", "resnet18", "--checkpoint-stages", "2"])
    assert "--checkpoint-stages adds rows to those of --grad-checkpointing: give both" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--quick", "--models", "resnet18", "--cuda-graphs"])
    assert "--cuda-graphs rows run on CUDA only: add --device cuda" in capsys.readouterr().err


def test_the_cli_refuses_unknown_encoders_naming_the_registered_ones(tmp_path, capsys):
    from kernels_bench.__main__ import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--quick", "--models", "resnet18", "resnet999", "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown encoder(s) 'resnet999'; registered: " in err and "resnet18" in err and "--import" in err
    assert not (tmp_path / "out").exists()


def test_a_reused_batch_is_gathered_once_and_encodes_like_a_fresh_one():
    from kernels_bench.measure import build_sparse_spark, make_inputs
    from kernels_bench.variants import as_dense, build_variant

    case = Case("resnet18", "sparse", "encoder_fwd_bwd", 2, 64, 0.5, warmup=0, repeats=1, decoder_width=64,
                reuse_batch=True)
    cpu = torch.device("cpu")
    sparse = build_sparse_spark(case, cpu).eval()
    reused, plain = build_variant(sparse, "sparse", reuse_batch=True), build_variant(sparse, "sparse")
    images, active = make_inputs(case, cpu)
    with torch.no_grad():
        first = reused.encode(images, active)
        gathered = reused._gathered[2]
        again = reused.encode(images, active)
        fresh = plain.encode(images, active)
    assert reused._gathered[2] is gathered  # not gathered again
    assert again[0].coordinate_manager is first[0].coordinate_manager  # its maps and tables reused
    for a, b, c in zip(*(as_dense(f, 2, (64, 64)) for f in (first, again, fresh))):
        assert torch.equal(a, b) and torch.allclose(a, c, atol=1e-6)
    assert run_case(case)["median_s"] > 0
    for bad in (dataclasses.replace(case, part="step"), dataclasses.replace(case, variant="masked_dense")):
        with pytest.raises(ValueError, match="reuse_batch rows are sparse rows of an encoder part"):
            bad.validate()
    with pytest.raises(ValueError, match="reuse_batch is for the sparse variant"):
        build_variant(sparse, "dense", reuse_batch=True)
