"""Every tile config of the Triton gather-GEMM on the encoders' conv shapes (CUDA).

``triton.autotune`` keeps the fastest config per (c_in, c_out, taps) and says nothing about
the others. This times each config of ``conv.GEMM_CONFIGS`` (four tile shapes, each with the
nested and the flat loop form) on the convs of a ResNet-50 and a ConvNeXt-T batch of 128 at
224 px under the 0.6 mask, the forward and the input gradient, so one run shows what the
flat loop gains per shape and which config the autotuner picks. Tables are built the way
the encoder builds them (a random SparK patch mask, MinkowskiEngine's strided maps).

    python -m kernels_bench.gemm_configs --device cuda [--batch 128] [--dtype bfloat16] --out DIR

Writes ``DIR/gemm_configs.json`` (every timing) and ``DIR/gemm_configs.txt`` (per shape: the
best nested and flat times, their ratio, the achieved TFLOP/s, the autotuner's pick).
"""
from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from kernels_bench.kernels import make_input

LOG = logging.getLogger("kernels_bench.gemm_configs")


@dataclass(frozen=True)
class GemmShape:
    """One sparse conv of an encoder: its channels, kernel, stride and input tensor stride."""

    name: str
    c_in: int
    c_out: int
    kernel_size: int
    stride: int
    tensor_stride: int


# The encoders' convs that run the gather-GEMM (1×1 convs are plain matmuls, the
# depthwise convs have kernels of their own), at 224 px.
SHAPES = (
    GemmShape("resnet50.stem 7x7/2", 3, 64, 7, 2, 1),
    GemmShape("resnet50.layer1 3x3", 64, 64, 3, 1, 4),
    GemmShape("resnet50.layer2.0 3x3/2", 128, 128, 3, 2, 4),
    GemmShape("resnet50.layer2 3x3", 128, 128, 3, 1, 8),
    GemmShape("resnet50.layer3 3x3", 256, 256, 3, 1, 16),
    GemmShape("resnet50.layer4 3x3", 512, 512, 3, 1, 32),
    GemmShape("convnext_tiny.stem 4x4/4", 3, 96, 4, 4, 1),
    GemmShape("convnext_tiny.down1 2x2/2", 96, 192, 2, 2, 4),
    GemmShape("convnext_tiny.down2 2x2/2", 192, 384, 2, 2, 8),
    GemmShape("convnext_tiny.down3 2x2/2", 384, 768, 2, 2, 16),
)


def config_name(config) -> str:
    """``BLOCK_MxBLOCK_NxBLOCK_K-nested|flat``."""
    k = config.kwargs
    return f"{k['BLOCK_M']}x{k['BLOCK_N']}x{k['BLOCK_K']}-{'flat' if k['FLAT'] else 'nested'}"


def gemm_calls(shape: GemmShape, batch: int, dtype: torch.dtype, device: str, generator: torch.Generator):
    """``{"fwd": (args, pairs), "dgrad": (args, pairs)}``: the gather-GEMM arguments (src,
    table, weight [taps, c_in, c_out], n_dst) of the conv's forward and input gradient, and
    the number of (input, output) pairs each multiplies (the FLOPs are 2·pairs·c_in·c_out)."""
    from spark_me import ops
    from spark_me.ops import triton_backend

    inp = make_input(batch, shape.c_in, 224, shape.tensor_stride, 0.4, generator, device, dtype)
    x = inp.sparse()
    tables = ops.neighbour_tables(x, shape.kernel_size, shape.stride)
    taps = shape.kernel_size**2
    weight = (torch.randn(taps, shape.c_in, shape.c_out, generator=generator) / (taps * shape.c_in) ** 0.5).to(device, dtype)
    grad = torch.randn(tables.n_out, shape.c_out, generator=generator).to(device, dtype)
    pairs = int((tables.forward < tables.n_in).sum())
    # the backward's own operands (triton_backend.TritonConvFunction)
    dgrad_table, dgrad_weight = triton_backend.input_grad_operands(tables, weight.transpose(1, 2))
    dgrad = (grad, dgrad_table, dgrad_weight.contiguous(), tables.n_in)
    return {"fwd": ((x.F, tables.forward, weight, tables.n_out), pairs), "dgrad": (dgrad, pairs)}


