"""Sparse ConvNeXts, the twins of timm's convnext_atto … convnext_xlarge.

4×4/4 stem conv + LayerNorm; stages of (LayerNorm + 2×2/2 conv) downsampling and blocks of
depthwise 7×7 conv → LayerNorm → Linear(4×) → GELU → Linear → layer scale → drop-path →
residual. Attribute names follow timm's ``ConvNeXt`` so state dicts are interchangeable;
``head.norm`` is carried as buffers (unused by SparK) so the export loads strictly into
``timm.create_model(name, num_classes=0)``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import MinkowskiEngine as ME
import torch
import torch.nn as nn

from spark_me import ops
from spark_me.encoders.base import SparseEncoder
from spark_me.encoders.registry import register_encoder
from spark_me.gather import conv_to_sparse
from spark_me.layers import SparseConv2d, SparseDropPath, SparseLayerNorm, set_conv_impl, sparse_add, with_features
from spark_me.recompute import run_blocks

LN_EPS = 1e-6


class MlpOnFeatures(nn.Module):
    """timm's ``Mlp`` (fc1 → GELU → fc2 as ``nn.Linear``, convnext_tiny…xlarge) or, with
    ``conv``, its ``ConvMlp`` (1×1 convs, convnext_atto…nano) applied to [N, C] features.
    The layers run through :func:`spark_me.ops.linear`, whose triton backend sums the bias
    gradients in a kernel of its own. timm's attribute names: the state dicts are timm's."""

    def __init__(self, dim: int, hidden: int, conv: bool = False, conv_impl: str = "auto") -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1) if conv else nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, dim, 1) if conv else nn.Linear(hidden, dim)
        self.conv_impl = conv_impl

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        f = self.act(ops.linear(f, self.fc1.weight.flatten(1), self.fc1.bias, self.conv_impl))
        return ops.linear(f, self.fc2.weight.flatten(1), self.fc2.bias, self.conv_impl)


class SparseConvNeXtBlock(nn.Module):
    def __init__(
        self, dim: int, drop_path: float, ls_init_value: Optional[float], conv_mlp: bool, depthwise_impl: str
    ) -> None:
        super().__init__()
        self.conv_dw = SparseConv2d(dim, dim, 7, 1, bias=True, groups=dim, depthwise_impl=depthwise_impl)
        # its output goes to a linear layer only: under autocast in the autocast dtype
        self.norm = SparseLayerNorm(dim, eps=LN_EPS, low_precision_output=True)
        self.mlp = MlpOnFeatures(dim, 4 * dim, conv=conv_mlp)
        self.gamma = nn.Parameter(ls_init_value * torch.ones(dim)) if ls_init_value is not None else None
        self.drop_path = SparseDropPath(drop_path) if drop_path > 0 else None
        self.conv_impl = "auto"  # the layer scale's backend (spark_me.ops.layer_scale), switched by set_conv_impl

    def forward(self, x: ME.SparseTensor) -> ME.SparseTensor:
        y = self.conv_dw(x)
        f = self.mlp(self.norm.forward_features(y.F))
        if self.gamma is not None:
            f = ops.layer_scale(f, self.gamma, self.conv_impl)
        y = with_features(y, f)
        if self.drop_path is not None:
            y = self.drop_path(y)
        return sparse_add(y, x)


class CarriedLayerNorm(nn.Module):
    """timm's classifier-head LayerNorm, kept as buffers: SparK never uses it, but the
    export must contain it to load strictly into ``timm.create_model(name, num_classes=0)``.
    Buffers, not parameters, so optimisers and DDP do not see an unused parameter."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("weight", torch.ones(dim))
        self.register_buffer("bias", torch.zeros(dim))


class SparseConvNeXtStage(nn.Module):
    def __init__(
        self,
        in_dim: int,
        dim: int,
        depth: int,
        drop_paths: Sequence[float],
        ls_init_value: Optional[float],
        conv_mlp: bool,
        depthwise_impl: str,
    ) -> None:
        super().__init__()
        if in_dim != dim:
            norm = SparseLayerNorm(in_dim, eps=LN_EPS, low_precision_output=True)  # the conv casts to it anyway
            self.downsample = nn.Sequential(norm, SparseConv2d(in_dim, dim, 2, 2))
        else:
            self.downsample = nn.Identity()
        self.blocks = nn.Sequential(
            *(SparseConvNeXtBlock(dim, drop_paths[i], ls_init_value, conv_mlp, depthwise_impl) for i in range(depth))
        )

    def forward(self, x: ME.SparseTensor, grad_checkpointing: bool = False) -> ME.SparseTensor:
        """The stage; its blocks recomputed in the backward with ``grad_checkpointing``."""
        return run_blocks(self.blocks, self.downsample(x), grad_checkpointing)


