"""The tables a CUDA graph's replay refills per batch: from MinkowskiEngine's maps or from the patch mask.

    python -m kernels_bench.refill [--models resnet50 convnext_tiny] [--batch 8] [--size 224]
        [--mask 0.6] [--dense-stem] [--drop-path 0.05] [--device cpu] [--rounds 16] [--out FILE.json]

For each model the encoder runs once on a template batch, which records the tables it asks
for (the ones a captured graph reads). Then, alternating on fresh batches, every one of
them is built with the parts the template built (dense-map positions, Triton's inverse
tables, batch indices) in two ways:

* ``maps``: through MinkowskiEngine's strided maps and coordinates (``tables_on``), as
  replays refilled them until 2026-11-27 (on a GPU: host synchronisations inside);
* ``mask``: from the batch's patch mask (:class:`spark_me.ops.mask_sites.MaskSites`)
  (fixed-shape device ops only);
* ``mask_graph`` (CUDA only): the same captured as a CUDA graph, the patch mask copied into
  its static input and the graph replayed, as replays do now
  (:func:`spark_me.cuda_graphs.capture_refill`).

It reports, per way, the median wall time until the device has finished and until the
host may go on (the first two rounds dropped; on a CPU the two are the same), and the
ATen calls. The gather is outside the timing.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from spark_me import build_sparse_encoder
from spark_me.cuda_graphs import capture_refill
from spark_me.masking import random_patch_mask
from spark_me.ops.mask_sites import MaskSites
from spark_me.ops.tables import NeighbourTables, TableCache, tables_on

log = logging.getLogger("kernels_bench.refill")
WAYS = ("maps", "mask")  # on CUDA also "mask_graph"


class _CountCalls(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def _with_parts(fresh: NeighbourTables, template: NeighbourTables) -> None:
    """Build the lazily made parts of ``fresh`` that ``template`` has."""
    if template._dense_grid is not None:
        fresh.dense_grid
    if template._triton_inverse is not None:
        from spark_me.ops.triton_backend import inverse_table

        inverse_table(fresh)


def refill_from_maps(template: TableCache, x) -> None:
    """Every table and batch index of ``template`` for the batch ``x``, through its maps."""
    cm, device = x.coordinate_manager, x.F.device
    keys = {x.tensor_stride[0]: x.coordinate_map_key}
    for (stride_pair, _, kernel_size, stride), captured in template.neighbour_tables.items():
        fresh = tables_on(cm, keys[stride_pair[0]], kernel_size, stride, device, cache=False)
        keys[stride_pair[0] * stride] = fresh.out_key
        if captured._complete is not None:  # the old refill compared it with the template's: a read-back
            fresh.complete
        _with_parts(fresh, captured)
    for stride_pair, _ in template.batch_indices:
        cm.batch_index(keys[stride_pair[0]], device)


def refill_from_mask(template: TableCache, x) -> None:
    """The same from ``x``'s patch mask."""
    _from_sites(template, MaskSites.of(x))


def _from_sites(template: TableCache, sites: MaskSites) -> None:
    for (stride_pair, _, kernel_size, stride), captured in template.neighbour_tables.items():
        _with_parts(sites.tables(stride_pair[0], kernel_size, stride, captured.out_key, captured._complete), captured)
    for stride_pair, _ in template.batch_indices:
        sites.coordinates(stride_pair[0])[:, 0].long()


def measure(model: str, batch: int, size: int, mask: float, dense_stem: bool, drop_path: float,
            device: torch.device, rounds: int) -> dict:
    """One model's row: per way the median wall time until done and until the host may go
    on (the same on a CPU), in seconds, and the ATen calls; and the number of tables."""
    torch.manual_seed(0)
    encoder = build_sparse_encoder(model, dense_stem=dense_stem, drop_path_rate=drop_path).to(device).train()
    generator = torch.Generator().manual_seed(0)

    def gathered():
        images = torch.randn(batch, 3, size, size, generator=generator).to(device)
        active = random_patch_mask(batch, (size // 32, size // 32), mask, generator).to(device)
        with torch.no_grad():
            return encoder.gather(images, active)

    template = gathered()
    template.F.requires_grad_()
    sum(f.F.float().sum() for f in encoder.forward_gathered(template)).backward()  # the backward's tables too
    tables: TableCache = template.coordinate_manager
    ways: dict[str, Callable] = {"maps": refill_from_maps, "mask": refill_from_mask}
    if device.type == "cuda":
        static = tables.patch_mask.clone()
        with torch.no_grad():
            refill = partial(_from_sites, tables, MaskSites.of(template, static))
            refill()  # once before the capture, as the encoder's graphs do
            replay = capture_refill(refill, device)

        def refill_from_mask_graph(_: TableCache, x) -> None:
            static.copy_(x.coordinate_manager.patch_mask)
            replay()

        ways["mask_graph"] = refill_from_mask_graph
    times: dict[str, list[float]] = {w: [] for w in ways}
    issued: dict[str, list[float]] = {w: [] for w in ways}  # until the host may go on (CUDA: before the device ends)
    for r in range(rounds):
        for way in list(ways) if r % 2 else reversed(ways):
            x = gathered()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            with torch.no_grad():
                ways[way](tables, x)
            issued[way].append(time.perf_counter() - start)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[way].append(time.perf_counter() - start)
    calls = {}
    for way in ways:
        x = gathered()
        with torch.no_grad(), _CountCalls() as counter:
            ways[way](tables, x)
        calls[way] = counter.calls
    kept = slice(2, None) if rounds > 2 else slice(None)
    return {"model": model, "batch": batch, "size": size, "mask_ratio": mask, "dense_stem": dense_stem,
            "drop_path_rate": drop_path,
            "device": str(device), "rounds": rounds, "tables": len(tables.neighbour_tables),
            "batch_indices": len(tables.batch_indices),
            **{f"{w}_median_s": statistics.median(times[w][kept]) for w in ways},
            **{f"{w}_host_median_s": statistics.median(issued[w][kept]) for w in ways},
            **{f"{w}_aten_calls": calls[w] for w in ways}}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["resnet50", "convnext_tiny"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--mask", type=float, default=0.6)
    p.add_argument("--dense-stem", action="store_true", help="gather through the dense stem, as with model.dense_stem")
    p.add_argument("--drop-path", type=float, default=0.05,
                   help="drop path rate (its per-site batch indices are refilled too; ResNet-50's recipe: 0.05)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--rounds", type=int, default=16, help="batches per way (the first two are dropped)")
    p.add_argument("--out", type=Path, default=None, help="write the rows to this JSON file")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.rounds < 1:
        p.error(f"--rounds must be at least 1, got {args.rounds}")
    device = torch.device(args.device)
    rows = []
    for model in args.models:
        row = measure(model, args.batch, args.size, args.mask, args.dense_stem, args.drop_path, device, args.rounds)
        rows.append(row)
        ways = "; ".join(f"{w} {row[f'{w}_median_s'] * 1e3:.2f} ms (host {row[f'{w}_host_median_s'] * 1e3:.2f} ms), "
                         f"{row[f'{w}_aten_calls']} ATen calls" for w in (*WAYS, "mask_graph") if f"{w}_median_s" in row)
        log.info("%s (%d tables, %d batch indices): %s", model, row["tables"], row["batch_indices"], ways)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
        log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
