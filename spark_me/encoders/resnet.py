"""Sparse ResNets, the twins of timm's resnet18 … resnet200 (torchvision-style "B" ResNets).

7×7/2 stem conv, BN, ReLU, 3×3/2 max-pool, then four stages of basic or bottleneck blocks
with the stride on the 3×3 conv and 1×1/2 projection shortcuts. Attribute names follow
timm's ``ResNet`` so the state dicts are interchangeable.
"""
from __future__ import annotations

from typing import Optional, Type, Union

import MinkowskiEngine as ME
import torch
import torch.nn as nn
import torch.nn.functional as F

from spark_me.encoders.base import SparseEncoder
from spark_me.encoders.registry import register_encoder
from spark_me.gather import conv_to_sparse
from spark_me.layers import (
    SparseActivation,
    SparseBatchNorm2d,
    SparseConv2d,
    SparseDropPath,
    SparseMaxPool2d,
    set_conv_impl,
    sparse_add,
)
from spark_me.recompute import run_blocks


class SparseBasicBlock(nn.Module):
    expansion = 1

    def __init__(
        self, inplanes: int, planes: int, stride: int, downsample: Optional[nn.Module], drop_path: float
    ) -> None:
        super().__init__()
        self.conv1 = SparseConv2d(inplanes, planes, 3, stride, bias=False)
        self.bn1 = SparseBatchNorm2d(planes)
        self.act1 = SparseActivation(F.relu)
        self.conv2 = SparseConv2d(planes, planes, 3, 1, bias=False)
        self.bn2 = SparseBatchNorm2d(planes)
        self.act2 = SparseActivation(F.relu)
        self.downsample = downsample
        self.drop_path = SparseDropPath(drop_path) if drop_path > 0 else None

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn2.weight)

    def forward(self, x: ME.SparseTensor) -> ME.SparseTensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.bn2(self.conv2(x))
        if self.drop_path is not None:
            x = self.drop_path(x)
        return self.act2(sparse_add(x, shortcut))


class SparseBottleneck(nn.Module):
    expansion = 4

    def __init__(
        self, inplanes: int, planes: int, stride: int, downsample: Optional[nn.Module], drop_path: float
    ) -> None:
        super().__init__()
        outplanes = planes * self.expansion
        self.conv1 = SparseConv2d(inplanes, planes, 1, 1, bias=False)
        self.bn1 = SparseBatchNorm2d(planes)
        self.act1 = SparseActivation(F.relu)
        self.conv2 = SparseConv2d(planes, planes, 3, stride, bias=False)
        self.bn2 = SparseBatchNorm2d(planes)
        self.act2 = SparseActivation(F.relu)
        self.conv3 = SparseConv2d(planes, outplanes, 1, 1, bias=False)
        self.bn3 = SparseBatchNorm2d(outplanes)
        self.act3 = SparseActivation(F.relu)
        self.downsample = downsample
        self.drop_path = SparseDropPath(drop_path) if drop_path > 0 else None

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn3.weight)

    def forward(self, x: ME.SparseTensor) -> ME.SparseTensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        x = self.bn3(self.conv3(x))
        if self.drop_path is not None:
            x = self.drop_path(x)
        return self.act3(sparse_add(x, shortcut))


Block = Union[Type[SparseBasicBlock], Type[SparseBottleneck]]


class SparseResNet(SparseEncoder):
    """Sparse ResNet; ``layers`` blocks per stage, feature maps after each stage."""

    supports_grad_checkpointing = True
    supports_stage_checkpointing = True
    supports_dense_stem = True
    supports_cuda_graphs = True

    def __init__(
        self,
        block: Block,
        layers: tuple[int, int, int, int],
        drop_path_rate: float = 0.0,
        zero_init_last: bool = True,
        timm_name: Optional[str] = None,
        conv_impl: str = "auto",
        dense_stem: bool = False,
    ) -> None:
        super().__init__()
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        self.timm_name = timm_name
        self.conv1 = SparseConv2d(3, 64, 7, 2, bias=False)
        self.bn1 = SparseBatchNorm2d(64)
        self.act1 = SparseActivation(F.relu)
        self.maxpool = SparseMaxPool2d(3, 2)

        total_blocks, block_idx = sum(layers), 0
        inplanes = 64
        self.feature_channels = []
        for stage, (planes, num_blocks) in enumerate(zip((64, 128, 256, 512), layers)):
            stride = 1 if stage == 0 else 2
            outplanes = planes * block.expansion
            blocks = []
            for i in range(num_blocks):
                downsample = None
                if i == 0 and (stride != 1 or inplanes != outplanes):
                    downsample = nn.Sequential(
                        SparseConv2d(inplanes, outplanes, 1, stride, bias=False),
                        SparseBatchNorm2d(outplanes),
                    )
                # timm's stochastic-depth rule: linear in the block index over the network.
                dpr = drop_path_rate * block_idx / max(total_blocks - 1, 1)
                blocks.append(block(inplanes, planes, stride if i == 0 else 1, downsample, dpr))
                inplanes = outplanes
                block_idx += 1
            self.add_module(f"layer{stage + 1}", nn.Sequential(*blocks))
            self.feature_channels.append(outplanes)
        self.init_weights(zero_init_last)
        set_conv_impl(self, conv_impl)
        self.set_dense_stem(dense_stem)

    def init_weights(self, zero_init_last: bool = True) -> None:
        """timm's ResNet initialisation."""
        for m in self.modules():
            if isinstance(m, SparseConv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, SparseBatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_last:
            for m in self.modules():
                if isinstance(m, (SparseBasicBlock, SparseBottleneck)):
                    m.zero_init_last()

    def forward_sparse(self, x: ME.SparseTensor) -> list[ME.SparseTensor]:
        return self.forward_after_stem_conv(self.conv1(x))

    def stem_conv_to_sparse(self, images: torch.Tensor, active: torch.Tensor) -> ME.SparseTensor:
        c = self.conv1
        return conv_to_sparse(images, active, self.downsample_ratio, c.weight, c.bias, c.stride)

    def forward_after_stem_conv(self, x: ME.SparseTensor) -> list[ME.SparseTensor]:
        x = self.maxpool(self.act1(self.bn1(x)))
        features = []
        for i, stage in enumerate((self.layer1, self.layer2, self.layer3, self.layer4)):
            x = run_blocks(stage, x, self.checkpoints_stage(i))
            features.append(x)
        return features


RESNET_CONFIGS: dict[str, tuple[Block, tuple[int, int, int, int]]] = {
    "resnet18": (SparseBasicBlock, (2, 2, 2, 2)),
    "resnet34": (SparseBasicBlock, (3, 4, 6, 3)),
    "resnet50": (SparseBottleneck, (3, 4, 6, 3)),
    "resnet101": (SparseBottleneck, (3, 4, 23, 3)),
    "resnet152": (SparseBottleneck, (3, 8, 36, 3)),
    "resnet200": (SparseBottleneck, (3, 24, 36, 3)),
}


def _factory(name: str):
    block, layers = RESNET_CONFIGS[name]

    def build(**kwargs) -> SparseResNet:
        return SparseResNet(block, layers, timm_name=name, **kwargs)

    build.__name__ = f"sparse_{name}"
    build.__doc__ = f"Sparse twin of timm's {name}."
    return build


for _name in RESNET_CONFIGS:
    register_encoder(_name, _factory(_name))
