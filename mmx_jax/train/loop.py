"""The training loop and checkpoint evaluation.

train_and_evaluate reads top to bottom: claim the workdir (one owner, one config), build the
mesh, jit the steps with explicit shardings and donated state and start compiling them in the
background, build the model and optimizer state already sharded on the mesh (or restore the
latest checkpoint if the workdir has one), loop with validation, early stopping, checkpoints
and metric writers (`Trainer`), then test the best checkpoint.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import itertools
import json
import logging
import math
import pathlib
import signal
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from mmx_jax.errors import ConfigError
from mmx_jax.train import distributed
from mmx_jax.train.checkpoint import Checkpoints, abstract_with_shardings
from mmx_jax.train.config_check import check_config
from mmx_jax.train.faults import kill_point
from mmx_jax.train.optim import make_optimizer, schedule_position, time_clocked
from mmx_jax.train.sharding import (
    batch_sharding,
    build_mesh,
    global_batch,
    state_shardings,
)
from mmx_jax.train.tasks import make_task
from mmx_jax.train.tasks.base import create_task_model
from mmx_jax.train.workdir import DATA_CARD, atomic_write_text, claim_workdir
from mmx_jax.train.writers import MetricWriter, progress_bar

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss; the run stopped without saving it."""


class NonFiniteMetricError(RuntimeError):
    """Validation produced a NaN or infinite metric; the run stopped without saving it."""


def ema_decay_at(decay: float, updates):
    """The EMA's decay after `updates` optimizer updates: warmed up as TensorFlow's
    ExponentialMovingAverage does with `num_updates`, min(decay, (1 + t) / (10 + t)), so
    that a short run's EMA follows its recent weights rather than the initial ones."""
    return jnp.minimum(decay, (1.0 + updates) / (10.0 + updates))


@dataclasses.dataclass
class Run:
    """Everything built from a config for one workdir, on the current devices."""

    config: ml_collections.ConfigDict
    workdir: pathlib.Path
    task: Any
    mesh: jax.sharding.Mesh
    steps_per_epoch: int
    total_steps: int
    graphdefs: dict[str, nnx.GraphDef]
    abstract_state: dict[str, Any]
    shardings: dict[str, Any]
    checkpoints: Checkpoints | None

    def init_state(self):
        """A fresh state, created directly with its shardings."""
        with _threefry_as_kernel():
            return jax.jit(lambda: _split(*self._build())[1], out_shardings=self.shardings)()

    def _build(self):
        return build_state(self.config, create_task_model(self.config, self.task.model_shapes()),
                           total_steps=self.total_steps, steps_per_epoch=self.steps_per_epoch)

    def restore(self, which: str | int):
        """(state, meta, step) of a checkpoint, placed on this run's mesh."""
        target = abstract_with_shardings(self.abstract_state, self.shardings)
        return self.checkpoints.restore(which, target)

    def facts(self) -> dict[str, Any]:
        """What every process of a run must agree on beyond the config: the data it read
        and the devices it found."""
        return {"data": self.task.fingerprint(), "devices": jax.device_count(),
                "devices per process": jax.local_device_count(),
                "steps per epoch": self.steps_per_epoch}

    def model(self, state, *, use_ema: bool = True) -> nnx.Module:
        """The model of a state (with EMA weights when the state has them); `state` itself is
        left untouched."""
        return model_of_state(self.graphdefs["model"], state, use_ema=use_ema)


def model_of_state(graphdef: nnx.GraphDef, state, *, use_ema: bool = True) -> nnx.Module:
    """The model of a training state (its EMA weights where it has them and `use_ema`);
    `state` itself is left untouched."""
    ema = state.get("ema") if use_ema else None
    model = nnx.merge(graphdef, state["model"], copy=ema is not None)
    if ema is not None:
        nnx.update(model, ema)
    return model


