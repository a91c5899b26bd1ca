"""All implementations of the selective scan (S6), behind one dispatcher.

Mamba's selective scan, channels-last:

    u, delta : (batch, length, E)     A : (E, N), negative
    B, C     : (batch, length, N) or (batch, length, G, N), E divisible by G
    D, delta_bias : (E,)              z : (batch, length, E)      h0 : (batch, E, N)

    delta  <- softplus(delta + delta_bias)             (when delta_softplus)
    h_t     = exp(delta_t * A) * h_{t-1} + (delta_t * u_t)[:, None] * B_t[group]
    y_t     = h_t @ C_t[group] + D * u_t ;   y_t *= silu(z_t)   (when z is given)

Every implementation is a pure function with the same signature; `selective_scan` checks the
arguments once, resolves ``impl="auto"`` (by platform and shape, the reason logged once per
shape) and dispatches with a ``match``. All compute in float32
(float64 when an input is float64) and return ``y`` in the dtype of ``u``; the final state
stays in the compute dtype.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

Impl = Literal["auto", "sequential", "sequential_vjp", "associative", "pallas"]
IMPLS: tuple[str, ...] = ("auto", "sequential", "sequential_vjp", "associative", "pallas")
DEFAULT_CHUNK = 128
# Sums over at most this many states are written as adds of slices (see `_sum_states`).
_SLICED_SUM_MAX = 32

log = logging.getLogger(__name__)


class ScanDims(NamedTuple):
    batch: int
    length: int
    channels: int  # E
    state: int  # N
    groups: int  # G (1 when B/C have no group axis)


def _shape_error(name: str, got, wanted: str) -> ValueError:
    return ValueError(f"selective_scan: argument {name!r} has shape {tuple(got)}, wanted {wanted}")


def check_scan_args(u, delta, A, B, C, D=None, z=None, delta_bias=None, initial_state=None):
    """Validates shapes and dtypes, returns the `ScanDims`; ValueError names the argument."""
    for name, x in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z),
                    ("delta_bias", delta_bias), ("initial_state", initial_state)):
        if x is not None and not jnp.issubdtype(jnp.result_type(x), jnp.floating):
            raise ValueError(f"selective_scan: argument {name!r} has dtype "
                             f"{jnp.result_type(x)}, wanted a floating dtype")
    if jnp.ndim(u) != 3:
        raise _shape_error("u", jnp.shape(u), "(batch, length, E)")
    b, length, e = jnp.shape(u)
    if length < 1:
        raise _shape_error("u", jnp.shape(u), "(batch, length, E) with length >= 1")
    if jnp.shape(delta) != (b, length, e):
        raise _shape_error("delta", jnp.shape(delta), f"{(b, length, e)} (same as u)")
    if jnp.ndim(A) != 2 or jnp.shape(A)[0] != e:
        raise _shape_error("A", jnp.shape(A), f"({e}, N)")
    n = jnp.shape(A)[1]
    if jnp.ndim(B) == 3:
        groups = 1
        wanted_bc = (b, length, n)
    elif jnp.ndim(B) == 4:
        groups = jnp.shape(B)[2]
        if groups < 1 or e % groups:
            raise _shape_error("B", jnp.shape(B),
                               f"({b}, {length}, G, {n}) with E={e} divisible by G")
        wanted_bc = (b, length, groups, n)
    else:
        raise _shape_error("B", jnp.shape(B), f"({b}, {length}, {n}) or ({b}, {length}, G, {n})")
    if jnp.shape(B) != wanted_bc:
        raise _shape_error("B", jnp.shape(B), str(wanted_bc))
    if jnp.shape(C) != wanted_bc:
        raise _shape_error("C", jnp.shape(C), f"{wanted_bc} (same as B)")
    for name, x in (("D", D), ("delta_bias", delta_bias)):
        if x is not None and jnp.shape(x) != (e,):
            raise _shape_error(name, jnp.shape(x), f"({e},)")
    if z is not None and jnp.shape(z) != (b, length, e):
        raise _shape_error("z", jnp.shape(z), f"{(b, length, e)} (same as u)")
    if initial_state is not None and jnp.shape(initial_state) != (b, e, n):
        raise _shape_error("initial_state", jnp.shape(initial_state), f"({b}, {e}, {n})")
    return ScanDims(b, length, e, n, groups)


def compute_dtype(*arrays) -> jnp.dtype:
    """float32, or float64 when an input is float64 (gradient checks under x64)."""
    return jnp.result_type(jnp.float32, *(x for x in arrays if x is not None))


# ---------------------------------------------------------------------------------------------
# Shared pre- and post-processing of the reference implementations.


class _Prepared(NamedTuple):
    """Inputs in the compute dtype, time-reversed when scanning backwards, E split into (G, E/G)."""

    u: jax.Array  # (b, L, G, E/G)
    delta: jax.Array  # (b, L, G, E/G), softplus applied
    A: jax.Array  # (G, E/G, N)
    B: jax.Array  # (b, L, G, N)
    C: jax.Array  # (b, L, G, N)
    h0: jax.Array  # (b, G, E/G, N)


def _prepare(u, delta, A, B, C, delta_bias, delta_softplus, reverse, initial_state, dims):
    b, length, e, n, g = dims
    f32 = compute_dtype(u, delta, A, B, C, delta_bias, initial_state)
    delta = delta.astype(f32)
    if delta_bias is not None:
        delta = delta + delta_bias.astype(f32)
    if delta_softplus:
        delta = jax.nn.softplus(delta)
    B = B.astype(f32).reshape(b, length, g, n)
    C = C.astype(f32).reshape(b, length, g, n)
    u = u.astype(f32)
    if reverse:
        u, delta, B, C = (jnp.flip(x, axis=1) for x in (u, delta, B, C))
    h0 = (jnp.zeros((b, e, n), f32) if initial_state is None else initial_state.astype(f32))
    split = (b, length, g, e // g)
    return _Prepared(u.reshape(split), delta.reshape(split), A.astype(f32).reshape(g, e // g, n),
                     B, C, h0.reshape(b, g, e // g, n))


def _finish(y, h_last, u, D, z, reverse, return_final_state, dims):
    """y: (b, L, G, E/G) in scan order -> output in u's dtype, original time order."""
    b, length, e, n, _ = dims
    f32 = y.dtype
    y = y.reshape(b, length, e)
    if reverse:
        y = jnp.flip(y, axis=1)
    if D is not None:
        y = y + D.astype(f32) * u.astype(f32)
    if z is not None:
        y = y * jax.nn.silu(z.astype(f32))
    y = y.astype(u.dtype)
    if return_final_state:
        return y, h_last.reshape(b, e, n)
    return y


