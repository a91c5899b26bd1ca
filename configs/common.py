"""What every config file shares: its arguments, the skeleton of a config and the keys the
training loop reads (the model and data keys are each family's own).

A config file is `get_config(arg)`; `arg` is the text after the colon of
`--config configs/<file>.py:<arg>`, comma-separated `key=value` or bare `flag` (= True).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

from mmx_jax.train.optim import DEFAULT_DECAY_RULES


@dataclasses.dataclass(frozen=True)
class Args:
    """A config file's parsed arguments: `values` (every argument, defaults filled in) and
    `given`, the names the command line set."""

    values: dict[str, Any]
    given: frozenset[str]

    def __getitem__(self, key: str) -> Any:
        return self.values[key]


def parse_arg(arg: str | None, source: str, **defaults) -> Args:
    """Parses "key=value,flag,..." into values typed like `defaults`.

    A bare `flag` means `flag=True`. Values are converted to the type of the default (bool
    accepts true/false/1/0/yes/no/on/off). Unknown keys and unparsable values raise a
    ValueError naming the config file (`source`), the key and the known keys.
    """
    values, given = dict(defaults), set()
    for item in filter(None, (part.strip() for part in (arg or "").split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if key not in defaults:
            raise ValueError(f"{source}: unknown config argument {key!r}; known arguments: "
                             f"{', '.join(sorted(defaults))}")
        default = defaults[key]
        if not sep:
            if not isinstance(default, bool):
                raise ValueError(f"{source}: config argument {key!r} needs a value "
                                 f"({key}=...)")
            values[key] = True
        else:
            values[key] = _convert(value.strip(), default, source=source, key=key)
        given.add(key)
    return Args(values, frozenset(given))


def _convert(value: str, default: Any, *, source: str, key: str) -> Any:
    if isinstance(default, bool):
        lowered = value.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{source}: config argument {key}={value!r} is not a boolean "
                         "(true/false)")
    if default is None or isinstance(default, str):
        return value
    try:
        return type(default)(value)
    except ValueError:
        kind = {"int": "whole number", "float": "number"}.get(type(default).__name__,
                                                              type(default).__name__)
        raise ValueError(f"{source}: config argument {key}={value!r} is not a {kind}") from None


def base_config(*, task: str, seed: int) -> ml_collections.ConfigDict:
    """The keys every run has, at their defaults; the family sets data and model."""
    config = ml_collections.ConfigDict()
    config.task = task
    config.seed = seed
    config.optimizer = dict(
        lr=1e-3,
        weight_decay=1e-4,
        b1=0.9,
        b2=0.999,
        schedule="cosine",  # cosine | tslib (TSLib's type1 halving) | constant
        schedule_clock="steps",  # or "time": ends the schedule at train.time_limit_s
        warmup_steps=0,  # linear warm-up: warmup_steps + warmup_epochs x steps per epoch
        warmup_epochs=0.0,  # (the steps per epoch come from the data set's real size)
        min_lr_ratio=0.01,
        grad_clip=1.0,  # global-norm clipping; 0 disables it
        ema_decay=0.0,  # 0 disables the EMA of the weights (warmed up: optim docs)
        lr_scale_rules=(),  # (regex on the parameter path, lr factor), first match wins
        # (regex on the parameter path, decays?), first match wins; unmatched ones decay.
        # The default spares the SSM's A_log, D and dt bias, biases, norm and layer scales,
        # positional embeddings and the averaging weights.
        decay_rules=DEFAULT_DECAY_RULES,
    )
    config.train = dict(
        num_epochs=1,
        steps_per_epoch=0,  # 0: one pass over the training split
        log_every_steps=25,
        eval_every_steps=0,  # 0: validate at the end of every epoch
        checkpoint_every_steps=1000,
        keep_checkpoints=2,  # the newest checkpoints kept, besides the best one
        patience=0,  # validations without improvement before stopping; 0 disables
        time_limit_s=0.0,  # stop (validate, save) after this many seconds; 0: no limit
    )
    config.mesh = dict(data=-1, fsdp=1)  # device mesh axes; -1: all remaining devices
    config.sharding = dict(
        fsdp_min_size=2**16,  # parameters smaller than this stay replicated under FSDP
        rules=[],  # (regex on the parameter path, PartitionSpec entries), first match wins
    )
    return config


def shrink(config: ml_collections.ConfigDict, args: Args, values: dict[str, Any],
           by_argument: dict[str, str]) -> None:
    """Applies a `smoke`-style set of flattened `values`, except the keys that an argument
    the command line gave controls (`by_argument`: config key -> argument name)."""
    config.update_from_flattened_dict({
        key: value for key, value in values.items()
        if by_argument.get(key) not in args.given})
