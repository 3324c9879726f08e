"""What every kernel module of the triton backend shares: the dtypes it computes in, the
row split of a reducing kernel (on the GPU and in the interpreter), operand checks and the
launch device."""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Programs per streaming multiprocessor a weight grad's row split (atomics) aims at.
PROGRAMS_PER_SM = 4
# Row splits of a weight grad on CPU (interpreter): enough to exercise the atomics.
CPU_SPLIT_PROGRAMS = 32


@triton.jit
def row_split(n_rows, BLOCK: tl.constexpr, AXIS: tl.constexpr):
    """This program's rows ``[start, end)`` where axis ``AXIS`` of the grid splits
    ``n_rows`` rows into chunks of whole ``BLOCK``-row tiles."""
    row_blocks = (n_rows + BLOCK - 1) // BLOCK
    chunk = (row_blocks + tl.num_programs(AXIS) - 1) // tl.num_programs(AXIS) * BLOCK
    start = tl.program_id(AXIS) * chunk
    return start, tl.minimum(start + chunk, n_rows)


# Triton decided at decoration whether the backend's kernels run in its interpreter
# (TRITON_INTERPRET=1 in the environment when this package is first imported).
INTERPRETED = not isinstance(row_split, triton.runtime.JITFunction)


def interpreter_tile(size: int, cap: int) -> int:
    """A tile edge for the interpreter: the power of two covering ``size`` (at least 16, as
    ``tl.dot`` wants), at most ``cap``. The interpreter pays per operation, not per
    element, so a few large tiles run far faster than many small ones."""
    return max(16, min(cap, triton.next_power_of_2(max(size, 1))))


def check_operands(features: torch.Tensor, weight: torch.Tensor) -> None:
    """Raise unless the kernels can run on these features and weight."""
    if features.dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"the triton backend computes in float32, bfloat16 or float16 (tl.dot has no float64), "
            f"got {features.dtype}; use conv_impl='torch'"
        )
    if weight.dtype != features.dtype:
        raise ValueError(f"features ({features.dtype}) and weight ({weight.dtype}) must have one dtype")
    check_device(features)


def check_device(features: torch.Tensor) -> None:
    """Raise unless the kernels can run on ``features``' device."""
    if features.device.type != "cuda" and not INTERPRETED:
        raise ValueError(
            "the triton backend runs on CUDA tensors (on CPU only under the Triton interpreter, "
            "TRITON_INTERPRET=1 before spark_me.ops.triton_backend is imported); use conv_impl='torch' on CPU"
        )


def on_device(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """Make ``tensor``'s GPU the current one for a launch (Triton launches on the current
    device); nothing to do on the CPU."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def atomic_splits(device: torch.device, tiles: int, row_blocks: int) -> int:
    """Row splits of a kernel whose programs add their rows' sums onto one fp32 buffer with
    atomics (the weight grads): about ``PROGRAMS_PER_SM`` programs per SM over all
    ``tiles``, at most one per row block; one under deterministic algorithms (each element
    then gets exactly one atomic add onto zero)."""
    if torch.are_deterministic_algorithms_enabled():
        return 1
    if device.type == "cuda":
        target = PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = CPU_SPLIT_PROGRAMS
    return max(1, min(row_blocks, triton.cdiv(target, tiles)))


def partial_splits(device: torch.device, row_tiles: int, per_sm: int, cpu_splits: int,
                   programs_per_split: int = 1) -> int:
    """Row splits of a kernel whose programs each write their split's sums as a partial,
    summed afterwards (no atomics; ``programs_per_split`` programs a split, e.g. one per
    channel block): about ``per_sm`` programs per SM in all, ``cpu_splits`` in the
    interpreter, at most one split per row tile (``row_tiles`` of them)."""
    if device.type != "cuda":
        return max(1, min(cpu_splits, row_tiles))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(row_tiles, triton.cdiv(per_sm * sms, programs_per_split)))
