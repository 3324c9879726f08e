"""The pre-training optimizer: LAMB (or AdamW) with SparK's weight-decay exemptions.

Biases, every 1-D parameter (norm weights, ConvNeXt layer scales) and the mask embeddings
get no weight decay, as in the official recipe. The decayed group is marked
``apply_decay=True`` so the weight-decay schedule touches only it.
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn
from timm.optim import Lamb

from spark_me.spark import SparK

log = logging.getLogger(__name__)

OPTIMIZERS = ("lamb", "adamw")


def peak_lr(base_lr: float, global_batch_size: int) -> float:
    """The linear scaling rule of the paper: ``base_lr × global batch / 256``."""
    return base_lr * global_batch_size / 256


def param_groups(model: SparK, weight_decay: float) -> list[dict]:
    """Two groups: decayed weights, and biases / 1-D params / mask embeddings (no decay)."""
    mask_tokens = {id(p) for p in model.densify.mask_tokens.parameters()}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith(".bias") or id(p) in mask_tokens:
            no_decay.append(p)
        else:
            decay.append(p)
    log.info("optimizer: %d tensors with weight decay, %d without", len(decay), len(no_decay))
    return [
        {"params": decay, "weight_decay": weight_decay, "apply_decay": True},
        {"params": no_decay, "weight_decay": 0.0, "apply_decay": False},
    ]


def build_optimizer(cfg, model: SparK, lr: float) -> torch.optim.Optimizer:
    """The optimizer of an ``optimizer`` config (name lamb | adamw) at learning rate ``lr``.

    Gradient clipping is done by the training loop (after unscaling), so timm's LAMB runs
    without its own clipping.
    """
    groups = param_groups(model, float(cfg.weight_decay))
    betas = (float(cfg.betas[0]), float(cfg.betas[1]))
    if cfg.name == "lamb":
        return Lamb(groups, lr=lr, betas=betas, eps=float(cfg.eps), max_grad_norm=None)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=float(cfg.eps))
    raise ValueError(f"optimizer.name={cfg.name!r} is unknown: use optimizer=lamb or optimizer=adamw")


def clip_gradients(model: nn.Module, max_norm: float | None) -> torch.Tensor:
    """Clip the global gradient norm to ``max_norm`` (None: only measure); returns the norm."""
    params = [p for p in model.parameters() if p.grad is not None]
    if max_norm is None:
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
    return torch.nn.utils.clip_grad_norm_(params, max_norm)
