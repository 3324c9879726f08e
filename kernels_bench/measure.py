"""Time and memory of one benchmark case: a variant, a part of the step, a configuration.

Parts: ``encoder_fwd`` (train-mode forward without autograd), ``encoder_fwd_bwd`` (forward
and backward of the sum of the feature maps), ``step`` (SparK loss, backward, optimizer
step). Time is the median of ``repeats`` runs after ``warmup`` runs (synchronised on
CUDA). Memory: on CUDA the peak allocated during the runs (absolute, and above what was
allocated before them); on CPU the peak RSS during the runs (the peak is reset after the
set-up) and its growth over the RSS before them. Freed memory that the allocator keeps
would hide later peaks, so on CPU each case runs in a fresh process:

    python -m kernels_bench.measure '{"model": "resnet50", "variant": "sparse", ...}'
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch
import torch.nn as nn

from kernels_bench.variants import VARIANTS, build_variant, feature_sum
from spark_me import SparK, build_sparse_encoder, import_encoder_modules, list_encoders, random_patch_mask

PARTS = ("encoder_fwd", "encoder_fwd_bwd", "step")


@dataclass(frozen=True)
class Case:
    """One measurement. ``amp`` (bf16/fp16) wraps the whole measured part in autocast, on
    CUDA; ``channels_last`` applies to the dense parts (the dense variants' encoders, and
    every variant's densify and decoder)."""

    model: str
    variant: str
    part: str
    batch: int
    size: int
    mask_ratio: float
    device: str = "cpu"
    amp: Optional[str] = None
    channels_last: bool = False
    threads: Optional[int] = None
    warmup: int = 1
    repeats: int = 3
    decoder_width: int = 768
    seed: int = 0
    imports: tuple[str, ...] = ()  # modules registering users' encoders (see import_encoder_modules)
    conv_impl: str = "auto"  # sparse conv backend of the sparse encoder (spark_me.ops.CONV_IMPLS)
    grad_checkpointing: bool = False  # the sparse encoder recomputes its blocks in the backward
    checkpoint_stages: Optional[int] = None  # ... only those of its first N stages (None: all)
    # the sparse encoder runs on one batch gathered once, its maps and tables built once
    # (kernels_bench.variants.SparseSparK): the encoder without what every new batch costs
    reuse_batch: bool = False
    # the sparse encoder's first conv runs densely on the zero-filled image and is gathered
    # at its output sites (SparseEncoder.set_dense_stem): no full-resolution coordinates
    dense_stem: bool = False
    # the sparse encoder's training forward+backward is replayed from a CUDA graph
    # (SparseEncoder.set_cuda_graphs): captured on the first run, its tables refilled after
    cuda_graphs: bool = False

    def validate(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant {self.variant!r} is unknown; choose from {', '.join(VARIANTS)}")
        if self.part not in PARTS:
            raise ValueError(f"part {self.part!r} is unknown; choose from {', '.join(PARTS)}")
        if self.batch < 1:
            raise ValueError(f"batch must be at least 1, got {self.batch}")
        if self.size % 32:
            raise ValueError(f"size {self.size} is not a multiple of 32")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio {self.mask_ratio} is outside [0, 1)")
        if self.amp not in (None, "bf16", "fp16"):
            raise ValueError(f"amp {self.amp!r} must be null, 'bf16' or 'fp16'")
        if (self.amp or self.channels_last) and not self.device.startswith("cuda"):
            raise ValueError("amp and channels_last rows are for CUDA only")
        if self.grad_checkpointing and (self.variant != "sparse" or self.part == "encoder_fwd"):
            raise ValueError("grad_checkpointing rows are sparse rows of a part with a backward")
        if self.checkpoint_stages is not None and not (self.grad_checkpointing and self.checkpoint_stages >= 1):
            raise ValueError(f"checkpoint_stages={self.checkpoint_stages} needs grad_checkpointing and at least 1 stage")
        if self.reuse_batch and (self.variant != "sparse" or self.part == "step"):
            raise ValueError("reuse_batch rows are sparse rows of an encoder part (a step always gathers its batch)")
        if self.dense_stem and (self.variant != "sparse" or self.reuse_batch):
            raise ValueError("dense_stem rows are sparse rows that gather each batch (not reuse_batch rows)")
        if self.cuda_graphs and (self.variant != "sparse" or self.part == "encoder_fwd" or self.reuse_batch
                                 or self.conv_impl == "minkowski" or not self.device.startswith("cuda")):
            raise ValueError("cuda_graphs rows are CUDA sparse rows of a part with a backward that gather each batch, "
                             "with a backend other than minkowski")


def unknown_encoders_error(models: Iterable[str]) -> Optional[str]:
    """The message for encoder names that are not registered, or None when all are."""
    known = list_encoders()
    unknown = [m for m in models if m not in known]
    if not unknown:
        return None
    return f"unknown encoder(s) {', '.join(map(repr, unknown))}; registered: {', '.join(known)}"


def case_error(cases: Iterable[Case]) -> Optional[str]:
    """Why one of ``cases`` cannot run (an unknown encoder, a bad size, ...), or None: for a
    command line to report before it measures anything."""
    for case in cases:
        if error := unknown_encoders_error([case.model]):
            return error
        try:
            case.validate()
        except ValueError as e:
            return str(e)
    return None


def synchronize(device: torch.device) -> None:
    """Wait for ``device``'s queued work (CUDA); a no-op on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _proc_status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise KeyError(field)


def _reset_peak_rss() -> float:
    """Reset the process's peak RSS (Linux clear_refs) and return the current RSS in MiB,
    so the next peak is that of the timed runs, not of the set-up before them."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _proc_status_mib("VmRSS")
    except OSError:  # not Linux, or not permitted: fall back to the lifetime peak
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _peak_rss_mib() -> float:
    try:
        return _proc_status_mib("VmHWM")
    except (OSError, KeyError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_inputs(case: Case, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Reproducible images and patch mask of a case (the same for every variant)."""
    g = torch.Generator().manual_seed(case.seed)
    images = torch.randn(case.batch, 3, case.size, case.size, generator=g)
    grid = case.size // 32
    active = random_patch_mask(case.batch, (grid, grid), case.mask_ratio, g)
    return images.to(device), active.to(device)


def build_sparse_spark(case: Case, device: torch.device) -> SparK:
    """The reference SparK of a case; every variant copies its weights."""
    torch.manual_seed(case.seed)
    encoder = build_sparse_encoder(case.model, conv_impl=case.conv_impl)
    encoder.set_grad_checkpointing(case.grad_checkpointing, stages=case.checkpoint_stages)
    encoder.set_dense_stem(case.dense_stem)
    encoder.set_cuda_graphs(case.cuda_graphs)
    return SparK(encoder, decoder_width=case.decoder_width, mask_ratio=case.mask_ratio).to(device).train()


def step_loss(model: nn.Module, images: torch.Tensor, active: torch.Tensor, variant: str,
              amp: Optional[torch.dtype]) -> Callable[[], torch.Tensor]:
    """The loss of one training step's forward: under ``amp`` the whole forward is one
    autocast region (for the sparse variant, the training step's own ``SparKStep``)."""
    if amp is not None and variant == "sparse":
        from spark_me.pretrain import SparKStep

        step = SparKStep(model.model, amp)
        return lambda: step(images, active)
    if amp is not None:
        def run() -> torch.Tensor:
            with torch.autocast(images.device.type, dtype=amp):
                return model(images, active)
        return run
    return lambda: model(images, active)


def _step_fn(case: Case, model: nn.Module, images: torch.Tensor, active: torch.Tensor) -> Callable[[], None]:
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(case.amp or "")

    def autocast() -> contextlib.AbstractContextManager:
        return torch.autocast(images.device.type, dtype=amp) if amp is not None else contextlib.nullcontext()

    # Every variant's encoder runs under the case's autocast: the sparse convs take the
    # autocast dtype like dense ones (minkowski, fp32-only, gets no amp rows in a plan).
    if case.part == "encoder_fwd":
        def run() -> None:
            with torch.no_grad(), autocast():
                model.encode(images, active)
        return run
    if case.part == "encoder_fwd_bwd":
        def run() -> None:
            model.zero_grad(set_to_none=True)
            with autocast():
                loss = feature_sum(model.encode(images, active))
            loss.backward()
        return run

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    scaler = torch.amp.GradScaler("cuda", enabled=case.amp == "fp16")
    forward = step_loss(model, images, active, case.variant, amp)

    def run() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = forward()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    return run


def prepare_case(case: Case) -> tuple[Callable[[], None], torch.Tensor]:
    """Build a case's model and inputs in this process; returns the function that runs the
    measured part once (not synchronised) and the patch mask."""
    case.validate()
    import_encoder_modules(case.imports)
    device = torch.device(case.device)
    if case.threads:
        torch.set_num_threads(case.threads)
    sparse = build_sparse_spark(case, device)
    model = build_variant(sparse, case.variant, case.reuse_batch).to(device).train()
    if case.variant != "sparse":
        del sparse  # the dense variants hold copies; keep only what is measured
    if case.channels_last:
        model = model.to(memory_format=torch.channels_last)
    images, active = make_inputs(case, device)
    if case.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    fn = _step_fn(case, model, images, active)
    return (_replayed_only(fn, sparse.encoder) if case.cuda_graphs else fn), active


def _replayed_only(fn: Callable[[], None], encoder: nn.Module) -> Callable[[], None]:
    """``fn``, raising if the encoder ran a batch without its CUDA graph (a failed capture or
    a batch that did not fit it falls back with a warning): a ``+cuda_graphs`` row must
    time replays only."""
    def run() -> None:
        fn()
        graphs = encoder.encoder_graphs
        if graphs is None or graphs.plain_runs:
            raise RuntimeError("the encoder ran without its CUDA graph (see the warning above): this row would "
                               "time the plain encoder")
    return run


def run_case(case: Case) -> dict:
    """Measure one case in this process; returns the case's fields plus the results."""
    fn, active = prepare_case(case)
    device = torch.device(case.device)

    synchronize(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base_mib = torch.cuda.memory_allocated(device) / 2**20
    else:
        base_mib = _reset_peak_rss()
    times = []
    for i in range(case.warmup + case.repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        if i >= case.warmup:
            times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak_mib = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak_mib = _peak_rss_mib()
    median = statistics.median(times)
    return {
        **dataclasses.asdict(case),
        "threads": torch.get_num_threads(),
        "median_s": median,
        "runs_s": times,
        "images_per_s": case.batch / median,
        "peak_mib": peak_mib,
        "peak_growth_mib": peak_mib - base_mib,
        "memory_kind": "cuda_max_allocated" if device.type == "cuda" else "cpu_peak_rss",
        "visible_fraction": float(active.float().mean()),
    }


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: python -m kernels_bench.measure '<case as JSON>'")
    result = run_case(Case(**json.loads(sys.argv[1])))
    sys.stdout.write("RESULT " + json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
