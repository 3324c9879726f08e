"""Kernel-level bench: one sparse conv per backend and dtype against (b) and (c), by density.

    python -m kernels_bench.kernels --device cpu [--quick] [--out DIR]
    python -m kernels_bench.kernels --device cuda --batch 128 --conv-impl torch triton minkowski \
        --dtype float32 bfloat16 --densities 0.4 1.0 --out kernels_bench/results/gpu-...

Each layer kind in :data:`LAYERS` (1×1, 3×3, depthwise 7×7, strided 3×3/2 and 2×2/2) runs
on a feature map at tensor stride 8 (image 224 -> a 28×28 map, C=256 by default: ResNet-50
/ ConvNeXt-T stage 2-3 sizes), once per sparse backend (``conv_impl``: ``torch``,
``triton``, or ``minkowski``, MinkowskiEngine 0.5.4's own kernels, its channel-wise conv for
the depthwise layer: the "before") and dtype (``minkowski`` computes in float32 only). The
sites are those of a random 32-px patch mask (``random_patch_mask`` with ratio
``1 - density`` on the 7×7 patch grid, as in training); ``density_actual`` is the rounded
fraction of visible patches it keeps.

Per (layer, backend, dtype, density, pass), medians of ``repeats`` timed runs after
``warmup``, the variants taking turns within each round:

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
  With the gather backends (torch, triton) this share is the neighbour tables of
  :mod:`spark_me.ops.tables`, cached on the tensor's coordinate manager;
* ``kernel_map_direct_s``: the same share measured directly, with far less noise: a fresh
  ``SparseTensor`` plus the maps the layer needs, built through MinkowskiEngine's
  ``CoordinateManager.stride`` / ``.kernel_map`` (which also copies each map out into a
  tensor, a little more work than the conv's internal use). Includes ``coords_s`` too;
* ``masked_dense_s``: (b), the emulation's way: ``nn.Conv2d`` with the same weights on the
  zero-filled dense (B, C, H, W) map, its output multiplied by the output sites' mask;
* ``dense_s``: (c), the same ``nn.Conv2d`` on the dense map, unmasked;
* ``ratio = sparse_total_s / dense_s`` and ``masked_ratio = sparse_total_s / masked_dense_s``.

The dense twins run in the same dtype, in channels_last memory on CUDA (cuDNN's fastest
layout there, as the suite's GPU baselines) and contiguous on CPU (``dense_layout``).

``pass`` is ``"fwd"`` (forward under ``torch.no_grad``) or ``"fwd_bwd"`` (forward, then
backward of a contiguous gradient of ones into the input features and the weights).
Before timing a (layer, backend, dtype, density), the sparse output is checked against the
dense conv of the zero-filled map, masked to the output sites (relative error at most 1e-4
in float32, 3e-2 in bfloat16, where both sides round differently from the float32 truth); a
mismatch raises :class:`NumericsError`. ``--out DIR`` writes ``DIR/kernels.json`` (rows and
environment, after every layer, so a run cut short keeps what it measured) and
``DIR/kernels.csv``; the report (``python -m kernels_bench report``) shows the rows of a
results folder's ``kernels.json`` beside those of its ``results.json``.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import MinkowskiEngine as ME
import torch
import torch.nn as nn
import torch.nn.functional as F

from spark_me.gather import to_dense
from spark_me.layers import SparseConv2d, with_features
from spark_me.masking import random_patch_mask, upsample_mask
from spark_me.ops import CONV_IMPLS, new_coordinate_manager
from spark_me.ops.dispatch import resolve_conv_impl

log = logging.getLogger("kernels_bench.kernels")

PATCH = 32  # SparK's mask patch, in input pixels
DENSITIES = tuple(round(0.1 * i, 1) for i in range(1, 11))
QUICK_DENSITIES = (0.2, 0.6, 1.0)
PASSES = ("fwd", "fwd_bwd")
TOLERANCE = 1e-4  # float32 relative error
# bf16 sparse vs bf16 dense: both round differently from the float32 truth, each by ~2^-8
TOLERANCES = {torch.float32: TOLERANCE, torch.bfloat16: 3e-2}
DTYPES = tuple(str(d).removeprefix("torch.") for d in TOLERANCES)


@dataclass(frozen=True)
class LayerSpec:
    """One benchmarked conv: C -> C, kernel ``kernel_size``, ``stride``, optionally depthwise."""

    name: str
    kernel_size: int
    stride: int = 1
    depthwise: bool = False
    bias: bool = False


LAYERS: tuple[LayerSpec, ...] = (
    LayerSpec("conv1x1", 1),  # ResNet bottleneck conv1/conv3
    LayerSpec("conv3x3", 3),  # ResNet bottleneck conv2, submanifold
    LayerSpec("dw7x7", 7, depthwise=True, bias=True),  # ConvNeXt conv_dw
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
        """A fresh SparseTensor (new coordinate manager) on these sites; the manager knows the
        image's extent, as a training batch's does (spark_me.gather.to_sparse)."""
        feats = self.features if features is None else features
        batch, _, height, width = self.dense.shape
        extent = (batch, height * self.tensor_stride, width * self.tensor_stride)
        return ME.SparseTensor(feats, coordinates=self.coords, tensor_stride=self.tensor_stride,
                               coordinate_manager=new_coordinate_manager(self.coords, extent=extent))


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
    """The sparse conv and its dense ``nn.Conv2d`` twin, sharing the same weights. With
    ``conv_impl="minkowski"`` every layer is MinkowskiEngine's own, its channel-wise conv for
    the depthwise one (the encoders' ``minkowski`` backend runs depthwise convs by the
    torch backend's algorithm instead, as MinkowskiEngine's is the slowest)."""
    k = spec.kernel_size
    groups = channels if spec.depthwise else 1
    dense = nn.Conv2d(channels, channels, k, spec.stride, padding=k // 2 if k % 2 else 0, groups=groups, bias=spec.bias)
    sparse = SparseConv2d(
        channels, channels, k, spec.stride, bias=spec.bias, groups=groups,
        depthwise_impl="minkowski" if conv_impl == "minkowski" else "gather", conv_impl=conv_impl,
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


def output_sites(sites: torch.Tensor, stride: int) -> torch.Tensor:
    """``(B, 1, H/s, W/s)`` float mask of a stride-``s`` conv's output sites, computed
    independently of MinkowskiEngine: an output site exists iff any input site of its s×s
    block does."""
    mask = sites[:, None].float()
    return F.max_pool2d(mask, stride, stride) if stride > 1 else mask


def verify_layer(sparse: SparseConv2d, dense: nn.Conv2d, inp: SparseInput, tolerance: float = TOLERANCE) -> float:
    """Sparse output vs. the dense conv of the zero-filled map, masked to the output sites."""
    # exact float32 on both sides: CUDA convolutions default to TF32 (~1e-3 relative error)
    with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        out = sparse(inp.sparse())
        out_sites = output_sites(inp.sites, sparse.stride).to(inp.dense.dtype)
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


def _run_dense(layer: nn.Conv2d, x: torch.Tensor, backward: bool, mask: Optional[torch.Tensor] = None) -> None:
    """The dense conv, its output multiplied by ``mask`` where given (the emulation's way)."""
    if backward:
        layer.zero_grad(set_to_none=True)
        out = layer(x) if mask is None else layer(x) * mask
        out.backward(torch.ones_like(out))
    else:
        with torch.no_grad():
            out = layer(x) if mask is None else layer(x) * mask


def time_layer(
    sparse: SparseConv2d, dense: nn.Conv2d, inp: SparseInput, backward: bool, warmup: int, repeats: int, device: str
) -> dict[str, float]:
    """Sparse (fresh coordinates / cached maps / map construction), masked-dense and dense
    times of one pass (the dense layer and ``inp.dense`` in the memory layout to time)."""

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
    mask = output_sites(inp.sites, sparse.stride).to(inp.dense.dtype)
    times = median_times(
        {
            "sparse_total_s": total,
            "sparse_cached_s": cached,
            "coords_s": coords,
            "kernel_map_direct_s": direct,
            "masked_dense_s": lambda: _run_dense(dense, dense_in, backward, mask),
            "dense_s": lambda: _run_dense(dense, dense_in, backward),
        },
        warmup, repeats, device,
    )
    times["kernel_map_s"] = times["sparse_total_s"] - times["sparse_cached_s"]
    times["ratio"] = times["sparse_total_s"] / times["dense_s"]
    times["masked_ratio"] = times["sparse_total_s"] / times["masked_dense_s"]
    return times


def layer_backends(conv_impls: tuple[str, ...], device: str) -> tuple[str, ...]:
    """The backends a suite run compares per layer: its own (``auto`` resolved), then
    ``minkowski``, the baseline, once each."""
    resolved = [resolve_conv_impl(c, torch.device(device)) for c in conv_impls]
    return tuple(dict.fromkeys([*resolved, "minkowski"]))


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
    densities: Optional[tuple[float, ...]] = None,
    passes: tuple[str, ...] = PASSES,
    seed: int = 0,
    conv_impls: tuple[str, ...] = ("torch", "minkowski"),
    dtypes: tuple[torch.dtype, ...] = (torch.float32,),
    on_rows: Optional[Callable[[list[dict]], None]] = None,
) -> list[dict]:
    """One row per (layer, backend, dtype, density, pass); see the module docstring for the
    fields. ``on_rows`` gets every row so far after each (layer, backend, dtype).

    ``quick`` shrinks the run for a smoke test (densities 0.2/0.6/1.0, batch <= 2,
    channels <= 64, one timed repeat).
    """
    for dtype in dtypes:
        if dtype not in TOLERANCES:
            raise ValueError(f"dtype {dtype} is not benchmarked; choose from {', '.join(DTYPES)}")
    for conv_impl in conv_impls:
        resolve_conv_impl(conv_impl, torch.device(device))  # a backend this device cannot run fails here, clearly
    if quick:
        batch, channels, repeats = min(batch, 2), min(channels, 64), min(repeats, 1)
    if densities is None:
        densities = QUICK_DENSITIES if quick else DENSITIES
    torch.manual_seed(seed)
    map_size = image_size // tensor_stride
    cuda = torch.device(device).type == "cuda"
    layout = torch.channels_last if cuda else torch.contiguous_format
    groups = [(s, c, d) for s in layers for c in conv_impls for d in dtypes
              if not (c == "minkowski" and d != torch.float32)]  # MinkowskiEngine computes in float32 only
    rows: list[dict] = []
    for i, (spec, conv_impl, dtype) in enumerate(groups, 1):
        dtype_name = str(dtype).removeprefix("torch.")
        log.info("[%d/%d] running %s %s %s", i, len(groups), spec.name, conv_impl, dtype_name)
        started = time.perf_counter()
        sparse, dense = make_layers(spec, channels, device, conv_impl, dtype)
        dense = dense.to(memory_format=layout)
        for density in densities:
            g = torch.Generator().manual_seed(seed + int(round(density * 1000)))
            inp = make_input(batch, channels, image_size, tensor_stride, density, g, device, dtype)
            inp.dense = inp.dense.contiguous(memory_format=layout)
            err = verify_layer(sparse, dense, inp, TOLERANCES[dtype])
            for pass_name in passes:
                times = time_layer(sparse, dense, inp, pass_name == "fwd_bwd", warmup, repeats, device)
                rows.append({
                    "bench": "kernel",
                    "layer": spec.name,
                    "conv_impl": conv_impl,
                    "dtype": dtype_name,
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
                    "dense_layout": "channels_last" if cuda else "contiguous",
                    "device": device,
                    "threads": torch.get_num_threads(),
                })
        mine = [r for r in rows if (r["layer"], r["conv_impl"], r["dtype"]) == (spec.name, conv_impl, dtype_name)]
        at = min(mine, key=lambda r: (r["pass"] != "fwd_bwd", abs(r["density"] - 0.4)))  # the training density
        log.info("[%d/%d] %s %s %s: %.1f s; %s at density %.2f: sparse %.2f ms, (b) %.2f ms, (c) %.2f ms",
                 i, len(groups), spec.name, conv_impl, dtype_name, time.perf_counter() - started, at["pass"],
                 at["density_actual"], 1e3 * at["sparse_total_s"], 1e3 * at["masked_dense_s"], 1e3 * at["dense_s"])
        if on_rows is not None:
            on_rows(rows)
    return rows


