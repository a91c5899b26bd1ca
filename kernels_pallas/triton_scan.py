"""Selective scan for GPUs: Pallas kernels lowered through Triton, forward and backward.

Grid (channel blocks, batch). A program owns `block_e` channels of one batch row (within one
B/C group) and keeps their state as an (N, block_e) tile, one channel per thread, so the
output's sum over N stays inside a thread. It walks the sequence in chunks of `fwd_unroll`
steps unrolled in Python: the loads of a chunk do not depend on the state, so they are issued
together and the memory latency is paid once per chunk instead of once per step.

Forward: saves the state at every checkpoint interval of K steps (b, L/K, N, E), plus the
output and the final state.

Backward: walks the checkpoint intervals from last to first. An interval is recomputed from
its checkpoint in sub-chunks of `bwd_unroll` steps (the state at each sub-chunk start goes to
a small per-program scratch buffer), then the sub-chunks are visited in reverse: each one's
states are recomputed into registers (one SSA value per step) and walked backwards with the
adjoint g_t = a_{t+1} g_{t+1} + C_t dy_t. Reductions over channels (dB, dC) are per-program
partial sums added up afterwards in JAX (deterministic); reductions over batch and time
(dA, dD, d delta_bias) are per-program accumulators, also summed in JAX.

Any length and width: time steps past the end and channels past the block edge are masked
(delta forced to 0, so the padded steps leave the state untouched). N is padded to a power of
two with masked zero rows.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels_pallas.scan_vjp import (
    LOG2E,
    Grads,
    Normalised,
    Options,
    best_checkpoint_interval,
    sigmoid,
    split_refs,
    step_size,
)

MAX_STATE = 64  # larger N would not fit in registers as one tile


GRID_Y_MAX = 65535  # CUDA's limit on the grid's y (and z) size; x allows 2**31 - 1


class TritonConfig(NamedTuple):
    """Static tuning of the Triton kernels (all block sizes powers of two)."""

    block_e: int = 32  # channels per forward program (32 * fwd_warps: one per thread)
    fwd_warps: int = 1
    fwd_unroll: int = 8  # steps unrolled per loop iteration in the forward
    bwd_block_e: int = 32
    bwd_warps: int = 1
    bwd_unroll: int = 4  # steps whose states the backward holds in registers at once
    bwd_sub_chunks: int = 16  # checkpoint interval is at most bwd_unroll * bwd_sub_chunks
    num_stages: int = 1
    fast_exp2: bool = True  # ex2.approx.ftz.f32 (compiled only; interpret uses jnp.exp2)
    keep_decay: bool = False  # keep exp(delta*A) of a sub-chunk in registers, not recompute
    prefetch: bool = True  # load the next chunk's rows while computing this one
    # Batch rows on the grid's x axis (limit 2**31 - 1) instead of y (limit 65535). None: only
    # when the batch needs it; channel blocks of one row then no longer run side by side.
    batch_major: bool | None = None


class _Dims(NamedTuple):
    batch: int
    length: int
    channels: int
    state: int
    state_pad: int
    groups: int
    group_width: int  # E / G
    blocks_per_group: int
    block_e: int
    interval: int  # checkpoint interval K
    n_intervals: int
    batch_major: bool  # grid (batch, blocks) rather than (blocks, batch)

    def grid(self, n_blocks: int) -> tuple[int, int]:
        return (self.batch, n_blocks) if self.batch_major else (n_blocks, self.batch)


def _dims(args: Normalised, block_e: int, cfg: TritonConfig) -> _Dims:
    b, length, e = args.u.shape
    n = args.A.shape[1]
    g = args.B.shape[2]
    eg = e // g
    unit = max(cfg.fwd_unroll, cfg.bwd_unroll)
    k = best_checkpoint_interval(length, unit, cfg.bwd_unroll * cfg.bwd_sub_chunks)
    batch_major = b > GRID_Y_MAX if cfg.batch_major is None else cfg.batch_major
    return _Dims(b, length, e, n, pl.next_power_of_2(n), g, eg, pl.cdiv(eg, block_e), block_e,
                 k, pl.cdiv(length, k), batch_major)


def _exp2(x, fast: bool):
    if fast:
        [y] = plgpu.elementwise_inline_asm(
            "ex2.approx.ftz.f32 $0, $1;", args=[x], constraints="=f,f", pack=1,
            result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, x.dtype)])
        return y
    return jnp.exp2(x)


def _advance(h, dt, u, bv, a2, fast: bool):
    """One scan step h <- exp(dt A) h + dt u B; returns the new state and exp(dt A)."""
    a = _exp2(dt[None, :] * a2, fast)
    return a * h + (dt * u)[None, :] * bv[:, None], a


class _Program:
    """Index helpers of one program: batch row `bi`, channel block `blk`."""

    def __init__(self, d: _Dims, reverse: bool):
        self.d = d
        self.reverse = reverse
        batch_axis, block_axis = (0, 1) if d.batch_major else (1, 0)
        self.bi, self.blk = pl.program_id(batch_axis), pl.program_id(block_axis)
        self.group = self.blk // d.blocks_per_group
        local = (self.blk % d.blocks_per_group) * d.block_e
        self.e0 = self.group * d.group_width + local
        self.e_ok = local + jnp.arange(d.block_e, dtype=jnp.int32) < d.group_width
        self.n_ok = jnp.arange(d.state_pad, dtype=jnp.int32) < d.state
        self.tile_ok = self.n_ok[:, None] & self.e_ok[None, :]
        self.cols = pl.ds(self.e0, d.block_e)
        self.rows = pl.ds(0, d.state_pad)

    def time(self, s):
        """Scan step s -> (physical time index, in range)."""
        valid = (s >= 0) & (s < self.d.length)
        t = self.d.length - 1 - s if self.reverse else s
        # Clamped rather than selected: a scalar select with a literal mis-lowers in Triton.
        return jnp.minimum(jnp.maximum(t, 0), self.d.length - 1), valid

    def row(self, ref, t, valid):
        """(block_e,) float32 slice of a (b, L, E) array at time t (0 where masked)."""
        x = plgpu.load(ref.at[self.bi, t, self.cols], mask=self.e_ok & valid, other=0)
        return x.astype(jnp.float32)

    def put_row(self, ref, t, valid, x):
        plgpu.store(ref.at[self.bi, t, self.cols], x.astype(ref.dtype), mask=self.e_ok & valid)

    def state_row(self, ref, t, valid):
        """(N_pad,) float32 row of a (b, L, G, N) array (B or C) at time t."""
        x = plgpu.load(ref.at[self.bi, t, self.group, self.rows], mask=self.n_ok & valid,
                       other=0)
        return x.astype(jnp.float32)

    def vec(self, ref):
        """(block_e,) float32 slice of an (E,) array."""
        return plgpu.load(ref.at[self.cols], mask=self.e_ok, other=0).astype(jnp.float32)

    def tile(self, ref, *lead):
        """(N_pad, block_e) float32 tile of a (..., N, E) array."""
        return plgpu.load(ref.at[(*lead, self.rows, self.cols)], mask=self.tile_ok,
                          other=0).astype(jnp.float32)

    def put_tile(self, ref, x, *lead):
        plgpu.store(ref.at[(*lead, self.rows, self.cols)], x.astype(ref.dtype),
                    mask=self.tile_ok)

    def put_vec(self, ref, x, *lead):
        """Stores a (block_e,) row into a (..., E) array."""
        plgpu.store(ref.at[(*lead, self.cols)], x, mask=self.e_ok)

    def scratch_ref(self, ref, *lead):
        """The whole (N_pad, block_e) tile of a per-program scratch array."""
        return ref.at[(*lead, self.rows, pl.ds(0, self.d.block_e))]


# ---------------------------------------------------------------------------------------------
# Shared by the kernels.


def _row_loop(lo, hi, load, body, state, rows, prefetch: bool):
    """``for i in range(lo, hi): state = body(i, state, load(i))``; returns (state, rows).

    With `prefetch`, `rows` holds load(lo) on entry, load(i + 1) is issued before body(i) and
    carried to the next iteration (its memory latency overlaps body(i)'s arithmetic), and the
    rows of `hi` come back for a following loop. Loads must come before the body's stores in
    program order either way: the compiler cannot move a load above a store to a pointer that
    might alias it.
    """
    if not prefetch:
        return jax.lax.fori_loop(lo, hi, lambda i, st: body(i, st, load(i)), state), rows

    def step(i, carry):
        st, current = carry
        upcoming = load(i + 1)
        return body(i, st, current), upcoming

    return jax.lax.fori_loop(lo, hi, step, (state, rows))


def _compiler_params(warps: int, cfg: TritonConfig):
    return plgpu.CompilerParams(num_warps=warps, num_stages=cfg.num_stages)


def _call(kernel, d: _Dims, opts: Options, out_shape, warps: int, name: str):
    """The pallas_call of `kernel` on the grid of every channel block of every batch row."""
    cfg: TritonConfig = opts.backend_config
    interpret = bool(opts.interpret)
    return pl.pallas_call(
        functools.partial(kernel, d=d, opts=opts, cfg=cfg, interpret=interpret),
        out_shape=out_shape, grid=d.grid(d.groups * d.blocks_per_group),
        interpret=opts.interpret, name=name,
        compiler_params=None if interpret else _compiler_params(warps, cfg))


# ---------------------------------------------------------------------------------------------
# Forward.


def _fwd_kernel(*refs, d: _Dims, opts: Options, cfg: TritonConfig, interpret: bool):
    (u_ref, dt_ref, a2_ref, b_ref, c_ref, d_ref, z_ref, bias_ref, h0_ref), outs = split_refs(
        refs, (True, True, True, True, True, opts.has_D, opts.has_z, opts.has_bias, opts.has_h0))
    y_ref, hlast_ref, ck_ref = outs
    p = _Program(d, opts.reverse)
    fast = cfg.fast_exp2 and not interpret
    a2 = p.tile(a2_ref)  # A * log2(e), (N_pad, block_e)
    dvec = p.vec(d_ref) if d_ref is not None else None
    bias = p.vec(bias_ref) if bias_ref is not None else None
    h = (p.tile(h0_ref, p.bi) if h0_ref is not None
         else jnp.zeros((d.state_pad, d.block_e), jnp.float32))
    unroll = cfg.fwd_unroll
    per_interval = d.interval // unroll

    def load(c):  # the per-channel rows of chunk c: (u, raw delta, z) per step
        rows = []
        for j in range(unroll):
            t, valid = p.time(c * unroll + j)
            rows.append((p.row(u_ref, t, valid), p.row(dt_ref, t, valid),
                         p.row(z_ref, t, valid) if z_ref is not None else None))
        return rows

    def chunk(c, h, rows):
        times = [p.time(c * unroll + j) for j in range(unroll)]
        bcs = [(p.state_row(b_ref, t, v), p.state_row(c_ref, t, v)) for t, v in times]
        for (t, valid), (u, dt_raw, z), (bv, cv) in zip(times, rows, bcs, strict=True):
            dt, _ = step_size(dt_raw, bias, opts, p.e_ok & valid)
            h, _ = _advance(h, dt, u, bv, a2, fast)
            y = jnp.sum(h * cv[:, None], axis=0)
            if dvec is not None:
                y = y + dvec * u
            if z is not None:
                y = y * (z * sigmoid(z))
            p.put_row(y_ref, t, valid, y)
        return h

    def interval(k, carry):
        h, rows = carry
        p.put_tile(ck_ref, h, p.bi, k)  # the state at each checkpoint-interval start
        return _row_loop(k * per_interval, (k + 1) * per_interval, load, chunk, h, rows,
                         cfg.prefetch)

    rows = load(0) if cfg.prefetch else None
    h, _ = jax.lax.fori_loop(0, d.n_intervals, interval, (h, rows))
    p.put_tile(hlast_ref, h, p.bi)


def forward(opts: Options, args: Normalised):
    """Returns y (b, L, E) in u's dtype, the final state (b, E, N) float32 and the residual
    (checkpoints (b, L/K, N, E) float32)."""
    cfg: TritonConfig = opts.backend_config
    d = _dims(args, cfg.block_e, cfg)
    b, length, e = args.u.shape
    a2t = (args.A * LOG2E).T  # (N, E)
    h0t = None if args.h0 is None else jnp.swapaxes(args.h0, 1, 2)  # (b, N, E)
    ins = [x for x in (args.u, args.delta, a2t, args.B, args.C, args.D, args.z,
                       args.delta_bias, h0t) if x is not None]
    f32 = jnp.float32
    out_shape = (jax.ShapeDtypeStruct((b, length, e), args.u.dtype),
                 jax.ShapeDtypeStruct((b, d.state, e), f32),
                 jax.ShapeDtypeStruct((b, d.n_intervals, d.state, e), f32))
    y, hlast_t, ck = _call(_fwd_kernel, d, opts, out_shape, cfg.fwd_warps,
                           "selective_scan_fwd")(*ins)
    return y, jnp.swapaxes(hlast_t, 1, 2), ck


# ---------------------------------------------------------------------------------------------
# Backward.


def _bwd_kernel(*refs, d: _Dims, opts: Options, cfg: TritonConfig, interpret: bool):
    flags = (True, True, True, True, True, opts.has_D, opts.has_z, opts.has_bias, True, True,
             opts.has_dh_last)
    (u_ref, dt_ref, a2_ref, b_ref, c_ref, d_ref, z_ref, bias_ref, ck_ref, dy_ref, dhl_ref), outs = (
        split_refs(refs, flags))
    oflags = (True, True, opts.has_z, True, True, True, opts.has_D, opts.has_bias, True,
              True)
    (du_ref, ddt_ref, dz_ref, db_ref, dc_ref, da_ref, dd_ref, dbias_ref, dh0_ref, sub_ref), _ = (
        split_refs(outs, oflags))
    p = _Program(d, opts.reverse)
    fast = cfg.fast_exp2 and not interpret
    unroll = cfg.bwd_unroll
    n_sub = d.interval // unroll
    a2 = p.tile(a2_ref)
    a_nat = a2 * (1.0 / LOG2E)
    dvec = p.vec(d_ref) if d_ref is not None else None
    bias = p.vec(bias_ref) if bias_ref is not None else None
    local_blk = p.blk % d.blocks_per_group
    slot = p.bi * (d.groups * d.blocks_per_group) + p.blk  # this program's scratch slot
    zeros_tile = jnp.zeros((d.state_pad, d.block_e), jnp.float32)
    zeros_row = jnp.zeros((d.block_e,), jnp.float32)
    barrier = (lambda: None) if interpret else plgpu.debug_barrier

    def load(q, with_grads=True):  # per-channel rows of sub-chunk q: (u, raw delta, dy, z)
        rows = []
        for i in range(unroll):
            t, valid = p.time(q * unroll + i)
            rows.append((p.row(u_ref, t, valid), p.row(dt_ref, t, valid),
                         p.row(dy_ref, t, valid) if with_grads else None,
                         p.row(z_ref, t, valid) if with_grads and z_ref is not None else None))
        return rows

    def sub_forward(j, h, rows, k):  # pass 1: the state at every sub-chunk start of interval k
        q = k * n_sub + j
        times = [p.time(q * unroll + i) for i in range(unroll)]
        bvs = [p.state_row(b_ref, t, v) for t, v in times]
        plgpu.store(p.scratch_ref(sub_ref, slot, j), h)
        for (_, valid), (u, dt_raw, _, _), bv in zip(times, rows, bvs, strict=True):
            dt, _ = step_size(dt_raw, bias, opts, p.e_ok & valid)
            h, _ = _advance(h, dt, u, bv, a2, fast)
        return h

    def sub_backward(q, j, carry, rows):  # pass 2: one sub-chunk, its steps in reverse
        g_next, da, dd, dbias = carry
        times = [p.time(q * unroll + i) for i in range(unroll)]
        bcs = [(p.state_row(b_ref, t, v), p.state_row(c_ref, t, v)) for t, v in times]
        h = (plgpu.load(p.scratch_ref(sub_ref, slot, j)) if n_sub > 1
             else p.tile(ck_ref, p.bi, q))
        hs, steps = [h], []
        for (_, valid), (u, dt_raw, _, _), (bv, _) in zip(times, rows, bcs, strict=True):
            dt, slope = step_size(dt_raw, bias, opts, p.e_ok & valid)
            h, a = _advance(hs[-1], dt, u, bv, a2, fast)
            hs.append(h)
            steps.append((dt, slope, a if cfg.keep_decay else None))
        for i in reversed(range(unroll)):
            (t, valid), (u, _, dy, z), (bv, cv) = times[i], rows[i], bcs[i]
            dt, slope, a = steps[i]
            h, h_prev = hs[i + 1], hs[i]
            if z is not None:
                sz = sigmoid(z)
                y_core = jnp.sum(h * cv[:, None], axis=0)
                if dvec is not None:
                    y_core = y_core + dvec * u
                p.put_row(dz_ref, t, valid, dy * y_core * sz * (1.0 + z * (1.0 - sz)))
                dy = dy * z * sz
            g = g_next + cv[:, None] * dy[None, :]
            if a is None:
                a = _exp2(dt[None, :] * a2, fast)
            ah = a * h_prev  # = h - dt u B
            g_next = a * g
            da = da + g * ah * dt[None, :]
            s1 = jnp.sum(g * bv[:, None], axis=0)
            s2 = jnp.sum(g * a_nat * ah, axis=0)
            du = dt * s1
            if dvec is not None:
                du = du + dvec * dy
                dd = dd + dy * u
            ddt = u * s1 + s2
            if slope is not None:
                ddt = ddt * slope
            p.put_row(du_ref, t, valid, du)
            p.put_row(ddt_ref, t, valid, ddt)
            if dbias_ref is not None:
                dbias = dbias + jnp.where(p.e_ok & valid, ddt, 0.0)
            db = jnp.sum(g * (dt * u)[None, :], axis=1)
            dc = jnp.sum(h * dy[None, :], axis=1)
            dst = (p.bi, t, p.group, local_blk, p.rows)
            plgpu.store(db_ref.at[dst], db, mask=p.n_ok & valid)
            plgpu.store(dc_ref.at[dst], dc, mask=p.n_ok & valid)
        return g_next, da, dd, dbias

    def interval(kr, carry):
        acc, rows = carry  # rows: the prefetched rows of the next sub-chunk to walk back
        k = d.n_intervals - 1 - kr
        if n_sub > 1:
            load_fwd = lambda j: load(k * n_sub + j, with_grads=False)  # noqa: E731
            _row_loop(0, n_sub, load_fwd, functools.partial(sub_forward, k=k),
                      p.tile(ck_ref, p.bi, k), load_fwd(0) if cfg.prefetch else None,
                      cfg.prefetch)
            barrier()  # the scratch written above is read back below, maybe by other threads

        def walk(jr, carry):
            acc, rows = carry
            j = n_sub - 1 - jr
            q = k * n_sub + j
            if cfg.prefetch:
                upcoming = load(q - 1)
                return sub_backward(q, j, acc, rows), upcoming
            return sub_backward(q, j, acc, load(q)), rows

        acc, rows = jax.lax.fori_loop(0, n_sub, walk, (acc, rows))
        if n_sub > 1:
            barrier()  # before the next interval overwrites the scratch
        return acc, rows

    g0 = p.tile(dhl_ref, p.bi) if dhl_ref is not None else zeros_tile
    first_rows = load(d.n_intervals * n_sub - 1) if cfg.prefetch else None
    (g, da, dd, dbias), _ = jax.lax.fori_loop(
        0, d.n_intervals, interval, ((g0, zeros_tile, zeros_row, zeros_row), first_rows))
    p.put_tile(dh0_ref, g, p.bi)
    p.put_tile(da_ref, da, p.bi)
    if dd_ref is not None:
        p.put_vec(dd_ref, dd, p.bi)
    if dbias_ref is not None:
        p.put_vec(dbias_ref, dbias, p.bi)


def backward(opts: Options, args: Normalised, ck, dy, dh_last) -> Grads:
    """Gradients w.r.t. every normalised argument (float32; the glue casts them)."""
    cfg: TritonConfig = opts.backend_config
    d = _dims(args, cfg.bwd_block_e, cfg)
    b, length, e = args.u.shape
    n, g = d.state, d.groups
    n_blocks = g * d.blocks_per_group
    a2t = (args.A * LOG2E).T
    dhl_t = None if dh_last is None else jnp.swapaxes(dh_last.astype(jnp.float32), 1, 2)
    ins = [x for x in (args.u, args.delta, a2t, args.B, args.C, args.D, args.z,
                       args.delta_bias, ck, dy, dhl_t) if x is not None]
    f32 = jnp.float32
    n_sub = d.interval // cfg.bwd_unroll
    sds = jax.ShapeDtypeStruct
    out_shape = [sds((b, length, e), args.u.dtype), sds((b, length, e), args.delta.dtype)]
    if args.z is not None:
        out_shape.append(sds((b, length, e), args.z.dtype))
    out_shape += [sds((b, length, g, d.blocks_per_group, n), f32)] * 2
    out_shape.append(sds((b, n, e), f32))
    if args.D is not None:
        out_shape.append(sds((b, e), f32))
    if args.delta_bias is not None:
        out_shape.append(sds((b, e), f32))
    out_shape.append(sds((b, n, e), f32))
    out_shape.append(sds((b * n_blocks if n_sub > 1 else 1, n_sub, d.state_pad, d.block_e),
                         f32))
    outs = list(_call(_bwd_kernel, d, opts, tuple(out_shape), cfg.bwd_warps,
                      "selective_scan_bwd")(*ins))
    du, ddelta = outs.pop(0), outs.pop(0)
    dz = outs.pop(0) if args.z is not None else None
    db_part, dc_part, da_part = outs.pop(0), outs.pop(0), outs.pop(0)
    dD = outs.pop(0).sum(0) if args.D is not None else None
    dbias = outs.pop(0).sum(0) if args.delta_bias is not None else None
    dh0_t = outs.pop(0)
    return Grads(
        u=du, delta=ddelta, A=da_part.sum(0).T, B=db_part.sum(3), C=dc_part.sum(3), D=dD,
        z=dz, delta_bias=dbias, h0=None if args.h0 is None else jnp.swapaxes(dh0_t, 1, 2))


def unsupported_reason(batch: int, length: int, channels: int, state: int,
                       groups: int) -> str | None:
    """None when the compiled Triton kernels handle this shape, else why not."""
    if state > MAX_STATE:
        return f"state size N={state} is above {MAX_STATE} (the state tile would spill)"
    blocks = groups * pl.cdiv(channels // groups, min(TritonConfig().block_e,
                                                      TritonConfig().bwd_block_e))
    if batch > GRID_Y_MAX and blocks > GRID_Y_MAX:
        return (f"batch={batch} and {blocks} channel blocks both exceed the CUDA grid's y "
                f"limit {GRID_Y_MAX}")
    del length
    return None


def default_config() -> TritonConfig:
    return TritonConfig()