def build_state(config, create_model, *, total_steps: int = 1, steps_per_epoch: int = 1):
    """(model, optimizer, EMA or None) of a run of `config`: `create_model(rngs)` builds the
    model, seeded by `config.seed`. The step counts only shape the learning-rate schedule,
    so any will do to restore a checkpoint."""
    seed = config.seed
    model = create_model(nnx.Rngs(params=seed, dropout=seed + 1))
    tx = make_optimizer(config.optimizer, total_steps=total_steps,
                        steps_per_epoch=steps_per_epoch)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    ema = nnx.state(model, nnx.Param) if config.optimizer.ema_decay > 0 else None
    return model, optimizer, ema


def _threefry_as_kernel():
    """A context in which this thread lowers threefry random numbers to one GPU kernel call
    each (JAX's `jax_threefry_gpu_kernel_lowering`; the same numbers). The initialisation
    draws once per parameter tensor, and XLA's compilation of those inlined threefry rounds
    took 30-50 s on the GPU machine. No effect on other backends; a no-op where this JAX has
    no such option."""
    try:
        from jax._src.config import threefry_gpu_kernel_lowering  # noqa: PLC0415
    except ImportError:
        return contextlib.nullcontext()
    return threefry_gpu_kernel_lowering(True)


def _split(model, optimizer, ema):
    graph_m, state_m = nnx.split(model)
    graph_o, state_o = nnx.split(optimizer)
    state = {"model": state_m, "opt": state_o}
    if ema is not None:
        state["ema"] = ema
    return {"model": graph_m, "opt": graph_o}, state


def setup(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *, task=None,
          devices=None, read_only: bool = False) -> Run:
    """Builds the task, mesh, abstract state and its shardings, and the checkpoint managers."""
    workdir = pathlib.Path(workdir)
    task = task or make_task(config)
    mesh = build_mesh(config.mesh.data, config.mesh.fsdp, devices=devices)
    for key, size in (("data.batch_size", task.train_batch_size),
                      ("data.eval_batch_size", task.eval_batch_size)):
        if size % mesh.size:
            raise ConfigError(f"config key {key}={size} is not divisible by the {mesh.size} "
                              f"devices of the mesh {dict(mesh.shape)}: wanted a multiple of "
                              f"{mesh.size}")
    if task.steps_per_epoch() < 1:
        raise ConfigError(f"config key data.batch_size={task.train_batch_size} is larger than "
                          f"the training split: {task.describe_split('train')}")
    task.check_splits()
    steps_per_epoch = min(config.train.steps_per_epoch or task.steps_per_epoch(),
                          task.steps_per_epoch())
    run = Run(config=config, workdir=workdir, task=task, mesh=mesh,
              steps_per_epoch=steps_per_epoch,
              total_steps=steps_per_epoch * config.train.num_epochs, graphdefs={},
              abstract_state={}, shardings={}, checkpoints=None)
    graphdefs, abstract_state = _split(*nnx.eval_shape(run._build))
    run.graphdefs, run.abstract_state = graphdefs, abstract_state
    run.shardings = state_shardings(abstract_state, mesh, config.sharding.rules,
                                    config.sharding.fsdp_min_size)
    # Last: the managers hold threads, which the callers close (`run.checkpoints.close()`).
    run.checkpoints = Checkpoints(workdir, keep=config.train.keep_checkpoints,
                                  read_only=read_only)
    return run


class Step:
    """A jitted function that can be compiled ahead of time in a background thread.

    `precompile(*specs)` starts tracing, lowering and compiling for abstract arguments
    (`jax.ShapeDtypeStruct`s with shardings) and returns at once; later calls wait for that
    executable and run it. XLA releases the GIL while it compiles, so the host can compile the
    training and evaluation steps together while it builds the initial state. Without
    `precompile` a call is the plain jitted call. `trace(*args)` gives ahead-of-time access.
    """

    def __init__(self, jitted):
        self._jitted = jitted
        self._compiled: concurrent.futures.Future | None = None

    def trace(self, *args):
        return self._jitted.trace(*args)

    def precompile(self, *specs) -> None:
        future = concurrent.futures.Future()

        def work():
            try:
                future.set_result(self._jitted.trace(*specs).lower().compile())
            except BaseException as err:  # noqa: BLE001 - re-raised by the first call
                future.set_exception(err)

        # A daemon thread: an interrupted run exits without waiting for the compiler.
        threading.Thread(target=work, name="precompile", daemon=True).start()
        self._compiled = future

    def __call__(self, *args):
        return (self._compiled.result() if self._compiled else self._jitted)(*args)

    def wait(self) -> None:
        """Blocks until a background compilation has ended (its errors are the call's)."""
        if self._compiled is not None:
            concurrent.futures.wait([self._compiled])


