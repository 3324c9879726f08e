"""Multi-process training: process-group set-up (torchrun) and synchronised BatchNorm.

BatchNorm statistics in SparK are per batch; with several processes each sees only its
shard, so ``convert_sync_batchnorm`` swaps every BatchNorm for a synchronised one: the
sparse ones (:class:`~spark_me.layers.SparseBatchNorm2d`, statistics over the visible
sites of all ranks) and the decoder's dense ``nn.BatchNorm2d``. State-dict keys do not
change, so checkpoints load into converted and plain models alike.

On CUDA the synchronisation uses ``nn.SyncBatchNorm``'s fused kernels. ``nn.SyncBatchNorm``
refuses CPU tensors (and DDP refuses it in CPU modules), so on CPU (gloo) the statistics
are all-reduced here with autograd-aware collectives, which keeps the backward exact
across ranks.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import MinkowskiEngine as ME
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn as nn
from torch.nn.modules._functions import SyncBatchNorm as _TorchSyncBatchNorm
from torch.nn.modules.batchnorm import _BatchNorm

from spark_me.layers import SparseBatchNorm2d, with_features

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"trainer.device={device} but CUDA is not available: use trainer.device=cpu or auto")
    return torch.device(device)


def init_distributed(device: str = "auto", timeout_s: float = 1800) -> DistInfo:
    """Join the process group torchrun describes (RANK/WORLD_SIZE/LOCAL_RANK), if any.

    Backend: NCCL on CUDA, gloo on CPU. Each process uses GPU ``LOCAL_RANK``.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s))
        log.info("process group: rank %d of %d (%s, %s)", rank, world_size, backend, dev)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def cleanup_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean over processes (a copy; identity without a process group)."""
    t = t.detach().clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


def all_gather_objects(obj):
    """List of ``obj`` from every rank (``[obj]`` without a process group)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _cpu_sync_batch_norm(
    x: torch.Tensor, weight, bias, running_mean, running_var, eps: float, momentum: float, group
) -> torch.Tensor:
    """Training-mode BatchNorm of (N, C, ...) ``x`` with statistics over all ranks (CPU).

    Two all-reduces (sum and count, then the centred sum of squares) through
    ``torch.distributed.nn`` so that gradients reach every rank's inputs.
    """
    shape = x.shape
    flat = x.movedim(1, -1).reshape(-1, shape[1])  # (N*, C)
    total = dist_fn.all_reduce(torch.cat([flat.sum(0), flat.new_full((1,), flat.shape[0])]), group=group)
    count = total[-1]
    mean = total[:-1] / count
    centred = flat - mean
    var = dist_fn.all_reduce(centred.square().sum(0), group=group) / count
    out = centred * torch.rsqrt(var + eps)
    if weight is not None:
        out = out * weight + bias
    if running_mean is not None:
        with torch.no_grad():
            running_mean.lerp_(mean.to(running_mean.dtype), momentum)
            running_var.lerp_((var * count / (count - 1).clamp_min(1)).to(running_var.dtype), momentum)
    if x.dim() == 2:
        return out
    return out.reshape(shape[0], *shape[2:], shape[1]).movedim(-1, 1)


class SyncBatchNorm(_BatchNorm):
    """BatchNorm with statistics over the batches of all ranks, on CUDA and on CPU.

    CUDA uses the fused kernels of ``nn.SyncBatchNorm``; CPU all-reduces the statistics
    itself (``nn.SyncBatchNorm`` and DDP refuse CPU). In eval mode or without a process
    group of more than one rank it is plain BatchNorm. Same parameters, buffers and
    state-dict keys as ``nn.BatchNorm*d``.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, process_group=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.process_group = process_group

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input (N, C, ...), got {x.dim()}-D")

    def _sync_group(self):
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group or dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = self._sync_group()
        if group is None:
            return super().forward(x)
        self._check_input_dim(x)
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                momentum = 1.0 / float(self.num_batches_tracked)
        running = (self.running_mean, self.running_var) if self.track_running_stats else (None, None)
        if x.device.type == "cpu":
            return _cpu_sync_batch_norm(x, self.weight, self.bias, *running, self.eps, momentum, group)
        return _TorchSyncBatchNorm.apply(
            x, self.weight, self.bias, *running, self.eps, momentum, group, dist.get_world_size(group)
        )


class SparseSyncBatchNorm(SyncBatchNorm):
    """Synchronised twin of :class:`~spark_me.layers.SparseBatchNorm2d` (on ``x.F``)."""

    def forward(self, x: ME.SparseTensor) -> ME.SparseTensor:  # type: ignore[override]
        return with_features(x, super().forward(x.F))


def _convert(bn: _BatchNorm, cls: type[SyncBatchNorm], process_group) -> SyncBatchNorm:
    new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, process_group)
    if bn.affine:
        new.weight, new.bias = bn.weight, bn.bias
    if bn.track_running_stats:
        new.running_mean, new.running_var = bn.running_mean, bn.running_var
        new.num_batches_tracked = bn.num_batches_tracked
    new.train(bn.training)
    return new


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Replace SparseBatchNorm2d and nn.BatchNorm2d layers by synchronised ones, in place.

    Parameters and buffers are shared with the replaced layers, so an optimizer built
    before or after holds the same tensors. Returns ``module``.
    """
    for name, child in module.named_children():
        if isinstance(child, SyncBatchNorm):
            continue
        if isinstance(child, SparseBatchNorm2d):
            setattr(module, name, _convert(child, SparseSyncBatchNorm, process_group))
        elif type(child) in (nn.BatchNorm2d, nn.SyncBatchNorm):
            setattr(module, name, _convert(child, SyncBatchNorm, process_group))
        else:
            convert_sync_batchnorm(child, process_group)
    return module


__all__ = [
    "DistInfo",
    "SparseSyncBatchNorm",
    "SyncBatchNorm",
    "all_gather_objects",
    "all_reduce_mean",
    "broadcast_object",
    "cleanup_distributed",
    "convert_sync_batchnorm",
    "init_distributed",
    "world_size",
]
