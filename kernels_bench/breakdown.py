"""Where the time of a sparse SparK step goes.

MinkowskiEngine's convolutions run in C++ outside the PyTorch profiler's view, so the
breakdown is measured by ablation, each part timed on its own (medians):

* kernel maps: encoder forward on fresh coordinates minus the same forward on a
  coordinate manager that already holds every coordinate and kernel map;
* GEMM (estimate): per sparse conv, the matrix products MinkowskiEngine performs (one per
  kernel offset over its matched pairs; forward, input gradient, weight gradient) timed
  as plain ``torch.mm`` on tensors of those shapes;
* gather/scatter and other encoder ops: the rest of the encoder's forward+backward (row
  gathers and scatter-adds around each GEMM, norms, activations, depthwise convs, Python);
* densify and decoder+loss: forward+backward of each on detached inputs.

A ``torch.profiler`` table of the step's top operators by self time comes with it.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import MinkowskiEngine as ME
import torch

from kernels_bench.measure import Case, build_sparse_spark, make_inputs
from spark_me import SparK
from spark_me.gather import to_sparse
from spark_me.layers import SparseConv2d
from spark_me.loss import masked_reconstruction_loss


def median_time(fn: Callable[[], None], warmup: int, repeats: int) -> float:
    """Median wall time of ``repeats`` calls after ``warmup`` calls (CPU: synchronous)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def conv_gemm_shapes(model, images: torch.Tensor, active: torch.Tensor) -> list[tuple[int, int, int]]:
    """(pairs, in, out) of every dense-channel matrix product in the sparse encoder's convs."""
    shapes: list[tuple[int, int, int]] = []

    def hook(module: SparseConv2d, inputs, output) -> None:
        if module.groups != 1:
            return
        x = inputs[0]
        if module.kernel_size == 1 and module.stride == 1:
            shapes.append((x.F.shape[0], module.in_channels, module.out_channels))
            return
        maps = x.coordinate_manager.kernel_map(
            x.coordinate_map_key, output.coordinate_map_key, stride=module.stride, kernel_size=module.kernel_size
        )
        for pairs in maps.values():
            shapes.append((int(pairs.shape[-1]), module.in_channels, module.out_channels))

    handles = [m.register_forward_hook(hook) for m in model.encoder.modules() if isinstance(m, SparseConv2d)]
    try:
        with torch.no_grad():
            model.encoder(images, active)
    finally:
        for h in handles:
            h.remove()
    return shapes


def gemm_time(shapes: list[tuple[int, int, int]], warmup: int, repeats: int) -> float:
    """Forward + both backward products of every (pairs, in, out) as torch.mm."""
    tensors = [(torch.randn(n, i), torch.randn(i, o), torch.randn(n, o)) for n, i, o in shapes if n > 0]

    def run() -> None:
        for a, w, g in tensors:
            torch.mm(a, w)  # forward
            torch.mm(g, w.t())  # input gradient
            torch.mm(a.t(), g)  # weight gradient

    return median_time(run, warmup, repeats)


