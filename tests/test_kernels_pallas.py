"""Pallas selective-scan kernels against independent references.

Values: a float64 NumPy loop written here. Gradients (w.r.t. every input, with a cotangent on
the final state too): element by element against `selective_scan_sequential` (lax.scan and
JAX autodiff, sharing no code with the kernels), and along a random direction against float64
central differences of the NumPy loop. On CPU both kernels (Triton-lowered GPU
kernel, Mosaic TPU kernel) run in Pallas interpret mode on tiny shapes; the same checks run
compiled on a GPU with `pytest -m gpu`. Cross-lowering tests run each kernel's lowering rules
for its platform (no device needed).

The walk kernels (`selective_scan_walks`, scans along the walks of a 2-D map) are checked the
same way against `references.numpy_walk_scan` (float64 NumPy) and against the layout path
of `selective_scan_2d` (permutations and the sequential scan, in float64).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from references import numpy_scan, numpy_walk_scan, random_walk_inputs, rel_err

import kernels_pallas
from kernels_pallas import WALK_NAMES
from kernels_pallas.mosaic_scan import MosaicConfig
from kernels_pallas.triton_scan import (
    TritonConfig,
    _softplus,
    auto_forward_time_splits,
    auto_time_splits,
)
from mmx_jax.ssm import selective_scan, selective_scan_2d, selective_scan_sequential
from mmx_jax.ssm.scan_orders import scan_order


def enable_x64():
    """float64 on, as a context (the experimental helper of older jax, `jax.enable_x64` now)."""
    try:
        from jax.experimental import enable_x64 as ctx  # noqa: PLC0415
    except ImportError:
        return jax.enable_x64(True)
    return ctx()


# Small unrolls and blocks keep interpret mode fast and make every masked edge appear:
# partial channel blocks, a partial last checkpoint interval, several sub-chunks.
SMALL_CONFIGS = {
    "triton": TritonConfig(block_e=16, bwd_block_e=16, fwd_unroll=2, bwd_unroll=2,
                           bwd_sub_chunks=2, time_splits=1),
    "mosaic": MosaicConfig(block_t=8),
}
# The time axis split across programs: 2 segments, and 3 (not a power of two). With these
# configs the CASES lengths leave the last segment partly padding, and wholly padding for
# "grouped" at 3 (L=7 in 3 segments of 4 steps). The forward alone (the primal) splits time
# its own way: into 3 and 2 segments.
TIME_SPLIT_CONFIGS = {
    "triton_split2": SMALL_CONFIGS["triton"]._replace(time_splits=2, fwd_only_time_splits=3),
    # (with B and C loaded in their own chunk, not a chunk ahead, in the forward and summary)
    "triton_split3": SMALL_CONFIGS["triton"]._replace(time_splits=3, fwd_only_time_splits=2,
                                                      prefetch_bc=False),
}

# name, (batch, L, E, N, G), dtype, options
CASES = [
    ("plain", (2, 11, 40, 16, 1), "float32", {}),
    ("D_bias_softplus", (2, 13, 40, 16, 1), "float32", dict(D=True, bias=True, softplus=True)),
    ("z_reverse", (1, 9, 24, 16, 1), "float32", dict(z=True, reverse=True)),
    ("h0_final", (2, 10, 40, 8, 1), "float32", dict(h0=True, final=True, bias=True)),
    ("grouped", (2, 7, 48, 16, 2), "float32", dict(D=True, z=True, final=True)),
    ("state5_bias_nosoftplus", (1, 6, 20, 5, 1), "float32", dict(bias=True, D=True)),
    ("everything", (2, 13, 48, 16, 2), "float32",
     dict(D=True, z=True, bias=True, softplus=True, reverse=True, h0=True, final=True)),
    ("everything_bf16", (2, 13, 40, 16, 1), "bfloat16",
     dict(D=True, z=True, bias=True, softplus=True, reverse=True, h0=True, final=True)),
]


def make_case(rng, shape, dtype, opts):
    """Random inputs (float32/bf16 for the kernel) and keyword options of one case."""
    b, length, e, n, g = shape
    low = jnp.dtype(dtype)

    def rnd(*s, scale=1.0, dt=low):
        return jnp.asarray(rng.standard_normal(s) * scale, dt)

    args = dict(
        u=rnd(b, length, e),
        delta=rnd(b, length, e, scale=0.5),
        A=-jnp.asarray(np.exp(rng.uniform(-1.0, 1.5, (e, n))), jnp.float32),
        B=rnd(b, length, n) if g == 1 else rnd(b, length, g, n),
        C=rnd(b, length, n) if g == 1 else rnd(b, length, g, n),
    )
    kw = dict(
        D=rnd(e, dt=jnp.float32) if opts.get("D") else None,
        z=rnd(b, length, e) if opts.get("z") else None,
        delta_bias=rnd(e, scale=0.5, dt=jnp.float32) if opts.get("bias") else None,
        delta_softplus=bool(opts.get("softplus")),
        reverse=bool(opts.get("reverse")),
        initial_state=rnd(b, e, n, dt=jnp.float32) if opts.get("h0") else None,
        return_final_state=bool(opts.get("final")),
    )
    if not kw["delta_softplus"]:  # keep the step size positive, as softplus would
        args["delta"] = jnp.asarray(np.abs(np.asarray(args["delta"], np.float32)) + 0.05, low)
        if kw["delta_bias"] is not None:
            kw["delta_bias"] = jnp.abs(kw["delta_bias"]) * 0.1
    return args, kw


def _grad_names(kw):
    names = ["u", "delta", "A", "B", "C"]
    names += [k for k in ("D", "z", "delta_bias", "initial_state") if kw[k] is not None]
    return names


def check_case(rng, backend, shape, dtype, opts, config=None, interpret=None):
    """Values against NumPy float64 and every gradient against the float64 sequential scan."""
    args, kw = make_case(rng, shape, dtype, opts)
    names = _grad_names(kw)
    static = {k: kw[k] for k in ("delta_softplus", "reverse", "return_final_state")}
    given = {**args, **{k: kw[k] for k in names if k in kw}}
    primals = [given[k] for k in names]

    def run(fn, *xs):
        full = {**given, **dict(zip(names, xs, strict=True))}
        rest = {k: full.get(k, kw.get(k)) for k in ("D", "z", "delta_bias", "initial_state")}
        return fn(full["u"], full["delta"], full["A"], full["B"], full["C"], **rest, **static)

    def kernel(*xs):
        return run(lambda *a, **k: kernels_pallas.selective_scan(
            *a, **k, backend=backend, interpret=interpret, config=config), *xs)

    out, vjp = jax.vjp(kernel, *primals)
    ref = numpy_scan(**args, **{k: kw[k] for k in kw})
    bf16 = jnp.dtype(dtype) == jnp.bfloat16
    tol_y, tol_g = (1e-2, 2e-2) if bf16 else (2e-5, 1e-4)
    # The forward under differentiation (saving residuals) and the forward alone (the primal:
    # no checkpoints, and the Triton kernels' own time splits).
    for o in (out, kernel(*primals)):
        if kw["return_final_state"]:
            y, h_last = o
            assert y.dtype == jnp.dtype(dtype) and h_last.dtype == jnp.float32
            assert rel_err(y, ref[0]) < tol_y
            assert rel_err(h_last, ref[1]) < 2e-5
        else:
            assert o.dtype == jnp.dtype(dtype)
            assert rel_err(o, ref) < tol_y

    # Cotangents: random, in the output dtypes (the final state's is float32).
    cot = jax.tree.map(lambda o: jnp.asarray(rng.standard_normal(o.shape), o.dtype), out)
    grads = vjp(cot)
    for name, g, p in zip(names, grads, primals, strict=True):
        assert g.shape == p.shape and g.dtype == p.dtype, (name, g.shape, g.dtype)

    # 1) Every gradient, element by element, against the sequential scan's (lax.scan + JAX
    #    autodiff; it computes in float32 whatever the input dtype).
    with enable_x64():
        f64 = [jnp.asarray(np.asarray(p, np.float64)) for p in primals]
        out64, vjp64 = jax.vjp(lambda *xs: run(selective_scan_sequential, *xs), *f64)
        cot64 = jax.tree.map(lambda c, o: jnp.asarray(np.asarray(c, np.float64), o.dtype),
                             cot, out64)
        ref_grads = [np.asarray(g) for g in vjp64(cot64)]
    for name, g, r in zip(names, grads, ref_grads, strict=True):
        err = rel_err(g, r)
        assert err < tol_g, f"gradient w.r.t. {name}: relative error {err:.2e}"

    # 2) Each gradient along a random direction against float64 central differences of the
    #    NumPy loop.
    def loss64(values):
        full = {**args, **kw, **values}
        o = numpy_scan(**full)
        return sum(float(np.sum(np.asarray(c, np.float64) * x))
                   for c, x in zip(jax.tree.leaves(cot), jax.tree.leaves(o), strict=True))

    base = {k: np.asarray(p, np.float64) for k, p in zip(names, primals, strict=True)}
    for name, g in zip(names, grads, strict=True):
        v = rng.standard_normal(base[name].shape)
        eps = 1e-6 * max(1.0, float(np.abs(base[name]).max()))
        fd = (loss64({**base, name: base[name] + eps * v})
              - loss64({**base, name: base[name] - eps * v})) / (2 * eps)
        gv = np.asarray(g, np.float64) * v
        err = abs(float(gv.sum()) - fd) / max(float(np.sqrt(np.sum(gv**2))), 1e-30)
        assert err < 10 * tol_g, f"d/d{name} along a random direction: error {err:.2e}"


# ---------------------------------------------------------------------------------------------
# Interpret mode on CPU (runs in CI).


@pytest.mark.parametrize("backend", ["triton", "mosaic", *TIME_SPLIT_CONFIGS])
@pytest.mark.parametrize("name,shape,dtype,opts", CASES, ids=[c[0] for c in CASES])
def test_interpret_matches_references(rng, backend, name, shape, dtype, opts):
    config = {**SMALL_CONFIGS, **TIME_SPLIT_CONFIGS}[backend]
    check_case(rng, backend.split("_")[0], shape, dtype, opts, config=config, interpret=True)


@pytest.mark.parametrize("backend", ["triton", "mosaic"])
def test_interpret_default_config(rng, backend):
    """The default (larger) unrolls and blocks, once, with every option on."""
    check_case(rng, backend, (2, 21, 40, 16, 1), "float32",
               dict(D=True, z=True, bias=True, softplus=True, h0=True, final=True),
               interpret=True)


def test_interpret_time_splits_other_carries(rng):
    """The non-default carries compute the same: the forward's segment starts carried by XLA
    between the summary and main kernels (`kernel_carry=False`), the backward's segment-end
    adjoints folded inside its main kernel (`bwd_kernel_carry=True`); every option on and a
    wholly padded last segment (L=7 in 3 segments of 4 steps)."""
    config = TIME_SPLIT_CONFIGS["triton_split3"]._replace(kernel_carry=False,
                                                          bwd_kernel_carry=True)
    check_case(rng, "triton", (2, 7, 40, 8, 1), "float32",
               dict(D=True, z=True, bias=True, softplus=True, reverse=True, h0=True, final=True),
               config=config, interpret=True)


def test_interpret_batch_major_grid(rng):
    """Batch rows on the grid's x axis (what batches above 65535 get) compute the same."""
    config = SMALL_CONFIGS["triton"]._replace(batch_major=True)
    check_case(rng, "triton", (3, 13, 40, 8, 2), "float32",
               dict(D=True, z=True, bias=True, softplus=True, reverse=True, h0=True, final=True),
               config=config, interpret=True)


