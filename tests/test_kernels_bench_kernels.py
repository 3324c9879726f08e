"""The kernel-level bench: a quick CPU run covers every layer and density, and its
numerics check really rejects a wrong result. Nothing here is about speed."""
from __future__ import annotations

import math

import pytest
import torch

from kernels_bench.kernels import (
    LAYERS,
    PASSES,
    QUICK_DENSITIES,
    NumericsError,
    check_numerics,
    make_input,
    make_layers,
    run_kernel_bench,
    verify_layer,
)


@pytest.fixture(scope="module")
def quick_rows() -> list[dict]:
    return run_kernel_bench(device="cpu", quick=True)


def test_quick_run_covers_every_layer_density_and_pass(quick_rows):
    got = {(r["layer"], r["density"], r["pass"]) for r in quick_rows}
    want = {(s.name, d, p) for s in LAYERS for d in QUICK_DENSITIES for p in PASSES}
    assert got == want
    assert len(quick_rows) == len(want)


def test_quick_rows_are_complete_and_sane(quick_rows):
    for r in quick_rows:
        assert r["bench"] == "kernel" and r["device"] == "cpu"
        for key in ("sparse_total_s", "sparse_cached_s", "coords_s", "kernel_map_direct_s", "dense_s", "ratio"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
        assert math.isfinite(r["kernel_map_s"])  # a difference of medians: may be ~0 or below
        assert r["kernel_map_s"] == pytest.approx(r["sparse_total_s"] - r["sparse_cached_s"])
        assert 0 <= r["max_rel_err"] <= 1e-4
        assert 0 < r["density_actual"] <= 1 and abs(r["density_actual"] - r["density"]) < 0.05
        assert r["sites"] == round(r["density_actual"] * r["batch"] * r["map_size"] ** 2)


def test_density_one_keeps_every_site():
    inp = make_input(2, 4, 224, 8, 1.0, torch.Generator().manual_seed(0))
    assert inp.density_actual == 1.0 and inp.coords.shape[0] == 2 * 28 * 28
    assert bool((inp.coords[:, 1:] % 8 == 0).all())  # sites on the stride-8 grid


@pytest.mark.parametrize("spec", LAYERS, ids=[s.name for s in LAYERS])
def test_verify_rejects_a_wrong_weight(spec):
    inp = make_input(2, 8, 224, 8, 0.5, torch.Generator().manual_seed(1))
    sparse, dense = make_layers(spec, 8)
    assert verify_layer(sparse, dense, inp) <= 1e-4
    with torch.no_grad():
        sparse.weight.mul_(1.01)
    with pytest.raises(NumericsError, match="relative error"):
        verify_layer(sparse, dense, inp)


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
