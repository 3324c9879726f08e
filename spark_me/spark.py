"""SparK: sparse masked modelling for convnets, with a truly sparse encoder.

One step reads as the paper: mask → gather visible pixels → sparse encoder → densify
(norm, mask embeddings, projection) → LightDecoder → L2 on per-patch-normalised pixels of
the masked patches.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn

from spark_me.decoder import LightDecoder
from spark_me.densify import Densify
from spark_me.encoders.base import SparseEncoder
from spark_me.gather import check_image_size
from spark_me.loss import masked_reconstruction_loss, patch_statistics, patchify, unpatchify
from spark_me.masking import check_mask_hides_something, check_mask_ratio, random_patch_mask, upsample_mask

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class SparK(nn.Module):
    """Masked image modelling around a sparse encoder.

    Args:
        encoder: a :class:`~spark_me.encoders.base.SparseEncoder` (see ``build_sparse_encoder``).
        decoder_width: LightDecoder width at the coarsest scale (halves at each block).
        mask_ratio: fraction of patches hidden from the encoder, in [0, 1).
        image_mean, image_std: the normalisation the input images carry, used only to
            de-normalise images for viewing in :meth:`reconstruct`.
    """

    def __init__(
        self,
        encoder: SparseEncoder,
        decoder_width: int = 768,
        mask_ratio: float = 0.6,
        image_mean: Sequence[float] = IMAGENET_MEAN,
        image_std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        check_mask_ratio(mask_ratio)
        self.encoder = encoder
        self.mask_ratio = mask_ratio
        self.patch_size = encoder.downsample_ratio
        self.decoder = LightDecoder(decoder_width, upsample_ratio=self.patch_size)
        self.densify = Densify(encoder, self.decoder.channels)
        self.register_buffer("image_mean", torch.tensor(image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(image_std).view(1, 3, 1, 1), persistent=False)

    def random_mask(self, images: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """A fresh (B, H/32, W/32) visibility mask at ``self.mask_ratio``."""
        b, _, h, w = images.shape
        p = self.patch_size
        check_image_size(h, w, p)
        return random_patch_mask(b, (h // p, w // p), self.mask_ratio, generator, images.device)

    def forward_reconstruction(self, images: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """Predicted per-patch-normalised pixels (B, 3, H, W) for a given mask."""
        features = self.encoder(images, active)
        b, _, h, w = images.shape
        return self.decoder(self.densify(features, b, (h, w)))

    def forward(
        self,
        images: torch.Tensor,
        active: Optional[torch.Tensor] = None,
        generator: Optional[torch.Generator] = None,
    ) -> torch.Tensor:
        """The pre-training loss; a random mask is drawn when ``active`` is None."""
        if active is None:
            active = self.random_mask(images, generator)
        reconstruction = self.forward_reconstruction(images, active)  # validates images and mask
        check_mask_hides_something(active)
        return masked_reconstruction_loss(reconstruction, images, active, self.patch_size)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, active: torch.Tensor) -> dict[str, torch.Tensor]:
        """Images for viewing, de-normalised to [0, 1]-ish RGB, each (B, 3, H, W).

        ``input``: the images; ``masked``: masked patches blacked out; ``reconstruction``:
        the prediction, each patch de-normalised with the input patch's mean and std;
        ``pasted``: the visible input with the reconstruction pasted into masked patches.
        """
        pred = self.forward_reconstruction(images, active)
        p = self.patch_size
        grid = active.shape[1:]
        mean, std = patch_statistics(patchify(images, p))
        reconstruction = unpatchify(patchify(pred, p) * std + mean, p, tuple(grid))
        visible = upsample_mask(active, p).unsqueeze(1)
        pasted = torch.where(visible, images, reconstruction)

        def view(x: torch.Tensor) -> torch.Tensor:
            return x * self.image_std.to(x.dtype) + self.image_mean.to(x.dtype)

        return {
            "input": view(images),
            "masked": view(images) * visible,
            "reconstruction": view(reconstruction),
            "pasted": view(pasted),
        }