def test_dispatcher_pallas_on_cpu(rng):
    """selective_scan(impl="pallas") runs the kernels (interpret mode) and agrees with the
    sequential scan; impl="auto" on CPU does not pick them."""
    args, kw = make_case(rng, (2, 9, 24, 8, 1), "float32", dict(D=True, bias=True,
                                                                softplus=True))
    y = selective_scan(**args, **kw, impl="pallas")
    ref = selective_scan(**args, **kw, impl="sequential")
    assert rel_err(y, ref) < 2e-5
    from mmx_jax.ssm import resolve_impl  # noqa: PLC0415
    assert resolve_impl("auto") == "sequential_vjp"


def test_fast_softplus_formula_matches_float64():
    """The Triton kernels' softplus and sigmoid (`fast_softplus`; jnp stands in for the PTX
    approximations here) stay within float32 rounding of float64, also where e^x is far below
    float32's epsilon relative to 1 and a plain log(1 + e^x) would lose it."""
    x = np.concatenate([np.linspace(-40.0, 40.0, 4001), -np.logspace(-6, 1.5, 200),
                        np.logspace(-6, 1.5, 200), [0.0, 20.0, 20.5]]).astype(np.float32)
    sp, sig = (np.asarray(v, np.float64) for v in _softplus(jnp.asarray(x), fast=False))
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(sp, np.logaddexp(0.0, x64), rtol=2e-6, atol=0)
    np.testing.assert_allclose(sig, 1.0 / (1.0 + np.exp(-x64)), rtol=2e-6, atol=0)


