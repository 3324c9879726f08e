"""Depthwise 7×7 sparse conv inside a SparK-ConvNeXt step: MinkowskiEngine's loop vs. ours.

    python -m kernels_bench.depthwise --model convnext_tiny --batch 8 --size 224 --mask 0.6

For each implementation (``minkowski``: ME 0.5.4's channel-wise algorithm; ``gather``:
spark_me.ops) it reports the median forward+backward time of a whole SparK step and
of the depthwise convs alone (each block's conv_dw timed in isolation on its real input,
summed over blocks), hence the depthwise share of the step.
"""
from __future__ import annotations

import argparse
import json
import logging

import torch

from kernels_bench.breakdown import median_time
from spark_me import SparK, build_sparse_encoder, random_patch_mask
from spark_me.layers import SparseConv2d, with_features

log = logging.getLogger("kernels_bench.depthwise")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="convnext_tiny")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--mask", type=float, default=0.6)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    torch.manual_seed(0)
    model = SparK(build_sparse_encoder(args.model), mask_ratio=args.mask).train()
    g = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, args.size, args.size, generator=g)
    grid = args.size // 32
    active = random_patch_mask(args.batch, (grid, grid), args.mask, g)
    dw_layers = [m for m in model.modules() if isinstance(m, SparseConv2d) and m.groups != 1]

    inputs = {}
    hooks = [m.register_forward_hook(lambda m, i, o: inputs.__setitem__(m, i[0])) for m in dw_layers]
    model(images, active)
    for h in hooks:
        h.remove()

    def step() -> None:
        model.zero_grad(set_to_none=True)
        model(images, active).backward()

    def depthwise_only() -> None:
        for m in dw_layers:
            x = inputs[m]
            feats = x.F.detach().requires_grad_()
            out = m(with_features(x, feats))
            out.F.sum().backward()

    report = {"model": args.model, "batch": args.batch, "size": args.size, "mask_ratio": args.mask,
              "threads": torch.get_num_threads(), "depthwise_layers": len(dw_layers)}
    for impl in ("minkowski", "gather"):
        for m in dw_layers:
            m.depthwise_impl = impl
        total = median_time(step, args.warmup, args.repeats)
        dw = median_time(depthwise_only, args.warmup, args.repeats)
        report[impl] = {"step_s": round(total, 3), "depthwise_s": round(dw, 3), "depthwise_share": round(dw / total, 3)}
        log.info("%s: step %.3f s, depthwise %.3f s (%.0f%%)", impl, total, dw, 100 * dw / total)
    log.info(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
