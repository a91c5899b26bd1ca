"""Looks inside the Pallas scan kernels: Nsight Compute profiles on the GPU, and their SASS
compiled on any machine.

    NCU="ncu --kernel-name-base function -k selective_scan_fwd --launch-count 1"
    PYTHONPATH=. $NCU --section LaunchStats --section Occupancy --section WarpStateStats \\
        python benchmarks/scan_ncu.py run --config fwd_unroll=2
    PYTHONPATH=. $NCU --section SourceCounters --page source --print-source sass --csv \\
        python benchmarks/scan_ncu.py run > sass.csv
    python benchmarks/scan_ncu.py ops sass.csv --shape 8,2048,1536,16
    PYTHONPATH=. python benchmarks/scan_ncu.py sass --config fast_softplus=0   # no GPU needed
    PYTHONPATH=. python benchmarks/scan_ncu.py sass --barriers --keep cubins
    python benchmarks/scan_ncu.py waits listing.txt   # any `cuobjdump -sass` output

`run` compiles the scan (forward only, or with --backward the forward and its vjp) for one
shape, dtype and TritonConfig, and runs it twice, so the kernels `ncu` selects launch after
compilation. `ops` reads the SASS page of `ncu --csv` and prints the warp instructions per
time step of one 32-channel program (batch x length x E / 32 steps), by opcode: the numbers
in notes/kernels.md (v5).

`sass` needs no GPU: it lowers the scan and its vjp for CUDA on this machine (through a
private hook of JAX's Pallas Triton lowering), compiles each kernel's Triton IR for sm_90
with the `triton` package (`pip install triton`; its bundled ptxas and cuobjdump), and prints
each kernel's registers, stack frame and the instructions of its shortest loop per time step
(the loop body over the steps it unrolls: the forward's and summaries' step loop, the
backward's recompute loop; the backward's reverse walk is not a loop of its own), by opcode.
jaxlib compiles with its own copy of Triton, so the code can differ a little from what runs:
the forward's 190 per step (fast_softplus=0) compare with ncu's 202 (notes/kernels.md, v6).
With --barriers it also decodes the loop's scheduling control words and lists the waits on
scoreboards that global loads set: where ptxas shares a load's scoreboard with a
short-latency result, waiting for that result waits for the loads too (notes/kernels.md,
v7). --keep saves the cubins.
"""

from __future__ import annotations

import argparse
import collections
import csv
import re
from typing import NamedTuple

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
            ops[_opcode(r[src])] += int(r[executed])
    b, length, e, _ = (int(v) for v in a.shape.split(","))
    steps = b * length * e / 32
    print(f"{a.csv}: {sum(ops.values()) / steps:.1f} warp instructions per step of 32 channels")
    for op, count in ops.most_common(a.top):
        print(f"  {op:28s} {count / steps:7.1f}")


def _opcode(text: str) -> str:
    """The opcode of one SASS instruction, without its predicate and modifiers."""
    text = re.sub(r"^@!?U?P\w+\s+", "", text.strip())
    return text.split()[0].split(".")[0] if text else "?"


class Instruction(NamedTuple):
    address: int
    text: str
    high: int | None  # the high 64 bits of its encoding (scheduling control), if listed


def instructions(sass: str) -> list[Instruction]:
    """The instructions of a `cuobjdump -sass` listing: each line with an address, and the
    high word of its encoding from the line after it (a line holding only a hex comment)."""
    lines = sass.splitlines()
    out = []
    for i, line in enumerate(lines):
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if m:
            nxt = re.fullmatch(r"\s*/\* 0x([0-9a-f]{16}) \*/\s*", lines[i + 1]) if (
                i + 1 < len(lines)) else None
            out.append(Instruction(int(m.group(1), 16), m.group(2),
                                   int(nxt.group(1), 16) if nxt else None))
    return out


def inner_loops(ins: list[Instruction]) -> list[list[Instruction]]:
    """The backward-branching loops with no other loop inside them, in address order."""
    index = {x.address: i for i, x in enumerate(ins)}
    loops = []
    for i, x in enumerate(ins):
        m = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", x.text)
        target = int(m.group(1), 16) if m else None
        if target is not None and target < x.address and target in index:
            loops.append((index[target], i + 1))
    inner = [(a, b) for a, b in loops
             if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in loops)]
    return [ins[a:b] for a, b in sorted(inner)]


def _step_loop(loops: list[list[Instruction]]) -> list[Instruction]:
    # The longest inner loop is the step loop: the main kernels also have a short one folding
    # the other segments' summaries into their start, the backward its recompute loop.
    return max(loops, key=len, default=[])


