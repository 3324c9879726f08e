"""Shared test helpers: tolerances, random weights, and device parametrisation."""
from __future__ import annotations

import os
import traceback
from pathlib import Path

import MinkowskiEngine as ME
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import spark_me

# float64 and float32 tolerances on relative error (DESIGN.md).
TOL = {torch.float64: 1e-10, torch.float32: 1e-4}

# The float32 references must be float32: CUDA convolutions default to TF32 (10-bit
# mantissa, ~1e-3 relative error), which no 1e-4 comparison survives.
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False

# The CUDA variants always appear, skipped (and so counted) without a GPU and a CUDA build
# of MinkowskiEngine. Every test that needs CUDA carries the `cuda` marker, so
# `pytest -m cuda` (make gpu-check's test phase) runs exactly those.
CUDA_READY = torch.cuda.is_available() and ME.is_cuda_available()
NEEDS_CUDA = [pytest.mark.cuda, pytest.mark.skipif(not CUDA_READY, reason="needs a CUDA GPU and MinkowskiEngine built with CUDA")]
DEVICES = ["cpu", pytest.param("cuda", marks=NEEDS_CUDA)]


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| (expected must not be all zero)."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    denom = expected.detach().double().norm()
    assert denom > 0, "reference is all zero: the comparison would prove nothing"
    return float((actual.detach().double() - expected.detach().double()).norm() / denom)


def random_images(batch: int, grid: tuple[int, int], dtype: torch.dtype, device, seed: int = 0) -> torch.Tensor:
    """(batch, 3, 32*grid[0], 32*grid[1]) standard-normal images, reproducible by ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, grid[0] * 32, grid[1] * 32, generator=g, dtype=dtype).to(device)


def randomize_norms(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Give every BatchNorm/LayerNorm non-trivial affine parameters and running stats.

    Default init (weight 1, bias 0, zero-init last BN of each block) would hide mistakes.
    """
    with torch.no_grad():
        for name, buf in list(model.named_parameters()) + list(model.named_buffers()):
            leaf = name.rsplit(".", 1)[-1]
            if buf.dim() != 1 or not buf.is_floating_point():
                continue
            if leaf == "running_var":
                buf.copy_(torch.rand(buf.shape, generator=generator, dtype=buf.dtype) + 0.5)
            elif leaf in ("weight", "running_mean", "bias") and ("bn" in name or "norm" in name or "downsample.1" in name):
                buf.copy_(torch.randn(buf.shape, generator=generator, dtype=buf.dtype) * 0.5 + (1.0 if leaf == "weight" else 0.0))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--failures-at-once", action="store_true",
                     help="print each failure's traceback as soon as the test fails, not only in the final summary "
                          "(make gpu-check: a phase limit can end pytest before its summary)")


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--failures-at-once", default=False):
        config.pluginmanager.register(_FailuresAtOnce(config), "spark_me_failures_at_once")


class _FailuresAtOnce:
    """Writes a failed test's traceback right after its outcome line."""

    MAX_LINES = 80  # the end of a traceback: the assertion or the error

    def __init__(self, config: pytest.Config) -> None:
        self.config = config

    @pytest.hookimpl(trylast=True)
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if not report.failed:
            return
        writer = self.config.pluginmanager.get_plugin("terminalreporter")
        lines = report.longreprtext.splitlines()
        writer.ensure_newline()
        writer.write_line(f"---- {report.nodeid} failed ({report.when}); its traceback's last "
                          f"{min(len(lines), self.MAX_LINES)} of {len(lines)} lines:")
        for line in lines[-self.MAX_LINES:]:
            writer.write_line(line)
        writer.write_line(f"---- end of {report.nodeid}")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)


# ATen ops that make a CUDA host wait for the device: reading a value back (item, int,
# bool, printing) and ops whose output size depends on the data.
HOST_SYNC_OPS = frozenset({
    "aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::_unique2",
    "aten::unique_consecutive", "aten::unique_dim", "aten::repeat_interleave", "aten::is_nonzero",
})


_PACKAGE = str(Path(spark_me.__file__).resolve().parent) + os.sep


class HostSyncAudit(TorchDispatchMode):
    """Records every op of :data:`HOST_SYNC_OPS` dispatched inside it, on any device: on a CPU
    run it finds the places where the same code on a GPU would stall the host."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []
        self.sources: list[str] = []  # per op: the innermost spark_me file:function that called it

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in HOST_SYNC_OPS:
            self.ops.append(func._schema.name)
            ours = [f for f in traceback.extract_stack() if f.filename.startswith(_PACKAGE)]
            self.sources.append(f"{Path(ours[-1].filename).name}:{ours[-1].name}" if ours else "outside spark_me")
        return func(*args, **(kwargs or {}))
