"""Training and inference throughput of ViM2-T and ViQS-T at 224x224 (bfloat16 compute).

    PYTHONPATH=. python benchmarks/vision_throughput.py --models vim2_tiny    # GPU, one model
    PYTHONPATH=. python benchmarks/vision_throughput.py --models viqs_tiny
    PYTHONPATH=. python benchmarks/vision_throughput.py --quick   # tiny models (CPU smoke test)

For each model, scan layout (`--layouts`: "walks", the token mixers' scans reading the map in
place through `selective_scan_2d`, against "permuted", the earlier layout path of a permuted
copy per scan order), batch size (`--batches`, 128 and 64 by default) and `scan_impl`
(`--impls`, pallas by default): images/s of a jitted AdamW training step and of a jitted
forward pass (median of several device-synchronised calls after warm-up, on random images),
and the model FLOPs utilisation: XLA's FLOP count of the compiled function over its time, over
the device's dense bf16 peak (--peak-tflops, default the H100 SXM datasheet's 989). XLA counts
no FLOPs in the Pallas custom calls (the scans), so MFU counts the matmuls, convolutions and
elementwise work; it is the same count for both layouts up to their layout ops.

All functions compile first (in parallel threads), then each is timed alone, its row printed
as it comes; a last table gives the walks/permuted throughput ratio of every pair.
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


def build(name: str, impl: str, layout: str, *, size: int, batch: int, extra):
    """The jitted training step and forward pass of one model, with their arguments."""
    model = create_model(name, scan_impl=impl, scan_layout=layout, dtype=jnp.bfloat16, **extra)
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


def ratio_rows(results: dict) -> list[str]:
    """'| model | impl | step | batch | walks | permuted | walks / permuted |' rows."""
    rows = []
    for (name, impl, kind, batch, layout), rate in results.items():
        other = results.get((name, impl, kind, batch, "permuted"))
        if layout == "walks" and other:
            rows.append(f"| {name} | {impl} | {kind} | {batch} | {rate:.0f} | {other:.0f} | "
                        f"{rate / other:.2f}x |")
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny models on 32x32 images, batch 2 (a CPU smoke test)")
    parser.add_argument("--models", default="vim2_tiny,viqs_tiny")
    parser.add_argument("--layouts", default="walks,permuted")
    parser.add_argument("--impls", default=None,
                        help="scan_impl values (default pallas; with --quick auto, which is "
                             "the sequential scan on a CPU: interpret-mode kernels are slow)")
    parser.add_argument("--batches", default="128,64")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    args = parser.parse_args()
    size, batches, repeats, extra = 224, [int(b) for b in args.batches.split(",")], args.repeats, {}
    impls = args.impls or ("auto" if args.quick else "pallas")
    if args.quick:
        size, batches, repeats = 32, [2], 2
        extra = dict(widths=(8, 16, 32, 64), token_depths=(1, 1, 1, 1),
                     channel_depths=(1, 1, 1, 1), stem_stride=2, num_classes=10)
    print(f"device: {jax.devices()[0].device_kind}; jax {jax.__version__}; {size}x{size}, "
          f"bfloat16 compute; MFU against {args.peak_tflops:.0f} TFLOP/s")
    print("| model | scan impl | scan layout | step | batch | images/s | ms/step | MFU |")
    print("|---|---|---|---|---|---|---|---|")
    # Every function is compiled first, in parallel threads (XLA compiles outside the GIL),
    # then timed one after the other, so no timing overlaps another's work.
    jobs = [(name, impl, layout, batch, kind, lowered, fn_args)
            for name in args.models.split(",") for batch in batches
            for impl in impls.split(",") for layout in args.layouts.split(",")
            for kind, lowered, fn_args in build(name, impl, layout, size=size, batch=batch,
                                                extra=extra)]
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        compiled = list(pool.map(lambda job: job[5].compile(), jobs))
    peak = args.peak_tflops * 1e12
    results = {}
    for (name, impl, layout, batch, kind, _, fn_args), fn in zip(jobs, compiled, strict=True):
        seconds = median_seconds(fn, *fn_args, repeats=repeats)
        results[(name, impl, kind, batch, layout)] = batch / seconds
        print(f"| {name} | {impl} | {layout} | {kind} | {batch} | {batch / seconds:.0f} | "
              f"{1e3 * seconds:.1f} | {100 * flops_of(fn) / seconds / peak:.2f} % |", flush=True)
    rows = ratio_rows(results)
    if rows:
        print("\n| model | scan impl | step | batch | walks images/s | permuted images/s | "
              "walks / permuted |")
        print("|---|---|---|---|---|---|---|")
        print("\n".join(rows))


if __name__ == "__main__":
    main()
