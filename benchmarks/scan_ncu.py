"""Profiles the Pallas scan kernels with Nsight Compute: a target to run under `ncu`, and a
per-time-step summary of the SASS instruction counts that `ncu` writes.

    NCU="ncu --kernel-name-base function -k selective_scan_fwd --launch-count 1"
    PYTHONPATH=. $NCU --section LaunchStats --section Occupancy --section WarpStateStats \\
        python benchmarks/scan_ncu.py run --config fwd_unroll=2
    PYTHONPATH=. $NCU --section SourceCounters --page source --print-source sass --csv \\
        python benchmarks/scan_ncu.py run > sass.csv
    python benchmarks/scan_ncu.py ops sass.csv --shape 8,2048,1536,16

`run` compiles the scan (forward only, or with --backward the forward and its vjp) for one
shape, dtype and TritonConfig, and runs it twice, so the kernels `ncu` selects launch after
compilation. `ops` reads the SASS page of `ncu --csv` and prints the warp instructions per
time step of one 32-channel program (batch x length x E / 32 steps), by opcode: the numbers
in notes/kernels.md (v5).
"""

from __future__ import annotations

import argparse
import collections
import csv
import re

from benchmarks.scan_bench import parse_config


def cmd_run(a):
    import jax  # noqa: PLC0415 - `ops` needs no jax
    import jax.numpy as jnp  # noqa: PLC0415

    from benchmarks.scan_bench import make_inputs, scan_fn  # noqa: PLC0415

    shape = tuple(int(v) for v in a.shape.split(","))
    x = make_inputs(shape, a.dtype)
    args = tuple(x[k] for k in ("u", "delta", "A", "B", "C", "D", "delta_bias"))
    f = scan_fn("pallas", parse_config(a.config))
    if a.backward:
        dy = jnp.ones_like(x["u"])

        def run(*args):
            y, vjp = jax.vjp(f, *args)
            return y, vjp(dy)
    else:
        run = f
    run = jax.jit(run)
    for _ in range(2):
        jax.block_until_ready(run(*args))


def cmd_ops(a):
    with open(a.csv) as fh:
        rows = list(csv.reader(line for line in fh if not line.startswith("==")))
    header = next((r for r in rows if "Source" in r and "Instructions Executed" in r), None)
    if header is None:
        raise SystemExit(f"{a.csv}: no SASS table (run ncu with --page source --print-source "
                         "sass --csv)")
    src, executed = header.index("Source"), header.index("Instructions Executed")
    ops = collections.Counter()
    for r in rows[rows.index(header) + 1:]:
        if len(r) > executed and r[executed].isdigit():
            text = re.sub(r"^@!?U?P\w+\s+", "", r[src].strip())  # drop a predicate
            ops[text.split()[0] if text else "?"] += int(r[executed])
    b, length, e, _ = (int(v) for v in a.shape.split(","))
    steps = b * length * e / 32
    print(f"{a.csv}: {sum(ops.values()) / steps:.1f} warp instructions per step of 32 channels")
    for op, count in ops.most_common(a.top):
        print(f"  {op:28s} {count / steps:7.1f}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the scan once compiled, for ncu to profile")
    run.add_argument("--shape", default="8,2048,1536,16", help="batch,length,E,N")
    run.add_argument("--dtype", default="bfloat16")
    run.add_argument("--config", default="", help="TritonConfig fields, e.g. fwd_unroll=2")
    run.add_argument("--backward", action="store_true", help="also run the vjp")
    ops = sub.add_parser("ops", help="instructions per step from ncu's SASS csv")
    ops.add_argument("csv")
    ops.add_argument("--shape", default="8,2048,1536,16", help="the profiled batch,length,E,N")
    ops.add_argument("--top", type=int, default=20)
    a = ap.parse_args(argv)
    {"run": cmd_run, "ops": cmd_ops}[a.command](a)


if __name__ == "__main__":
    main()
