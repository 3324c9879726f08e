"""The Triton depthwise conv on CUDA: its forward's tile configs, and the one-pass backward
against the two kernels it replaces.

    python -m kernels_bench.depthwise_backward --device cuda [--batch 128] [--dtype bfloat16] --out DIR

ConvNeXt-T's 7×7 depthwise convs at batch 128, 224 px, under the 0.6 mask (tables built as
the encoder builds them), one shape per stage. Per shape, the median milliseconds of

* ``forward``: the depthwise conv itself, with the autotuner's pick and with each of its
  configs (the tap loop one tap at a time or a few taps unrolled);
* ``separate``: both gradients as two kernels, the gathered conv of the output gradient
  with mirrored taps, then the weight gradient with atomics (which reads the output
  gradient once per tap);
* ``fused``: :func:`spark_me.ops.triton_backend.depthwise_backward` with the autotuner's
  pick, and with each of its configs;

and the totals over a ConvNeXt-T encoder step (3, 3, 9, 3 blocks per stage), which is
what the profile's ``TritonDepthwiseFunctionBackward`` rows add up to. Writes
``DIR/depthwise_backward.json`` (every timing) and ``DIR/depthwise_backward.txt``.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch

from kernels_bench.gemm_configs import kernel_bench_args, time_ms, write_results
from kernels_bench.kernels import make_input

LOG = logging.getLogger("kernels_bench.depthwise_backward")


@dataclass(frozen=True)
class DepthwiseShape:
    """One stage's depthwise conv: channels, tensor stride at 224 px, blocks in ConvNeXt-T."""

    name: str
    channels: int
    tensor_stride: int
    blocks: int


SHAPES = (
    DepthwiseShape("convnext_tiny.stage0 dw7x7", 96, 4, 3),
    DepthwiseShape("convnext_tiny.stage1 dw7x7", 192, 8, 3),
    DepthwiseShape("convnext_tiny.stage2 dw7x7", 384, 16, 9),
    DepthwiseShape("convnext_tiny.stage3 dw7x7", 768, 32, 3),
)
KERNEL_SIZE = 7


def config_name(config) -> str:
    """``BLOCK_MxBLOCK_C-wWARPS-uUNROLL``."""
    return "{BLOCK_M}x{BLOCK_C}".format(**config.kwargs) + f"-w{config.num_warps}-u{config.kwargs['UNROLL']}"


def backward_calls(shape: DepthwiseShape, batch: int, dtype: torch.dtype, device: str,
                   generator: torch.Generator) -> tuple[int, dict[str, Callable[[], object]]]:
    """(rows, ``{way: call}``): the calls timed for ``shape``, on one random batch; each
    gradient call returns ``(input grad, weight grad [K, C])``."""
    from spark_me import ops
    from spark_me.ops.triton_backend import depthwise as dw

    x = make_input(batch, shape.channels, 224, shape.tensor_stride, 0.4, generator, device, dtype).sparse()
    features, table = x.F.detach(), ops.neighbour_tables(x, KERNEL_SIZE, 1).forward
    taps = KERNEL_SIZE**2
    weight = (torch.randn(taps, shape.channels, generator=generator) / KERNEL_SIZE).to(device, dtype)
    grad = torch.randn(len(features), shape.channels, generator=generator).to(device, dtype)

    def separate() -> tuple[torch.Tensor, torch.Tensor]:
        return dw.depthwise_forward(grad, weight.flip(0), table), dw.depthwise_weight_grad(features, table, grad)

    calls: dict[str, Callable[[], object]] = {
        "forward": lambda: dw.depthwise_forward(features, weight, table),
        "separate": separate,
        "fused": lambda: dw.depthwise_backward(features, weight, table, grad),
    }
    for config in dw.FORWARD_CONFIGS:
        calls[f"forward {config_name(config)}"] = lambda c=config: dw.depthwise_forward(features, weight, table, c)
    for config in dw.BACKWARD_CONFIGS:
        calls[f"fused {config_name(config)}"] = lambda c=config: dw.depthwise_backward(features, weight, table, grad, c)
    return len(features), calls


def _picked(autotuner, channels: int) -> Optional[str]:
    """The config ``autotuner`` (a ``triton.autotune`` kernel) picked for ``channels`` and 7×7."""
    picked = [config_name(c) for key, c in getattr(autotuner, "cache", {}).items()
              if tuple(key[:2]) == (channels, KERNEL_SIZE**2)]
    return picked[0] if picked else None


def run(batch: int, dtype: torch.dtype, device: str, shapes: tuple[DepthwiseShape, ...] = SHAPES) -> list[dict]:
    """One row per (shape, way): its median time; each row names the autotuner's pick for
    its kind (``forward`` or ``fused``)."""
    from spark_me.ops.triton_backend import depthwise as dw

    rows = []
    generator = torch.Generator().manual_seed(0)
    for shape in shapes:
        n, calls = backward_calls(shape, batch, dtype, device, generator)
        calls["forward"]()  # the autotuners' picks for this key (their caches: key -> config)
        calls["fused"]()
        picked = {"forward": _picked(dw.tuned_depthwise, shape.channels),
                  "fused": _picked(dw.tuned_depthwise_backward, shape.channels)}
        for way, call in calls.items():
            rows.append({**asdict(shape), "rows": n, "way": way, "ms": time_ms(call),
                         "autotuned": picked.get(way.split()[0])})
        times = {r["way"]: r["ms"] for r in rows[-len(calls):]}
        LOG.info("%-28s rows %7d  forward %.3f (%s)  separate %.3f  fused %.3f ms (%s)", shape.name, n,
                 times["forward"], picked["forward"], times["separate"], times["fused"], picked["fused"])
    return rows


def summary(rows: list[dict]) -> str:
    """Per shape: forward (autotuned), separate, fused (autotuned), fused/separate, and the
    best config of each kind; then the totals over one ConvNeXt-T step (each stage's time ×
    its blocks)."""
    lines = [f"{'shape':<28} {'rows':>7} {'forward':>8} {'separate':>9} {'fused':>8} {'fused/sep':>9}  "
             "best configs (forward; fused)"]
    shapes: dict[str, dict[str, dict]] = {}
    for r in rows:
        shapes.setdefault(r["name"], {})[r["way"]] = r
    total = {"forward": 0.0, "separate": 0.0, "fused": 0.0}
    for name, ways in shapes.items():
        best = {}
        for kind in ("forward", "fused"):
            r = min((r for way, r in ways.items() if way.startswith(kind + " ")), key=lambda r: r["ms"])
            best[kind] = f"{r['way'][len(kind) + 1:]} {r['ms']:.3f} (autotuned {ways[kind]['autotuned']})"
        f, s, fw = ways["fused"]["ms"], ways["separate"]["ms"], ways["forward"]["ms"]
        lines.append(f"{name:<28} {ways['fused']['rows']:>7} {fw:>8.3f} {s:>9.3f} {f:>8.3f} {f / s:>9.2f}  "
                     f"{best['forward']}; {best['fused']}")
        for way in total:
            total[way] += ways[way]["ms"] * ways[way]["blocks"]
    lines.append(f"{'ConvNeXt-T step (ms)':<28} {'':>7} {total['forward']:>8.3f} {total['separate']:>9.3f} "
                 f"{total['fused']:>8.3f} {total['fused'] / total['separate']:>9.2f}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    args = kernel_bench_args(__doc__, "depthwise_backward", argv)
    rows = run(args.batch, getattr(torch, args.dtype), args.device)
    write_results(args, "depthwise_backward", rows, summary(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
