"""Per-iteration learning-rate and weight-decay schedules (the official SparK shapes).

Learning rate: linear warm-up from ``warmup_start_ratio × peak`` to ``peak`` over the
warm-up steps, then a half cosine down to ``final_lr_ratio × peak`` at the last step.
Weight decay: a half cosine from its start value to its end value over the whole run.
Both are pure functions of the step, so resuming needs only the step count.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class CosineSchedule:
    peak_lr: float
    total_steps: int
    warmup_steps: int
    weight_decay: float
    weight_decay_end: float
    warmup_start_ratio: float = 0.005
    final_lr_ratio: float = 0.001

    def __post_init__(self) -> None:
        if self.total_steps < 1:
            raise ValueError(f"a schedule needs at least one step, got total_steps={self.total_steps}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")

    def lr(self, step: int) -> float:
        if step < self.warmup_steps:
            r = self.warmup_start_ratio
            return self.peak_lr * (r + (1.0 - r) * step / self.warmup_steps)
        decay_steps = self.total_steps - 1 - self.warmup_steps
        progress = min(max((step - self.warmup_steps) / decay_steps, 0.0), 1.0) if decay_steps > 0 else 1.0
        r = self.final_lr_ratio
        return self.peak_lr * (r + (1.0 - r) * 0.5 * (1.0 + math.cos(math.pi * progress)))

    def weight_decay_at(self, step: int) -> float:
        progress = min(step / (self.total_steps - 1), 1.0) if self.total_steps > 1 else 1.0
        start, end = self.weight_decay, self.weight_decay_end
        return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> tuple[float, float]:
        """Set the lr of every group, and the weight decay of groups with ``apply_decay``."""
        lr, wd = self.lr(step), self.weight_decay_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
            if group.get("apply_decay", group["weight_decay"] != 0.0):
                group["weight_decay"] = wd
        return lr, wd

    def state_dict(self) -> dict:
        return asdict(self)
