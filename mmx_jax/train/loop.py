"""The training loop and checkpoint evaluation.

train_and_evaluate reads top to bottom: build the mesh, jit the steps with explicit shardings
and donated state and start compiling them in the background, build the model and optimizer
state already sharded on the mesh (or restore the latest checkpoint if the workdir has one),
loop with validation, early stopping, checkpoints and metric writers, then test the best
checkpoint.
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
import ml_collections
import numpy as np
import optax
from flax import nnx

from mmx_jax.train.checkpoint import Checkpoints, abstract_with_shardings
from mmx_jax.train.optim import make_optimizer, schedule_position, time_clocked
from mmx_jax.train.sharding import (
    batch_sharding,
    build_mesh,
    global_batch,
    state_shardings,
)
from mmx_jax.train.tasks import make_task
from mmx_jax.train.writers import MetricWriter, progress_bar

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss; the run stopped without saving it."""


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
    checkpoints: Checkpoints

    def init_state(self):
        """A fresh state, created directly with its shardings."""
        with _threefry_as_kernel():
            return jax.jit(lambda: _split(*self._build())[1], out_shardings=self.shardings)()

    def _build(self):
        seed = self.config.seed
        model = self.task.create_model(nnx.Rngs(params=seed, dropout=seed + 1))
        tx = make_optimizer(self.config.optimizer, total_steps=self.total_steps,
                            steps_per_epoch=self.steps_per_epoch)
        optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
        ema = (nnx.state(model, nnx.Param) if self.config.optimizer.ema_decay > 0 else None)
        return model, optimizer, ema

    def restore(self, which: str | int):
        """(state, meta, step) of a checkpoint, placed on this run's mesh."""
        target = abstract_with_shardings(self.abstract_state, self.shardings)
        return self.checkpoints.restore(which, target)

    def model(self, state, *, use_ema: bool = True) -> nnx.Module:
        """The model of a state (with EMA weights when the state has them); `state` itself is
        left untouched."""
        ema = state.get("ema") if use_ema else None
        model = nnx.merge(self.graphdefs["model"], state["model"], copy=ema is not None)
        if ema is not None:
            nnx.update(model, ema)
        return model


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
    global_batch_size = task.train_batch_size
    if global_batch_size % mesh.size:
        raise ValueError(f"data.batch_size={global_batch_size} is not divisible by the "
                         f"{mesh.size} devices of the mesh {dict(mesh.shape)}")
    steps_per_epoch = config.train.steps_per_epoch or task.steps_per_epoch()
    steps_per_epoch = min(steps_per_epoch, task.steps_per_epoch())
    if steps_per_epoch < 1:
        raise ValueError(f"the training split has fewer windows than one batch of "
                         f"{global_batch_size}")
    run = Run(config=config, workdir=workdir, task=task, mesh=mesh,
              steps_per_epoch=steps_per_epoch,
              total_steps=steps_per_epoch * config.train.num_epochs, graphdefs={},
              abstract_state={}, shardings={},
              checkpoints=Checkpoints(workdir, keep=config.train.keep_checkpoints,
                                      read_only=read_only))
    graphdefs, abstract_state = _split(*nnx.eval_shape(run._build))
    run.graphdefs, run.abstract_state = graphdefs, abstract_state
    run.shardings = state_shardings(abstract_state, mesh, config.sharding.rules,
                                    config.sharding.fsdp_min_size)
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


def make_train_step(run: Run):
    """The jitted step, ``step(state, batch, schedule_step=None) -> (state, metrics)``.
    `schedule_step`, the learning-rate schedule's position (`optim.schedule_position`), is
    required with optimizer.schedule_clock="time" and unused otherwise. `step.precompile(
    state_spec, batch_spec)` compiles it in the background (`Step`)."""
    task, graphdefs = run.task, run.graphdefs
    ema_decay = run.config.optimizer.ema_decay
    clocked = time_clocked(run.config.optimizer)

    def train_step(state, batch, schedule_step):
        model = nnx.merge(graphdefs["model"], state["model"])
        optimizer = nnx.merge(graphdefs["opt"], state["opt"])
        loss, grads = nnx.value_and_grad(lambda m: task.loss(m, batch))(model)
        optimizer.update(model, grads, **({"schedule_step": schedule_step} if clocked else {}))
        new_state = {"model": nnx.state(model), "opt": nnx.state(optimizer)}
        if "ema" in state:
            new_state["ema"] = jax.tree.map(lambda e, p: ema_decay * e + (1 - ema_decay) * p,
                                            state["ema"], nnx.state(model, nnx.Param))
        return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    data_sharding = batch_sharding(run.mesh)
    replicated = jax.sharding.NamedSharding(run.mesh, jax.sharding.PartitionSpec())
    jitted = Step(jax.jit(train_step, in_shardings=(run.shardings, data_sharding, replicated),
                          out_shardings=(run.shardings, replicated), donate_argnums=0))
    position_spec = jax.ShapeDtypeStruct((), np.float32)

    def step(state, batch, schedule_step=None):
        if clocked and schedule_step is None:
            raise ValueError('optimizer.schedule_clock="time": the step needs schedule_step')
        return jitted(state, batch, np.float32(schedule_step or 0.0))

    step.trace = lambda state, batch: jitted.trace(state, batch, np.float32(0.0))
    step.precompile = lambda state, batch: jitted.precompile(state, batch, position_spec)
    return step


