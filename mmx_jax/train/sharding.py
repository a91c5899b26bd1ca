"""Device mesh, sharding rules and multi-host input placement (pjit style).

The mesh has two axes, `data` and `fsdp`. The batch is split over both (FSDP is data parallel
with sharded parameters). Parameters and optimizer state are placed by regex rules on their
path ("model/mixer/token_blocks/0/mixer/in_proj/kernel", "opt/opt_state/0/mu/..."), first
match wins; unmatched leaves are replicated, or, with an `fsdp` axis of size > 1, sharded along
their largest dimension divisible by it (when they have at least `fsdp_min_size` elements).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mmx_jax.errors import ConfigError

log = logging.getLogger(__name__)

BATCH_AXES = ("data", "fsdp")


def build_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp) mesh. One size may be -1 (the rest of the devices)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp]
    if sizes.count(-1) > 1:
        raise ConfigError(f"config keys mesh.data={data}, mesh.fsdp={fsdp}: only one may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if known < 1 or len(devices) % known:
        raise ConfigError(f"config keys mesh.data={data} x mesh.fsdp={fsdp} do not divide the "
                          f"{len(devices)} available devices: wanted sizes whose product "
                          f"divides {len(devices)} (-1: the rest)")
    sizes = [len(devices) // known if s == -1 else s for s in sizes]
    count = math.prod(sizes)
    if count > len(devices):
        raise ConfigError(f"config keys mesh.data={sizes[0]} x mesh.fsdp={sizes[1]} need "
                          f"{count} devices, only {len(devices)} available")
    return Mesh(np.asarray(devices[:count]).reshape(sizes), BATCH_AXES)


def path_str(path) -> str:
    """A pytree key path as "a/b/0/c"."""
    parts = []
    for key in path:
        for attr in ("key", "idx", "name"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def _fsdp_spec(shape, fsdp_size: int) -> PartitionSpec:
    dims = sorted(range(len(shape)), key=lambda d: -shape[d])
    for dim in dims:
        if shape[dim] % fsdp_size == 0:
            spec = [None] * len(shape)
            spec[dim] = "fsdp"
            return PartitionSpec(*spec)
    return PartitionSpec()


def state_specs(state, mesh: Mesh, rules: Sequence[tuple[str, Sequence]] = (),
                fsdp_min_size: int = 2**16):
    """A PartitionSpec for every leaf of `state`, by rules, then FSDP, else replicated."""
    compiled = [(re.compile(pattern), PartitionSpec(*spec)) for pattern, spec in rules]
    fsdp_size = mesh.shape["fsdp"]

    def spec(path, leaf):
        name = path_str(path)
        for pattern, rule_spec in compiled:
            if pattern.search(name):
                return rule_spec
        shape = getattr(leaf, "shape", ())
        if fsdp_size > 1 and math.prod(shape) >= fsdp_min_size:
            return _fsdp_spec(shape, fsdp_size)
        return PartitionSpec()

    return jax.tree_util.tree_map_with_path(spec, state)


def state_shardings(state, mesh: Mesh, rules=(), fsdp_min_size: int = 2**16):
    """NamedShardings for `state` (see `state_specs`)."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s),
                        state_specs(state, mesh, rules, fsdp_min_size),
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over every mesh axis."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def process_batch_slice(global_batch_size: int) -> slice:
    """The rows of a global batch that this process loads (processes hold equal slices)."""
    count, index = jax.process_count(), jax.process_index()
    if global_batch_size % count:
        raise ValueError(f"global batch size {global_batch_size} is not divisible by the "
                         f"{count} processes")
    per = global_batch_size // count
    return slice(index * per, (index + 1) * per)


def global_batch(local: dict[str, np.ndarray], sharding: NamedSharding, global_size: int):
    """Assembles the per-process slices of a batch into global arrays sharded on the mesh."""
    return {k: jax.make_array_from_process_local_data(sharding, v, (global_size, *v.shape[1:]))
            for k, v in local.items()}