def format_table(rows: list[dict]) -> str:
    """The rows as a fixed-width text table (times in ms)."""
    head = (
        f"{'layer':<11} {'impl':<9} {'dtype':<8} {'pass':<7} {'dens':>5} {'sites':>6} {'total':>8} {'cached':>8} {'kmap':>7} "
        f"{'kmap_dir':>8} {'coords':>6} {'(b)':>8} {'(c)':>8} {'a/b':>5} {'a/c':>5} {'relerr':>7}"
    )
    lines = [head + "   (times in ms)", "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['layer']:<11} {r['conv_impl']:<9} {r['dtype']:<8} {r['pass']:<7} {r['density_actual']:>5.2f} {r['sites']:>6d} "
            f"{1e3 * r['sparse_total_s']:>8.1f} {1e3 * r['sparse_cached_s']:>8.1f} {1e3 * r['kernel_map_s']:>7.1f} "
            f"{1e3 * r['kernel_map_direct_s']:>8.2f} {1e3 * r['coords_s']:>6.2f} {1e3 * r['masked_dense_s']:>8.1f} "
            f"{1e3 * r['dense_s']:>8.1f} {r['masked_ratio']:>5.2f} {r['ratio']:>5.2f} {r['max_rel_err']:>7.0e}"
        )
    return "\n".join(lines)


