"""Training loop: sharding, resume after SIGKILL, NaN handling, checkpoints across device
counts, configs and their errors. Runs on the 8 simulated CPU devices set up in conftest."""

from __future__ import annotations

import json
import math
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import pytest

from configs import tsm2
from mmx_jax.train.checkpoint import CheckpointNotFoundError
from mmx_jax.train.evaluate import evaluate_and_report
from mmx_jax.train.loop import NonFiniteLossError, setup, train_and_evaluate
from mmx_jax.train.tasks.forecasting import ForecastingTask
from mmx_jax.train.writers import read_metrics

REPO = pathlib.Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(jax.device_count() < 8,
                                reason="needs the 8 simulated CPU devices of conftest.py")


def tsm2_config(arg: str = "smoke"):
    return tsm2.get_config(arg)


def small_config(**train):
    config = tsm2_config("smoke")
    config.train.log_every_steps = 1
    config.train.update(train)
    return config


def losses(workdir):
    return np.array([row["train_loss"] for row in read_metrics(workdir) if "train_loss" in row])


@pytest.mark.slow
def test_sharded_run_matches_one_device_and_fsdp_shards_parameters(tmp_path):
    """Same seed and data: the (data=4, fsdp=2) loss curve equals the one-device curve."""
    one = small_config()
    one.mesh.update(data=1, fsdp=1)
    result_one = train_and_evaluate(one, tmp_path / "one", devices=jax.devices()[:1])

    eight = small_config()
    eight.mesh.update(data=4, fsdp=2)
    eight.sharding.fsdp_min_size = 32
    result_eight = train_and_evaluate(eight, tmp_path / "eight", devices=jax.devices()[:8])

    curve_one, curve_eight = losses(tmp_path / "one"), losses(tmp_path / "eight")
    assert len(curve_one) == len(curve_eight) == 12
    np.testing.assert_allclose(curve_eight, curve_one, rtol=1e-5)
    assert math.isclose(result_eight["test_mse"], result_one["test_mse"], rel_tol=1e-5)

    run = setup(eight, tmp_path / "eight", devices=jax.devices()[:8], read_only=True)
    state = run.init_state()
    (kernel,) = jax.tree.leaves(state["model"]["head"]["kernel"])
    assert "fsdp" in tuple(kernel.sharding.spec)
    halves = {tuple((i.start, i.stop) for i in s.index) for s in kernel.addressable_shards}
    assert len(halves) == 2  # each device holds one of two distinct halves
    mu = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(state["opt"])
          if "head" in jax.tree_util.keystr(path) and "kernel" in jax.tree_util.keystr(path)]
    assert mu and all("fsdp" in tuple(m.sharding.spec) for m in mu)


def _train_command(workdir, *extra):
    config = REPO / "configs" / "tsm2.py"
    return [sys.executable, str(REPO / "train.py"), f"--config={config}:smoke",
            f"--workdir={workdir}", "--config.train.num_epochs=5",
            "--config.train.checkpoint_every_steps=2", "--config.train.log_every_steps=1",
            "--config.model.d_model=16", "--config.data.seq_len=96", *extra]


def _env():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
               PYTHONPATH=str(REPO))
    return env


