"""selective_scan: every implementation against a float64 NumPy loop, gradients, errors."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from references import numpy_scan, rel_err

from mmx_jax import selective_scan
from mmx_jax.ssm import selective_scan_associative, selective_scan_sequential_vjp

IMPLS = ["sequential", "sequential_vjp", "associative"]


def random_inputs(rng, b=2, length=9, e=6, n=4, groups=None, dtype=np.float32, **options):
    """Random scan arguments (never zeros); options name the optional ones to include."""
    bc_shape = (b, length, n) if groups is None else (b, length, groups, n)
    args = dict(
        u=rng.normal(size=(b, length, e)),
        delta=rng.normal(size=(b, length, e)) * 0.5 + (0.0 if options.get("softplus") else 1.0),
        A=-np.exp(rng.normal(size=(e, n)) * 0.5),
        B=rng.normal(size=bc_shape),
        C=rng.normal(size=bc_shape),
    )
    if not options.get("softplus"):
        args["delta"] = np.abs(args["delta"])  # a positive step, as after the softplus
    extra = dict(D=(e,), z=(b, length, e), delta_bias=(e,), initial_state=(b, e, n))
    for name, shape in extra.items():
        if options.get(name):
            args[name] = rng.normal(size=shape)
    return {k: v.astype(dtype) for k, v in args.items()}


CASES = {
    "plain": dict(),
    "length1": dict(length=1, D=True, initial_state=True),
    "odd_length": dict(length=13, D=True),
    "reverse": dict(length=11, reverse=True, initial_state=True),
    "initial_state": dict(initial_state=True),
    "grouped": dict(e=8, groups=2, D=True, z=True),
    "gate": dict(z=True, D=True),
    "bias_softplus": dict(delta_bias=True, softplus=True),
    "everything": dict(length=7, e=8, groups=4, D=True, z=True, delta_bias=True, softplus=True,
                       reverse=True, initial_state=True),
}


def scan_case(rng, case: str, scan):
    """(y, h_last) of `scan` on CASES[case]'s random arguments, and the float64 loop's."""
    opts = dict(CASES[case])
    reverse, softplus = opts.pop("reverse", False), opts.get("softplus", False)
    shape = {k: opts.pop(k) for k in ("length", "e", "groups") if k in opts}
    args = random_inputs(rng, **shape, **opts)
    want = numpy_scan(**args, delta_softplus=softplus, reverse=reverse, return_final_state=True)
    return scan(**args, delta_softplus=softplus, reverse=reverse, return_final_state=True), want


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_float64_loop(rng, impl, case):
    (y, h), (want_y, want_h) = scan_case(rng, case, functools.partial(selective_scan,
                                                                      impl=impl))
    assert y.dtype == jnp.float32 and h.shape == want_h.shape
    assert rel_err(y, want_y) <= 1e-5
    assert rel_err(h, want_h) <= 1e-5


@pytest.mark.parametrize("chunk", [1, 4, 5, 64])
def test_associative_chunking(rng, chunk):
    """Chunk boundaries (with a padded last chunk) carry the state exactly."""
    args = random_inputs(rng, length=13, D=True, initial_state=True)
    want_y, want_h = numpy_scan(return_final_state=True, **args)
    y, h = selective_scan_associative(**args, return_final_state=True, chunk_size=chunk)
    assert rel_err(y, want_y) <= 1e-5 and rel_err(h, want_h) <= 1e-5


@pytest.mark.parametrize("unroll", [2, 3, 13])
@pytest.mark.parametrize("case", ["everything", "odd_length"])
def test_sequential_vjp_unrolled(rng, unroll, case):
    """Steps unrolled per loop iteration (3 does not divide 13 or 7; 13 is all of them)."""
    (y, h), (want_y, want_h) = scan_case(
        rng, case, functools.partial(selective_scan_sequential_vjp, unroll=unroll))
    assert rel_err(y, want_y) <= 1e-5 and rel_err(h, want_h) <= 1e-5


@pytest.mark.parametrize("impl", IMPLS)
def test_bfloat16_inputs(rng, impl):
    """bfloat16 in, bfloat16 out, float32 inside: only the input/output rounding remains."""
    args = random_inputs(rng, length=10, D=True, z=True, delta_bias=True, softplus=True)
    bf16 = {k: jnp.asarray(v, jnp.bfloat16) for k, v in args.items()}
    want_y = numpy_scan(**{k: np.asarray(v, np.float32) for k, v in bf16.items()},
                        delta_softplus=True)
    y = selective_scan(**bf16, delta_softplus=True, impl=impl)
    assert y.dtype == jnp.bfloat16
    assert rel_err(y, want_y) <= 1e-2  # bf16 output rounding: 2^-8 relative per element


GRAD_ARGS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def check_scan_grads(rng, scan, reverse: bool) -> None:
    """Reverse-mode gradients of `scan`'s y and final state, w.r.t. every input, against
    float64 finite differences."""
    args = random_inputs(rng, b=2, length=5, e=4, n=3, groups=2, dtype=np.float64, D=True,
                         z=True, delta_bias=True, softplus=True, initial_state=True)
    weights = rng.normal(size=(2, 5, 4)), rng.normal(size=(2, 4, 3))
    with jax.enable_x64(True):
        def loss(*xs):
            y, h = scan(**dict(zip(GRAD_ARGS, xs, strict=True)), delta_softplus=True,
                        reverse=reverse, return_final_state=True)
            return jnp.sum(y * weights[0]) + jnp.sum(h * weights[1])

        xs = tuple(jnp.asarray(args[k]) for k in GRAD_ARGS)
        check_grads(loss, xs, order=1, modes=["rev"], atol=1e-5, rtol=1e-5, eps=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reverse", [False, True])
def test_gradients_of_every_input(rng, impl, reverse):
    check_scan_grads(rng, functools.partial(selective_scan, impl=impl), reverse)


@pytest.mark.parametrize("unroll", [1, 2, 5])
@pytest.mark.parametrize("reverse", [False, True])
def test_sequential_vjp_gradients_unrolled(rng, unroll, reverse):
    """The hand-written backward pass at every unroll setting."""
    check_scan_grads(rng, functools.partial(selective_scan_sequential_vjp, unroll=unroll),
                     reverse)


def test_gradients_agree_across_impls_in_float32(rng):
    args = random_inputs(rng, length=17, e=8, groups=2, D=True, z=True, delta_bias=True,
                         softplus=True, initial_state=True)

    def grads(impl):
        def loss(a):
            y, h = selective_scan(**a, delta_softplus=True, return_final_state=True, impl=impl)
            return jnp.sum(jnp.sin(y)) + jnp.sum(h**2)
        return jax.grad(loss)({k: jnp.asarray(v) for k, v in args.items()})

    g_seq = grads("sequential")
    for impl in ("sequential_vjp", "associative"):
        g = grads(impl)
        for name in args:
            assert rel_err(g[name], g_seq[name]) <= 1e-5, (impl, name)


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(u=np.ones((2, 9), np.float32)), "argument 'u' has shape (2, 9), wanted (batch, "),
        (dict(delta=np.ones((2, 8, 6), np.float32)), "'delta' has shape (2, 8, 6), wanted (2, 9"),
        (dict(A=np.ones((5, 4), np.float32)), "'A' has shape (5, 4), wanted (6, N)"),
        (dict(B=np.ones((2, 9, 3), np.float32)), "'B' has shape (2, 9, 3), wanted (2, 9, 4)"),
        (dict(B=np.ones((2, 9, 4, 4), np.float32), C=np.ones((2, 9, 4, 4), np.float32)),
         "E=6 divisible by G"),
        (dict(C=np.ones((2, 9, 5), np.float32)), "'C' has shape (2, 9, 5), wanted (2, 9, 4)"),
        (dict(D=np.ones((5,), np.float32)), "'D' has shape (5,), wanted (6,)"),
        (dict(z=np.ones((2, 9, 5), np.float32)), "'z' has shape (2, 9, 5), wanted (2, 9, 6)"),
        (dict(initial_state=np.ones((2, 6, 3), np.float32)),
         "'initial_state' has shape (2, 6, 3), wanted (2, 6, 4)"),
        (dict(u=np.ones((2, 9, 6), np.int32)), "'u' has dtype int32, wanted a floating dtype"),
    ],
)
def test_bad_arguments_name_the_argument_and_shapes(rng, bad, message):
    args = {**random_inputs(rng), **bad}
    with pytest.raises(ValueError) as err:
        selective_scan(**args)
    assert message in str(err.value)


def test_unknown_impl(rng):
    with pytest.raises(ValueError, match="impl='fast' is not one of"):
        selective_scan(**random_inputs(rng), impl="fast")


def test_auto_on_cpu_picks_sequential_vjp_and_says_why_once_per_shape(caplog):
    from mmx_jax.ssm import ScanDims, resolve_impl

    if jax.default_backend() != "cpu":
        pytest.skip("checks the CPU choice")
    with caplog.at_level("INFO", logger="mmx_jax.ssm.scan"):
        for dims in (ScanDims(2, 9, 6, 4, 1), ScanDims(2, 9, 6, 4, 1), ScanDims(3, 9, 6, 4, 1)):
            assert resolve_impl("auto", dims) == "sequential_vjp"
    logged = [r.getMessage() for r in caplog.records if "auto picks" in r.getMessage()]
    assert [("(2, 9, 6, 4, 1)" in m, "(3, 9, 6, 4, 1)" in m) for m in logged] == \
        [(True, False), (False, True)], logged


def _temp_bytes(length, chunk):
    b, e, n = 2, 64, 16
    shapes = [jax.ShapeDtypeStruct(s, jnp.float32) for s in
              ((b, length, e), (b, length, e), (e, n), (b, length, n), (b, length, n))]

    def fwd_bwd(u, delta, A, B, C):
        return jax.grad(lambda *a: selective_scan_associative(*a, chunk_size=chunk).sum(),
                        argnums=(0, 1, 2, 3, 4))(u, delta, A, B, C)

    stats = jax.jit(fwd_bwd).lower(*shapes).compile().memory_analysis()
    return None if stats is None else stats.temp_size_in_bytes


def test_associative_memory_is_bounded_by_the_chunk():
    """Compiled scratch memory of forward+backward: 8x the length costs less than 2x the memory
    (only the (batch, length, E)-sized arrays grow), while one (batch, length, E, N) array of
    the unchunked scan would already exceed it."""
    short, long = _temp_bytes(512, 64), _temp_bytes(4096, 64)
    if short is None:
        pytest.skip("this backend reports no compiled memory analysis")
    assert long < 2 * short
    assert long < 2 * 4096 * 64 * 16 * 4
