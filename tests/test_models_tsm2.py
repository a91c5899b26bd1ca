"""TSM2: shapes, registry, RevIN, patching, covariates, and learning on real ETTh1 windows."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mmx_jax.models import TSM2, count_params, create_model, list_models
from mmx_jax.models.tsm2 import RevIN, num_patches, patchify

SMALL = dict(d_model=16, state_dim=4, num_layers=1)


def test_registry_creates_tsm2_with_the_paper_shapes(rng):
    assert "tsm2" in list_models()
    model = create_model("tsm2", num_variates=7, seq_len=512, pred_len=96, **SMALL)
    assert isinstance(model, TSM2) and model.num_patches == 64  # (512 - 16) / 8 + 2
    x = jnp.asarray(rng.normal(size=(3, 512, 7)).astype(np.float32))
    graphdef, state = nnx.split(model)
    y = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))(state, x)
    assert y.shape == (3, 96, 7) and np.all(np.isfinite(y))


def test_create_model_is_seeded_and_rejects_unknown_names():
    a = create_model("tsm2", num_variates=2, seq_len=32, pred_len=8, **SMALL)
    b = create_model("tsm2", num_variates=2, seq_len=32, pred_len=8, **SMALL)
    c = create_model("tsm2", num_variates=2, seq_len=32, pred_len=8, rngs=nnx.Rngs(1), **SMALL)
    np.testing.assert_array_equal(a.head.kernel[...], b.head.kernel[...])
    assert not np.allclose(a.head.kernel[...], c.head.kernel[...])
    with pytest.raises(ValueError, match="unknown model 'tsm3'; registered models: .*tsm2"):
        create_model("tsm3")


def test_count_params_counts_trainable_scalars():
    assert count_params(nnx.Linear(3, 4, rngs=nnx.Rngs(0))) == 3 * 4 + 4
    frozen = create_model("tsm2", num_variates=2, seq_len=32, pred_len=8,
                          learnable_averaging=False, **SMALL)
    learned = create_model("tsm2", num_variates=2, seq_len=32, pred_len=8, **SMALL)
    assert count_params(learned) - count_params(frozen) == 1 * (2 * 1 + 3)


def test_revin_round_trip_and_statistics(rng):
    x = jnp.asarray(rng.normal(3.0, 2.0, size=(4, 50, 3)).astype(np.float32))
    revin = RevIN(3, affine=True)
    revin.weight[...] = jnp.asarray([0.5, 2.0, 1.5])
    revin.bias[...] = jnp.asarray([0.1, -0.2, 0.3])
    z, stats = revin.normalize(x)
    plain = (x - x.mean(1, keepdims=True)) / x.std(1, keepdims=True)
    np.testing.assert_allclose((z - revin.bias[...]) / revin.weight[...], plain, atol=1e-4)
    np.testing.assert_allclose(revin.denormalize(z, stats), x, rtol=1e-5, atol=1e-4)


def test_patchify_matches_numpy(rng):
    x = rng.normal(size=(2, 3, 40)).astype(np.float32)
    got = patchify(jnp.asarray(x), patch_len=16, stride=8)
    padded = np.concatenate([x, np.repeat(x[..., -1:], 8, axis=-1)], axis=-1)
    want = np.stack([padded[..., s:s + 16] for s in range(0, 48 - 16 + 1, 8)], axis=2)
    assert got.shape == (2, 3, num_patches(40, 16, 8), 16) == want.shape
    np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="series of 10 steps is shorter than patch_len=16"):
        num_patches(10, 16, 8)


def test_covariates_and_both_time_directions(rng):
    model = create_model("tsm2", num_variates=3, seq_len=48, pred_len=12, num_static=2,
                         num_future=4, time_directions=2, **SMALL)
    x = jnp.asarray(rng.normal(size=(2, 48, 3)).astype(np.float32))
    static = jnp.asarray(rng.normal(size=(2, 2)).astype(np.float32))
    future = jnp.asarray(rng.normal(size=(2, 12, 4)).astype(np.float32))
    y = model(x, static=static, future=future)
    assert y.shape == (2, 12, 3)
    assert not np.allclose(y, model(x, static=static, future=future + 1.0))  # Z is used
    with pytest.raises(ValueError, match="pass `static` / `future` exactly when"):
        model(x)
    with pytest.raises(ValueError, match=r"input has shape \(2, 40, 3\), wanted \(batch, 48, 3\)"):
        model(x[:, :40])


def test_revin_makes_the_forecast_shift_equivariant(rng):
    """With RevIN (no affine), adding a constant to a variate shifts its forecast by it."""
    model = create_model("tsm2", num_variates=2, seq_len=32, pred_len=8, dropout=0.0, **SMALL)
    x = jnp.asarray(rng.normal(size=(2, 32, 2)).astype(np.float32))
    shift = jnp.asarray([5.0, -3.0])
    np.testing.assert_allclose(model(x + shift), model(x) + shift, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_zero_layer_scale_starts_as_the_models_linear_part(rng):
    """layer_scale=0 makes every mixer block the identity: the forecast is that of the same
    embedding and head with no layers, and the scales still get gradients."""
    args = dict(num_variates=3, seq_len=32, pred_len=8, dropout=0.0, **{**SMALL, "num_layers": 2})
    full = create_model("tsm2", layer_scale=0.0, **args, rngs=nnx.Rngs(1))
    bare = create_model("tsm2", **{**args, "num_layers": 0}, rngs=nnx.Rngs(2))
    assert bare.mixer.averaging is None
    for name in ("patch_embed", "head_norm", "head"):
        nnx.update(getattr(bare, name), nnx.state(getattr(full, name)))
    bare.pos_embed[...] = full.pos_embed[...]
    x = jnp.asarray(rng.normal(size=(2, 32, 3)).astype(np.float32))
    np.testing.assert_allclose(full(x), bare(x), rtol=1e-6, atol=1e-6)
    scales = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(full).mixer.token_blocks[0].scale[...]
    assert np.abs(np.asarray(scales)).max() > 0
    plain = create_model("tsm2", **args, rngs=nnx.Rngs(1))
    assert not np.allclose(plain(x), bare(x), atol=1e-3)  # without it the blocks do change x


def test_mixer_params_regex_picks_the_mixer_stack_only():
    import re  # noqa: PLC0415

    from mmx_jax.models.tsm2 import MIXER_PARAMS  # noqa: PLC0415
    from mmx_jax.train.sharding import path_str  # noqa: PLC0415

    model = create_model("tsm2", num_variates=2, seq_len=32, pred_len=8, layer_scale=0.0, **SMALL)
    params = nnx.state(model, nnx.Param)
    picked = {path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]
              if re.search(MIXER_PARAMS, path_str(p))}
    mixer = {path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(
        nnx.state(model.mixer, nnx.Param))[0]}
    assert len(picked) == len(mixer) > 10
    assert all(p.startswith("mixer/") for p in picked)


def test_training_steps_on_real_etth1_lower_the_loss(shared_data):
    from mmx_jax.data import load_forecasting

    data = load_forecasting("ETTh1", seq_len=96, pred_len=24)
    x, y = data.train.get_batch(np.arange(0, 8000, 250))  # 32 windows spread over the year
    model = create_model("tsm2", num_variates=7, seq_len=96, pred_len=24, dropout=0.0, **SMALL)
    optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x, y):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer, x, y)) for _ in range(15)]
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.8 * losses[0], losses
