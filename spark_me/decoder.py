"""LightDecoder: the dense UNet that turns densified multi-scale maps into pixels.

Appendix A of the SparK paper: starting at the coarsest scale, each of ``log2(32) = 5``
blocks upsamples 2x (transposed conv k4 s2 p1) and refines (conv3x3-BN-ReLU6-conv3x3-BN),
halving the width; the densified encoder map of each scale is added before the block that
consumes it, and a 1x1 conv maps the last width to RGB.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn


class UNetBlock(nn.Module):
    """Upsample 2x, then two 3x3 convs: ``in_channels`` -> ``out_channels``."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, in_channels, kernel_size=4, stride=2, padding=1)
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, in_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(in_channels),
            nn.ReLU6(inplace=True),
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.up(x))


class LightDecoder(nn.Module):
    """Dense UNet decoder; ``width`` at the coarsest scale, halved by every block."""

    def __init__(self, width: int = 768, upsample_ratio: int = 32, out_channels: int = 3) -> None:
        super().__init__()
        if upsample_ratio < 2 or upsample_ratio & (upsample_ratio - 1):
            raise ValueError(f"upsample_ratio must be a power of two >= 2, got {upsample_ratio}")
        num_blocks = round(math.log2(upsample_ratio))
        if width % (2**num_blocks):
            raise ValueError(
                f"decoder width {width} must be divisible by 2**{num_blocks} "
                f"(it halves at each of the {num_blocks} blocks); e.g. 768 or 512"
            )
        self.width = width
        self.upsample_ratio = upsample_ratio
        self.channels = [width // 2**i for i in range(num_blocks + 1)]
        self.blocks = nn.ModuleList(
            UNetBlock(cin, cout) for cin, cout in zip(self.channels[:-1], self.channels[1:])
        )
        self.proj = nn.Conv2d(self.channels[-1], out_channels, kernel_size=1)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        """The official initialisation (``pretrain/decoder.py``, ``LightDecoder.initialize``).

        Conv2d: truncated normal, std 0.02, zero bias. ConvTranspose2d (not a Conv2d
        subclass, so the official code reaches its second branch): Kaiming normal with
        ``mode='fan_out', nonlinearity='relu'``, zero bias. BatchNorm: weight 1, bias 0.
        """
        if isinstance(m, nn.Conv2d):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.ConvTranspose2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """``features``: dense maps coarsest first, ``features[i]`` with ``channels[i]`` channels."""
        if len(features) > len(self.blocks):
            raise ValueError(f"got {len(features)} feature maps for {len(self.blocks)} decoder blocks")
        x = features[0]
        for i, block in enumerate(self.blocks):
            if 0 < i < len(features):
                x = x + features[i]
            x = block(x)
        return self.proj(x)
