"""Times the selective-scan implementations and prints a table against the bytes-moved floor.

    PYTHONPATH=. python benchmarks/scan_bench.py                 # the three issue shapes
    PYTHONPATH=. python benchmarks/scan_bench.py --quick         # tiny shapes (CPU smoke test)
    PYTHONPATH=. python benchmarks/scan_bench.py --cpu --impls associative,sequential \\
        --dtypes float32                                   # what "auto" picks on a CPU
    PYTHONPATH=. python benchmarks/scan_bench.py --skip-sequential 0,1 --dtypes float32
    PYTHONPATH=. python benchmarks/scan_bench.py --impls pallas \\
        --triton-config block_e=32,fwd_unroll=8 --triton-config block_e=64,fwd_warps=2
    PYTHONPATH=. python benchmarks/scan_bench.py --impls pallas \\
        --triton-config time_splits=1 --triton-config time_splits=4   # 0: auto
    PYTHONPATH=. python benchmarks/scan_bench.py --impls pallas --shapes 0 --repeat 3 \\
        --triton-config time_splits=0 --triton-config time_splits=5   # medians of 3 rounds

Each row: forward alone (no residuals saved: what inference runs), forward under `jax.vjp`
(saving the backward's residuals: what training runs), backward alone (the vjp of saved
residuals) and forward+backward (one jitted vjp), in microseconds, the median of many
device-synchronised runs after a warm-up. Inputs use D and delta_bias with softplus on, no z
(the setting of the mamba_ssm reference numbers).

With --repeat R the whole list is timed R times over, in rounds (so configs alternate rather
than run back to back), and a second table gives each row's median and range over the rounds:
on a shared GPU one config's readings can spread by 15-20 % within a call.

The floor is the bytes moved (each input read once, each output written once) over the copy
bandwidth measured here with a large device-to-device copy; `x floor` is time / floor. Peak
memory is XLA's own accounting of the compiled function (arguments + outputs + temporaries).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import kernels_pallas
from kernels_pallas.triton_scan import TritonConfig
from mmx_jax.ssm import selective_scan

SHAPES = ((8, 2048, 1536, 16), (128, 3136, 192, 16), (256, 96, 128, 16))
QUICK_SHAPES = ((2, 40, 48, 16), (3, 17, 32, 8))
# The scans of CPU runs: TSM2's quick start (time mixer: 32 windows x 7 variates over 41
# patches; variate mixer: 32 x 41 over 7 variates; E = 32, N = 4), ViM2's smoke config at
# 32x32 (256 tokens) and ViM2-Tiny's first stage at 224x224 (3136 tokens), batch 2.
CPU_SHAPES = ((224, 41, 32, 4), (1312, 7, 32, 4), (16, 256, 32, 16), (2, 3136, 192, 16))
# mamba_ssm on an H100 80GB (microseconds; its bwd is the backward call alone), and the JAX
# associative scan on the same card, from the issue text.
MAMBA_US = {
    (8, 2048, 1536, 16): {"float32": (834, 2121), "bfloat16": (419, 1836)},
    (128, 3136, 192, 16): {"float32": (3423, 10067), "bfloat16": (2914, 11134)},
    (256, 96, 128, 16): {"float32": (156, 415), "bfloat16": (154, 419)},
}


@dataclasses.dataclass
class Row:
    shape: tuple
    dtype: str
    impl: str
    fwd_us: float | None = None
    fwd_vjp_us: float | None = None
    bwd_us: float | None = None
    fb_us: float | None = None
    fwd_floor_us: float = 0.0
    fb_floor_us: float = 0.0
    peak_mib: float | None = None
    note: str = ""


def sync(x):
    return jax.block_until_ready(x)


def time_us(fn, *args, budget_s: float = 2.0, min_samples: int = 10) -> float:
    """Median microseconds per call; each sample runs enough calls to last about 5 ms."""
    sync(fn(*args))  # compile and warm up
    sync(fn(*args))
    t0 = time.perf_counter()
    sync(fn(*args))
    once = max(time.perf_counter() - t0, 1e-6)
    inner = max(1, int(5e-3 / once))
    samples = []
    deadline = time.perf_counter() + budget_s
    while len(samples) < min_samples or (time.perf_counter() < deadline and len(samples) < 50):
        t0 = time.perf_counter()
        out = None
        for _ in range(inner):
            out = fn(*args)
        sync(out)
        samples.append((time.perf_counter() - t0) / inner)
    return statistics.median(samples) * 1e6


def copy_bandwidth(n_bytes: int) -> float:
    """Bytes per second of a device-to-device copy (read + write counted)."""
    x = jnp.arange(n_bytes // 4, dtype=jnp.float32)
    copy = jax.jit(lambda v: v + 1.0)
    us = time_us(copy, x, budget_s=1.0)
    return 2 * x.size * 4 / (us * 1e-6)


def make_inputs(shape, dtype, seed=0):
    b, length, e, n = shape
    rng = np.random.default_rng(seed)
    dt = np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), e))
    arrs = dict(
        u=rng.standard_normal((b, length, e)),
        delta=rng.standard_normal((b, length, e)) * 0.5,
        A=-np.broadcast_to(np.arange(1, n + 1, dtype=np.float64), (e, n)),
        B=rng.standard_normal((b, length, n)),
        C=rng.standard_normal((b, length, n)),
        D=rng.standard_normal(e),
        delta_bias=dt + np.log(-np.expm1(-dt)),  # inverse softplus of dt
    )
    low = {"u", "delta", "B", "C"}
    return {k: jnp.asarray(v, dtype if k in low else jnp.float32) for k, v in arrs.items()}


def floors(shape, dtype, bandwidth):
    b, length, e, n = shape
    item = jnp.dtype(dtype).itemsize
    big, small = b * length * e * item, b * length * n * item
    fwd = 3 * big + 2 * small  # u, delta, B, C read; y written
    bwd = 5 * big + 4 * small  # u, delta, dy, B, C read; du, ddelta, dB, dC written
    return fwd / bandwidth * 1e6, (fwd + bwd) / bandwidth * 1e6


def scan_fn(impl: str, config: TritonConfig | None):
    def f(u, delta, A, B, C, D, delta_bias):
        kw = dict(D=D, delta_bias=delta_bias, delta_softplus=True)
        if impl == "pallas" and config is not None:
            return kernels_pallas.selective_scan(u, delta, A, B, C, config=config, **kw)
        return selective_scan(u, delta, A, B, C, impl=impl, **kw)
    return f


def peak_mib(compiled) -> float | None:
    try:
        m = compiled.memory_analysis()
        return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes) / 2**20
    except Exception:  # noqa: BLE001 - not every backend reports it
        return None


def bench_one(shape, dtype, impl, config, budget_s) -> Row:
    row = Row(shape, jnp.dtype(dtype).name, impl, note="")
    x = make_inputs(shape, dtype)
    args = tuple(x[k] for k in ("u", "delta", "A", "B", "C", "D", "delta_bias"))
    f = scan_fn(impl, config)
    fwd = jax.jit(f)
    dy = jnp.asarray(np.random.default_rng(1).standard_normal(x["u"].shape), dtype)

    def fwd_bwd(args, dy):
        y, vjp = jax.vjp(f, *args)
        return y, vjp(dy)

    fb = jax.jit(fwd_bwd)
    bwd = jax.jit(lambda vjp, dy: vjp(dy))
    row.fwd_us = time_us(fwd, *args, budget_s=budget_s)
    row.fwd_vjp_us = time_us(jax.jit(functools.partial(forward_saving, f)), *args,
                             budget_s=budget_s)
    _, vjp = jax.vjp(fwd, *args)
    row.bwd_us = time_us(bwd, vjp, dy, budget_s=budget_s)
    del vjp
    fb_compiled = fb.lower(args, dy).compile()
    row.fb_us = time_us(fb_compiled, args, dy, budget_s=budget_s)
    row.peak_mib = peak_mib(fb_compiled)
    return row


def forward_saving(f, *args):
    """y and the residuals that `jax.vjp(f, *args)` computes, less those that are `args`
    themselves: returned from a jitted function they would be copied, which a training step,
    where they stay inside one computation, does not do."""
    y, vjp = jax.vjp(f, *args)
    given = {id(x) for x in args}
    return y, [r for r in jax.tree.leaves(vjp) if id(r) not in given]


def fmt(v, spec="{:.0f}"):
    return "-" if v is None else spec.format(v)


def print_table(rows, bandwidth, device):
    print(f"\ndevice: {device}; copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write)")
    head = ("| shape (b, L, E, N) | dtype | impl | fwd us | fwd (vjp) us | bwd us | fwd+bwd us "
            "| fwd floor us "
            "| fwd x floor | f+b floor us | f+b x floor | peak MiB | mamba fwd / bwd us |")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        ref = MAMBA_US.get(tuple(r.shape), {}).get(r.dtype)
        mamba = f"{ref[0]} / {ref[1]}" if ref else "-"
        fx = r.fwd_us / r.fwd_floor_us if r.fwd_us else None
        fbx = r.fb_us / r.fb_floor_us if r.fb_us else None
        cells = [str(tuple(r.shape)), r.dtype, r.impl + (f" ({r.note})" if r.note else ""),
                 fmt(r.fwd_us), fmt(r.fwd_vjp_us), fmt(r.bwd_us), fmt(r.fb_us),
                 fmt(r.fwd_floor_us, "{:.1f}"),
                 fmt(fx, "{:.1f}"), fmt(r.fb_floor_us, "{:.1f}"), fmt(fbx, "{:.1f}"),
                 fmt(r.peak_mib), mamba]
        print("| " + " | ".join(cells) + " |")
    sys.stdout.flush()


def print_spread(rows, repeat):
    """Median (min-max) of each row's timings over the rounds, rows in first-seen order."""
    groups = {}
    for r in rows:
        groups.setdefault((tuple(r.shape), r.dtype, r.impl, r.note), []).append(r)

    def cell(values):
        values = [v for v in values if v is not None]
        if not values:
            return "-"
        return f"{statistics.median(values):.0f} ({min(values):.0f}-{max(values):.0f})"

    print(f"\nmedian (min-max) over {repeat} rounds, us")
    print("| shape (b, L, E, N) | dtype | impl | fwd | fwd (vjp) | bwd | fwd+bwd | readings |")
    print("|---|---|---|---|---|---|---|---|")
    for (shape, dtype, impl, note), group in groups.items():
        label = impl + (f" ({note})" if note else "")
        print(f"| {shape} | {dtype} | {label} | " + " | ".join(
            cell([getattr(r, k) for r in group])
            for k in ("fwd_us", "fwd_vjp_us", "bwd_us", "fb_us"))
            + f" | {len(group)} |")
    sys.stdout.flush()


