"""Pre-training data: image sources, the SparK augmentation, and a resumable sharded sampler.

Augmentation is the paper's minimal one: RandomResizedCrop (scale 0.67–1, bicubic),
horizontal flip, ImageNet normalisation. The loader yields the crops as uint8 and the
trainer normalises them on its device (:func:`normalize`): the workers skip a float
conversion and move a quarter of the bytes. Its randomness comes from a generator seeded by
``(seed, epoch, index)``, so a sample looks the same whichever worker or rank loads it and
a resumed run sees exactly the images an uninterrupted one would.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Iterator, Optional, Protocol, Sized

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from spark_me.demo_data import DemoImages
from spark_me.spark import IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
# Consecutive unreadable files tolerated before a sample gives up: with replacements drawn
# at random this only trips when most of the dataset is unreadable.
MAX_LOAD_ATTEMPTS = 100


class ImageSource(Protocol):
    """Where images come from: a folder of files, or the synthetic demo set."""

    def __len__(self) -> int: ...

    def load(self, index: int) -> Image.Image: ...

    def name(self, index: int) -> str: ...


def find_images(root: str | os.PathLike) -> list[Path]:
    """Image files under ``root``, recursively, sorted; ValueError naming data.path if none."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise ValueError(
            f"data.path={str(root)!r} is not a directory: point it at a folder of images, e.g. "
            "data.path=/datasets/imagenet/train"
        )
    files = []
    seen: set[str] = set()  # real directories walked: a symlink loop or a second link to a
    for dirpath, dirnames, names in os.walk(root, followlinks=True):  # folder is followed once
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = [d for d in dirnames if os.path.realpath(os.path.join(dirpath, d)) not in seen]
        files.extend(Path(dirpath) / f for f in names if f.lower().endswith(IMAGE_EXTENSIONS))
    files.sort()
    if not files:
        raise ValueError(
            f"no images found under data.path={str(root)!r} (searched recursively for "
            f"{', '.join(IMAGE_EXTENSIONS)}); point data.path at a folder of images or use data=demo"
        )
    return files


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Open an image file as RGB (grayscale, palette, RGBA, CMYK, 16-bit ... converted)."""
    with Image.open(path) as img:
        img.load()
        if img.mode == "RGB":  # the common case: convert() would copy it
            return img
        if img.mode == "P" and "transparency" in img.info:
            img = img.convert("RGBA")
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(img, dtype=np.float32)
            img = Image.fromarray((arr * (255.0 / max(float(arr.max()), 1.0))).astype(np.uint8))
        return img.convert("RGB")


class ImageFolder:
    """Image files under a folder (ImageNet ``train/`` layout or flat); labels ignored."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).expanduser()
        self.files = find_images(self.root)

    def __len__(self) -> int:
        return len(self.files)

    def name(self, index: int) -> str:
        return str(self.files[index])

    def load(self, index: int) -> Image.Image:
        return load_rgb(self.files[index])


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The generator that draws the augmentation of sample ``index`` in ``epoch``."""
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(2, np.uint64)
    return torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))


class SparKAugment:
    """RandomResizedCrop(size, scale, bicubic) + horizontal flip, as a uint8 (3, size, size) tensor."""

    def __init__(self, size: int, scale: tuple[float, float] = (0.67, 1.0)) -> None:
        self.size = size
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (3.0 / 4.0, 4.0 / 3.0)

    def crop_box(self, width: int, height: int, g: torch.Generator) -> tuple[int, int, int, int]:
        """(top, left, h, w) as torchvision's RandomResizedCrop draws them, from ``g``."""
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * (self.scale[0] + (self.scale[1] - self.scale[0]) * float(torch.rand(1, generator=g)))
            aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * float(torch.rand(1, generator=g)))
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, (1,), generator=g))
                left = int(torch.randint(0, width - w + 1, (1,), generator=g))
                return top, left, h, w
        # fallback: central crop at the nearest allowed aspect ratio
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, int(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            w, h = int(round(height * self.ratio[1])), height
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def resized_crop(self, img: Image.Image, g: torch.Generator) -> Image.Image:
        """The random crop, resized to ``size`` (bicubic)."""
        top, left, h, w = self.crop_box(img.width, img.height, g)
        return TF.resized_crop(img, top, left, h, w, [self.size, self.size], TF.InterpolationMode.BICUBIC)

    def flip(self, img: Image.Image, g: torch.Generator) -> Image.Image:
        """Mirrored with probability 1/2."""
        return TF.hflip(img) if float(torch.rand(1, generator=g)) < 0.5 else img

    def __call__(self, img: Image.Image, g: torch.Generator) -> torch.Tensor:
        return TF.pil_to_tensor(self.flip(self.resized_crop(img, g), g))


def normalize(images: torch.Tensor) -> torch.Tensor:
    """ImageNet normalisation of uint8 images (..., 3, H, W) to float32, on their device.

    The same float32 operations as ``to_tensor`` followed by ``Normalize`` on the CPU, so the
    result does not depend on where it runs.
    """
    if images.dtype != torch.uint8:
        raise TypeError(f"normalize expects uint8 images (0-255), got {images.dtype}")
    if images.dim() < 3 or images.shape[-3] != 3:
        raise ValueError(f"normalize expects images shaped (..., 3, H, W), got {tuple(images.shape)}")
    x = images.to(torch.float32).div_(255)
    # per channel with Python scalars: no statistics tensor to copy to the device each step
    for c, (mean, std) in enumerate(zip(IMAGENET_MEAN, IMAGENET_STD)):
        x.select(-3, c).sub_(mean).div_(std)
    return x


def center_view(img: Image.Image, size: int) -> torch.Tensor:
    """Deterministic view for visualisation: resize the short side, centre-crop; uint8 like the loader's."""
    img = TF.resize(img, size, TF.InterpolationMode.BICUBIC)
    return TF.pil_to_tensor(TF.center_crop(img, [size, size]))


class PretrainImages(Dataset):
    """Augmented images from a source; item = (image tensor, number of files skipped).

    An unreadable file is logged and replaced by another image drawn from the same
    per-sample generator, so a bad file never stops an epoch and the batch size stays
    fixed; the skip count travels with the batch to be logged.
    """

    def __init__(self, source: ImageSource, augment: SparKAugment, seed: int = 0) -> None:
        self.source = source
        self.augment = augment
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.source)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's augmentations (set before creating the epoch's DataLoader)."""
        self.epoch = epoch

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        g = sample_generator(self.seed, self.epoch, index)
        error: Optional[Exception] = None
        for attempt in range(MAX_LOAD_ATTEMPTS):
            try:
                img = self.source.load(index)
            except Exception as e:  # noqa: BLE001 (any decoder error: skip the file)
                log.warning("skipping unreadable image %s: %s", self.source.name(index), e)
                error = e
                index = int(torch.randint(0, len(self.source), (1,), generator=g))
                continue
            return self.augment(img, g), attempt
        raise RuntimeError(
            f"{MAX_LOAD_ATTEMPTS} images in a row could not be read (last: {self.source.name(index)}: "
            f"{error}); most files under data.path seem unreadable: check the dataset"
        )


def collate(batch: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, int]:
    images, skipped = zip(*batch)
    return torch.stack(images), int(sum(skipped))


class ResumableSampler(Sampler[int]):
    """The indices one rank reads in an epoch, in micro-batches of ``batch_size``.

    Each optimizer step consumes one global batch of ``batch_size x num_replicas x
    micro_batches_per_step`` images: a contiguous slice of the epoch's seeded permutation.
    As in the official SparK sampler (``pretrain/sampler.py``, ``DistInfiniteBatchSampler``
    with ``filling=True``), the last global batch is completed with the first indices of
    the same permutation, so an epoch has ``ceil(len(dataset) / global batch)`` steps and
    every image is seen at least once. The shards interleave (rank ``r`` reads positions
    ``r, r + num_replicas, ...``). :meth:`set_position` starts an epoch after its first
    ``skip_batches`` micro-batches, to resume mid-epoch exactly.
    """

    def __init__(
        self,
        dataset: Sized,
        batch_size: int,
        num_replicas: int,
        rank: int,
        seed: int,
        micro_batches_per_step: int = 1,
    ) -> None:
        if min(batch_size, num_replicas, micro_batches_per_step) < 1 or not 0 <= rank < num_replicas:
            raise ValueError(
                f"invalid sampler layout: batch_size={batch_size}, num_replicas={num_replicas}, rank={rank}, "
                f"micro_batches_per_step={micro_batches_per_step}"
            )
        self.dataset_len = len(dataset)
        self.batch_size = batch_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.micro_batches_per_step = micro_batches_per_step
        self.epoch = 0
        self.skip_batches = 0

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.num_replicas * self.micro_batches_per_step

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch: the last global batch is padded, not dropped."""
        return math.ceil(self.dataset_len / self.global_batch_size)

    @property
    def batches_per_epoch(self) -> int:
        """Micro-batches this rank reads per epoch."""
        return self.steps_per_epoch * self.micro_batches_per_step

    def set_position(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch = epoch
        self.skip_batches = skip_batches

    def epoch_indices(self) -> list[int]:
        """This rank's indices for the whole epoch (padded permutation, one shard)."""
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.dataset_len, generator=g).tolist()
        total = self.steps_per_epoch * self.global_batch_size
        padded = (order * math.ceil(total / self.dataset_len))[:total]
        return padded[self.rank : total : self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_indices()[self.skip_batches * self.batch_size :])

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.skip_batches) * self.batch_size


def build_source(cfg) -> ImageSource:
    """The image source of a ``data`` config (``kind: demo | folder``)."""
    if cfg.kind == "demo":
        return DemoImages(int(cfg.num_images), size=round(int(cfg.image_size) * 8 / 7), seed=int(cfg.seed))
    if cfg.kind == "folder":
        return ImageFolder(cfg.path)
    raise ValueError(f"data.kind={cfg.kind!r} is unknown: use data=folder or data=demo")


def build_loader(
    dataset: PretrainImages, sampler: ResumableSampler, num_workers: int, epoch: int, seed: int
) -> DataLoader:
    """The DataLoader of one epoch (workers start fresh, seeing ``dataset.epoch``)."""
    return DataLoader(
        dataset,
        batch_size=sampler.batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=torch.cuda.is_available(),
        drop_last=True,
        persistent_workers=False,
        generator=torch.Generator().manual_seed(seed * 100_003 + epoch),
    )
