"""Orbax checkpoints of a workdir: the last N training states and the best one.

    workdir/checkpoints/<step>/   periodic and end-of-epoch saves, the newest `keep` kept
    workdir/best/<step>/          the state with the best validation metric so far

Each checkpoint holds the train state (model, optimizer, EMA; a pytree of arrays saved
sharded, restored onto whatever mesh the reader has) and a JSON `meta` dict (epoch, input
position, early-stopping counters). Writes are atomic: an interrupted save is never restored.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointNotFoundError(FileNotFoundError):
    """No checkpoint of the requested kind exists in the workdir."""


class Checkpoints:
    """The latest-N and best checkpoint managers of one workdir."""

    def __init__(self, workdir: str | pathlib.Path, *, keep: int = 2, read_only: bool = False):
        self.workdir = pathlib.Path(workdir).absolute()

        def manager(folder: str, max_to_keep: int):
            options = (ocp.CheckpointManagerOptions(read_only=True, max_to_keep=None,
                                                    save_interval_steps=0) if read_only
                       else ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))
            return ocp.CheckpointManager(self.workdir / folder, options=options)

        self.latest = manager("checkpoints", keep)
        self.best = manager("best", 1)

    def latest_step(self) -> int | None:
        return self.latest.latest_step()

    def best_step(self) -> int | None:
        return self.best.latest_step()

    @staticmethod
    def _save(manager, step: int, state, meta: dict[str, Any]) -> None:
        manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                   meta=ocp.args.JsonSave(meta)), force=True)

    def save(self, step: int, state, meta: dict[str, Any]) -> None:
        """Saves a training checkpoint (asynchronously; see `wait`)."""
        self._save(self.latest, step, state, meta)

    def save_best(self, step: int, state, meta: dict[str, Any]) -> None:
        """Replaces the best checkpoint."""
        self._save(self.best, step, state, meta)

    def restore(self, which: str | int, abstract_state) -> tuple[Any, dict[str, Any], int]:
        """Restores "latest", "best" or a step number onto the shardings of `abstract_state`.

        `abstract_state` is a pytree of `jax.ShapeDtypeStruct` with `.sharding` set: arrays are
        resharded from however they were saved (e.g. 8 devices -> 1).
        Returns (state, meta, step).
        """
        manager, step = self._resolve(which)
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        return restored.state, dict(restored.meta), step

    def _resolve(self, which: str | int):
        if which == "best":
            manager, step = self.best, self.best.latest_step()
        elif which == "latest":
            manager, step = self.latest, self.latest.latest_step()
        else:
            step = int(which)
            manager = self.latest if step in self.latest.all_steps() else self.best
            if step not in manager.all_steps():
                steps = sorted(set(self.latest.all_steps()) | set(self.best.all_steps()))
                raise CheckpointNotFoundError(
                    f"no checkpoint at step {step} in {self.workdir}; available steps: "
                    f"{steps or 'none'}")
        if step is None:
            raise CheckpointNotFoundError(
                f"no {which} checkpoint in {self.workdir} (looked in "
                f"{self.workdir / ('best' if which == 'best' else 'checkpoints')}); "
                "train first with train.py --workdir pointing there")
        return manager, step

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are on disk."""
        self.latest.wait_until_finished()
        self.best.wait_until_finished()

    def close(self) -> None:
        self.latest.close()
        self.best.close()


def abstract_with_shardings(abstract_state, shardings):
    """ShapeDtypeStructs carrying the target shardings, for `Checkpoints.restore`."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        abstract_state, shardings)