def _innermost(ins: list[Instruction]) -> list[Instruction]:
    return _step_loop(inner_loops(ins))


def innermost_loop(sass: str) -> list[str]:
    """The instructions of the longest backward-branching loop with no loop inside it (the step
    loop) of one kernel's SASS listing (`cuobjdump -sass`), or [] if it has none."""
    return [x.text for x in _innermost(instructions(sass))]


NO_BARRIER = 7


class Control(NamedTuple):
    """The scheduling fields of an sm_70+ instruction (bits 105-125 of its 128-bit encoding,
    41-61 of the high word; as decoded in Jia et al., "Dissecting the NVIDIA Volta GPU
    Architecture via Microbenchmarking", 2018). A variable-latency instruction (a memory
    load, MUFU, SHFL, ...) names one of six scoreboards that clears once its result is
    written (`write`), and one that clears once its sources are read (`read`); a later
    instruction waits for every scoreboard in its `wait` mask to clear."""

    stall: int
    yield_: bool
    write: int  # 0-5, or NO_BARRIER
    read: int
    wait: int  # bit b: waits on scoreboard b


def control(high: int) -> Control:
    return Control(stall=high >> 41 & 15, yield_=bool(high >> 45 & 1), write=high >> 46 & 7,
                   read=high >> 49 & 7, wait=high >> 52 & 63)


class LoadWait(NamedTuple):
    text: str  # the waiting instruction
    loads: int  # global loads it waits for (on the scoreboards it waits on)
    others: tuple[str, ...]  # other producers on those scoreboards (the result it wants)
    distance: int  # instructions since the latest of those loads was issued


def load_waits(loop: list[Instruction]) -> list[LoadWait]:
    """The instructions of a loop body that wait on a scoreboard a global load (LDG) has set.
    The body is walked twice, as the loop runs, so loads issued late in one iteration are
    pending at the top of the next; the second walk is reported. A wait whose scoreboard also
    covers another producer (`others`) stalls for the loads while it only needs that other
    result: ptxas has six scoreboards and shares them when more are in flight."""
    if any(x.high is None for x in loop):
        raise ValueError("the listing has no control words (cuobjdump -sass prints them)")
    pending: dict[int, list[tuple[str, int]]] = {b: [] for b in range(6)}
    found = []
    for step, x in enumerate(loop + loop):
        c = control(x.high)
        waited = [b for b in range(6) if c.wait >> b & 1]
        producers = [pr for b in waited for pr in pending[b]]
        loads = [at for op, at in producers if op == "LDG"]
        if step >= len(loop) and loads:
            found.append(LoadWait(x.text, len(loads), tuple(op for op, _ in producers
                                                             if op != "LDG"),
                                  step - max(loads)))
        for b in waited:
            pending[b] = []
        if c.write != NO_BARRIER:
            pending[c.write].append((_opcode(x.text), step))
    return found


def print_load_waits(body: list[Instruction]):
    loads = [x for x in body if _opcode(x.text) == "LDG"]
    boards = sorted({control(x.high).write for x in loads} - {NO_BARRIER})
    print(f"   {len(loads)} global loads on scoreboards {boards}; waits on them:")
    for w in load_waits(body):
        shared = f", shared with {', '.join(sorted(set(w.others)))}" if w.others else ""
        print(f"     {w.text:44s} {w.loads:2d} loads, {w.distance:3d} instructions after the "
              f"last{shared}")


