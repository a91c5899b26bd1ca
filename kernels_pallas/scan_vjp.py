"""Backend-independent glue of the Pallas selective scans: argument normalisation and custom_vjp.

A backend module (``triton_scan``, ``mosaic_scan``) provides two functions over normalised
arguments (see `Normalised`):

    forward(opts, args)                 -> (y, h_last, residual)
    backward(opts, args, residual, dy, dh_last) -> Grads (float32 except du/ddelta/dz)

`make_scan(backend)` turns such a pair into a differentiable scan whose gradients flow to
every input (u, delta, A, B, C, D, z, delta_bias, initial_state), with the cotangent of the
final state taken into account when the final state is returned.

The same pair scans the walks of a 2-D map (`Walks`, `normalise_walks`): u and z are then the
map (b, H*W, E), shared by K walks, each with its own delta (K, b, H*W, E) and B, C
(b, H*W, K, N) at the map's own row-major positions; A, D and delta_bias sit on the channel
axis as K groups of E channels.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

LOG2E = 1.0 / math.log(2.0)
# softplus(x) is x above this (exact in float32), as in the CUDA kernels.
SOFTPLUS_LINEAR_ABOVE = 20.0


class Walks(NamedTuple):
    """Static description of a scan along the walks of an H x W map (`kernels_pallas.walks`).

    The kernels read the walk code of each (sample, slot) from an int32 table (1 or b, K) and
    compute the map position of every step from it. Each walk's output, in u's dtype, goes
    to the position of its step (or of the next step, with `shift`); the backend returns the
    walks summed (weighted, with `weighted`), or each walk's own map.
    """

    height: int
    width: int
    per_sample: bool  # the walk table is (b, K): each sample its own walks
    shift: bool  # step t's output belongs to step t+1's position; the first position gets 0
    summed: bool  # the output (and so dy) is the sum over walks, (b, L, E)
    weighted: bool  # the sum weighs walk k of sample b by weights[b, k]


class Options(NamedTuple):
    """Static options of one call (hashable: it is a nondiff argument of the custom_vjp)."""

    delta_softplus: bool
    reverse: bool
    has_D: bool  # noqa: N815
    has_z: bool
    has_bias: bool
    has_h0: bool
    has_dh_last: bool  # the final state is returned, so its cotangent matters
    backend_config: Any  # backend-specific static tuning (a hashable NamedTuple)
    interpret: Any  # False, True, or a backend's interpret parameters
    walks: Walks | None = None  # a 1-D scan when None


class Normalised(NamedTuple):
    """Arguments as the kernels take them.

    u, delta, z: (b, L, E) in their own dtypes (z may be None).
    A: (E, N) float32.   B, C: (b, L, G, N) in their own dtypes.
    D, delta_bias: (E,) float32 or None.   h0: (b, E, N) float32 or None.

    Walks of a map (`Options.walks`): u and z are the map (b, L, E) that every walk reads,
    delta is (K, b, L, E) (and so are the per-walk outputs and their gradients), B and C are
    (b, L, K, N) (the walks as K groups), A is (K*E, N) and D, delta_bias are (K*E,);
    walk_codes is the int32 walk table (1 or b, K) and weights the float32 (b, K) weights of
    the sum, or None.
    """

    u: jax.Array
    delta: jax.Array
    A: jax.Array
    B: jax.Array
    C: jax.Array
    D: jax.Array | None
    z: jax.Array | None
    delta_bias: jax.Array | None
    h0: jax.Array | None
    walk_codes: jax.Array | None = None
    weights: jax.Array | None = None


#: Gradients in the layout of `Normalised` (B and C as (b, L, G, N)), one per argument.
Grads = Normalised


def shape_error(name: str, got, wanted: str) -> ValueError:
    return ValueError(f"kernels_pallas.selective_scan: argument {name!r} has shape "
                      f"{tuple(got)}, wanted {wanted}")


def normalise(u, delta, A, B, C, D, z, delta_bias, initial_state) -> Normalised:
    """Checks shapes and brings the arguments to the layout of `Normalised`."""
    if jnp.ndim(u) != 3:
        raise shape_error("u", jnp.shape(u), "(batch, length, E)")
    b, length, e = u.shape
    if jnp.shape(delta) != u.shape:
        raise shape_error("delta", jnp.shape(delta), f"{u.shape} (same as u)")
    if jnp.ndim(A) != 2 or A.shape[0] != e:
        raise shape_error("A", jnp.shape(A), f"({e}, N)")
    n = A.shape[1]
    B = B[:, :, None, :] if jnp.ndim(B) == 3 else B
    C = C[:, :, None, :] if jnp.ndim(C) == 3 else C
    if jnp.ndim(B) != 4 or B.shape[:2] != (b, length) or B.shape[3] != n or e % B.shape[2]:
        raise shape_error("B", jnp.shape(B), f"({b}, {length}, {n}) or ({b}, {length}, G, {n}) "
                          f"with E={e} divisible by G")
    if jnp.shape(C) != B.shape:
        raise shape_error("C", jnp.shape(C), f"{B.shape} (same as B)")
    for name, x in (("D", D), ("delta_bias", delta_bias)):
        if x is not None and jnp.shape(x) != (e,):
            raise shape_error(name, jnp.shape(x), f"({e},)")
    if z is not None and jnp.shape(z) != u.shape:
        raise shape_error("z", jnp.shape(z), f"{u.shape} (same as u)")
    if initial_state is not None and jnp.shape(initial_state) != (b, e, n):
        raise shape_error("initial_state", jnp.shape(initial_state), f"({b}, {e}, {n})")
    f32 = jnp.float32
    return Normalised(
        u, delta, A.astype(f32), B, C,
        None if D is None else D.astype(f32), z,
        None if delta_bias is None else delta_bias.astype(f32),
        None if initial_state is None else initial_state.astype(f32))


def normalise_walks(u, delta, A, B, C, D, z, delta_bias, walk_codes, weights
                    ) -> tuple[Normalised, tuple[int, int, int]]:
    """Checks the map-layout arguments of a walk scan and flattens them (free reshapes) into
    the layout of `Normalised`; returns it and (H, W, K).

    u, z: (b, H, W, E).  delta: (K, b, H, W, E).  A: (K, E, N).  B, C: (b, H, W, K, N).
    D, delta_bias: (K, E).  walk_codes: int (1 or b, K).  weights: (b, K) or None.
    """
    def error(name, got, wanted):
        return ValueError(f"kernels_pallas.selective_scan_walks: argument {name!r} has shape "
                          f"{tuple(got)}, wanted {wanted}")

    if jnp.ndim(u) != 4:
        raise error("u", jnp.shape(u), "(batch, H, W, E)")
    b, h, w, e = u.shape
    if jnp.ndim(delta) != 5 or delta.shape[1:] != (b, h, w, e):
        raise error("delta", jnp.shape(delta), f"(K, {b}, {h}, {w}, {e})")
    k = delta.shape[0]
    if jnp.ndim(A) != 3 or A.shape[:2] != (k, e):
        raise error("A", jnp.shape(A), f"({k}, {e}, N)")
    n = A.shape[2]
    for name, x in (("B", B), ("C", C)):
        if jnp.shape(x) != (b, h, w, k, n):
            raise error(name, jnp.shape(x), str((b, h, w, k, n)))
    for name, x in (("D", D), ("delta_bias", delta_bias)):
        if x is not None and jnp.shape(x) != (k, e):
            raise error(name, jnp.shape(x), str((k, e)))
    if z is not None and jnp.shape(z) != u.shape:
        raise error("z", jnp.shape(z), f"{u.shape} (same as u)")
    if (jnp.ndim(walk_codes) != 2 or jnp.shape(walk_codes)[0] not in (1, b)
            or jnp.shape(walk_codes)[1] != k):
        raise error("walk_codes", jnp.shape(walk_codes), f"(1, {k}) or ({b}, {k})")
    if weights is not None and jnp.shape(weights) != (b, k):
        raise error("weights", jnp.shape(weights), str((b, k)))
    length, f32 = h * w, jnp.float32
    flat = lambda x, *tail: None if x is None else x.reshape(b, length, *tail)  # noqa: E731
    vec = lambda x: None if x is None else x.reshape(k * e).astype(f32)  # noqa: E731
    args = Normalised(
        flat(u, e), delta.reshape(k, b, length, e), A.reshape(k * e, n).astype(f32),
        flat(B, k, n),
        flat(C, k, n), vec(D), flat(z, e), vec(delta_bias), None,
        jnp.asarray(walk_codes, jnp.int32), None if weights is None else weights.astype(f32))
    return args, (h, w, k)


def unreturned_final_state(batch: int, channels: int, state: int):
    """The final state a forward returns when the caller did not ask for it
    (`Options.has_dh_last` False): zeros, which XLA drops with the unused output, so the
    kernels need not write (batch, E, N) states that nobody reads (for the vision channel
    mixers, whose batch is batch x tokens, that was more than their output)."""
    return jnp.zeros((batch, channels, state), jnp.float32)


def reduce_walks(y, args: Normalised, walks: Walks):
    """The kernels' per-walk outputs (K, b, L, E) -> what the caller asked for: the (weighted)
    sum over walks (b, L, E) in u's dtype, or every walk's (K, b, L, E) unchanged."""
    if not walks.summed:
        return y
    if walks.weighted:
        return jnp.einsum("kble,bk->ble", y.astype(jnp.float32), args.weights).astype(
            args.u.dtype)
    return y.astype(jnp.float32).sum(axis=0).astype(args.u.dtype)


def sum_over_walks(x):
    """A per-walk gradient (K, b, L, E) of a shared map (u or z) -> its sum (b, L, E), float32."""
    return x.astype(jnp.float32).sum(axis=0)


def _cast_like(g, x):
    """g in x's dtype; None for an input without a gradient (absent, or the walk table)."""
    return None if x is None or g is None else g.astype(x.dtype)


