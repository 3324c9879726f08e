"""Gathering: the visible pixels of a batch become a sparse tensor; and back to dense.

The coordinates of the sparse tensor *are* the mask: a site exists iff its patch is
visible. Coordinates are int32 ``[b, y, x]`` in input pixels at every scale (a feature at
tensor stride s sits at multiples of s).
"""
from __future__ import annotations

import MinkowskiEngine as ME
import torch
import torch.nn.functional as F

from spark_me.masking import upsample_mask
from spark_me.ops import new_coordinate_manager


def check_image_size(height: int, width: int, patch_size: int) -> None:
    """Raise ValueError unless both sides are multiples of ``patch_size``."""
    if height % patch_size or width % patch_size:
        raise ValueError(
            f"image size {height}x{width} is not a multiple of the encoder's downsample ratio "
            f"{patch_size}; resize or crop to e.g. {max(1, height // patch_size) * patch_size}x"
            f"{max(1, width // patch_size) * patch_size}"
        )


def check_inputs(images: torch.Tensor, active: torch.Tensor, patch_size: int) -> None:
    """Raise ValueError naming the problem when images/mask do not fit together."""
    if images.dim() != 4:
        raise ValueError(f"images must be (B, 3, H, W), got shape {tuple(images.shape)}")
    b, c, h, w = images.shape
    if c != 3:
        raise ValueError(f"images must have 3 channels (RGB), got {c}: convert grayscale/RGBA first")
    if not images.is_floating_point():
        raise ValueError(
            f"images must be floating point and ImageNet-normalised, got {images.dtype}: "
            "spark_me.data.normalize turns uint8 images (0-255) into them"
        )
    check_image_size(h, w, patch_size)
    expected = (b, h // patch_size, w // patch_size)
    if tuple(active.shape) != expected:
        raise ValueError(
            f"mask shape {tuple(active.shape)} does not match images {tuple(images.shape)}: "
            f"expected (B, H/{patch_size}, W/{patch_size}) = {expected}"
        )
    if active.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor (True = visible), got {active.dtype}")
    empty = (~active.flatten(1).any(dim=1)).nonzero().flatten()
    if len(empty):
        raise ValueError(
            f"sample(s) {empty.tolist()} have no visible patch; every sample needs at least "
            "one (lower the mask ratio)"
        )


def to_sparse(images: torch.Tensor, active: torch.Tensor, patch_size: int) -> ME.SparseTensor:
    """Visible pixels of ``images`` (B, C, H, W) as a SparseTensor at tensor stride 1.

    Its coordinate manager caches the neighbour tables of the sparse ops for this batch
    and knows the batch's patch mask. Rows are in row-major ``[b, y, x]`` order, which
    :mod:`spark_me.ops.mask_sites` relies on. (A profiler range, ``spark_me::to_sparse``,
    lets kernels_bench.profile time it.)
    """
    with torch.profiler.record_function("spark_me::to_sparse"):
        active = active.to(images.device)
        pixel_mask = upsample_mask(active, patch_size)  # B, H, W
        sites = pixel_mask.nonzero()  # [b, y, x], row-major: the one read-back (the count) of the gather
        features = images.permute(0, 2, 3, 1)[sites.unbind(1)]  # a mask index would count the sites again
        coords = sites.int().contiguous()
        manager = new_coordinate_manager(coords, extent=tuple(pixel_mask.shape), patch_mask=active,
                                         patch_size=patch_size)
        return ME.SparseTensor(features, coordinates=coords, coordinate_manager=manager)


def conv_to_sparse(
    images: torch.Tensor, active: torch.Tensor, patch_size: int, weight: torch.Tensor, bias: torch.Tensor | None,
    stride: int,
) -> ME.SparseTensor:
    """A first sparse conv of ``images``, computed as a dense conv of the zero-filled image
    and gathered at its output sites: a SparseTensor at tensor stride ``stride``.

    Exact: a sparse conv's output at a site sums its visible neighbours, which is the dense
    conv of the image with hidden pixels zeroed; and its output sites, the visible pixels
    floored to the stride, are the stride's sites in visible patches (``stride`` divides
    ``patch_size``). The dense conv costs the whole image's arithmetic (a stem's is a few
    percent of an encoder's) but no full-resolution coordinates, coordinate map or
    neighbour table: for a 7×7/2 stem at batch 128 the table alone is 126 MB. Rows are in
    row-major ``[b, y, x]`` order, as :func:`to_sparse`'s.
    ``weight`` is PyTorch's ``[out, 3, k, k]``: odd kernels centred, even ones equal to
    the stride (:class:`spark_me.layers.SparseConv2d`'s rules).
    """
    k = weight.shape[-1]
    if patch_size % stride or (k % 2 == 0 and k != stride):
        raise ValueError(f"a {k}x{k}/{stride} conv cannot run on the image before gathering: the stride must "
                         f"divide the patch size {patch_size}, and an even kernel must equal the stride")
    active = active.to(images.device)
    visible = upsample_mask(active, patch_size).unsqueeze(1)  # B, 1, H, W
    zero_filled = (images * visible).contiguous(memory_format=torch.channels_last)
    dense = F.conv2d(zero_filled, weight, bias, stride=stride, padding=k // 2 if k % 2 else 0)
    with torch.profiler.record_function("spark_me::to_sparse"):  # the gathering, not the conv
        sites = upsample_mask(active, patch_size // stride).nonzero()  # [b, y, x] on the output map, row-major
        _, channels, out_h, out_w = dense.shape
        flat = (sites[:, 0] * out_h + sites[:, 1]) * out_w + sites[:, 2]  # a mask index would find the sites again
        features = dense.permute(0, 2, 3, 1).reshape(-1, channels).index_select(0, flat)
        coords = sites.int().contiguous()  # (a CPU nonzero's result is column-major)
        coords[:, 1:] *= stride  # pixel coordinates, as at every scale (no host tensor: no copy to wait on)
        batch, _, height, width = images.shape
        manager = new_coordinate_manager(coords, extent=(batch, height, width), patch_mask=active, patch_size=patch_size)
        return ME.SparseTensor(features, coordinates=coords, tensor_stride=stride, coordinate_manager=manager)


def to_dense(
    x: ME.SparseTensor, batch_size: int, size: tuple[int, int], fill: torch.Tensor | None = None
) -> torch.Tensor:
    """Scatter a SparseTensor at tensor stride s into a dense (B, C, H/s, W/s) map.

    Absent sites are zero, or ``fill`` (broadcastable to (C,)) when given. Differentiable
    with respect to the features and ``fill``.
    """
    stride = x.tensor_stride[0]
    coords = x.C.long().to(x.F.device)
    b, y, xx = coords[:, 0], coords[:, 1] // stride, coords[:, 2] // stride
    h, w = size
    channels = x.F.shape[1]
    if fill is None:
        dense = x.F.new_zeros(batch_size, h, w, channels)
    else:
        dense = fill.reshape(1, 1, 1, channels).to(x.F.dtype).expand(batch_size, h, w, channels).clone()
    dense = dense.index_put((b, y, xx), x.F)
    return dense.permute(0, 3, 1, 2)


def site_mask(x: ME.SparseTensor, batch_size: int, size: tuple[int, int]) -> torch.Tensor:
    """(B, H/s, W/s) bool map of the sites that exist in ``x``."""
    stride = x.tensor_stride[0]
    coords = x.C.long()
    mask = torch.zeros(batch_size, *size, dtype=torch.bool, device=coords.device)
    mask[coords[:, 0], coords[:, 1] // stride, coords[:, 2] // stride] = True
    return mask
