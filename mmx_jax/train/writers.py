"""What a run leaves in its workdir to read: a plain metrics log, TensorBoard events, a
progress bar. Only process 0 writes."""

from __future__ import annotations

import json
import logging
import math
import os
import pathlib
import sys
from typing import Any

import jax

from mmx_jax.train.faults import kill_point
from mmx_jax.train.workdir import atomic_write_text

log = logging.getLogger(__name__)


class MetricWriter:
    """Appends `{"step": s, ...}` lines to workdir/metrics.jsonl and scalars to TensorBoard.

    `lines` counts the lines written so far (on every process, so that every process saves
    the same checkpoint meta). A run that resumes from a checkpoint passes the count saved
    with it as `resume_lines` (0 for a fresh start): what an interrupted run wrote after
    that checkpoint is dropped, so the log reads as one uninterrupted run, and TensorBoard
    discards its events after `resume_step`.
    """

    def __init__(self, workdir: str | pathlib.Path, *, resume_lines: int | None = 0,
                 resume_step: int = 0, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.path = pathlib.Path(workdir) / "metrics.jsonl"
        self.lines = self._truncate(resume_lines, resume_step) if self.enabled else (
            resume_lines or 0)
        self._tb = None
        if self.enabled:
            try:
                from tensorboardX import SummaryWriter  # noqa: PLC0415
            except ImportError:
                log.warning("tensorboardX is not installed: no TensorBoard events, only %s",
                            self.path)
            else:
                self._tb = SummaryWriter(str(pathlib.Path(workdir) / "tensorboard"),
                                         purge_step=resume_step + 1 if resume_step else None)

    def _truncate(self, keep: int | None, step: int) -> int:
        """Keeps the first `keep` lines (None: those up to `step`, for checkpoints whose meta
        has no count); a torn last line is dropped. Returns the lines kept."""
        if not self.path.exists():
            return 0
        rows = []
        for line in self.path.read_text().splitlines():
            try:
                rows.append((line, json.loads(line)))
            except json.JSONDecodeError:  # a line cut by a kill
                break
        rows = [r for r in rows if r[1].get("step", 0) <= step] if keep is None else rows[:keep]
        atomic_write_text(self.path, "".join(line + "\n" for line, _ in rows))
        return len(rows)

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        self.lines += 1
        if not self.enabled:
            return
        row = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        kill_point("logged")
        if self._tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, int | float) and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _plain(value):
    """NumPy/JAX scalars as Python numbers, everything else unchanged."""
    if hasattr(value, "item") and getattr(value, "size", 0) == 1:
        return value.item()
    return value


def read_metrics(workdir: str | pathlib.Path) -> list[dict[str, Any]]:
    """The rows of workdir/metrics.jsonl."""
    path = pathlib.Path(workdir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def progress_bar(total: int, initial: int, description: str):
    """A tqdm bar (steps/s shown by tqdm), silent on processes other than 0.

    TQDM_DISABLE=1 silences it; written to a file (no terminal) it updates every 30 s.
    """
    from tqdm.auto import tqdm  # noqa: PLC0415

    silenced = os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true", "yes")
    return tqdm(total=total, initial=initial, desc=description, unit="step", dynamic_ncols=True,
                disable=silenced or jax.process_index() != 0, smoothing=0.1,
                mininterval=0.1 if sys.stderr.isatty() else 30.0)
