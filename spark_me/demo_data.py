"""The built-in demo dataset: synthetic images drawn at run time, no download needed.

Each image is a smooth two-colour gradient with a few filled shapes (ellipses, rectangles,
triangles), some striped, softened by a slight blur. Structure continues across patch
borders, so masked patches can be predicted from visible ones and the SparK loss falls
within a few hundred steps. Image ``i`` depends only on ``(seed, i)``.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


class DemoImages:
    """``num_images`` synthetic RGB images of ``size``×``size`` pixels (an image source).

    Sources are what :class:`spark_me.data.PretrainImages` reads from: ``len``,
    ``load(index) -> PIL.Image`` and ``name(index) -> str``.
    """

    def __init__(self, num_images: int, size: int, seed: int = 0) -> None:
        if num_images < 1:
            raise ValueError(f"the demo dataset needs at least one image, got num_images={num_images}")
        self.num_images = num_images
        self.size = size
        self.seed = seed

    def __len__(self) -> int:
        return self.num_images

    def name(self, index: int) -> str:
        return f"demo image {index} (seed {self.seed})"

    def load(self, index: int) -> Image.Image:
        if not 0 <= index < self.num_images:
            raise IndexError(f"demo image index {index} out of range [0, {self.num_images})")
        rng = np.random.default_rng([self.seed, index])
        img = Image.fromarray(_gradient(rng, self.size))
        for _ in range(rng.integers(2, 6)):
            _draw_shape(img, rng)
        return img.filter(ImageFilter.GaussianBlur(radius=self.size / 128))


def _colour(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, size=3).astype(np.float32)


def _gradient(rng: np.random.Generator, size: int) -> np.ndarray:
    """A linear gradient between two random colours along a random direction."""
    angle = rng.uniform(0, 2 * np.pi)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    t = (np.cos(angle) * xs + np.sin(angle) * ys)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    a, b = _colour(rng), _colour(rng)
    return (a * (1 - t[..., None]) + b * t[..., None]).astype(np.uint8)


def _draw_shape(img: Image.Image, rng: np.random.Generator) -> None:
    """Paste one random shape, plain or striped, onto ``img`` in place."""
    size = img.size[0]
    mask = Image.new("L", img.size, 0)
    draw = ImageDraw.Draw(mask)
    cx, cy = rng.uniform(0.1, 0.9, size=2) * size
    rx, ry = rng.uniform(0.1, 0.35, size=2) * size
    kind = rng.integers(3)
    if kind == 0:
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=255)
    elif kind == 1:
        draw.rectangle([cx - rx, cy - ry, cx + rx, cy + ry], fill=255)
    else:
        angles = rng.uniform(0, 2 * np.pi) + np.array([0.0, 2.1, 4.2]) + rng.uniform(-0.3, 0.3, size=3)
        draw.polygon([(cx + rx * np.cos(a), cy + ry * np.sin(a)) for a in angles], fill=255)

    fill = np.broadcast_to(_colour(rng), (size, size, 3))
    if rng.random() < 0.4:  # stripes: two colours along a random direction
        period = rng.uniform(0.05, 0.2) * size
        angle = rng.uniform(0, np.pi)
        ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
        phase = (np.cos(angle) * xs + np.sin(angle) * ys) / period
        stripes = (0.5 + 0.5 * np.sin(2 * np.pi * phase))[..., None]
        fill = fill * stripes + _colour(rng) * (1 - stripes)
    img.paste(Image.fromarray(np.ascontiguousarray(fill).astype(np.uint8)), (0, 0), mask)
