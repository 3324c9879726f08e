"""Reconstruction grids: one row per image, columns input | masked | reconstruction | pasted."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from PIL import Image, ImageDraw

COLUMNS = ("input", "masked", "reconstruction", "pasted")
HEADER = 16  # pixels of column titles
GAP = 2


def reconstruction_grid(views: dict[str, torch.Tensor], max_images: int = 8) -> Image.Image:
    """An RGB image of ``SparK.reconstruct`` views (each (B, 3, H, W), ~[0, 1])."""
    missing = [c for c in COLUMNS if c not in views]
    if missing:
        raise ValueError(f"views lack {missing}: pass the dict returned by SparK.reconstruct")
    b, _, h, w = views["input"].shape
    rows = min(b, max_images)
    grid = Image.new("RGB", (len(COLUMNS) * (w + GAP) - GAP, HEADER + rows * (h + GAP) - GAP), "white")
    draw = ImageDraw.Draw(grid)
    for col, name in enumerate(COLUMNS):
        x0 = col * (w + GAP)
        draw.text((x0 + 2, 2), name if w >= 80 else name[:5], fill="black")
        pixels = views[name][:rows].detach().float().clamp(0, 1).mul(255).round().byte().cpu()
        for row in range(rows):
            tile = Image.fromarray(pixels[row].permute(1, 2, 0).numpy())
            grid.paste(tile, (x0, HEADER + row * (h + GAP)))
    return grid


def save_reconstruction_grid(views: dict[str, torch.Tensor], path: str | os.PathLike, max_images: int = 8) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    reconstruction_grid(views, max_images).save(path)
    return path