def functions(sass: str) -> dict[str, str]:
    """The listing of each function of a `cuobjdump -sass` dump, by name."""
    parts = re.split(r"^\s*Function : (\S+)\s*$", sass, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def cmd_waits(a):
    with open(a.listing) as fh:
        found = functions(fh.read())
    names = [n for n in found if re.search(a.kernel, n)]
    if not names:
        raise SystemExit(f"{a.listing}: no function matches {a.kernel!r} (it has: "
                         f"{', '.join(found) or 'none; is it cuobjdump -sass output?'})")
    for name in names:
        body = _innermost(instructions(found[name]))
        print(f"{name}: innermost loop of {len(body)} instructions")
        print_load_waits(body)


def cmd_sass(a):
    import os  # noqa: PLC0415
    import shutil  # noqa: PLC0415
    import subprocess  # noqa: PLC0415
    import tempfile  # noqa: PLC0415

    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    import kernels_pallas  # noqa: PLC0415
    from benchmarks.scan_bench import make_inputs  # noqa: PLC0415
    try:
        import triton  # noqa: PLC0415
        from jax._src.pallas.triton import pallas_call_registration as registration  # noqa: PLC0415
        from triton.backends.compiler import GPUTarget  # noqa: PLC0415
    except ImportError as err:
        raise SystemExit("sass needs the triton package and JAX's Pallas Triton lowering: "
                         f"{err}") from err
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    cfg = parse_config(a.config)
    shape = tuple(int(v) for v in a.shape.split(","))
    x = make_inputs(shape, a.dtype)
    args = tuple(x[k] for k in ("u", "delta", "A", "B", "C", "D", "delta_bias"))

    def loss(*xs):
        y = kernels_pallas.selective_scan(*xs[:5], D=xs[5], delta_bias=xs[6],
                                          delta_softplus=True, backend="triton",
                                          interpret=False, config=cfg)
        return jnp.sum(y.astype(jnp.float32))

    modules, lower = [], registration.lowering.lower_jaxpr_to_triton_module

    def capture(*args, **kwargs):
        result = lower(*args, **kwargs)
        modules.append(result.module)
        return result

    registration.lowering.lower_jaxpr_to_triton_module = capture
    try:
        jax.jit(jax.grad(loss, argnums=tuple(range(7)))).trace(*args).lower(
            lowering_platforms=("cuda",))
    finally:
        registration.lowering.lower_jaxpr_to_triton_module = lower
    print(f"shape {shape} {a.dtype}, config {a.config or 'default'}, sm_{a.arch}")
    with tempfile.TemporaryDirectory() as tmp:
        for module in modules:
            name = str(module.operation.attributes["sym_name"]).strip('"')
            backward = name.startswith("selective_scan_bwd")
            warps = cfg.bwd_warps if backward else cfg.fwd_warps
            # the summaries walk in the forward's chunks (triton_scan)
            steps = cfg.bwd_unroll if backward and not name.endswith("summary") else cfg.fwd_unroll
            path = os.path.join(tmp, f"{name}.ttir")
            with open(path, "w") as fh:
                fh.write(str(module))
            kernel = triton.compile(path, target=GPUTarget("cuda", a.arch, 32),
                                    options=dict(num_warps=warps, num_stages=cfg.num_stages))
            cubin = os.path.join(tmp, f"{name}.cubin")
            with open(cubin, "wb") as fh:
                fh.write(kernel.asm["cubin"])
            if a.keep:
                os.makedirs(a.keep, exist_ok=True)
                shutil.copy(cubin, a.keep)
            dump = lambda flag, cubin=cubin: subprocess.run(  # noqa: E731
                [os.path.join(bin_dir, "cuobjdump"), flag, cubin], capture_output=True,
                text=True, check=True).stdout
            usage = dump("-res-usage")
            regs = re.search(r"REG:(\d+)", usage)
            stack = re.search(r"STACK:(\d+)", usage)
            loops = inner_loops(instructions(dump("-sass")))
            print(f"{name}: {regs.group(1) if regs else '?'} registers, stack "
                  f"{stack.group(1) if stack else '?'} bytes; {len(loops)} inner loops")
            for body in loops:
                # Every inner loop is divided by the step count: for the short carry loop of
                # the main kernels (one segment a trip) only its length means anything.
                ops = collections.Counter(_opcode(x.text) for x in body)
                print(f"  loop of {len(body)} instructions, over {steps} steps "
                      f"{len(body) / steps:.1f} per step")
                print("   " + ", ".join(f"{op} {n / steps:.1f}"
                                        for op, n in ops.most_common(a.top)))
            if a.barriers:
                print_load_waits(_step_loop(loops))


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
    sass = sub.add_parser("sass", help="registers and SASS per step, compiled here (no GPU)")
    sass.add_argument("--shape", default="8,2048,1536,16", help="batch,length,E,N")
    sass.add_argument("--dtype", default="bfloat16")
    sass.add_argument("--config", default="", help="TritonConfig fields, e.g. fwd_unroll=2")
    sass.add_argument("--arch", type=int, default=90, help="compute capability (90: H100/H200)")
    sass.add_argument("--top", type=int, default=16)
    sass.add_argument("--keep", default="", help="a folder to keep the compiled cubins in")
    sass.add_argument("--barriers", action="store_true",
                      help="list the loop's waits on scoreboards that global loads set")
    waits = sub.add_parser("waits", help="the loop's waits on global loads' scoreboards, "
                           "from a cuobjdump -sass listing made anywhere")
    waits.add_argument("listing")
    waits.add_argument("--kernel", default="selective_scan", help="regex on function names")
    a = ap.parse_args(argv)
    {"run": cmd_run, "ops": cmd_ops, "sass": cmd_sass, "waits": cmd_waits}[a.command](a)


if __name__ == "__main__":
    main()
