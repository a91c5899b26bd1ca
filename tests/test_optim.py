"""The optimizer's schedule clocks: a time-clocked AdamW at the update count's position is
optax.adamw, and the schedule position runs ahead of the steps as the time budget is spent."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from mmx_jax.train.optim import make_optimizer, schedule_position


def optimizer_config(**changes):
    return ml_collections.ConfigDict({
        **dict(lr=3e-3, schedule="cosine", warmup_steps=2, min_lr_ratio=0.1, grad_clip=1.0,
               b1=0.9, b2=0.99, weight_decay=0.05), **changes})


def test_time_clock_at_the_update_count_is_adamw():
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.standard_normal((4, 3)), jnp.float32),
              "b": jnp.asarray(rng.standard_normal(3), jnp.float32)}
    grads = [jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)
             for _ in range(6)]
    by_steps = make_optimizer(optimizer_config(), total_steps=6, steps_per_epoch=3)
    by_time = make_optimizer(optimizer_config(schedule_clock="time"), total_steps=6,
                             steps_per_epoch=3)
    p_steps, s_steps = params, by_steps.init(params)
    p_time, s_time = params, by_time.init(params)
    for count, g in enumerate(grads):
        u, s_steps = by_steps.update(g, s_steps, p_steps)
        p_steps = optax.apply_updates(p_steps, u)
        u, s_time = by_time.update(g, s_time, p_time, schedule_step=float(count))
        p_time = optax.apply_updates(p_time, u)
    for a, b in zip(jax.tree.leaves(p_steps), jax.tree.leaves(p_time), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert not np.allclose(p_time["w"], params["w"])


def test_time_clock_ahead_of_the_count_takes_the_later_learning_rate():
    params = {"w": jnp.ones((3,), jnp.float32)}
    grads = {"w": jnp.full((3,), 0.5, jnp.float32)}
    tx = make_optimizer(optimizer_config(schedule_clock="time", grad_clip=0.0, weight_decay=0.0),
                        total_steps=10, steps_per_epoch=5)
    state = tx.init(params)
    early, _ = tx.update(grads, state, params, schedule_step=2.0)  # the peak, after warm-up
    late, _ = tx.update(grads, state, params, schedule_step=10.0)  # the end: 0.1 x the peak
    np.testing.assert_allclose(np.asarray(late["w"]) / np.asarray(early["w"]), 0.1, rtol=1e-5)


def test_unknown_clock_is_named():
    with pytest.raises(ValueError, match="schedule_clock='wall'"):
        make_optimizer(optimizer_config(schedule_clock="wall"), total_steps=4, steps_per_epoch=2)


def test_schedule_position():
    assert schedule_position(10, 100, elapsed_s=5.0, budget_s=100.0) == 10.0  # steps lead
    assert schedule_position(10, 100, elapsed_s=50.0, budget_s=100.0) == 50.0  # time leads
    assert schedule_position(10, 100, elapsed_s=150.0, budget_s=100.0) == 100.0  # capped
    assert schedule_position(10, 100, elapsed_s=150.0, budget_s=0.0) == 10.0  # no budget


def test_lr_scale_rules_scale_the_matching_updates_first_match_wins():
    params = {"mixer": {"w": jnp.ones((2,)), "b": jnp.ones((2,))}, "head": {"w": jnp.ones((2,))}}
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.3), params)
    plain = make_optimizer(optimizer_config(warmup_steps=0), total_steps=10, steps_per_epoch=5)
    scaled = make_optimizer(optimizer_config(
        warmup_steps=0, lr_scale_rules=((r"mixer/w", 0.0), (r"^mixer/", 0.25))),
        total_steps=10, steps_per_epoch=5)
    want, _ = plain.update(grads, plain.init(params), params)
    got, _ = scaled.update(grads, scaled.init(params), params)
    assert not np.allclose(want["head"]["w"], 0.0)
    np.testing.assert_allclose(got["head"]["w"], want["head"]["w"], rtol=1e-6)
    np.testing.assert_allclose(got["mixer"]["b"], 0.25 * want["mixer"]["b"], rtol=1e-6)
    np.testing.assert_array_equal(got["mixer"]["w"], 0.0)


def test_lr_scale_rule_that_is_not_a_pair_is_named():
    with pytest.raises(ValueError, match="lr_scale_rules entry"):
        make_optimizer(optimizer_config(lr_scale_rules=(("mixer",),)), total_steps=4,
                       steps_per_epoch=2)


def test_lr_scale_rule_that_matches_nothing_is_named():
    params = {"head": {"w": jnp.ones((2,))}}
    tx = make_optimizer(optimizer_config(lr_scale_rules=((r"^mixer/", 0.1),)), total_steps=4,
                        steps_per_epoch=2)
    with pytest.raises(ValueError, match=r"\('\^mixer/', 0\.1\) matches no parameter; paths "
                                         r"look like 'head/w'"):
        tx.init(params)


# Parameters that must not decay by default, by the last part of their path: Mamba's A_log, D
# and dt bias; every bias; norm and layer scales; positional embeddings; averaging weights.
NO_DECAY_NAMES = {"A_log", "D", "dt_bias", "bias", "conv_bias", "scale", "pos_embed",
                  "averaging"}


@pytest.mark.parametrize("name, shapes", [
    ("tsm2", dict(num_variates=3, seq_len=32, pred_len=8, layer_scale=0.5)),
    ("viqs_tiny", dict(num_classes=4, widths=(8, 16, 32, 64), token_depths=(1, 1, 1, 1),
                       channel_depths=(1, 1, 1, 1))),
])
@pytest.mark.slow
def test_one_step_with_zero_gradients_moves_only_the_decayed_parameters(name, shapes):
    """With zero gradients Adam's update is zero: only weight decay moves a parameter."""
    from flax import nnx

    from mmx_jax.models import create_model
    from mmx_jax.train.sharding import path_str

    params = nnx.state(create_model(name, rngs=nnx.Rngs(0), **shapes), nnx.Param)
    zeros = jax.tree.map(jnp.zeros_like, params)
    tx = make_optimizer(optimizer_config(weight_decay=0.5, warmup_steps=0),
                        total_steps=10, steps_per_epoch=5)
    updates, _ = tx.update(zeros, tx.init(params), params)
    moved = {path_str(p): bool(np.any(np.asarray(u) != 0))
             for p, u in jax.tree_util.tree_leaves_with_path(updates)}
    for path, did in moved.items():
        leaf = path.removesuffix("/value").rsplit("/", 1)[-1]
        assert did == (leaf not in NO_DECAY_NAMES), path
    assert sum(moved.values()) >= 5 and sum(not m for m in moved.values()) >= 5