class TrainStep(Step):
    """The jitted training step, ``step(state, batch, schedule_step=None) -> (state,
    metrics)``: the loss's gradient, the optimizer's update and the EMA, with the state
    donated. `schedule_step`, the learning-rate schedule's position
    (`optim.schedule_position`), is required with optimizer.schedule_clock="time" and unused
    otherwise."""

    def __init__(self, run: Run):
        task, graphdefs = run.task, run.graphdefs
        ema_decay = run.config.optimizer.ema_decay
        self.clocked = clocked = time_clocked(run.config.optimizer)

        def train_step(state, batch, schedule_step):
            model = nnx.merge(graphdefs["model"], state["model"])
            optimizer = nnx.merge(graphdefs["opt"], state["opt"])
            loss, grads = nnx.value_and_grad(lambda m: task.loss(m, batch))(model)
            optimizer.update(model, grads,
                             **({"schedule_step": schedule_step} if clocked else {}))
            new_state = {"model": nnx.state(model), "opt": nnx.state(optimizer)}
            if "ema" in state:
                decay = ema_decay_at(ema_decay, optimizer.step[...].astype(jnp.float32))
                new_state["ema"] = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p,
                                                state["ema"], nnx.state(model, nnx.Param))
            return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

        replicated = jax.sharding.NamedSharding(run.mesh, jax.sharding.PartitionSpec())
        super().__init__(jax.jit(
            train_step, in_shardings=(run.shardings, batch_sharding(run.mesh), replicated),
            out_shardings=(run.shardings, replicated), donate_argnums=0))

    def __call__(self, state, batch, schedule_step=None):
        if self.clocked and schedule_step is None:
            raise ValueError('optimizer.schedule_clock="time": the step needs schedule_step')
        return super().__call__(state, batch, np.float32(schedule_step or 0.0))

    def trace(self, state, batch):
        return super().trace(state, batch, np.float32(0.0))

    def precompile(self, state, batch) -> None:
        super().precompile(state, batch, jax.ShapeDtypeStruct((), np.float32))


class EvalStep(Step):
    """The jitted evaluation step, ``step(state, batch) -> sums``: the task's masked metric
    sums of a batch, replicated (EMA weights where the state has them)."""

    def __init__(self, run: Run):
        def eval_step(state, batch):
            model = run.model(state)
            model.eval()
            return run.task.eval_sums(model, batch)

        replicated = jax.sharding.NamedSharding(run.mesh, jax.sharding.PartitionSpec())
        super().__init__(jax.jit(eval_step,
                                 in_shardings=(run.shardings, batch_sharding(run.mesh)),
                                 out_shardings=replicated))



def make_predict_step(run: Run):
    """``predict(state, batch) -> np.ndarray``: `task.predict` of the state's model (EMA
    weights where the state has them) on a small batch that every process holds in full (no
    batch-size constraint); every process gets the whole output. For plots and predictions;
    all processes must call it together."""
    replicated = jax.sharding.NamedSharding(run.mesh, jax.sharding.PartitionSpec())

    def predict(state, batch):
        model = run.model(state)
        model.eval()
        return run.task.predict(model, batch)

    jitted = jax.jit(predict, in_shardings=(run.shardings, replicated),
                     out_shardings=replicated)

    def call(state, batch: dict[str, np.ndarray]) -> np.ndarray:
        placed = {k: jax.make_array_from_process_local_data(replicated, np.asarray(v))
                  for k, v in batch.items()}
        return np.asarray(jax.device_get(jitted(state, placed)))

    return call


