"""Images/s of the pre-training data pipeline on this machine's cores.

    python -m kernels_bench.data_throughput [--workers N] [--seconds 20] [--images 256]

Writes ImageNet-like JPEGs (random sizes around 500×375, quality 90; textured so they do
not compress to nothing) into a temporary folder, then runs the same loader a
pre-training run uses (ImageFolder → SparKAugment at 224 px → uint8 batches of 128 from a
DataLoader with N workers, pinned when CUDA is present) for a fixed time and reports
images/s, then times each step of an item (decode, resized crop, flip, tensor) in one
thread. Compare it with a training step's images/s from the GPU benchmark: if decoding
is slower, the GPU waits for data. Results go to build/gpu-check/data_throughput.json.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import DataLoader

from spark_me.data import ImageFolder, PretrainImages, SparKAugment, collate, load_rgb, sample_generator

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("kernels_bench.data_throughput")
STAGES = ("decode", "resized_crop", "flip", "to_tensor")


def write_jpegs(folder: Path, count: int, seed: int = 0) -> None:
    """``count`` textured JPEGs of ImageNet-like sizes (about 110 KB each)."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        w, h = int(rng.integers(400, 600)), int(rng.integers(300, 450))
        low = rng.integers(0, 256, size=(h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
        smooth = np.kron(low, np.ones((8, 8, 1), dtype=np.uint8))[:h, :w]
        noise = rng.integers(-40, 40, size=(h, w, 3))
        pixels = np.clip(smooth.astype(np.int32) + noise, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"img_{i:05d}.jpg", quality=90)


def timed_item(path: Path, augment: SparKAugment, g: torch.Generator) -> tuple[torch.Tensor, list[float]]:
    """A loader item made step by step (decode, resized crop, flip, tensor), with each step's seconds."""
    t0 = time.perf_counter()
    img = load_rgb(path)
    t1 = time.perf_counter()
    img = augment.resized_crop(img, g)
    t2 = time.perf_counter()
    img = augment.flip(img, g)
    t3 = time.perf_counter()
    item = TF.pil_to_tensor(img)
    t4 = time.perf_counter()
    return item, [t1 - t0, t2 - t1, t3 - t2, t4 - t3]


def stage_times(folder: Path, size: int, rounds: int = 3, images: int = 64) -> dict[str, float]:
    """Milliseconds per image of each step of a loader item, in this process (one thread),
    over the first ``images`` JPEGs: each step's total, the fastest of ``rounds``, divided
    by the number of images (the flip happens to about half of them)."""
    files = sorted(folder.glob("*.jpg"))[:images]
    augment = SparKAugment(size)
    best = [math.inf] * len(STAGES)
    for _ in range(rounds):
        spent = [0.0] * len(STAGES)
        for i, path in enumerate(files):
            _, seconds = timed_item(path, augment, sample_generator(0, 0, i))
            spent = [a + b for a, b in zip(spent, seconds)]
        best = [min(a, b) for a, b in zip(best, spent)]
    return {name: round(1e3 * total / len(files), 3) for name, total in zip(STAGES, best)}


def measure(folder: Path, workers: int, seconds: float, batch: int, size: int) -> dict:
    """Images/s of the loader over ``seconds`` (after one warm-up batch), epochs repeating."""
    data = PretrainImages(ImageFolder(folder), SparKAugment(size))
    loader = DataLoader(data, batch_size=batch, shuffle=True, num_workers=workers, collate_fn=collate,
                        drop_last=True, persistent_workers=workers > 0, pin_memory=torch.cuda.is_available())
    images = 0
    it = iter(loader)
    next(it)  # start the workers
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        try:
            x, _ = next(it)
        except StopIteration:  # the same augmentations again: the cost is what is measured
            it = iter(loader)
            continue
        images += x.shape[0]
    elapsed = time.perf_counter() - start
    return {"workers": workers, "batch": batch, "size": size, "images": images, "seconds": round(elapsed, 2),
            "images_per_s": round(images / elapsed, 1)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m kernels_bench.data_throughput", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="loader processes (default: all cores)")
    p.add_argument("--seconds", type=float, default=20.0, help="measuring time")
    p.add_argument("--images", type=int, default=512, help="JPEGs written (the loader cycles over them)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--out", type=Path, default=REPO / "build" / "gpu-check" / "data_throughput.json")
    args = p.parse_args(argv)
    if args.workers < 0 or args.seconds <= 0 or args.images < args.batch:
        p.error("need --workers >= 0, --seconds > 0 and --images >= --batch")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        write_jpegs(Path(tmp), args.images)
        log.info("wrote %d JPEGs in %.1f s", args.images, time.perf_counter() - t0)
        result = measure(Path(tmp), args.workers, args.seconds, args.batch, args.size)
        result["stages_ms"] = stage_times(Path(tmp), args.size)
    result["cpu_count"] = os.cpu_count()
    log.info("data pipeline: %.1f images/s with %d workers (%d cores), batch %d at %d px",
             result["images_per_s"], args.workers, result["cpu_count"], args.batch, args.size)
    log.info("per image, one thread: %s ms", ", ".join(f"{k} {v:.2f}" for k, v in result["stages_ms"].items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
