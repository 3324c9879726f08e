"""Kernel-level bench: one sparse conv against the dense conv, density 0.1 to 1.0.

    python -m kernels_bench.kernels --device cpu --json kernels.json [--quick]

Each layer kind in :data:`LAYERS` (1×1, 3×3, depthwise 7×7 by our gathers and by
MinkowskiEngine's loop, strided 3×3/2 and 2×2/2) runs on a feature map at tensor stride 8
(image 224 -> a 28×28 map, C=256 by default: ResNet-50/ConvNeXt-T stage 2-3 sizes). The
sites are those of a random 32-px patch mask (``random_patch_mask`` with ratio
``1 - density`` on the 7×7 patch grid, as in training); ``density_actual`` is the
rounded fraction of visible patches it keeps.

Per (layer, density, pass), medians of ``repeats`` timed runs after ``warmup``, the
variants taking turns within each round:

* ``sparse_total_s``: a fresh ``SparseTensor`` from features + coordinates (a new
  coordinate manager, so the coordinate hash map and every kernel map are built anew,
  as in training, where the coordinates change every batch), then the conv;
* ``sparse_cached_s``: the same conv on a tensor whose coordinate manager already holds
  the coordinate map, the strided output map and the kernel map (the conv was run on it
  once before timing);
* ``kernel_map_s = sparse_total_s - sparse_cached_s``: the coordinate/kernel-map share.
  It includes ``coords_s`` (the ``SparseTensor`` construction alone, also reported), which
  a network pays once per batch rather than once per layer. A difference of medians, so
  it can come out slightly negative where it is tiny (the 1×1 conv needs no kernel map).
  With the gather backends (``conv_impl`` torch/auto) this share is the neighbour
  tables of :mod:`spark_me.ops.tables`, cached on the tensor's coordinate manager;
* ``kernel_map_direct_s``: the same share measured directly, with far less noise: a fresh
  ``SparseTensor`` plus the maps the layer needs, built through MinkowskiEngine's
  ``CoordinateManager.stride`` / ``.kernel_map`` (which also copies each map out into a
  tensor, a little more work than the conv's internal use). Includes ``coords_s`` too;
* ``dense_s``: ``nn.Conv2d`` with the same weights on the full dense (B, C, H, W) map;
* ``ratio = sparse_total_s / dense_s``.

``pass`` is ``"fwd"`` (forward under ``torch.no_grad``) or ``"fwd_bwd"`` (forward, then
backward of a contiguous gradient of ones into the input features and the weights).
Before timing a (layer, density), the sparse output is checked against the dense conv of
the zero-filled map, masked to the output sites (float32, relative error at most 1e-4); a
mismatch raises :class:`NumericsError`.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import MinkowskiEngine as ME
import torch
import torch.nn as nn
import torch.nn.functional as F

from spark_me.gather import to_dense
from spark_me.layers import SparseConv2d, with_features
from spark_me.masking import random_patch_mask, upsample_mask
from spark_me.ops import new_coordinate_manager

log = logging.getLogger("kernels_bench.kernels")

PATCH = 32  # SparK's mask patch, in input pixels
DENSITIES = tuple(round(0.1 * i, 1) for i in range(1, 11))
QUICK_DENSITIES = (0.2, 0.6, 1.0)
PASSES = ("fwd", "fwd_bwd")
TOLERANCE = 1e-4  # float32 relative error


@dataclass(frozen=True)
class LayerSpec:
    """One benchmarked conv: C -> C, kernel ``kernel_size``, ``stride``, optionally depthwise."""

    name: str
    kernel_size: int
    stride: int = 1
    depthwise: bool = False
    depthwise_impl: str = "gather"
    bias: bool = False


LAYERS: tuple[LayerSpec, ...] = (
    LayerSpec("conv1x1", 1),  # ResNet bottleneck conv1/conv3
    LayerSpec("conv3x3", 3),  # ResNet bottleneck conv2, submanifold
    LayerSpec("dw7x7", 7, depthwise=True, bias=True),  # ConvNeXt conv_dw, spark_me.ops gathers
    LayerSpec("dw7x7_me", 7, depthwise=True, depthwise_impl="minkowski", bias=True),  # ME's loop
    LayerSpec("conv3x3_s2", 3, stride=2),  # ResNet's first bottleneck of a stage
    LayerSpec("conv2x2_s2", 2, stride=2, bias=True),  # ConvNeXt downsample
)


class NumericsError(RuntimeError):
    """The sparse conv disagrees with the masked dense conv."""


@dataclass
class SparseInput:
    """A masked feature map: the visible sites as features + coordinates, and its dense twin."""

    features: torch.Tensor  # N, C
    coords: torch.Tensor  # N, 3 int32 [b, y, x] in input pixels
    tensor_stride: int
    dense: torch.Tensor  # B, C, H, W, zero at absent sites
    sites: torch.Tensor  # B, H, W bool
    density_actual: float

    def sparse(self, features: torch.Tensor | None = None) -> ME.SparseTensor:
        """A fresh SparseTensor (new coordinate manager) on these sites."""
        feats = self.features if features is None else features
        return ME.SparseTensor(feats, coordinates=self.coords, tensor_stride=self.tensor_stride,
                               coordinate_manager=new_coordinate_manager(self.coords))


def make_input(
    batch: int,
    channels: int,
    image_size: int,
    tensor_stride: int,
    density: float,
    generator: torch.Generator,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> SparseInput:
    """Random features at the sites of a random patch mask keeping ``density`` of the patches."""
    if image_size % PATCH or PATCH % tensor_stride:
        raise ValueError(f"image size {image_size} must be a multiple of {PATCH}, which a multiple of the stride {tensor_stride}")
    grid = image_size // PATCH
    active = random_patch_mask(batch, (grid, grid), 1.0 - density, generator)
    sites = upsample_mask(active, PATCH // tensor_stride)  # B, H, W at the map's resolution
    b, y, x = sites.nonzero().int().unbind(1)
    coords = torch.stack([b, y * tensor_stride, x * tensor_stride], 1).contiguous()
    features = torch.randn(len(coords), channels, generator=generator)
    dense = torch.zeros(batch, *sites.shape[1:], channels)
    dense[sites] = features
    return SparseInput(
        features=features.to(device, dtype),
        coords=coords.to(device),
        tensor_stride=tensor_stride,
        dense=dense.permute(0, 3, 1, 2).contiguous().to(device, dtype),
        sites=sites.to(device),
        density_actual=float(active.float().mean()),
    )


def make_layers(
    spec: LayerSpec, channels: int, device: str = "cpu", conv_impl: str = "auto", dtype: torch.dtype = torch.float32
) -> tuple[SparseConv2d, nn.Conv2d]:
    """The sparse conv and its dense ``nn.Conv2d`` twin, sharing the same weights."""
    k = spec.kernel_size
    groups = channels if spec.depthwise else 1
    dense = nn.Conv2d(channels, channels, k, spec.stride, padding=k // 2 if k % 2 else 0, groups=groups, bias=spec.bias)
    sparse = SparseConv2d(
        channels, channels, k, spec.stride, bias=spec.bias, groups=groups, depthwise_impl=spec.depthwise_impl,
        conv_impl=conv_impl,
    )
    sparse.load_state_dict(dense.state_dict())
    return sparse.to(device, dtype), dense.to(device, dtype)


def check_numerics(got: torch.Tensor, expected: torch.Tensor, tolerance: float = TOLERANCE) -> float:
    """Relative error ``||got - expected|| / ||expected||``; raise NumericsError above ``tolerance``."""
    if got.shape != expected.shape:
        raise NumericsError(f"shape mismatch: sparse {tuple(got.shape)} vs dense {tuple(expected.shape)}")
    denom = expected.double().norm()
    if not denom > 0:
        raise NumericsError("the dense reference is all zero: the check would prove nothing")
    err = float((got.double() - expected.double()).norm() / denom)
    if not err <= tolerance:  # also catches NaN
        raise NumericsError(f"sparse conv differs from the masked dense conv: relative error {err:.3g} > {tolerance:g}")
    return err


def verify_layer(sparse: SparseConv2d, dense: nn.Conv2d, inp: SparseInput, tolerance: float = TOLERANCE) -> float:
    """Sparse output vs. the dense conv of the zero-filled map, masked to the output sites.

    The expected output sites are computed independently of MinkowskiEngine: a stride-s
    conv's output site exists iff any input site of its s×s block does.
    """
    # exact float32 on both sides: CUDA convolutions default to TF32 (~1e-3 relative error)
    with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        out = sparse(inp.sparse())
        stride = sparse.stride
        out_sites = F.max_pool2d(inp.sites[:, None].float(), stride, stride) if stride > 1 else inp.sites[:, None].float()
        expected = dense(inp.dense) * out_sites
        if out.F.shape[0] != int(out_sites.sum()):
            raise NumericsError(f"sparse conv has {out.F.shape[0]} output sites, expected {int(out_sites.sum())}")
        got = to_dense(out, inp.dense.shape[0], tuple(expected.shape[-2:]))
    return check_numerics(got, expected, tolerance)


def median_times(fns: dict[str, Callable[[], None]], warmup: int, repeats: int, device: str) -> dict[str, float]:
    """Median wall time of each function over ``repeats`` runs after ``warmup``.

    The functions take turns within each round, so a drift in machine load hits them
    alike (the kernel-map share is a small difference of two of these medians).
    Synchronised on CUDA.
    """
    cuda = torch.device(device).type == "cuda"
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(warmup + repeats):
        for name, fn in fns.items():
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def build_maps(layer: SparseConv2d, x: ME.SparseTensor) -> None:
    """Build, through ``CoordinateManager``, the output and kernel maps ``layer`` needs on ``x``."""
    if layer.kernel_size == 1 and layer.stride == 1:
        return  # a plain matmul on the input sites
    cm, key = x.coordinate_manager, x.coordinate_map_key
    out_key = cm.stride(key, layer.stride) if layer.stride > 1 else key
    cm.kernel_map(key, out_key, stride=layer.stride, kernel_size=layer.kernel_size, dilation=1)


def _run_sparse(layer: SparseConv2d, x: ME.SparseTensor, backward: bool) -> None:
    if backward:
        layer.zero_grad(set_to_none=True)
        out = layer(x).F
        out.backward(torch.ones_like(out))
    else:
        with torch.no_grad():
            layer(x)


def _run_dense(layer: nn.Conv2d, x: torch.Tensor, backward: bool) -> None:
    if backward:
        layer.zero_grad(set_to_none=True)
        out = layer(x)
        out.backward(torch.ones_like(out))
    else:
        with torch.no_grad():
            layer(x)


def time_layer(
    sparse: SparseConv2d, dense: nn.Conv2d, inp: SparseInput, backward: bool, warmup: int, repeats: int, device: str
) -> dict[str, float]:
    """Sparse (fresh coordinates / cached maps / map construction) and dense times of one pass."""

    def leaf(t: torch.Tensor) -> torch.Tensor:
        return t.detach().requires_grad_(backward)

    def total() -> None:
        _run_sparse(sparse, inp.sparse(leaf(inp.features)), backward)

    held = inp.sparse(leaf(inp.features))
    _run_sparse(sparse, held, backward)  # builds and caches the output and kernel maps

    def cached() -> None:
        _run_sparse(sparse, with_features(held, leaf(inp.features)), backward)

    def coords() -> None:
        inp.sparse()

    def direct() -> None:
        build_maps(sparse, inp.sparse())

    dense_in = leaf(inp.dense)
    times = median_times(
        {
            "sparse_total_s": total,
            "sparse_cached_s": cached,
            "coords_s": coords,
            "kernel_map_direct_s": direct,
            "dense_s": lambda: _run_dense(dense, dense_in, backward),
        },
        warmup, repeats, device,
    )
    times["kernel_map_s"] = times["sparse_total_s"] - times["sparse_cached_s"]
    times["ratio"] = times["sparse_total_s"] / times["dense_s"]
    return times


def run_kernel_bench(
    device: str = "cpu",
    quick: bool = False,
    repeats: int = 3,
    warmup: int = 1,
    batch: int = 8,
    channels: int = 256,
    image_size: int = 224,
    tensor_stride: int = 8,
    layers: tuple[LayerSpec, ...] = LAYERS,
    densities: tuple[float, ...] | None = None,
    passes: tuple[str, ...] = PASSES,
    seed: int = 0,
    conv_impls: tuple[str, ...] = ("auto",),
    dtype: torch.dtype = torch.float32,
) -> list[dict]:
    """One row per (layer, density, pass); see the module docstring for the fields.

    ``quick`` shrinks the run for a smoke test (densities 0.2/0.6/1.0, batch <= 2,
    channels <= 64, one timed repeat).
    """
    if quick:
        batch, channels, repeats = min(batch, 2), min(channels, 64), min(repeats, 1)
    if densities is None:
        densities = QUICK_DENSITIES if quick else DENSITIES
    torch.manual_seed(seed)
    map_size = image_size // tensor_stride
    rows = []
    # bf16 sparse vs bf16 dense: both round differently from the fp32 truth, each by ~2^-8
    tolerance = TOLERANCE if dtype != torch.bfloat16 else 3e-2
    for spec, conv_impl in ((s, c) for s in layers for c in conv_impls):
        if conv_impl == "minkowski" and dtype != torch.float32:
            continue  # MinkowskiEngine computes in float32 only
        sparse, dense = make_layers(spec, channels, device, conv_impl, dtype)
        for density in densities:
            g = torch.Generator().manual_seed(seed + int(round(density * 1000)))
            inp = make_input(batch, channels, image_size, tensor_stride, density, g, device, dtype)
            err = verify_layer(sparse, dense, inp, tolerance)
            for pass_name in passes:
                times = time_layer(sparse, dense, inp, pass_name == "fwd_bwd", warmup, repeats, device)
                row = {
                    "bench": "kernel",
                    "layer": spec.name,
                    "conv_impl": conv_impl,
                    "dtype": str(dtype).removeprefix("torch."),
                    "pass": pass_name,
                    "density": density,
                    "density_actual": inp.density_actual,
                    "batch": batch,
                    "channels": channels,
                    "kernel_size": spec.kernel_size,
                    "stride": spec.stride,
                    "depthwise": spec.depthwise,
                    "map_size": map_size,
                    "tensor_stride": tensor_stride,
                    "sites": int(inp.coords.shape[0]),
                    **times,
                    "max_rel_err": err,
                    "device": device,
                    "threads": torch.get_num_threads(),
                }
                rows.append(row)
                log.debug("%s", row)
    return rows


def format_table(rows: list[dict]) -> str:
    """The rows as a fixed-width text table (times in ms)."""
    head = (
        f"{'layer':<11} {'impl':<9} {'dtype':<8} {'pass':<7} {'dens':>5} {'sites':>6} {'total':>8} {'cached':>8} {'kmap':>7} "
        f"{'kmap_dir':>8} {'coords':>6} {'dense':>8} {'ratio':>6} {'relerr':>7}"
    )
    lines = [head + "   (times in ms)", "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['layer']:<11} {r.get('conv_impl', 'auto'):<9} {r.get('dtype', 'float32'):<8} {r['pass']:<7} {r['density_actual']:>5.2f} {r['sites']:>6d} "
            f"{1e3 * r['sparse_total_s']:>8.1f} {1e3 * r['sparse_cached_s']:>8.1f} {1e3 * r['kernel_map_s']:>7.1f} "
            f"{1e3 * r['kernel_map_direct_s']:>8.2f} {1e3 * r['coords_s']:>6.2f} {1e3 * r['dense_s']:>8.1f} "
            f"{r['ratio']:>6.2f} {r['max_rel_err']:>7.0e}"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="small smoke run (seconds)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--channels", type=int, default=256)
    p.add_argument("--size", type=int, default=224, help="image size in pixels")
    p.add_argument("--tensor-stride", type=int, default=8, help="stride of the benchmarked feature map")
    p.add_argument("--layers", nargs="+", choices=[s.name for s in LAYERS], default=None)
    p.add_argument("--passes", nargs="+", choices=PASSES, default=list(PASSES))
    p.add_argument("--json", default=None, help="write the rows to this file")
    p.add_argument("--conv-impl", nargs="+", default=["auto"], choices=("auto", "torch", "minkowski"),
                   help="sparse conv backend(s), one set of rows each")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    layers = LAYERS if args.layers is None else tuple(s for s in LAYERS if s.name in args.layers)
    start = time.perf_counter()
    rows = run_kernel_bench(
        device=args.device, quick=args.quick, repeats=args.repeats, warmup=args.warmup, batch=args.batch,
        channels=args.channels, image_size=args.size, tensor_stride=args.tensor_stride, layers=layers,
        passes=tuple(args.passes), conv_impls=tuple(args.conv_impl), dtype=getattr(torch, args.dtype),
    )
    r0 = rows[0]
    log.info(
        "kernel bench on %s, %d thread(s): batch %d, C=%d, %dx%d map at stride %d; %.1f s",
        args.device, r0["threads"], r0["batch"], r0["channels"], r0["map_size"], r0["map_size"],
        r0["tensor_stride"], time.perf_counter() - start,
    )
    log.info("%s", format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
        log.info("wrote %d rows to %s", len(rows), args.json)


if __name__ == "__main__":
    main()