class SparseConvNeXt(SparseEncoder):
    """Sparse ConvNeXt with feature maps after each of the four stages."""

    supports_grad_checkpointing = True
    supports_stage_checkpointing = True
    supports_dense_stem = True
    supports_cuda_graphs = True

    def __init__(
        self,
        depths: tuple[int, int, int, int],
        dims: tuple[int, int, int, int],
        drop_path_rate: float = 0.0,
        ls_init_value: Optional[float] = 1e-6,
        conv_mlp: bool = False,
        depthwise_impl: str = "gather",
        timm_name: Optional[str] = None,
        conv_impl: str = "auto",
        dense_stem: bool = False,
    ) -> None:
        super().__init__()
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        self.timm_name = timm_name
        self.feature_channels = list(dims)
        self.stem = nn.Sequential(SparseConv2d(3, dims[0], 4, 4), SparseLayerNorm(dims[0], eps=LN_EPS))
        # timm's rule: drop-path rates linear over all blocks, split per stage.
        rates = torch.linspace(0, drop_path_rate, sum(depths)).split(list(depths))
        in_dim = dims[0]
        self.stages = nn.Sequential()
        for i in range(4):
            self.stages.append(
                SparseConvNeXtStage(
                    in_dim, dims[i], depths[i], rates[i].tolist(), ls_init_value, conv_mlp, depthwise_impl
                )
            )
            in_dim = dims[i]
        self.head = nn.Module()
        self.head.norm = CarriedLayerNorm(dims[-1])
        self.init_weights()
        set_conv_impl(self, conv_impl)
        self.set_dense_stem(dense_stem)

    def init_weights(self) -> None:
        """timm's ConvNeXt initialisation (trunc-normal std .02 weights, zero biases)."""
        for m in self.modules():
            if isinstance(m, (SparseConv2d, nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def densify_norm(self, channels: int) -> nn.Module:
        return SparseLayerNorm(channels, eps=LN_EPS)

    def forward_sparse(self, x: ME.SparseTensor) -> list[ME.SparseTensor]:
        return self._after_stem(self.stem(x))

    def stem_conv_to_sparse(self, images: torch.Tensor, active: torch.Tensor) -> ME.SparseTensor:
        conv = self.stem[0]
        return conv_to_sparse(images, active, self.downsample_ratio, conv.weight, conv.bias, conv.stride)

    def forward_after_stem_conv(self, x: ME.SparseTensor) -> list[ME.SparseTensor]:
        return self._after_stem(self.stem[1](x))

    def _after_stem(self, x: ME.SparseTensor) -> list[ME.SparseTensor]:
        features = []
        for i, stage in enumerate(self.stages):
            x = stage(x, self.checkpoints_stage(i))
            features.append(x)
        return features


# name: (depths, dims, conv_mlp) as in timm
CONVNEXT_CONFIGS: dict[str, tuple[tuple[int, int, int, int], tuple[int, int, int, int], bool]] = {
    "convnext_atto": ((2, 2, 6, 2), (40, 80, 160, 320), True),
    "convnext_femto": ((2, 2, 6, 2), (48, 96, 192, 384), True),
    "convnext_pico": ((2, 2, 6, 2), (64, 128, 256, 512), True),
    "convnext_nano": ((2, 2, 8, 2), (80, 160, 320, 640), True),
    "convnext_tiny": ((3, 3, 9, 3), (96, 192, 384, 768), False),
    "convnext_small": ((3, 3, 27, 3), (96, 192, 384, 768), False),
    "convnext_base": ((3, 3, 27, 3), (128, 256, 512, 1024), False),
    "convnext_large": ((3, 3, 27, 3), (192, 384, 768, 1536), False),
    "convnext_xlarge": ((3, 3, 27, 3), (256, 512, 1024, 2048), False),
}


def _factory(name: str):
    depths, dims, conv_mlp = CONVNEXT_CONFIGS[name]

    def build(**kwargs) -> SparseConvNeXt:
        return SparseConvNeXt(depths, dims, conv_mlp=conv_mlp, timm_name=name, **kwargs)

    build.__name__ = f"sparse_{name}"
    build.__doc__ = f"Sparse twin of timm's {name}."
    return build


for _name in CONVNEXT_CONFIGS:
    register_encoder(_name, _factory(_name))
