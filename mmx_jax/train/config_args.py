"""Config files given as `path[:arguments]` (`--config configs/tsm2.py:dataset=etth2,smoke`) and
`--config.<key>=<value>` overrides: loading, applying and explaining their errors. The
arguments themselves are each config file's (configs/common.py parses them)."""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import pathlib
from collections.abc import Iterable


def explain_override_error(error: Exception, argv: list[str]) -> str:
    """A one-line message for a failed `--config.a.b=value` override, naming the flag."""
    text = str(error).strip().strip("'\"")
    missing, _, hint = text.partition("\\n")
    missing = missing.strip("'\" \\")
    hint = hint.replace("\\'", "'").strip("'\" ")
    for arg in argv:
        name = arg.split("=", 1)[0]
        if name.startswith("--config.") and missing in name.split(".")[1:]:
            key = name[len("--config."):]
            return (f"{arg}: the config has no key {key!r}" + (f" ({hint})" if hint else "")
                    + "; --config=<file> --help lists the keys")
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
