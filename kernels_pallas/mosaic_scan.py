"""Selective scan for TPUs: Pallas kernels lowered through Mosaic, forward and backward.

Grid (batch, group, channel blocks, time blocks), the time axis last and "arbitrary": the state
of a channel block is carried across time blocks in a VMEM scratch buffer. Channels sit on
the 128 lanes and the state index N on sublanes, so the state is an (N, block_e) tile; B and
C are handed over transposed, (N, L) per batch row and group, so a step's B_t is a lane
column of the (N, block_t) block (picked with a lane mask and a lane reduction, which works
for a dynamic step index). Inside a time block the steps run in a `fori_loop`.

Forward: writes y, the final state and the state at every time-block start (the backward's
checkpoints). Backward: visits the time blocks from last to first (index maps reversed),
recomputes the block's states into a VMEM buffer from its checkpoint, then walks them back
with the adjoint carried in VMEM. dB and dC are per-channel-block partial sums (lane
columns accumulated with masks), dA, dD and d delta_bias per-(batch, block) accumulators;
all summed in JAX.

Lengths that are not a multiple of the time block and widths that are not a multiple of the
channel block are handled by masking with the global index (reads past the end are
undefined on TPU, so every input is selected to 0 there, not multiplied).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas.scan_vjp import (
    Grads,
    Normalised,
    Options,
    sigmoid,
    split_refs,
    step_size,
    unreturned_final_state,
)

LANES = 128


class MosaicConfig(NamedTuple):
    """Static tuning of the Mosaic kernels."""

    block_t: int = 128  # steps per time block (a multiple of 128, or the whole length)
    block_e: int = 128  # channels per block (a multiple of 128, or the whole group width)


class _Dims(NamedTuple):
    batch: int
    length: int
    groups: int
    group_width: int
    state: int
    block_t: int
    block_e: int
    n_t: int
    n_e: int


def _dims(args: Normalised, cfg: MosaicConfig) -> _Dims:
    b, length, e = args.u.shape
    g, n = args.B.shape[2], args.A.shape[1]
    eg = e // g
    bt = length if length <= cfg.block_t else cfg.block_t
    be = cfg.block_e if eg % cfg.block_e == 0 else eg
    return _Dims(b, length, g, eg, n, bt, be, pl.cdiv(length, bt), pl.cdiv(eg, be))


def interpret_params():
    """Interpret-mode parameters for running the TPU kernels on a CPU."""
    return pltpu.InterpretParams()


def _to_groups(x, d: _Dims):
    """(b, L, E) -> (b, G, L, E/G); a free reshape when G == 1."""
    b, length, _ = x.shape
    x = x.reshape(b, length, d.groups, d.group_width)
    return jnp.swapaxes(x, 1, 2) if d.groups > 1 else x.reshape(b, 1, length, d.group_width)


def _from_groups(x, d: _Dims):
    b, _, length, eg = x.shape
    return jnp.swapaxes(x, 1, 2).reshape(b, length, d.groups * eg)


class _Block:
    """Index helpers of one grid point."""

    def __init__(self, d: _Dims, reverse: bool, backward: bool):
        self.d = d
        self.reverse = reverse
        c = pl.program_id(3)
        self.visit = c
        scan_block = d.n_t - 1 - c if backward else c  # position in scan order
        self.scan_block = scan_block
        self.t_block = d.n_t - 1 - scan_block if reverse else scan_block
        e_blk = pl.program_id(2)
        lane = jax.lax.broadcasted_iota(jnp.int32, (1, d.block_e), 1)
        self.e_ok = e_blk * d.block_e + lane < d.group_width  # (1, block_e)
        self.t_lane = jax.lax.broadcasted_iota(jnp.int32, (1, d.block_t), 1)

    def row_of(self, i):
        """Scan step i of this block -> (row in the block, in range)."""
        j = self.d.block_t - 1 - i if self.reverse else i
        valid = self.t_block * self.d.block_t + j < self.d.length
        return j, valid

    def row(self, ref, j, valid):
        x = ref[0, 0, pl.ds(j, 1), :].astype(jnp.float32)
        return jnp.where(valid & self.e_ok, x, 0.0)

    def column(self, block, j, valid):
        """Lane column j of an (N, block_t) block, as (N, 1); 0 where out of range."""
        col = jnp.sum(jnp.where(self.t_lane == j, block, 0.0), axis=1, keepdims=True)
        return jnp.where(valid, col, 0.0)


def _fwd_kernel(*refs, d: _Dims, opts: Options):
    flags = (True, True, True, True, True, opts.has_D, opts.has_z, opts.has_bias, opts.has_h0)
    (u_ref, dt_ref, a_ref, b_ref, c_ref, d_ref, z_ref, bias_ref, h0_ref), rest = split_refs(
        refs, flags)
    *outs, h_scr = rest
    # The final state only when it is returned; no checkpoints for a forward alone.
    (y_ref, hlast_ref), ck_ref = split_refs(outs, (True, opts.has_dh_last))
    ck_ref = ck_ref[0] if ck_ref else None
    blk = _Block(d, opts.reverse, backward=False)

    @pl.when(blk.visit == 0)
    def _():
        h_scr[...] = (h0_ref[0, 0] if h0_ref is not None
                      else jnp.zeros((d.state, d.block_e), jnp.float32))

    if ck_ref is not None:
        ck_ref[0, 0, 0] = h_scr[...]
    a = a_ref[0]  # (N, block_e)
    bias = bias_ref[0] if bias_ref is not None else None  # (1, block_e)
    dvec = d_ref[0] if d_ref is not None else None
    bt = b_ref[0, 0].astype(jnp.float32)  # (N, block_t)
    ct = c_ref[0, 0].astype(jnp.float32)

    def step(i, h):
        j, valid = blk.row_of(i)
        u = blk.row(u_ref, j, valid)
        dt, _ = step_size(blk.row(dt_ref, j, valid), bias, opts, valid & blk.e_ok)
        h = jnp.exp(dt * a) * h + (dt * u) * blk.column(bt, j, valid)
        y = jnp.sum(h * blk.column(ct, j, valid), axis=0, keepdims=True)
        if dvec is not None:
            y = y + dvec * u
        if z_ref is not None:
            z = blk.row(z_ref, j, valid)
            y = y * (z * sigmoid(z))
        y_ref[0, 0, pl.ds(j, 1), :] = y.astype(y_ref.dtype)
        return h

    h = jax.lax.fori_loop(0, d.block_t, step, h_scr[...])
    h_scr[...] = h

    if hlast_ref is not None:
        @pl.when(blk.visit == d.n_t - 1)
        def _():
            hlast_ref[0, 0] = h


def _specs(d: _Dims, opts: Options, backward: bool):
    """Index maps: row blocks (b, G, L, E/G), B/C blocks (b, G, N, L), per-channel blocks."""

    def t_block(c):
        scan_block = d.n_t - 1 - c if backward else c
        return d.n_t - 1 - scan_block if opts.reverse else scan_block

    rows = pl.BlockSpec((1, 1, d.block_t, d.block_e), lambda b, g, e, c: (b, g, t_block(c), e))
    cols = pl.BlockSpec((1, 1, d.state, d.block_t), lambda b, g, e, c: (b, g, 0, t_block(c)))
    chan = pl.BlockSpec((1, d.state, d.block_e), lambda b, g, e, c: (g, 0, e))
    vec = pl.BlockSpec((1, 1, d.block_e), lambda b, g, e, c: (g, 0, e))
    state = pl.BlockSpec((1, 1, d.state, d.block_e), lambda b, g, e, c: (b, g, 0, e))
    ck = pl.BlockSpec((1, 1, 1, d.state, d.block_e),
                      lambda b, g, e, c: (b, g, d.n_t - 1 - c if backward else c, 0, e))
    return rows, cols, chan, vec, state, ck


def _compiler_params():
    return pltpu.CompilerParams(
        dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))


def _prepare(args: Normalised, d: _Dims):
    """Kernel layouts: rows (b, G, L, E/G), B/C (b, G, N, L), A (G, N, E/G), vectors
    (G, 1, E/G), states (b, G, N, E/G)."""
    g, eg, n = d.groups, d.group_width, d.state
    b = d.batch
    bt = jnp.transpose(args.B, (0, 2, 3, 1))
    ct = jnp.transpose(args.C, (0, 2, 3, 1))
    a = jnp.swapaxes(args.A.reshape(g, eg, n), 1, 2)
    vec = lambda v: None if v is None else v.reshape(g, 1, eg)  # noqa: E731
    h0 = None if args.h0 is None else jnp.transpose(args.h0.reshape(b, g, eg, n), (0, 1, 3, 2))
    z = None if args.z is None else _to_groups(args.z, d)
    return (_to_groups(args.u, d), _to_groups(args.delta, d), a, bt, ct, vec(args.D), z,
            vec(args.delta_bias), h0)


def _state_out(x, d: _Dims):
    """(b, G, N, E/G) -> (b, E, N)."""
    return jnp.transpose(x, (0, 1, 3, 2)).reshape(d.batch, d.groups * d.group_width, d.state)


def forward(opts: Options, args: Normalised, residual: bool = True):
    """Returns y (b, L, E), the final state (b, E, N) float32 (zeros, not written, unless
    `opts.has_dh_last`) and the checkpoints (None without `residual`: a forward alone writes
    none)."""
    cfg: MosaicConfig = opts.backend_config
    d = _dims(args, cfg)
    rows, cols, chan, vec, state, ck = _specs(d, opts, backward=False)
    ins = _prepare(args, d)
    specs = (rows, rows, chan, cols, cols, vec, rows, vec, state)
    in_specs = [s for s, x in zip(specs, ins, strict=True) if x is not None]
    ins = [x for x in ins if x is not None]
    b, g, eg, n = d.batch, d.groups, d.group_width, d.state
    f32 = jnp.float32
    out_shape = (jax.ShapeDtypeStruct((b, g, d.length, eg), args.u.dtype),)
    out_specs = (rows,)
    if opts.has_dh_last:
        out_shape += (jax.ShapeDtypeStruct((b, g, n, eg), f32),)
        out_specs += (state,)
    if residual:
        out_shape += (jax.ShapeDtypeStruct((b, g, d.n_t, n, eg), f32),)
        out_specs += (ck,)
    y, *outs = pl.pallas_call(
        functools.partial(_fwd_kernel, d=d, opts=opts), out_shape=out_shape,
        grid=(b, g, d.n_e, d.n_t), in_specs=in_specs, out_specs=out_specs,
        scratch_shapes=[pltpu.VMEM((n, d.block_e), f32)],
        compiler_params=_compiler_params(), interpret=opts.interpret,
        name="selective_scan_fwd",
    )(*ins)
    h_last = (_state_out(outs.pop(0), d) if opts.has_dh_last
              else unreturned_final_state(b, g * eg, n))
    return _from_groups(y, d), h_last, outs[0] if outs else None


def _bwd_kernel(*refs, d: _Dims, opts: Options):
    flags = (True, True, True, True, True, opts.has_D, opts.has_z, opts.has_bias, True, True,
             opts.has_dh_last)
    (u_ref, dt_ref, a_ref, b_ref, c_ref, d_ref, z_ref, bias_ref, ck_ref, dy_ref, dhl_ref), rest = (
        split_refs(refs, flags))
    oflags = (True, True, opts.has_z, True, True, True, opts.has_D, opts.has_bias, True)
    (du_ref, ddt_ref, dz_ref, db_ref, dc_ref, da_ref, dd_ref, dbias_ref, dh0_ref), scratch = (
        split_refs(rest, oflags))
    g_scr, da_scr, dd_scr, dbias_scr, hs_scr = scratch
    blk = _Block(d, opts.reverse, backward=True)
    n, bt_len = d.state, d.block_t

    @pl.when(blk.visit == 0)
    def _():
        g_scr[...] = (dhl_ref[0, 0] if dhl_ref is not None
                      else jnp.zeros((n, d.block_e), jnp.float32))
        da_scr[...] = jnp.zeros_like(da_scr)
        dd_scr[...] = jnp.zeros_like(dd_scr)
        dbias_scr[...] = jnp.zeros_like(dbias_scr)

    a = a_ref[0]
    bias = bias_ref[0] if bias_ref is not None else None
    dvec = d_ref[0] if d_ref is not None else None
    bt = b_ref[0, 0].astype(jnp.float32)
    ct = c_ref[0, 0].astype(jnp.float32)

    def inputs(i):
        j, valid = blk.row_of(i)
        u = blk.row(u_ref, j, valid)
        dt, slope = step_size(blk.row(dt_ref, j, valid), bias, opts, valid & blk.e_ok)
        return j, valid, u, dt, slope

    def recompute(i, h):  # the states of this block, from its checkpoint
        j, valid, u, dt, _ = inputs(i)
        h = jnp.exp(dt * a) * h + (dt * u) * blk.column(bt, j, valid)
        hs_scr[i + 1] = h
        return h

    hs_scr[0] = ck_ref[0, 0, 0]
    jax.lax.fori_loop(0, bt_len, recompute, ck_ref[0, 0, 0])

    def walk(ir, carry):
        g_next, db_acc, dc_acc = carry
        i = bt_len - 1 - ir
        j, valid, u, dt, slope = inputs(i)
        bcol, ccol = blk.column(bt, j, valid), blk.column(ct, j, valid)
        h, h_prev = hs_scr[i + 1], hs_scr[i]
        dy = blk.row(dy_ref, j, valid)
        if z_ref is not None:
            z = blk.row(z_ref, j, valid)
            sz = sigmoid(z)
            y_core = jnp.sum(h * ccol, axis=0, keepdims=True)
            if dvec is not None:
                y_core = y_core + dvec * u
            dz_ref[0, 0, pl.ds(j, 1), :] = (dy * y_core * sz * (1.0 + z * (1.0 - sz))).astype(
                dz_ref.dtype)
            dy = dy * z * sz
        g = g_next + ccol * dy
        decay = jnp.exp(dt * a)
        ah = decay * h_prev
        da_scr[...] += g * ah * dt
        s1 = jnp.sum(g * bcol, axis=0, keepdims=True)
        s2 = jnp.sum(g * a * ah, axis=0, keepdims=True)
        du = dt * s1
        if dvec is not None:
            du = du + dvec * dy
            dd_scr[...] += dy * u
        ddt = u * s1 + s2
        if slope is not None:
            ddt = ddt * slope
        du_ref[0, 0, pl.ds(j, 1), :] = du.astype(du_ref.dtype)
        ddt_ref[0, 0, pl.ds(j, 1), :] = ddt.astype(ddt_ref.dtype)
        if dbias_ref is not None:
            dbias_scr[...] += jnp.where(valid & blk.e_ok, ddt, 0.0)
        at_j = blk.t_lane == j
        db_acc = jnp.where(at_j, jnp.sum(g * (dt * u), axis=1, keepdims=True), db_acc)
        dc_acc = jnp.where(at_j, jnp.sum(h * dy, axis=1, keepdims=True), dc_acc)
        return decay * g, db_acc, dc_acc

    zeros_cols = jnp.zeros((n, bt_len), jnp.float32)
    g, db_acc, dc_acc = jax.lax.fori_loop(0, bt_len, walk, (g_scr[...], zeros_cols, zeros_cols))
    g_scr[...] = g
    db_ref[0, 0, 0] = db_acc
    dc_ref[0, 0, 0] = dc_acc

    @pl.when(blk.visit == d.n_t - 1)
    def _():
        dh0_ref[0, 0] = g
        da_ref[0, 0] = da_scr[...]
        if dd_ref is not None:
            dd_ref[0, 0] = dd_scr[...]
        if dbias_ref is not None:
            dbias_ref[0, 0] = dbias_scr[...]


def backward(opts: Options, args: Normalised, checkpoints, dy, dh_last) -> Grads:
    """Gradients w.r.t. every normalised argument (float32; the glue casts them)."""
    cfg: MosaicConfig = opts.backend_config
    d = _dims(args, cfg)
    rows, cols, chan, vec, state, ck = _specs(d, opts, backward=True)
    b, g, eg, n = d.batch, d.groups, d.group_width, d.state
    u, delta, a, bt, ct, dvec, z, bias, _ = _prepare(args, d)
    dhl = None if dh_last is None else jnp.transpose(
        dh_last.astype(jnp.float32).reshape(b, g, eg, n), (0, 1, 3, 2))
    ins = (u, delta, a, bt, ct, dvec, z, bias, checkpoints, _to_groups(dy, d), dhl)
    specs = (rows, rows, chan, cols, cols, vec, rows, vec, ck, rows, state)
    in_specs = [s for s, x in zip(specs, ins, strict=True) if x is not None]
    ins = [x for x in ins if x is not None]
    f32 = jnp.float32
    sds = jax.ShapeDtypeStruct
    partial_cols = pl.BlockSpec((1, 1, 1, n, d.block_t),
                                lambda bi, gi, e, c: (bi, gi, e, 0, specs_t(c)))
    n_t = d.n_t

    def specs_t(c):
        scan_block = n_t - 1 - c
        return n_t - 1 - scan_block if opts.reverse else scan_block

    per_block = pl.BlockSpec((1, 1, 1, d.block_e), lambda bi, gi, e, c: (bi, gi, 0, e))
    out_shape = [sds((b, g, d.length, eg), args.u.dtype), sds((b, g, d.length, eg),
                                                               args.delta.dtype)]
    out_specs = [rows, rows]
    if z is not None:
        out_shape.append(sds((b, g, d.length, eg), args.z.dtype))
        out_specs.append(rows)
    out_shape += [sds((b, g, d.n_e, n, d.length), f32)] * 2
    out_specs += [partial_cols] * 2
    out_shape.append(sds((b, g, n, eg), f32))
    out_specs.append(state)
    for present in (dvec is not None, bias is not None):
        if present:
            out_shape.append(sds((b, g, 1, eg), f32))
            out_specs.append(per_block)
    out_shape.append(sds((b, g, n, eg), f32))
    out_specs.append(state)
    scratch = [pltpu.VMEM((n, d.block_e), f32), pltpu.VMEM((n, d.block_e), f32),
               pltpu.VMEM((1, d.block_e), f32), pltpu.VMEM((1, d.block_e), f32),
               pltpu.VMEM((d.block_t + 1, n, d.block_e), f32)]
    outs = list(pl.pallas_call(
        functools.partial(_bwd_kernel, d=d, opts=opts), out_shape=tuple(out_shape),
        grid=(b, g, d.n_e, d.n_t), in_specs=in_specs, out_specs=tuple(out_specs),
        scratch_shapes=scratch, compiler_params=_compiler_params(), interpret=opts.interpret,
        name="selective_scan_bwd",
    )(*ins))
    du, ddelta = _from_groups(outs.pop(0), d), _from_groups(outs.pop(0), d)
    dz = _from_groups(outs.pop(0), d) if z is not None else None
    db = jnp.transpose(outs.pop(0).sum(2), (0, 3, 1, 2))  # (b, L, G, N)
    dc = jnp.transpose(outs.pop(0).sum(2), (0, 3, 1, 2))
    da = jnp.swapaxes(outs.pop(0).sum(0), 1, 2).reshape(g * eg, n)
    dD = outs.pop(0).sum(0).reshape(-1) if dvec is not None else None
    dbias = outs.pop(0).sum(0).reshape(-1) if bias is not None else None
    dh0 = _state_out(outs.pop(0), d) if args.h0 is not None else None
    return Grads(u=du, delta=ddelta, A=da, B=db, C=dc, D=dD, z=dz, delta_bias=dbias, h0=dh0)


def unsupported_reason(batch: int, length: int, channels: int, state: int,
                       groups: int) -> str | None:
    """None when the compiled Mosaic kernels handle this shape, else why not."""
    eg = channels // max(groups, 1)
    if eg % LANES and eg > 4 * LANES:
        return (f"group width E/G={eg} is neither a multiple of {LANES} nor small enough "
                "for one block")
    # The backward keeps block_t + 1 states of (N, block_e) float32 in VMEM.
    if (MosaicConfig().block_t + 1) * state * min(eg, MosaicConfig().block_e) * 4 > 8 * 2**20:
        return f"state size N={state} needs more VMEM than the backward's budget"
    del batch, length
    return None