def test_auto_time_splits():
    """time_splits=0: the smallest power of two reaching 2048 programs, at most 16, with every
    segment at least two checkpoint intervals long."""
    assert auto_time_splits(8 * 48, 2048, 64) == 8  # the benchmark shapes, 32-channel blocks
    assert auto_time_splits(128 * 6, 3136, 64) == 4
    assert auto_time_splits(256 * 4, 96, 32) == 1  # 2 segments of 48 steps: too short
    assert auto_time_splits(2048, 10**6, 64) == 1  # enough programs already
    assert auto_time_splits(1, 10**6, 64) == 16
    assert auto_time_splits(1, 511, 64) == 2  # 4 segments need 4 x 128 steps
    assert auto_time_splits(1, 512, 64) == 4
    assert auto_time_splits(1000, 10**6, 64) == 4  # 1000 x 2 falls just short of 2048


def test_auto_forward_time_splits():
    """fwd_only_time_splits=0: as many segments as keep the programs within 2048, at most 16,
    with every segment at least two checkpoint intervals long."""
    assert auto_forward_time_splits(8 * 48, 2048, 64) == 5  # 1920 programs
    assert auto_forward_time_splits(128 * 6, 3136, 64) == 2
    assert auto_forward_time_splits(256 * 4, 96, 32) == 1  # 2 segments of 48 steps: too short
    assert auto_forward_time_splits(2048, 10**6, 64) == 1
    assert auto_forward_time_splits(4096, 10**6, 64) == 1
    assert auto_forward_time_splits(1, 10**6, 64) == 16
    assert auto_forward_time_splits(1, 767, 64) == 2  # 3 segments need 3 x 256 steps
    assert auto_forward_time_splits(300, 10**6, 64) == 6


@pytest.mark.parametrize("field", ["time_splits", "fwd_only_time_splits"])
def test_time_splits_config_is_checked(rng, field):
    args, kw = make_case(rng, (2, 5, 8, 4, 1), "float32", {})
    with pytest.raises(ValueError, match=field):
        kernels_pallas.selective_scan(**args, backend="triton", interpret=True,
                                      config=TritonConfig(**{field: -1}))


def test_unsupported_reason():
    ok = dict(batch=8, length=2048, channels=1536, state=16, groups=1)
    assert kernels_pallas.unsupported_reason("gpu", **ok) is None
    assert kernels_pallas.unsupported_reason("tpu", **ok) is None
    assert "state" in kernels_pallas.unsupported_reason("gpu", **{**ok, "state": 256})
    # A batch above the grid's y limit moves to x (the channel mixer's batch x tokens).
    assert kernels_pallas.unsupported_reason("gpu", **{**ok, "batch": 256000}) is None
    assert kernels_pallas.unsupported_reason("cpu", **ok)


