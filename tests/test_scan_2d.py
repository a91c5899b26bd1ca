"""selective_scan_2d: the layout path against a float64 NumPy loop over every walk, gradients,
errors, dispatch. The Pallas walk kernels have their own tests in test_kernels_pallas.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from references import WALKS, numpy_walk_scan, random_walk_inputs, rel_err

from mmx_jax.ssm import WalkDims, resolve_impl_2d, selective_scan_2d
from mmx_jax.ssm.scan_orders import ALL_ORDERS, CROSS_SCAN

# name: map (b, H, W, E, N), walks (a tuple of names: fixed; an int: that many slots picked per
# sample from all 8), options.
CASES = {
    "cross_scan_3x5": ((2, 3, 5, 4, 3), CROSS_SCAN, dict()),
    "every_walk_5x3_per_walk_gate": ((1, 5, 3, 3, 2), WALKS, dict(summed=False, z=True)),
    "per_sample_shift_weighted": ((2, 4, 3, 4, 3), 4, dict(shift=True, weighted=True, z=True)),
    "one_row_1x6": ((2, 1, 6, 3, 2), ("row", "col", "snake_col_rev", "snake_row"), dict()),
    "one_column_7x1": ((1, 7, 1, 3, 2), ("row_rev", "col", "snake_row_rev"),
                       dict(shift=True, summed=False)),
    "no_softplus_no_D": ((2, 3, 4, 3, 2), ("snake_col", "row"),
                         dict(softplus=False, D=False)),
}


def make(rng, shape, walks, opts, dtype=np.float32):
    """(arrays, keyword options, walk names per sample) of one case."""
    b, h, w, e, n = shape
    if isinstance(walks, int):
        index = rng.integers(0, len(WALKS), size=(b, walks)).astype(np.int32)
        k, bank, names = walks, WALKS, [[WALKS[i] for i in row] for row in index]
    else:
        index, k, bank, names = None, len(walks), tuple(walks), [list(walks)] * b
    softplus = opts.get("softplus", True)
    arrays = random_walk_inputs(rng, b, h, w, e, n, k, dtype=dtype, softplus=softplus,
                                D=opts.get("D", True), z=opts.get("z", False))
    if opts.get("weighted"):
        arrays["weights"] = rng.uniform(0.1, 1.0, size=(b, k)).astype(dtype)
    kw = dict(delta_softplus=softplus, walks=bank, shift=opts.get("shift", False),
              summed=opts.get("summed", True),
              walk_index=None if index is None else jnp.asarray(index))
    return arrays, kw, names


def reference(arrays, kw, names):
    return numpy_walk_scan(**arrays, delta_softplus=kw["delta_softplus"], walk_names=names,
                           shift=kw["shift"], summed=kw["summed"])


@pytest.mark.parametrize("impl", ["sequential", "sequential_vjp", "associative"])
@pytest.mark.parametrize("case", list(CASES))
def test_layout_path_matches_float64_loop(rng, impl, case):
    arrays, kw, names = make(rng, *CASES[case])
    y = selective_scan_2d(**{k: jnp.asarray(v) for k, v in arrays.items()}, **kw, impl=impl)
    assert y.dtype == jnp.float32
    assert rel_err(y, reference(arrays, kw, names)) <= 1e-5


def test_shift_leaves_each_walks_first_position_empty(rng):
    """With the shift, a walk's output at its first position is 0 (nothing comes before)."""
    arrays, kw, _ = make(rng, (1, 3, 4, 3, 2), ("col_rev", "snake_row"),
                         dict(shift=True, summed=False))
    y = np.asarray(selective_scan_2d(**{k: jnp.asarray(v) for k, v in arrays.items()}, **kw,
                                     impl="sequential"))
    # col_rev starts at the bottom-right corner, snake_row at the top-left one.
    assert np.all(y[0, 0, 2, 3] == 0) and np.all(y[1, 0, 0, 0] == 0)
    assert np.all(y[0, 0, 0, 0] != 0) and np.all(y[1, 0, 2, 3] != 0)


def test_bfloat16_inputs(rng):
    arrays, kw, names = make(rng, (2, 3, 5, 4, 3), 4, dict(weighted=True, z=True))
    bf16 = {k: jnp.asarray(v, jnp.bfloat16) for k, v in arrays.items()}
    want = reference({k: np.asarray(v, np.float32) for k, v in bf16.items()}, kw, names)
    y = selective_scan_2d(**bf16, **kw, impl="sequential")
    assert y.dtype == jnp.bfloat16
    assert rel_err(y, want) <= 1e-2


