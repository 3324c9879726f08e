"""The triton backend: the sparse encoders' arithmetic as fused Triton kernels on
neighbour tables, and the per-site layer norm and per-channel gradient sums around them.

Same maths and signatures as :mod:`spark_me.ops.torch_backend` (read its docstring), with
no gathered ``[N, K·C]`` copy anywhere: each kernel reads its neighbours through the
``[K, N]`` table inside the tile loads (an absent neighbour, the sentinel, is a masked
load of zeros). A module per op, each with its kernels, their tiles and its autograd
function:

* :mod:`.conv`: sparse conv (implicit GEMM) forward, input grad and weight grad;
* :mod:`.depthwise`: depthwise conv, its backward fused into one pass;
* :mod:`.norm`: layer norm over each site's channels;
* :mod:`.channel_sums`: bias and layer-scale gradients (``linear``, ``add_bias``,
  ``layer_scale``);
* :mod:`.common`: dtypes, row splits, checks;
* max-pool: :func:`gather_max` is :func:`spark_me.ops.torch_backend.gather_max` (a
  comparison per tap; nothing to fuse worth a kernel yet).

Precision: inputs load in their dtype (float32, bfloat16, float16), every product
accumulates in fp32 and rounds once to the output dtype. float32 tiles multiply with
``tl.dot(..., input_precision="ieee")`` (exact fp32 FMAs, no TF32, whatever
``allow_tf32`` says), so float32 matches the torch backend to ~1e-6; that kwarg exists
from Triton 3.0 (3.6 on the GPU nodes, 3.8 here; the older ``allow_tf32=`` is deprecated).
bf16/fp16 tiles take ``tl.dot``'s default (tensor cores, fp32 accumulator). float64 is
refused with an error naming ``conv_impl="torch"`` (fp64 training is no use case here,
and fp64 ``tl.dot`` is not in every Triton this project meets).

Tiles: ``triton.autotune`` over a few configs, keyed on the channel counts (and tap
count): each new key costs one benchmark of every config (once per process), so the
lists stay short (the gather-GEMM's: four tile shapes, each in both loop forms; the
depthwise forward's and fused backward's: tile shapes with the tap loop one tap at a time
or a few taps unrolled). The depthwise weight grad, the layer norm and the column sums
have fixed tiles.

The Triton interpreter (CPU tensors; ``TRITON_INTERPRET=1`` in the environment when this
package is imported, as Triton decides at decoration; :data:`INTERPRETED`) runs tiles as
NumPy arrays, which makes these differences, all behind the ``INTERPRETER`` constexpr or
on the host side:

* tiles are sized to the problem, large (:func:`.common.interpreter_tile`), without
  autotuning: the interpreter pays per operation, not per element;
* ``tl.dot`` operands go to fp32 first: the interpreter's ``tl.dot`` multiplies bfloat16
  tiles as their raw uint16 bits (Triton 3.8). The products are the same (a bf16 or fp16
  product is exact in fp32), as is the fp32 accumulation;
* Triton's standard library (``tl.sum``, ``tl.zeros``, ``tl.cdiv`` ...) is decorated when
  ``triton`` is first imported, usually by torch without the interpreter, and cannot run
  in it then; so the kernels use builtins only, and sum a tile's columns or rows by a
  product with ones (or a one-hot row) in the interpreter (``tl.sum`` on the GPU);
* its casts from fp32 to bf16 truncate where the GPU rounds to nearest, so an interpreted
  bf16 output may be one unit of the last place off where the GPU's is half a unit at most.
"""
from __future__ import annotations

import torch

from spark_me.ops import torch_backend
from spark_me.ops.tables import NeighbourTables
from spark_me.ops.triton_backend.channel_sums import add_bias, layer_scale, linear
from spark_me.ops.triton_backend.common import INTERPRETED, SUPPORTED_DTYPES
from spark_me.ops.triton_backend.conv import gather_gemm, input_grad_operands, inverse_table, sparse_conv
from spark_me.ops.triton_backend.depthwise import depthwise_backward, depthwise_conv
from spark_me.ops.triton_backend.norm import LAYER_NORM_MAX_CHANNELS, layer_norm

__all__ = [
    "INTERPRETED",
    "LAYER_NORM_MAX_CHANNELS",
    "SUPPORTED_DTYPES",
    "add_bias",
    "depthwise_backward",
    "depthwise_conv",
    "gather_gemm",
    "gather_max",
    "input_grad_operands",
    "inverse_table",
    "layer_norm",
    "layer_scale",
    "linear",
    "sparse_conv",
]


def gather_max(features: torch.Tensor, tables: NeighbourTables) -> torch.Tensor:
    """Max-pool: :func:`spark_me.ops.torch_backend.gather_max` (no Triton kernel of its own)."""
    return torch_backend.gather_max(features, tables)