def test_bad_arguments_name_the_argument(rng):
    args, kw = make_case(rng, (2, 5, 8, 4, 1), "float32", {})
    with pytest.raises(ValueError, match="'delta'"):
        kernels_pallas.selective_scan(**{**args, "delta": args["delta"][:, :3]}, interpret=True)
    with pytest.raises(ValueError, match="'A'"):
        kernels_pallas.selective_scan(**{**args, "A": args["A"][:5]}, interpret=True)
    with pytest.raises(ValueError, match="backend"):
        kernels_pallas.selective_scan(**args, backend="cuda-c")


# ---------------------------------------------------------------------------------------------
# Walks of a 2-D map (`selective_scan_walks`), interpret mode on CPU.

WALK_CONFIGS = {
    "triton": SMALL_CONFIGS["triton"],
    # 3 segments: L = 12 or 15 steps in segments of 2 checkpoint intervals of 2 steps, the last
    # one partly (15) or wholly (12) padding.
    "triton_split3": TIME_SPLIT_CONFIGS["triton_split3"],
    "mosaic": MosaicConfig(block_t=4),  # checkpoints every 3 (L = 15) or 4 (L = 12) steps
}
# name: map (b, H, W, E, N), walks (names: fixed; an int: that many slots per sample picked
# from all 8), options, dtype. Widths of 20 and 24 leave a partial 16-channel Triton block.
WALK_CASES = [
    ("cross_scan", (2, 3, 5, 20, 4), ("row", "col", "row_rev", "col_rev"),
     dict(D=True, bias=True, softplus=True), "float32"),
    ("snakes_per_walk_gate", (1, 5, 3, 24, 5), ("snake_row", "snake_col_rev", "col"),
     dict(z=True, bias=True, summed=False), "float32"),
    ("qs_per_sample_weighted", (2, 4, 3, 16, 4), 4,
     dict(D=True, z=True, bias=True, softplus=True, shift=True, weighted=True), "float32"),
    ("every_walk_bf16", (1, 3, 4, 16, 4), WALK_NAMES,
     dict(D=True, z=True, bias=True, softplus=True, shift=True), "bfloat16"),
]


def make_walk_case(rng, shape, walks, opts, dtype):
    """(kernel arguments, walk names of every sample, selective_scan_2d keywords)."""
    b, h, w, e, n = shape
    if isinstance(walks, int):
        index = rng.integers(0, len(WALK_NAMES), size=(b, walks))
        names = [[WALK_NAMES[i] for i in row] for row in index]
    else:
        index, names = None, [list(walks)] * b
    k = len(names[0])
    softplus = bool(opts.get("softplus"))
    arrays = random_walk_inputs(rng, b, h, w, e, n, k, softplus=softplus,
                                D=bool(opts.get("D")), z=bool(opts.get("z")),
                                bias=bool(opts.get("bias")))
    if opts.get("weighted"):
        arrays["weights"] = rng.uniform(0.1, 1.0, size=(b, k))
    low = jnp.dtype(dtype)
    args = {name: jnp.asarray(x, low if name in ("u", "delta", "B", "C", "z") else jnp.float32)
            for name, x in arrays.items()}
    table = np.array([kernels_pallas.walk_code(name) for name in WALK_NAMES], np.int32)
    codes = table[index] if index is not None else table[[WALK_NAMES.index(x) for x in walks]][None]
    static = dict(delta_softplus=softplus, shift=bool(opts.get("shift")),
                  summed=opts.get("summed", True))
    scan_2d = dict(walks=WALK_NAMES if index is not None else tuple(walks),
                   walk_index=None if index is None else jnp.asarray(index))
    return args, jnp.asarray(codes), names, static, scan_2d


WALK_GRAD_ARGS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "weights")


