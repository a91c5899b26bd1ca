r"""Where the time of one image-classification training step goes, kernel by kernel.

    PYTHONPATH=. python benchmarks/profile_step.py --config configs/vim2.py:variant=cifar
    PYTHONPATH=. python benchmarks/profile_step.py --config configs/vim2.py:variant=cifar \
        --set model.scan_impl=associative --steps 5 --top 30
    PYTHONPATH=. python benchmarks/profile_step.py --config configs/vim2.py:smoke --quick

Builds the exact jitted training step of the config (its model, loss, on-device augmentation
and optimizer, on the config's mesh) over random images of the config's size, runs it under
`jax.profiler`, and reads the trace back (`jax.profiler.ProfileData`). Prints:
- the wall time per step and the time the device was busy (the union of kernel intervals),
  and the wall time when each step's batch comes from the host as in `train.py`;
- the kernel time by kind: Pallas/Triton kernels, matrix products and convolutions, other XLA
  fusions, copies;
- the `--top` kernels by total time, with their calls per step.

On a machine without a GPU it reports the host's XLA events instead, which only checks the
script. `--trace-dir` keeps the trace for TensorBoard / XProf.
"""

from __future__ import annotations

import argparse
import collections
import functools
import pathlib
import tempfile
import time

import jax

from mmx_jax.train.config_args import apply_overrides, load_config_file
from mmx_jax.train.loop import TrainStep, place_batch, setup
from mmx_jax.train.tasks.classification import ClassificationTask

REPO = pathlib.Path(__file__).resolve().parents[1]

KINDS = (  # (kind, substrings of the kernel name), first match wins
    ("copy/memset", ("memcpy", "memset", "copy")),
    ("matmul/conv", ("gemm", "xmma", "cutlass", "cublas", "conv", "dot", "wgmma", "sm90")),
    ("pallas", ("pallas", "triton", "_kernel", "selective_scan")),
)


def kind_of(name: str) -> str:
    lower = name.lower()
    for kind, keys in KINDS:
        if any(key in lower for key in keys):
            return kind
    return "other fusion"


def device_events(trace_dir: pathlib.Path):
    """(name, start_ns, duration_ns) of every kernel on the first device plane (or, without
    one, of the host's XLA threads)."""
    from jax.profiler import ProfileData

    files = sorted(trace_dir.rglob("*.xplane.pb"))
    if not files:
        raise FileNotFoundError(f"no *.xplane.pb under {trace_dir}")
    data = ProfileData.from_file(str(files[-1]))
    planes = list(data.planes)
    gpu = [p for p in planes if p.name.startswith("/device:GPU") or
           p.name.startswith("/device:TPU")]
    if gpu:
        lines = [line for line in gpu[0].lines if "stream" in line.name.lower()]
        lines = lines or [line for line in gpu[0].lines if "xla ops" in line.name.lower()]
        source = gpu[0].name
    else:
        host = next(p for p in planes if p.name == "/host:CPU")
        lines = [line for line in host.lines if line.name.startswith("tf_XLA")]
        source = "/host:CPU (no device plane: only a check of this script)"
    events = [(e.name, e.start_ns, e.duration_ns) for line in lines for e in line.events]
    return source, [line.name for line in lines], events


def busy_ns(events) -> float:
    """Length of the union of the events' intervals."""
    total, end = 0.0, -1.0
    for _, start, duration in sorted(events, key=lambda e: e[1]):
        stop = start + duration
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="configs/<file>.py[:args]")
    parser.add_argument("--set", action="append", default=[], help="key=value overrides")
    parser.add_argument("--steps", type=int, default=5, help="profiled steps")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--trace-dir", default=None)
    parser.add_argument("--quick", action="store_true", help="CPU check: 2 steps")
    args = parser.parse_args()
    steps = 2 if args.quick else args.steps

    config = apply_overrides(load_config_file(args.config), args.set)
    with tempfile.TemporaryDirectory() as workdir:
        run = setup(config, workdir, task=ClassificationTask.synthetic(config))
        state = run.init_state()
        # The learning rate does not change the work; position 0 also serves time-clocked
        # schedules (optimizer.schedule_clock="time").
        train_step = functools.partial(TrainStep(run), schedule_step=0.0)
        batches = run.task.train_batches(0, run.steps_per_epoch)
        batch = place_batch(run, next(batches), run.task.train_batch_size)
        start = time.perf_counter()
        state, metrics = train_step(state, batch)
        jax.block_until_ready(metrics)
        print(f"device: {jax.devices()[0].device_kind}; config {args.config} {args.set}; "
              f"batch {config.data.batch_size}; first step (compile) "
              f"{time.perf_counter() - start:.1f} s")
        for _ in range(2):  # warm-up
            state, metrics = train_step(state, batch)
        jax.block_until_ready(metrics)

        trace_dir = pathlib.Path(args.trace_dir or tempfile.mkdtemp(prefix="trace"))
        jax.profiler.start_trace(str(trace_dir))
        start = time.perf_counter()
        for _ in range(steps):
            state, metrics = train_step(state, batch)
        jax.block_until_ready(metrics)
        wall = (time.perf_counter() - start) / steps
        jax.profiler.stop_trace()

        # The same steps fed like train.py feeds them (host batch, placement, dispatch): a
        # wall time above the one of a resident batch means the host is the bottleneck.
        start = time.perf_counter()
        for _ in range(steps):
            state, metrics = train_step(state, place_batch(run, next(batches),
                                                      run.task.train_batch_size))
        jax.block_until_ready(metrics)
        fed = (time.perf_counter() - start) / steps

    source, line_names, events = device_events(trace_dir)
    busy = busy_ns(events) / steps / 1e6
    total = sum(e[2] for e in events) / steps / 1e6
    print(f"trace: {source}; lines {line_names}")
    print(f"wall {wall * 1e3:.2f} ms/step; device busy {busy:.2f} ms/step "
          f"({100 * busy / (wall * 1e3):.0f} %); kernel time summed {total:.2f} ms/step; "
          f"{len(events) / steps:.0f} kernels/step; wall with batches fed by the host "
          f"{fed * 1e3:.2f} ms/step")

    by_kind = collections.defaultdict(lambda: [0.0, 0])
    by_name = collections.defaultdict(lambda: [0.0, 0])
    for name, _, duration in events:
        for table, key in ((by_kind, kind_of(name)), (by_name, name)):
            table[key][0] += duration
            table[key][1] += 1
    print("\n| kind | ms/step | share | kernels/step |\n|---|---|---|---|")
    for kind, (ns, count) in sorted(by_kind.items(), key=lambda kv: -kv[1][0]):
        print(f"| {kind} | {ns / steps / 1e6:.2f} | {100 * ns / 1e6 / steps / total:.1f} % | "
              f"{count / steps:.0f} |")
    print("\n| top kernels | kind | ms/step | share | calls/step | µs/call |\n"
          "|---|---|---|---|---|---|")
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:args.top]
    for name, (ns, count) in ranked:
        short = name if len(name) <= 70 else name[:67] + "..."
        print(f"| {short} | {kind_of(name)} | {ns / steps / 1e6:.3f} | "
              f"{100 * ns / 1e6 / steps / total:.1f} % | {count / steps:.1f} | "
              f"{ns / count / 1e3:.1f} |")


if __name__ == "__main__":
    main()
