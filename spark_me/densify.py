"""Densify: sparse per-scale features -> dense decoder inputs.

Per scale: normalise the visible features (the encoder's ``densify_norm``), scatter them
into a dense map whose masked sites hold a learnable mask embedding [M_i], and project to
the decoder's width at that scale (1×1 at the coarsest scale, 3×3 elsewhere; identity at
the coarsest scale when the widths already match).
"""
from __future__ import annotations

from typing import Sequence

import MinkowskiEngine as ME
import torch
import torch.nn as nn

from spark_me.encoders.base import SparseEncoder
from spark_me.gather import to_dense


class Densify(nn.Module):
    """Turns the encoder's sparse maps (finest first) into dense maps (coarsest first)."""

    def __init__(self, encoder: SparseEncoder, decoder_channels: Sequence[int]) -> None:
        super().__init__()
        enc = list(reversed(encoder.feature_channels))  # coarsest first, like the decoder
        if len(decoder_channels) < len(enc):
            raise ValueError(f"decoder has {len(decoder_channels)} scales for {len(enc)} encoder maps")
        self.strides = [encoder.downsample_ratio // 2**i for i in range(len(enc))]
        self.norms = nn.ModuleList(encoder.densify_norm(c) for c in enc)
        self.mask_tokens = nn.ParameterList(nn.Parameter(torch.zeros(1, c, 1, 1)) for c in enc)
        self.projs = nn.ModuleList()
        for i, (cin, cout) in enumerate(zip(enc, decoder_channels)):
            if i == 0 and cin == cout:
                self.projs.append(nn.Identity())
            else:
                k = 1 if i == 0 else 3
                self.projs.append(nn.Conv2d(cin, cout, kernel_size=k, padding=k // 2, bias=True))
        # As the official code (pretrain/spark.py): mask embeddings truncated normal within
        # +-0.02; the projections keep PyTorch's default Conv2d initialisation (uniform
        # weights and biases, bound 1/sqrt(fan_in)).
        for token in self.mask_tokens:
            nn.init.trunc_normal_(token, mean=0.0, std=0.02, a=-0.02, b=0.02)

    def forward(
        self, features: Sequence[ME.SparseTensor], batch_size: int, image_size: tuple[int, int]
    ) -> list[torch.Tensor]:
        h, w = image_size
        out = []
        for i, x in enumerate(reversed(features)):
            stride = self.strides[i]
            if x.tensor_stride[0] != stride:
                raise ValueError(f"feature map {i} (coarsest first) has stride {x.tensor_stride}, expected {stride}")
            dense = to_dense(self.norms[i](x), batch_size, (h // stride, w // stride), fill=self.mask_tokens[i])
            out.append(self.projs[i](dense))
        return out
