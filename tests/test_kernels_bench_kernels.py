"""The kernel-level bench: a quick CPU run covers every layer, backend and density, its
numerics check really rejects a wrong result, and its rows reach the report. Nothing here
is about speed."""
from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels_bench.kernels import (
    LAYERS,
    PASSES,
    QUICK_DENSITIES,
    NumericsError,
    check_numerics,
    layer_backends,
    make_input,
    make_layers,
    run_kernel_bench,
    verify_layer,
)
from kernels_bench.report import kernel_lines, write_report

REPO = Path(__file__).resolve().parents[1]
BACKENDS = ("torch", "minkowski")


@pytest.fixture(scope="module")
def quick_rows() -> list[dict]:
    return run_kernel_bench(device="cpu", quick=True)


def test_quick_run_covers_every_layer_backend_density_and_pass(quick_rows):
    got = {(r["layer"], r["conv_impl"], r["density"], r["pass"]) for r in quick_rows}
    want = {(s.name, c, d, p) for s in LAYERS for c in BACKENDS for d in QUICK_DENSITIES for p in PASSES}
    assert got == want
    assert len(quick_rows) == len(want)
    assert {r["dtype"] for r in quick_rows} == {"float32"} and {r["dense_layout"] for r in quick_rows} == {"contiguous"}