def check_walk_case(rng, backend, shape, walks, opts, dtype, config=None, interpret=True):
    """Values (with and without differentiation) against the float64 NumPy walks, every
    gradient element by element against the float64 layout path (permutations, the
    sequential scan and JAX autodiff: no kernel code), and each along a random direction
    against float64 central differences of the NumPy walks."""
    args, codes, names, static, scan_2d = make_walk_case(rng, shape, walks, opts, dtype)
    grad_names = [k for k in WALK_GRAD_ARGS if k in args]
    primals = [args[k] for k in grad_names]

    def kernel(*xs):
        return kernels_pallas.selective_scan_walks(
            **dict(zip(grad_names, xs, strict=True)), walk_codes=codes, **static,
            backend=backend, interpret=interpret, config=config)

    def numpy_loss(values, cot=None):
        y = numpy_walk_scan(**values, walk_names=names, **static)
        return y if cot is None else float(np.sum(np.asarray(cot, np.float64) * y))

    out, vjp = jax.vjp(kernel, *primals)
    base = {k: np.asarray(p, np.float64) for k, p in zip(grad_names, primals, strict=True)}
    ref = numpy_loss(base)
    bf16 = jnp.dtype(dtype) == jnp.bfloat16
    tol_y, tol_g = (1e-2, 2e-2) if bf16 else (2e-5, 1e-4)
    for o in (out, kernel(*primals)):  # under differentiation, and the forward alone
        assert o.dtype == jnp.dtype(dtype) and o.shape == ref.shape
        assert rel_err(o, ref) < tol_y
    cot = jnp.asarray(rng.standard_normal(out.shape), out.dtype)
    grads = vjp(cot)
    for name, g, p in zip(grad_names, grads, primals, strict=True):
        assert g.shape == p.shape and g.dtype == p.dtype, (name, g.shape, g.dtype)

    with enable_x64():
        f64 = [jnp.asarray(base[k]) for k in grad_names]
        _, vjp64 = jax.vjp(lambda *xs: selective_scan_2d(
            **dict(zip(grad_names, xs, strict=True)), **static, **scan_2d, impl="sequential"),
            *f64)
        ref_grads = [np.asarray(g) for g in vjp64(jnp.asarray(np.asarray(cot, np.float64)))]
    for name, g, r in zip(grad_names, grads, ref_grads, strict=True):
        err = rel_err(g, r)
        assert err < tol_g, f"gradient w.r.t. {name}: relative error {err:.2e}"

    for name, g in zip(grad_names, grads, strict=True):
        v = rng.standard_normal(base[name].shape)
        eps = 1e-6 * max(1.0, float(np.abs(base[name]).max()))
        fd = (numpy_loss({**base, name: base[name] + eps * v}, cot)
              - numpy_loss({**base, name: base[name] - eps * v}, cot)) / (2 * eps)
        gv = np.asarray(g, np.float64) * v
        err = abs(float(gv.sum()) - fd) / max(float(np.sqrt(np.sum(gv**2))), 1e-30)
        assert err < 10 * tol_g, f"d/d{name} along a random direction: error {err:.2e}"


@pytest.mark.slow
@pytest.mark.parametrize("backend", list(WALK_CONFIGS))
@pytest.mark.parametrize("name,shape,walks,opts,dtype", WALK_CASES, ids=[c[0] for c in WALK_CASES])
def test_walks_interpret_match_references(rng, backend, name, shape, walks, opts, dtype):
    check_walk_case(rng, backend.split("_")[0], shape, walks, opts, dtype,
                    config=WALK_CONFIGS[backend])


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["triton", "mosaic"])
def test_walks_interpret_default_config(rng, backend):
    """The default unrolls and blocks (one block holds every channel here), once: per-sample
    walks, the shift and the weighted sum."""
    check_walk_case(rng, backend, (2, 3, 4, 8, 4), 3,
                    dict(D=True, z=True, bias=True, softplus=True, shift=True, weighted=True),
                    "float32")


def test_walk_positions_are_the_scan_orders():
    """The kernels' index arithmetic visits the map in the orders of `scan_orders`, for every
    walk and for maps of one row, one column, odd sides and H != W."""
    for h, w in [(1, 1), (1, 6), (7, 1), (3, 5), (5, 3), (4, 4), (2, 9)]:
        steps = jnp.arange(h * w)
        for name in kernels_pallas.WALK_NAMES:
            got = np.asarray(kernels_pallas.walk_position(kernels_pallas.walk_code(name), steps,
                                                          h, w))
            np.testing.assert_array_equal(got, scan_order(name, h, w), err_msg=f"{name} {h}x{w}")


def test_dispatcher_2d_pallas_on_cpu(rng):
    """selective_scan_2d(impl="pallas") runs the walk kernels (interpret mode) and agrees with
    its layout path."""
    args, _, _, static, scan_2d = make_walk_case(
        rng, (2, 3, 4, 8, 4), 2, dict(D=True, bias=True, softplus=True, weighted=True),
        "float32")
    y = selective_scan_2d(**args, **static, **scan_2d, impl="pallas")
    ref = selective_scan_2d(**args, **static, **scan_2d, impl="sequential")
    assert rel_err(y, ref) < 2e-5


def test_walks_bad_arguments_name_the_argument(rng):
    args, codes, _, static, _ = make_walk_case(rng, (2, 3, 4, 8, 4), ("row", "col"),
                                               dict(D=True), "float32")
    with pytest.raises(ValueError, match="'delta'"):
        kernels_pallas.selective_scan_walks(**{**args, "delta": args["delta"][:, :, :2]},
                                            walk_codes=codes, interpret=True)
    with pytest.raises(ValueError, match="'walk_codes'"):
        kernels_pallas.selective_scan_walks(**args, walk_codes=codes[:, :1], interpret=True)
    with pytest.raises(ValueError, match="summed=True"):
        kernels_pallas.selective_scan_walks(**args, walk_codes=codes, summed=False,
                                            weights=jnp.ones((2, 2)), interpret=True)


def test_unsupported_walks_reason():
    stage = dict(batch=128, height=28, width=28, channels=384, walks=4, state=16)
    assert kernels_pallas.unsupported_walks_reason("gpu", **stage) is None
    assert kernels_pallas.unsupported_walks_reason("tpu", **stage) is None
    # ViM2-T's first stage: a 56x56 map of 192 channels (one block) is above the VMEM budget.
    first = dict(stage, height=56, width=56, channels=192)
    assert kernels_pallas.unsupported_walks_reason("gpu", **first) is None
    assert "VMEM" in kernels_pallas.unsupported_walks_reason("tpu", **first)
    assert kernels_pallas.unsupported_walks_reason("tpu", **dict(first, height=28,
                                                                 width=28)) is None
    assert "state" in kernels_pallas.unsupported_walks_reason("gpu", **dict(stage, state=128))
    assert kernels_pallas.unsupported_walks_reason("cpu", **stage)