def place_batch(run: Run, local: dict[str, np.ndarray], global_size: int):
    """This process's rows of a batch as global arrays sharded over the mesh's data axis."""
    return global_batch(local, batch_sharding(run.mesh), global_size)


def batch_spec(run: Run, local: dict[str, np.ndarray], global_size: int):
    """The abstract global batch (shapes, dtypes, shardings) of which `local` is this process's
    rows: what `place_batch` would make, without placing it."""
    sharding = batch_sharding(run.mesh)
    return {k: jax.ShapeDtypeStruct((global_size, *v.shape[1:]), v.dtype, sharding=sharding)
            for k, v in local.items()}


def evaluate_split(run: Run, state, split: str, eval_step=None) -> dict[str, float]:
    """Masked metrics of `state` over every example of `split` (the last batch padded)."""
    eval_step = eval_step or EvalStep(run)
    totals: dict[str, float] = {}
    for batch in run.task.eval_batches(split):
        sums = jax.device_get(eval_step(state, place_batch(run, batch, run.task.eval_batch_size)))
        for key, value in sums.items():
            totals[key] = totals.get(key, 0.0) + float(value)
    return run.task.metrics(totals)


class _StopSignal:
    """Turns SIGTERM (and, with several processes, SIGINT) into a flag the loop checks, so
    that it can save before exiting. With one process Ctrl-C stays a KeyboardInterrupt."""

    def __init__(self):
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self):
        signals = [signal.SIGTERM] + ([signal.SIGINT] if jax.process_count() > 1 else [])
        for sig in signals:
            # Outside the main thread there is no handler and the flag stays False.
            with contextlib.suppress(ValueError):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