def save_rows(out_dir: Path, rows: list[dict], args: dict) -> None:
    """``kernels.json`` (rows, the run's arguments and the environment) and ``kernels.csv``."""
    from kernels_bench.suite import environment, write_csv

    out_dir.mkdir(parents=True, exist_ok=True)
    # float32 dense convs take TF32 where cuDNN allows it (PyTorch's default); the sparse
    # backends' float32 products do not (matmul TF32 is off by default, Triton's are IEEE)
    precision = {"cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
                 "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32}
    payload = {"environment": {**environment(), **precision}, "args": args, "kernels": rows}
    (out_dir / "kernels.json").write_text(json.dumps(payload, indent=1))
    write_csv(out_dir / "kernels.csv", rows)


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
    p.add_argument("--densities", nargs="+", type=float, default=None,
                   help="fractions of visible patches, in (0, 1] (default: 0.1 to 1.0 by 0.1)")
    p.add_argument("--conv-impl", nargs="+", default=["torch", "minkowski"],
                   choices=[c for c in CONV_IMPLS if c != "auto"], help="sparse conv backends, one set of rows each")
    p.add_argument("--dtype", nargs="+", default=["float32"], choices=DTYPES, help="one set of rows each")
    p.add_argument("--out", type=Path, default=None, help="write kernels.json and kernels.csv into this folder")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.densities and not all(0.0 < d <= 1.0 for d in args.densities):
        p.error(f"--densities must be in (0, 1], got {args.densities}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA device")
    for conv_impl in args.conv_impl:
        try:
            resolve_conv_impl(conv_impl, torch.device(args.device))
        except (ValueError, ImportError) as e:
            p.error(str(e))

    layers = LAYERS if args.layers is None else tuple(s for s in LAYERS if s.name in args.layers)
    recorded = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    start = time.perf_counter()
    rows = run_kernel_bench(
        device=args.device, quick=args.quick, repeats=args.repeats, warmup=args.warmup, batch=args.batch,
        channels=args.channels, image_size=args.size, tensor_stride=args.tensor_stride, layers=layers,
        densities=tuple(args.densities) if args.densities else None, passes=tuple(args.passes),
        conv_impls=tuple(args.conv_impl), dtypes=tuple(getattr(torch, d) for d in args.dtype),
        on_rows=(lambda rows: save_rows(args.out, rows, recorded)) if args.out else None,
    )
    r0 = rows[0]
    log.info(
        "kernel bench on %s, %d thread(s): batch %d, C=%d, %dx%d map at stride %d; %.1f s",
        args.device, r0["threads"], r0["batch"], r0["channels"], r0["map_size"], r0["map_size"],
        r0["tensor_stride"], time.perf_counter() - start,
    )
    log.info("%s", format_table(rows))
    if args.out:
        log.info("wrote %d rows to %s", len(rows), args.out / "kernels.json")


if __name__ == "__main__":
    main()
