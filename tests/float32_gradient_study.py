"""How far float32 gradients of a whole sparse ResNet-50 fall from float64, per backend:
the study behind the bound of test_ops_triton.check_float32_gradients_as_exact_as_torch.

    python tests/float32_gradient_study.py --act relu --seeds 3   # the lottery: 1e-6 .. 1e-2
    python tests/float32_gradient_study.py --act gelu --seeds 6   # smooth: ~1e-4, factor <= 3.3

For each seed: the same random encoder (timm init, random norms) with the ``minkowski`` and
the ``torch`` backends in float32, and the ``torch`` backend in float64, on batch 4 of
224 px under a 60 % patch mask; the setup of the CUDA test. Prints each float32 backend's
relative error against float64 for the image gradient and the worst parameter gradient,
and how much of the test's factor each backend needs when the other stands in for the
torch backend. CPU, about 15 s per seed.
"""
from __future__ import annotations

import argparse

import torch

from test_ops import _active
from test_ops_triton import GRADIENT_FACTOR as FACTOR, GRADIENT_FLOOR as FLOOR, _encoder_pair, _smooth, float32_errors


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--act", choices=("relu", "gelu"), default="relu")
    p.add_argument("--seeds", type=int, default=3)
    args = p.parse_args()
    for seed in range(args.seeds):  # seed 0 is the CUDA test's setup
        mink, ref = _encoder_pair("resnet50", torch.device("cpu"), "minkowski", seed)
        if args.act == "gelu":
            mink, ref = _smooth(mink), _smooth(ref)
        images = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(seed + 3))
        _, gradients = float32_errors(mink, ref, images, _active(4, (7, 7), seed=seed + 1))
        errs = list(zip(*gradients.values()))  # (minkowski errors, torch errors)
        # the test passes while candidate error <= max(FLOOR, FACTOR * torch error): how much of
        # FACTOR each backend would use as the candidate, the other as the reference
        used = [max(c / max(FLOOR / FACTOR, r) for c, r in zip(cand, other)) for cand, other in (errs, errs[::-1])]
        print(f"seed {seed}: image gradient minkowski {errs[0][0]:.1e}, torch {errs[1][0]:.1e}; worst parameter "
              f"minkowski {max(errs[0][1:]):.1e}, torch {max(errs[1][1:]):.1e}; the test's factor needed: "
              f"{used[0]:.1f} (minkowski as the candidate), {used[1]:.1f} (torch as the candidate); "
              f"{'within' if max(used) <= FACTOR else 'BEYOND'} {FACTOR:g}", flush=True)

if __name__ == "__main__":
    main()
