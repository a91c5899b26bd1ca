"""The pretrained zoo: trained weights kept in the package, one model card each.

    from mmx_jax.models import create_model, list_pretrained
    print(list_pretrained())                                   # ["tsm2_etth1_96", ...]
    model = create_model("tsm2_etth1_96", pretrained=True)     # TSM2 (B, 512, 7) -> (B, 96, 7)

Each entry is weights/<name>.npz (the parameters by path, no optimizer state) and
weights/<name>.json, its card: the data set and split, the config and the command that trained
it, the seed, validation and test metrics, hardware and date, the data card (shapes, scaler
statistics, column or class names: `mmx_jax.inference` predicts from it) and the SHA-256 of the
weights, checked on every load. research/make_zoo.py writes them.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

WEIGHTS = pathlib.Path(__file__).with_name("weights")


class PretrainedError(ValueError):
    """An unknown entry, or weights that do not match their card."""


def list_pretrained() -> list[str]:
    """The names of the zoo's entries."""
    return sorted(p.stem for p in WEIGHTS.glob("*.json"))


def pretrained_card(name: str) -> dict[str, Any]:
    """The model card of entry `name`."""
    path = WEIGHTS / f"{name}.json"
    if not path.exists():
        raise PretrainedError(f"no pretrained model {name!r}; the zoo has: "
                              f"{', '.join(list_pretrained()) or 'nothing'}")
    return json.loads(path.read_text())


def pretrained_task(name: str) -> str:
    return pretrained_card(name)["data"]["task"]


def _key(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
                    for k in path)


def param_arrays(model: nnx.Module) -> dict[str, np.ndarray]:
    """The parameters of `model` by path ("mixer/token_blocks/0/norm/scale/value")."""
    leaves = jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]
    return {_key(path): np.asarray(leaf) for path, leaf in leaves}


def sha256(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_pretrained(name: str) -> tuple[nnx.Module, dict[str, Any]]:
    """(model in evaluation mode, card) of entry `name`; the weights' SHA-256 is checked."""
    from mmx_jax.models.registry import create_model  # noqa: PLC0415

    card = pretrained_card(name)
    path = WEIGHTS / f"{name}.npz"
    if not path.exists():
        raise PretrainedError(f"pretrained model {name!r}: its weights {path} are missing")
    digest = sha256(path)
    if digest != card["sha256"]:
        raise PretrainedError(f"pretrained model {name!r}: {path} has SHA-256 {digest}, its "
                              f"card says {card['sha256']}: the file is damaged or replaced")
    spec = card["model"]
    kwargs = dict(spec["kwargs"])
    if "dtype" in kwargs:  # a compute dtype, written by name
        kwargs["dtype"] = jnp.dtype(kwargs["dtype"])
    model = create_model(spec["name"], rngs=nnx.Rngs(0), **kwargs)
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
    with np.load(path) as stored:
        keys = {_key(p) for p, _ in leaves}
        if keys != set(stored.files):
            raise PretrainedError(f"pretrained model {name!r}: its weights hold "
                                  f"{sorted(set(stored.files) ^ keys)[:4]} unlike the model")
        values = []
        for p, leaf in leaves:
            array = stored[_key(p)]
            if array.shape != leaf.shape:
                raise PretrainedError(f"pretrained model {name!r}: {_key(p)} has shape "
                                      f"{array.shape}, the model {leaf.shape}")
            values.append(array.astype(leaf.dtype))
    nnx.update(model, jax.tree_util.tree_unflatten(treedef, values))
    model.eval()
    return model, card


def save_pretrained(name: str, model: nnx.Module, card: dict[str, Any],
                    dtype=np.float32, folder: pathlib.Path = WEIGHTS) -> pathlib.Path:
    """Writes entry `name` (weights as `dtype`, card with their SHA-256); returns the card's
    path. `card["model"]` must hold {"name", "kwargs"} that `create_model` rebuilds it from."""
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / f"{name}.npz"
    np.savez_compressed(weights, **{k: v.astype(dtype) for k, v in param_arrays(model).items()})
    card = {**card, "weights_dtype": np.dtype(dtype).name, "sha256": sha256(weights)}
    path = folder / f"{name}.json"
    path.write_text(json.dumps(card, indent=2) + "\n")
    return path
