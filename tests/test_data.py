"""Image sources, RGB conversion, skipping unreadable files, augmentation, resumable sharding."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from spark_me.data import (
    ImageFolder,
    PretrainImages,
    ResumableSampler,
    SparKAugment,
    build_loader,
    find_images,
    center_view,
    load_rgb,
    normalize,
    sample_generator,
)
from spark_me.spark import IMAGENET_MEAN, IMAGENET_STD
from spark_me.demo_data import DemoImages


def _write(path, mode="RGB", size=(40, 30), seed=0):
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "I;16":
        Image.fromarray(rng.integers(0, 65535, size[::-1]).astype(np.uint16)).save(path)
        return path
    base = Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8))
    if mode == "P":
        img = base.convert("P", palette=Image.Palette.ADAPTIVE)
        img.info["transparency"] = 0
        img.save(path, transparency=0)
    else:
        base.convert(mode).save(path)
    return path


def test_find_images_recursive_imagenet_layout_and_flat(tmp_path):
    _write(tmp_path / "n01" / "a.JPEG")
    _write(tmp_path / "n01" / "b.png")
    _write(tmp_path / "n02" / "deeper" / "c.jpg")
    (tmp_path / "n02" / "labels.txt").write_text("not an image")
    found = find_images(tmp_path)
    assert [p.name for p in found] == ["a.JPEG", "b.png", "c.jpg"]
    assert [p.name for p in find_images(tmp_path / "n01")] == ["a.JPEG", "b.png"]


def test_empty_or_missing_folder_errors_name_data_path(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match=r"no images found under data.path=.*data=demo"):
        find_images(tmp_path)
    with pytest.raises(ValueError, match=r"data.path=.*is not a directory"):
        find_images(tmp_path / "missing")


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P", "CMYK", "I;16", "1"])
def test_load_rgb_converts_every_mode(tmp_path, mode):
    suffix = ".jpg" if mode == "CMYK" else ".png"
    path = _write(tmp_path / f"img{suffix}", mode=mode)
    img = load_rgb(path)
    assert img.mode == "RGB" and img.size == (40, 30)
    assert np.asarray(img).std() > 0  # content survived the conversion


def test_unreadable_files_are_skipped_counted_and_logged(tmp_path, caplog):
    for i in range(3):
        _write(tmp_path / f"good{i}.png", seed=i)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    source = ImageFolder(tmp_path)
    bad = [i for i in range(len(source)) if "bad" in source.name(i)][0]
    ds = PretrainImages(source, SparKAugment(32), seed=0)
    with caplog.at_level(logging.WARNING, logger="spark_me.data"):
        image, skipped = ds[bad]
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8
    assert skipped >= 1
    assert any("bad.png" in r.getMessage() for r in caplog.records)
    # a whole epoch goes through, and the skip count reaches the batch
    sampler = ResumableSampler(ds, batch_size=2, num_replicas=1, rank=0, seed=0)
    batches = list(build_loader(ds, sampler, num_workers=0, epoch=0, seed=0))
    assert len(batches) == 2 and sum(s for _, s in batches) >= 1


def test_mostly_unreadable_dataset_fails_with_a_clear_error(tmp_path):
    for i in range(3):
        (tmp_path / f"bad{i}.jpg").write_bytes(b"nope")
    ds = PretrainImages(ImageFolder(tmp_path), SparKAugment(32))
    with pytest.raises(RuntimeError, match="could not be read"):
        ds[0]


def test_augmentation_is_a_function_of_seed_epoch_index():
    ds = PretrainImages(DemoImages(4, 80, seed=0), SparKAugment(64), seed=7)
    a, _ = ds[1]
    b, _ = ds[1]
    assert a.shape == (3, 64, 64) and torch.equal(a, b)
    ds.set_epoch(1)
    c, _ = ds[1]
    assert not torch.equal(a, c)
    assert a.dtype == torch.uint8  # normalised later, on the trainer's device


def test_normalize_equals_to_tensor_then_imagenet_normalize_bit_for_bit():
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)) for _ in range(3)]
    reference = torch.stack([TF.normalize(TF.to_tensor(im), IMAGENET_MEAN, IMAGENET_STD) for im in imgs])
    batch = torch.stack([TF.pil_to_tensor(im) for im in imgs])
    assert torch.equal(normalize(batch), reference)
    assert torch.equal(normalize(batch[1]), reference[1])
    assert batch.dtype == torch.uint8  # the input is left as it was
    out = normalize(batch)
    assert out.dtype == torch.float32 and out.min() < 0 and out.max() > 1


def test_normalize_refuses_floats_and_wrong_channels():
    with pytest.raises(TypeError, match="uint8"):
        normalize(torch.rand(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"\(\.\.\., 3, H, W\)"):
        normalize(torch.zeros(2, 4, 8, 8, dtype=torch.uint8))


def test_center_view_is_the_centred_short_side_resize_as_uint8():
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (60, 90, 3), dtype=np.uint8))
    view = center_view(img, 32)
    assert view.shape == (3, 32, 32) and view.dtype == torch.uint8
    expected = TF.center_crop(TF.resize(img, 32, TF.InterpolationMode.BICUBIC), [32, 32])
    assert torch.equal(view, TF.pil_to_tensor(expected))


def test_random_resized_crop_draws_within_scale_and_ratio():
    aug = SparKAugment(32, scale=(0.67, 1.0))
    fractions, ratios = [], []
    for i in range(300):
        top, left, h, w = aug.crop_box(200, 150, sample_generator(0, 0, i))
        assert 0 <= top and top + h <= 150 and 0 <= left and left + w <= 200
        fractions.append(h * w / (200 * 150))
        ratios.append(w / h)
    assert 0.66 <= min(fractions) and max(fractions) <= 1.0
    assert min(fractions) < 0.75 and max(fractions) > 0.9  # the whole range is used
    assert 0.74 <= min(ratios) and max(ratios) <= 1.34


def test_flip_happens_about_half_the_time():
    aug = SparKAugment(32, scale=(1.0, 1.0))
    aug.ratio = (200 / 150, 200 / 150)  # full-image crop: only the flip varies
    img = Image.fromarray(np.tile(np.arange(200, dtype=np.uint8), (150, 1))).convert("RGB")
    flipped = sum(
        float(aug(img, sample_generator(0, 0, i))[0, 0, 0]) > float(aug(img, sample_generator(0, 0, i))[0, 0, -1])
        for i in range(100)
    )
    assert 30 < flipped < 70


def test_sampler_shards_cover_the_epoch_seeded_and_resumable():
    ds = list(range(23))
    shards = [ResumableSampler(ds, batch_size=3, num_replicas=2, rank=r, seed=5) for r in range(2)]
    for s in shards:
        s.set_position(epoch=0)
    a, b = list(shards[0]), list(shards[1])
    # global batch 6: ceil(23 / 6) = 4 steps, the last one padded with the epoch's first image
    assert len(a) == len(b) == 12 and shards[0].batches_per_epoch == 4 and shards[0].steps_per_epoch == 4
    assert sorted(set(a) | set(b)) == ds and len(set(a) & set(b)) == 1
    shards[0].set_position(epoch=1)
    assert list(shards[0]) != a  # reshuffled per epoch
    shards[0].set_position(epoch=0, skip_batches=2)
    assert list(shards[0]) == a[6:] and len(shards[0]) == 6
    again = ResumableSampler(ds, batch_size=3, num_replicas=2, rank=0, seed=5)
    again.set_position(epoch=0)
    assert list(again) == a


def test_sampler_reads_the_same_images_with_gradient_accumulation():
    whole = ResumableSampler(range(23), batch_size=4, num_replicas=2, rank=1, seed=3)
    micro = ResumableSampler(range(23), batch_size=2, num_replicas=2, rank=1, seed=3, micro_batches_per_step=2)
    assert whole.steps_per_epoch == micro.steps_per_epoch == 3 and micro.batches_per_epoch == 6
    assert list(whole) == list(micro)
    micro.set_position(epoch=0, skip_batches=2)  # resuming after one step skips its 2 micro-batches
    whole.set_position(epoch=0, skip_batches=1)
    assert list(micro) == list(whole) and len(micro) == len(whole) == 8


def test_demo_images_are_deterministic_and_varied():
    d = DemoImages(5, 48, seed=3)
    first = np.asarray(d.load(2))
    assert first.shape == (48, 48, 3) and first.dtype == np.uint8
    assert np.array_equal(first, np.asarray(DemoImages(5, 48, seed=3).load(2)))
    assert not np.array_equal(first, np.asarray(d.load(3)))
    assert not np.array_equal(first, np.asarray(DemoImages(5, 48, seed=4).load(2)))
    assert first.std() > 10  # not a flat image
    with pytest.raises(IndexError):
        d.load(5)
