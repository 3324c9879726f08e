"""Activation checkpointing of sparse blocks: recompute each block in the backward.

A block run under :func:`run_blocks` with checkpointing on keeps only its input for the
backward, and runs its forward a second time there to get the rest: memory for time, as
timm's ``set_grad_checkpointing`` trades it for dense models. The recomputation is exact:
it sees the same random state (stochastic depth draws the same samples), the same
coordinate maps and neighbour tables (cached on the batch's coordinate manager), and it
leaves the block's buffers as the first forward left them, so batch-norm running
statistics are updated once per step, not twice.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import MinkowskiEngine as ME
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint


@contextlib.contextmanager
def buffers_unchanged(module: nn.Module) -> Iterator[None]:
    """Restore every buffer of ``module`` (running statistics, counters) on exit."""
    saved = [(b, b.clone()) for b in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


def checkpoint_block(block: nn.Module, x: ME.SparseTensor) -> ME.SparseTensor:
    """``block(x)``, keeping only ``x`` for the backward and recomputing the rest there."""
    return checkpoint(
        block, x, use_reentrant=False, context_fn=lambda: (contextlib.nullcontext(), buffers_unchanged(block))
    )


def run_blocks(blocks: Iterable[nn.Module], x: ME.SparseTensor, grad_checkpointing: bool) -> ME.SparseTensor:
    """Run ``blocks`` in order; each under :func:`checkpoint_block` when ``grad_checkpointing``
    is on and gradients are being recorded (evaluation runs them plainly)."""
    recompute = grad_checkpointing and torch.is_grad_enabled()
    for block in blocks:
        x = checkpoint_block(block, x) if recompute else block(x)
    return x
