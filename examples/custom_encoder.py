"""A user's own convnet made sparse with spark_me's building blocks, and plugged into SparK.

The recipe: write the sparse twin of your dense network with the blocks of
``spark_me.layers`` under the *same attribute names*, subclass ``SparseEncoder``
(declare ``downsample_ratio`` and ``feature_channels``, implement ``forward_sparse``), and
register a factory. Then ``build_sparse_encoder("tiny_convnet")``, ``SparK``, the CLI and
the benchmarks accept it by name, and the dense net's state dict loads unchanged.

    python examples/custom_encoder.py      # one SparK step with the custom encoder
"""
from __future__ import annotations

import MinkowskiEngine as ME
import torch
import torch.nn as nn
import torch.nn.functional as F

from spark_me import SparK, SparseEncoder, build_sparse_encoder, register_encoder
from spark_me.layers import SparseActivation, SparseBatchNorm2d, SparseConv2d, sparse_add

WIDTHS = (32, 64, 96, 128)


class TinyConvNet(nn.Module):
    """The dense network: 4×4/4 patchify stem, then per stage an optional 2×2/2
    downsample and a residual 3×3 conv-BN-ReLU block."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, WIDTHS[0], 4, 4)
        self.downs = nn.ModuleList([nn.Identity()] + [nn.Conv2d(a, b, 2, 2) for a, b in zip(WIDTHS, WIDTHS[1:])])
        self.convs = nn.ModuleList(nn.Conv2d(w, w, 3, 1, 1, bias=False) for w in WIDTHS)
        self.bns = nn.ModuleList(nn.BatchNorm2d(w) for w in WIDTHS)

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        out = []
        for down, conv, bn in zip(self.downs, self.convs, self.bns):
            x = down(x)
            x = F.relu(x + bn(conv(x)))
            out.append(x)
        return out


class SparseTinyConvNet(SparseEncoder):
    """The sparse twin: same names, sparse blocks."""

    downsample_ratio = 32

    def __init__(self) -> None:
        super().__init__()
        self.feature_channels = list(WIDTHS)
        self.stem = SparseConv2d(3, WIDTHS[0], 4, 4)
        self.downs = nn.ModuleList([nn.Identity()] + [SparseConv2d(a, b, 2, 2) for a, b in zip(WIDTHS, WIDTHS[1:])])
        self.convs = nn.ModuleList(SparseConv2d(w, w, 3, 1, bias=False) for w in WIDTHS)
        self.bns = nn.ModuleList(SparseBatchNorm2d(w) for w in WIDTHS)
        self.act = SparseActivation(F.relu)

    def forward_sparse(self, x: ME.SparseTensor) -> list[ME.SparseTensor]:
        x = self.stem(x)
        out = []
        for down, conv, bn in zip(self.downs, self.convs, self.bns):
            x = down(x)
            x = self.act(sparse_add(x, bn(conv(x))))
            out.append(x)
        return out


    def dense_model(self) -> TinyConvNet:
        """The dense twin with these weights: the benchmarks' dense baselines run it."""
        dense = TinyConvNet().to(self.stem.weight.device)
        dense.load_state_dict(self.timm_state_dict())
        return dense


register_encoder("tiny_convnet", SparseTinyConvNet, overwrite=True)


if __name__ == "__main__":
    model = SparK(build_sparse_encoder("tiny_convnet"), decoder_width=256)
    images = torch.randn(4, 3, 128, 128)
    loss = model(images, generator=torch.Generator().manual_seed(0))
    loss.backward()
    print(f"SparK with tiny_convnet: loss {loss.item():.4f}")
