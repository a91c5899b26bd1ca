r"""What `impl="auto"` picks for the selective scan on a CPU, and the timings behind the pick.

    PYTHONPATH=. python benchmarks/cpu_scan_choice.py              # the table in README.md
    PYTHONPATH=. python benchmarks/cpu_scan_choice.py --shapes 0,1 --rounds 5
    PYTHONPATH=. python benchmarks/cpu_scan_choice.py --candidates sequential,sequential_vjp

Times every candidate at the scan shapes of CPU runs, forward alone and forward + backward
(one jitted vjp w.r.t. every input), with D and delta_bias and the softplus on, float32.
Rounds alternate the candidates; each cell is the median over the rounds of the median of
`--repeat` synchronised calls, in milliseconds. Before timing, each candidate's output and
gradients are compared with those of the "sequential" scan at that shape (the largest
relative error is printed; tests/test_scan.py checks the implementations against float64).

Candidates:
- `sequential`: lax.scan, its backward from JAX's autodiff (the readable reference);
- `sequential_vjp/uK`: the same loop with its own backward pass, K steps per loop iteration
  (`selective_scan_sequential_vjp(unroll=K)`); `/u1` is what auto picks;
- `associative`: lax.associative_scan over chunks of 128 steps;
- `quadratic`: no loop at all, where its (b, L, L, E, N) decays take at most 1 GiB
  (`--max-quadratic` elements): the state as a
  masked sum, h_t = sum_{s <= t} exp(S_t - S_s) dt_s u_s B_s with S the cumulative sum of
  dt A, contracted with C_t. Each exponent is a difference of cumulative sums of non-positive
  terms (<= 0, so exp never overflows); the masked entries are set to -inf before the exp. It
  is O(L^2 E N) work and memory, defined here only as a candidate: it never wins on a CPU
  (README.md), so the library does not ship it.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from mmx_jax.ssm import (
    resolve_impl,
    selective_scan_associative,
    selective_scan_sequential,
    selective_scan_sequential_vjp,
)
from mmx_jax.ssm.scan import ScanDims, _reference_impl

# (batch, L, E, N, G) of CPU runs, with what they are.
SHAPES = (
    ((224, 42, 32, 4, 1), "TSM2 quick start, time mixer (32 x 7 series, 42 patches)"),
    ((1344, 7, 64, 4, 2), "TSM2 quick start, variate mixer (32 x 42, 7 variates, 2 dirs)"),
    ((224, 64, 32, 4, 1), "TSM2 stage 7 etth1/96 (input 512), time mixer"),
    ((2048, 7, 64, 4, 2), "TSM2 stage 7 etth1/96 (input 512), variate mixer"),
    ((448, 64, 128, 16, 1), "TSM2 paper shapes (batch 64, d 64, N 16), time mixer"),
    ((16, 256, 32, 16, 1), "ViM2 smoke config, 32x32 (256 tokens)"),
    ((2, 3136, 192, 16, 1), "ViM2-Tiny first stage at 224x224, batch 2"),
)


@_reference_impl
def quadratic_scan(p):
    """The masked-sum form of the module docstring (a candidate, not a library scan)."""
    length = p.u.shape[1]
    cum = jnp.cumsum(p.delta[..., None] * p.A, axis=1)  # S_t: (b, L, G, E/G, N), decreasing
    causal = jnp.tril(jnp.ones((length, length), bool))[:, :, None, None, None]
    exponent = cum[:, :, None] - cum[:, None, :]  # S_t - S_s: (b, t, s, G, E/G, N)
    decay = jnp.exp(jnp.where(causal, exponent, -jnp.inf))
    x = p.delta * p.u
    weights = jnp.einsum("btgn,btsgen,bsgn->btsge", p.C, decay, p.B)
    y = jnp.einsum("btsge,bsge->btge", weights, x)
    y = y + jnp.einsum("btgen,bgen,btgn->btge", jnp.exp(cum), p.h0, p.C)
    h_last = jnp.exp(cum[:, -1]) * p.h0 + jnp.einsum(
        "bsgen,bsge,bsgn->bgen", jnp.exp(cum[:, -1:] - cum), x, p.B)
    return y, h_last


def candidates(shape, max_quadratic: int) -> dict:
    out = {"sequential": selective_scan_sequential}
    for unroll in (1, 2, 4, 8):
        out[f"sequential_vjp/u{unroll}"] = functools.partial(selective_scan_sequential_vjp,
                                                             unroll=unroll)
    out["associative"] = selective_scan_associative
    b, length, e, n, _ = shape
    if b * length * length * e * n <= max_quadratic:
        out["quadratic"] = quadratic_scan
    return out


def inputs(shape, seed=0):
    b, length, e, n, g = shape
    rng = np.random.default_rng(seed)

    def normal(*s, scale=1.0):
        return jnp.asarray(rng.normal(size=s) * scale, jnp.float32)

    bc = (b, length, n) if g == 1 else (b, length, g, n)
    return (normal(b, length, e), normal(b, length, e, scale=0.5),
            -jnp.exp(normal(e, n, scale=0.5)), normal(*bc), normal(*bc), normal(e),
            normal(e, scale=0.5) - 2.0)


def functions(scan):
    def fwd(u, delta, A, B, C, D, bias):
        return scan(u, delta, A, B, C, D=D, delta_bias=bias, delta_softplus=True)

    cotangent = {}

    def loss(*args):
        y = fwd(*args)
        if "y" not in cotangent:
            cotangent["y"] = jnp.asarray(np.random.default_rng(1).normal(size=y.shape),
                                         y.dtype)
        return jnp.vdot(y, cotangent["y"])

    return jax.jit(fwd), jax.jit(jax.grad(loss, argnums=tuple(range(7))))


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def median_ms(fn, args, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=",".join(map(str, range(len(SHAPES)))),
                        help="indices into SHAPES")
    parser.add_argument("--candidates", default=None, help="comma-separated names (all)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--max-quadratic", type=int, default=2**28,
                        help="largest (b, L, L, E, N) of the quadratic candidate")
    args = parser.parse_args()
    print(f"device: {jax.devices()[0].device_kind} x {jax.device_count()}, jax "
          f"{jax.__version__}; {args.rounds} rounds of {args.repeat} calls; ms")
    print("| shape (b, L, E, N, G) | candidate | fwd | fwd+bwd | rel. err. vs sequential "
          "(y / grads) | auto |\n|---|---|---|---|---|---|")
    for index in map(int, args.shapes.split(",")):
        shape, _ = SHAPES[index]
        picked = resolve_impl("auto", ScanDims(*shape))
        data = inputs(shape)
        chosen = candidates(shape, args.max_quadratic)
        if args.candidates:
            chosen = {k: v for k, v in chosen.items() if k in args.candidates.split(",")}
        fns = {name: functions(scan) for name, scan in chosen.items()}
        ref_fwd, ref_grad = functions(selective_scan_sequential)
        want_y, want_g = ref_fwd(*data), ref_grad(*data)
        errors = {}
        for name, (fwd, grad) in fns.items():
            errors[name] = (rel_err(fwd(*data), want_y),
                            max(rel_err(a, b) for a, b in zip(grad(*data), want_g,
                                                              strict=True)))
        del want_y, want_g
        times = {name: ([], []) for name in fns}
        for _ in range(args.rounds):
            for name, (fwd, grad) in fns.items():
                times[name][0].append(median_ms(fwd, data, args.repeat))
                times[name][1].append(median_ms(grad, data, args.repeat))
        for name in fns:
            mark = "**auto**" if name == f"{picked}/u1" or name == picked else ""
            f, b = (statistics.median(t) for t in times[name])
            print(f"| {shape} | {name} | {f:.2f} | {b:.2f} | {errors[name][0]:.1e} / "
                  f"{errors[name][1]:.1e} | {mark} |", flush=True)
        del fns


if __name__ == "__main__":
    main()
