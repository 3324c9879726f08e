"""Neighbour tables: the (input row, output row) pairs of a conv as dense ``[K, N]`` tables.

MinkowskiEngine's kernel map lists, per kernel offset, the (input row, output row) pairs
that the offset connects. The sparse ops want it the other way round, one row per tap in
PyTorch's ``ky*k + kx`` order and one column per output site, so that a tap becomes one
``index_select``:

* ``forward[t, o]``: the input row at tap ``t`` of output site ``o``, or ``n_in`` (the
  zero row appended to the input) when that neighbour is absent;
* ``pairs[t]``: the kernel map's own form (input rows, output rows) of tap ``t``, for the
  ops that skip absent neighbours instead of reading a zero row.

MinkowskiEngine provides the coordinates, their row order and the strided output maps;
the table itself is read from a dense index grid of the input rows, which gives exactly
the pairs of MinkowskiEngine's kernel map (tested) at a fraction of its cost on CPU
(65 536 sites, 1 thread: 0.24-0.73 s per kernel map, 0.05-0.2 s per table including the
strided map and the coordinates, measured side by side on a loaded machine).

Tables are cached per (input map, kernel, stride) on a :class:`TableCache`, a
``CoordinateManager`` that keeps them for the lifetime of its batch, as MinkowskiEngine
keeps its kernel maps. Tensors on a plain ``CoordinateManager`` get fresh tables per call.

They live for the whole step, so they are kept small: row indices are int32
(:func:`index_dtype`; ``index_select``, ``index_add_`` and the Triton kernels take them as
they are), and a table keeps no copy of its sites' coordinates: the ops that need them
(the dense-map algorithms) read them from the coordinate manager on first use. A bf16
ResNet-50 step's tables at batch 8 (224 px, mask 0.6) went from 24.1 MiB (int64, with
coordinates) to 8.6 MiB: about 0.25 GiB less at batch 128.
"""
from __future__ import annotations

import weakref
from typing import Callable, NamedTuple, Optional

import MinkowskiEngine as ME
import torch

# The largest row index an int32 table holds; beyond it tables fall back to int64.
INT32_MAX = 2**31 - 1
# The profiler range around building a table and each of its parts built on first use
# (MinkowskiEngine's maps and coordinate copies, and their host synchronisations, are
# invisible to the profiler otherwise; kernels_bench.profile reports the time inside it).
TABLES_RANGE = "spark_me::neighbour_tables"


