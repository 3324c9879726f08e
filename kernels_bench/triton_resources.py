"""What each Triton kernel of the triton backend costs a GPU thread, compiled without a GPU.

    python -m kernels_bench.triton_resources [--dtype bf16 fp32] [--out resources.json]

Compiles every kernel's largest configs (:func:`kernel_signatures`) for sm_90 (H100/H200)
with the installed Triton and its bundled ptxas, and prints per kernel and config the
registers a thread, the bytes spilled to local memory and the shared memory a program
takes. Pointers and channel counts carry the 16-divisibility hint a launch gives them on
the encoders' shapes, so the code is what the GPU runs. It exits 1 when a kernel fails to
compile or needs more shared memory than an sm_90 program may have (the launch would fail
with ``OutOfResources``); spills are reported, not refused (they cost speed, not results).

The GPU nodes run another Triton than this machine's lock (docs/gpu.md), so before a loan
``make triton-node-check`` runs this module under the nodes' version.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

# The most shared memory one program may use on sm_90 (227 KiB, opted in).
SM90_MAX_SHARED_BYTES = 227 * 1024
# Integer arguments that the encoders' shapes make multiples of 16 (the row counts are
# never specialised; tap counts and the stem's 3 input channels are not multiples).
DIVISIBLE_INTS = ("c_in", "c_out", "channels")

Signature = tuple[object, dict, dict, dict]  # (kernel, argument types, constexprs, options)


def kernel_signatures(dtype: str, table: str) -> list[Signature]:
    """(kernel, argument types, constexprs, options) of every kernel's compiled path, the
    largest tiles (the GEMM's in both loop forms; the depthwise forward's and fused
    backward's every config, 49 taps; the layer norm's at 96, 768 and the most channels;
    the column sums' both forms and channel blocks);
    ``dtype``: the features' Triton type (``fp32``, ``bf16``, ``fp16``);
    ``table``: the tables' pointer type (``*i32``, or ``*i64`` past int32's range)."""
    from spark_me.ops.triton_backend import channel_sums, conv, depthwise, norm

    ptr = f"*{dtype}"
    rows = {"n_src": "i32", "n_dst": "i32"}
    gemm = {"src_ptr": ptr, "table_ptr": table, "weight_ptr": ptr, "out_ptr": ptr, **rows, "c_in": "i32", "c_out": "i32", "taps": "i32"}
    wgrad = {"src_ptr": ptr, "table_ptr": table, "grad_ptr": ptr, "gw_ptr": "*fp32", **rows, "c_in": "i32", "c_out": "i32"}
    dw = {"src_ptr": ptr, "table_ptr": table, "weight_ptr": ptr, "out_ptr": ptr, **rows, "channels": "i32"}
    dw_grad = {"src_ptr": ptr, "table_ptr": table, "grad_ptr": ptr, "gw_ptr": "*fp32", **rows, "channels": "i32"}
    dw_backward = {"x_ptr": ptr, "table_ptr": table, "grad_ptr": ptr, "weight_ptr": ptr, "grad_in_ptr": ptr,
                   "partial_ptr": "*fp32", "n_rows": "i32", "channels": "i32"}
    # the layer norm reads fp32 or the features' dtype and writes either (fp32 statistics)
    ln = {"x_ptr": ptr, "weight_ptr": "*fp32", "bias_ptr": "*fp32", "y_ptr": ptr, "mean_ptr": "*fp32",
          "rstd_ptr": "*fp32", "n_rows": "i32", "channels": "i32", "eps": "fp32"}
    ln_backward = {"x_ptr": ptr, "weight_ptr": "*fp32", "grad_ptr": ptr, "mean_ptr": "*fp32", "rstd_ptr": "*fp32",
                   "grad_in_ptr": ptr, "partial_ptr": "*fp32", "n_rows": "i32", "channels": "i32"}
    ln_tiles = [norm.layer_norm_tiles(4096, c, interpreted=False) for c in (96, 768, norm.LAYER_NORM_MAX_CHANNELS)]
    # column sums of a gradient; a layer scale's backward: an fp32 gradient (the scaled
    # product is promoted), the features in their dtype, an fp32 scale
    sums = {"grad_ptr": ptr, "x_ptr": ptr, "scale_ptr": ptr, "grad_in_ptr": ptr, "partial_ptr": "*fp32",
            "n_rows": "i32", "channels": "i32"}
    scaled = {**sums, "grad_ptr": "*fp32", "scale_ptr": "*fp32"}
    big = {"num_warps": 8, "num_stages": 3}
    return [
        *[(conv._gather_gemm_kernel, gemm, {"INTERPRETER": False, **c.kwargs}, big)
          for c in conv.GEMM_CONFIGS if c.kwargs["BLOCK_K"] == 64],
        (conv._weight_grad_kernel, wgrad, {"INTERPRETER": False, **conv.WEIGHT_GRAD_CONFIGS[-1].kwargs}, big),
        *[(depthwise._depthwise_kernel, dw, {"TAPS": 49, **c.kwargs},
           {"num_warps": c.num_warps, "num_stages": c.num_stages}) for c in depthwise.FORWARD_CONFIGS],
        (depthwise._depthwise_weight_grad_kernel, dw_grad,
         {"INTERPRETER": False, "BLOCK_R": depthwise.DEPTHWISE_BLOCK_R, "BLOCK_C": depthwise.DEPTHWISE_BLOCK_C}, big),
        *[(depthwise._depthwise_backward_kernel, dw_backward,
           {"TAPS": 49, "INTERPRETER": False, "TAPS_PAD": 64, **c.kwargs},
           {"num_warps": c.num_warps, "num_stages": c.num_stages}) for c in depthwise.BACKWARD_CONFIGS],
        *[(norm._layer_norm_kernel, ln, {"INTERPRETER": False, "BLOCK_R": r, "BLOCK_C": c}, {"num_warps": w})
          for r, c, w in ln_tiles],
        *[(norm._layer_norm_backward_kernel, ln_backward, {"INTERPRETER": False, "BLOCK_R": r, "BLOCK_C": c},
           {"num_warps": w}) for r, c, w in ln_tiles],
        *[(channel_sums._column_sums_kernel, signature,
           {"PRODUCT": product, "INTERPRETER": False, "BLOCK_R": channel_sums.COLUMN_SUM_TILE // c, "BLOCK_C": c},
           {"num_warps": 4})
          for product, signature in ((False, sums), (True, scaled)) for c in (32, 64)],
    ]


def kernel_name(kernel: object) -> str:
    """A ``@triton.jit`` function's name, compiled or interpreted."""
    return getattr(kernel, "__name__", None) or kernel.fn.__name__