def parse_config(text: str) -> TritonConfig:
    kw = {}
    for item in filter(None, text.split(",")):
        key, val = item.split("=")
        field_type = type(getattr(TritonConfig(), key))
        kw[key] = (val.lower() in ("1", "true", "yes")) if field_type is bool else int(val)
    return TritonConfig(**kw)


def timed_row(shape, dtype, impl, config, skip, bandwidth, budget) -> Row:
    """One row of the table (failures and skips become a note), printed as it finishes."""
    t0 = time.time()
    if skip:
        r = Row(shape, dtype, impl, note="skipped: too slow")
    else:
        try:
            r = bench_one(shape, dtype, impl, config, budget)
        except Exception as err:  # noqa: BLE001 - report and go on
            r = Row(shape, dtype, impl, note=f"failed: {type(err).__name__}: "
                    f"{str(err).splitlines()[0][:120]}")
    r.fwd_floor_us, r.fb_floor_us = floors(shape, dtype, bandwidth)
    if config is not None:
        changed = {k: v for k, v in config._asdict().items() if v != getattr(TritonConfig(), k)}
        r.note = (r.note + " " if r.note else "") + ",".join(
            f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in changed.items())
    if not skip:
        print(f"[{time.time() - t0:.1f}s] {r}", flush=True)
    return r


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes, short timings (CPU)")
    ap.add_argument("--cpu", action="store_true", help="the shapes of the models' CPU runs")
    ap.add_argument("--impls", default="pallas,associative,sequential")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--shapes", default=None, help="indices into the shape list, e.g. 0,2")
    ap.add_argument("--skip-sequential", default="",
                    help="shape indices where the sequential scan is not timed (too slow)")
    ap.add_argument("--triton-config", action="append", default=[],
                    help="TritonConfig fields, e.g. block_e=64,fwd_warps=2 (repeatable)")
    ap.add_argument("--budget", type=float, default=None, help="seconds of samples per timing")
    ap.add_argument("--repeat", type=int, default=1,
                    help="time the whole list this many times over, in rounds")
    a = ap.parse_args(argv)
    if a.repeat < 1:
        ap.error(f"--repeat {a.repeat}: wanted >= 1")
    shapes = QUICK_SHAPES if a.quick else CPU_SHAPES if a.cpu else SHAPES
    idx = range(len(shapes)) if a.shapes is None else [int(i) for i in a.shapes.split(",")]
    skip_seq = {int(i) for i in a.skip_sequential.split(",") if i}
    budget = a.budget if a.budget is not None else (0.2 if a.quick else 1.5)
    device = jax.devices()[0].device_kind
    bandwidth = copy_bandwidth(2**24 if a.quick else 2**30)
    configs = [parse_config(c) for c in a.triton_config] or [None]
    plan = [(shapes[i], dtype, impl, config, impl == "sequential" and i in skip_seq)
            for i in idx for dtype in a.dtypes.split(",") for impl in a.impls.split(",")
            for config in (configs if impl == "pallas" else [None])]
    rows = [timed_row(*job, bandwidth, budget) for _ in range(a.repeat) for job in plan]
    print_table(rows, bandwidth, device)
    if a.repeat > 1:
        print_spread(rows, a.repeat)
    return rows


if __name__ == "__main__":
    main()
