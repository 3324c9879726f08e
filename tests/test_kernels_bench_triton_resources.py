"""kernels_bench.triton_resources: a kernel's registers, spills and shared memory for
sm_90, compiled without a GPU, and the CLI's refusals. (Every backend kernel compiles
through it in ``test_ops_triton.test_kernels_compile_for_the_gpu``.)"""
from __future__ import annotations

import json

import pytest

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from kernels_bench import triton_resources as tr  # noqa: E402

PTXAS_LOG = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'k' for 'sm_90a'
ptxas info    : Function properties for k
    16 bytes stack frame, 12 bytes spill stores, 8 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 16 bytes cumulative stack size
"""


def _copy(src_ptr, dst_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(dst_ptr + offsets, tl.load(src_ptr + offsets, mask=offsets < n), mask=offsets < n)


def test_a_small_kernel_compiles_for_sm90_with_its_usage():
    compiled = tr.compile_for_sm90(triton.jit(_copy), {"src_ptr": "*fp32", "dst_ptr": "*fp32", "n": "i32"},
                                   {"BLOCK": 512}, {"num_warps": 4})
    registers, spills = tr.ptxas_usage(compiled.asm["ptx"])
    assert 0 < registers <= 64 and spills == 0
    assert 0 <= compiled.metadata.shared <= tr.SM90_MAX_SHARED_BYTES


def test_the_log_parser_reads_registers_and_both_spills():
    assert tr.parse_ptxas_log(PTXAS_LOG) == (255, 20)
    with pytest.raises(RuntimeError, match="no register count"):
        tr.parse_ptxas_log("ptxas info    : 0 bytes gmem\n")


def _usage(shared: int, spills: int = 0) -> tr.Usage:
    return tr.Usage("_k", "BLOCK=64, num_warps=4", "bf16", 96, spills, shared)


def test_a_kernel_over_the_shared_memory_limit_fails_the_run(monkeypatch, capsys, tmp_path):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(tr, "measure", lambda dtypes: [_usage(1024, spills=8), _usage(tr.SM90_MAX_SHARED_BYTES + 1)])
    assert tr.main(["--dtype", "bf16", "--out", str(tmp_path / "r.json")]) == 1
    out, err = capsys.readouterr()
    assert "2 kernels compiled; registers 96-96; 1 spill; 1 over the shared memory limit" in out
    assert "its launch would fail" in err and str(tr.SM90_MAX_SHARED_BYTES + 1) in err
    written = json.loads((tmp_path / "r.json").read_text())
    assert written["triton"] == triton.__version__ and [k["shared_bytes"] for k in written["kernels"]] == [
        1024, tr.SM90_MAX_SHARED_BYTES + 1]


def test_a_run_within_the_limits_passes(monkeypatch, capsys):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(tr, "measure", lambda dtypes: [_usage(tr.SM90_MAX_SHARED_BYTES)])
    assert tr.main([]) == 0
    assert "0 over the shared memory limit" in capsys.readouterr().out


def test_another_triton_or_the_interpreter_is_refused(monkeypatch, capsys):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(SystemExit) as exit_:
        tr.main(["--expect-triton", "0.0.1"])
    assert exit_.value.code == 2 and f"Triton {triton.__version__} imported" in capsys.readouterr().err
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(SystemExit):
        tr.main([])
    assert "TRITON_INTERPRET is set" in capsys.readouterr().err
