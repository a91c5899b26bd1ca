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

log = logging.getLogger(__name__)


class MetricWriter:
    """Appends `{"step": s, ...}` lines to workdir/metrics.jsonl and scalars to TensorBoard.

    On resume from step s, `truncate_after(s)` drops log lines an interrupted run wrote past
    its last checkpoint, so the log reads as one uninterrupted run.
    """

    def __init__(self, workdir: str | pathlib.Path, *, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.path = pathlib.Path(workdir) / "metrics.jsonl"
        self._tb = None
        if self.enabled:
            try:
                from tensorboardX import SummaryWriter  # noqa: PLC0415
            except ImportError:
                log.warning("tensorboardX is not installed: no TensorBoard events, only %s",
                            self.path)
            else:
                self._tb = SummaryWriter(str(pathlib.Path(workdir) / "tensorboard"))

    def truncate_after(self, step: int) -> None:
        if not (self.enabled and self.path.exists()):
            return
        lines = self.path.read_text().splitlines()
        kept = [line for line in lines if line and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
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
