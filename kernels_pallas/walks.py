"""Walks of a 2-D map: the order in which a scan visits the H x W positions, as arithmetic.

A walk is one of the scan orders of the vision mixers (ViM2's cross-scan, ViQS's Switch of
Scans): row-major, column-major, and the boustrophedon ("snake") orders that reverse every odd
row or column, each forward or reversed. The kernels take a walk as a small integer code and
compute the row-major position (h * W + w) of scan step s from it, so a map in its natural
(H, W) layout is read and written in place instead of being permuted into a copy first.

    code = 2 * base + reversed,   base: 0 row, 1 col, 2 snake_row, 3 snake_col

The arithmetic uses integer multiplies and adds only (no selects: a scalar select with a
literal mis-lowers in Triton, notes/kernels.md), and divisions by the static H and W.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

BASES = ("row", "col", "snake_row", "snake_col")
#: Every walk, indexed by its code.
NAMES = tuple(name for base in BASES for name in (base, f"{base}_rev"))


def walk_code(name: str) -> int:
    """The integer code of a walk name ("row", "col_rev", "snake_row", ...)."""
    if name not in NAMES:
        raise ValueError(f"walk {name!r} is not one of {NAMES}")
    return NAMES.index(name)


def _line_position(s, lines: int, line_len: int, snake):
    """(line, offset in the line) of step s of a walk along lines of `line_len` steps;
    `snake` (0 or 1) reverses the odd lines."""
    if line_len == 1:  # `x % 1` with a loop index fails in the Triton lowering
        return s, s * 0
    line = jax.lax.div(s, line_len)
    offset = jax.lax.rem(s, line_len)
    if lines > 1:
        offset = offset + snake * jax.lax.rem(line, 2) * (line_len - 1 - 2 * offset)
    return line, offset


def walk_position(code, s, height: int, width: int):
    """Row-major map position of step s of the walk `code` (int32 scalars or arrays, s in
    [0, H*W)). The inverse of a walk is not needed: outputs are written to the position."""
    length = height * width
    code = jnp.asarray(code, jnp.int32)
    s = jnp.asarray(s, jnp.int32)
    rev = jax.lax.rem(code, 2)
    col = jax.lax.rem(jax.lax.div(code, 2), 2)
    snake = jax.lax.div(code, 4)
    s = s + rev * (length - 1 - 2 * s)
    row_i, row_j = _line_position(s, height, width, snake)  # along rows: (h, w)
    col_i, col_j = _line_position(s, width, height, snake)  # along columns: (w, h)
    by_rows = row_i * width + row_j
    by_cols = col_j * width + col_i
    return by_rows + col * (by_cols - by_rows)
