"""Layers: shapes, causality, S6 initialisation, quasi-separable structure, weighted averaging,
scan permutations."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mmx_jax.layers import (
    ALL_ORDERS,
    S6,
    AveragingWeights,
    ChannelGroupMixer,
    CrossScanTokenMixer,
    DepthwiseConv2D,
    Linear,
    MambaMixerStack,
    ResidualBlock,
    SelectiveChannelMixer,
    SelectiveTokenMixer,
    apply_scans,
    averaging_layout,
    causal_depthwise_conv1d,
    inverse_permutation,
    scan_order,
    scan_orders,
    shift_right,
    undo_scans,
)
from mmx_jax.layers.initializers import uniform
from mmx_jax.layers.s6 import per_direction_linear
from mmx_jax.models import count_params
from mmx_jax.ssm import selective_scan_sequential


def normal(rng, *shape):
    return jnp.asarray(rng.normal(size=shape).astype(np.float32))


# --- scan orders ---------------------------------------------------------------------------


@pytest.mark.parametrize("height, width", [(1, 1), (1, 5), (4, 1), (3, 4), (5, 5), (6, 7)])
def test_scan_orders_are_permutations_that_round_trip(rng, height, width):
    x = rng.normal(size=(height * width, 3))
    for name in ALL_ORDERS:
        perm = scan_order(name, height, width)
        assert sorted(perm) == list(range(height * width)), name
        assert np.array_equal(x[perm][inverse_permutation(perm)], x), name
    perms = scan_orders(ALL_ORDERS, height, width)
    batch = normal(rng, 2, height * width, 3)
    scanned = apply_scans(batch, perms)
    assert scanned.shape == (2, height * width, len(ALL_ORDERS), 3)
    np.testing.assert_array_equal(scanned[:, :, 3], batch[:, perms[3]])
    np.testing.assert_array_equal(undo_scans(scanned, perms),
                                  jnp.repeat(batch[:, :, None], len(ALL_ORDERS), axis=2))
    # Per-sample (traced) orders, as Switch of Scans uses them.
    chosen = jnp.asarray(np.stack([perms[[0, 5]], perms[[7, 2]]]))
    np.testing.assert_array_equal(undo_scans(apply_scans(batch, chosen), chosen),
                                  jnp.repeat(batch[:, :, None], 2, axis=2))


def test_scan_orders_visit_the_map_as_named():
    h, w = 3, 4
    grid = np.arange(h * w).reshape(h, w)
    assert list(scan_order("row", h, w)) == list(grid.reshape(-1))
    assert list(scan_order("col", h, w)) == list(grid.T.reshape(-1))
    assert list(scan_order("row_rev", h, w)) == list(grid.reshape(-1)[::-1])
    assert list(scan_order("snake_row", h, w)) == [0, 1, 2, 3, 7, 6, 5, 4, 8, 9, 10, 11]
    assert list(scan_order("snake_col", h, w)) == [0, 4, 8, 9, 5, 1, 2, 6, 10, 11, 7, 3]
    for name in ("snake_row", "snake_col", "snake_row_rev", "snake_col_rev"):
        rows, cols = np.divmod(scan_order(name, h, w), w)
        assert np.all(np.abs(np.diff(rows)) + np.abs(np.diff(cols)) == 1), name  # neighbours
    with pytest.raises(ValueError, match="'diagonal' is not one of"):
        scan_order("diagonal", h, w)


# --- pure helpers --------------------------------------------------------------------------


def test_causal_conv_matches_numpy(rng):
    x, k, b = rng.normal(size=(2, 9, 3)), rng.normal(size=(4, 3)), rng.normal(size=(3,))
    want = np.zeros_like(x)
    for t in range(9):
        for j in range(4):
            src = t - 3 + j
            if src >= 0:
                want[:, t] += k[j] * x[:, src]
    np.testing.assert_allclose(causal_depthwise_conv1d(x, k, b), want + b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kernel, strides, dilation, padding, size", [
    ((3, 3), (1, 1), (1, 1), "SAME", (7, 9)), ((3, 3), (1, 1), (2, 2), "SAME", (8, 8)),
    ((3, 3), (1, 1), (4, 4), "SAME", (5, 6)), ((2, 2), (2, 2), (1, 1), "VALID", (8, 6)),
    ((4, 4), (2, 2), (1, 1), "SAME", (7, 7)), ((2, 3), (1, 1), (1, 1), "SAME", (6, 5))])
def test_depthwise_conv_matches_lax_grouped_conv(rng, kernel, strides, dilation, padding,
                                                  size):
    """Values and both gradients equal nnx.Conv's (XLA's grouped convolution) with the same
    parameters, which have the same shapes."""
    channels = 5
    ours = DepthwiseConv2D(channels, kernel, strides=strides, dilation=dilation,
                           padding=padding, rngs=nnx.Rngs(0))
    ref = nnx.Conv(channels, channels, kernel, strides=strides, kernel_dilation=dilation,
                   padding=padding, feature_group_count=channels, rngs=nnx.Rngs(1))
    assert ours.kernel.shape == ref.kernel.shape and ours.bias.shape == ref.bias.shape
    ours.bias[...] = normal(rng, channels)
    nnx.update(ref, nnx.state(ours))
    x = normal(rng, 2, *size, channels)

    def value_and_grads(module):
        loss = lambda m, x: jnp.sum(m(x) * jnp.cos(m(x)))  # noqa: E731
        return module(x), nnx.grad(loss, argnums=(0, 1))(module, x)

    (y, (gm, gx)), (y_ref, (gm_ref, gx_ref)) = value_and_grads(ours), value_and_grads(ref)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gx, gx_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(gm.kernel[...], gm_ref.kernel[...], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(gm.bias[...], gm_ref.bias[...], rtol=1e-4, atol=1e-4)


def test_shift_right(rng):
    y = normal(rng, 2, 5, 3)
    shifted = shift_right(y)
    np.testing.assert_array_equal(shifted[:, 0], 0)
    np.testing.assert_array_equal(shifted[:, 1:], y[:, :-1])


# --- initialisation -------------------------------------------------------------------------


@pytest.mark.parametrize("partitionable", [True, False])
@pytest.mark.parametrize("shape", [(2, 32, 9), (4, 7), (3, 1, 5, 2), (11,)])
def test_flat_uniform_draws_the_values_of_jax_random_uniform(shape, partitionable):
    key = jax.random.key(7)
    with jax.threefry_partitionable(partitionable):
        want = jax.random.uniform(key, shape, minval=-0.5, maxval=2.0)
        got = uniform(key, shape, minval=-0.5, maxval=2.0)
    assert got.shape == shape and got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)


# --- S6 ------------------------------------------------------------------------------------


def test_s6_initialisation_follows_mamba():
    s6 = S6(32, num_directions=2, state_dim=8, model_dim=40, rngs=nnx.Rngs(0))
    assert s6.dt_rank == 3  # ceil(40 / 16)
    np.testing.assert_allclose(np.exp(s6.A_log[...]), np.broadcast_to(np.arange(1, 9),
                                                                        (2, 32, 8)), rtol=1e-6)
    np.testing.assert_array_equal(s6.D[...], 1.0)
    dt = np.asarray(jax.nn.softplus(s6.dt_bias[...]))
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 1e-1 * (1 + 1e-5)
    assert np.log(dt).std() > 0.5  # spread over the log-uniform range, not one value
    assert s6.x_proj.shape == (2, 32, 3 + 16) and s6.dt_proj.shape == (2, 3, 32)


@pytest.mark.parametrize("directions", [1, 2, 3])
def test_s6_directions_are_independent_scans(rng, directions):
    """One grouped scan call equals K separate scans with each direction's own parameters."""
    s6 = S6(6, num_directions=directions, state_dim=4, rngs=nnx.Rngs(1))
    u = normal(rng, 2, 7, directions, 6)
    got = s6(u)
    for k in range(directions):
        x_dbl = u[:, :, k] @ s6.x_proj[...][k]
        dt, bm, cm = x_dbl[..., :1], x_dbl[..., 1:5], x_dbl[..., 5:]
        want = selective_scan_sequential(
            u[:, :, k], dt @ s6.dt_proj[...][k], -jnp.exp(s6.A_log[...][k]), bm, cm,
            D=s6.D[...][k], delta_bias=s6.dt_bias[...][k], delta_softplus=True)
        np.testing.assert_allclose(got[:, :, k], want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("directions", [1, 2, 3])
def test_per_direction_linear_matches_float64(rng, directions):
    """Each direction's rows times its own matrix, values and gradients (block-diagonal product
    for K <= 2, batched for more)."""
    x, w = rng.normal(size=(3, 5, directions, 6)), rng.normal(size=(directions, 6, 4))
    cot = rng.normal(size=(3, 5, directions, 4))
    want = np.einsum("blki,kio->blko", x, w)
    got, vjp = jax.vjp(per_direction_linear, jnp.asarray(x, jnp.float32),
                       jnp.asarray(w, jnp.float32))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    dx, dw = vjp(jnp.asarray(cot, jnp.float32))
    np.testing.assert_allclose(dx, np.einsum("blko,kio->blki", cot, w), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, np.einsum("blki,blko->kio", x, cot), rtol=1e-5, atol=1e-5)


def test_linear_is_nnx_linear_on_any_rank(rng):
    """Same parameters, values and gradients as nnx.Linear on a 4-D input (float64 check)."""
    ours, theirs = Linear(5, 3, rngs=nnx.Rngs(0)), nnx.Linear(5, 3, rngs=nnx.Rngs(0))
    assert jax.tree.structure(nnx.state(ours)) == jax.tree.structure(nnx.state(theirs))
    x = rng.normal(size=(2, 4, 6, 5))
    kernel, bias = (np.asarray(v, np.float64) for v in (ours.kernel[...], ours.bias[...]))
    np.testing.assert_allclose(ours(jnp.asarray(x, jnp.float32)), x @ kernel + bias, rtol=1e-5,
                               atol=1e-5)
    cot = rng.normal(size=(2, 4, 6, 3))
    grad = nnx.grad(lambda m: jnp.vdot(m(jnp.asarray(x, jnp.float32)),
                                       jnp.asarray(cot, jnp.float32)))(ours)
    np.testing.assert_allclose(grad["kernel"][...], np.einsum("abci,abco->io", x, cot),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grad["bias"][...], cot.sum((0, 1, 2)), rtol=1e-5, atol=1e-5)


# --- mixers --------------------------------------------------------------------------------


@pytest.mark.parametrize("directions", [1, 2, "quasi_separable"])
def test_token_mixer_shapes(rng, directions):
    mixer = SelectiveTokenMixer(8, directions=directions, state_dim=4, rngs=nnx.Rngs(0))
    assert mixer(normal(rng, 2, 3, 11, 8)).shape == (2, 3, 11, 8)


def test_unidirectional_mixer_is_causal(rng):
    mixer = SelectiveTokenMixer(8, directions=1, state_dim=4, rngs=nnx.Rngs(0))
    x = normal(rng, 2, 12, 8)
    changed = x.at[:, 7:].set(normal(rng, 2, 5, 8))
    y, y_changed = mixer(x), mixer(changed)
    np.testing.assert_allclose(y[:, :7], y_changed[:, :7], rtol=1e-6, atol=1e-6)
    assert np.abs(np.asarray(y[:, 7:] - y_changed[:, 7:])).max() > 1e-3


@pytest.mark.parametrize("directions", [2, "quasi_separable"])
def test_bidirectional_mixers_see_the_future(rng, directions):
    mixer = SelectiveTokenMixer(8, directions=directions, state_dim=4, rngs=nnx.Rngs(0))
    x = normal(rng, 2, 12, 8)
    y, y_changed = mixer(x), mixer(x.at[:, -1].add(1.0))
    assert np.abs(np.asarray(y[:, 0] - y_changed[:, 0])).max() > 1e-6


def test_channel_mixer_is_not_causal(rng):
    """Changing the last variate changes the output of the first one."""
    mixer = SelectiveChannelMixer(8, axis=1, state_dim=4, rngs=nnx.Rngs(0))
    x = normal(rng, 2, 5, 6, 8)  # (B, M, P, d): scan along M
    y, y_changed = mixer(x), mixer(x.at[:, -1].add(1.0))
    assert y.shape == x.shape
    assert np.abs(np.asarray(y[:, 0] - y_changed[:, 0])).max() > 1e-6
    # ... and mixes only along M: other patches are untouched.
    y_patch = mixer(x.at[:, :, -1].add(1.0))
    np.testing.assert_allclose(y[:, :, :-1], y_patch[:, :, :-1], rtol=1e-6, atol=1e-6)


def test_quasi_separable_matches_its_definition(rng):
    """QS(u) = shift(SS_f(u)) + flip(shift(SS_b(flip(u)))) + D * u, SS_f/SS_b sharing A."""
    mixer = SelectiveTokenMixer(4, directions="quasi_separable", state_dim=3,
                                rngs=nnx.Rngs(2))
    assert mixer.s6.A_log.shape[0] == 1 and mixer.s6.D is None
    mixer.D[...] = normal(rng, 8)
    u = normal(rng, 2, 6, 8)  # already in_proj'ed
    conv = jax.nn.silu(causal_depthwise_conv1d(u, mixer.conv_kernel[...], mixer.conv_bias[...]))
    s6 = mixer.s6

    def ss(k, seq):
        x_dbl = seq @ s6.x_proj[...][k]
        r, n = s6.dt_rank, s6.state_dim
        return selective_scan_sequential(
            seq, x_dbl[..., :r] @ s6.dt_proj[...][k], -jnp.exp(s6.A_log[...][0]),
            x_dbl[..., r:r + n], x_dbl[..., r + n:], delta_bias=s6.dt_bias[...][k],
            delta_softplus=True)

    want = (shift_right(ss(0, conv)) + jnp.flip(shift_right(ss(1, jnp.flip(conv, 1))), 1)
            + mixer.D[...] * conv)
    np.testing.assert_allclose(mixer.mix(u), want, rtol=2e-5, atol=2e-5)


def test_cross_scan_and_channel_group_mixers(rng):
    mixer = CrossScanTokenMixer(8, state_dim=4, rngs=nnx.Rngs(0))
    x = normal(rng, 2, 5, 6, 8)
    assert mixer(x).shape == x.shape
    assert mixer.s6.num_directions == 4
    # Every output token depends on every input token (four scans cover the map).
    grad = jax.grad(lambda v: mixer(v)[0, 0, 0].sum())(x)
    assert np.all(np.abs(np.asarray(grad[0])).sum(-1) > 0)
    group_mixer = ChannelGroupMixer(16, group_size=8, state_dim=4, rngs=nnx.Rngs(0))
    assert group_mixer(normal(rng, 2, 9, 16)).shape == (2, 9, 16)
    with pytest.raises(ValueError, match="2 \\* channels = 20 is not divisible by group_size"):
        ChannelGroupMixer(10, group_size=8, rngs=nnx.Rngs(0))


# --- weighted averaging --------------------------------------------------------------------


def _stack(learnable, layers=3, dim=8):
    rngs = nnx.Rngs(3)

    def block(mixer):
        return ResidualBlock(dim, mixer, rngs=rngs)

    return MambaMixerStack(
        layers, lambda _: block(SelectiveTokenMixer(dim, state_dim=4, rngs=rngs)),
        lambda _: block(SelectiveChannelMixer(dim, axis=1, state_dim=4, rngs=rngs)),
        learnable_averaging=learnable)


@pytest.mark.parametrize("layers", [1, 2, 5])
def test_averaging_has_lyr_2lyr_plus_3_scalars(layers):
    layout = averaging_layout(layers)
    sizes = [s.stop - s.start for entry in layout for s in entry.values()]
    assert sum(sizes) == layers * (2 * layers + 3)
    starts = sorted(s.start for entry in layout for s in entry.values())
    assert starts[0] == 0 and len(set(starts)) == len(starts)


def test_initial_averaging_is_a_plain_residual_stack(rng):
    stack = _stack(learnable=False)
    assert isinstance(stack.averaging, AveragingWeights)
    assert count_params(stack) == count_params(_stack(learnable=True)) - 3 * (2 * 3 + 3)
    x = normal(rng, 2, 3, 7, 8)
    y = x
    for tok, ch in zip(stack.token_blocks, stack.channel_blocks, strict=True):
        y = ch(tok(y))
    np.testing.assert_allclose(stack(x), y, rtol=1e-5, atol=1e-5)


def test_averaging_weights_are_used(rng):
    """Moving one weight off the residual chain changes the output exactly as the formula says."""
    stack = _stack(learnable=True, layers=2)
    x = normal(rng, 2, 3, 7, 8)
    layout = averaging_layout(2)
    w = stack.averaging[...]
    stack.averaging[...] = w.at[layout[1]["alpha"].start].set(0.5)  # alpha[2, 0] * y_tok(0)
    tok, ch = stack.token_blocks, stack.channel_blocks
    y_tok1 = tok[0](x)
    y_ch1 = ch[0](y_tok1)
    y_tok2 = tok[1](y_ch1 + 0.5 * x)
    np.testing.assert_allclose(stack(x), ch[1](y_tok2), rtol=1e-5, atol=1e-5)


def test_dropout_and_drop_path_only_in_training(rng):
    mixer = SelectiveTokenMixer(8, state_dim=4, rngs=nnx.Rngs(0))
    block = ResidualBlock(8, mixer, dropout=0.5, drop_path=0.5, rngs=nnx.Rngs(0))
    x = normal(rng, 4, 6, 8)
    a, b = block(x), block(x)
    assert not np.allclose(a, b)
    block.eval()
    np.testing.assert_array_equal(block(x), x + mixer(block.norm(x)))


def test_every_combination_of_norms(rng):
    for norm, directions in itertools.product(("layernorm", "rmsnorm"), (1, 2)):
        block = ResidualBlock(8, SelectiveTokenMixer(8, directions=directions, state_dim=4,
                                                     rngs=nnx.Rngs(0)), norm=norm,
                              rngs=nnx.Rngs(0))
        assert block(normal(rng, 2, 5, 8)).shape == (2, 5, 8)
    with pytest.raises(ValueError, match="norm='batchnorm'"):
        ResidualBlock(8, SelectiveTokenMixer(8, rngs=nnx.Rngs(0)), norm="batchnorm",
                      rngs=nnx.Rngs(0))
