"""Scan orders: pure permutations of the tokens of an (H, W) map, and their inverses.

A scan order is an integer array `perm` of length H*W: the scanned sequence is
`x_flat[perm]` where `x_flat` is the row-major flattening of the map. Permutations are
gathers, so every shape stays static under `jax.jit`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

BASE_ORDERS = ("row", "col", "snake_row", "snake_col")
#: Every order the Switch of Scans bank draws from: each base order, forward and reversed.
ALL_ORDERS = BASE_ORDERS + tuple(f"{name}_rev" for name in BASE_ORDERS)
#: The four scans of VMamba-style cross-scan (ViM2's token mixer).
CROSS_SCAN = ("row", "col", "row_rev", "col_rev")


@functools.lru_cache(maxsize=256)
def _scan_order(name: str, height: int, width: int) -> np.ndarray:
    base, reverse = (name[:-4], True) if name.endswith("_rev") else (name, False)
    grid = np.arange(height * width).reshape(height, width)
    if base == "row":
        order = grid.reshape(-1)
    elif base == "col":
        order = grid.T.reshape(-1)
    elif base == "snake_row":  # boustrophedon: odd rows right to left
        order = np.where(np.arange(height)[:, None] % 2, grid[:, ::-1], grid).reshape(-1)
    elif base == "snake_col":
        cols = grid.T
        order = np.where(np.arange(width)[:, None] % 2, cols[:, ::-1], cols).reshape(-1)
    else:
        raise ValueError(f"scan order {name!r} is not one of {ALL_ORDERS}")
    order = order[::-1] if reverse else order
    order.setflags(write=False)
    return order


def scan_order(name: str, height: int, width: int) -> np.ndarray:
    """The permutation (H*W,) of row-major token indices visited by the scan `name`."""
    if height < 1 or width < 1:
        raise ValueError(f"scan_order: map size must be positive, got ({height}, {width})")
    return _scan_order(name, height, width)


def inverse_permutation(perm: np.ndarray) -> np.ndarray:
    """The permutation(s) undoing `perm` (..., L): `x[perm][inverse_permutation(perm)] == x`."""
    return np.argsort(perm, axis=-1)


def reversed_walk(name: str) -> str:
    """The scan order that visits the map in the reverse order of `name`."""
    return name[:-4] if name.endswith("_rev") else f"{name}_rev"


def scan_orders(names, height: int, width: int) -> np.ndarray:
    """Stacked permutations (K, H*W) for several scan orders."""
    return np.stack([scan_order(name, height, width) for name in names])


def _gather_tokens(x: jax.Array, index: jax.Array) -> jax.Array:
    """x: (B, K, L, E), index: (B or 1, K, L) -> x[b, k, index[b, k]]."""
    return jnp.take_along_axis(x, index[..., None], axis=2)


def apply_scans(x: jax.Array, perms) -> jax.Array:
    """Scans a flattened map in K orders at once.

    Args:
      x: (B, L, E) tokens in row-major order.
      perms: (K, L) permutations shared by the batch, or (B, K, L) per-sample permutations.

    Returns:
      (B, L, K, E) with `out[b, :, k] = x[b, perms[(b,) k]]`.
    """
    perms = jnp.asarray(perms)
    index = perms[None] if perms.ndim == 2 else perms
    return jnp.moveaxis(_gather_tokens(x[:, None], index), 1, 2)


def undo_scans(y: jax.Array, perms) -> jax.Array:
    """Inverse of `apply_scans`: (B, L, K, E) in scan orders -> (B, L, K, E) in row-major order."""
    if isinstance(perms, np.ndarray):  # static orders: invert at trace time
        inv = jnp.asarray(inverse_permutation(perms))
    else:
        inv = jnp.argsort(perms, axis=-1)
    index = inv[None] if inv.ndim == 2 else inv
    return jnp.moveaxis(_gather_tokens(jnp.moveaxis(y, 2, 1), index), 1, 2)


def _split_name(name: str) -> tuple[str, bool]:
    base, reverse = (name[:-4], True) if name.endswith("_rev") else (name, False)
    if base not in BASE_ORDERS:
        raise ValueError(f"scan order {name!r} is not one of {ALL_ORDERS}")
    return base, reverse


def _snake(grid: jax.Array) -> jax.Array:
    """Reverses every odd row of (B, R, C, E): an involution."""
    odd = (jnp.arange(grid.shape[1]) % 2 == 1)[None, :, None, None]
    return jnp.where(odd, grid[:, :, ::-1], grid)


def scan_map(x: jax.Array, names) -> jax.Array:
    """Scans a (B, H, W, E) map in fixed orders with layout ops (reshape, transpose, flip).

    Equal to `apply_scans(x.reshape(B, H*W, E), scan_orders(names, H, W))`, without a gather
    (whose backward is a scatter): (B, H*W, K, E).
    """
    b, h, w, e = x.shape
    seqs = []
    for name in names:
        base, reverse = _split_name(name)
        grid = x if base in ("row", "snake_row") else jnp.swapaxes(x, 1, 2)
        if base.startswith("snake"):
            grid = _snake(grid)
        seq = grid.reshape(b, h * w, e)
        seqs.append(seq[:, ::-1] if reverse else seq)
    return jnp.stack(seqs, axis=2)


def unscan_map(y: jax.Array, names, height: int, width: int) -> jax.Array:
    """Inverse of `scan_map`: (B, H*W, K, E) in scan orders -> (B, H*W, K, E) row-major."""
    b, length, k, e = y.shape
    out = []
    for i, name in enumerate(names):
        base, reverse = _split_name(name)
        seq = y[:, ::-1, i] if reverse else y[:, :, i]
        rows, cols = (height, width) if base in ("row", "snake_row") else (width, height)
        grid = seq.reshape(b, rows, cols, e)
        if base.startswith("snake"):
            grid = _snake(grid)
        if base in ("col", "snake_col"):
            grid = jnp.swapaxes(grid, 1, 2)
        out.append(grid.reshape(b, length, e))
    return jnp.stack(out, axis=2)
