"""Random patch masks: which 32×32 patches of each image stay visible."""
from __future__ import annotations

from typing import Optional

import torch


def num_visible(num_patches: int, mask_ratio: float) -> int:
    """Number of visible patches out of ``num_patches`` for ``mask_ratio`` (rounded)."""
    check_mask_ratio(mask_ratio)
    return round(num_patches * (1.0 - mask_ratio))


def check_mask_ratio(mask_ratio: float) -> None:
    if not 0.0 <= float(mask_ratio) < 1.0:
        raise ValueError(
            f"mask ratio {mask_ratio} is outside [0, 1): it is the fraction of patches "
            "hidden from the encoder, e.g. 0.6"
        )


def random_patch_mask(
    batch_size: int,
    grid_size: tuple[int, int],
    mask_ratio: float,
    generator: Optional[torch.Generator] = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Per-sample random masks of shape (B, h, w), bool, True = visible.

    Every sample keeps exactly ``round(h*w*(1-mask_ratio))`` visible patches, chosen
    uniformly at random; the same ``generator`` state gives the same masks.
    """
    h, w = grid_size
    num_patches = h * w
    keep = num_visible(num_patches, mask_ratio)
    if keep < 1:
        raise ValueError(
            f"mask ratio {mask_ratio} on a {h}x{w} patch grid leaves no visible patch; "
            "lower the mask ratio or use larger images"
        )
    gen_device = generator.device if generator is not None else torch.device("cpu")
    noise = torch.rand(batch_size, num_patches, generator=generator, device=gen_device)
    keep_idx = noise.argsort(dim=1)[:, :keep]
    active = torch.zeros(batch_size, num_patches, dtype=torch.bool, device=gen_device)
    active.scatter_(1, keep_idx, True)
    return active.view(batch_size, h, w).to(device)


def check_mask_hides_something(active: torch.Tensor) -> None:
    """Raise ValueError unless every sample of a (B, h, w) mask has a masked and a visible patch.

    A mask that hides nothing gives a loss of exactly 0 and no gradient: training would
    silently do nothing but weight decay."""
    flat = active.flatten(1)
    # One host read for both conditions (this runs every training step).
    each_sees_some, some_sees_all = torch.stack([flat.any(dim=1).all(), flat.all(dim=1).any()]).tolist()
    if not each_sees_some:
        raise ValueError("a mask leaves no visible patch in some sample: lower the mask ratio or use larger images")
    if some_sees_all:
        raise ValueError(
            f"a mask hides no patch in some sample ({flat.shape[1]} patches, all visible): the loss would be 0 "
            "and nothing would be learned; raise the mask ratio (e.g. 0.6) or use larger images"
        )


def upsample_mask(active: torch.Tensor, scale: int) -> torch.Tensor:
    """Repeat each patch of a (B, h, w) mask ``scale`` times along both spatial axes."""
    return active.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
