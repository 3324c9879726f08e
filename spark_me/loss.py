"""Reconstruction loss: L2 on per-patch-normalised pixels of the masked patches."""
from __future__ import annotations

import torch

NORM_EPS = 1e-6


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, L, p*p*C), patches in row-major order, pixels as (py, px, c)."""
    b, c, h, w = images.shape
    gh, gw = h // patch_size, w // patch_size
    x = images.reshape(b, c, gh, patch_size, gw, patch_size)
    x = x.permute(0, 2, 4, 3, 5, 1)  # b, gh, gw, py, px, c
    return x.reshape(b, gh * gw, patch_size * patch_size * c)


def unpatchify(patches: torch.Tensor, patch_size: int, grid_size: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`patchify`: (B, L, p*p*C) -> (B, C, H, W)."""
    b, _, d = patches.shape
    gh, gw = grid_size
    c = d // (patch_size * patch_size)
    x = patches.reshape(b, gh, gw, patch_size, patch_size, c)
    x = x.permute(0, 5, 1, 3, 2, 4)  # b, c, gh, py, gw, px
    return x.reshape(b, c, gh * patch_size, gw * patch_size)


def patch_statistics(patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-patch mean and std, ``sqrt(var + 1e-6)`` with the unbiased variance (as SparK)."""
    mean = patches.mean(dim=-1, keepdim=True)
    std = (patches.var(dim=-1, keepdim=True) + NORM_EPS).sqrt()
    return mean, std


def masked_reconstruction_loss(
    reconstruction: torch.Tensor,
    images: torch.Tensor,
    active: torch.Tensor,
    patch_size: int,
) -> torch.Tensor:
    """Mean over masked patches of the per-patch mean squared error.

    The target is ``images`` normalised per patch; ``reconstruction`` predicts that
    normalised target directly. Visible patches (``active`` True) do not count.
    """
    target = patchify(images, patch_size)
    mean, std = patch_statistics(target)
    target = (target - mean) / std
    pred = patchify(reconstruction, patch_size)
    per_patch = (pred - target).pow(2).mean(dim=-1)  # (B, L)
    masked = (~active).reshape(active.shape[0], -1).to(per_patch.dtype)
    return (per_patch * masked).sum() / masked.sum().clamp_min(1.0)