# ---------------------------------------------------------------------------------------------
# Cross-lowering: each kernel's lowering rules run for its own platform on this CPU.


@pytest.mark.parametrize("backend,platform,marker", [
    ("triton", "cuda", "__gpu$xla.gpu.triton"),
    ("mosaic", "tpu", "tpu_custom_call"),
])
def test_forward_and_backward_lower_for_their_platform(rng, backend, platform, marker):
    args, kw = make_case(rng, (2, 37, 200, 16, 2), "bfloat16",
                         dict(D=True, z=True, bias=True, softplus=True, reverse=True, h0=True,
                              final=True))

    def loss(u, delta, A, B, C, D, z, bias, h0):
        y, h = kernels_pallas.selective_scan(
            u, delta, A, B, C, D=D, z=z, delta_bias=bias, delta_softplus=True, reverse=True,
            initial_state=h0, return_final_state=True, backend=backend, interpret=False)
        return jnp.sum(y.astype(jnp.float32) ** 2) + jnp.sum(h)

    xs = (args["u"], args["delta"], args["A"], args["B"], args["C"], kw["D"], kw["z"],
          kw["delta_bias"], kw["initial_state"])
    text = jax.jit(jax.grad(loss, argnums=tuple(range(9)))).trace(*xs).lower(
        lowering_platforms=(platform,)).as_text()
    assert text.count(marker) >= 2, f"expected a forward and a backward {marker} call"
    # The forward alone (no checkpoint output) lowers too.
    text = jax.jit(loss).trace(*xs).lower(lowering_platforms=(platform,)).as_text()
    assert marker in text


@pytest.mark.parametrize("backend,platform,marker", [
    ("triton", "cuda", "__gpu$xla.gpu.triton"),
    ("mosaic", "tpu", "tpu_custom_call"),
])
@pytest.mark.parametrize("shift,weighted", [(True, True), (False, False)])
def test_walk_forward_and_backward_lower_for_their_platform(backend, platform, marker, shift,
                                                            weighted):
    """The walk kernels lower for their platform: TPU blocks of 128 channels of one walk out
    of the (K, b, L, E) arrays, the walk table and weights in SMEM; and (below) blocks of a
    whole 192-channel walk, as at ViM2-T's first stage."""
    for shape in ((2, 3, 5, 128, 3, 16), (2, 3, 5, 192, 2, 16)):
        loss, xs = walk_loss_and_shapes(backend, shift=shift, weighted=weighted, shape=shape)
        text = jax.jit(jax.grad(loss, argnums=tuple(range(9)))).trace(*xs).lower(
            lowering_platforms=(platform,)).as_text()
        assert text.count(marker) >= 2, f"expected a forward and a backward {marker} call"
        text = jax.jit(loss).trace(*xs).lower(lowering_platforms=(platform,)).as_text()
        assert marker in text


@pytest.mark.parametrize("batch,grid", [(7, (2, 7)), (70000, (70000, 2))])
def test_triton_grid_puts_a_large_batch_on_x(batch, grid):
    import re  # noqa: PLC0415

    sds = jax.ShapeDtypeStruct
    length, channels, state = 8, 64, 4

    def loss(u, delta, A, B, C):
        return kernels_pallas.selective_scan(u, delta, A, B, C, backend="triton",
                                             interpret=False).sum()

    xs = (sds((batch, length, channels), jnp.float32), sds((batch, length, channels), jnp.float32),
          sds((channels, state), jnp.float32), sds((batch, length, 1, state), jnp.float32),
          sds((batch, length, 1, state), jnp.float32))
    text = jax.jit(jax.grad(loss, argnums=(0, 1))).trace(*xs).lower(
        lowering_platforms=("cuda",)).as_text()
    grids = re.findall(r"grid_x = (\d+) : i32, grid_y = (\d+)", text)
    assert len(grids) == 2 and all(tuple(map(int, g)) == grid for g in grids), grids


def test_triton_auto_time_splits_shape_the_grid():
    """time_splits=0 at the first benchmark shape: 8 segments, so the main kernels' batch axis
    holds 8 x 8 (row, segment) pairs and the summaries' 8 x 7; the forward alone takes 5."""
    import re  # noqa: PLC0415

    sds = jax.ShapeDtypeStruct
    b, length, e, n = 8, 2048, 1536, 16

    def loss(u, delta, A, B, C):
        return kernels_pallas.selective_scan(u, delta, A, B, C, backend="triton",
                                             interpret=False,
                                             config=TritonConfig(time_splits=0)).sum()

    xs = (sds((b, length, e), jnp.float32), sds((b, length, e), jnp.float32),
          sds((e, n), jnp.float32), sds((b, length, 1, n), jnp.float32),
          sds((b, length, 1, n), jnp.float32))
    text = jax.jit(jax.grad(loss, argnums=(0, 1))).trace(*xs).lower(
        lowering_platforms=("cuda",)).as_text()
    grids = re.findall(r"grid_x = (\d+) : i32, grid_y = (\d+)", text)
    assert sorted(tuple(map(int, g)) for g in grids) == [(48, 56)] * 2 + [(48, 64)] * 2, grids
    # The forward alone: 5 segments (8 x 5 and 8 x 4 (row, segment) pairs), and its main
    # kernel writes y only (no checkpoints, and the final state is not asked for).
    text = jax.jit(loss).trace(*xs).lower(lowering_platforms=("cuda",)).as_text()
    grids = re.findall(r"grid_x = (\d+) : i32, grid_y = (\d+)", text)
    assert sorted(tuple(map(int, g)) for g in grids) == [(48, 32), (48, 40)], grids
    calls = [line for line in text.splitlines() if "selective_scan_fwd" in line
             and "custom_call" in line and "summary" not in line]
    assert len(calls) == 1 and calls[0].split("->")[-1].count("tensor<") == 1, calls


