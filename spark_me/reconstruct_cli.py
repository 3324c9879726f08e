"""spark-me-reconstruct: show what a pre-trained SparK model reconstructs.

    spark-me-reconstruct CKPT photo1.jpg photo2.png some_folder/ --out grid.png

Each image is resized (short side) and centre-cropped to ``--size``, masked at random
(``--mask-ratio``, default: the checkpoint's) and reconstructed. The grid has one row per
image: input | masked | reconstruction | pasted (visible input + reconstructed patches).
"""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Optional, Sequence

import torch

from spark_me.checkpoint import CheckpointError, load_model
from spark_me.data import center_view, find_images, load_rgb, normalize
from spark_me.masking import random_patch_mask
from spark_me.preflight import ConfigError, check_device
from spark_me.visualize import save_reconstruction_grid

log = logging.getLogger(__name__)


def collect_images(inputs: Sequence[str], limit: int) -> list[Path]:
    """Files as given, folders expanded recursively; at most ``limit``."""
    paths: list[Path] = []
    for item in inputs:
        p = Path(item)
        paths.extend(find_images(p) if p.is_dir() else [p])
    return paths[:limit]


def reconstruct_images(
    checkpoint: str, images: Sequence[str], out: str, size: Optional[int] = None,
    mask_ratio: Optional[float] = None, seed: int = 0, max_images: int = 16, device: str = "cpu",
    imports: Sequence[str] = (),
) -> Path:
    if max_images < 1:
        raise ValueError(f"--max-images {max_images} must be at least 1")
    model, ckpt = load_model(checkpoint, imports=imports)
    size = size or int(ckpt.get("image_size") or 224)
    patch = model.patch_size
    if size % patch:
        raise ValueError(f"--size {size} is not a multiple of the patch size {patch}")
    ratio = model.mask_ratio if mask_ratio is None else mask_ratio
    batch = []
    for path in collect_images(images, max_images):
        try:
            batch.append(center_view(load_rgb(path), size))
        except Exception as e:  # noqa: BLE001
            log.warning("skipping %s: %s", path, e)
    if not batch:
        raise ValueError(f"none of the given images could be read: {', '.join(images)}")
    x = normalize(torch.stack(batch).to(device))
    g = torch.Generator().manual_seed(seed)
    active = random_patch_mask(len(batch), (size // patch, size // patch), ratio, g, device)
    model.to(device).eval()
    views = model.reconstruct(x, active)
    try:
        path = save_reconstruction_grid(views, out, max_images=len(batch))
    except OSError as e:
        raise ValueError(f"could not write {out}: {e.strerror or e}; pick a writable --out") from e
    log.info("wrote %s (%d images, %s step %s, mask ratio %.2f)", path, len(batch), ckpt["model_name"], ckpt.get("step"), ratio)
    return path


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="spark-me-reconstruct", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a training checkpoint or a spark-me-export --full file")
    p.add_argument("images", nargs="+", help="image files or folders")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--size", type=int, default=None, help="input size, a multiple of 32 (default: the training size)")
    p.add_argument("--mask-ratio", type=float, default=None, help="fraction of patches hidden (default: the checkpoint's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random masks")
    p.add_argument("--max-images", type=int, default=16)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE_OR_FILE",
                   help="import a module (or .py file) that registers your own encoder; repeatable")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.max_images < 1:
        p.error(f"--max-images {args.max_images} must be at least 1")
    try:
        check_device(args.device, key="--device")
    except ConfigError as e:
        p.error(str(e))
    folder = Path(args.out).parent
    if folder.exists() and (not folder.is_dir() or not os.access(folder, os.W_OK)):
        p.error(f"cannot write into {folder}: pick a writable --out folder")
    try:
        reconstruct_images(args.checkpoint, args.images, args.out, args.size, args.mask_ratio, args.seed,
                           args.max_images, args.device, args.imports)
    except (CheckpointError, ValueError) as e:
        p.exit(1, f"spark-me-reconstruct: error: {e}\n")


if __name__ == "__main__":
    main()
