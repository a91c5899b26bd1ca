"""Selective scan for GPUs: Pallas kernels lowered through Triton, forward and backward.

Grid (channel blocks, batch), or (batch, channel blocks) when the batch (times the time
splits below) exceeds the grid's y limit. A program owns `block_e` channels of one batch row
(within one B/C group) and keeps their state as an (N, block_e) tile. Triton chooses the
tile's layout: at N = 16 and 32 channels on one warp it gives each thread 4 states of 4
channels (notes/kernels.md, v5), so the output's sum over N is 2 shuffle levels. It walks the
sequence in chunks of `fwd_unroll` steps unrolled in Python: the loads of a chunk do not
depend on the state, so they are issued together and the memory latency is paid once per
chunk instead of once per step.

Forward: saves the state at every checkpoint interval of K steps (b, L/K, N, E), plus the
output and the final state. The forward alone (the primal, outside differentiation) saves no
checkpoints and chooses its own time splits (below).

Backward: walks the checkpoint intervals from last to first. An interval is recomputed from
its checkpoint in sub-chunks of `bwd_unroll` steps (the state at each sub-chunk start goes to
a small per-program scratch buffer), then the sub-chunks are visited in reverse: each one's
states are recomputed into registers (one SSA value per step) and walked backwards with the
adjoint g_t = a_{t+1} g_{t+1} + C_t dy_t. Reductions over channels (dB, dC) are per-program
partial sums added up afterwards in JAX (deterministic); reductions over batch and time
(dA, dD, d delta_bias) are per-program accumulators, also summed in JAX.

Time splits (`time_splits` S > 1): with few batch rows and channel blocks there are too few
programs to hide one step's latency behind the others', so the time axis is cut into S
segments of whole checkpoint intervals (in scan-step order, so `reverse` needs nothing
special; K is chosen for the segment length L/S as it is for L without splits, and the
interval count is padded to a multiple of S with fully masked steps), and each
(batch row, segment) pair gets its own programs: the grid's batch axis enumerates
row * S + segment. The state is linear in its start, and the decay over a segment is
exp(A * sum of its step sizes) for a diagonal A, so:

  forward:  a summary kernel scans every segment but the last from a zero state (its final
            state and summed step size); each forward-kernel program folds the summaries of
            the segments before its own into its true start (`kernel_carry`; without it JAX
            carries the state across the segment starts, a Python loop over S) and scans its
            segment from there, so its checkpoints and output are those of the unsplit scan.
  backward: a summary kernel walks every segment but the first back from a zero adjoint (the
            adjoint at its start and its summed step size); JAX carries the true adjoint back
            across the segment ends; the backward kernel walks each segment back from it. The
            per-program accumulators get one slot per (row, segment), summed in JAX like the
            rest; dB and dC partials are indexed by time and need nothing.

The summaries cost one more pass of exps over (S-1)/S of the sequence in each direction.
Training's S must suit the backward too (they share the checkpoints); the forward alone
weighs only its own summary pass against idle multiprocessors (`auto_forward_time_splits`).

Any length and width: time steps past the end and channels past the block edge are masked
(delta forced to 0, so the padded steps leave the state untouched). N is padded to a power of
two with masked zero rows.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels_pallas.scan_vjp import (
    LOG2E,
    SOFTPLUS_LINEAR_ABOVE,
    Grads,
    Normalised,
    Options,
    Walks,
    best_checkpoint_interval,
    reduce_walks,
    sigmoid,
    split_refs,
    step_size,
    sum_over_walks,
    unreturned_final_state,
)
from kernels_pallas.walks import walk_position

LN2 = math.log(2.0)
MAX_STATE = 64  # larger N would not fit in registers as one tile


GRID_Y_MAX = 65535  # CUDA's limit on the grid's y (and z) size; x allows 2**31 - 1

# `time_splits=0` (auto): split time until there are this many programs (single-warp programs
# by default: about 16 per SM of a 132-SM GPU, enough for one program's step latency to hide
# behind the others'), into at most this many segments.
TARGET_PROGRAMS = 2048
MAX_TIME_SPLITS = 16


class TritonConfig(NamedTuple):
    """Static tuning of the Triton kernels (all block sizes powers of two)."""

    block_e: int = 32  # channels per forward program (32 per warp)
    fwd_warps: int = 1
    fwd_unroll: int = 4  # steps unrolled per loop iteration in the forward (and the summaries)
    bwd_block_e: int = 32
    bwd_warps: int = 1
    bwd_unroll: int = 4  # steps whose states the backward holds in registers at once
    bwd_sub_chunks: int = 16  # checkpoint interval is at most bwd_unroll * bwd_sub_chunks
    num_stages: int = 1
    fast_exp2: bool = True  # ex2.approx.ftz.f32 (compiled only; interpret uses jnp.exp2)
    keep_decay: bool = False  # keep exp(delta*A) of a sub-chunk in registers, not recompute
    prefetch: bool = True  # load the next chunk's rows while computing this one
    # With prefetch: the forward (and its summary) also loads the next chunk's B and C rows
    # ahead, at the cost of holding two chunks of them in registers.
    prefetch_bc: bool = True
    # Batch rows on the grid's x axis (limit 2**31 - 1) instead of y (limit 65535). None: only
    # when the batch (times time_splits) needs it; channel blocks of one row then no longer
    # run side by side.
    batch_major: bool | None = None
    # Segments of the time axis scanned by separate programs (module docstring); 1: one
    # program walks the whole sequence; 0 (the default): `auto_time_splits` picks.
    time_splits: int = 0
    # The state and adjoint updates as one fma.rn.f32 per element (inline PTX; compiled only):
    # the Triton pipeline otherwise keeps a * h + b as a separate multiply and add.
    fused_fma: bool = True
    # softplus(x) = log1p(e^x) and its slope sigmoid(x) = e^x / (1 + e^x) from one ex2, one lg2
    # and one rcp approximation (`_softplus`) instead of libdevice's expf, log1pf and division:
    # the per-channel work of every step of every kernel.
    fast_softplus: bool = True
    # Time splits: each forward program folds the summaries of the segments before its own
    # into its starting state (S - 1 steps at most) instead of a separate carry in XLA between
    # the summary and the main kernel; `bwd_kernel_carry` the same for the backward's adjoint
    # (off: no clear gain measured there, notes/kernels.md v9).
    kernel_carry: bool = True
    bwd_kernel_carry: bool = False
    # The forward alone (outside differentiation: nothing is saved for a backward, so no
    # checkpoints are written) may cut time into its own number of segments: 0 (the default):
    # `time_splits` if that is set, else `auto_forward_time_splits` picks; >= 1: that many.
    fwd_only_time_splits: int = 0


def auto_time_splits(programs: int, length: int, interval: int) -> int:
    """The number of time segments that `time_splits=0` picks.

    The smallest power of two S <= MAX_TIME_SPLITS with programs * S >= TARGET_PROGRAMS, but
    no more than keeps every segment at least two checkpoint intervals long: a shorter segment
    spends as much on its summary pass and carried-state combine as it spreads.

    Args:
      programs: batch rows x channel blocks, the programs of an unsplit scan.
      length: the sequence length L.
      interval: the checkpoint interval of the unsplit scan.
    """
    s = 1
    while s < MAX_TIME_SPLITS and programs * s < TARGET_PROGRAMS and length >= 4 * interval * s:
        s *= 2
    return s


def auto_forward_time_splits(programs: int, length: int, interval: int) -> int:
    """The number of time segments that `fwd_only_time_splits=0` picks for a forward alone.

    As many segments as keep the programs within one wave of TARGET_PROGRAMS (any S up to
    MAX_TIME_SPLITS, not only powers of two), under the same minimum segment length as
    `auto_time_splits`. Without a backward to share checkpoints with, the forward is free to
    trade fewer resident programs for less summary work: at (8, 2048, 1536, 16) five segments
    beat the eight that the backward wants (notes/kernels.md, v8 and v10).
    """
    s = max(1, min(MAX_TIME_SPLITS, TARGET_PROGRAMS // programs))
    while s > 1 and length < 4 * interval * s:
        s -= 1
    return s


def _time_splits(cfg: TritonConfig, batch: int, length: int, blocks: int,
                 forward_only: bool = False) -> int:
    """The number of segments S of `cfg` at this shape (`blocks`: channel blocks of a row).
    The forward and backward must agree on it (it shapes the checkpoints), so the auto choice
    counts the blocks of the smaller of their two block sizes; a forward alone
    (`forward_only`) counts its own."""
    for name in ("time_splits", "fwd_only_time_splits"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"TritonConfig.{name}={getattr(cfg, name)}: wanted >= 1, or 0 "
                             "(auto)")
    if forward_only and cfg.fwd_only_time_splits:
        return cfg.fwd_only_time_splits
    if forward_only and not cfg.time_splits:
        return auto_forward_time_splits(batch * blocks, length, _checkpoint_interval(length, cfg))
    if cfg.time_splits:
        return cfg.time_splits
    return auto_time_splits(batch * blocks, length, _checkpoint_interval(length, cfg))


def _checkpoint_interval(steps: int, cfg: TritonConfig) -> int:
    """The checkpoint interval K for a walk of `steps` steps."""
    unit = max(cfg.fwd_unroll, cfg.bwd_unroll)
    return best_checkpoint_interval(steps, unit, cfg.bwd_unroll * cfg.bwd_sub_chunks)


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
    n_intervals: int  # time_splits * seg_intervals (the last ones may be all padding)
    time_splits: int  # S, the number of time segments
    seg_intervals: int  # checkpoint intervals per segment
    batch_major: bool  # grid (batch, blocks) rather than (blocks, batch)

    def grid(self, segments: int) -> tuple[int, int]:
        """The grid of a kernel whose batch axis holds `segments` segments per batch row."""
        rows, n_blocks = self.batch * segments, self.groups * self.blocks_per_group
        return (rows, n_blocks) if self.batch_major else (n_blocks, rows)


def _rows_shape(args: Normalised) -> tuple[int, int, int]:
    """(batch, L, E) of the per-channel rows; for walks E counts every walk's channels (the
    K walks are the groups: delta is (K, b, L, E_map))."""
    if args.walk_codes is None:
        return args.delta.shape
    k, b, length, e = args.delta.shape
    return b, length, k * e


def _per_channel_shape(args: Normalised, d: _Dims) -> tuple[int, ...]:
    """Shape of delta and of the per-channel outputs (y, du, d delta, dz): (b, L, E), or for
    walks (K, b, L, E_map)."""
    return args.delta.shape if args.walk_codes is not None else (d.batch, d.length, d.channels)


def _dims(args: Normalised, block_e: int, cfg: TritonConfig, forward_only: bool = False
          ) -> _Dims:
    b, length, e = _rows_shape(args)
    n = args.A.shape[1]
    g = args.B.shape[2]
    eg = e // g
    blocks = g * pl.cdiv(eg, cfg.block_e if forward_only else min(cfg.block_e, cfg.bwd_block_e))
    splits = _time_splits(cfg, b, length, blocks, forward_only)
    # K suits the segment length as it suited the whole length without splits: the segments
    # together then pad L the least.
    seg_steps = pl.cdiv(length, splits)
    k = _checkpoint_interval(seg_steps, cfg)
    seg_intervals = pl.cdiv(seg_steps, k)
    batch_major = b * splits > GRID_Y_MAX if cfg.batch_major is None else cfg.batch_major
    return _Dims(b, length, e, n, pl.next_power_of_2(n), g, eg, pl.cdiv(eg, block_e), block_e,
                 k, splits * seg_intervals, splits, seg_intervals, batch_major)


def _ptx(instruction: str, *args):
    """One f32 PTX `instruction` per element, on operands $1..$n of the same shape."""
    [y] = plgpu.elementwise_inline_asm(
        instruction, args=list(args), constraints=",".join(["=f"] + ["f"] * len(args)),
        pack=1, result_shape_dtypes=[jax.ShapeDtypeStruct(args[0].shape, args[0].dtype)])
    return y


def _exp2(x, fast: bool):
    return _ptx("ex2.approx.ftz.f32 $0, $1;", x) if fast else jnp.exp2(x)


def _lg2(x, fast: bool):
    return _ptx("lg2.approx.ftz.f32 $0, $1;", x) if fast else jnp.log2(x)


def _rcp(x, fast: bool):
    return _ptx("rcp.approx.ftz.f32 $0, $1;", x) if fast else 1.0 / x


def _softplus(x, fast: bool):
    """(softplus(x), sigmoid(x)) from y = e^x: log1p(y) as log(u) y / (u - 1) with u = 1 + y
    rounded, which is exact to a few ulp where a plain log(u) loses y's low bits (Goldberg's
    formula), and sigmoid(x) = y / u. Linear above SOFTPLUS_LINEAR_ABOVE, as `scan_vjp.softplus`."""
    y = _exp2(jnp.minimum(x, SOFTPLUS_LINEAR_ABOVE) * LOG2E, fast)
    u = 1.0 + y
    den = u - 1.0
    log1p = jnp.where(den == 0.0, y, _lg2(u, fast) * LN2 * y * _rcp(den, fast))
    return jnp.where(x > SOFTPLUS_LINEAR_ABOVE, x, log1p), y * _rcp(u, fast)


def _step_size(dt_raw, bias, opts: Options, keep, cfg: TritonConfig, fast: bool):
    """`scan_vjp.step_size`, with `_softplus` if `cfg.fast_softplus` (its PTX if `fast`)."""
    if not (cfg.fast_softplus and opts.delta_softplus):
        return step_size(dt_raw, bias, opts, keep)
    dt, slope = _softplus(dt_raw + bias if bias is not None else dt_raw, fast)
    return jnp.where(keep, dt, 0.0), slope


def _fma(a, b, c, fused: bool):
    """a * b + c, as one fma.rn.f32 per element if `fused`."""
    return _ptx("fma.rn.f32 $0, $1, $2, $3;", a, b, c) if fused else a * b + c


def _tile_args(col, row):
    """(N,) and (block_e,) vectors broadcast to two (N, block_e) tiles (for `_fma`)."""
    shape = (col.shape[0], row.shape[0])
    return jnp.broadcast_to(col[:, None], shape), jnp.broadcast_to(row[None, :], shape)


def _advance(h, dt, u, bv, a2, fast: bool, fused: bool):
    """One scan step h <- exp(dt A) h + dt u B; returns the new state and exp(dt A)."""
    a = _exp2(dt[None, :] * a2, fast)
    return _fma(a, h, (dt * u)[None, :] * bv[:, None], fused), a


class _Program:
    """Index helpers of one program: batch row `bi`, time segment `seg`, channel block `blk`.

    The grid's batch axis holds `slot` = bi * segments + (seg - first_segment): the main
    kernels have all S segments of a row, the summaries skip the one segment whose summary no
    one needs (`first_segment` is then 1 for the backward's). The program owns checkpoint
    intervals [k0, k_end). Without splits seg, k0 and k_end are Python ints (0, 0 and the
    interval count), so the kernels trace as they did before splits existed.

    Walks of a map (`walks`, with the walk table `codes_ref`): the group is the walk slot,
    step s is at the map position `walk_position(code, s)` (`time`), the shared map arrays
    (u, z, and dy when the walks are summed) are read at the channel offset within the group
    (`shared_row`), and with `walks.shift` the output of step s belongs to step s+1's
    position (`out_times`). Without walks every one of these is the 1-D scan's own.
    """

    def __init__(self, d: _Dims, reverse: bool, segments: int | None = None,
                 first_segment: int = 0, walks: Walks | None = None, codes_ref=None,
                 weights_ref=None):
        self.d = d
        self.reverse = reverse
        segments = d.time_splits if segments is None else segments
        batch_axis, block_axis = (0, 1) if d.batch_major else (1, 0)
        self.slot, self.blk = pl.program_id(batch_axis), pl.program_id(block_axis)
        if segments == 1:
            self.bi, self.seg = self.slot, first_segment
        else:
            self.bi = self.slot // segments
            self.seg = self.slot % segments + first_segment
        self.k0 = self.seg * d.seg_intervals
        self.k_end = self.k0 + d.seg_intervals
        self.group = self.blk // d.blocks_per_group
        local = (self.blk % d.blocks_per_group) * d.block_e
        self.e0 = self.group * d.group_width + local
        self.e_ok = local + jnp.arange(d.block_e, dtype=jnp.int32) < d.group_width
        self.n_ok = jnp.arange(d.state_pad, dtype=jnp.int32) < d.state
        self.tile_ok = self.n_ok[:, None] & self.e_ok[None, :]
        self.cols = pl.ds(self.e0, d.block_e)
        self.rows = pl.ds(0, d.state_pad)
        self.walks = walks
        self.shared_cols = self.cols
        if walks is not None:
            self.shared_cols = pl.ds(local, d.block_e)
            self.code = codes_ref[self.bi if walks.per_sample else 0, self.group]
        # The weight of this program's walk in the sum (walks.weighted), scaling its dy.
        self.weight = None if weights_ref is None else weights_ref[self.bi, self.group]

    @property
    def is_first(self):
        """Whether this is a row's first segment (a scalar; None without splits: always)."""
        return self.seg == 0 if self.d.time_splits > 1 else None

    @property
    def is_last(self):
        """Whether this is a row's last segment (a scalar; None without splits: always)."""
        return self.seg == self.d.time_splits - 1 if self.d.time_splits > 1 else None

    def time(self, s):
        """Scan step s -> (physical time index, in range); for walks the map position."""
        valid = (s >= 0) & (s < self.d.length)
        t = self.d.length - 1 - s if self.reverse else s
        # Clamped rather than selected: a scalar select with a literal mis-lowers in Triton.
        t = jnp.minimum(jnp.maximum(t, 0), self.d.length - 1)
        if self.walks is not None:
            t = walk_position(self.code, t, self.walks.height, self.walks.width)
        return t, valid

    def out_times(self, steps, times):
        """Where the outputs of scan steps `steps` (with `times` their own `time`) belong:
        the same places, or with a shifted walk the next step's (out of range for the last)."""
        if self.walks is None or not self.walks.shift:
            return times
        return [self.time(s + 1) for s in steps]

    def step_times(self, steps):
        """(`time` of each step, `out_times`)."""
        times = [self.time(s) for s in steps]
        return times, self.out_times(steps, times)

    def loaded(self, rows, times):
        """What a loader hands its loop body: the rows, with their steps' `step_times` for
        walks. A walk's position costs tens of integer operations, and a prefetched chunk's
        body runs an iteration after its loads; a 1-D scan's time is a clamp, which the
        body recomputes (`unpack`) as it always did."""
        return (rows, times) if self.walks is not None else rows

    def unpack(self, loaded, steps):
        """(rows, (times, out_times)) of a loader's `loaded` output for these steps."""
        return loaded if self.walks is not None else (loaded, self.step_times(steps))

    def shared_row(self, ref, t, valid):
        """`row` of an array that every walk reads (u, z: (b, L, E_map)); `row` without
        walks."""
        x = plgpu.load(ref.at[self.bi, t, self.shared_cols], mask=self.e_ok & valid, other=0)
        return x.astype(jnp.float32)

    def dy_row(self, ref, t, valid, weigh: bool = True):
        """The output cotangent of walk steps whose output is at time t: shared by the walks
        when they are summed, times this walk's weight when the sum is weighted (`weigh`)."""
        summed = self.walks is not None and self.walks.summed
        dy = self.shared_row(ref, t, valid) if summed else self.row(ref, t, valid)
        return dy if self.weight is None or not weigh else dy * self.weight

    def _at(self, ref, t):
        """This program's row of a (b, L, E) array at time t; of a walk's (K, b, L, E_map)."""
        if self.walks is None:
            return ref.at[self.bi, t, self.cols]
        return ref.at[self.group, self.bi, t, self.shared_cols]

    def row(self, ref, t, valid):
        """(block_e,) float32 slice of a (b, L, E) array at time t (0 where masked); for walks
        of this walk's (K, b, L, E_map) one."""
        x = plgpu.load(self._at(ref, t), mask=self.e_ok & valid, other=0)
        return x.astype(jnp.float32)

    def put_row(self, ref, t, valid, x):
        plgpu.store(self._at(ref, t), x.astype(ref.dtype), mask=self.e_ok & valid)

    def state_row(self, ref, t, valid):
        """(N_pad,) float32 row of a (b, L, G, N) array (B or C) at time t."""
        x = plgpu.load(ref.at[self.bi, t, self.group, self.rows], mask=self.n_ok & valid,
                       other=0)
        return x.astype(jnp.float32)

    def vec(self, ref, *lead):
        """(block_e,) float32 slice of an (..., E) array."""
        return plgpu.load(ref.at[(*lead, self.cols)], mask=self.e_ok,
                          other=0).astype(jnp.float32)

    def tile(self, ref, *lead):
        """(N_pad, block_e) float32 tile of a (..., N, E) array."""
        return plgpu.load(ref.at[(*lead, self.rows, self.cols)], mask=self.tile_ok,
                          other=0).astype(jnp.float32)

    def put_tile(self, ref, x, *lead, when=None):
        """Stores an (N_pad, block_e) tile into a (..., N, E) array (if `when`, a scalar)."""
        plgpu.store(ref.at[(*lead, self.rows, self.cols)], x.astype(ref.dtype),
                    mask=self.tile_ok if when is None else self.tile_ok & when)

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


def _name(kernel: str, opts: Options) -> str:
    """The kernel's name in profiles: the walk scans' carry a `_walks` suffix."""
    return kernel if opts.walks is None else f"{kernel}_walks"


def _compiler_params(warps: int, cfg: TritonConfig):
    return plgpu.CompilerParams(num_warps=warps, num_stages=cfg.num_stages)


def _call(kernel, d: _Dims, opts: Options, out_shape, segments: int, warps: int, name: str):
    """The pallas_call of `kernel` on the grid of `segments` time segments per batch row."""
    cfg: TritonConfig = opts.backend_config
    interpret = bool(opts.interpret)
    return pl.pallas_call(
        functools.partial(kernel, d=d, opts=opts, cfg=cfg, interpret=interpret),
        out_shape=out_shape, grid=d.grid(segments), interpret=opts.interpret, name=name,
        compiler_params=None if interpret else _compiler_params(warps, cfg))


def _carry_across(a2t, start, local, sum_dt):
    """The true carried value (state or adjoint) at each segment boundary, (b, S, N, E).

    x_0 = start (b, N, E), x_{i+1} = exp(A sum_dt[:, i]) x_i + local[:, i]: `local`
    (b, S-1, N, E) holds what each segment carries out from a zero start and `sum_dt`
    (b, S-1, E) its summed step size (the value is linear in its start, and the decay over a
    segment is exp(A sum_dt) for a diagonal A). S is small, so a Python loop.
    """
    xs = [start]
    for i in range(local.shape[1]):
        xs.append(jnp.exp2(a2t * sum_dt[:, i, None, :]) * xs[-1] + local[:, i])
    return jnp.stack(xs, 1)


def _carry_in_kernel(p: _Program, x, a2, local_ref, sdt_ref, backward: bool, fast: bool,
                     fused: bool):
    """`_carry_across` inside one main-kernel program, for its own segment: folds into the
    start value `x` the summaries of the segments before it (forward: 0..seg-1, in order), or
    after it (backward: S-1 down to seg+1). Slots are as the summary kernels wrote them:
    row * (S - 1) + segment, minus 1 for the backward's (it has no summary of segment 0)."""
    per_row = p.d.time_splits - 1
    count = per_row - p.seg if backward else p.seg

    def fold(i, x):
        slot = p.bi * per_row + (per_row - 1 - i if backward else i)
        decay = _exp2(a2 * p.vec(sdt_ref, slot)[None, :], fast)
        return _fma(decay, x, p.tile(local_ref, slot), fused)

    return jax.lax.fori_loop(0, count, fold, x)


# ---------------------------------------------------------------------------------------------
# Forward.


def _fwd_summary_kernel(*refs, d: _Dims, opts: Options, cfg: TritonConfig, interpret: bool):
    """Time splits: scans each segment but the last from a zero state; writes its final state
    (b * (S-1), N, E) and its summed step size (b * (S-1), E)."""
    walks = opts.walks
    (u_ref, dt_ref, a2_ref, b_ref, bias_ref, codes_ref), (hloc_ref, sdt_ref) = split_refs(
        refs, (True, True, True, True, opts.has_bias, walks is not None))
    p = _Program(d, opts.reverse, segments=d.time_splits - 1, walks=walks, codes_ref=codes_ref)
    fast = cfg.fast_exp2 and not interpret
    fused = cfg.fused_fma and not interpret
    a2 = p.tile(a2_ref)
    bias = p.vec(bias_ref) if bias_ref is not None else None
    unroll = cfg.fwd_unroll
    per_interval = d.interval // unroll

    ahead = cfg.prefetch and cfg.prefetch_bc

    def steps(c):
        return [c * unroll + j for j in range(unroll)]

    def load(c):  # the per-channel rows of chunk c: (u, raw delta[, B]) per step
        times = p.step_times(steps(c))
        return p.loaded([(p.shared_row(u_ref, t, valid), p.row(dt_ref, t, valid))
                         + ((p.state_row(b_ref, t, valid),) if ahead else ())
                         for t, valid in times[0]], times)

    def chunk(c, carry, rows):
        h, sum_dt = carry
        rows, (times, _) = p.unpack(rows, steps(c))
        bvs = ([r[2] for r in rows] if ahead
               else [p.state_row(b_ref, t, v) for t, v in times])
        for (_, valid), (u, dt_raw, *_), bv in zip(times, rows, bvs, strict=True):
            dt, _ = _step_size(dt_raw, bias, opts, p.e_ok & valid, cfg, fast)
            h, _ = _advance(h, dt, u, bv, a2, fast, fused)
            sum_dt = sum_dt + dt
        return h, sum_dt

    lo, hi = p.k0 * per_interval, p.k_end * per_interval
    zeros = (jnp.zeros((d.state_pad, d.block_e), jnp.float32),
             jnp.zeros((d.block_e,), jnp.float32))
    (h, sum_dt), _ = _row_loop(lo, hi, load, chunk, zeros,
                               load(lo) if cfg.prefetch else None, cfg.prefetch)
    p.put_tile(hloc_ref, h, p.slot)
    p.put_vec(sdt_ref, sum_dt, p.slot)


def _fwd_kernel(*refs, d: _Dims, opts: Options, cfg: TritonConfig, interpret: bool):
    carry_in = d.time_splits > 1 and cfg.kernel_carry
    walks = opts.walks
    flags = (True, True, True, True, True, opts.has_D, opts.has_z, opts.has_bias,
             opts.has_h0 or (d.time_splits > 1 and not carry_in), carry_in, carry_in,
             walks is not None)
    refs, outs = split_refs(refs, flags)
    (u_ref, dt_ref, a2_ref, b_ref, c_ref, d_ref, z_ref, bias_ref, h0_ref, hloc_ref, sdt_ref,
     codes_ref) = refs
    # The final state only when it is returned; no checkpoints for a forward alone.
    (y_ref, hlast_ref), ck_ref = split_refs(outs, (True, opts.has_dh_last))
    ck_ref = ck_ref[0] if ck_ref else None
    p = _Program(d, opts.reverse, walks=walks, codes_ref=codes_ref)
    fast = cfg.fast_exp2 and not interpret
    fused = cfg.fused_fma and not interpret
    a2 = p.tile(a2_ref)  # A * log2(e), (N_pad, block_e)
    dvec = p.vec(d_ref) if d_ref is not None else None
    bias = p.vec(bias_ref) if bias_ref is not None else None
    # The state at the segment start: h0's row (b, N, E), then with time splits the summaries
    # of the segments before folded in; or without `kernel_carry` the start from XLA
    # (b * S, N, E).
    h = (p.tile(h0_ref, p.bi if carry_in else p.slot) if h0_ref is not None
         else jnp.zeros((d.state_pad, d.block_e), jnp.float32))
    if carry_in:
        h = _carry_in_kernel(p, h, a2, hloc_ref, sdt_ref, False, fast, fused)
    unroll = cfg.fwd_unroll
    per_interval = d.interval // unroll

    ahead = cfg.prefetch and cfg.prefetch_bc

    def load_bc(t, valid):
        return p.state_row(b_ref, t, valid), p.state_row(c_ref, t, valid)

    def steps(c):
        return [c * unroll + j for j in range(unroll)]

    def load(c):  # the per-channel rows of chunk c: (u, raw delta, z[, (B, C)]) per step
        times = p.step_times(steps(c))
        rows = []
        for t, valid in times[0]:
            rows.append((p.shared_row(u_ref, t, valid), p.row(dt_ref, t, valid),
                         p.shared_row(z_ref, t, valid) if z_ref is not None else None)
                        + ((load_bc(t, valid),) if ahead else ()))
        return p.loaded(rows, times)

    def chunk(c, h, rows):
        rows, (times, outs) = p.unpack(rows, steps(c))
        bcs = [r[3] for r in rows] if ahead else [load_bc(t, v) for t, v in times]
        for (_, valid), (u, dt_raw, z, *_), (bv, cv), (t_out, valid_out) in zip(
                times, rows, bcs, outs, strict=True):
            dt, _ = _step_size(dt_raw, bias, opts, p.e_ok & valid, cfg, fast)
            h, _ = _advance(h, dt, u, bv, a2, fast, fused)
            y = jnp.sum(h * cv[:, None], axis=0)
            if dvec is not None:
                y = y + dvec * u
            if z is not None:
                y = y * (z * sigmoid(z))
            p.put_row(y_ref, t_out, valid_out, y)
        return h

    if walks is not None and walks.shift:  # no step's output lands on the first position
        first = True if p.is_first is None else p.is_first
        p.put_row(y_ref, p.time(0)[0], first, jnp.zeros((d.block_e,), jnp.float32))

    def interval(k, carry):
        h, rows = carry
        if ck_ref is not None:
            p.put_tile(ck_ref, h, p.bi, k)  # the state at each checkpoint-interval start
        return _row_loop(k * per_interval, (k + 1) * per_interval, load, chunk, h, rows,
                         cfg.prefetch)

    rows = load(p.k0 * per_interval) if cfg.prefetch else None
    h, _ = jax.lax.fori_loop(p.k0, p.k_end, interval, (h, rows))
    if hlast_ref is not None:
        p.put_tile(hlast_ref, h, p.bi, when=p.is_last)


def _fwd_summaries(opts: Options, args: Normalised, d: _Dims, a2t):
    """Time splits: each segment's final state from a zero start (b * (S-1), N, E) and summed
    step size (b * (S-1), E), but the last segment's."""
    b, s, n, e = d.batch, d.time_splits, d.state, d.channels
    cfg: TritonConfig = opts.backend_config
    f32 = jnp.float32
    ins = [x for x in (args.u, args.delta, a2t, args.B, args.delta_bias, args.walk_codes)
           if x is not None]
    out_shape = (jax.ShapeDtypeStruct((b * (s - 1), n, e), f32),
                 jax.ShapeDtypeStruct((b * (s - 1), e), f32))
    return _call(_fwd_summary_kernel, d, opts, out_shape, s - 1, cfg.fwd_warps,
                 _name("selective_scan_fwd_summary", opts))(*ins)


def _segment_starts(d: _Dims, a2t, h0t, h_loc, sum_dt):
    """Time splits without `kernel_carry`: the state at every segment start, (b * S, N, E)."""
    b, s, n, e = d.batch, d.time_splits, d.state, d.channels
    start = h0t if h0t is not None else jnp.zeros((b, n, e), jnp.float32)
    starts = _carry_across(a2t, start, h_loc.reshape(b, s - 1, n, e),
                           sum_dt.reshape(b, s - 1, e))
    return starts.reshape(b * s, n, e)


def forward(opts: Options, args: Normalised, residual: bool = True):
    """Returns y (b, L, E) in u's dtype, the final state (b, E, N) float32 (zeros, not written,
    unless `opts.has_dh_last`) and the residual (checkpoints (b, L/K, N, E) float32). Without
    `residual` (a forward alone) no checkpoints are written (None is returned), and the time
    splits are `fwd_only_time_splits`'."""
    cfg: TritonConfig = opts.backend_config
    d = _dims(args, cfg.block_e, cfg, forward_only=not residual)
    b, length, e = _rows_shape(args)
    a2t = (args.A * LOG2E).T  # (N, E)
    h0t = None if args.h0 is None else jnp.swapaxes(args.h0, 1, 2)  # (b, N, E)
    summaries = (None, None)
    if d.time_splits > 1:
        summaries = _fwd_summaries(opts, args, d, a2t)
        if not cfg.kernel_carry:
            h0t, summaries = _segment_starts(d, a2t, h0t, *summaries), (None, None)
    ins = [x for x in (args.u, args.delta, a2t, args.B, args.C, args.D, args.z,
                       args.delta_bias, h0t, *summaries, args.walk_codes) if x is not None]
    f32 = jnp.float32
    out_shape = (jax.ShapeDtypeStruct(_per_channel_shape(args, d), args.u.dtype),)
    if opts.has_dh_last:
        out_shape += (jax.ShapeDtypeStruct((b, d.state, e), f32),)
    if residual:
        out_shape += (jax.ShapeDtypeStruct((b, d.n_intervals, d.state, e), f32),)
    y, *outs = _call(_fwd_kernel, d, opts, out_shape, d.time_splits, cfg.fwd_warps,
                     _name("selective_scan_fwd", opts))(*ins)
    h_last = (jnp.swapaxes(outs.pop(0), 1, 2) if opts.has_dh_last
              else unreturned_final_state(b, e, d.state))
    if opts.walks is not None:
        y = reduce_walks(y, args, opts.walks)
    return y, h_last, outs[0] if outs else None


# ---------------------------------------------------------------------------------------------
# Backward.


def _bwd_summary_kernel(*refs, d: _Dims, opts: Options, cfg: TritonConfig, interpret: bool):
    """Time splits: walks each segment but the first back from a zero adjoint; writes the
    adjoint at its start (b * (S-1), N, E) and its summed step size (b * (S-1), E). It holds one
    tile like the forward, so it walks in the forward's chunks."""
    walks = opts.walks
    weighted = walks is not None and walks.weighted
    (dt_ref, a2_ref, c_ref, z_ref, bias_ref, dy_ref, codes_ref, weights_ref), (
        gloc_ref, sdt_ref) = split_refs(refs, (True, True, True, opts.has_z, opts.has_bias, True,
                                               walks is not None, weighted))
    p = _Program(d, opts.reverse, segments=d.time_splits - 1, first_segment=1, walks=walks,
                 codes_ref=codes_ref, weights_ref=weights_ref)
    fast = cfg.fast_exp2 and not interpret
    fused = cfg.fused_fma and not interpret
    a2 = p.tile(a2_ref)
    bias = p.vec(bias_ref) if bias_ref is not None else None
    unroll = cfg.fwd_unroll
    per_interval = d.interval // unroll
    last = p.k_end * per_interval - 1  # the segment's last chunk, walked first

    def steps(i):  # the steps of the i-th chunk back from the segment end
        return [(last - i) * unroll + j for j in range(unroll)]

    def load(i):  # its per-channel rows: (raw delta, dy, z) per step
        times, outs = p.step_times(steps(i))
        return p.loaded([(p.row(dt_ref, t, valid), p.dy_row(dy_ref, *out),
                          p.shared_row(z_ref, t, valid) if z_ref is not None else None)
                         for (t, valid), out in zip(times, outs, strict=True)], (times, outs))

    def chunk(i, carry, rows):
        g_next, sum_dt = carry
        rows, (times, _) = p.unpack(rows, steps(i))
        cvs = [p.state_row(c_ref, t, v) for t, v in times]
        for j in reversed(range(unroll)):
            (_, valid), (dt_raw, dy, z), cv = times[j], rows[j], cvs[j]
            dt, _ = _step_size(dt_raw, bias, opts, p.e_ok & valid, cfg, fast)
            if z is not None:
                dy = dy * z * sigmoid(z)  # the gate's share of dy, as in the backward kernel
            g = _fma(*_tile_args(cv, dy), g_next, fused)
            g_next = _exp2(dt[None, :] * a2, fast) * g
            sum_dt = sum_dt + dt
        return g_next, sum_dt

    zeros = (jnp.zeros((d.state_pad, d.block_e), jnp.float32),
             jnp.zeros((d.block_e,), jnp.float32))
    (g, sum_dt), _ = _row_loop(0, d.seg_intervals * per_interval, load, chunk, zeros,
                               load(0) if cfg.prefetch else None, cfg.prefetch)
    p.put_tile(gloc_ref, g, p.slot)
    p.put_vec(sdt_ref, sum_dt, p.slot)


def _bwd_kernel(*refs, d: _Dims, opts: Options, cfg: TritonConfig, interpret: bool):
    carry_in = d.time_splits > 1 and cfg.bwd_kernel_carry
    walks = opts.walks
    weighted = walks is not None and walks.weighted
    flags = (True, True, True, True, True, opts.has_D, opts.has_z, opts.has_bias, True, True,
             opts.has_dh_last or (d.time_splits > 1 and not carry_in), carry_in, carry_in,
             walks is not None, weighted)
    refs, outs = split_refs(refs, flags)
    (u_ref, dt_ref, a2_ref, b_ref, c_ref, d_ref, z_ref, bias_ref, ck_ref, dy_ref, dhl_ref,
     gloc_ref, sdt_ref, codes_ref, weights_ref) = refs
    oflags = (True, True, opts.has_z, True, True, True, opts.has_D, opts.has_bias, True,
              True, weighted)
    (du_ref, ddt_ref, dz_ref, db_ref, dc_ref, da_ref, dd_ref, dbias_ref, dh0_ref, sub_ref,
     dw_ref), _ = split_refs(outs, oflags)
    p = _Program(d, opts.reverse, walks=walks, codes_ref=codes_ref, weights_ref=weights_ref)
    fast = cfg.fast_exp2 and not interpret
    fused = cfg.fused_fma and not interpret
    unroll = cfg.bwd_unroll
    n_sub = d.interval // unroll
    a2 = p.tile(a2_ref)
    a_nat = a2 * (1.0 / LOG2E)
    dvec = p.vec(d_ref) if d_ref is not None else None
    bias = p.vec(bias_ref) if bias_ref is not None else None
    local_blk = p.blk % d.blocks_per_group
    slot = p.slot * (d.groups * d.blocks_per_group) + p.blk  # this program's scratch slot
    zeros_tile = jnp.zeros((d.state_pad, d.block_e), jnp.float32)
    zeros_row = jnp.zeros((d.block_e,), jnp.float32)
    barrier = (lambda: None) if interpret else plgpu.debug_barrier

    def steps(q):
        return [q * unroll + i for i in range(unroll)]

    def load(q, with_grads=True):  # per-channel rows of sub-chunk q: (u, raw delta, dy, z)
        times, outs = p.step_times(steps(q))
        rows = []
        for (t, valid), out in zip(times, outs, strict=True):
            rows.append((p.shared_row(u_ref, t, valid), p.row(dt_ref, t, valid),
                         p.dy_row(dy_ref, *out, weigh=False) if with_grads else None,
                         p.shared_row(z_ref, t, valid) if with_grads and z_ref is not None
                         else None))
        return p.loaded(rows, (times, outs))

    def sub_forward(j, h, rows, k):  # pass 1: the state at every sub-chunk start of interval k
        q = k * n_sub + j
        rows, (times, _) = p.unpack(rows, steps(q))
        bvs = [p.state_row(b_ref, t, v) for t, v in times]
        plgpu.store(p.scratch_ref(sub_ref, slot, j), h)
        for (_, valid), (u, dt_raw, _, _), bv in zip(times, rows, bvs, strict=True):
            dt, _ = _step_size(dt_raw, bias, opts, p.e_ok & valid, cfg, fast)
            h, _ = _advance(h, dt, u, bv, a2, fast, fused)
        return h

    def sub_backward(q, j, carry, rows):  # pass 2: one sub-chunk, its steps in reverse
        g_next, da, dd, dbias, *dw = carry  # dw: the weight's gradient (walks.weighted)
        rows, (times, _) = p.unpack(rows, steps(q))
        bcs = [(p.state_row(b_ref, t, v), p.state_row(c_ref, t, v)) for t, v in times]
        h = (plgpu.load(p.scratch_ref(sub_ref, slot, j)) if n_sub > 1
             else p.tile(ck_ref, p.bi, q))
        hs, recomputed = [h], []
        for (_, valid), (u, dt_raw, _, _), (bv, _) in zip(times, rows, bcs, strict=True):
            dt, slope = _step_size(dt_raw, bias, opts, p.e_ok & valid, cfg, fast)
            h, a = _advance(hs[-1], dt, u, bv, a2, fast, fused)
            hs.append(h)
            recomputed.append((dt, slope, a if cfg.keep_decay else None))
        for i in reversed(range(unroll)):
            (t, valid), (u, _, dy, z), (bv, cv) = times[i], rows[i], bcs[i]
            dt, slope, a = recomputed[i]
            h, h_prev = hs[i + 1], hs[i]
            if weighted:  # this walk's output times the summed output's cotangent
                dy_sum, dy = dy, dy * p.weight
            if z is not None or weighted:
                y_core = jnp.sum(h * cv[:, None], axis=0)
                if dvec is not None:
                    y_core = y_core + dvec * u
            if z is not None:
                sz = sigmoid(z)
                p.put_row(dz_ref, t, valid, dy * y_core * sz * (1.0 + z * (1.0 - sz)))
                dy = dy * z * sz
                if weighted:
                    dw = [dw[0] + dy_sum * y_core * z * sz]
            elif weighted:
                dw = [dw[0] + dy_sum * y_core]
            g = _fma(*_tile_args(cv, dy), g_next, fused)
            if a is None:
                a = _exp2(dt[None, :] * a2, fast)
            ah = a * h_prev  # = h - dt u B
            g_next = a * g
            da = _fma(g * ah, jnp.broadcast_to(dt[None, :], g.shape), da, fused)
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
        return g_next, da, dd, dbias, *dw

    def interval(kr, carry):
        acc, rows = carry  # rows: the prefetched rows of the next sub-chunk to walk back
        k = p.k_end - 1 - kr
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

    # The adjoint at the segment end: dh_last's row (b, N, E), then with time splits the
    # summaries of the segments after folded in; or without `bwd_kernel_carry` the adjoint from XLA
    # (b * S, N, E).
    g0 = p.tile(dhl_ref, p.bi if carry_in else p.slot) if dhl_ref is not None else zeros_tile
    if carry_in:
        g0 = _carry_in_kernel(p, g0, a2, gloc_ref, sdt_ref, True, fast, fused)
    first_rows = load(p.k_end * n_sub - 1) if cfg.prefetch else None  # the segment's last
    acc = (g0, zeros_tile, zeros_row, zeros_row) + ((zeros_row,) if weighted else ())
    (g, da, dd, dbias, *dw), _ = jax.lax.fori_loop(0, d.seg_intervals, interval,
                                                   (acc, first_rows))
    p.put_tile(dh0_ref, g, p.bi, when=p.is_first)
    # Accumulators: one slot per (batch row, segment), summed in JAX.
    p.put_tile(da_ref, da, p.slot)
    if dd_ref is not None:
        p.put_vec(dd_ref, dd, p.slot)
    if dbias_ref is not None:
        p.put_vec(dbias_ref, dbias, p.slot)
    if dw_ref is not None:
        p.put_vec(dw_ref, dw[0], p.slot)


def _bwd_summaries(opts: Options, args: Normalised, d: _Dims, a2t, dy):
    """Time splits: each segment's adjoint at its start from a zero adjoint at its end
    (b * (S-1), N, E) and summed step size (b * (S-1), E), but the first segment's."""
    b, s, n, e = d.batch, d.time_splits, d.state, d.channels
    cfg: TritonConfig = opts.backend_config
    f32 = jnp.float32
    ins = [x for x in (args.delta, a2t, args.C, args.z, args.delta_bias, dy, args.walk_codes,
                       args.weights) if x is not None]
    out_shape = (jax.ShapeDtypeStruct((b * (s - 1), n, e), f32),
                 jax.ShapeDtypeStruct((b * (s - 1), e), f32))
    return _call(_bwd_summary_kernel, d, opts, out_shape, s - 1, cfg.bwd_warps,
                 _name("selective_scan_bwd_summary", opts))(*ins)


def _segment_end_adjoints(d: _Dims, a2t, dhl_t, g_loc, sum_dt):
    """Time splits without `bwd_kernel_carry`: the adjoint entering every segment from its end,
    (b * S, N, E)."""
    b, s, n, e = d.batch, d.time_splits, d.state, d.channels
    end = dhl_t if dhl_t is not None else jnp.zeros((b, n, e), jnp.float32)
    # Segments 1..S-1 summarised; the adjoint is carried from the last segment to the first.
    ends = _carry_across(a2t, end, g_loc.reshape(b, s - 1, n, e)[:, ::-1],
                         sum_dt.reshape(b, s - 1, e)[:, ::-1])[:, ::-1]
    return ends.reshape(b * s, n, e)


def backward(opts: Options, args: Normalised, ck, dy, dh_last) -> Grads:
    """Gradients w.r.t. every normalised argument (float32; the glue casts them)."""
    cfg: TritonConfig = opts.backend_config
    d = _dims(args, cfg.bwd_block_e, cfg)
    b, length, e = _rows_shape(args)
    n, g = d.state, d.groups
    slots = b * d.time_splits  # (batch row, segment) pairs
    n_blocks = g * d.blocks_per_group
    a2t = (args.A * LOG2E).T
    dhl_t = None if dh_last is None else jnp.swapaxes(dh_last.astype(jnp.float32), 1, 2)
    summaries = (None, None)
    if d.time_splits > 1:
        summaries = _bwd_summaries(opts, args, d, a2t, dy)
        if not cfg.bwd_kernel_carry:
            dhl_t, summaries = _segment_end_adjoints(d, a2t, dhl_t, *summaries), (None, None)
    ins = [x for x in (args.u, args.delta, a2t, args.B, args.C, args.D, args.z,
                       args.delta_bias, ck, dy, dhl_t, *summaries, args.walk_codes,
                       args.weights) if x is not None]
    f32 = jnp.float32
    n_sub = d.interval // cfg.bwd_unroll
    sds = jax.ShapeDtypeStruct
    rows = _per_channel_shape(args, d)
    out_shape = [sds(rows, args.u.dtype), sds(rows, args.delta.dtype)]
    if args.z is not None:
        out_shape.append(sds(rows, args.z.dtype))
    out_shape += [sds((b, length, g, d.blocks_per_group, n), f32)] * 2
    out_shape.append(sds((slots, n, e), f32))
    if args.D is not None:
        out_shape.append(sds((slots, e), f32))
    if args.delta_bias is not None:
        out_shape.append(sds((slots, e), f32))
    out_shape.append(sds((b, n, e), f32))
    out_shape.append(sds((slots * n_blocks if n_sub > 1 else 1, n_sub, d.state_pad, d.block_e),
                         f32))
    if args.weights is not None:
        out_shape.append(sds((slots, e), f32))
    outs = list(_call(_bwd_kernel, d, opts, tuple(out_shape), d.time_splits, cfg.bwd_warps,
                      _name("selective_scan_bwd", opts))(*ins))
    du, ddelta = outs.pop(0), outs.pop(0)
    dz = outs.pop(0) if args.z is not None else None
    db_part, dc_part, da_part = outs.pop(0), outs.pop(0), outs.pop(0)
    dD = outs.pop(0).sum(0) if args.D is not None else None
    dbias = outs.pop(0).sum(0) if args.delta_bias is not None else None
    dh0_t = outs.pop(0)
    dw = None
    if opts.walks is not None:  # u and z are shared by the walks: their gradients add up
        du = sum_over_walks(du)
        dz = None if dz is None else sum_over_walks(dz)
        if args.weights is not None:  # per (row, segment) and channel -> per (row, walk)
            dw = outs[1].reshape(b, d.time_splits, g, d.group_width).sum((1, 3))
    return Grads(
        u=du, delta=ddelta, A=da_part.sum(0).T, B=db_part.sum(3), C=dc_part.sum(3), D=dD,
        z=dz, delta_bias=dbias, h0=None if args.h0 is None else jnp.swapaxes(dh0_t, 1, 2),
        weights=dw)


def unsupported_reason(batch: int, length: int, channels: int, state: int,
                       groups: int) -> str | None:
    """None when the compiled Triton kernels handle this shape, else why not."""
    if state > MAX_STATE:
        return f"state size N={state} is above {MAX_STATE} (the state tile would spill)"
    cfg = default_config()
    blocks = groups * pl.cdiv(channels // groups, min(cfg.block_e, cfg.bwd_block_e))
    rows = batch * _time_splits(cfg, batch, length, blocks)  # the grid's batch axis
    if rows > GRID_Y_MAX and blocks > GRID_Y_MAX:
        return (f"batch={batch} (x time splits: {rows}) and {blocks} channel blocks both "
                f"exceed the CUDA grid's y limit {GRID_Y_MAX}")
    return None


def default_config() -> TritonConfig:
    return TritonConfig()

