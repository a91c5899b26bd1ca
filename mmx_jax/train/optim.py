"""Optimizer and learning-rate schedules: AdamW with warm-up + cosine, or TSLib's step decay."""

from __future__ import annotations

import optax


def learning_rate_schedule(*, lr: float, schedule: str, total_steps: int, steps_per_epoch: int,
                           warmup_steps: int = 0, min_lr_ratio: float = 0.0) -> optax.Schedule:
    """The learning rate at each step.

    schedule: "cosine" (linear warm-up then cosine decay to min_lr_ratio * lr), "tslib"
    (Time-Series-Library's type1: lr * 0.5 ** epoch, constant within an epoch) or "constant".
    """
    match schedule:
        case "cosine":
            warmup = min(warmup_steps, max(total_steps - 1, 0))
            return optax.warmup_cosine_decay_schedule(
                0.0 if warmup else lr, lr, warmup, max(total_steps, warmup + 1),
                end_value=lr * min_lr_ratio)
        case "tslib":
            return lambda step: lr * 0.5 ** (step // steps_per_epoch)
        case "constant":
            return optax.constant_schedule(lr)
    raise ValueError(f"optimizer.schedule={schedule!r} is not 'cosine', 'tslib' or 'constant'")


def make_optimizer(config, *, total_steps: int,
                   steps_per_epoch: int) -> optax.GradientTransformation:
    """AdamW with gradient clipping from `config.optimizer` (see configs/)."""
    schedule = learning_rate_schedule(
        lr=config.lr, schedule=config.schedule, total_steps=total_steps,
        steps_per_epoch=steps_per_epoch, warmup_steps=config.warmup_steps,
        min_lr_ratio=config.min_lr_ratio)
    parts = [optax.clip_by_global_norm(config.grad_clip)] if config.grad_clip > 0 else []
    parts.append(optax.adamw(schedule, b1=config.b1, b2=config.b2,
                             weight_decay=config.weight_decay))
    return optax.chain(*parts)
