"""Masked-dense reference for the tests: dense layers on a zeroed image, re-masked.

This is what SparK's section 3.1 and its official emulation define: every map is zero at
masked sites (the mask at each stride is the patch mask downsampled), each conv and pool
output is multiplied by the mask, and BatchNorm statistics are taken over visible sites.
Written independently of spark_me's sparse code so that agreement means something.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def mask_at(active: torch.Tensor, stride: int, patch: int = 32) -> torch.Tensor:
    """(B, 1, H/stride, W/stride) float mask from a (B, H/patch, W/patch) bool mask."""
    r = patch // stride
    return active.repeat_interleave(r, 1).repeat_interleave(r, 2).unsqueeze(1)


def masked_bn(bn: nn.BatchNorm2d, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """BatchNorm with statistics over visible sites (train) or running stats (eval)."""
    if bn.training:
        visible = x.permute(0, 2, 3, 1)[m[:, 0]]  # N, C
        mean = visible.mean(0)
        var = visible.var(0, unbiased=False)
    else:
        mean, var = bn.running_mean, bn.running_var
    y = (x - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + bn.eps)
    y = y * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)
    return y * m


def masked_conv(conv: nn.Conv2d, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return conv(x) * m


def _block(block: nn.Module, x: torch.Tensor, active: torch.Tensor, stride_in: int) -> tuple[torch.Tensor, int]:
    bottleneck = hasattr(block, "conv3")  # bottleneck: stride on conv2; basic: on conv1
    s_out = stride_in * (block.conv2 if bottleneck else block.conv1).stride[0]
    m_in, m_out = mask_at(active, stride_in), mask_at(active, s_out)
    shortcut = x
    if block.downsample is not None:
        shortcut = masked_bn(block.downsample[1], masked_conv(block.downsample[0], x, m_out), m_out)
    if bottleneck:
        y = F.relu(masked_bn(block.bn1, masked_conv(block.conv1, x, m_in), m_in))
        y = F.relu(masked_bn(block.bn2, masked_conv(block.conv2, y, m_out), m_out))
        y = masked_bn(block.bn3, masked_conv(block.conv3, y, m_out), m_out)
    else:
        y = F.relu(masked_bn(block.bn1, masked_conv(block.conv1, x, m_out), m_out))
        y = masked_bn(block.bn2, masked_conv(block.conv2, y, m_out), m_out)
    return F.relu(y + shortcut), s_out


def masked_dense_resnet(model: nn.Module, images: torch.Tensor, active: torch.Tensor) -> list[torch.Tensor]:
    """Feature maps after layer1..4 of a timm ResNet under the masked-dense semantics."""
    x = images * mask_at(active, 1)
    m2, m4 = mask_at(active, 2), mask_at(active, 4)
    x = F.relu(masked_bn(model.bn1, masked_conv(model.conv1, x, m2), m2))
    x = model.maxpool(x) * m4
    stride, feats = 4, []
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in layer:
            x, stride = _block(block, x, active, stride)
        feats.append(x)
    return feats


def masked_dense_convnext(model: nn.Module, images: torch.Tensor, active: torch.Tensor) -> list[torch.Tensor]:
    """Feature maps after each stage of a timm ConvNeXt under the masked-dense semantics.

    LayerNorm is per site, so it needs no special treatment beyond re-masking (a masked
    site's zero vector would otherwise be normalised into the LN bias).
    """
    x = images * mask_at(active, 1)
    stride = 4
    x = model.stem[0](x) * mask_at(active, stride)
    x = model.stem[1](x) * mask_at(active, stride)
    feats = []
    for i, stage in enumerate(model.stages):
        if i > 0:
            x = stage.downsample[0](x) * mask_at(active, stride)
            stride *= 2
            x = stage.downsample[1](x) * mask_at(active, stride)
        m = mask_at(active, stride)
        for blk in stage.blocks:
            y = blk.conv_dw(x) * m
            if blk.use_conv_mlp:
                y = blk.mlp(blk.norm(y))
            else:
                y = blk.mlp(blk.norm(y.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
            if blk.gamma is not None:
                y = y * blk.gamma.view(1, -1, 1, 1)
            x = x + y * m
        feats.append(x)
    return feats
