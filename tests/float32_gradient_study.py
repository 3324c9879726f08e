"""How far float32 gradients of a whole sparse ResNet-50 fall from float64, per backend:
the study behind the bound of test_ops_triton.check_float32_gradients_as_exact_as_torch.

    python tests/float32_gradient_study.py --act relu --seeds 3   # the lottery: 1e-6 .. 1e-2
    python tests/float32_gradient_study.py --act gelu --seeds 6   # smooth: ~1e-4, backends within ~3x

For each seed: the same random encoder (timm init, random norms) with the ``minkowski`` and
the ``torch`` backends in float32, and the ``torch`` backend in float64, on batch 4 of
224 px under a 60 % patch mask; the setup of the CUDA test. Prints each float32 backend's
relative error against float64 for the image gradient, the worst parameter gradient and
how much of the test's factor each backend
needs when the other stands in for the torch backend. CPU, about 15 s per seed.
"""
from __future__ import annotations

import argparse
import copy

import torch

from conftest import randomize_norms, rel_err
from test_ops import _active
from test_ops_triton import GRADIENT_FACTOR as FACTOR, GRADIENT_FLOOR as FLOOR, _encoder_step, _smooth
from spark_me import build_sparse_encoder
from spark_me.layers import set_conv_impl


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--act", choices=("relu", "gelu"), default="relu")
    p.add_argument("--seeds", type=int, default=3)
    args = p.parse_args()
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        mink = build_sparse_encoder("resnet50", conv_impl="minkowski")
        randomize_norms(mink, torch.Generator().manual_seed(seed + 1))
        if args.act == "gelu":
            _smooth(mink)
        ref = set_conv_impl(copy.deepcopy(mink), "torch")
        exact = copy.deepcopy(ref).double()
        images = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(seed + 3))
        active = _active(4, (7, 7), seed=seed + 1)
        runs = [_encoder_step(e.eval(), x, active) for e, x in ((mink, images), (ref, images), (exact, images.double()))]
        errs = [[rel_err(g, e) for g, e in zip([r[1], *r[2].values()], [runs[2][1], *runs[2][2].values()])]
                for r in runs[:2]]
        # the test passes while candidate error <= max(FLOOR, FACTOR * torch error): how much of
        # FACTOR each backend would use as the candidate, the other as the reference
        used = [max(c / max(FLOOR / FACTOR, r) for c, r in zip(cand, ref)) for cand, ref in (errs, errs[::-1])]
        print(f"seed {seed}: image gradient minkowski {errs[0][0]:.1e}, torch {errs[1][0]:.1e}; worst parameter "
              f"minkowski {max(errs[0][1:]):.1e}, torch {max(errs[1][1:]):.1e}; the test's factor needed: "
              f"{used[0]:.1f} (minkowski as the candidate), {used[1]:.1f} (torch as the candidate); "
              f"{'within' if max(used) <= FACTOR else 'BEYOND'} {FACTOR:g}", flush=True)


if __name__ == "__main__":
    main()