@pytest.fixture
def triton_modules(monkeypatch):
    """The Triton modules lowered while the test runs, in order (a list filled as they come).
    Uses a private JAX hook: skips without."""
    try:
        from jax._src.pallas.triton import pallas_call_registration as registration  # noqa: PLC0415
        lower = registration.lowering.lower_jaxpr_to_triton_module
    except (ImportError, AttributeError) as err:
        pytest.skip(f"no Triton lowering hook in this jax: {err}")
    modules = []

    def capture(*a, **k):
        result = lower(*a, **k)
        modules.append(result.module)
        return result

    monkeypatch.setattr(registration.lowering, "lower_jaxpr_to_triton_module", capture)
    return modules


def verify_modules(modules) -> list[str]:
    """MLIR verification of every module; returns their kernel names."""
    for module in modules:
        with module.context:
            assert module.operation.verify()
    return [str(module.operation.attributes["sym_name"]).strip('"') for module in modules]


def test_triton_modules_verify(rng, triton_modules):
    """The Triton IR that the GPU would parse passes MLIR verification (ill-typed ops built by
    the lowering otherwise surface only on the GPU)."""
    modules = triton_modules
    # Time splits add the two summary kernels and make the main kernels' loops segment-aware.
    configs = (TritonConfig(time_splits=1), SMALL_CONFIGS["triton"],
               TritonConfig(prefetch=False, time_splits=1),
               TritonConfig(time_splits=2), TIME_SPLIT_CONFIGS["triton_split3"],
               TritonConfig(time_splits=2, prefetch=False, batch_major=True),
               TritonConfig(time_splits=3, kernel_carry=False, bwd_kernel_carry=True))
    for config in configs:
        args, kw = make_case(rng, (2, 37, 48, 5, 2), "bfloat16",
                             dict(D=True, z=True, bias=True, softplus=True, reverse=True,
                                  h0=True, final=True))
        names = _grad_names(kw)

        def loss(*xs, config=config, kw=kw, names=names):
            full = {**kw, **dict(zip(names, xs, strict=True))}
            y, h = kernels_pallas.selective_scan(
                full.pop("u"), full.pop("delta"), full.pop("A"), full.pop("B"), full.pop("C"),
                **full, backend="triton", interpret=False, config=config)
            return jnp.sum(y.astype(jnp.float32)) + jnp.sum(h)

        given = {**args, **kw}
        xs = [given[k] for k in names]
        jax.jit(jax.grad(loss, argnums=tuple(range(len(xs))))).trace(*xs).lower(
            lowering_platforms=("cuda",))
    # The forward alone, with no checkpoint output: unsplit, and in 3 segments.
    for fwd_only in (1, 3):
        jax.jit(functools.partial(loss, config=TritonConfig(fwd_only_time_splits=fwd_only))
                ).trace(*xs).lower(lowering_platforms=("cuda",))
    names = verify_modules(modules)
    whole, split = ["selective_scan_fwd", "selective_scan_bwd"], [
        "selective_scan_fwd_summary", "selective_scan_fwd", "selective_scan_bwd_summary",
        "selective_scan_bwd"]
    alone = ["selective_scan_fwd", "selective_scan_fwd_summary", "selective_scan_fwd"]
    assert names == whole * 3 + split * 4 + alone, names


def walk_loss_and_shapes(backend, *, shift, weighted, summed=True, config=None,
                         shape=(2, 3, 5, 128, 3, 16)):
    """A loss over the walk kernels (bfloat16 map, every option on) for lowering without a
    device, and the ShapeDtypeStructs of its arguments (u, delta, A, B, C, D, z, bias,
    weights). Sample 0 walks row, col_rev and snake_col; sample 1 three others."""
    b, h, w, e, k, n = shape
    sds, bf16, f32 = jax.ShapeDtypeStruct, jnp.bfloat16, jnp.float32
    xs = (sds((b, h, w, e), bf16), sds((k, b, h, w, e), bf16), sds((k, e, n), f32),
          sds((b, h, w, k, n), bf16), sds((b, h, w, k, n), bf16), sds((k, e), f32),
          sds((b, h, w, e), bf16), sds((k, e), f32), sds((b, k), f32))
    codes = jnp.asarray([[0, 3, 6], [5, 4, 1]][:b], jnp.int32)[:, :k]

    def loss(u, delta, A, B, C, D, z, bias, weights):
        y = kernels_pallas.selective_scan_walks(
            u, delta, A, B, C, D=D, z=z, delta_bias=bias, delta_softplus=True,
            walk_codes=codes, shift=shift, summed=summed, weights=weights if weighted else None,
            backend=backend, interpret=False, config=config)
        return jnp.sum(y.astype(jnp.float32) ** 2)

    return loss, xs


