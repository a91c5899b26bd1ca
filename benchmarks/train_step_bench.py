"""Times the TSM2 training step with each selective-scan implementation, side by side.

    PYTHONPATH=. python benchmarks/train_step_bench.py                 # the paper's shapes
    PYTHONPATH=. python benchmarks/train_step_bench.py --quick         # tiny (CPU smoke test)

The step is the jitted forward + backward + AdamW update of `configs/tsm2.py:paper`
(ETTh1: 7 variates, input 512, H=96, batch 64, d_model 64, 2 layers, N=16) on random data,
median of many device-synchronised steps after warm-up. Prints the step time per `impl` and
the ratio to the associative scan.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mmx_jax.models import create_model


def step_time(impl: str, *, batch: int, seq_len: int, variates: int, horizon: int,
              d_model: int, layers: int, state: int, repeats: int) -> float:
    model = create_model("tsm2", num_variates=variates, seq_len=seq_len, pred_len=horizon,
                         d_model=d_model, num_layers=layers, state_dim=state, scan_impl=impl)
    optimizer = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)
    graphdef, state_ = nnx.split((model, optimizer))

    @jax.jit
    def step(state_, x, y):
        model, optimizer = nnx.merge(graphdef, state_)
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
        optimizer.update(model, grads)
        return nnx.state((model, optimizer)), loss

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(batch, seq_len, variates)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(batch, horizon, variates)), jnp.float32)
    for _ in range(3):
        state_, loss = step(state_, x, y)
    jax.block_until_ready(loss)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        state_, loss = step(state_, x, y)
        jax.block_until_ready(loss)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--impls", default="pallas,associative,sequential")
    args = parser.parse_args()
    shape = dict(batch=64, seq_len=512, variates=7, horizon=96, d_model=64, layers=2, state=16,
                 repeats=30)
    if args.quick:
        shape = dict(batch=4, seq_len=64, variates=3, horizon=16, d_model=8, layers=1, state=4,
                     repeats=3)
    print(f"device: {jax.devices()[0].device_kind}; TSM2 train step {shape}")
    rows = {impl: step_time(impl, **shape) for impl in args.impls.split(",")}
    base = rows.get("associative")
    print("| impl | step ms | ratio to associative |")
    print("|---|---|---|")
    for impl, seconds in rows.items():
        ratio = f"{seconds / base:.3f}" if base else "-"
        print(f"| {impl} | {seconds * 1e3:.2f} | {ratio} |")


if __name__ == "__main__":
    main()
