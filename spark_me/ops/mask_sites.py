"""A SparK batch's sites and neighbour tables at every scale, from its patch mask alone.

Every coordinate set of a SparK batch is an upsampled patch mask: at tensor stride ``t``
the sites are the multiples of ``t`` inside visible patches. Their number is known on the
host (visible patches × ``(patch / t)²``), so their coordinates, and every neighbour table
between two such sets, can be computed on the device with fixed-shape ops only: no
MinkowskiEngine map, no coordinate copy, no host synchronisation. This is how a CUDA
graph's tables are refilled per batch (:mod:`spark_me.cuda_graphs`, which captures that
work as a graph too): the host does not wait on the GPU in front of a replay.

The row order is row-major ``[b, y, x]``. That is the order both gathers
(:mod:`spark_me.gather`) insert the batch's first coordinates in, and MinkowskiEngine keeps
the insertion order of unique coordinates (its GPU insert compacts the successful
insertions with a stable ``remove_if``; its CPU map likewise), so these tables fit the
gathered features as they are. MinkowskiEngine's *strided* maps order their sites by hash
instead; tables built here put every coarser scale in row-major order too, consistently
across the tables, and the output features come out in that order (tested against the
plain encoder, whose maps are in MinkowskiEngine's order).

Whether every output site of a table has all its neighbours (``complete``) does not
depend on the mask, given the shapes: an even kernel equal to its stride reads inside one
output cell, which lies inside one patch; a centred kernel (k ≥ 3) reaches a row above the
topmost visible site of a sample, which is masked or outside the image; a 1×1 reads the
site itself. So a table rebuilt here keeps the captured table's flag.
"""
from __future__ import annotations

from typing import Optional

import MinkowskiEngine as ME
import torch

from spark_me.masking import upsample_mask
from spark_me.ops.tables import NeighbourTables, _grid_lookup


def row_major_sites(grid: torch.Tensor, count: int) -> torch.Tensor:
    """``[count, 3]`` int64 ``[b, y, x]`` indices of the True cells of a ``(B, H, W)`` bool
    ``grid`` in row-major order, as ``grid.nonzero()`` gives them, without reading the
    number back to the host. ``count`` must be that number (the caller knows it)."""
    flat = grid.flatten()
    slot = torch.where(flat, flat.cumsum(0) - 1, count)  # a True cell's row; False cells share a spare slot
    cells = torch.empty(count + 1, dtype=torch.int64, device=grid.device)
    cells.scatter_(0, slot, torch.arange(flat.numel(), device=grid.device))
    cells = cells[:count]
    height, width = grid.shape[1:]
    return torch.stack((cells.div(height * width, rounding_mode="floor"),
                        cells.div(width, rounding_mode="floor").remainder(height), cells.remainder(width)), dim=1)


class MaskSites:
    """The sites of one batch at any tensor stride up to the patch size, and the neighbour
    tables between them, derived from its ``(B, h, w)`` patch mask on its device (module
    docstring). ``visible_patches`` is the number of True cells of the mask, known on the
    host from the gathered rows. Coordinates are computed once per stride and kept."""

    def __init__(self, patch_mask: torch.Tensor, patch_size: int, visible_patches: int,
                 extent: tuple[int, int, int]) -> None:
        self.patch_mask = patch_mask
        self.patch_size = patch_size
        self.visible_patches = visible_patches
        self.extent = extent
        self._coordinates: dict[int, torch.Tensor] = {}

    @classmethod
    def of(cls, x: ME.SparseTensor, patch_mask: Optional[torch.Tensor] = None) -> "MaskSites":
        """The sites of gathered batch ``x`` (its manager a :class:`~spark_me.ops.tables.TableCache`
        that knows the batch's patch mask and extent), from ``patch_mask`` where given (a
        static copy of the same shape) or else the manager's."""
        cm = x.coordinate_manager
        visible = x.F.shape[0] // (cm.patch_size // x.tensor_stride[0]) ** 2
        return cls(cm.patch_mask if patch_mask is None else patch_mask, cm.patch_size, visible, cm.extent)

    def count(self, tensor_stride: int) -> int:
        """Number of sites at ``tensor_stride``."""
        return self.visible_patches * (self.patch_size // tensor_stride) ** 2

    def coordinates(self, tensor_stride: int) -> torch.Tensor:
        """``[n, 3]`` int32 pixel coordinates ``[b, y, x]`` of the sites at ``tensor_stride``
        (which divides the patch size), row-major."""
        if self.patch_size % tensor_stride:
            raise ValueError(f"tensor stride {tensor_stride} does not divide the patch size {self.patch_size}")
        if tensor_stride not in self._coordinates:
            grid = upsample_mask(self.patch_mask, self.patch_size // tensor_stride)
            sites = row_major_sites(grid, self.count(tensor_stride))
            sites[:, 1:] *= tensor_stride
            self._coordinates[tensor_stride] = sites.int()
        return self._coordinates[tensor_stride]

    def tables(self, tensor_stride: int, kernel_size: int, stride: int, out_key: ME.CoordinateMapKey,
               complete: Optional[bool] = None) -> NeighbourTables:
        """The ``kernel_size``×``kernel_size`` / ``stride`` tables from the sites at
        ``tensor_stride`` to those at ``tensor_stride * stride``. ``out_key`` and
        ``complete`` are the captured table's (module docstring); they are not checked."""
        in_coords = self.coordinates(tensor_stride)
        out_coords = in_coords if stride == 1 else self.coordinates(tensor_stride * stride)
        forward = _grid_lookup(in_coords, None if stride == 1 else out_coords, tensor_stride, kernel_size, self.extent)
        tables = NeighbourTables(forward, out_key, kernel_size, stride, len(in_coords), len(out_coords),
                                 sites=lambda: (in_coords, out_coords), tensor_stride=tensor_stride, extent=self.extent)
        tables._complete = complete
        return tables
