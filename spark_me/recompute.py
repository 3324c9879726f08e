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
import contextvars
from typing import Callable, Iterable, Iterator, Union

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


Observer = Callable[[nn.Module, Union[ME.SparseTensor, torch.Tensor]], None]
# The observers of checkpoint_block in the current context (observe_checkpoints).
_OBSERVERS: contextvars.ContextVar[tuple[Observer, ...]] = contextvars.ContextVar("spark_me_checkpoint_observers",
                                                                                 default=())


@contextlib.contextmanager
def observe_checkpoints(observer: Observer) -> Iterator[None]:
    """Call ``observer(block, x)`` for every block :func:`checkpoint_block` runs in this
    context, before it runs: the input it keeps for the backward, for tools that account
    for a step's memory (``kernels_bench.saved_memory``)."""
    token = _OBSERVERS.set(_OBSERVERS.get() + (observer,))
    try:
        yield
    finally:
        _OBSERVERS.reset(token)


def checkpoint_block(block: nn.Module, x: ME.SparseTensor) -> ME.SparseTensor:
    """``block(x)``, keeping only ``x`` for the backward and recomputing the rest there."""
    for observer in _OBSERVERS.get():
        observer(block, x)
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