def _run(core: Callable, dims: ScanDims, u, delta, A, B, C, D=None, z=None, delta_bias=None,
         delta_softplus=False, reverse=False, initial_state=None, return_final_state=False,
         **core_kwargs):
    """A recurrence `core(prepared) -> (y, h_last)` on checked arguments of shape `dims`."""
    p = _prepare(u, delta, A, B, C, delta_bias, delta_softplus, reverse, initial_state, dims)
    y, h_last = core(p, **core_kwargs)
    return _finish(y, h_last, u, D, z, reverse, return_final_state, dims)


def _reference_impl(core: Callable) -> Callable:
    """Turns a recurrence `core(prepared) -> (y, h_last)` into a full scan implementation that
    checks its arguments (the dispatcher, which has checked them, runs `core` directly)."""

    @functools.wraps(core)
    def impl(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
             reverse=False, initial_state=None, return_final_state=False, **core_kwargs):
        dims = check_scan_args(u, delta, A, B, C, D, z, delta_bias, initial_state)
        return _run(core, dims, u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse,
                    initial_state, return_final_state, **core_kwargs)

    return impl


# ---------------------------------------------------------------------------------------------
# Implementations.


@_reference_impl
def selective_scan_sequential(p: _Prepared):
    """One step at a time with `lax.scan`: the readable reference."""

    def step(h, xs):
        u_t, dt_t, b_t, c_t = xs  # (b, G, E/G), (b, G, E/G), (b, G, N), (b, G, N)
        h = jnp.exp(dt_t[..., None] * p.A) * h + (dt_t * u_t)[..., None] * b_t[:, :, None, :]
        return h, (h * c_t[:, :, None, :]).sum(-1)

    xs = tuple(jnp.moveaxis(x, 1, 0) for x in (p.u, p.delta, p.B, p.C))
    h_last, y = jax.lax.scan(step, p.h0, xs)
    return jnp.moveaxis(y, 0, 1), h_last


