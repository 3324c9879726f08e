"""The three models the benchmarks compare, built with identical weights.

* ``sparse``: spark_me's SparK (MinkowskiEngine encoder on the visible pixels).
* ``masked_dense``: the official emulation (:mod:`kernels_bench.emulation`): dense convs on
  the zeroed image, re-masked, BN over visible sites; then the same densify, decoder, loss.
* ``dense``: the encoder run densely on the whole, unmasked image with ordinary norms; the
  cost a dense pre-training of the same network would pay. Its features differ (it sees
  the masked pixels), so it is timed but not compared numerically.

Each variant exposes ``encode(images, active)`` (dense maps or sparse tensors, finest
first) and ``forward(images, active)`` (the SparK loss). The sparse one can also encode
one gathered batch again and again (``reuse_batch``), to time the encoder without the
gather and the building of the batch's coordinate maps and neighbour tables.
"""
from __future__ import annotations

import copy
from typing import Optional, Sequence, Union

import MinkowskiEngine as ME
import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels_bench.emulation import MaskContext, MaskedBatchNorm2d, MaskedDenseEncoder, dense_features, dense_twin
from spark_me import SparK
from spark_me.encoders.base import SparseEncoder
from spark_me.gather import check_inputs, to_dense, to_sparse
from spark_me.loss import masked_reconstruction_loss
from spark_me.masking import upsample_mask

VARIANTS = ("sparse", "masked_dense", "dense")
Features = Sequence[Union[torch.Tensor, ME.SparseTensor]]


