"""Every config is checked here, once, before anything runs: types, ranges, choices and the
keys that must agree with each other. A bad value raises `ConfigError` with one line naming
the key, the value and what is allowed. Checks that need the data (a batch against the
number of windows) are made where the data is loaded, with the numbers."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

from mmx_jax.errors import ConfigError

Check = Callable[[Any], str | None]  # value -> what is allowed, or None when it is


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def integer(low: int | None = None, high: int | None = None) -> Check:
    def check(value):
        if _is_int(value) and (low is None or value >= low) and (high is None or value <= high):
            return None
        bounds = [f">= {low}" if low is not None else "", f"<= {high}" if high is not None else ""]
        return "a whole number " + " and ".join(b for b in bounds if b)
    return check


def number(low: float | None = None, high: float | None = None, *, low_open: bool = False,
           high_open: bool = False, meaning: str = "") -> Check:
    def check(value):
        ok = _is_number(value) and math.isfinite(value)
        if ok and low is not None:
            ok = value > low if low_open else value >= low
        if ok and high is not None:
            ok = value < high if high_open else value <= high
        if ok:
            return None
        bounds = [f"{'>' if low_open else '>='} {low}" if low is not None else "",
                  f"{'<' if high_open else '<='} {high}" if high is not None else ""]
        text = "a finite number " + " and ".join(b for b in bounds if b)
        return text + (f" ({meaning})" if meaning else "")
    return check


def choice(*options) -> Check:
    def check(value):
        return None if value in options else "one of " + ", ".join(map(repr, options))
    return check


def boolean(value) -> str | None:
    return None if isinstance(value, bool) else "true or false"


def optional(inner: Check) -> Check:
    def check(value):
        return None if value is None else inner(value)
    return check


def mesh_axis(value) -> str | None:
    return None if _is_int(value) and (value == -1 or value >= 1) else \
        "-1 (all remaining devices) or a whole number >= 1"


def positive_ints(count: int | None = None) -> Check:
    def check(value):
        if isinstance(value, Sequence) and not isinstance(value, str) and value and all(
                _is_int(v) and v >= 1 for v in value) and (count is None or len(value) == count):
            return None
        return (f"{count} " if count else "") + "whole numbers >= 1, e.g. (64, 128, 256, 512)"
    return check


COMMON: dict[str, Check] = {
    "seed": integer(0),
    "task": choice("forecasting", "classification"),
    "data.batch_size": integer(1),
    "data.eval_batch_size": integer(1),
    "optimizer.lr": number(0, low_open=True, meaning="a learning rate; a negative one would "
                           "train by gradient ascent"),
    "optimizer.weight_decay": number(0),
    "optimizer.b1": number(0, 1, high_open=True),
    "optimizer.b2": number(0, 1, high_open=True),
    "optimizer.schedule": choice("cosine", "tslib", "constant"),
    "optimizer.schedule_clock": choice("steps", "time"),
    "optimizer.warmup_steps": integer(0),
    "optimizer.warmup_epochs": number(0),
    "optimizer.min_lr_ratio": number(0, 1),
    "optimizer.grad_clip": number(0, meaning="0 disables clipping"),
    "optimizer.ema_decay": number(0, 1, high_open=True, meaning="0 disables the EMA"),
    "train.num_epochs": integer(1),
    "train.steps_per_epoch": integer(0),
    "train.log_every_steps": integer(1),
    "train.eval_every_steps": integer(0),
    "train.checkpoint_every_steps": integer(1),
    "train.keep_checkpoints": integer(1),
    "train.patience": integer(0),
    "train.time_limit_s": number(0),
    "mesh.data": mesh_axis,
    "mesh.fsdp": mesh_axis,
    "sharding.fsdp_min_size": integer(0),
}
FORECASTING: dict[str, Check] = {
    "data.seq_len": integer(1),
    "data.pred_len": integer(1),
    "data.features": choice("M", "S", "MS"),
    "data.max_eval_windows": integer(0),
    "eval.plot_variates": integer(0),
    "eval.plot_windows": integer(0),
}
CLASSIFICATION: dict[str, Check] = {
    "data.pipeline": choice("memory", "grain"),
    "data.channels": integer(0, 4),
    "data.image_size": integer(8),
    "data.val_holdout": integer(0),
    "data.max_eval_images": integer(0),
    "data.workers": integer(0),
    "data.crop_padding": integer(-1),
    "data.flip": boolean,
    "data.randaugment_ops": integer(0),
    "data.randaugment_magnitude": number(0, 30),
    "data.erasing_prob": number(0, 1),
    "data.cutout_size": integer(0),
    "data.mixup_alpha": number(0),
    "data.cutmix_alpha": number(0),
    "data.mix_prob": number(0, 1),
    "data.label_smoothing": number(0, 1, high_open=True),
}
MODEL: dict[str, Check] = {  # keys the families share; each applies where the config has it
    "model.dtype": choice("float32", "bfloat16"),
    "model.scan_impl": choice("auto", "sequential", "sequential_vjp", "associative", "pallas"),
    "model.scan_layout": choice("walks", "permuted"),
    "model.d_model": integer(1),
    "model.num_layers": integer(0),
    "model.expand": integer(1),
    "model.state_dim": integer(1),
    "model.channel_state_dim": integer(1),
    "model.patch_len": integer(1),
    "model.stride": integer(1),
    "model.time_directions": choice(1, 2),
    "model.conv_width": integer(1),
    "model.dropout": number(0, 1, high_open=True),
    "model.head_dropout": number(0, 1, high_open=True),
    "model.drop_path_rate": number(0, 1, high_open=True),
    "model.layer_scale": optional(number()),
    "model.norm": choice("layernorm", "rmsnorm"),
    "model.widths": positive_ints(),
    "model.token_depths": positive_ints(),
    "model.channel_depths": positive_ints(),
    "model.stem_stride": integer(1),
}


def _get(config, key: str):
    node = config
    for part in key.split("."):
        if part not in node:
            return _MISSING
        node = node[part]
    return node


_MISSING = object()


def _fail(key: str, value, allowed: str) -> ConfigError:
    return ConfigError(f"config key {key}={value!r} is not allowed: wanted {allowed}")


def check_config(config) -> None:
    """Raises `ConfigError` for the first bad value of `config` (see the module docstring)."""
    task = _get(config, "task")
    rules = {**COMMON, **MODEL, **{"forecasting": FORECASTING,
                                   "classification": CLASSIFICATION}.get(task, {})}
    for key, check in rules.items():
        value = _get(config, key)
        if value is _MISSING:
            if key in COMMON or key in FORECASTING and task == "forecasting":
                raise ConfigError(f"config key {key} is missing (configs/common.py has every "
                                  "key a config needs)")
            continue
        allowed = check(value)
        if allowed:
            raise _fail(key, value, allowed)
    _check_together(config, task)


def _check_together(config, task: str) -> None:
    """Keys that must agree with each other."""
    model, data = config.model, config.data
    if task == "forecasting" and "patch_len" in model and model.patch_len > data.seq_len:
        raise ConfigError(f"config key model.patch_len={model.patch_len} is longer than "
                          f"data.seq_len={data.seq_len}: wanted a patch no longer than the input")
    if task == "classification":
        channels = data.channels
        for key in ("mean", "std"):
            if not channels:  # as the source stores them: checked once the data is read
                break
            value = data.get(key)
            if value is None:  # measured on the training split
                continue
            if (not isinstance(value, Sequence) or len(value) != channels
                    or not all(_is_number(v) for v in value)):
                shown = tuple(value) if isinstance(value, Sequence) else value
                raise ConfigError(f"config key data.{key}={shown!r} does not fit data.channels="
                                  f"{channels}: wanted {channels} numbers in 0..1 units, or None "
                                  "to measure them on the training split")
            if key == "std" and min(value) <= 0:
                raise ConfigError(f"config key data.std={tuple(value)!r} is not allowed: "
                                  "wanted numbers > 0")
        widths, stride = model.get("widths"), model.get("stem_stride")
        if widths and stride:
            factor = stride * 2 ** (len(widths) - 1)
            if data.image_size % factor:
                raise ConfigError(
                    f"config key data.image_size={data.image_size} is not divisible by "
                    f"{factor} (model.stem_stride={stride} x 2 per each of the "
                    f"{len(widths) - 1} downsamplings): wanted a multiple of {factor}")
        depths = (model.get("token_depths"), model.get("channel_depths"))
        if widths and all(depths) and not len(widths) == len(depths[0]) == len(depths[1]):
            raise ConfigError(f"config keys model.widths={tuple(widths)}, model.token_depths="
                              f"{tuple(depths[0])} and model.channel_depths={tuple(depths[1])}"
                              " must have one entry per stage")