def _sum_states(x: jax.Array, axis: int) -> jax.Array:
    """Sum over the (small) state axis, keeping it with size 1, as adds of slices.

    XLA's CPU backend in jax 0.10 hands a multiply-then-reduce to YNNPACK, which takes about
    10 ns per element at these shapes, several times the whole step's arithmetic; adds of
    slices stay in one elementwise loop fusion (benchmarks/README.md, "On a CPU").
    """
    n = x.shape[axis]
    if n > _SLICED_SUM_MAX:
        return jnp.sum(x, axis=axis, keepdims=True)
    out = jax.lax.slice_in_dim(x, 0, 1, axis=axis)
    for i in range(1, n):
        out = out + jax.lax.slice_in_dim(x, i, i + 1, axis=axis)
    return out


def _state_major_forward(dt, x, A, B, C, h0, unroll: int, save_states: bool):
    """The recurrence over time-major, state-major inputs.

    dt, x: (L, b, G, 1, E/G) step size and dt * u;  A: (G, N, E/G);  B, C: (L, b, G, N, 1);
    h0: (b, G, N, E/G). Returns (h_last, y (L, b, G, E/G)) and, with `save_states`, the
    state before every step (L, b, G, N, E/G) for the backward pass.
    """

    def step(h, xs):
        dt_t, x_t, b_t, c_t = xs
        h_new = jnp.exp(dt_t * A) * h + x_t * b_t
        y_t = _sum_states(h_new * c_t, axis=-2)[..., 0, :]
        return h_new, ((y_t, h) if save_states else y_t)

    return jax.lax.scan(step, h0, (dt, x, B, C), unroll=unroll)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _state_major_scan(dt, x, A, B, C, h0, unroll):
    """(y, h_last) of `_state_major_forward`, with the backward pass written out below."""
    h_last, y = _state_major_forward(dt, x, A, B, C, h0, unroll, save_states=False)
    return y, h_last


def _state_major_scan_fwd(dt, x, A, B, C, h0, unroll):
    h_last, (y, h_before) = _state_major_forward(dt, x, A, B, C, h0, unroll, save_states=True)
    return (y, h_last), (dt, x, A, B, C, h_before)


def _state_major_scan_bwd(unroll, residuals, cotangents):
    """A reverse scan carrying dL/dh; each step's small gradients are its outputs.

    With decay_t = exp(dt_t A) and h_t = decay_t h_{t-1} + x_t B_t, y_t = sum_n h_t C_t:
      dh_t     = dy_t C_t + decay_{t+1} dh_{t+1}
      dC_t     = sum_e dy_t h_t            dB_t = sum_e dh_t x_t     dx_t = sum_n dh_t B_t
      ddt_t    = sum_n A g_t               dA  += g_t dt_t     with g_t = dh_t h_{t-1} decay_t
    and, for the initial state h_{-1}, dh_{-1} = decay_0 dh_0. The state h_t is recomputed
    from the saved h_{t-1}.
    """
    dt, x, A, B, C, h_before = residuals
    dy, dh_last = cotangents

    def step(carry, xs):
        dh, dA = carry
        dt_t, x_t, b_t, c_t, dy_t, h_prev = xs
        decay = jnp.exp(dt_t * A)
        h_t = decay * h_prev + x_t * b_t
        dh = dh + dy_t[..., None, :] * c_t
        g = dh * h_prev * decay
        # The sums over E/G are contractions (dot products), not reductions: see _sum_states.
        dc_t = jnp.einsum("bgne,bge->bgn", h_t, dy_t)[..., None]
        db_t = jnp.einsum("bgne,bgxe->bgn", dh, x_t)[..., None]
        dx_t = _sum_states(dh * b_t, axis=-2)
        ddt_t = _sum_states(g * A, axis=-2)
        return (dh * decay, dA + g * dt_t), (ddt_t, dx_t, db_t, dc_t)

    (dh0, dA), (ddt, dx, dB, dC) = jax.lax.scan(
        step, (dh_last, jnp.zeros_like(dh_last)), (dt, x, B, C, dy, h_before), reverse=True,
        unroll=unroll)
    return ddt, dx, jnp.sum(dA, axis=0), dB, dC, dh0


