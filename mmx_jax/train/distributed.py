"""Several processes as one run: JAX's distributed runtime, failure detection, agreement.

All processes of a run start with the same command (a pod, SLURM, `python -m mmx_jax.launch`).
`initialize_distributed` starts `jax.distributed` when the environment describes several
processes, with bounded timeouts: a process that never connects stops the others after
`MMX_INIT_TIMEOUT_S` (default 120 s), and a process that dies is noticed within
`MMX_HEARTBEAT_TIMEOUT_S` (default 20 s) plus about a second.

Failure reporting: JAX's coordination service normally aborts every process (SIGABRT, a
stack trace) once one of them stops sending heartbeats. Here the service runs in JAX's
recoverable mode and a watchdog thread in each process asks it every second which processes
are alive and whether one has reported an error (`report_failure`); then it prints one line
naming that process and ends this one with exit code 1. Where this JAX lacks those hooks,
JAX's own abort (which also names the dead process) remains.

`agree(name, facts)` stops every process at start-up, with the differing facts named, when
the processes were started with different configs, data or device counts.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import sys
import threading
import time
from typing import Any

import jax

log = logging.getLogger(__name__)

_KEY = "mmx_jax"  # prefix of our keys in the coordination service's key-value store
_watchdog: _Watchdog | None = None


class ProcessMismatchError(RuntimeError):
    """The processes of one run were started with different configs, data or devices."""


def _env_seconds(name: str, default: int) -> int:
    value = os.environ.get(name, str(default))
    try:
        seconds = int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not a whole number of seconds") from None
    if seconds < 1:
        raise ValueError(f"{name}={value!r} must be at least 1 (seconds)")
    return seconds


def _wanted() -> bool:
    env = os.environ
    return bool(env.get("JAX_COORDINATOR_ADDRESS")
                or int(env.get("SLURM_NTASKS", "1")) > 1
                or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
                or env.get("MMX_DISTRIBUTED") == "1" or env.get("TPU_WORKER_HOSTNAMES"))


def initialize_distributed() -> None:
    """Starts multi-process JAX when the environment describes several processes.

    Explicit: JAX_COORDINATOR_ADDRESS (host:port) with JAX_NUM_PROCESSES and JAX_PROCESS_ID
    (what `mmx_jax.launch` sets). Auto-detected by JAX: SLURM (SLURM_NTASKS > 1), Open MPI
    (OMPI_COMM_WORLD_SIZE > 1), Cloud TPU pods, or MMX_DISTRIBUTED=1 to ask JAX to detect the
    cluster itself. A no-op for one process, or when already initialised.
    """
    if not _wanted() or jax.distributed.is_initialized():
        return
    env = os.environ
    kwargs: dict[str, Any] = dict(
        initialization_timeout=_env_seconds("MMX_INIT_TIMEOUT_S", 120),
        heartbeat_timeout_seconds=_env_seconds("MMX_HEARTBEAT_TIMEOUT_S", 20),
        shutdown_timeout_seconds=_env_seconds("MMX_SHUTDOWN_TIMEOUT_S", 60))
    if "JAX_NUM_PROCESSES" in env:
        kwargs["num_processes"] = int(env["JAX_NUM_PROCESSES"])
    if "JAX_PROCESS_ID" in env:
        kwargs["process_id"] = int(env["JAX_PROCESS_ID"])
    recoverable = _client_api_available()
    if recoverable:
        jax.config.update("jax_enable_recoverability", True)
    try:
        jax.distributed.initialize(env.get("JAX_COORDINATOR_ADDRESS"), **kwargs)
    except Exception as err:  # noqa: BLE001 - JAX raises several runtime error types here
        address = env.get("JAX_COORDINATOR_ADDRESS", "(auto-detected)")
        raise RuntimeError(
            f"could not start JAX's distributed runtime (coordinator {address}, "
            f"{kwargs.get('num_processes', '?')} processes): {_first_line(err)}. Every process "
            "must be started, with the same coordinator address, within "
            f"{kwargs['initialization_timeout']} s (MMX_INIT_TIMEOUT_S)") from err
    log.info("distributed: process %d of %d, %d local of %d devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    if recoverable and jax.process_count() > 1:
        global _watchdog
        _watchdog = _Watchdog(jax.process_count(), jax.process_index())
        _watchdog.start()
        atexit.register(finish)  # before JAX's own shutdown (atexit runs in reverse order)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _client():
    """The coordination service client of `jax.distributed`, or None (one process)."""
    try:
        from jax._src import distributed  # noqa: PLC0415
    except ImportError:
        return None
    return getattr(distributed.global_state, "client", None)


def _client_api_available() -> bool:
    """Whether this JAX has what the watchdog uses: the recoverable mode, the coordination
    client's live-node query and its key-value store."""
    try:
        from jax._src import distributed  # noqa: PLC0415
        from jax._src.lib import _jax  # noqa: PLC0415
    except ImportError:
        return False
    client_type = getattr(_jax, "DistributedRuntimeClient", None)
    return (hasattr(distributed, "global_state") and client_type is not None
            and all(hasattr(client_type, name) for name in
                    ("get_live_nodes", "key_value_set", "key_value_dir_get",
                     "blocking_key_value_get"))
            and "jax_enable_recoverability" in jax.config.values)


