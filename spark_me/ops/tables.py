"""Neighbour tables: MinkowskiEngine's kernel maps as dense ``[K, N]`` index tables.

A kernel map lists, per kernel offset, the (input row, output row) pairs that the offset
connects. The sparse ops want it the other way round, one row per tap in PyTorch's
``ky*k + kx`` order and one column per site, so that a tap becomes one ``index_select``:

* ``forward[t, o]``: the input row at tap ``t`` of output site ``o``, or ``n_in`` (the
  zero row appended to the input) when that neighbour is absent;
* ``pairs[t]``: the kernel map's own (input rows, output rows) of tap ``t``, for the
  ops that skip absent neighbours instead of reading a zero row.

Tables are cached per (input map, kernel, stride) on a :class:`TableCache`, a
``CoordinateManager`` that keeps them for the lifetime of its batch, as MinkowskiEngine
keeps its kernel maps. Tensors on a plain ``CoordinateManager`` get fresh tables per call.
"""
from __future__ import annotations

from typing import Optional

import MinkowskiEngine as ME
import torch


def kernel_tap_order(kernel_size: int) -> torch.Tensor:
    """For each MinkowskiEngine kernel offset, the flat index ``ky*k + kx`` of the tap.

    MinkowskiEngine enumerates the offsets of a hyper-cube kernel with the first spatial
    axis (our y) varying fastest; PyTorch flattens ``[kh, kw]`` with x fastest.
    """
    ky, kx = torch.meshgrid(torch.arange(kernel_size), torch.arange(kernel_size), indexing="xy")
    # meshgrid 'xy' makes ky vary along dim 1 (fastest after flatten): ME's order.
    return (ky * kernel_size + kx).flatten()


class NeighbourTables:
    """The tables of one (input map, kernel, stride); see the module docstring.

    ``forward`` is ``[K, n_out]``; ``pairs[t]`` is tap ``t``'s (input rows, output rows),
    only the neighbours that exist (MinkowskiEngine's kernel map, in tap order);
    ``complete`` says whether every output site has all its K neighbours.
    """

    def __init__(
        self,
        forward: torch.Tensor,
        pairs: list[tuple[torch.Tensor, torch.Tensor]],
        out_key: ME.CoordinateMapKey,
        kernel_size: int,
        stride: int,
        n_in: int,
        n_out: int,
    ) -> None:
        self.forward = forward  # [K, n_out] int64, sentinel n_in
        self.pairs = pairs
        self.out_key = out_key
        self.kernel_size = kernel_size
        self.stride = stride
        self.n_in = n_in
        self.n_out = n_out
        self.complete = sum(len(i) for i, _ in pairs) == forward.numel()


class TableCache(ME.CoordinateManager):
    """A ``CoordinateManager`` that also keeps the neighbour tables built on its maps."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.neighbour_tables: dict[tuple, NeighbourTables] = {}


def new_coordinate_manager(coordinates: torch.Tensor) -> TableCache:
    """A fresh table-caching manager for 2-D coordinates ``[N, 3]`` on their device."""
    map_type = ME.CoordinateMapType.CUDA if coordinates.is_cuda else ME.CoordinateMapType.CPU
    return TableCache(D=coordinates.shape[1] - 1, coordinate_map_type=map_type)


def neighbour_tables(x: ME.SparseTensor, kernel_size: int, stride: int) -> NeighbourTables:
    """Tables of a ``kernel_size``×``kernel_size`` / ``stride`` conv or pool on ``x``'s sites.

    Output sites: the input sites for stride 1, else the input sites floored to the new
    stride (MinkowskiEngine's strided map, shared with its own convs and pools).
    """
    cm, in_key = x.coordinate_manager, x.coordinate_map_key
    cache = cm.neighbour_tables if isinstance(cm, TableCache) else None
    cache_key = (tuple(in_key.get_key()[0]), in_key.get_key()[1], kernel_size, stride)
    if cache is not None and cache_key in cache:
        return cache[cache_key]
    out_key = in_key if stride == 1 else cm.stride(in_key, stride)
    kmap = cm.kernel_map(in_key, out_key, stride=stride, kernel_size=kernel_size, dilation=1)
    device = x.F.device
    n_in, n_out = x.F.shape[0], cm.size(out_key)
    volume = kernel_size * kernel_size
    taps = kernel_tap_order(kernel_size).tolist()
    forward = torch.full((volume, n_out), n_in, dtype=torch.long, device=device)
    empty = torch.empty(0, dtype=torch.long, device=device)
    pairs = [(empty, empty)] * volume
    for offset, in_out in kmap.items():
        in_out = in_out.to(device=device, dtype=torch.long)
        forward[taps[offset], in_out[1]] = in_out[0]
        pairs[taps[offset]] = (in_out[0], in_out[1])
    tables = NeighbourTables(forward, pairs, out_key, kernel_size, stride, n_in, n_out)
    if cache is not None:
        cache[cache_key] = tables
    return tables
