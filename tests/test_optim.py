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