GRAD_ARGS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "weights")


@pytest.mark.parametrize("walks", [CROSS_SCAN, 3])
def test_gradients_of_every_input(rng, walks):
    """Reverse-mode gradients (fixed walks, and per-sample walks with the shift and weights)
    against float64 finite differences."""
    per_sample = isinstance(walks, int)
    opts = dict(z=True, shift=per_sample, weighted=per_sample)
    arrays, kw, _ = make(rng, (2, 3, 4, 2, 2), walks, opts, dtype=np.float64)
    names = [k for k in GRAD_ARGS if k in arrays]
    with jax.enable_x64(True):
        cot = jnp.asarray(rng.normal(size=(2, 3, 4, 2)))

        def loss(*xs):
            return jnp.sum(selective_scan_2d(**dict(zip(names, xs, strict=True)), **kw,
                                             impl="sequential") * cot)

        xs = tuple(jnp.asarray(arrays[k]) for k in names)
        check_grads(jax.jit(loss), xs, order=1, modes=["rev"], atol=1e-5, rtol=1e-5, eps=1e-6)


@pytest.mark.parametrize("bad, message", [
    (dict(u=np.ones((2, 15, 4), np.float32)), "'u' has shape (2, 15, 4), wanted (batch, H, W"),
    (dict(delta=np.ones((3, 2, 3, 5, 4), np.float32)),
     "'delta' has shape (3, 2, 3, 5, 4), wanted (4, 2, 3, 5, 4) (K = 4 walks)"),
    (dict(A=np.ones((4, 3, 3), np.float32)), "'A' has shape (4, 3, 3), wanted (4, 4, N)"),
    (dict(B=np.ones((2, 3, 5, 4, 2), np.float32)), "'B' has shape (2, 3, 5, 4, 2)"),
    (dict(C=np.ones((2, 5, 3, 4, 3), np.float32)), "'C' has shape (2, 5, 3, 4, 3)"),
    (dict(D=np.ones((4,), np.float32)), "'D' has shape (4,), wanted (4, 4)"),
    (dict(z=np.ones((2, 3, 5, 3), np.float32)), "'z' has shape (2, 3, 5, 3), wanted"),
    (dict(weights=np.ones((2, 3), np.float32)), "'weights' has shape (2, 3), wanted (2, 4)"),
    (dict(u=np.ones((2, 3, 5, 4), np.int32)), "'u' has dtype int32"),
])
def test_bad_arguments_name_the_argument(rng, bad, message):
    arrays, kw, _ = make(rng, (2, 3, 5, 4, 3), CROSS_SCAN, dict(z=True, weighted=True))
    with pytest.raises(ValueError) as err:
        selective_scan_2d(**{**arrays, **bad}, **kw)
    assert message in str(err.value)


def test_bad_walks_and_options(rng):
    arrays, kw, _ = make(rng, (2, 3, 5, 4, 3), CROSS_SCAN, dict())
    with pytest.raises(ValueError, match="walk 'diagonal' is not one of"):
        selective_scan_2d(**arrays, **{**kw, "walks": ("row", "col", "diagonal", "col_rev")})
    with pytest.raises(ValueError, match="'walk_index' has shape"):
        selective_scan_2d(**arrays, **{**kw, "walk_index": jnp.zeros((3, 4), jnp.int32)})
    with pytest.raises(ValueError, match="'walk_index' has dtype float32"):
        selective_scan_2d(**arrays, **{**kw, "walk_index": jnp.zeros((2, 4))})
    with pytest.raises(ValueError, match="need summed=True"):
        selective_scan_2d(**arrays, weights=np.ones((2, 4), np.float32),
                          **{**kw, "summed": False})
    with pytest.raises(ValueError, match="impl='fast' is not one of"):
        selective_scan_2d(**arrays, **kw, impl="fast")


def test_auto_is_sequential_on_cpu():
    if jax.default_backend() == "cpu":
        assert resolve_impl_2d("auto", WalkDims(2, 56, 56, 192, 4, 16)) == "sequential"


def test_every_order_of_the_bank_is_a_walk():
    """The scan orders' bank and the reference's names are the same eight walks."""
    assert sorted(ALL_ORDERS) == sorted(WALKS)