_state_major_scan.defvjp(_state_major_scan_fwd, _state_major_scan_bwd)


@_reference_impl
def selective_scan_sequential_vjp(p: _Prepared, unroll: int = 1):
    """`lax.scan` one step at a time, like "sequential", with its own backward pass.

    The state is laid out (batch, G, N, E/G), channels last, so every step is a few
    elementwise loops over contiguous rows; the backward pass saves only the states and is one
    reverse scan whose outputs are the per-step gradients (autodiff of "sequential" saves
    several (L, batch, E, N) arrays and reduces each). `unroll` steps run per loop iteration.
    """
    time_major = functools.partial(jnp.moveaxis, source=1, destination=0)
    dt = time_major(p.delta)[..., None, :]
    x = time_major(p.delta * p.u)[..., None, :]
    B, C = time_major(p.B)[..., None], time_major(p.C)[..., None]
    y, h_last = _state_major_scan(dt, x, jnp.swapaxes(p.A, -1, -2), B, C,
                                  jnp.swapaxes(p.h0, -1, -2), unroll)
    return jnp.moveaxis(y, 0, 1), jnp.swapaxes(h_last, -1, -2)



def _combine(left, right):
    a_l, b_l = left
    a_r, b_r = right
    return a_r * a_l, a_r * b_l + b_r


@_reference_impl
def selective_scan_associative(p: _Prepared, chunk_size: int = DEFAULT_CHUNK):
    """`lax.associative_scan` over chunks of `chunk_size` steps, chunks chained by `lax.scan`.

    Only one chunk's (batch, chunk, E, N) decays and inputs exist at a time, and each chunk is
    rematerialised in the backward pass, so peak memory grows with the chunk, not the length.
    """
    b, length, g, eg = p.u.shape
    chunk = max(1, min(chunk_size, length))
    pad = -length % chunk
    # Padding steps have delta = 0: decay 1 and no input, so the carried state passes unchanged.
    u, delta, B, C = (jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
                      for x in (p.u, p.delta, p.B, p.C))
    n_chunks = (length + pad) // chunk

    def to_chunks(x):
        return jnp.moveaxis(x.reshape(b, n_chunks, chunk, *x.shape[2:]), 1, 0)

    @jax.checkpoint
    def chunk_step(h, xs):
        u_c, dt_c, b_c, c_c = xs  # (b, T, G, E/G), ..., (b, T, G, N)
        decay = jnp.exp(dt_c[..., None] * p.A)  # (b, T, G, E/G, N)
        inp = (dt_c * u_c)[..., None] * b_c[:, :, :, None, :]
        a_cum, b_cum = jax.lax.associative_scan(_combine, (decay, inp), axis=1)
        h_all = a_cum * h[:, None] + b_cum
        return h_all[:, -1], (h_all * c_c[:, :, :, None, :]).sum(-1)

    h_last, y = jax.lax.scan(chunk_step, p.h0, tuple(map(to_chunks, (u, delta, B, C))))
    y = jnp.moveaxis(y, 0, 1).reshape(b, n_chunks * chunk, g, eg)[:, :length]
    return y, h_last