def make_eval_step(run: Run):
    task = run.task

    def eval_step(state, batch):
        model = run.model(state)
        model.eval()
        return task.eval_sums(model, batch)

    replicated = jax.sharding.NamedSharding(run.mesh, jax.sharding.PartitionSpec())
    return Step(jax.jit(eval_step, in_shardings=(run.shardings, batch_sharding(run.mesh)),
                        out_shardings=replicated))


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
    eval_step = eval_step or make_eval_step(run)
    totals: dict[str, float] = {}
    for batch in run.task.eval_batches(split):
        sums = jax.device_get(eval_step(state, place_batch(run, batch, run.task.eval_batch_size)))
        for key, value in sums.items():
            totals[key] = totals.get(key, 0.0) + float(value)
    return run.task.metrics(totals)


class _StopSignal:
    """Turns SIGTERM into a flag the loop checks, so it can save before exiting."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no handler, the flag stays False
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _save_config(config, workdir: pathlib.Path) -> None:
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")


def load_config(workdir: str | pathlib.Path) -> ml_collections.ConfigDict:
    """The resolved config a run saved in its workdir."""
    path = pathlib.Path(workdir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {workdir} the workdir of a train.py run?")
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *,
                       task=None, devices=None) -> dict[str, Any]:
    """Trains (resuming from the workdir's latest checkpoint), then tests the best checkpoint.

    Returns the final metrics, also written to workdir/results.json.
    """
    workdir = pathlib.Path(workdir)
    began = time.time()
    _save_config(config, workdir)
    run = setup(config, workdir, task=task, devices=devices)
    log.info("data and model set up in %.1f s", time.time() - began)
    writer = MetricWriter(workdir)
    tcfg = config.train

    worst = math.inf if run.task.validation_mode == "min" else -math.inf
    meta = {"best_val": worst, "best_step": -1, "bad_evals": 0,
            "last_eval_step": 0, "finished": False}
    spe = run.steps_per_epoch
    latest = run.checkpoints.latest_step()
    step = latest or 0
    # Compile both steps in the background, for the abstract state and the first batches,
    # while the state is built or restored.
    train_step, eval_step = make_train_step(run), make_eval_step(run)
    state_spec = jax.eval_shape(run.init_state)
    batches = run.task.train_batches(step, spe)
    first = next(batches)
    batches = itertools.chain([first], batches)
    train_step.precompile(state_spec, batch_spec(run, first, run.task.train_batch_size))
    val_batches = run.task.eval_batches("val")
    eval_step.precompile(state_spec, batch_spec(run, next(val_batches),
                                                run.task.eval_batch_size))
    val_batches.close()

    if latest is not None:
        state, saved_meta, step = run.restore("latest")
        meta.update(saved_meta)
        log.info("resumed from %s at step %d", run.checkpoints.workdir / "checkpoints", step)
        writer.truncate_after(step)
    else:
        state = run.init_state()
    log.info("state ready after %.1f s", time.time() - began)

    eval_every = tcfg.eval_every_steps or spe
    pending: list[tuple[int, dict[str, jax.Array]]] = []  # device metrics not yet checked
    last_saved = latest

    def check_finite():
        """Fetches pending step metrics; raises if any loss is NaN/inf. Returns the means."""
        if not pending:
            return {}
        values = jax.device_get([m for _, m in pending])
        for (s, _), m in zip(pending, values, strict=True):
            if not np.isfinite(m["loss"]):
                raise NonFiniteLossError(
                    f"non-finite training loss ({m['loss']}) at step {s} (epoch "
                    f"{(s - 1) // spe}, batch {(s - 1) % spe}); training stopped. The last "
                    f"good checkpoint is step {last_saved} in "
                    f"{run.checkpoints.workdir / 'checkpoints'}: look for NaN/inf in the data "
                    "or lower optimizer.lr.")
        pending.clear()
        return {k: float(np.mean([m[k] for m in values])) for k in values[0]}

    def save(at_step):
        nonlocal last_saved
        check_finite()
        run.checkpoints.save(at_step, state, {**meta, "step": at_step})
        last_saved = at_step

    bar = progress_bar(run.total_steps, step, f"train {config.task}")
    started, started_step = time.time(), step
    # A time-clocked schedule ends at the time limit: its budget is what is left of the limit
    # once the first step (and its compilation) is done.
    clocked = time_clocked(config.optimizer)
    first_done = None
    with _StopSignal() as stop:
        try:
            while step < run.total_steps and not meta["finished"]:
                batch = place_batch(run, next(batches), run.task.train_batch_size)
                position = step
                if clocked and first_done is not None and tcfg.get("time_limit_s"):
                    position = schedule_position(
                        step, run.total_steps, time.time() - first_done,
                        started + tcfg.time_limit_s - first_done)
                state, metrics = train_step(state, batch, position)
                if first_done is None:
                    first_done = time.time()
                    log.info("first step dispatched after %.1f s (compilation included)",
                             first_done - began)
                step += 1
                pending.append((step, metrics))
                bar.update(1)
                if step % tcfg.log_every_steps == 0:
                    means = check_finite()
                    rate = (step - started_step) / max(time.time() - started, 1e-9)
                    writer.write(step, {"train_loss": means["loss"],
                                        "grad_norm": means["grad_norm"], "steps_per_sec": rate,
                                        **({"schedule_step": position} if clocked else {})})
                    bar.set_postfix(loss=f"{means['loss']:.4f}")
                if step % eval_every == 0 or step == run.total_steps:
                    check_finite()
                    _validate(run, state, step, meta, writer, eval_step, tcfg.patience)
                    save(step)
                elif step % tcfg.checkpoint_every_steps == 0:
                    save(step)
                if stop.requested:
                    raise KeyboardInterrupt("SIGTERM")
                if tcfg.get("time_limit_s") and time.time() - started > tcfg.time_limit_s:
                    log.warning("train.time_limit_s=%s reached at step %d: stopping early",
                                tcfg.time_limit_s, step)
                    if meta["last_eval_step"] != step:
                        _validate(run, state, step, meta, writer, eval_step, 0)
                    meta["finished"] = True
            meta["finished"] = True
            if last_saved != step:
                save(step)
        except KeyboardInterrupt:
            if last_saved != step:
                log.warning("interrupted at step %d: saving a checkpoint before exiting", step)
                save(step)
            raise
        finally:
            bar.close()
            run.checkpoints.wait()

    log.info("training ended at step %d after %.1f s", step, time.time() - began)
    best_state, best_meta, best_step = run.restore("best")
    results = {"best_step": best_step, "best_val_" + run.task.validation_metric:
               best_meta["best_val"], "steps": step,
               **{f"test_{k}": v for k, v in evaluate_split(run, best_state, "test",
                                                            eval_step).items()}}
    writer.write(step, results)
    writer.close()
    if jax.process_index() == 0:
        (workdir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    run.checkpoints.close()
    log.info("best checkpoint tested after %.1f s", time.time() - began)
    return results


def _validate(run: Run, state, step: int, meta: dict, writer: MetricWriter, eval_step,
              patience: int) -> None:
    """Validation, best checkpoint and early stopping (updates `meta` in place)."""
    name = run.task.validation_metric
    metrics = evaluate_split(run, state, "val", eval_step)
    value = metrics[name]
    meta["last_eval_step"] = step
    better = value < meta["best_val"] if run.task.validation_mode == "min" \
        else value > meta["best_val"]
    if better:
        meta.update(best_val=value, best_step=step, bad_evals=0)
        run.checkpoints.save_best(step, state, {**meta, "step": step})
    else:
        meta["bad_evals"] += 1
        if patience and meta["bad_evals"] >= patience:
            log.info("early stopping at step %d: val %s has not improved for %d evaluations",
                     step, name, patience)
            meta["finished"] = True
    writer.write(step, {f"val_{k}": v for k, v in metrics.items()}
                 | {"best_val_" + name: meta["best_val"]})