def index_dtype(n_rows: int) -> torch.dtype:
    """int32 where row indices up to ``n_rows`` (a sentinel included) fit it, else int64."""
    return torch.int32 if n_rows <= INT32_MAX else torch.int64


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

    ``forward`` is ``[K, n_out]`` (:func:`index_dtype`); ``pairs[t]`` (derived on first use)
    is tap ``t``'s (input rows, output rows) of the neighbours that exist, MinkowskiEngine's
    kernel-map form; ``complete`` says whether every output site has all its K neighbours.
    ``sites``, when given, returns the (input, output) sites' ``[N, 3]`` coordinates, for
    :attr:`dense_grid`.
    """

    def __init__(
        self, forward: torch.Tensor, out_key: ME.CoordinateMapKey, kernel_size: int, stride: int, n_in: int, n_out: int,
        sites: Optional[Callable[[], tuple[torch.Tensor, torch.Tensor]]] = None, tensor_stride: int = 1,
        extent: Optional[tuple[int, int, int]] = None,
    ) -> None:
        self.forward = forward  # [K, n_out], sentinel n_in
        self.out_key = out_key
        self.kernel_size = kernel_size
        self.stride = stride
        self.n_in = n_in
        self.n_out = n_out
        self._sites = sites
        self._tensor_stride = tensor_stride
        self._extent = extent
        self._complete: Optional[bool] = None
        self._pairs: Optional[list[tuple[torch.Tensor, torch.Tensor]]] = None
        self._dense_grid: Optional[DenseGrid] = None
        self._dense_in_shape: Optional[tuple[int, int, int]] = None
        self._triton_inverse: Optional[torch.Tensor] = None  # built by triton_backend.inverse_table

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor these tables hold (for memory accounting)."""
        held = [self.forward]
        held += [t for pair in self._pairs or [] for t in pair]
        held += [self._dense_grid.in_flat, self._dense_grid.out_flat] if self._dense_grid is not None else []
        held += [self._triton_inverse] if self._triton_inverse is not None else []
        return held

    @property
    def dense_shape(self) -> tuple[int, int, int]:
        """``(B, H, W)`` of the dense input map (a multiple of the stride), without building
        :attr:`dense_grid`: the batch's extent gives it where known, else the coordinates."""
        return self._dense_shape(None)

    def _dense_shape(self, in_coords: Optional[torch.Tensor]) -> tuple[int, int, int]:
        """:attr:`dense_shape`, computed once: from the extent, else from ``in_coords`` (read
        from the manager when not given)."""
        if self._dense_in_shape is None:
            tensor_stride, extent, s = self._tensor_stride, self._extent, self.stride
            if extent is not None:
                batch, height, width = extent[0], (extent[1] - 1) // tensor_stride + 1, (extent[2] - 1) // tensor_stride + 1
            else:
                if in_coords is None:
                    in_coords = self._read_sites()[0]
                batch = int(in_coords[:, 0].max()) + 1
                height, width = (int(in_coords[:, i].max()) // tensor_stride + 1 for i in (1, 2))
            self._dense_in_shape = (batch, -(-height // s) * s, -(-width // s) * s)  # whole output rows and columns
        return self._dense_in_shape

    def _read_sites(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._sites is None:
            raise ValueError("these tables were built without a way to read their sites' coordinates")
        return self._sites()

    @property
    def dense_grid(self) -> "DenseGrid":
        """Where the input and output sites lie on dense maps, for ops that scatter into a
        dense map, run a dense kernel there and read the output sites back."""
        if self._dense_grid is None:
            with torch.profiler.record_function(TABLES_RANGE):
                in_coords, out_coords = self._read_sites()
                in_shape = self._dense_shape(in_coords)
                s, tensor_stride = self.stride, self._tensor_stride
                out_shape = (in_shape[0], in_shape[1] // s, in_shape[2] // s)
                self._dense_grid = DenseGrid(in_shape, _flat(in_coords, tensor_stride, in_shape),
                                             out_shape, _flat(out_coords, tensor_stride * s, out_shape))
        return self._dense_grid

    @property
    def complete(self) -> bool:
        """Whether every output site has all K neighbours (read once, on first use: a
        device-to-host copy that a GPU step should not pay per table)."""
        if self._complete is None:
            with torch.profiler.record_function(TABLES_RANGE):
                self._complete = bool((self.forward < self.n_in).all())
        return self._complete

    @property
    def pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if self._pairs is None:
            with torch.profiler.record_function(TABLES_RANGE):
                self._pairs = []
                for row in self.forward:
                    out_rows = (row < self.n_in).nonzero().flatten().to(row.dtype)
                    self._pairs.append((row[out_rows], out_rows))
        return self._pairs


class DenseGrid(NamedTuple):
    """Input and output sites on dense ``(B, H, W)`` maps: ``in_flat[i]`` is input row i's
    flat index in the input map, ``out_flat[o]`` output row o's in the output map (the
    input map's shape is a multiple of the stride, so a stride-s conv of it yields exactly
    the output map)."""

    in_shape: tuple[int, int, int]
    in_flat: torch.Tensor
    out_shape: tuple[int, int, int]
    out_flat: torch.Tensor


def _flat(coords: torch.Tensor, tensor_stride: int, shape: tuple[int, int, int]) -> torch.Tensor:
    """Flat ``(b·H + y)·W + x`` indices (int64) of ``[b, y, x]`` pixel coordinates at ``tensor_stride``."""
    return _cells(coords.long(), tensor_stride, shape[1], shape[2], margin=0)


class TableCache(ME.CoordinateManager):
    """A ``CoordinateManager`` that also keeps the neighbour tables built on its maps.

    ``extent`` (batch, height, width in pixels), when the creator knows it, bounds every
    coordinate, so tables are built without reading the coordinates' range back from the
    device (four host synchronisations per table on a GPU). ``patch_mask`` (the batch's
    ``(B, h, w)`` visibility, on its device) and ``patch_size``, set by the gathers, let a
    CUDA graph derive the batch's tables without MinkowskiEngine
    (:mod:`spark_me.ops.mask_sites`).
    """

    def __init__(self, *args, extent: Optional[tuple[int, int, int]] = None,
                 patch_mask: Optional[torch.Tensor] = None, patch_size: Optional[int] = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.neighbour_tables: dict[tuple, NeighbourTables] = {}
        self.batch_indices: dict[tuple, torch.Tensor] = {}
        self.extent = extent
        self.patch_mask = patch_mask
        self.patch_size = patch_size

    def batch_index(self, key: ME.CoordinateMapKey, device: torch.device) -> torch.Tensor:
        """Each site's batch index on map ``key`` (int64, on ``device``): read from the
        coordinates once per map and kept for the batch, so per-sample layers (drop path)
        in every block do not copy the coordinates out of MinkowskiEngine again."""
        cache_key = _map_id(key)
        if cache_key not in self.batch_indices:
            check_coordinate_stream(device)
            with torch.profiler.record_function(TABLES_RANGE):
                self.batch_indices[cache_key] = self.get_coordinates(key)[:, 0].to(device, torch.int64)
        return self.batch_indices[cache_key]

    def __repr__(self) -> str:
        """A summary from Python state only. Printing a ``SparseTensor`` (whose repr includes
        its manager's) killed a CUDA test run with SIGSEGV while pytest formatted a failed
        assertion (docs/gpu.md); MinkowskiEngine's own manager repr, which goes into its C++
        map printer, is the likely cause (not isolated)."""
        return (f"TableCache(D={self.D}, {self._CoordinateManagerClass.__name__}, extent={self.extent}, "
                f"patch_size={self.patch_size}, {len(self.neighbour_tables)} neighbour tables)")

    def table_bytes(self) -> int:
        """Bytes of the tensors this batch's caches hold (neighbour tables and per-site batch
        indices), each storage once."""
        tensors = [t for tables in self.neighbour_tables.values() for t in tables.tensors()]
        tensors += self.batch_indices.values()
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
        return sum(storages.values())


def check_coordinate_stream(device: torch.device) -> None:
    """Raise unless MinkowskiEngine's coordinate maps may be built now on ``device``.

    MinkowskiEngine launches its CUDA coordinate kernels on the legacy default stream
    whatever stream is current, but takes their memory from PyTorch's allocator on the
    current stream: under another stream (a CUDA graph's warm-up or capture, a user's
    ``torch.cuda.stream``) its maps race with the kernels that read them. Every table
    builder calls this before it asks MinkowskiEngine for maps or coordinates.
    """
    if device.type == "cuda" and torch.cuda.current_stream(device) != torch.cuda.default_stream(device):
        raise RuntimeError("neighbour tables and batch indices must be built on the default CUDA stream "
                           "(MinkowskiEngine runs its coordinate kernels there): build them before switching "
                           "streams, e.g. run the batch once before capturing it as a CUDA graph")


def _map_id(key: ME.CoordinateMapKey) -> tuple:
    """A hashable identity of a coordinate map: (tensor stride, its string key)."""
    stride, name = key.get_key()
    return tuple(stride), name


def site_batch_index(x: ME.SparseTensor) -> tuple[torch.Tensor, int]:
    """``x``'s per-site batch index (int64, on its features' device) and the batch size.

    On a :class:`TableCache` that knows its extent both come without a host
    synchronisation (the index is read once per map and cached); on another manager they
    are read from the coordinates, and the batch size is their largest batch index + 1.
    """
    cm, device = x.coordinate_manager, x.F.device
    if isinstance(cm, TableCache) and cm.extent is not None:
        return cm.batch_index(x.coordinate_map_key, device), cm.extent[0]
    index = x.C[:, 0].to(device, torch.int64)
    return index, int(index.max()) + 1 if len(index) else 0


def new_coordinate_manager(
    coordinates: torch.Tensor, extent: Optional[tuple[int, int, int]] = None, patch_mask: Optional[torch.Tensor] = None,
    patch_size: Optional[int] = None,
) -> TableCache:
    """A fresh table-caching manager for 2-D coordinates ``[N, 3]`` on their device;
    ``extent`` = (batch, height, width): every coordinate lies in ``[0, extent)``; a SparK
    batch's ``patch_mask`` and ``patch_size`` (see :class:`TableCache`)."""
    check_coordinate_stream(coordinates.device)
    map_type = ME.CoordinateMapType.CUDA if coordinates.is_cuda else ME.CoordinateMapType.CPU
    return TableCache(D=coordinates.shape[1] - 1, coordinate_map_type=map_type, extent=extent,
                      patch_mask=patch_mask, patch_size=patch_size)


def kernel_reach(kernel_size: int) -> int:
    """How many sites a kernel's taps reach from its output site: ``k // 2`` either way for
    odd (centred) kernels, ``k - 1`` forward for even ones (offsets ``[0, k)``)."""
    return kernel_size // 2 if kernel_size % 2 else kernel_size - 1


def _cells(coords: torch.Tensor, tensor_stride: int, height: int, width: int, margin: int) -> torch.Tensor:
    """Each ``[b, y, x]`` pixel coordinate's cell ``(b·height + y/s + margin)·width + x/s +
    margin`` on a ``(B, height, width)`` grid of the sites at tensor stride ``s`` with
    ``margin`` empty sites before the first row and column (int64 coordinates: int64 cells)."""
    s = tensor_stride
    y, x = (coords[:, 1], coords[:, 2]) if s == 1 else (coords[:, 1].div(s, rounding_mode="floor"),
                                                        coords[:, 2].div(s, rounding_mode="floor"))
    cells = torch.add(x, torch.add(y, coords[:, 0], alpha=height), alpha=width)
    return cells.add_(margin * (width + 1)) if margin else cells


def _grid_lookup(
    in_coords: torch.Tensor, out_coords: Optional[torch.Tensor], tensor_stride: int, kernel_size: int,
    extent: Optional[tuple[int, int, int]] = None,
) -> torch.Tensor:
    """``[K, n_out]`` (:func:`index_dtype`): the input row at each tap of each output site,
    or ``n_in``; ``out_coords`` None means the input sites (a stride-1 table).

    The input rows are written into a dense ``(B, H, W)`` index grid (with a margin of
    :func:`kernel_reach` sites, so no lookup leaves it or wraps into the next row) and read
    back at every output site shifted by every tap offset: the same pairs as
    MinkowskiEngine's kernel map (proven in tests/test_ops.py), at a fraction of its cost
    on CPU. The grid's size comes from ``extent`` (pixels) when given, else from the
    coordinates' range. With ``extent`` nothing is read back to the host: no host
    synchronisation on a GPU, where tables are built per batch in front of the encoder
    (the tap offsets too are computed on the device, not copied to it).
    """
    n_in, device = len(in_coords), in_coords.device
    margin = kernel_reach(kernel_size)
    if extent is not None:
        batch, height, width = extent[0], *((extent[i] - 1) // tensor_stride + 1 for i in (1, 2))
    else:
        if n_in and int(in_coords[:, 1:].min()) < 0:
            raise ValueError("sparse ops need non-negative coordinates (pixel positions [b, y, x])")
        batch = int(in_coords[:, 0].max()) + 1 if n_in else 1
        height, width = (int(in_coords[:, i].max()) // tensor_stride + 1 if n_in else 1 for i in (1, 2))
    height, width = height + 2 * margin, width + 2 * margin
    in_cells = _cells(in_coords.long(), tensor_stride, height, width, margin)  # index_copy_ takes int64 indices
    out_cells = in_cells if out_coords is None else _cells(out_coords.long(), tensor_stride, height, width, margin)
    dtype = index_dtype(n_in)
    grid = torch.full((batch * height * width,), n_in, dtype=dtype, device=device)
    grid.index_copy_(0, in_cells, torch.arange(n_in, dtype=dtype, device=device))
    # tap t = ky·k + kx sits (ky + start)·width + (kx + start) cells from its output site
    start = -(kernel_size // 2) if kernel_size % 2 else 0
    taps = torch.arange(kernel_size * kernel_size, device=device)
    shifts = torch.add(taps, taps.div(kernel_size, rounding_mode="floor"), alpha=width - kernel_size)
    shifts.add_(start * (width + 1))
    if grid.numel() <= INT32_MAX:  # int32 lookups where the cells fit: half the [K, n_out] temporary
        out_cells, shifts = out_cells.int(), shifts.int()
    lookup = out_cells.unsqueeze(0) + shifts.unsqueeze(1)
    return grid.index_select(0, lookup.view(-1)).view(len(shifts), -1)


def neighbour_tables(x: ME.SparseTensor, kernel_size: int, stride: int) -> NeighbourTables:
    """Tables of a ``kernel_size``×``kernel_size`` / ``stride`` conv or pool on ``x``'s sites.

    Output sites: the input sites for stride 1, else the input sites floored to the new
    stride (MinkowskiEngine's strided map, shared with its own convs and pools).
    """
    return tables_on(x.coordinate_manager, x.coordinate_map_key, kernel_size, stride, x.F.device)


def tables_on(
    cm: ME.CoordinateManager, in_key: ME.CoordinateMapKey, kernel_size: int, stride: int, device: torch.device,
    cache: bool = True,
) -> NeighbourTables:
    """:func:`neighbour_tables` of the sites of map ``in_key`` on ``cm``, on ``device``
    (kept on ``cm`` where it is a :class:`TableCache` and ``cache`` is on)."""
    store = cm.neighbour_tables if cache and isinstance(cm, TableCache) else None
    cache_key = (*_map_id(in_key), kernel_size, stride)
    if store is not None and cache_key in store:
        return store[cache_key]
    with torch.profiler.record_function(TABLES_RANGE):
        tables = _build_tables(cm, in_key, kernel_size, stride, device)
    if store is not None:
        store[cache_key] = tables
    return tables


def _build_tables(
    cm: ME.CoordinateManager, in_key: ME.CoordinateMapKey, kernel_size: int, stride: int, device: torch.device
) -> NeighbourTables:
    """:func:`tables_on` without the cache."""
    check_coordinate_stream(device)
    cached = isinstance(cm, TableCache)
    tensor_stride = in_key.get_key()[0][0]
    out_key = in_key if stride == 1 else cm.stride(in_key, stride)
    # The tables keep no coordinates; `sites` reads them again where an op needs them. A
    # cached table refers to its manager weakly (the manager holds the table), and is only
    # used while the manager's batch lives.
    manager = weakref.ref(cm) if cached else (lambda cm=cm: cm)

    def sites() -> tuple[torch.Tensor, torch.Tensor]:
        check_coordinate_stream(device)
        live = manager()
        if live is None:
            raise RuntimeError("the coordinate manager of these neighbour tables was freed with its batch")
        coords = live.get_coordinates(in_key).to(device)
        return coords, coords if stride == 1 else live.get_coordinates(out_key).to(device)

    in_coords, out_coords = sites()
    extent = cm.extent if cached else None
    forward = _grid_lookup(in_coords, None if stride == 1 else out_coords, tensor_stride, kernel_size, extent)
    return NeighbourTables(forward, out_key, kernel_size, stride, len(in_coords), len(out_coords),
                           sites=sites, tensor_stride=tensor_stride, extent=extent)
