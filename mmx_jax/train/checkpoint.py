"""Orbax checkpoints of a workdir: one per saved step, the best one among them.

    workdir/checkpoints/<step>/       the train state (model, optimizer, EMA; saved sharded,
                                      restored onto whatever mesh the reader has) and a JSON
                                      `meta` (epoch position, early-stopping counters, the
                                      best step so far, the metric log's length)
    workdir/corrupt/<step>-<time>/    checkpoints that failed to restore, moved aside

The best checkpoint is not a copy: every checkpoint's meta names the best step so far
(`best_step`), and that checkpoint is kept besides the newest `keep`. So "best" and "latest"
come from one commit and cannot disagree, whatever instant a run is killed at.

Saves are asynchronous and atomic (Orbax writes to a temporary folder and renames it when
complete; an interrupted save is never restored, and its leftovers are cleaned up).
Checkpoints that a newer one makes unnecessary are deleted only after that one has
committed. A checkpoint that is corrupt or incomplete is reported with its path, moved aside
and the previous one restored instead.
"""

from __future__ import annotations

import logging
import pathlib
import time
from typing import Any

import jax
import orbax.checkpoint as ocp

from mmx_jax.train import distributed
from mmx_jax.train.faults import kill_point

log = logging.getLogger(__name__)


class CheckpointNotFoundError(FileNotFoundError):
    """No checkpoint of the requested kind exists in the workdir."""


class CheckpointCorruptError(RuntimeError):
    """A checkpoint exists but cannot be restored."""


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return (lines[0] if lines else type(err).__name__)[:160]


