"""Training and inference throughput of ViM2-T and ViQS-T at 224x224 (bfloat16 compute).

    PYTHONPATH=. python benchmarks/vision_throughput.py                 # GPU
    PYTHONPATH=. python benchmarks/vision_throughput.py --quick         # tiny (CPU smoke test)

For each model and `scan_impl` (pallas, associative): images/s of a jitted AdamW training step
and of a jitted forward pass (median of several device-synchronised calls after warm-up, on
random images), and the model FLOPs utilisation: XLA's FLOP count of the compiled function
over its time, over the device's dense bf16 peak (--peak-tflops, default the H100 SXM
datasheet's 989). All functions compile first (in parallel), then each is timed alone and its
row printed; `--models`/`--impls` narrow the set when compilation time is short.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mmx_jax.models import create_model


def median_seconds(fn, *args, repeats: int) -> float:
    out = fn(*args)
    jax.block_until_ready(out)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def flops_of(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return float((cost or {}).get("flops", float("nan")))


def build(name: str, impl: str, *, size: int, batch: int, extra):
    """The jitted training step and forward pass of one model, with their arguments."""
    model = create_model(name, scan_impl=impl, dtype=jnp.bfloat16, **extra)
    optimizer = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)
    graphdef, state = nnx.split((model, optimizer))
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(batch, size, size, 3)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 10, batch), jnp.int32)

    def train(state, images, labels):
        model, optimizer = nnx.merge(graphdef, state)
        def loss_fn(m):
            logits = m(images)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return nnx.state((model, optimizer)), loss

    def infer(state, images):
        model, _ = nnx.merge(graphdef, state)
        model.eval()
        return model(images)

    return [("train", jax.jit(train).lower(state, images, labels), (state, images, labels)),
            ("inference", jax.jit(infer).lower(state, images), (state, images))]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--models", default="vim2_tiny,viqs_tiny")
    parser.add_argument("--impls", default="pallas,associative")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    args = parser.parse_args()
    size, batch, repeats, extra = 224, args.batch, 10, {}
    if args.quick:
        size, batch, repeats = 32, 2, 2
        extra = dict(widths=(8, 16, 32, 64), token_depths=(1, 1, 1, 1),
                     channel_depths=(1, 1, 1, 1), stem_stride=2, num_classes=10)
    print(f"device: {jax.devices()[0].device_kind}; {size}x{size}, bfloat16 compute, "
          f"batch {batch}; MFU against {args.peak_tflops:.0f} TFLOP/s")
    print("| model | scan impl | step | batch | images/s | MFU |")
    print("|---|---|---|---|---|---|")
    # Every function is compiled first, in parallel threads (XLA compiles outside the GIL),
    # then timed one after the other, so no timing overlaps another's work.
    jobs = [(name, impl, kind, lowered, fn_args)
            for impl in args.impls.split(",") for name in args.models.split(",")
            for kind, lowered, fn_args in build(name, impl, size=size, batch=batch,
                                                extra=extra)]
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        compiled = list(pool.map(lambda job: job[3].compile(), jobs))
    peak = args.peak_tflops * 1e12
    for (name, impl, kind, _, fn_args), fn in zip(jobs, compiled, strict=True):
        seconds = median_seconds(fn, *fn_args, repeats=repeats)
        flops = flops_of(fn)
        print(f"| {name} | {impl} | {kind} | {batch} | {batch / seconds:.0f} | "
              f"{100 * flops / seconds / peak:.1f} % |", flush=True)


if __name__ == "__main__":
    main()