def compile_for_sm90(kernel: object, signature: dict, constexprs: dict, options: dict):
    """``kernel`` compiled for sm_90 (a ``triton.compiler.CompiledKernel``), with the
    divisibility hints of a launch on the encoders' shapes. ``kernel``: a ``@triton.jit``
    function, or its interpreted form (whose ``fn`` is compiled then: the helpers it calls
    must be ``JITFunction`` s too)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = kernel if isinstance(kernel, triton.runtime.JITFunction) else triton.runtime.JITFunction(kernel.fn)
    hints = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(signature)
             if signature[name].startswith("*") or name in DIVISIBLE_INTS}
    source = ASTSource(fn, {**signature, **{k: "constexpr" for k in constexprs}}, constexprs=constexprs, attrs=hints)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


@dataclass
class Usage:
    """One compiled kernel's resources a program: ``registers`` a thread, local-memory
    ``spill_bytes`` (stores + loads), ``shared_bytes``."""
    kernel: str
    config: str
    dtype: str
    registers: int
    spill_bytes: int
    shared_bytes: int


def ptxas_usage(ptx: str) -> tuple[int, int]:
    """(registers a thread, spilled bytes stored + loaded) of ``ptx``, from Triton's ptxas
    (``-v``) for sm_90a, the target Triton compiles an H100's kernels for."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "kernel.ptx"
        source.write_text(ptx)
        log = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name=sm_90a", str(source), "-o", str(Path(tmp) / "k.o")],
                             capture_output=True, text=True, check=True).stderr
    return parse_ptxas_log(log)


def parse_ptxas_log(log: str) -> tuple[int, int]:
    """(registers, spilled bytes stored + loaded) from ``ptxas -v``'s report of one kernel."""
    registers = re.search(r"Used (\d+) registers", log)
    if registers is None:
        raise RuntimeError(f"ptxas -v printed no register count:\n{log}")
    return int(registers.group(1)), sum(int(s) for s in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))


def measure(dtypes: list[str]) -> list[Usage]:
    """Every kernel signature's usage for each features dtype (int32 tables)."""
    usages = []
    for dtype in dtypes:
        for kernel, signature, constexprs, options in kernel_signatures(dtype, "*i32"):
            compiled = compile_for_sm90(kernel, signature, constexprs, options)
            registers, spills = ptxas_usage(compiled.asm["ptx"])
            config = ", ".join(f"{k}={v}" for k, v in {**constexprs, **options}.items() if k != "INTERPRETER")
            usages.append(Usage(kernel_name(kernel), config, dtype, registers, spills, compiled.metadata.shared))
    return usages


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kernels_bench.triton_resources", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp16", "fp32"],
                   help="the features' dtypes to compile for (default: bf16 fp32)")
    p.add_argument("--expect-triton", metavar="VERSION",
                   help="fail unless the Triton imported is this version (make triton-node-check)")
    p.add_argument("--out", type=Path, help="also write the table as JSON here")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        p.error("TRITON_INTERPRET is set: the kernels would be interpreted, not compiled; unset it")
    import triton

    if args.expect_triton and triton.__version__ != args.expect_triton:
        p.error(f"Triton {triton.__version__} imported from {Path(triton.__file__).parent}, "
                f"not {args.expect_triton}: put that version first on PYTHONPATH")
    print(f"Triton {triton.__version__}, sm_90 (ptxas -v); shared memory limit {SM90_MAX_SHARED_BYTES} B a program")
    try:
        usages = measure(args.dtype)
    except Exception as e:  # a compile error: the message is Triton's or ptxas's
        print(f"triton_resources: a kernel failed to compile with Triton {triton.__version__}: {e}", file=sys.stderr)
        return 1
    width = max(len(u.kernel) for u in usages)
    print(f"{'kernel':{width}}  dtype  regs  spills  shared  config")
    for u in usages:
        print(f"{u.kernel:{width}}  {u.dtype:5}  {u.registers:4}  {u.spill_bytes:6}  {u.shared_bytes:6}  {u.config}")
    over = [u for u in usages if u.shared_bytes > SM90_MAX_SHARED_BYTES]
    spilled = [u for u in usages if u.spill_bytes]
    print(f"{len(usages)} kernels compiled; registers {min(u.registers for u in usages)}-"
          f"{max(u.registers for u in usages)}; {len(spilled)} spill; {len(over)} over the shared memory limit")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"triton": triton.__version__, "target": "sm_90a",
                                        "kernels": [asdict(u) for u in usages]}, indent=1) + "\n")
    for u in over:
        print(f"triton_resources: {u.kernel} ({u.dtype}; {u.config}) needs {u.shared_bytes} B of shared memory, "
              f"over sm_90's {SM90_MAX_SHARED_BYTES}: its launch would fail; shrink its tiles or stages", file=sys.stderr)
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
