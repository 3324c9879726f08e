"""A batch's sites and neighbour tables from its patch mask (spark_me.ops.mask_sites).

The reference is the encoder's own tables on MinkowskiEngine's maps (themselves proven
against MinkowskiEngine's kernel maps in test_ops.py): the same pairs, in another row
order, for every table the encoders build, on masks from all visible to one visible patch.
"""
from __future__ import annotations

import MinkowskiEngine as ME
import pytest
import torch

from conftest import CUDA_READY, HostSyncAudit
from spark_me import build_sparse_encoder
from spark_me.masking import random_patch_mask
from spark_me.ops.mask_sites import MaskSites, row_major_sites


def _mask(batch: int, grid: tuple[int, int], ratio: float, seed: int) -> torch.Tensor:
    return random_patch_mask(batch, grid, ratio, torch.Generator().manual_seed(seed))


def _row_order(coords: torch.Tensor, extent: tuple[int, int, int]) -> torch.Tensor:
    """The row-major rank of each ``[b, y, x]`` pixel coordinate's position."""
    c = coords.long()
    return (c[:, 0] * extent[1] + c[:, 1]) * extent[2] + c[:, 2]


@pytest.mark.parametrize("shape, count", [((3, 5, 7), None), ((2, 4, 4), 0), ((2, 4, 4), 32), ((1, 1, 1), 1)])
def test_row_major_sites_are_nonzero_without_reading_the_count_back(shape, count):
    g = torch.Generator().manual_seed(0)
    grid = torch.rand(shape, generator=g) < 0.4 if count is None else torch.full(shape, bool(count))
    want = grid.nonzero()
    assert torch.equal(row_major_sites(grid, len(want)), want)


@pytest.mark.parametrize("ratio, seed", [(0.0, 0), (0.5, 1), (0.75, 2), (0.9, 3)])
@pytest.mark.parametrize("dense_stem", [False, True])
@pytest.mark.parametrize("name", ["resnet18", "convnext_atto"])
def test_every_table_the_encoder_builds_comes_from_the_mask_in_row_major_order(name, dense_stem, ratio, seed):
    """For each table the encoder's forward built on MinkowskiEngine's maps: the mask's
    sites are the map's sites, in row-major order, and the mask's table holds the same
    neighbour of every output site at every tap (row indices translated between the two
    orders), so also the same completeness. 64×160 images: 2×5 patches, one visible at
    mask ratio 0.9, all at 0."""
    torch.manual_seed(0)
    encoder = build_sparse_encoder(name, conv_impl="torch", dense_stem=dense_stem).double().train()
    images = torch.randn(3, 3, 64, 160, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x = encoder.gather(images, _mask(3, (2, 5), ratio, seed))
    encoder.forward_gathered(x)
    cm = x.coordinate_manager
    sites = MaskSites.of(x)
    assert sites.visible_patches == int(cm.patch_mask.sum())
    assert torch.equal(cm.get_coordinates(x.coordinate_map_key), sites.coordinates(x.tensor_stride[0]))
    checked = 0
    for (stride_pair, name, kernel_size, stride), mine in cm.neighbour_tables.items():
        t, in_key = stride_pair[0], ME.CoordinateMapKey(list(stride_pair), name)
        theirs = sites.tables(t, kernel_size, stride, mine.out_key)
        rank = {}
        for which, key, s in (("in", in_key, t), ("out", mine.out_key, t * stride)):
            coords = cm.get_coordinates(key)
            assert len(coords) == sites.count(s)
            order = _row_order(coords, cm.extent).argsort()
            assert torch.equal(coords[order], sites.coordinates(s)), (which, s)
            rank[which] = torch.empty_like(order).scatter_(0, order, torch.arange(len(order)))  # map row -> mask row
        sentinel = torch.tensor([mine.n_in])
        translated = torch.cat([rank["in"], sentinel])[mine.forward.long()]  # [K, n_out] in mask rows
        assert torch.equal(translated[:, rank["out"].argsort()], theirs.forward.long()), (t, kernel_size, stride)
        assert theirs.complete == mine.complete
        checked += 1
    assert checked >= (6 if dense_stem else 7)


@pytest.mark.parametrize("kernel_size, stride, complete", [(3, 1, False), (7, 1, False), (3, 2, False),
                                                           (2, 2, True), (4, 4, True), (1, 1, True)])
def test_completeness_is_the_same_for_every_mask(kernel_size, stride, complete):
    """A replay keeps its captured table's completeness (module docstring): whatever the
    mask, from one visible patch per sample to all of them, centred kernels miss a
    neighbour above the topmost visible site and cell-sized ones miss none."""
    for ratio in (0.0, 0.2, 0.6, 0.96):
        for seed in range(3):
            active = _mask(2, (5, 5), ratio, seed)
            sites = MaskSites(active, 32, int(active.sum()), (2, 160, 160))
            for t in (1, 4, 8):
                if 32 % (t * stride) == 0:
                    assert sites.tables(t, kernel_size, stride, None).complete == complete, (ratio, seed, t)


def test_the_mask_s_sites_need_no_host_read_and_no_host_tensor():
    """Sites, tables, dense-map positions and inverse tables from the mask make no op that
    would read a value back or size an output by the data, and make every tensor on the
    mask's device: on the meta device, where a host tensor copied over would fail."""
    active = _mask(2, (2, 3), 0.5, 0)
    count = int(active.sum())
    meta = active.to("meta")
    from spark_me.ops.triton_backend import inverse_table

    with torch.device("meta"), HostSyncAudit() as audit:
        sites = MaskSites(meta, 32, count, (2, 64, 96))
        for t, kernel_size, stride in ((1, 7, 2), (2, 3, 2), (4, 3, 1), (4, 2, 2), (8, 3, 2)):
            tables = sites.tables(t, kernel_size, stride, None)
            assert tables.forward.shape == (kernel_size**2, sites.count(t * stride))
            tables.dense_grid
            inverse_table(tables)
    assert audit.ops == [], list(zip(audit.ops, audit.sources))


def test_sites_at_a_stride_that_does_not_divide_the_patch_are_refused():
    sites = MaskSites(_mask(1, (1, 1), 0.0, 0), 32, 1, (1, 32, 32))
    with pytest.raises(ValueError, match="tensor stride 3 does not divide the patch size 32"):
        sites.coordinates(3)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA_READY, reason="needs a CUDA GPU and MinkowskiEngine built with CUDA")
def test_cuda_mask_tables_make_no_synchronisation_that_pytorch_sees():
    """On a GPU, PyTorch's sync debug mode turns any synchronisation into an error while
    the sites and tables are derived; they equal the CPU's."""
    active = _mask(4, (3, 3), 0.6, 0)
    count = int(active.sum())
    on_cpu = MaskSites(active, 32, count, (4, 96, 96))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sites = MaskSites(active.cuda(), 32, count, (4, 96, 96))
        tables = [sites.tables(t, k, s, None) for t, k, s in ((1, 7, 2), (4, 3, 1), (4, 2, 2), (8, 3, 2))]
        for t in tables:
            t.dense_grid
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for got, (t, k, s) in zip(tables, ((1, 7, 2), (4, 3, 1), (4, 2, 2), (8, 3, 2))):
        assert torch.equal(got.forward.cpu(), on_cpu.tables(t, k, s, None).forward)
    assert torch.equal(sites.coordinates(4).cpu(), on_cpu.coordinates(4))