class _Watchdog(threading.Thread):
    """Polls the coordination service; ends this process when another one failed or died."""

    def __init__(self, count: int, index: int, period_s: float = 1.0):
        super().__init__(name="mmx-watchdog", daemon=True)
        self.count, self.index, self.period_s = count, index, period_s
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()

    @property
    def stopped(self) -> bool:
        return self._stop_event.is_set()

    def run(self) -> None:
        client = _client()
        while not self._stop_event.wait(self.period_s):
            try:
                failed = client.key_value_dir_get(f"{_KEY}/failed/")
                live = client.get_live_nodes(list(range(self.count)))
            except Exception as err:  # noqa: BLE001 - the service itself is gone
                self._end(f"lost the coordination service of process 0 ({_first_line(err)})")
                return
            for key, message in failed:
                process = int(key.rsplit("/", 1)[-1])
                if process != self.index:
                    self._end(f"process {process} of {self.count} failed: {message}")
            dead = sorted(set(range(self.count)) - set(live))
            if dead:
                self._end(f"process {', '.join(map(str, dead))} of {self.count} stopped "
                          "without a message (killed, out of memory or crashed; see its "
                          "output)")

    def _end(self, why: str) -> None:
        if self._stop_event.is_set():
            return
        print(f"process {self.index}: stopping, {why}", file=sys.stderr, flush=True)
        logging.shutdown()
        os._exit(1)


def finish(timeout_s: float = 60.0) -> None:
    """Ends a multi-process run that succeeded: every process reaches this point, the
    watchdogs stop, the other processes disconnect, and process 0, which hosts the
    coordination service, disconnects last (leaving earlier would fail theirs). Called by
    the entry points, and at exit for other scripts; once is enough."""
    if jax.process_count() == 1 or (_watchdog is not None and _watchdog.stopped):
        return
    barrier("finished")
    if _watchdog is None:  # JAX's own shutdown barrier does the rest at exit
        return
    _watchdog.stop()
    if jax.process_index() == 0:
        client, deadline = _client(), time.time() + timeout_s
        others = list(range(jax.process_count()))
        while time.time() < deadline and set(client.get_live_nodes(others)) != {0}:
            time.sleep(0.05)
    jax.distributed.shutdown()


def report_failure(message: str) -> None:
    """Tells the other processes that this one is stopping with `message` (one line)."""
    client = _client()
    if client is None or jax.process_count() == 1 or _watchdog is None:
        return
    try:
        client.key_value_set(f"{_KEY}/failed/{jax.process_index()}", message)
    except Exception:  # noqa: BLE001 - the service may be gone already; nothing to tell
        return
    time.sleep(2 * _watchdog.period_s)  # the others' watchdogs read it before we go


def blame_another_process(err: BaseException) -> None:
    """When a runtime error (a collective or a barrier that failed) may come from another
    process having died, waits for the watchdog to notice it, which then ends this process
    naming that one; returns when no other process is to blame."""
    if _watchdog is None or _watchdog.stopped or not isinstance(err, jax.errors.JaxRuntimeError):
        return
    time.sleep(_env_seconds("MMX_HEARTBEAT_TIMEOUT_S", 20) + 3 * _watchdog.period_s)


def exit_after_failure(code: int) -> None:
    """Ends a failed process of a multi-process run without JAX's shutdown barrier (which
    would wait for the others); a single process exits normally."""
    if jax.process_count() > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(code)
    sys.exit(code)


def barrier(name: str) -> None:
    """Waits until every process reaches `name` (no-op for one process)."""
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils  # noqa: PLC0415

    multihost_utils.sync_global_devices(f"{_KEY}/{name}")


def gather_json(value: Any) -> list[Any]:
    """Every process's `value` (JSON-serialisable), in process order, on every process (a
    collective: all processes must call it at the same point)."""
    if jax.process_count() == 1:
        return [json.loads(json.dumps(value, default=str))]
    import numpy as np  # noqa: PLC0415
    from jax.experimental import multihost_utils  # noqa: PLC0415

    data = np.frombuffer(json.dumps(value, sort_keys=True, default=str).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.int32(len(data)))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:len(data)] = data
    rows = np.asarray(multihost_utils.process_allgather(padded))
    return [json.loads(row[:size].tobytes()) for row, size in zip(rows, sizes, strict=True)]


def any_process(flag: bool) -> bool:
    """True on every process when `flag` is True on any of them (a collective)."""
    return any(gather_json(bool(flag)))


def agree(name: str, facts: dict[str, Any]) -> None:
    """Raises `ProcessMismatchError` on every process when the processes' `facts` differ,
    naming the facts and the processes (a collective; a no-op for one process).

    `facts` maps a short description ("config key optimizer.lr", "data file") to a
    JSON-serialisable value.
    """
    if jax.process_count() == 1:
        return
    everyone = gather_json(facts)
    reference = everyone[0]
    differing = []
    for p, theirs in enumerate(everyone[1:], 1):
        for key in sorted(set(reference) | set(theirs)):
            if reference.get(key) != theirs.get(key):
                differing.append(f"{key}: process 0 has {_short(reference.get(key))}, "
                                 f"process {p} has {_short(theirs.get(key))}")
    if differing:
        raise ProcessMismatchError(
            f"the {jax.process_count()} processes were started differently ({name}): "
            + "; ".join(differing[:6]) + ("; ..." if len(differing) > 6 else "")
            + ". Start every process with the same command, config and data")


def _short(value: Any, width: int = 60) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= width else text[:width - 3] + "..."