def selective_scan_pallas(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                          delta_softplus=False, reverse=False, initial_state=None,
                          return_final_state=False):
    """The fused Pallas kernels of `kernels_pallas` (interpret mode on CPU)."""
    import kernels_pallas  # noqa: PLC0415  (kept lazy: the kernels are optional at import)

    check_scan_args(u, delta, A, B, C, D, z, delta_bias, initial_state)
    return kernels_pallas.selective_scan(
        u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
        reverse=reverse, initial_state=initial_state, return_final_state=return_final_state)


_LOGGED_CHOICES: set[tuple] = set()


def _log_choice(platform: str, dims: ScanDims | None, impl: str, reason: str) -> None:
    """Logs why "auto" chose `impl`, once per (platform, shape)."""
    key = (platform, dims, impl)
    if key not in _LOGGED_CHOICES:
        _LOGGED_CHOICES.add(key)
        shape = "" if dims is None else f" at (batch, L, E, N, G) = {tuple(dims)}"
        log.info("selective_scan: auto picks %r on %s%s: %s", impl, platform, shape, reason)


def resolve_impl(impl: str, dims: ScanDims | None = None) -> str:
    """Turns "auto" into a concrete implementation for the default backend and this shape."""
    if impl not in IMPLS:
        raise ValueError(f"selective_scan: impl={impl!r} is not one of {IMPLS}")
    if impl != "auto":
        return impl
    platform = jax.default_backend()
    if platform not in ("gpu", "cuda", "rocm", "tpu"):
        _log_choice(platform, dims, "sequential_vjp",
                    "XLA's CPU backend runs a step loop with the hand-written backward pass "
                    "fastest at every measured shape (benchmarks/README.md, 'On a CPU')")
        return "sequential_vjp"
    import kernels_pallas  # noqa: PLC0415  (lazy: Pallas loads only where it runs)

    reason = kernels_pallas.unsupported_reason(platform, **dims._asdict()) if dims else None
    if reason:
        _log_choice(platform, dims, "associative", reason)
        return "associative"
    return "pallas"


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   reverse=False, initial_state=None, return_final_state=False,
                   impl: Impl = "auto"):
    """Selective scan (S6): see the module docstring for shapes and semantics.

    Args:
      u, delta: (batch, length, E) input and step size.
      A: (E, N) state matrix (negative real diagonal, one row per channel).
      B, C: (batch, length, N) or (batch, length, G, N) input and output projections.
      D: optional (E,) skip connection.  z: optional (batch, length, E) gate (y *= silu(z)).
      delta_bias: optional (E,) added to delta before the softplus.
      delta_softplus: apply softplus to delta (+ bias).
      reverse: scan from the last step to the first.
      initial_state: optional (batch, E, N) state before the first step scanned.
      return_final_state: also return the (batch, E, N) state after the last step
        (float32, or float64 for float64 inputs).
      impl: "sequential", "sequential_vjp", "associative", "pallas" or "auto" (pallas on
        GPU/TPU where the shape is supported, associative on other GPU/TPU shapes,
        sequential_vjp on CPU).

    Returns:
      y (batch, length, E) in u's dtype, or (y, final_state) when return_final_state.
    """
    dims = check_scan_args(u, delta, A, B, C, D, z, delta_bias, initial_state)
    kwargs = dict(D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
                  reverse=reverse, initial_state=initial_state,
                  return_final_state=return_final_state)
    impl = resolve_impl(impl, dims)
    if impl == "pallas":  # the kernels' package checks the shapes it supports itself
        import kernels_pallas  # noqa: PLC0415

        return kernels_pallas.selective_scan(u, delta, A, B, C, **kwargs)
    core = {"sequential": selective_scan_sequential, "sequential_vjp":
            selective_scan_sequential_vjp, "associative": selective_scan_associative}[impl]
    return _run(core.__wrapped__, dims, u, delta, A, B, C, **kwargs)