class ChannelsFirstLayerNorm(nn.LayerNorm):
    """LayerNorm over channels of an NCHW map (the dense twin of SparseLayerNorm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps).permute(0, 3, 1, 2)


def dense_norm(norm: nn.Module, context: MaskContext | None) -> nn.Module:
    """The dense version of a densify norm, with its weights: BN over visible sites when
    ``context`` is given (masked-dense), ordinary BN otherwise; LayerNorm per site."""
    if isinstance(norm, nn.BatchNorm1d):
        if context is not None:
            bn: nn.Module = MaskedBatchNorm2d(norm.num_features, context, norm.eps, norm.momentum)
        else:
            bn = nn.BatchNorm2d(norm.num_features, norm.eps, norm.momentum)
        bn.load_state_dict(norm.state_dict())
        return bn.to(norm.weight.device)
    if isinstance(norm, nn.LayerNorm):
        ln = ChannelsFirstLayerNorm(norm.normalized_shape, norm.eps)
        ln.load_state_dict(norm.state_dict())
        return ln.to(norm.weight.device)
    raise ValueError(f"no dense version of densify norm {type(norm).__name__}: use a BatchNorm1d or LayerNorm subclass")


class DenseSparKBase(nn.Module):
    """SparK's densify, decoder and loss (copied from a sparse SparK) around a dense encoder."""

    def __init__(self, sparse: SparK, encoder: nn.Module, context: MaskContext | None) -> None:
        super().__init__()
        self.encoder = encoder
        self.norms = nn.ModuleList(dense_norm(n, context) for n in sparse.densify.norms)
        self.mask_tokens = copy.deepcopy(sparse.densify.mask_tokens)
        self.projs = copy.deepcopy(sparse.densify.projs)
        self.decoder = copy.deepcopy(sparse.decoder)
        self.patch_size = sparse.patch_size
        self.context = context

    def encode(self, images: torch.Tensor, active: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError

    def forward(self, images: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        maps = []
        for i, f in enumerate(reversed(self.encode(images, active))):
            visible = upsample_mask(active, f.shape[-1] // active.shape[-1]).unsqueeze(1)
            if self.context is not None:
                self.context.active = active
            try:
                normed = self.norms[i](f)
            finally:
                if self.context is not None:
                    self.context.active = None
            maps.append(self.projs[i](torch.where(visible, normed, self.mask_tokens[i].to(normed.dtype))))
        reconstruction = self.decoder(maps)
        return masked_reconstruction_loss(reconstruction.float(), images, active, self.patch_size)


class MaskedDenseSparK(DenseSparKBase):
    """SparK with the masked-dense emulation of the encoder (the official approach)."""

    def __init__(self, sparse: SparK) -> None:
        encoder = MaskedDenseEncoder(sparse.encoder)
        super().__init__(sparse, encoder, MaskContext())

    def encode(self, images: torch.Tensor, active: torch.Tensor) -> list[torch.Tensor]:
        return self.encoder(images, active)


class PlainDenseSparK(DenseSparKBase):
    """SparK with the encoder run densely on the unmasked image (no sparsity at all)."""

    def __init__(self, sparse: SparK) -> None:
        super().__init__(sparse, dense_twin(sparse.encoder), None)
        self.num_maps = len(sparse.encoder.feature_channels)

    def encode(self, images: torch.Tensor, active: torch.Tensor) -> list[torch.Tensor]:
        return dense_features(self.encoder, images, self.num_maps)


class SparseSparK(nn.Module):
    """spark_me's SparK with the ``encode`` method the benchmarks call.

    With ``reuse_batch``, ``encode`` gathers a batch once (per ``images`` and ``active``
    objects) and runs the encoder on that ``SparseTensor`` from then on, so its coordinate
    manager already holds every map and table: what is left is the encoder's arithmetic and
    dispatch. Against a plain sparse row, the difference is what gathering and building a
    batch's tables cost, which every training batch pays.
    """

    def __init__(self, sparse: SparK, reuse_batch: bool = False) -> None:
        super().__init__()
        self.model = sparse
        self.reuse_batch = reuse_batch
        if reuse_batch and not isinstance(sparse.encoder, SparseEncoder):
            raise ValueError(f"reuse_batch needs a SparseEncoder (its forward_sparse), got {type(sparse.encoder).__name__}")
        self._gathered: Optional[tuple[torch.Tensor, torch.Tensor, ME.SparseTensor]] = None

    def encode(self, images: torch.Tensor, active: torch.Tensor) -> list[ME.SparseTensor]:
        encoder = self.model.encoder
        if not self.reuse_batch:
            return encoder(images, active)
        if self._gathered is None or self._gathered[0] is not images or self._gathered[1] is not active:
            check_inputs(images, active, encoder.downsample_ratio)
            self._gathered = (images, active, to_sparse(images, active, encoder.downsample_ratio))
        return encoder.forward_sparse(self._gathered[2])

    def forward(self, images: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        return self.model(images, active)


def build_variant(sparse: SparK, variant: str, reuse_batch: bool = False) -> nn.Module:
    """One of VARIANTS, with ``sparse``'s weights (the dense ones are copies);
    ``reuse_batch``: see :class:`SparseSparK` (the sparse variant only)."""
    if reuse_batch and variant != "sparse":
        raise ValueError(f"reuse_batch is for the sparse variant, got {variant!r}")
    if variant == "sparse":
        return SparseSparK(sparse, reuse_batch)
    if variant == "masked_dense":
        return MaskedDenseSparK(sparse)
    if variant == "dense":
        return PlainDenseSparK(sparse)
    raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")


def as_dense(features: Features, batch_size: int, image_size: tuple[int, int]) -> list[torch.Tensor]:
    """Feature maps as dense tensors (sparse ones scattered, zero at absent sites)."""
    out = []
    for f in features:
        if isinstance(f, ME.SparseTensor):
            s = f.tensor_stride[0]
            f = to_dense(f, batch_size, (image_size[0] // s, image_size[1] // s))
        out.append(f)
    return out


def feature_sum(features: Features) -> torch.Tensor:
    """A scalar depending on every feature: the loss of the encoder-only benchmarks."""
    return sum((f.F if isinstance(f, ME.SparseTensor) else f).float().sum() for f in features)
