"""Selective scans along the walks of a 2-D map for TPUs: Pallas kernels lowered through
Mosaic, forward and backward.

Grid (batch, walk slot, channel blocks), every point independent. A grid point owns
`block_e` channels of one walk of one sample and holds the whole map of those channels in
VMEM, in the map's own layout: u (and z) (L, block_e) of the shared (b, L, E) map, its walk's
delta (L, block_e) out of the (K, b, L, E) array, and B and C of every walk (L, K*N) (a free
reshape of (b, L, K, N)). The walk code (and the sum's weight) of the point come from SMEM.
It walks the L steps, computing each step's map position by index arithmetic
(`walks.walk_position`), and reads and writes rows at that position (a dynamic sublane
offset, as the 1-D kernel's rows). Its walk's B_t and C_t are picked out of the (1, K*N) row
as an (N, 1) column with a lane mask and a lane reduction; dB and dC rows go back through
the same kind of mask (an (N, N) diagonal), so no array is transposed.

Forward: writes each walk's output (K, b, L, E) at its positions (with `shift` at the next
step's), and the state every `chunk` steps (the backward's checkpoints; `chunk` is the largest
divisor of L up to `MosaicConfig.block_t`, so every chunk is whole and no step is masked).
Backward: visits the chunks from last to first, recomputes a chunk's states into a VMEM
buffer from its checkpoint and walks them back with the adjoint (the 1-D kernel's
recurrences). du and dz per walk, and the dB and dC rows per (walk, channel block), are
summed in JAX, as are the per-point accumulators of dA, dD, d delta_bias and the weights.

A TPU block's last dimension must be a multiple of 128 lanes or the whole array dimension:
the channel block is 128 channels when E is a multiple of 128, else all E (ViM2-T's first
stage: 192). The whole map of a block must fit VMEM (`vmem_bytes`, `unsupported_reason`).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas.mosaic_scan import LANES, MosaicConfig
from kernels_pallas.scan_vjp import (
    Grads,
    Normalised,
    Options,
    Walks,
    reduce_walks,
    sigmoid,
    split_refs,
    step_size,
    sum_over_walks,
    unreturned_final_state,
)
from kernels_pallas.walks import walk_position

# VMEM a grid point may ask for (the compiler's default scoped limit is lower): 48 MiB fits
# every TPU generation's VMEM from v4 on (notes/vision_walks.md).
VMEM_BUDGET = 48 * 2**20


class _Dims(NamedTuple):
    batch: int
    length: int  # H * W
    walks: int  # K
    width: int  # E, channels of the map (and of each walk)
    state: int  # N
    block_e: int
    n_e: int  # channel blocks of one walk
    chunk: int  # steps between checkpoints
    n_chunks: int


def checkpoint_chunk(length: int, block_t: int) -> int:
    """The largest divisor of `length` up to `block_t`: whole chunks, no masked steps."""
    return max(c for c in range(1, min(length, block_t) + 1) if length % c == 0)


def _dims(args: Normalised, cfg: MosaicConfig) -> _Dims:
    b, length, e = args.u.shape
    k, n = args.B.shape[2], args.A.shape[1]
    be = cfg.block_e if e % cfg.block_e == 0 else e
    chunk = checkpoint_chunk(length, cfg.block_t)
    return _Dims(b, length, k, e, n, be, e // be, chunk, length // chunk)


def vmem_bytes(length: int, walks: int, state: int, block_e: int, block_t: int) -> int:
    """VMEM of one backward grid point (the larger kernel), inputs and outputs double
    buffered: ten (L, block_e) row blocks in float32 at most, the B/C rows and dB/dC rows
    padded to 128 lanes, the chunk's states and the checkpoints."""
    rows = 10 * length * block_e * 4
    bc = 4 * length * max(LANES, -(-walks * state // LANES) * LANES) * 4
    chunk = checkpoint_chunk(length, block_t)
    states = (chunk + 1 + length // chunk) * state * block_e * 4
    return 2 * (rows + bc) + states


class _Point:
    """Index helpers of one grid point: sample `bi`, walk slot `k`, channel block `e`."""

    def __init__(self, d: _Dims, walks: Walks, codes_ref, weights_ref):
        self.d, self.walks = d, walks
        self.bi, self.k, self.e = pl.program_id(0), pl.program_id(1), pl.program_id(2)
        self.code = codes_ref[self.bi if walks.per_sample else 0, self.k]
        self.weight = None if weights_ref is None else weights_ref[self.bi, self.k]
        n, kn = d.state, d.walks * d.state
        sub = jax.lax.broadcasted_iota(jnp.int32, (n, kn), 0)
        lane = jax.lax.broadcasted_iota(jnp.int32, (n, kn), 1)
        self.pick = lane == sub + self.k * n  # (N, K*N): this walk's N of a B/C row
        self.diagonal = (jax.lax.broadcasted_iota(jnp.int32, (n, n), 0)
                         == jax.lax.broadcasted_iota(jnp.int32, (n, n), 1))

    def position(self, s):
        return walk_position(self.code, s, self.walks.height, self.walks.width)

    def out_position(self, s):
        """Where step s's output belongs, and whether it has a place (shift: the next step's;
        the last step's output has none)."""
        if not self.walks.shift:
            return self.position(s), None
        return self.position(jnp.minimum(s + 1, self.d.length - 1)), s + 1 < self.d.length

    @staticmethod
    def _at(ref, pos):
        """Index of the row at map position pos of a block (1, ..., L, width)."""
        return (*(0,) * (len(ref.shape) - 2), pl.ds(pos, 1), slice(None))

    @staticmethod
    def row(ref, pos):
        """(1, block_e) float32 row at map position pos of a (1, L, block_e) or
        (1, 1, L, block_e) block."""
        return ref[_Point._at(ref, pos)].astype(jnp.float32)

    @staticmethod
    def put(ref, pos, x, when=None):
        def store():
            ref[_Point._at(ref, pos)] = x.astype(ref.dtype)

        if when is None:
            store()
        else:
            pl.when(when)(store)

    def column(self, ref, pos):
        """This walk's (N, 1) column of a (1, L, K*N) B or C block at position pos."""
        row = ref[0, pl.ds(pos, 1), :].astype(jnp.float32)
        return jnp.sum(jnp.where(self.pick, row, 0.0), axis=1, keepdims=True)

    def transposed(self, col):
        """(N, 1) -> (1, N) through the diagonal."""
        return jnp.sum(jnp.where(self.diagonal, col, 0.0), axis=0, keepdims=True)


def _fwd_kernel(*refs, d: _Dims, opts: Options):
    walks = opts.walks
    flags = (True, True, True, True, True, True, opts.has_D, opts.has_z, opts.has_bias)
    (codes_ref, u_ref, dt_ref, a_ref, b_ref, c_ref, d_ref, z_ref, bias_ref), outs = split_refs(
        refs, flags)
    y_ref, *ck_ref = outs  # no checkpoints for a forward alone
    ck_ref = ck_ref[0] if ck_ref else None
    pt = _Point(d, walks, codes_ref, None)
    a = a_ref[0]  # (N, block_e)
    bias = bias_ref[0] if bias_ref is not None else None  # (1, block_e)
    dvec = d_ref[0] if d_ref is not None else None
    if walks.shift:  # no step's output lands on the walk's first position
        pt.put(y_ref, pt.position(0), jnp.zeros((1, d.block_e), jnp.float32))

    def step(s, h):
        pos = pt.position(s)
        u = pt.row(u_ref, pos)
        dt, _ = step_size(pt.row(dt_ref, pos), bias, opts, True)
        h = jnp.exp(dt * a) * h + (dt * u) * pt.column(b_ref, pos)
        y = jnp.sum(h * pt.column(c_ref, pos), axis=0, keepdims=True)
        if dvec is not None:
            y = y + dvec * u
        if z_ref is not None:
            z = pt.row(z_ref, pos)
            y = y * (z * sigmoid(z))
        out, has_out = pt.out_position(s)
        pt.put(y_ref, out, y, has_out)
        return h

    def chunk(c, h):
        if ck_ref is not None:
            ck_ref[0, 0, c] = h
        return jax.lax.fori_loop(c * d.chunk, (c + 1) * d.chunk, step, h)

    jax.lax.fori_loop(0, d.n_chunks, chunk, jnp.zeros((d.state, d.block_e), jnp.float32))


class _Specs(NamedTuple):
    table: pl.BlockSpec  # whole small arrays in SMEM (walk codes, weights)
    shared: pl.BlockSpec  # (b, L, E) map rows: u, z (and dy when summed)
    walk: pl.BlockSpec  # (K, b, L, E) per-walk rows: delta, y, du, ddelta, dz
    bc: pl.BlockSpec  # (b, L, K*N): B and C of every walk
    chan: pl.BlockSpec  # (K, N, E): A
    vec: pl.BlockSpec  # (K, 1, E): D, delta_bias
    point_rows: pl.BlockSpec  # (b, K*n_e, L, N): dB and dC rows of each point
    point_tile: pl.BlockSpec  # (b, K*n_e, N, block_e): dA
    point_vec: pl.BlockSpec  # (b, K*n_e, 1, block_e): dD, d delta_bias, d weights
    ck: pl.BlockSpec  # (b, K*n_e, n_chunks, N, block_e)


def _specs(d: _Dims) -> _Specs:
    length, be, n, ne = d.length, d.block_e, d.state, d.n_e
    point = lambda b, k, e: (b, k * ne + e)  # noqa: E731
    return _Specs(
        table=pl.BlockSpec(memory_space=pltpu.SMEM),
        shared=pl.BlockSpec((1, length, be), lambda b, k, e: (b, 0, e)),
        walk=pl.BlockSpec((1, 1, length, be), lambda b, k, e: (k, b, 0, e)),
        bc=pl.BlockSpec((1, length, d.walks * n), lambda b, k, e: (b, 0, 0)),
        chan=pl.BlockSpec((1, n, be), lambda b, k, e: (k, 0, e)),
        vec=pl.BlockSpec((1, 1, be), lambda b, k, e: (k, 0, e)),
        point_rows=pl.BlockSpec((1, 1, length, n), lambda b, k, e: (*point(b, k, e), 0, 0)),
        point_tile=pl.BlockSpec((1, 1, n, be), lambda b, k, e: (*point(b, k, e), 0, 0)),
        point_vec=pl.BlockSpec((1, 1, 1, be), lambda b, k, e: (*point(b, k, e), 0, 0)),
        ck=pl.BlockSpec((1, 1, d.n_chunks, n, be), lambda b, k, e: (*point(b, k, e), 0, 0, 0)),
    )


def _compiler_params(d: _Dims, cfg: MosaicConfig):
    need = vmem_bytes(d.length, d.walks, d.state, d.block_e, cfg.block_t)
    return pltpu.CompilerParams(
        dimension_semantics=("parallel", "parallel", "parallel"),
        vmem_limit_bytes=min(max(need + 4 * 2**20, 32 * 2**20), VMEM_BUDGET + 16 * 2**20))


def _prepare(args: Normalised, d: _Dims):
    """The kernels' inputs: A as (K, N, E), D and delta_bias as (K, 1, E), B and C as
    (b, L, K*N) (free reshapes but A's small transpose)."""
    k, e, n, b, length = d.walks, d.width, d.state, d.batch, d.length
    a = jnp.swapaxes(args.A.reshape(k, e, n), 1, 2)
    vec = lambda v: None if v is None else v.reshape(k, 1, e)  # noqa: E731
    bc = lambda x: x.reshape(b, length, k * n)  # noqa: E731
    return a, bc(args.B), bc(args.C), vec(args.D), vec(args.delta_bias)


def forward(opts: Options, args: Normalised, residual: bool = True):
    """Returns y (summed over walks, or per walk: `scan_vjp.reduce_walks`), zeros for the
    final state (walks return none) and the checkpoints (None without `residual`)."""
    cfg: MosaicConfig = opts.backend_config
    d = _dims(args, cfg)
    sp = _specs(d)
    a, bm, cm, dvec, bias = _prepare(args, d)
    ins = (args.walk_codes, args.u, args.delta, a, bm, cm, dvec, args.z, bias)
    specs = (sp.table, sp.shared, sp.walk, sp.chan, sp.bc, sp.bc, sp.vec, sp.shared, sp.vec)
    in_specs = [s for s, x in zip(specs, ins, strict=True) if x is not None]
    b, k, e, n = d.batch, d.walks, d.width, d.state
    out_shape = (jax.ShapeDtypeStruct(args.delta.shape, args.u.dtype),)
    out_specs = (sp.walk,)
    if residual:
        out_shape += (jax.ShapeDtypeStruct((b, k * d.n_e, d.n_chunks, n, d.block_e),
                                           jnp.float32),)
        out_specs += (sp.ck,)
    y, *ck = pl.pallas_call(
        functools.partial(_fwd_kernel, d=d, opts=opts), out_shape=out_shape,
        grid=(b, k, d.n_e), in_specs=in_specs, out_specs=out_specs,
        compiler_params=_compiler_params(d, cfg), interpret=opts.interpret,
        name="selective_scan_fwd_walks",
    )(*(x for x in ins if x is not None))
    h_last = unreturned_final_state(b, k * e, n)
    return reduce_walks(y, args, opts.walks), h_last, ck[0] if ck else None


def _bwd_kernel(*refs, d: _Dims, opts: Options):
    walks = opts.walks
    flags = (True, walks.weighted, True, True, True, True, True, opts.has_D, opts.has_z,
             opts.has_bias, True, True)
    (codes_ref, weights_ref, u_ref, dt_ref, a_ref, b_ref, c_ref, d_ref, z_ref, bias_ref,
     ck_ref, dy_ref), rest = split_refs(refs, flags)
    oflags = (True, True, opts.has_z, True, True, True, opts.has_D, opts.has_bias,
              walks.weighted)
    (du_ref, ddt_ref, dz_ref, db_ref, dc_ref, da_ref, dd_ref, dbias_ref, dw_ref), scratch = (
        split_refs(rest, oflags))
    (hs_scr,) = scratch
    pt = _Point(d, walks, codes_ref, weights_ref)
    a = a_ref[0]
    bias = bias_ref[0] if bias_ref is not None else None
    dvec = d_ref[0] if d_ref is not None else None

    def inputs(s):
        pos = pt.position(s)
        u = pt.row(u_ref, pos)
        dt, slope = step_size(pt.row(dt_ref, pos), bias, opts, True)
        return pos, u, dt, slope

    def recompute(i, h, c):  # the states of chunk c, from its checkpoint
        pos, u, dt, _ = inputs(c * d.chunk + i)
        h = jnp.exp(dt * a) * h + (dt * u) * pt.column(b_ref, pos)
        hs_scr[i + 1] = h
        return h

    def walk(ir, carry, c):
        g_next, da, dd, dbias, dw = carry
        i = d.chunk - 1 - ir
        s = c * d.chunk + i
        pos, u, dt, slope = inputs(s)
        bcol, ccol = pt.column(b_ref, pos), pt.column(c_ref, pos)
        h, h_prev = hs_scr[i + 1], hs_scr[i]
        out, has_out = pt.out_position(s)
        dy = pt.row(dy_ref, out)
        if has_out is not None:
            dy = jnp.where(has_out, dy, 0.0)
        dy_sum = dy
        if pt.weight is not None:
            dy = dy * pt.weight
        if z_ref is not None or dw_ref is not None:
            y_core = jnp.sum(h * ccol, axis=0, keepdims=True)
            if dvec is not None:
                y_core = y_core + dvec * u
        if z_ref is not None:
            z = pt.row(z_ref, pos)
            sz = sigmoid(z)
            pt.put(dz_ref, pos, dy * y_core * sz * (1.0 + z * (1.0 - sz)))
            dy = dy * z * sz
            if dw_ref is not None:
                dw = dw + dy_sum * y_core * z * sz
        elif dw_ref is not None:
            dw = dw + dy_sum * y_core
        g = g_next + ccol * dy
        decay = jnp.exp(dt * a)
        ah = decay * h_prev
        da = da + g * ah * dt
        s1 = jnp.sum(g * bcol, axis=0, keepdims=True)
        s2 = jnp.sum(g * a * ah, axis=0, keepdims=True)
        du = dt * s1
        if dvec is not None:
            du = du + dvec * dy
            dd = dd + dy * u
        ddt = u * s1 + s2
        if slope is not None:
            ddt = ddt * slope
        pt.put(du_ref, pos, du)
        pt.put(ddt_ref, pos, ddt)
        if dbias_ref is not None:
            dbias = dbias + ddt
        pt.put(db_ref, pos, pt.transposed(jnp.sum(g * (dt * u), axis=1, keepdims=True)))
        pt.put(dc_ref, pos, pt.transposed(jnp.sum(h * dy, axis=1, keepdims=True)))
        return decay * g, da, dd, dbias, dw

    def chunk(cr, carry):
        c = d.n_chunks - 1 - cr
        h0 = ck_ref[0, 0, c]
        hs_scr[0] = h0
        jax.lax.fori_loop(0, d.chunk, functools.partial(recompute, c=c), h0)
        return jax.lax.fori_loop(0, d.chunk, functools.partial(walk, c=c), carry)

    tile = jnp.zeros((d.state, d.block_e), jnp.float32)
    row = jnp.zeros((1, d.block_e), jnp.float32)
    _, da, dd, dbias, dw = jax.lax.fori_loop(0, d.n_chunks, chunk, (tile, tile, row, row, row))
    da_ref[0, 0] = da
    if dd_ref is not None:
        dd_ref[0, 0] = dd
    if dbias_ref is not None:
        dbias_ref[0, 0] = dbias
    if dw_ref is not None:
        dw_ref[0, 0] = dw


def backward(opts: Options, args: Normalised, checkpoints, dy, dh_last) -> Grads:
    """Gradients w.r.t. every normalised argument (float32; the glue casts them)."""
    del dh_last  # walks return no final state
    cfg: MosaicConfig = opts.backend_config
    walks = opts.walks
    d = _dims(args, cfg)
    sp = _specs(d)
    b, k, e, n, ne, length = d.batch, d.walks, d.width, d.state, d.n_e, d.length
    a, bm, cm, dvec, bias = _prepare(args, d)
    ins = (args.walk_codes, args.weights, args.u, args.delta, a, bm, cm, dvec, args.z, bias,
           checkpoints, dy)
    specs = (sp.table, sp.table, sp.shared, sp.walk, sp.chan, sp.bc, sp.bc, sp.vec, sp.shared,
             sp.vec, sp.ck, sp.shared if walks.summed else sp.walk)
    in_specs = [s for s, x in zip(specs, ins, strict=True) if x is not None]
    f32 = jnp.float32
    sds = jax.ShapeDtypeStruct
    per_walk = args.delta.shape  # (K, b, L, E)
    out_shape = [sds(per_walk, args.u.dtype), sds(per_walk, args.delta.dtype)]
    out_specs = [sp.walk, sp.walk]
    if args.z is not None:
        out_shape.append(sds(per_walk, args.z.dtype))
        out_specs.append(sp.walk)
    out_shape += [sds((b, k * ne, length, n), f32)] * 2
    out_specs += [sp.point_rows] * 2
    out_shape.append(sds((b, k * ne, n, d.block_e), f32))
    out_specs.append(sp.point_tile)
    for present in (args.D is not None, args.delta_bias is not None, walks.weighted):
        if present:
            out_shape.append(sds((b, k * ne, 1, d.block_e), f32))
            out_specs.append(sp.point_vec)
    outs = list(pl.pallas_call(
        functools.partial(_bwd_kernel, d=d, opts=opts), out_shape=tuple(out_shape),
        grid=(b, k, ne), in_specs=in_specs, out_specs=tuple(out_specs),
        scratch_shapes=[pltpu.VMEM((d.chunk + 1, n, d.block_e), f32)],
        compiler_params=_compiler_params(d, cfg), interpret=opts.interpret,
        name="selective_scan_bwd_walks",
    )(*(x for x in ins if x is not None)))
    du, ddelta = sum_over_walks(outs.pop(0)), outs.pop(0)
    dz = sum_over_walks(outs.pop(0)) if args.z is not None else None

    def bc_rows(x):  # (b, K*n_e, L, N) -> (b, L, K, N)
        return jnp.transpose(x.reshape(b, k, ne, length, n).sum(2), (0, 2, 1, 3))

    def per_channel(x):  # (b, K*n_e, R, block_e) summed over the batch -> (R, K*E)
        rows = x.shape[2]
        x = x.sum(0).reshape(k, ne, rows, d.block_e)
        return jnp.transpose(x, (2, 0, 1, 3)).reshape(rows, k * e)

    db, dc = bc_rows(outs.pop(0)), bc_rows(outs.pop(0))
    da = per_channel(outs.pop(0)).T  # (K*E, N)
    dD = per_channel(outs.pop(0))[0] if args.D is not None else None
    dbias = per_channel(outs.pop(0))[0] if args.delta_bias is not None else None
    dw = outs.pop(0).reshape(b, k, -1).sum(-1) if walks.weighted else None
    return Grads(u=du, delta=ddelta, A=da, B=db, C=dc, D=dD, z=dz, delta_bias=dbias, h0=None,
                 weights=dw)


def unsupported_reason(batch: int, height: int, width: int, channels: int, walks: int,
                       state: int) -> str | None:
    """None when the compiled Mosaic walk kernels handle this shape, else why not."""
    del batch
    cfg = MosaicConfig()
    block_e = cfg.block_e if channels % cfg.block_e == 0 else channels
    need = vmem_bytes(height * width, walks, state, block_e, cfg.block_t)
    if need > VMEM_BUDGET:
        return (f"the {height}x{width} map needs about {need / 2**20:.0f} MiB of VMEM per grid "
                f"point, above the {VMEM_BUDGET / 2**20:.0f} MiB budget")
    return None