def test_triton_walk_modules_verify(triton_modules):
    """The walk kernels' Triton IR (walk table and weight loads, position arithmetic, shifted
    stores) passes MLIR verification: unsplit, in 2 and 3 time segments with both carries,
    without prefetch; per-walk outputs; the forward alone."""
    configs = (TritonConfig(time_splits=1), TritonConfig(time_splits=2),
               TritonConfig(time_splits=3, prefetch=False, kernel_carry=False,
                            bwd_kernel_carry=True))
    for config in configs:
        for shift, weighted, summed in ((True, True, True), (False, False, False)):
            loss, xs = walk_loss_and_shapes("triton", shift=shift, weighted=weighted,
                                            summed=summed, config=config,
                                            shape=(2, 3, 5, 48, 3, 5))
            jax.jit(jax.grad(loss, argnums=tuple(range(9)))).trace(*xs).lower(
                lowering_platforms=("cuda",))
    jax.jit(loss).trace(*xs).lower(lowering_platforms=("cuda",))
    names = verify_modules(triton_modules)
    whole = ["selective_scan_fwd_walks", "selective_scan_bwd_walks"]
    split = ["selective_scan_fwd_summary_walks", "selective_scan_fwd_walks",
             "selective_scan_bwd_summary_walks", "selective_scan_bwd_walks"]
    alone = ["selective_scan_fwd_summary_walks", "selective_scan_fwd_walks"]  # 3 segments
    assert names == whole * 2 + split * 4 + alone, names


# ---------------------------------------------------------------------------------------------
# Compiled on a GPU: `pytest -m gpu` on the GPU machine.

on_gpu = pytest.mark.skipif(jax.default_backend() not in ("gpu", "cuda"), reason="needs a GPU")


@pytest.mark.gpu
@on_gpu
@pytest.mark.parametrize("name,shape,dtype,opts", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("config", ["default", "small"])
def test_gpu_matches_references(rng, name, shape, dtype, opts, config):
    check_case(rng, "triton", shape, dtype, opts,
               config=None if config == "default" else SMALL_CONFIGS["triton"],
               interpret=False)


@pytest.mark.gpu
@on_gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("time_splits", [1, 4])
def test_gpu_larger_shape(rng, dtype, reverse, time_splits):
    """Many checkpoint intervals, several channel blocks and groups, a ragged length; with 4
    time segments too (333 steps: 4 x 88, the last one partly padding)."""
    check_case(rng, "triton", (3, 333, 200, 16, 2), dtype,
               dict(D=True, z=True, bias=True, softplus=True, reverse=reverse, h0=True,
                    final=True), config=TritonConfig(time_splits=time_splits), interpret=False)


@pytest.mark.gpu
@on_gpu
def test_gpu_dispatcher_auto_picks_pallas(rng):
    from mmx_jax.ssm import ScanDims, resolve_impl  # noqa: PLC0415
    assert resolve_impl("auto", ScanDims(2, 64, 32, 16, 1)) == "pallas"
    args, kw = make_case(rng, (2, 64, 32, 16, 1), "float32", dict(D=True))
    y = selective_scan(**args, **kw, impl="auto")
    assert rel_err(y, numpy_scan(**args, **kw)) < 2e-5


@pytest.mark.gpu
@on_gpu
def test_gpu_batch_above_the_grid_y_limit(rng):
    """batch x tokens of a vision channel mixer: the batch goes on the grid's x axis."""
    from mmx_jax.ssm import ScanDims, resolve_impl  # noqa: PLC0415
    assert resolve_impl("auto", ScanDims(70000, 4, 32, 16, 2)) == "pallas"
    check_case(rng, "triton", (70000, 4, 32, 16, 2), "float32",
               dict(D=True, bias=True, softplus=True), interpret=False)


@pytest.mark.gpu
@on_gpu
@pytest.mark.parametrize("name,shape,walks,opts,dtype", WALK_CASES, ids=[c[0] for c in WALK_CASES])
@pytest.mark.parametrize("config", ["default", "small"])
def test_gpu_walks_match_references(rng, name, shape, walks, opts, dtype, config):
    check_walk_case(rng, "triton", shape, walks, opts, dtype,
                    config=None if config == "default" else SMALL_CONFIGS["triton"],
                    interpret=False)


@pytest.mark.gpu
@on_gpu
@pytest.mark.parametrize("time_splits", [1, 4])
def test_gpu_walks_larger_map(rng, time_splits):
    """A 14x9 map (126 steps: several checkpoint intervals, odd sides), 3 channel blocks per
    walk, per-sample walks with the shift and weights (ViQS's call), in 1 and 4 segments."""
    check_walk_case(rng, "triton", (3, 14, 9, 80, 16), 4,
                    dict(D=True, z=True, bias=True, softplus=True, shift=True, weighted=True),
                    "float32", config=TritonConfig(time_splits=time_splits), interpret=False)