def test_quick_rows_are_complete_and_sane(quick_rows):
    for r in quick_rows:
        assert r["bench"] == "kernel" and r["device"] == "cpu"
        for key in ("sparse_total_s", "sparse_cached_s", "coords_s", "kernel_map_direct_s", "masked_dense_s",
                    "dense_s", "ratio", "masked_ratio"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
        assert math.isfinite(r["kernel_map_s"])  # a difference of medians: may be ~0 or below
        assert r["kernel_map_s"] == pytest.approx(r["sparse_total_s"] - r["sparse_cached_s"])
        assert r["ratio"] == pytest.approx(r["sparse_total_s"] / r["dense_s"])
        assert r["masked_ratio"] == pytest.approx(r["sparse_total_s"] / r["masked_dense_s"])
        assert 0 <= r["max_rel_err"] <= 1e-4
        assert 0 < r["density_actual"] <= 1 and abs(r["density_actual"] - r["density"]) < 0.05
        assert r["sites"] == round(r["density_actual"] * r["batch"] * r["map_size"] ** 2)


def test_density_one_keeps_every_site():
    inp = make_input(2, 4, 224, 8, 1.0, torch.Generator().manual_seed(0))
    assert inp.density_actual == 1.0 and inp.coords.shape[0] == 2 * 28 * 28
    assert bool((inp.coords[:, 1:] % 8 == 0).all())  # sites on the stride-8 grid


@pytest.mark.parametrize("conv_impl", BACKENDS)
@pytest.mark.parametrize("spec", LAYERS, ids=[s.name for s in LAYERS])
def test_verify_rejects_a_wrong_weight(spec, conv_impl):
    inp = make_input(2, 8, 224, 8, 0.5, torch.Generator().manual_seed(1))
    sparse, dense = make_layers(spec, 8, conv_impl=conv_impl)
    assert verify_layer(sparse, dense, inp) <= 1e-4
    with torch.no_grad():
        sparse.weight.mul_(1.01)
    with pytest.raises(NumericsError, match="relative error"):
        verify_layer(sparse, dense, inp)


def test_minkowski_rows_use_minkowskis_own_depthwise_conv():
    spec = next(s for s in LAYERS if s.depthwise)
    assert make_layers(spec, 8, conv_impl="minkowski")[0].depthwise_impl == "minkowski"
    assert make_layers(spec, 8, conv_impl="torch")[0].depthwise_impl == "gather"


def test_bfloat16_rows_meet_their_bound_and_a_wrong_weight_misses_it():
    rows = run_kernel_bench(device="cpu", quick=True, layers=LAYERS[1:2], densities=(0.6,), passes=("fwd",),
                            conv_impls=BACKENDS, dtypes=(torch.float32, torch.bfloat16))
    # MinkowskiEngine computes in float32 only: no bf16 rows for it
    assert {(r["conv_impl"], r["dtype"]) for r in rows} == {("torch", "float32"), ("torch", "bfloat16"),
                                                           ("minkowski", "float32")}
    bf16 = next(r for r in rows if r["dtype"] == "bfloat16")
    # within the bound; 0 where the dense bf16 conv sums the same fp32 products in the same
    # order and rounds once, as oneDNN's AMX kernels do (the wrong weight below must miss it)
    assert 0 <= bf16["max_rel_err"] <= 3e-2
    inp = make_input(2, 8, 224, 8, 0.5, torch.Generator().manual_seed(1), dtype=torch.bfloat16)
    sparse, dense = make_layers(LAYERS[1], 8, dtype=torch.bfloat16)
    with torch.no_grad():
        sparse.weight.mul_(1.1)
    with pytest.raises(NumericsError, match="relative error"):
        verify_layer(sparse, dense, inp, 3e-2)


def test_layer_backends_resolve_auto_and_add_minkowski_once():
    assert layer_backends(("auto",), "cpu") == ("torch", "minkowski")
    assert layer_backends(("torch", "minkowski"), "cpu") == ("torch", "minkowski")
    assert layer_backends(("minkowski", "auto"), "cpu") == ("minkowski", "torch")
    if importlib.util.find_spec("triton") is not None:  # auto on CUDA is Triton (resolving needs no GPU)
        assert layer_backends(("auto", "torch"), "cuda") == ("triton", "torch", "minkowski")
    with pytest.raises(ValueError, match="conv_impl must be one of"):
        layer_backends(("nope",), "cpu")


def test_cli_writes_rows_the_report_shows(tmp_path):
    """``--out`` writes kernels.json and kernels.csv; the report shows them, (b) included, in
    a section of their own (or beside a results folder's own rows; old rows without (b) show
    n/a)."""
    out = tmp_path / "results" / "cpu-x"
    run = subprocess.run(
        [sys.executable, "-m", "kernels_bench.kernels", "--quick", "--layers", "conv3x3", "--densities", "0.6",
         "--passes", "fwd", "--conv-impl", "torch", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "[1/1] conv3x3 torch float32" in run.stderr
    saved = json.loads((out / "kernels.json").read_text())
    assert saved["environment"]["torch"] and saved["args"]["conv_impl"] == ["torch"]
    (row,) = saved["kernels"]
    assert (out / "kernels.csv").read_text().splitlines()[0].startswith("bench,layer,conv_impl,dtype,pass")
    table = "\n".join(kernel_lines([row, {**row, "masked_dense_s": None, "masked_ratio": None, "batch": 8}]))
    assert f"| conv3x3 | torch | float32 | fwd | {row['density_actual']:.2f} | {row['sites']} |" in table
    assert f"| {row['masked_dense_s']:.4f} | {row['dense_s']:.4f} | {row['masked_ratio']:.2f} | {row['ratio']:.2f} |" in table
    assert table.count("Kernel level") == 2 and "| n/a |" in table  # one table per shape
    report = write_report(tmp_path / "results", tmp_path / "docs" / "benchmarks.md").read_text()
    assert "### CPU: " in report and "(`kernels_bench/results/cpu-x`, per layer)" in report
    assert "`python -m kernels_bench.kernels --device cpu --quick" in report and "--conv-impl torch" in report
    assert f"| conv3x3 | torch | float32 | fwd | {row['density_actual']:.2f} | {row['sites']} |" in report


def test_cli_refuses_bad_arguments_clearly():
    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "kernels_bench.kernels", *args], cwd=REPO, capture_output=True,
                              text=True, timeout=120)

    bad = cli("--densities", "0")
    assert bad.returncode == 2 and "--densities must be in (0, 1]" in bad.stderr
    bad = cli("--conv-impl", "triton")  # on CPU without the interpreter
    assert bad.returncode == 2 and "TRITON_INTERPRET=1" in bad.stderr


def test_check_numerics_rejects_mismatches():
    a = torch.randn(2, 3, 4, 4)
    assert check_numerics(a, a.clone()) == 0.0
    with pytest.raises(NumericsError, match="relative error"):
        check_numerics(a + 1e-2 * torch.randn_like(a), a)
    with pytest.raises(NumericsError, match="relative error"):
        check_numerics(torch.full_like(a, float("nan")), a)
    with pytest.raises(NumericsError, match="shape"):
        check_numerics(a[:, :2], a)
    with pytest.raises(NumericsError, match="all zero"):
        check_numerics(a, torch.zeros_like(a))
