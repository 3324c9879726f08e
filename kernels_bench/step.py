"""Forward+backward time of one SparK step: sparse encoder vs. the same model run densely.

    python -m kernels_bench.step --model resnet50 --batch 8 --size 224 --mask 0.6

``--part encoder`` times the encoders alone. "Dense" runs timm's dense twin of the encoder (same weights) on the full image, then the
same densify (dense BatchNorm, mask embeddings where masked, projections), decoder and
loss: the cost a dense pre-training of the same network pays. Medians of ``--repeats``
timed runs after ``--warmup`` runs, both variants interleaved in one process.
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import resource
import statistics
import time

import timm
import torch
import torch.nn as nn

from spark_me import SparK, build_sparse_encoder, random_patch_mask
from spark_me.loss import masked_reconstruction_loss
from spark_me.masking import upsample_mask

log = logging.getLogger("kernels_bench.step")


class DenseSparK(nn.Module):
    """SparK with timm's dense encoder on the unmasked image (no sparsity at all)."""

    def __init__(self, sparse: SparK, name: str) -> None:
        super().__init__()
        self.encoder = timm.create_model(name, num_classes=0)
        self.encoder.load_state_dict(sparse.encoder.timm_state_dict())
        self.norms = nn.ModuleList(nn.BatchNorm2d(c) for c in reversed(sparse.encoder.feature_channels))
        self.mask_tokens = sparse.densify.mask_tokens
        self.projs = sparse.densify.projs
        self.decoder = sparse.decoder
        self.patch_size = sparse.patch_size

    def forward(self, images: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        feats = self.encoder.forward_intermediates(images, indices=4, intermediates_only=True)
        dense = []
        for i, f in enumerate(reversed(feats)):
            m = upsample_mask(active, f.shape[-1] // active.shape[-1]).unsqueeze(1)
            dense.append(self.projs[i](torch.where(m, self.norms[i](f), self.mask_tokens[i])))
        rec = self.decoder(dense)
        return masked_reconstruction_loss(rec, images, active, self.patch_size)


def time_step(fn, warmup: int, repeats: int) -> list[float]:
    times = []
    for i in range(warmup + repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet50")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--mask", type=float, default=0.6)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--decoder-width", type=int, default=768)
    p.add_argument(
        "--part", choices=("step", "encoder"), default="step",
        help="time the whole SparK step, or the encoder alone (sum of its feature maps as the loss)",
    )
    p.add_argument(
        "--only", choices=("sparse", "dense"), default=None,
        help="run one variant, so the process's peak RSS (reported) is that variant's",
    )
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    torch.manual_seed(0)
    sparse = SparK(build_sparse_encoder(args.model), decoder_width=args.decoder_width, mask_ratio=args.mask).train()
    dense = DenseSparK(sparse, args.model).train()
    g = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, args.size, args.size, generator=g)
    grid = args.size // 32
    active = random_patch_mask(args.batch, (grid, grid), args.mask, g)

    def step(model: nn.Module) -> None:
        model.zero_grad(set_to_none=True)
        if args.part == "step":
            model(images, active).backward()
        elif isinstance(model, SparK):
            sum(f.F.sum() for f in model.encoder(images, active)).backward()
        else:
            feats = model.encoder.forward_intermediates(images, indices=4, intermediates_only=True)
            sum(f.sum() for f in feats).backward()

    variants = {"sparse": sparse, "dense": dense}
    if args.only:
        variants = {args.only: variants[args.only]}
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    results = {k: [] for k in variants}
    for _ in range(args.warmup + args.repeats):  # interleave so drift hits both alike
        for k, model in variants.items():
            results[k] += time_step(lambda: step(model), 0, 1)
    summary = {
        "model": args.model,
        "part": args.part,
        "batch": args.batch,
        "size": args.size,
        "mask_ratio": args.mask,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
    }
    for k, v in results.items():
        v = v[args.warmup :]
        summary[f"{k}_median_s"] = statistics.median(v)
        summary[f"{k}_runs_s"] = [round(t, 3) for t in v]
        summary[f"{k}_images_per_s"] = args.batch / statistics.median(v)
    if len(variants) == 2:
        summary["sparse_over_dense"] = summary["sparse_median_s"] / summary["dense_median_s"]
    # ru_maxrss is in KiB on Linux; growth over the set-up is what the steps added
    summary["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    summary["peak_rss_growth_mib"] = summary["peak_rss_mib"] - rss_before / 1024
    log.info(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