@pytest.mark.slow
def test_resume_after_sigkill_gives_the_same_final_metrics(tmp_path):
    reference = subprocess.run(_train_command(tmp_path / "ref"), env=_env(), cwd=tmp_path,
                               capture_output=True, text=True, timeout=600)
    assert reference.returncode == 0, reference.stderr[-3000:]
    want = json.loads((tmp_path / "ref" / "results.json").read_text())

    workdir = tmp_path / "killed"
    proc = subprocess.Popen(_train_command(workdir), env=_env(), cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        steps = [p for p in (workdir / "checkpoints").glob("*") if p.name.isdigit()]
        if any(int(p.name) >= 6 for p in steps):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (workdir / "results.json").exists(), "the run finished before it was killed"

    resumed = subprocess.run(_train_command(workdir), env=_env(), cwd=tmp_path,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    got = json.loads((workdir / "results.json").read_text())
    for key in ("test_mse", "test_mae", "best_val_mse", "best_step", "steps"):
        assert got[key] == pytest.approx(want[key], rel=1e-6), key
    np.testing.assert_allclose(losses(workdir), losses(tmp_path / "ref"), rtol=1e-6)


class _NanInBatch:
    """A forecasting task whose `nan_at`-th training batch (1-based) is all NaN."""

    def __init__(self, task, nan_at):
        self._task, self._nan_at = task, nan_at

    def __getattr__(self, name):
        return getattr(self._task, name)

    def train_batches(self, start_step, steps_per_epoch):
        for step, batch in enumerate(self._task.train_batches(start_step, steps_per_epoch),
                                     start_step + 1):
            if step == self._nan_at:
                batch = {**batch, "x": np.full_like(batch["x"], np.nan)}
            yield batch


def test_nan_in_the_data_stops_training_and_keeps_the_last_good_checkpoint(tmp_path):
    config = small_config(checkpoint_every_steps=2, log_every_steps=1)
    config.mesh.update(data=1, fsdp=1)
    task = _NanInBatch(ForecastingTask.from_config(config), nan_at=5)
    with pytest.raises(NonFiniteLossError, match=r"non-finite training loss \(nan\) at step 5 "
                       r"\(epoch 0, batch 4\); training stopped\. The last good checkpoint "
                       r"is step 4"):
        train_and_evaluate(config, tmp_path, task=task, devices=jax.devices()[:1])
    run = setup(config, tmp_path, devices=jax.devices()[:1], read_only=True)
    assert run.checkpoints.latest_step() == 4
    state, meta, _ = run.restore("latest")
    floats = [x for x in jax.tree.leaves(state["model"])
              if jax.numpy.issubdtype(x.dtype, jax.numpy.floating)]
    assert floats and all(np.all(np.isfinite(x)) for x in floats)


@pytest.mark.slow
@pytest.mark.parametrize("train_devices, eval_devices", [(8, 1), (1, 8)])
def test_checkpoints_restore_on_a_different_device_count(tmp_path, train_devices, eval_devices):
    config = small_config()
    config.mesh.update(data=train_devices // 2 or 1, fsdp=2 if train_devices > 1 else 1)
    config.sharding.fsdp_min_size = 32
    result = train_and_evaluate(config, tmp_path, devices=jax.devices()[:train_devices])
    saved = json.loads((tmp_path / "config.json").read_text())  # what eval.py reads
    saved["mesh"] = {"data": eval_devices, "fsdp": 1}
    report = evaluate_and_report(tmp_path, config=ml_collections.ConfigDict(saved),
                                 devices=jax.devices()[:eval_devices])
    assert report["devices"] == eval_devices and report["step"] == result["best_step"]
    assert report["test_mse"] == pytest.approx(result["test_mse"], rel=1e-5)
    assert (tmp_path / "eval" / "best" / "metrics.json").exists()
    assert (tmp_path / "eval" / "best" / "forecast.png").stat().st_size > 10_000


def test_eval_errors_name_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json not found: is .* the workdir"):
        evaluate_and_report(tmp_path)
    config = small_config()
    config.mesh.update(data=1, fsdp=1)
    with pytest.raises(CheckpointNotFoundError, match="no validated checkpoint in .*train first"):
        evaluate_and_report(tmp_path, config=config, devices=jax.devices()[:1])
    train_and_evaluate(config, tmp_path, devices=jax.devices()[:1])
    with pytest.raises(CheckpointNotFoundError, match=r"no checkpoint at step 3 in .* "
                       r"available steps: \[\d+"):
        evaluate_and_report(tmp_path, checkpoint=3, config=config, devices=jax.devices()[:1])


def test_config_arguments_and_their_errors():
    config = tsm2_config("dataset=etth2,horizon=336,seed=3")
    assert (config.data.name, config.data.pred_len, config.seed) == ("etth2", 336, 3)
    assert tsm2_config("paper").data.seq_len == 512
    with pytest.raises(ValueError, match="configs/tsm2.py: unknown config argument 'horizn'; "
                       "known arguments: dataset, horizon"):
        tsm2_config("horizn=96")
    with pytest.raises(ValueError, match="config argument horizon='long' is not a whole number"):
        tsm2_config("horizon=long")


def test_unknown_override_key_fails_clearly(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "train.py"), f"--config={REPO / 'configs' / 'tsm2.py'}:smoke",
         f"--workdir={tmp_path}", "--config.optimizer.lrr=0.1"],
        env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert ("--config.optimizer.lrr=0.1: the config has no key 'optimizer.lrr' (Did you mean "
            '"lr" instead of "lrr"?)') in result.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_mesh_and_batch_errors():
    from mmx_jax.train.sharding import build_mesh

    with pytest.raises(ValueError, match="mesh.data=3 x mesh.fsdp=1 do not divide the 8 "
                       "available"):
        build_mesh(3, 1)
    config = small_config()
    config.data.batch_size = 12
    config.mesh.update(data=8, fsdp=1)
    with pytest.raises(ValueError, match="data.batch_size=12 is not divisible by the 8 devices"):
        setup(config, "unused", devices=jax.devices()[:8], read_only=True)


def test_ema_of_the_weights_follows_its_formula(tmp_path):
    from flax import nnx

    from mmx_jax.train.loop import TrainStep, place_batch

    config = small_config()
    config.mesh.update(data=1, fsdp=1)
    config.optimizer.ema_decay = 0.75
    run = setup(config, tmp_path, devices=jax.devices()[:1])
    state = run.init_state()
    step = TrainStep(run)
    batches = run.task.train_batches(0, run.steps_per_epoch)
    want = jax.tree.map(np.asarray, state["ema"])
    for t in range(1, 4):  # the decay after update t, warmed up: min(0.75, (1+t)/(10+t))
        decay = min(0.75, (1 + t) / (10 + t))
        state, _ = step(state, place_batch(run, next(batches), run.task.train_batch_size))
        params = nnx.state(nnx.merge(run.graphdefs["model"], state["model"]), nnx.Param)
        want = jax.tree.map(lambda e, p, d=decay: d * e + (1 - d) * np.asarray(p), want, params)
    for got, expected in zip(jax.tree.leaves(state["ema"]), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
    ema_model, raw_model = run.model(state), run.model(state, use_ema=False)
    assert not np.allclose(ema_model.head.kernel[...], raw_model.head.kernel[...])
    np.testing.assert_allclose(ema_model.head.kernel[...], state["ema"]["head"]["kernel"][...])


def test_a_short_run_validates_an_ema_close_to_its_weights_not_to_the_initial_ones(tmp_path):
    """ImageNet's EMA decay, 0.9999, over a 12-step run: without a warm-up the EMA (which
    validation, the best checkpoint and the test use) stays at the initialisation."""
    from flax import nnx

    config = small_config()
    config.mesh.update(data=1, fsdp=1)
    config.optimizer.ema_decay = 0.9999
    train_and_evaluate(config, tmp_path, devices=jax.devices()[:1])
    run = setup(config, tmp_path, devices=jax.devices()[:1], read_only=True)
    state, _, _ = run.restore("latest")
    init = run.init_state()
    run.checkpoints.close()

    def distance(a, b):
        return np.sqrt(sum(float(np.sum((np.asarray(x) - np.asarray(y)) ** 2))
                           for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)))

    weights = nnx.state(nnx.merge(run.graphdefs["model"], state["model"]), nnx.Param)
    initial = init["ema"]
    assert distance(state["ema"], weights) < 0.5 * distance(initial, weights)


class _NanInValidation:
    """A forecasting task whose validation windows are all NaN from the `nan_from`-th
    validation on (1-based)."""

    def __init__(self, task, nan_from):
        self._task, self._nan_from, self._validations = task, nan_from, 0

    def __getattr__(self, name):
        return getattr(self._task, name)

    def eval_batches(self, split):
        if split == "val":
            self._validations += 1
        for batch in self._task.eval_batches(split):
            if split == "val" and self._validations >= self._nan_from:
                batch = {**batch, "x": np.full_like(batch["x"], np.nan)}
            yield batch


def test_a_non_finite_validation_metric_stops_the_run_at_the_last_good_checkpoint(tmp_path):
    """It used to lose to every best value silently: no best checkpoint, and a crash at the
    run's end."""
    from mmx_jax.train.loop import NonFiniteMetricError

    config = small_config(checkpoint_every_steps=4, log_every_steps=1)
    config.mesh.update(data=1, fsdp=1)
    # Validation at steps 6 and 12: the one at 12 (the second; the first call compiles) is NaN.
    task = _NanInValidation(ForecastingTask.from_config(config), nan_from=3)
    with pytest.raises(NonFiniteMetricError, match=r"non-finite validation mse \(nan\) at step "
                       r"12; training stopped\. The last good checkpoint is step 8 .* \(the best "
                       r"so far: step 6\)"):
        train_and_evaluate(config, tmp_path, task=task, devices=jax.devices()[:1])
    run = setup(config, tmp_path, devices=jax.devices()[:1], read_only=True)
    assert run.checkpoints.steps() == [6, 8] and run.checkpoints.best_step() == 6
    run.checkpoints.close()


def test_a_precompiled_step_matches_the_jitted_one_and_reports_compile_errors(tmp_path):
    """Step.precompile: compiled in a background thread for abstract arguments, the same
    numbers as the plain jitted call; arguments that do not match the specs, and failures of
    the background compilation, raise at the call."""
    from mmx_jax.train.loop import Step, TrainStep, batch_spec, place_batch

    config = small_config()
    config.mesh.update(data=1, fsdp=1)
    run = setup(config, tmp_path, devices=jax.devices()[:1])
    local = next(run.task.train_batches(0, run.steps_per_epoch))
    batch = place_batch(run, local, run.task.train_batch_size)
    plain, early = TrainStep(run), TrainStep(run)
    early.precompile(jax.eval_shape(run.init_state),
                     batch_spec(run, local, run.task.train_batch_size))
    want_state, want = plain(run.init_state(), batch)
    got_state, got = early(run.init_state(), batch)
    np.testing.assert_array_equal(got["loss"], want["loss"])

    def raw(x):  # PRNG keys (the dropout streams) compare through their data
        return np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(
            x.dtype, jax.dtypes.prng_key) else x)

    for a, b in zip(jax.tree.leaves(got_state), jax.tree.leaves(want_state), strict=True):
        np.testing.assert_array_equal(raw(a), raw(b))
    short = {k: v[:-1] for k, v in local.items()}
    with pytest.raises((TypeError, ValueError)):
        early(run.init_state(), place_batch(run, short, run.task.train_batch_size - 1))

    def broken(x):
        raise RuntimeError("cannot trace this")

    failing = Step(jax.jit(broken))
    failing.precompile(jax.ShapeDtypeStruct((2,), np.float32))
    with pytest.raises(RuntimeError, match="cannot trace this"):
        failing(np.zeros(2, np.float32))


def test_time_clocked_schedule_ends_at_the_time_limit(tmp_path, monkeypatch):
    """optimizer.schedule_clock="time": the schedule's position runs ahead of the steps so that
    it reaches the schedule's end as train.time_limit_s runs out (the loop's clock is faked:
    one second per reading, a few readings per step)."""
    import types

    from mmx_jax.train import loop

    ticks = iter(range(10**6))
    monkeypatch.setattr(loop, "time", types.SimpleNamespace(time=lambda: float(next(ticks))))
    config = small_config(num_epochs=50, steps_per_epoch=4, eval_every_steps=10**6,
                          checkpoint_every_steps=10**6, time_limit_s=60.0)
    config.optimizer.schedule_clock = "time"
    results = train_and_evaluate(config, tmp_path)
    rows = [r for r in read_metrics(tmp_path) if "schedule_step" in r]
    total = 50 * 4
    assert 5 < results["steps"] < total / 4  # stopped by the time limit
    assert all(r["step"] - 1 <= r["schedule_step"] <= total for r in rows)
    assert rows[-1]["schedule_step"] > 0.8 * total  # near the schedule's end at the limit
    assert rows[0]["schedule_step"] == 0  # the first step (compilation) is not counted
