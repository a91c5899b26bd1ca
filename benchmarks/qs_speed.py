"""Times one quasi-separable (QS) token mixer against the same layer with two separate
directions, and prints a table with the speed ratio (the paper reports QS near 1.8x faster).

    PYTHONPATH=. python benchmarks/qs_speed.py                  # real shapes (GPU)
    PYTHONPATH=. python benchmarks/qs_speed.py --quick          # tiny shapes (CPU smoke test)
    PYTHONPATH=. python benchmarks/qs_speed.py --dtypes bfloat16 --impl associative

Both layers are `SelectiveTokenMixer` on (B, L, D) inputs: directions="quasi_separable" (one
shared conv, forward and backward S6 sharing A, one D, outputs shifted) against directions=2
(a conv and a full S6 per direction). Both run their two directions as one scan call. Each
cell is the median of many device-synchronised runs of a jitted function after a warm-up:
the forward alone, and forward+backward (gradients of a scalar loss with respect to every
parameter and the input). `ratio` is two-directions time / QS time (> 1: QS is faster).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmx_jax.layers import SelectiveTokenMixer
from mmx_jax.models import count_params

# (B, L, D): ViM2 stages 1 and 3 at 224x224 (tokens of a 56x56 and a 14x14 map), and a long
# 1-D sequence at a language-model width.
SHAPES = ((64, 3136, 96), (64, 196, 384), (8, 2048, 768))
QUICK_SHAPES = ((2, 64, 16),)
VARIANTS = (("QS", "quasi_separable"), ("two dirs", 2))


def time_us(fn, *args, budget_s: float = 2.0, min_samples: int = 10,
            max_samples: int = 100) -> float:
    """Median microseconds per call of `fn(*args)`, synchronised, after two warm-up calls."""
    jax.block_until_ready(fn(*args))  # compile
    jax.block_until_ready(fn(*args))
    samples = []
    deadline = time.perf_counter() + budget_s
    while len(samples) < min_samples or (time.perf_counter() < deadline
                                         and len(samples) < max_samples):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1e6


def layer_functions(mixer: nnx.Module):
    """Jitted forward(params, x) and forward+backward(params, x) of a mixer, and its params."""
    graphdef, params, rest = nnx.split(mixer, nnx.Param, ...)

    @jax.jit
    def forward(params, x):
        return nnx.merge(graphdef, params, rest)(x)

    def loss(params, x):
        return jnp.mean(jnp.square(nnx.merge(graphdef, params, rest)(x).astype(jnp.float32)))

    forward_backward = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    return forward, forward_backward, params


def run(shapes, dtypes, impl: str, state_dim: int, budget_s: float) -> list[dict]:
    rows = []
    for (b, length, dim), dtype_name in ((s, d) for s in shapes for d in dtypes):
        dtype = jnp.dtype(dtype_name)
        x = jnp.asarray(np.random.default_rng(0).standard_normal((b, length, dim)), dtype)
        row = dict(shape=(b, length, dim), dtype=dtype_name)
        for label, directions in VARIANTS:
            mixer = SelectiveTokenMixer(dim, directions=directions, state_dim=state_dim,
                                        impl=impl, dtype=dtype, rngs=nnx.Rngs(0))
            forward, forward_backward, params = layer_functions(mixer)
            row[label] = dict(params=count_params(mixer),
                              fwd=time_us(forward, params, x, budget_s=budget_s),
                              fb=time_us(forward_backward, params, x, budget_s=budget_s))
        rows.append(row)
    return rows


def print_table(rows: list[dict]) -> None:
    qs, two = (label for label, _ in VARIANTS)
    print(f"| (B, L, D) | dtype | params {qs} / {two} | fwd {qs} us | fwd {two} us | ratio "
          f"| fwd+bwd {qs} us | fwd+bwd {two} us | ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        a, c = r[qs], r[two]
        print(f"| {r['shape']} | {r['dtype']} | {a['params']} / {c['params']} "
              f"| {a['fwd']:.0f} | {c['fwd']:.0f} | {c['fwd'] / a['fwd']:.2f}x "
              f"| {a['fb']:.0f} | {c['fb']:.0f} | {c['fb'] / a['fb']:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, short budget (CPU)")
    parser.add_argument("--dtypes", default=None,
                        help="comma-separated compute dtypes (default float32,bfloat16; "
                             "float32 with --quick)")
    parser.add_argument("--impl", default="auto", help="selective_scan implementation")
    parser.add_argument("--state-dim", type=int, default=16, help="N")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="seconds of timed runs per cell (default 2, 0.2 with --quick)")
    args = parser.parse_args()
    shapes = QUICK_SHAPES if args.quick else SHAPES
    budget = args.budget_s if args.budget_s is not None else (0.2 if args.quick else 2.0)
    dtypes = (args.dtypes or ("float32" if args.quick else "float32,bfloat16")).split(",")
    dtypes = [d for d in dtypes if d]
    print(f"backend: {jax.default_backend()} ({jax.devices()[0].device_kind}), "
          f"impl={args.impl}, N={args.state_dim}")
    print_table(run(shapes, dtypes, args.impl, args.state_dim, budget))


if __name__ == "__main__":
    main()