def time_ms(fn: Callable[[], object]) -> float:
    """Median milliseconds of ``fn`` (Triton's do_bench: flushes the L2 between runs)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median"))


def run(batch: int, dtype: torch.dtype, device: str, shapes: tuple[GemmShape, ...] = SHAPES) -> list[dict]:
    """One row per (shape, pass, config): its median time and TFLOP/s, and the config the
    autotuner picked for that shape's key."""
    from spark_me.ops import triton_backend

    rows = []
    generator = torch.Generator().manual_seed(0)
    for shape in shapes:
        for direction, (args, pairs) in gemm_calls(shape, batch, dtype, device, generator).items():
            c_in, c_out = args[2].shape[1], args[2].shape[2]
            flop = 2 * pairs * c_in * c_out
            triton_backend.gather_gemm(*args)  # the autotuner's pick for this key (its cache: key -> config)
            tuned = getattr(triton_backend.conv.tuned_gather_gemm, "cache", {})
            picked = [config_name(c) for key, c in tuned.items() if tuple(key[:3]) == (c_in, c_out, args[2].shape[0])]
            for config in triton_backend.conv.GEMM_CONFIGS:
                ms = time_ms(lambda: triton_backend.gather_gemm(*args, config=config))
                rows.append({**asdict(shape), "pass": direction, "gemm_c_in": c_in, "gemm_c_out": c_out,
                             "rows": args[3], "pairs": pairs, "config": config_name(config), "ms": ms,
                             "tflops": flop / ms / 1e9, "autotuned": picked[0] if picked else None})
            best = min((r for r in rows[-len(triton_backend.conv.GEMM_CONFIGS):]), key=lambda r: r["ms"])
            LOG.info("%-28s %-5s best %s %.3f ms (%.0f TFLOP/s), autotuned %s", shape.name, direction,
                     best["config"], best["ms"], best["tflops"], best["autotuned"])
    return rows


def summary(rows: list[dict]) -> str:
    """Per shape and pass: the best nested and flat configs, flat/nested, the autotuner's pick."""
    lines = [f"{'shape':<28} {'pass':<5} {'rows':>7} {'nested ms':>9} {'flat ms':>8} {'flat/nested':>11} "
             f"{'best TFLOP/s':>12}  autotuned"]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["name"], r["pass"]), []).append(r)
    for (name, direction), group in groups.items():
        nested = min((r for r in group if r["config"].endswith("nested")), key=lambda r: r["ms"])
        flat = min((r for r in group if r["config"].endswith("flat")), key=lambda r: r["ms"])
        best = min(nested, flat, key=lambda r: r["ms"])
        lines.append(f"{name:<28} {direction:<5} {group[0]['rows']:>7} {nested['ms']:>9.3f} {flat['ms']:>8.3f} "
                     f"{flat['ms'] / nested['ms']:>11.2f} {best['tflops']:>12.0f}  {group[0]['autotuned']}")
    return "\n".join(lines)


def kernel_bench_args(doc: str, stem: str, argv: Optional[list[str]]) -> argparse.Namespace:
    """The arguments of a Triton kernel bench (``--device --batch --dtype --out``), refused
    unless the compiled kernels can run: a visible GPU, no ``TRITON_INTERPRET``."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="a CUDA device (the compiled kernels need one)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    p.add_argument("--out", type=Path, required=True, help=f"folder for {stem}.json and .txt")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not args.device.startswith("cuda") or not torch.cuda.is_available():
        p.error("this benchmark times compiled Triton kernels: it needs --device cuda and a visible GPU")
    from spark_me.ops import triton_backend

    if triton_backend.INTERPRETED:
        p.error("TRITON_INTERPRET is set: unset it to time the compiled kernels")
    return args


def write_results(args: argparse.Namespace, stem: str, rows: list[dict], table: str) -> None:
    """``OUT/STEM.json`` (the environment and every row) and ``OUT/STEM.txt`` (the summary)."""
    args.out.mkdir(parents=True, exist_ok=True)
    env = {"gpu": torch.cuda.get_device_name(args.device), "torch": torch.__version__,
           "triton": __import__("triton").__version__, "batch": args.batch, "dtype": args.dtype}
    (args.out / f"{stem}.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=1))
    (args.out / f"{stem}.txt").write_text(table + "\n")
    LOG.info("\n%s", table)


def main(argv: Optional[list[str]] = None) -> int:
    args = kernel_bench_args(__doc__, "gemm_configs", argv)
    rows = run(args.batch, getattr(torch, args.dtype), args.device)
    write_results(args, "gemm_configs", rows, summary(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
