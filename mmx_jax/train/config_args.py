"""big_vision-style config arguments: `--config configs/tsm2.py:dataset=etth2,horizon=336,smoke`."""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import pathlib
from collections.abc import Iterable
from typing import Any


def parse_config_arg(arg: str | None, defaults: dict[str, Any], *, source: str) -> dict[str, Any]:
    """Parses "key=value,flag,..." into a dict typed like `defaults`.

    A bare `flag` means `flag=True`. Values are converted to the type of the default
    (bool accepts true/false/1/0/yes/no). Unknown keys and unparsable values raise a ValueError
    that names the config file (`source`), the key and the known keys.
    """
    out = dict(defaults)
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
            out[key] = True
            continue
        out[key] = _convert(value.strip(), default, source=source, key=key)
    return out


def _convert(value: str, default: Any, *, source: str, key: str) -> Any:
    if isinstance(default, bool):
        lowered = value.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{source}: config argument {key}={value!r} is not a boolean")
    if default is None or isinstance(default, str):
        return value
    try:
        return type(default)(value)
    except ValueError:
        raise ValueError(f"{source}: config argument {key}={value!r} is not a "
                         f"{type(default).__name__}") from None


def explain_override_error(error: Exception, argv: list[str]) -> str:
    """A one-line message for a failed `--config.a.b=value` override, naming the flag."""
    text = str(error).strip().strip("'\"")
    missing, _, hint = text.partition("\\n")
    missing = missing.strip("'\" \\")
    hint = hint.replace("\\'", "'").strip("'\" ")
    for arg in argv:
        name = arg.split("=", 1)[0]
        if name.startswith("--config.") and name.split(".")[-1] == missing:
            key = name[len("--config."):]
            return (f"{arg}: the config has no key {key!r}" + (f" ({hint})" if hint else "")
                    + "; run with --config=<file> --helpfull or read the config file for the "
                    "keys it defines")
    return f"bad --config override: {text}"


def load_config_file(spec: str):
    """The ConfigDict of "path/to/config.py[:arg]" (its `get_config(arg)`), as train.py's
    --config reads it."""
    path, _, arg = spec.partition(":")
    if not pathlib.Path(path).is_file():
        raise FileNotFoundError(f"config file {path!r} not found (from {spec!r})")
    module_spec = importlib.util.spec_from_file_location(pathlib.Path(path).stem, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def apply_overrides(config, items: Iterable[str]):
    """Applies "dotted.key=value" overrides in place (values parsed as Python literals, else
    kept as strings) and returns the config."""
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not key=value")
        with contextlib.suppress(ValueError, SyntaxError):  # else a plain string
            value = ast.literal_eval(value)
        config.update_from_flattened_dict({key: value})
    return config
