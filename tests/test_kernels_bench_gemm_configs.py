"""The gather-GEMM config bench (kernels_bench.gemm_configs): the arguments it times are the
conv's own forward and input gradient, its summary reads the rows right, and it refuses to
run without a GPU. The timings themselves need CUDA (the GPU node's bench phase)."""
from __future__ import annotations

import pytest
import torch

from kernels_bench import gemm_configs
from kernels_bench.gemm_configs import GemmShape, gemm_calls, summary
from spark_me import ops


def _gathered(src: torch.Tensor, table: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``Σ_t src[table[t]] · weight[t]`` in float64 (the gather-GEMM's definition)."""
    padded = torch.cat([src, src.new_zeros(1, src.shape[1])]).double()
    return sum(padded[table[t].long()] @ weight[t].double() for t in range(len(table)))


@pytest.mark.parametrize("shape", [GemmShape("sub", 5, 6, 3, 1, 4), GemmShape("strided", 5, 6, 3, 2, 4),
                                   GemmShape("patchify", 3, 4, 2, 2, 8)], ids=lambda s: s.name)
def test_the_timed_calls_are_the_convs_forward_and_input_gradient(shape):
    """What the bench times, evaluated by the GEMM's definition, equals the torch backend's
    conv output and input gradient (float64) on the same features, weight and grad."""
    calls = gemm_calls(shape, 2, torch.float64, "cpu", torch.Generator().manual_seed(0))
    (src, table, weight, n_out), pairs = calls["fwd"]
    (grad, dtable, dweight, n_in), _ = calls["dgrad"]
    assert pairs == int((table < len(src)).sum()) > 0 and len(grad) == n_out and n_in == len(src)

    # the same features again (the same seed), as a leaf for the torch backend's autograd
    inp = gemm_configs.make_input(2, shape.c_in, 224, shape.tensor_stride, 0.4,
                                  torch.Generator().manual_seed(0), "cpu", torch.float64)
    leaf = inp.features.clone().requires_grad_()
    xs = inp.sparse(leaf)
    assert torch.equal(xs.F, src)
    k = shape.kernel_size
    torch_weight = weight.permute(2, 1, 0).reshape(shape.c_out, shape.c_in, k, k)  # [taps, in, out] -> PyTorch layout
    out, _ = ops.conv(xs, torch_weight, shape.stride, "torch")
    out.backward(grad)
    assert torch.allclose(_gathered(src, table, weight), out.detach(), rtol=1e-10, atol=1e-12)
    assert torch.allclose(_gathered(grad, dtable, dweight), leaf.grad, rtol=1e-10, atol=1e-12)


def test_the_summary_compares_the_best_of_each_loop_form():
    def row(config: str, ms: float) -> dict:
        return {"name": "s", "pass": "fwd", "rows": 10, "config": config, "ms": ms, "tflops": 1.0 / ms,
                "autotuned": "64x64x32-flat"}

    text = summary([row("64x64x32-nested", 2.0), row("128x64x32-nested", 1.0), row("64x64x32-flat", 0.5),
                    row("128x64x32-flat", 0.8)])
    line = text.splitlines()[1].split()
    assert line[:3] == ["s", "fwd", "10"]
    assert [float(v) for v in line[3:6]] == [1.0, 0.5, 0.5]  # best nested, best flat, flat/nested
    assert line[-1] == "64x64x32-flat"


def test_it_refuses_to_run_without_a_gpu(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit) as raised:
        gemm_configs.main(["--device", "cpu", "--out", str(tmp_path)])
    assert raised.value.code == 2 and "needs --device cuda" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