def make_scan(forward: Callable, backward: Callable) -> Callable:
    """Wraps a backend's forward/backward pair into ``scan(opts, normalised) -> (y, h_last)``.

    ``forward(opts, args, residual)`` returns (y, h_last, residual); the primal, run outside
    differentiation, asks for no residual (the backend may then skip writing it)."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
    def scan(opts: Options, args: Normalised):  # outside differentiation: nothing to save
        y, h_last, _ = forward(opts, args, residual=False)
        return y, h_last

    def scan_fwd(opts, args):
        y, h_last, residual = forward(opts, args)
        return (y, h_last), (args, residual)

    def scan_bwd(opts, saved, cotangents):
        args, residual = saved
        dy, dh_last = cotangents
        grads = backward(opts, args, residual, dy, dh_last if opts.has_dh_last else None)
        return (Normalised(*(_cast_like(g, x) for g, x in zip(grads, args, strict=True))),)

    scan.defvjp(scan_fwd, scan_bwd)
    return scan


def softplus(x):
    """log(1 + exp(x)), switching to x above 20 as the CUDA kernels do (exact in float32)."""
    top = SOFTPLUS_LINEAR_ABOVE
    return jnp.where(x > top, x, jnp.log1p(jnp.exp(jnp.minimum(x, top))))


def sigmoid(x):
    return 1.0 / (1.0 + jnp.exp(-x))


def best_checkpoint_interval(length: int, unit: int, max_interval: int) -> int:
    """The interval (a power-of-two multiple of `unit`, at most `max_interval`) that pads
    `length` the least, the longest among equals (fewer checkpoints)."""
    best, best_padded = unit, -(-length // unit) * unit
    k = unit
    while k <= max(unit, max_interval):
        padded = -(-length // k) * k
        if padded <= best_padded:
            best, best_padded = k, padded
        k *= 2
    return best


def split_refs(refs, flags):
    """Unpacks kernel refs in order; a False flag yields None without consuming a ref.
    Returns (the flagged refs, the refs left over)."""
    it = iter(refs)
    return [next(it) if f else None for f in flags], list(it)


def step_size(dt_raw, bias, opts: Options, keep):
    """Step size after the bias and softplus, 0 where `keep` is False (padding), and its
    derivative with respect to the raw step (None without softplus)."""
    x = dt_raw + bias if bias is not None else dt_raw
    if opts.delta_softplus:
        dt, slope = softplus(x), sigmoid(x)
    else:
        dt, slope = x, None
    return jnp.where(keep, dt, 0.0), slope
