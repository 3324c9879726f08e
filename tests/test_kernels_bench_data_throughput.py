"""The data pipeline benchmark: images/s of the training loader and per-stage times."""
from __future__ import annotations

import json

import pytest
import torch

from kernels_bench.data_throughput import STAGES, main, stage_times, timed_item, write_jpegs
from spark_me.data import ImageFolder, PretrainImages, SparKAugment, sample_generator


def test_the_benchmark_reports_images_per_second_and_each_stage(tmp_path):
    out = tmp_path / "data.json"
    main(["--workers", "0", "--seconds", "0.5", "--images", "8", "--batch", "4", "--size", "64", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["images"] >= 4 and result["images"] % 4 == 0 and result["images_per_s"] > 0
    assert tuple(result["stages_ms"]) == STAGES
    assert all(v > 0 for v in result["stages_ms"].values())


def test_the_timed_steps_make_the_loaders_item(tmp_path):
    """The steps the benchmark times, in order, give exactly the item the loader yields."""
    write_jpegs(tmp_path, 3)
    dataset = PretrainImages(ImageFolder(tmp_path), SparKAugment(64))
    for i, path in enumerate(sorted(tmp_path.glob("*.jpg"))):
        item, seconds = timed_item(path, dataset.augment, sample_generator(0, 0, i))
        assert torch.equal(item, dataset[i][0]) and item.dtype == torch.uint8
        assert len(seconds) == len(STAGES) and all(s >= 0 for s in seconds)
    assert set(stage_times(tmp_path, 64, rounds=1)) == set(STAGES)


@pytest.mark.parametrize("args", [["--seconds", "0"], ["--workers", "-1"], ["--images", "2", "--batch", "4"]])
def test_bad_arguments_are_refused(tmp_path, args):
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--out", str(tmp_path / "x.json")])
    assert exit_info.value.code == 2 and not (tmp_path / "x.json").exists()
