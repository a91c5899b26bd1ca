r"""Where the compilation time of a config's training and evaluation steps goes.

    PYTHONPATH=. python benchmarks/compile_time.py --config configs/vim2.py:variant=cifar
    PYTHONPATH=. python benchmarks/compile_time.py --config configs/vim2.py:variant=cifar \
        --variant default= --variant no-autotune=--xla_gpu_autotune_level=0 \
        --variant associative=@model.scan_impl=associative
    PYTHONPATH=. python benchmarks/compile_time.py --config configs/vim2.py:smoke

Each variant runs in its own process (XLA flags are read once per process). A variant is
`name=` followed by XLA flags, or by `@key=value` config overrides (several separated by
spaces). For the config's jitted training step and its evaluation step on random inputs of the
config's shapes it times Python tracing, lowering to StableHLO (the Pallas kernels' Triton or
Mosaic lowering happens here) and XLA's backend compile (Triton/PTX compilation of the kernels
and autotuning happen here), and counts the Pallas custom calls. It also times the jitted
initialisation of the state (compiled and run). Prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
PALLAS_MARKERS = ("__gpu$xla.gpu.triton", "tpu_custom_call")


def measure(config_arg: str, overrides: list[str]) -> dict:
    """One process's timings (seconds) for the train and eval steps."""
    import jax  # noqa: PLC0415

    from mmx_jax.train.config_args import apply_overrides, load_config_file  # noqa: PLC0415
    from mmx_jax.train.loop import EvalStep, TrainStep, place_batch, setup  # noqa: PLC0415
    from mmx_jax.train.tasks.classification import ClassificationTask  # noqa: PLC0415

    config = apply_overrides(load_config_file(config_arg), overrides)
    row = {"device": jax.devices()[0].device_kind, "jax": jax.__version__}
    with tempfile.TemporaryDirectory() as workdir:
        start = time.perf_counter()
        run = setup(config, workdir, task=ClassificationTask.synthetic(config))
        row["setup_s"] = time.perf_counter() - start
        start = time.perf_counter()
        state = jax.block_until_ready(run.init_state())
        row["init_s"] = time.perf_counter() - start  # compiled and run
        train_batch = place_batch(run, next(run.task.train_batches(0, run.steps_per_epoch)),
                                  run.task.train_batch_size)
        eval_batch = place_batch(run, next(run.task.eval_batches("val")),
                                 run.task.eval_batch_size)
        for name, trace in (("train", lambda: TrainStep(run).trace(state, train_batch)),
                            ("eval", lambda: EvalStep(run).trace(state, eval_batch))):
            start = time.perf_counter()
            traced = trace()
            traced_at = time.perf_counter()
            lowered = traced.lower()
            lowered_at = time.perf_counter()
            lowered.compile()
            row[f"{name}_trace_s"] = traced_at - start
            row[f"{name}_lower_s"] = lowered_at - traced_at
            row[f"{name}_compile_s"] = time.perf_counter() - lowered_at
            text = lowered.as_text()
            row[f"{name}_pallas_calls"] = sum(text.count(m) for m in PALLAS_MARKERS)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="configs/<file>.py[:args]")
    parser.add_argument("--set", action="append", default=[], help="key=value overrides")
    parser.add_argument("--variant", action="append", default=[],
                        help="name=XLA flags, or name=@key=value overrides (default: one "
                             "variant with the environment's flags)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:  # one measurement, in a fresh process
        print("ROW " + json.dumps(measure(args.config, args.set + json.loads(args.child))))
        return

    variants = args.variant or ["default="]
    rows = []
    for variant in variants:
        name, sep, spec = variant.partition("=")
        if not sep:
            parser.error(f"--variant {variant!r}: wanted name=flags or name=@key=value")
        words = spec.split()
        overrides = [w[1:] for w in words if w.startswith("@")]
        flags = " ".join(w for w in words if not w.startswith("@"))
        env = dict(os.environ)
        if flags:
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + flags).strip()
        cmd = [sys.executable, __file__, "--config", args.config, "--child",
               json.dumps(overrides)] + [f"--set={s}" for s in args.set]
        start = time.perf_counter()
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("ROW ")]
        if done.returncode or not lines:
            sys.stderr.write(done.stdout[-3000:] + done.stderr[-3000:])
            print(f"{name}: failed (exit {done.returncode})", flush=True)
            continue
        row = {"variant": name, "flags": spec or "(environment)",
               "process_s": time.perf_counter() - start, **json.loads(lines[-1][4:])}
        rows.append(row)
        print(json.dumps(row), flush=True)

    if not rows:
        sys.exit(1)
    print(f"\n{rows[0]['device']}, jax {rows[0]['jax']}; config {args.config} {args.set}; "
          "seconds\n")
    print("| variant | init state | train trace | lower | compile | pallas calls | eval trace | "
          "lower | compile | whole process |\n|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} ({r['flags']}) | {r['init_s']:.1f} | {r['train_trace_s']:.1f} | "
              f"{r['train_lower_s']:.1f} | {r['train_compile_s']:.1f} | "
              f"{r['train_pallas_calls']} | {r['eval_trace_s']:.1f} | {r['eval_lower_s']:.1f} | "
              f"{r['eval_compile_s']:.1f} | {r['process_s']:.1f} |")


if __name__ == "__main__":
    main()