class Checkpoints:
    """The checkpoints of one workdir (see the module docstring)."""

    def __init__(self, workdir: str | pathlib.Path, *, keep: int = 2, read_only: bool = False):
        if keep < 1:
            raise ValueError(f"train.keep_checkpoints={keep} must be at least 1")
        self.workdir = pathlib.Path(workdir).absolute()
        self.folder = self.workdir / "checkpoints"
        self.keep, self.read_only = keep, read_only
        legacy = self.workdir / "best"
        if legacy.is_dir():
            raise CheckpointNotFoundError(
                f"{self.workdir} was written by an earlier mmx_jax that kept the best "
                f"checkpoint apart, in {legacy}; move it beside the others once: mv "
                f"{legacy}/* {self.folder}/ && rmdir {legacy} (where checkpoints/ already has "
                "that step, the two are the same: delete the one in best/)")
        if read_only:
            options = ocp.CheckpointManagerOptions(read_only=True, create=False,
                                                   max_to_keep=None, save_interval_steps=0)
        else:
            options = ocp.CheckpointManagerOptions(max_to_keep=None, create=True,
                                                   cleanup_tmp_directories=True)
        self._manager = ocp.CheckpointManager(self.folder, options=options)
        self._best_of_latest: int | None = None  # the best step named by the newest save

    # -- reading --------------------------------------------------------------------------
    def steps(self) -> list[int]:
        """The committed steps, oldest first."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def path(self, step: int) -> pathlib.Path:
        return self.folder / str(step)

    def read_meta(self, step: int) -> dict[str, Any]:
        """The meta of checkpoint `step` (the arrays are not read)."""
        restored = self._manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore()))
        return dict(restored.meta)

    def best_step(self) -> int | None:
        """The best step named by the newest readable checkpoint (None: no validated one)."""
        for step in reversed(self.steps()):
            try:
                best = self.read_meta(step).get("best_step", step)
            except Exception as err:  # noqa: BLE001 - a damaged meta: look at the one before
                log.warning("checkpoint %s: its meta cannot be read (%s)", self.path(step),
                            _first_line(err))
                continue
            return best if best is not None and best >= 0 else None
        return None

    def restore(self, which: str | int, abstract_state) -> tuple[Any, dict[str, Any], int]:
        """Restores "latest", "best" or a step number onto the shardings of `abstract_state`
        (a pytree of `jax.ShapeDtypeStruct` with `.sharding` set: arrays are resharded from
        however they were saved, e.g. 8 devices -> 1). Returns (state, meta, step).

        "latest" falls back to older checkpoints when the newest cannot be restored (each
        one reported with its path; in a writable workdir it is moved to workdir/corrupt/).
        "best" and a step number raise `CheckpointCorruptError` instead.
        """
        if which == "latest":
            return self._restore_latest(abstract_state)
        if which == "best":
            step = self.best_step()
            if step is None:
                raise CheckpointNotFoundError(
                    f"no validated checkpoint in {self.folder}: "
                    + ("the run has saved none yet; train first with train.py --workdir "
                       "pointing there" if not self.steps() else
                       "the run stopped before its first validation (run train.py again "
                       "to continue it, or evaluate --checkpoint latest)"))
        else:
            step = int(which)
        if step not in self.steps():
            raise CheckpointNotFoundError(
                f"no checkpoint at step {step} in {self.folder}; available steps: "
                f"{self.steps() or 'none'}")
        try:
            return (*self._restore_step(step, abstract_state), step)
        except Exception as err:  # noqa: BLE001 - Orbax and tensorstore raise many types
            why = _first_line(err)
            if "shape" in why:  # the config builds another model than the one saved
                why = (f"it does not fit the model of the workdir's config.json "
                       f"({why.split('. ')[0]}); the config and the checkpoint come from "
                       "different runs")
            raise CheckpointCorruptError(
                f"checkpoint {self.path(step)} cannot be restored: {why}") from err

    def _restore_step(self, step: int, abstract_state):
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        return restored.state, dict(restored.meta)

    def _restore_latest(self, abstract_state):
        if not self.steps():
            raise CheckpointNotFoundError(f"no checkpoint in {self.folder}; train first with "
                                          "train.py --workdir pointing there")
        for step in reversed(self.steps()):
            error = None
            try:
                state, meta = self._restore_step(step, abstract_state)
            except Exception as err:  # noqa: BLE001 - Orbax and tensorstore raise many types
                error = _first_line(err)
            # Every process must resume from the same step.
            errors = [e for e in distributed.gather_json(error) if e]
            if not errors:
                self._best_of_latest = meta.get("best_step")
                return state, meta, step
            self._set_aside(step, errors[0])
        raise CheckpointCorruptError(
            f"no checkpoint in {self.folder} could be restored"
            + ("" if self.read_only else f" (they were moved to {self.workdir / 'corrupt'}: "
               "run again to start over)"))

    def _set_aside(self, step: int, error: str) -> None:
        source = self.path(step)
        if self.read_only:
            log.warning("checkpoint %s cannot be restored (%s): using the one before",
                        source, error)
            return
        target = self.workdir / "corrupt" / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
        log.warning("checkpoint %s cannot be restored (%s): moved to %s; resuming from the "
                    "one before", source, error, target)
        if jax.process_index() == 0:
            target.parent.mkdir(parents=True, exist_ok=True)
            source.rename(target)
        distributed.barrier(f"set-aside-{step}")
        self._manager.reload()

    # -- writing --------------------------------------------------------------------------
    def save(self, step: int, state, meta: dict[str, Any]) -> None:
        """Starts saving checkpoint `step` (asynchronously; see `wait`). `meta["best_step"]`
        names the best checkpoint so far, which is kept."""
        self._manager.wait_until_finished()  # the previous save has committed: prune
        kill_point("committed")
        self._prune()
        kill_point("pruned")
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
        self._best_of_latest = meta.get("best_step")

    def _prune(self) -> None:
        """Deletes the committed checkpoints that are neither among the newest `keep` nor
        the best one named by the newest (every process calls it the same way)."""
        if self.read_only:
            return
        steps = self.steps()
        keep = set(steps[-self.keep:]) | {self._best_of_latest}
        for step in steps:
            if step not in keep:
                self._manager.delete(step)

    def wait(self) -> None:
        """Blocks until the pending save has committed (and prunes after it)."""
        self._manager.wait_until_finished()
        kill_point("committed")
        self._prune()
        kill_point("pruned")

    def close(self) -> None:
        self._manager.close()


def abstract_with_shardings(abstract_state, shardings):
    """ShapeDtypeStructs carrying the target shardings, for `Checkpoints.restore`."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        abstract_state, shardings)
