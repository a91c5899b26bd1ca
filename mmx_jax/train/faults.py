"""A test hook that kills the process at named points of a run, to prove a run survives a kill
at any instant (tests/test_lifecycle.py).

    MMX_KILL_AT="saving:2"            SIGKILL at the second pass through "saving"
    MMX_KILL_AT="step:3,committed:1"  at whichever comes first

The points, in the order a run passes them:
  claimed    the workdir is owned and config.json written
  resumed    the state is initialised or restored
  step       a training step has been dispatched
  logged     a line was appended to metrics.jsonl
  validated  a validation has been computed (before its line is written)
  save       a checkpoint save is about to start
  saving     a save has started and its files are being written in the background
  committed  the previous save has committed (seen at the next save or at the end)
  pruned     checkpoints made unnecessary by a commit have been deleted
  results    the test metrics are computed, results.json not yet written

Unset, `kill_point` costs a dictionary lookup.
"""

from __future__ import annotations

import collections
import os
import signal

_counts: collections.Counter[str] = collections.Counter()


def _plan() -> dict[str, int]:
    spec = os.environ.get("MMX_KILL_AT", "")
    plan = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, count = item.partition(":")
        plan[name] = int(count or 1)
    return plan


_PLAN = _plan()


def kill_point(name: str) -> None:
    """SIGKILLs this process if MMX_KILL_AT says so for this pass through `name`."""
    if not _PLAN or name not in _PLAN:
        return
    _counts[name] += 1
    if _counts[name] == _PLAN[name]:
        os.kill(os.getpid(), signal.SIGKILL)