def step_parts(model: SparK, images: torch.Tensor, active: torch.Tensor) -> dict[str, Callable[[bool], None]]:
    """Forward+backward of each part of a sparse SparK step, gradients zeroed first: the
    encoder on the images, densify and decoder + loss each on detached inputs (so a part's
    time is its own). The argument turns bf16 autocast on (on CPU: kernels_bench.cpu_bf16)."""
    b, _, h, w = images.shape
    features = model.encoder(images, active)
    detached = [ME.SparseTensor(f.F.detach().requires_grad_(), coordinate_map_key=f.coordinate_map_key,
                                coordinate_manager=f.coordinate_manager) for f in features]
    maps = [m.detach().requires_grad_() for m in model.densify(detached, b, (h, w))]

    def autocast(bf16: bool) -> torch.autocast:
        return torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=bf16)

    def encoder(bf16: bool) -> None:
        with autocast(bf16):
            out = model.encoder(images, active)
        sum(f.F.float().sum() for f in out).backward()

    def densify(bf16: bool) -> None:
        with autocast(bf16):
            out = model.densify(detached, b, (h, w))
        sum(m.float().sum() for m in out).backward()

    def decoder_loss(bf16: bool) -> None:
        with autocast(bf16):
            reconstruction = model.decoder(maps)
        masked_reconstruction_loss(reconstruction.float(), images, active, model.patch_size).backward()

    def zeroed(fn: Callable[[bool], None]) -> Callable[[bool], None]:
        def run(bf16: bool) -> None:
            model.zero_grad(set_to_none=True)
            fn(bf16)
        return run

    return {"sparse encoder": zeroed(encoder), "densify": zeroed(densify), "decoder + loss": zeroed(decoder_loss)}


def sparse_step_breakdown(model_name: str, batch: int, size: int, mask_ratio: float, warmup: int = 1,
                          repeats: int = 3, decoder_width: int = 768) -> dict:
    """Seconds per component of one sparse SparK forward+backward (CPU), and their shares."""
    case = Case(model_name, "sparse", "step", batch, size, mask_ratio, decoder_width=decoder_width)
    model = build_sparse_spark(case, torch.device("cpu"))
    images, active = make_inputs(case, torch.device("cpu"))
    enc = model.encoder

    def step() -> None:
        model.zero_grad(set_to_none=True)
        model(images, active).backward()

    def encoder_fwd() -> None:
        with torch.no_grad():
            enc(images, active)

    gathered = to_sparse(images, active, enc.downsample_ratio)
    enc.forward_sparse(gathered)  # fills the manager with every coordinate and kernel map

    def encoder_fwd_cached() -> None:
        with torch.no_grad():
            enc.forward_sparse(gathered)

    parts = step_parts(model, images, active)
    t = {
        "step_fwd_bwd": median_time(step, warmup, repeats),
        "encoder_fwd": median_time(encoder_fwd, warmup, repeats),
        "encoder_fwd_cached_maps": median_time(encoder_fwd_cached, warmup, repeats),
        "encoder_fwd_bwd": median_time(lambda: parts["sparse encoder"](False), warmup, repeats),
        "densify_fwd_bwd": median_time(lambda: parts["densify"](False), warmup, repeats),
        "decoder_loss_fwd_bwd": median_time(lambda: parts["decoder + loss"](False), warmup, repeats),
        "gemm_estimate": gemm_time(conv_gemm_shapes(model, images, active), warmup, repeats),
    }
    kernel_maps = max(t["encoder_fwd"] - t["encoder_fwd_cached_maps"], 0.0)
    other = max(t["encoder_fwd_bwd"] - kernel_maps - t["gemm_estimate"], 0.0)
    components = {
        "kernel maps (coordinate + kernel-map construction)": kernel_maps,
        "GEMM in sparse convs (estimate)": t["gemm_estimate"],
        "gather/scatter and other encoder ops": other,
        "densify": t["densify_fwd_bwd"],
        "decoder + loss": t["decoder_loss_fwd_bwd"],
    }
    total = sum(components.values())
    return {
        "model": model_name, "batch": batch, "size": size, "mask_ratio": mask_ratio,
        "threads": torch.get_num_threads(), "timings_s": t, "components_s": components,
        "shares": {k: v / total for k, v in components.items()},
        "sum_of_components_s": total, "profile_top_ops": profile_top_ops(step),
    }


def profile_top_ops(step: Callable[[], None], top: int = 12) -> list[dict]:
    """The step's operators with the most self CPU time (torch.profiler)."""
    step()  # warm-up
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    return [{"op": e.key, "calls": e.count, "self_s": e.self_cpu_time_total / 1e6,
             "share": e.self_cpu_time_total / total} for e in events[:top]]
