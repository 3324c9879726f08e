"""kernels_bench.refill: both ways of building a replay's tables, timed side by side."""
from __future__ import annotations

import json

import pytest

from conftest import CUDA_READY
from kernels_bench import refill


@pytest.mark.parametrize("dense_stem", [False, True])
def test_both_ways_build_every_table_the_template_asked_for(tmp_path, dense_stem):
    out = tmp_path / "refill.json"
    refill.main(["--models", "resnet18", "--batch", "2", "--size", "64", "--mask", "0.5", "--rounds", "3",
                 "--drop-path", "0.1", "--out", str(out)] + (["--dense-stem"] if dense_stem else []))
    (row,) = json.loads(out.read_text())
    assert row["model"] == "resnet18" and row["dense_stem"] is dense_stem and row["rounds"] == 3
    assert row["tables"] >= (4 if dense_stem else 5) and row["batch_indices"] >= 1  # drop path's per-site index
    for way in refill.WAYS:
        assert row[f"{way}_median_s"] >= row[f"{way}_host_median_s"] > 0 and row[f"{way}_aten_calls"] > row["tables"]
    assert "mask_graph_median_s" not in row  # CUDA only


def test_rounds_must_be_positive():
    with pytest.raises(SystemExit):
        refill.main(["--rounds", "0"])


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA_READY, reason="needs a CUDA GPU and MinkowskiEngine built with CUDA")
def test_on_cuda_the_captured_refill_is_timed_beside_them(tmp_path):
    out = tmp_path / "refill.json"
    refill.main(["--models", "convnext_atto", "--batch", "4", "--size", "96", "--rounds", "3", "--dense-stem",
                 "--device", "cuda", "--out", str(out)])
    (row,) = json.loads(out.read_text())
    assert row["mask_graph_median_s"] > 0 and row["mask_graph_aten_calls"] < row["mask_aten_calls"]