def test_decay_rules_first_match_wins_and_decay_everything_is_expressible():
    params = {"mixer": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))},
              "head": {"kernel": jnp.ones((2, 2))}}
    zeros = jax.tree.map(jnp.zeros_like, params)

    def moved(rules):
        tx = make_optimizer(optimizer_config(decay_rules=rules, warmup_steps=0),
                            total_steps=4, steps_per_epoch=2)
        updates, _ = tx.update(zeros, tx.init(params), params)
        return jax.tree.map(lambda u: bool(np.any(np.asarray(u) != 0)), updates)

    assert moved(((".*", True),)) == {"mixer": {"kernel": True, "bias": True},
                                     "head": {"kernel": True}}
    assert moved(((r"^mixer/kernel", True), (r"^mixer/", False))) == {
        "mixer": {"kernel": True, "bias": False}, "head": {"kernel": True}}
    with pytest.raises(ValueError, match=r"decay_rules entry \('\^trunk/', False\) matches no "
                                         "parameter"):
        moved(((r"^trunk/", False),))


def test_tslib_schedule_is_time_series_librarys_type1():
    """Time-Series-Library trains epoch e at the lr its `adjust_learning_rate(optimizer,
    e, args)` set after epoch e - 1 (called with the 1-based epoch number just finished):
    lr * 0.5 ** ((epoch - 1) // 1); the first epoch at the initial lr."""
    lr, steps_per_epoch, epochs = 1e-3, 3, 6
    want = []
    current = lr  # before any adjustment
    for epoch in range(epochs):
        want += [current] * steps_per_epoch
        finished = epoch + 1
        current = lr * (0.5 ** ((finished - 1) // 1))
    from mmx_jax.train.optim import learning_rate_schedule

    schedule = learning_rate_schedule(lr=lr, schedule="tslib", total_steps=18,
                                      steps_per_epoch=steps_per_epoch)
    got = [float(schedule(step)) for step in range(epochs * steps_per_epoch)]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert got[3] == got[0] and got[6] == got[0] / 2  # epoch 1 at lr, epoch 2 halved
