"""Submanifold depthwise convolution by neighbour gathers, with a hand-written backward.

MinkowskiEngine 0.5.4's channel-wise convolution loops in Python over the kernel offsets
and lets autograd record an indexed multiply-add per offset, saving a gathered copy of
the input for each of the 49 offsets of a 7×7 kernel. Here the kernel map becomes one
``[K, N]`` neighbour table (row ``N`` of the padded input is zero, standing for an absent
neighbour) and a custom autograd function keeps only the input, the weight and the table:

* forward:      ``out[n] = Σ_k x[nbr[k, n]] · w[k]``
* grad input:   the same gather with the kernel mirrored (stride 1 maps a site's
  neighbours onto it symmetrically: offset k of n lands on n' iff offset K-1-k of n'
  lands on n, as the offsets are enumerated in a centred, point-symmetric order);
* grad weight:  ``gw[k] = Σ_n x[nbr[k, n]] · g[n]``.

Each offset is one ``index_select`` of contiguous indices plus a fused multiply-add.
"""
from __future__ import annotations

import MinkowskiEngine as ME
import torch


def neighbour_table(x: ME.SparseTensor, kernel_generator: ME.KernelGenerator) -> torch.Tensor:
    """``[K, N]`` int64 table: entry (k, n) is the input row at offset k of site n, or N if absent."""
    cm = x.coordinate_manager
    key = x.coordinate_map_key
    kmap = cm.kernel_map(
        key,
        key,
        stride=1,
        kernel_size=kernel_generator.kernel_size,
        dilation=kernel_generator.kernel_dilation,
        region_type=kernel_generator.region_type,
    )
    n = x.F.shape[0]
    volume = kernel_generator.kernel_volume
    table = torch.full((volume, n), n, dtype=torch.long, device=x.F.device)
    for k, in_out in kmap.items():
        in_out = in_out.long().to(x.F.device)
        table[k, in_out[1]] = in_out[0]
    return table


def _gather_conv(features: torch.Tensor, weight: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    padded = torch.cat([features, features.new_zeros(1, features.shape[1])])
    out = features.new_zeros(table.shape[1], features.shape[1])
    for k in range(table.shape[0]):
        out.addcmul_(padded.index_select(0, table[k]), weight[k])
    return out


class _DepthwiseConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, features: torch.Tensor, weight: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(features, weight, table)
        return _gather_conv(features, weight, table)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        features, weight, table = ctx.saved_tensors
        grad = grad.contiguous()
        grad_in = _gather_conv(grad, weight.flip(0), table) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            padded = torch.cat([features, features.new_zeros(1, features.shape[1])])
            grad_w = torch.stack([(padded.index_select(0, t) * grad).sum(0) for t in table])
        return grad_in, grad_w, None


def depthwise_conv(features: torch.Tensor, weight: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Depthwise submanifold conv: ``features`` [N, C], ``weight`` [K, C], ``table`` [K, N]."""
    return _DepthwiseConv.apply(features, weight, table)


def depthwise_conv_minkowski(x: ME.SparseTensor, weight: torch.Tensor, kernel_generator: ME.KernelGenerator) -> torch.Tensor:
    """MinkowskiEngine 0.5.4's own channel-wise algorithm (an autograd-recorded indexed
    multiply-add per offset); kept as the baseline that :func:`depthwise_conv` replaces."""
    cm, key = x.coordinate_manager, x.coordinate_map_key
    kmap = cm.kernel_map(
        key, key, stride=1, kernel_size=kernel_generator.kernel_size,
        dilation=kernel_generator.kernel_dilation, region_type=kernel_generator.region_type,
    )
    out = x.F.new_zeros(x.F.shape)
    for k, in_out in kmap.items():
        in_out = in_out.long().to(x.F.device)
        out[in_out[1]] += x.F[in_out[0]] * weight[k]
    return out
