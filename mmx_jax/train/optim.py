"""Optimizer and learning-rate schedules: AdamW with warm-up + cosine, or TSLib's step decay.

`optimizer.schedule_clock` says what moves the schedule along:
  "steps"  (default) the optimizer's own update count;
  "time"   a position passed to every update (`schedule_step=`), which the training loop runs
           ahead of the step count when `train.time_limit_s` would otherwise cut the schedule
           short (`schedule_position`): a time-boxed run always ends its decay at the limit,
           whatever the speed of the machine.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax

from mmx_jax.train.sharding import path_str

SCHEDULE_CLOCKS = ("steps", "time")


def learning_rate_schedule(*, lr: float, schedule: str, total_steps: int, steps_per_epoch: int,
                           warmup_steps: int = 0, min_lr_ratio: float = 0.0) -> optax.Schedule:
    """The learning rate at each step.

    schedule: "cosine" (linear warm-up then cosine decay to min_lr_ratio * lr), "tslib"
    (Time-Series-Library's type1: its `adjust_learning_rate` runs after each epoch and sets
    lr * 0.5 ** (epochs done - 1) for the next, so the first two epochs train at lr, then
    it halves every epoch; constant within an epoch) or "constant".
    """
    match schedule:
        case "cosine":
            warmup = min(warmup_steps, max(total_steps - 1, 0))
            return optax.warmup_cosine_decay_schedule(
                0.0 if warmup else lr, lr, warmup, max(total_steps, warmup + 1),
                end_value=lr * min_lr_ratio)
        case "tslib":  # epochs 0, 1, 2, 3, ... train at lr x 1, 1, 0.5, 0.25, ...
            return lambda step: lr * 0.5 ** jnp.maximum(step // steps_per_epoch - 1, 0)
        case "constant":
            return optax.constant_schedule(lr)
    raise ValueError(f"optimizer.schedule={schedule!r} is not 'cosine', 'tslib' or 'constant'")


def scale_by_schedule_at(schedule: optax.Schedule) -> optax.GradientTransformationExtraArgs:
    """Multiplies the updates by -schedule(schedule_step), with `schedule_step` (a float) given
    to every update call rather than counted in the optimizer state."""

    def update_fn(updates, state, params=None, *, schedule_step, **extra_args):
        del params, extra_args
        lr = schedule(jnp.asarray(schedule_step, jnp.float32))
        return jax.tree.map(lambda u: (-lr * u).astype(u.dtype), updates), state

    return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update_fn)


def scale_by_path(rules: Sequence[tuple[str, float]]) -> optax.GradientTransformation:
    """Multiplies the update of each parameter by the factor of the first rule whose regex
    matches its path, written as for the sharding rules (`path_str`, relative to the updated
    tree, e.g. "mixer/token_blocks/0/norm/scale/value"); the others are left alone. A
    learning-rate multiplier per parameter group. A rule that matches no parameter is an
    error (at init), not a silent no-op."""
    compiled = []
    for rule in rules:
        if len(rule) != 2:
            raise ValueError(f"optimizer.lr_scale_rules entry {rule!r} is not (regex, factor)")
        compiled.append((re.compile(rule[0]), float(rule[1])))

    def factor(path) -> float:
        name = path_str(path)
        return next((f for pattern, f in compiled if pattern.search(name)), 1.0)

    def init_fn(params):
        names = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
        for (pattern, _), rule in zip(compiled, rules, strict=True):
            if not any(pattern.search(n) for n in names):  # a typo would silently do nothing
                raise ValueError(f"optimizer.lr_scale_rules entry {tuple(rule)!r} matches no "
                                 f"parameter; paths look like {names[0]!r}")
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params
        return jax.tree_util.tree_map_with_path(
            lambda path, u: u if (f := factor(path)) == 1.0 else (f * u).astype(u.dtype),
            updates), state

    return optax.GradientTransformation(init_fn, update_fn)


# Parameters that do not decay by default: the SSM's A_log, D and dt bias (Mamba marks A_log
# and D as no-decay), every bias, norm and layer scales, positional embeddings and the
# weighted-averaging weights (VMamba, Swin and DeiT exclude biases and 1-D parameters).
NO_DECAY = r"(^|/)(A_log|D|dt_bias|bias|conv_bias|scale|pos_embed|averaging)(/value)?$"
DEFAULT_DECAY_RULES = ((NO_DECAY, False),)


def decay_mask(rules: Sequence[tuple[str, bool]]):
    """``mask(params) -> pytree of bools``: whether weight decay applies to each parameter.

    The first rule (regex on the parameter path, as for `scale_by_path`; decays or not)
    that matches a path decides; a parameter no rule matches decays. A rule that matches no
    parameter is an error (but for the default `NO_DECAY`, which follows the reference
    implementations).
    """
    compiled = []
    for rule in rules:
        if len(rule) != 2 or not isinstance(rule[1], bool | int):
            raise ValueError(f"optimizer.decay_rules entry {rule!r} is not (regex, True/False)")
        compiled.append((re.compile(rule[0]), bool(rule[1])))

    def mask(params):
        names = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
        for (pattern, _), rule in zip(compiled, rules, strict=True):
            if rule[0] != NO_DECAY and not any(pattern.search(n) for n in names):
                raise ValueError(f"optimizer.decay_rules entry {tuple(rule)!r} matches no "
                                 f"parameter; paths look like {names[0]!r}")
        return jax.tree_util.tree_map_with_path(
            lambda path, _: next((d for pattern, d in compiled
                                  if pattern.search(path_str(path))), True), params)

    return mask


def time_clocked(config) -> bool:
    """Whether `config.optimizer` runs its schedule on the clock (module docstring)."""
    clock = config.get("schedule_clock", "steps")
    if clock not in SCHEDULE_CLOCKS:
        raise ValueError(f"optimizer.schedule_clock={clock!r} is not one of {SCHEDULE_CLOCKS}")
    return clock == "time"


def schedule_position(step: int, total_steps: int, elapsed_s: float, budget_s: float) -> float:
    """Where a time-clocked schedule stands: the larger of the steps done and of the share of
    the time budget spent, in steps (at most `total_steps`). `budget_s` <= 0: steps only."""
    if budget_s <= 0:
        return float(step)
    return float(min(max(step, total_steps * elapsed_s / budget_s), total_steps))


def make_optimizer(config, *, total_steps: int,
                   steps_per_epoch: int) -> optax.GradientTransformation:
    """AdamW with gradient clipping from `config.optimizer` (see configs/common.py): a linear
    warm-up of `warmup_steps + warmup_epochs x steps_per_epoch` steps, weight decay on
    the parameters `config.decay_rules` selects (`decay_mask`; default `DEFAULT_DECAY_RULES`).
    With `schedule_clock="time"` every update needs `schedule_step=` (module docstring)."""
    warmup = config.warmup_steps + round(config.get("warmup_epochs", 0.0) * steps_per_epoch)
    schedule = learning_rate_schedule(
        lr=config.lr, schedule=config.schedule, total_steps=total_steps,
        steps_per_epoch=steps_per_epoch, warmup_steps=warmup, min_lr_ratio=config.min_lr_ratio)
    parts = [optax.clip_by_global_norm(config.grad_clip)] if config.grad_clip > 0 else []
    mask = decay_mask(config.get("decay_rules", DEFAULT_DECAY_RULES))
    if not time_clocked(config):
        parts.append(optax.adamw(schedule, b1=config.b1, b2=config.b2,
                                 weight_decay=config.weight_decay, mask=mask))
    else:  # optax.adamw's chain with the learning rate taken at the given position
        parts += [optax.scale_by_adam(b1=config.b1, b2=config.b2),
                  optax.add_decayed_weights(config.weight_decay, mask=mask),
                  scale_by_schedule_at(schedule)]
    if rules := config.get("lr_scale_rules", ()):
        parts.append(scale_by_path(rules))
    return optax.chain(*parts)
