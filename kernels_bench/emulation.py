"""The masked-dense emulation of SparK: the baseline that spark_me's sparse encoder replaces.

This is the official SparK approach, rebuilt here by module replacement on a dense
network: the image is zeroed at masked patches, every conv, pool and norm output is
multiplied by the patch mask at its resolution, and BatchNorm statistics are taken over
visible sites only. It computes exactly the features of the sparse encoder (tested in
tests/test_kernels_bench_emulation.py) while paying for every masked site, which is what
the benchmarks compare against.

The replacement is by module type, so it applies to any timm ResNet or ConvNeXt and to
users' dense twins built from the same layer types.
"""
from __future__ import annotations

from typing import Optional

import timm
import torch
import torch.nn as nn
from timm.layers import LayerNorm2d
from timm.models.convnext import ConvNeXtBlock

from spark_me.encoders.base import SparseEncoder
from spark_me.gather import check_inputs
from spark_me.masking import upsample_mask


class MaskContext:
    """The visibility mask of the batch being encoded, shared by the masked layers."""

    def __init__(self) -> None:
        self.active: Optional[torch.Tensor] = None  # (B, H/32, W/32) bool, True = visible

    def at(self, height: int, width: int) -> torch.Tensor:
        """(B, height, width) bool mask: each patch repeated to the map's resolution."""
        if self.active is None:
            raise RuntimeError("masked layer called outside MaskedDenseEncoder.forward")
        gh, gw = self.active.shape[1:]
        if height % gh or width % gw or height // gh != width // gw:
            raise ValueError(f"a {height}x{width} map is not a whole multiple of the {gh}x{gw} patch grid")
        return upsample_mask(self.active, height // gh)


class MaskedOp(nn.Module):
    """Runs ``op`` and zeroes its output at masked sites (NCHW, or NHWC if channels_last)."""

    def __init__(self, op: nn.Module, context: MaskContext, channels_last: bool = False) -> None:
        super().__init__()
        self.op = op
        self.context = context
        self.channels_last = channels_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.op(x)
        if self.channels_last:
            return y * self.context.at(y.shape[1], y.shape[2]).unsqueeze(-1).to(y.dtype)
        return y * self.context.at(y.shape[2], y.shape[3]).unsqueeze(1).to(y.dtype)


class MaskedBatchNorm2d(nn.BatchNorm1d):
    """BatchNorm over the visible sites of an NCHW map; masked sites stay zero.

    The visible sites are gathered into (N, C), normalised by BatchNorm1d (so running
    statistics update as usual) and scattered back. State-dict compatible with
    ``nn.BatchNorm2d``.
    """

    def __init__(self, num_features: int, context: MaskContext, eps: float = 1e-5, momentum: Optional[float] = 0.1) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum)
        self.context = context

    @classmethod
    def from_dense(cls, bn: nn.BatchNorm2d, context: MaskContext) -> "MaskedBatchNorm2d":
        out = cls(bn.num_features, context, bn.eps, bn.momentum).to(bn.weight.device, bn.weight.dtype)
        out.load_state_dict(bn.state_dict())
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        mask = self.context.at(x.shape[2], x.shape[3])
        channels_last = x.permute(0, 2, 3, 1)
        out = torch.zeros_like(channels_last).index_put((mask,), super().forward(channels_last[mask]))
        return out.permute(0, 3, 1, 2)


def mask_layers(module: nn.Module, context: MaskContext) -> nn.Module:
    """Replace, in place, the layers of a dense convnet by their masked versions.

    Conv2d, MaxPool2d and LayerNorm2d outputs are re-masked, BatchNorm2d takes statistics
    over visible sites, and a ConvNeXt block's channels-last norm and MLP are re-masked
    (the MLP's biases would otherwise fill masked sites of the residual stream).
    """
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            new: nn.Module = MaskedBatchNorm2d.from_dense(child, context)
        elif isinstance(child, (nn.Conv2d, nn.MaxPool2d, LayerNorm2d)):
            new = MaskedOp(child, context)
        elif isinstance(module, ConvNeXtBlock) and name in ("norm", "mlp"):
            new = MaskedOp(mask_layers(child, context), context, channels_last=not module.use_conv_mlp)
        else:
            new = mask_layers(child, context)
        setattr(module, name, new)
    return module


def dense_twin(encoder: SparseEncoder) -> nn.Module:
    """The dense network with ``encoder``'s weights: ``encoder.dense_model()`` if defined,
    else ``timm.create_model(encoder.timm_name, num_classes=0)``."""
    if hasattr(encoder, "dense_model"):
        return encoder.dense_model()
    if not encoder.timm_name or not timm.is_model(encoder.timm_name):
        raise ValueError(
            f"{type(encoder).__name__} has no dense twin: set timm_name to a timm model or define "
            "dense_model() returning the dense network with the same weights"
        )
    dense = timm.create_model(encoder.timm_name, num_classes=0, pretrained=False)
    dense.load_state_dict(encoder.timm_state_dict(), strict=True)
    return dense.to(next(encoder.parameters()).device)


def dense_features(model: nn.Module, images: torch.Tensor, num_maps: int) -> list[torch.Tensor]:
    """The last ``num_maps`` feature maps of a dense convnet, finest first."""
    if hasattr(model, "forward_intermediates"):  # timm
        return model.forward_intermediates(images, indices=num_maps, intermediates_only=True)
    feats = model.forward_features(images) if hasattr(model, "forward_features") else model(images)
    if not isinstance(feats, (list, tuple)):
        raise ValueError(f"{type(model).__name__}.forward_features(images) must return its feature maps as a list")
    return list(feats)[-num_maps:]


class MaskedDenseEncoder(nn.Module):
    """The masked-dense emulation of a sparse encoder, with the same weights.

    ``forward(images, active)`` returns dense (B, C, H/s, W/s) maps, finest first, equal to
    the sparse encoder's features scattered to dense (zero at masked sites).
    """

    def __init__(self, encoder: SparseEncoder) -> None:
        super().__init__()
        self.context = MaskContext()
        self.model = mask_layers(dense_twin(encoder), self.context)
        self.downsample_ratio = encoder.downsample_ratio
        self.feature_channels = list(encoder.feature_channels)

    def forward(self, images: torch.Tensor, active: torch.Tensor) -> list[torch.Tensor]:
        check_inputs(images, active, self.downsample_ratio)
        self.context.active = active
        try:
            visible = self.context.at(images.shape[2], images.shape[3]).unsqueeze(1).to(images.dtype)
            return dense_features(self.model, images * visible, len(self.feature_channels))
        finally:
            self.context.active = None