class Trainer:
    """One training run of a workdir: resume or initialise, the step loop with validation,
    checkpoints and logs, then the test of the best checkpoint.

    Decisions that a process could take alone (a stop signal, the time limit) are taken by
    all processes together at the same step (`_sync_point`): at log, validation and
    checkpoint steps with several processes, at every step with one.
    """

    def __init__(self, run: Run, began: float):
        self.run, self.began = run, began
        self.config, self.tcfg = run.config, run.config.train
        worst = math.inf if run.task.validation_mode == "min" else -math.inf
        self.meta = {"best_val": worst, "best_step": -1, "bad_evals": 0,
                     "last_eval_step": 0, "finished": False}
        self.pending: list[tuple[int, dict[str, jax.Array]]] = []  # metrics not yet checked
        self.train_step, self.eval_step = TrainStep(run), EvalStep(run)
        self.clocked = time_clocked(self.config.optimizer)

    # -- start ----------------------------------------------------------------------------
    def start(self) -> None:
        """Compiles both steps in the background while the state is built or restored."""
        run = self.run
        latest = run.checkpoints.latest_step()
        state_spec = jax.eval_shape(run.init_state)
        # The batches for the compilation come from the resume point when there is one (a
        # corrupt latest checkpoint makes it earlier: the stream is rebuilt below).
        self.batches = run.task.train_batches(latest or 0, run.steps_per_epoch)
        first = next(self.batches)
        self.batches = itertools.chain([first], self.batches)
        self.train_step.precompile(state_spec, batch_spec(run, first, run.task.train_batch_size))
        val_batches = run.task.eval_batches("val")
        self.eval_step.precompile(state_spec, batch_spec(run, next(val_batches),
                                                         run.task.eval_batch_size))
        val_batches.close()
        if latest is not None:
            self.state, saved_meta, self.step = run.restore("latest")
            self.meta.update(saved_meta)
            if self.step != latest:
                self.batches = run.task.train_batches(self.step, run.steps_per_epoch)
            log.info("resumed from %s at step %d", run.checkpoints.path(self.step), self.step)
        else:
            self.state, self.step = run.init_state(), 0
        self.last_saved = self.step if latest is not None else None
        self.writer = MetricWriter(run.workdir, resume_lines=self.meta.get("log_lines")
                                   if latest is not None else 0, resume_step=self.step)
        log.info("state ready after %.1f s", time.time() - self.began)
        kill_point("resumed")

    def wait_for_compilers(self) -> None:
        """Lets background compilations end before the process does (a thread killed inside
        XLA at exit aborts the interpreter)."""
        self.train_step.wait()
        self.eval_step.wait()

    # -- the loop -------------------------------------------------------------------------
    def fit(self) -> None:
        run = self.run
        self.bar = progress_bar(run.total_steps, self.step, f"train {self.config.task}")
        self.started, self.started_step = time.time(), self.step
        self.first_done = None
        with _StopSignal() as stop:
            try:
                while self.step < run.total_steps and not self.meta["finished"]:
                    self._train_one_step()
                    if self._end_of_step(stop.requested):
                        raise KeyboardInterrupt("SIGTERM")
                self.meta["finished"] = True
                if self.last_saved != self.step:
                    self._save()
            except KeyboardInterrupt:
                if self.last_saved != self.step:
                    log.warning("interrupted at step %d: saving a checkpoint before exiting",
                                self.step)
                    self._save()
                raise
            finally:
                self.bar.close()
                run.checkpoints.wait()
        log.info("training ended at step %d after %.1f s", self.step, time.time() - self.began)

    def _train_one_step(self) -> None:
        """Dispatches one training step; logs every `train.log_every_steps`."""
        run, tcfg = self.run, self.tcfg
        batch = place_batch(run, next(self.batches), run.task.train_batch_size)
        position = self.step
        if self.clocked and self.first_done is not None and tcfg.get("time_limit_s"):
            position = schedule_position(
                self.step, run.total_steps, time.time() - self.first_done,
                self.started + tcfg.time_limit_s - self.first_done)
        self.state, metrics = self.train_step(self.state, batch, position)
        if self.first_done is None:
            self.first_done = time.time()
            log.info("first step dispatched after %.1f s (compilation included)",
                     self.first_done - self.began)
        self.step += 1
        kill_point("step")
        step = self.step
        self.pending.append((step, metrics))
        self.bar.update(1)
        if step % tcfg.log_every_steps == 0:
            means = self._check_finite()
            rate = (step - self.started_step) / max(time.time() - self.started, 1e-9)
            self.writer.write(step, {"train_loss": means["loss"],
                                     "grad_norm": means["grad_norm"], "steps_per_sec": rate,
                                     **({"schedule_step": position} if self.clocked else {})})
            self.bar.set_postfix(loss=f"{means['loss']:.4f}")

    def _end_of_step(self, stop_requested: bool) -> bool:
        """Validation, early stopping, the time limit and checkpoints after a step. Returns
        whether to stop for a signal (after saving)."""
        run, tcfg, step = self.run, self.tcfg, self.step
        validate = step % (tcfg.eval_every_steps or run.steps_per_epoch) == 0 \
            or step == run.total_steps
        save = validate or step % tcfg.checkpoint_every_steps == 0
        stopping, timed_out = self._sync_point(
            stop_requested, at_sync=save or step % tcfg.log_every_steps == 0)
        if timed_out:
            log.warning("train.time_limit_s=%s reached at step %d: stopping early",
                        tcfg.time_limit_s, step)
        if validate or (timed_out and self.meta["last_eval_step"] != step):
            self._check_finite()
            self._validate(patience=0 if timed_out else tcfg.patience)
        if timed_out:
            self.meta["finished"] = True
        if save or timed_out:
            self._save()
        return stopping

    def _sync_point(self, stop_requested: bool, at_sync: bool) -> tuple[bool, bool]:
        """(stop, time limit reached), the same on every process: with several processes
        they are only decided at log and checkpoint steps (`at_sync`), all together."""
        limit = self.tcfg.get("time_limit_s")
        timed_out = bool(limit) and time.time() - self.started > limit
        if jax.process_count() == 1:
            return stop_requested, timed_out
        if not at_sync:
            return False, False
        flags = distributed.gather_json([stop_requested, timed_out])
        return any(f[0] for f in flags), any(f[1] for f in flags)

    def _check_finite(self) -> dict[str, float]:
        """Fetches pending step metrics; raises if any loss is NaN/inf. Returns the means."""
        if not self.pending:
            return {}
        values = jax.device_get([m for _, m in self.pending])
        spe = self.run.steps_per_epoch
        for (s, _), m in zip(self.pending, values, strict=True):
            if not np.isfinite(m["loss"]):
                raise NonFiniteLossError(
                    f"non-finite training loss ({m['loss']}) at step {s} (epoch "
                    f"{(s - 1) // spe}, batch {(s - 1) % spe}); training stopped. The last "
                    f"good checkpoint is step {self.last_saved} in "
                    f"{self.run.checkpoints.folder}: look for NaN/inf in the data "
                    "or lower optimizer.lr.")
        self.pending.clear()
        return {k: float(np.mean([m[k] for m in values])) for k in values[0]}

    def _save(self) -> None:
        self._check_finite()
        kill_point("save")
        self.run.checkpoints.save(self.step, self.state,
                                  {**self.meta, "step": self.step, "log_lines": self.writer.lines})
        kill_point("saving")
        self.last_saved = self.step

    def _validate(self, patience: int) -> None:
        """Validation, best step and early stopping (updates `self.meta`)."""
        run, meta, step = self.run, self.meta, self.step
        name = run.task.validation_metric
        metrics = evaluate_split(run, self.state, "val", self.eval_step)
        value = metrics[name]
        if not math.isfinite(value):
            raise NonFiniteMetricError(
                f"non-finite validation {name} ({value}) at step {step}; training stopped. The "
                f"last good checkpoint is step {self.last_saved} in "
                f"{run.checkpoints.folder} (the best so far: step {meta['best_step']}): look "
                "for NaN/inf in the validation data or lower optimizer.lr.")
        meta["last_eval_step"] = step
        kill_point("validated")
        better = value < meta["best_val"] if run.task.validation_mode == "min" \
            else value > meta["best_val"]
        if better:
            meta.update(best_val=value, best_step=step, bad_evals=0)
        else:
            meta["bad_evals"] += 1
            if patience and meta["bad_evals"] >= patience:
                log.info("early stopping at step %d: val %s has not improved for %d "
                         "evaluations", step, name, patience)
                meta["finished"] = True
        self.writer.write(step, {f"val_{k}": v for k, v in metrics.items()}
                          | {"best_val_" + name: meta["best_val"]})

    # -- the end --------------------------------------------------------------------------
    def test(self) -> dict[str, Any]:
        """Tests the best checkpoint; writes results.json (process 0) and returns it."""
        run = self.run
        best_state, best_meta, best_step = run.restore("best")
        results = {"best_step": best_step, "best_val_" + run.task.validation_metric:
                   best_meta["best_val"], "steps": self.step,
                   **{f"test_{k}": v for k, v in evaluate_split(run, best_state, "test",
                                                                self.eval_step).items()}}
        kill_point("results")
        self.writer.write(self.step, results)
        self.writer.close()
        if jax.process_index() == 0:
            atomic_write_text(run.workdir / "results.json", json.dumps(results, indent=2) + "\n")
        log.info("best checkpoint tested after %.1f s", time.time() - self.began)
        return results


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *,
                       task=None, devices=None) -> dict[str, Any]:
    """Trains (resuming from the workdir's latest checkpoint), then tests the best checkpoint.

    The workdir is claimed first (`workdir.claim_workdir`: one owner, one config). Returns
    the final metrics, also written to workdir/results.json.
    """
    began = time.time()
    check_config(config)
    with claim_workdir(config, workdir) as workdir:
        run = setup(config, workdir, task=task, devices=devices)
        trainer = None
        try:
            distributed.agree("data and devices", run.facts())
            if jax.process_index() == 0:  # what using the model needs of its data
                atomic_write_text(run.workdir / DATA_CARD,
                                  json.dumps(run.task.describe(), indent=2) + "\n")
            log.info("data and model set up in %.1f s", time.time() - began)
            trainer = Trainer(run, began)
            trainer.start()
            trainer.fit()
            return trainer.test()
        finally:
            if trainer is not None:
                trainer.wait_for_compilers()
            run.checkpoints.close()
