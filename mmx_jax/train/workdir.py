"""A training workdir: one owner at a time, one config, paths that resolve from anywhere.

    workdir/.lock          held (flock) by the train.py that owns the workdir; says who
    workdir/data.json      what using the trained model needs of its data: shapes, scaler
                           statistics, column and class names, the series' frequency
    workdir/config.json    the resolved config; a re-run may only extend the run
                           (`EXTENSIBLE_KEYS`), anything else is refused before the workdir
                           is touched
    workdir/logs/          one log file per process and entry point (train.0.log, ...),
                           tracebacks included; written only once the workdir is claimed

A re-run of the same command resumes. Keys a re-run may change (`EXTENSIBLE_KEYS`): the
length of the run (train.num_epochs, patience, time limit), how often it logs and saves,
where the data is read from and how it is placed on devices; with a cosine schedule a new
train.num_epochs also stretches the rest of the schedule. Every other key changes the model,
the data or the optimizer, and would mix two runs in one workdir.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import logging
import os
import pathlib
import socket
import sys
import tempfile
import time
from typing import Any

import jax
import ml_collections

from mmx_jax.errors import UsageError
from mmx_jax.train import distributed
from mmx_jax.train.faults import kill_point

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
DATA_CARD = "data.json"  # what using the model needs of its data (Task.describe)
LOCK_FILE = ".lock"

# Config keys a re-run may change (a key ending in "." stands for all keys under it).
EXTENSIBLE_KEYS = (
    "train.num_epochs", "train.patience", "train.time_limit_s", "train.log_every_steps",
    "train.checkpoint_every_steps", "train.keep_checkpoints", "data.data_dir",
    "data.cache_dir", "data.workers", "data.eval_batch_size", "mesh.", "sharding.",
    "model.scan_impl", "model.scan_layout", "eval.",
)
# Sources given as paths: a forecasting CSV, or an image folder/archive/idx folder after
# its "kind:" prefix.
_PATH_KINDS = ("folder", "archive", "idx")


_run_log: RunLog | None = None


class WorkdirBusyError(RuntimeError):
    """Another train.py holds the workdir."""


class ConfigChangedError(ValueError):
    """A re-run's config changes the model, data or optimizer of the workdir's run."""


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Writes `text` to `path` so that a reader (or a kill) never sees half a file."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    """The resolved config a run saved in its workdir."""
    path = pathlib.Path(workdir) / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {workdir} the workdir of a train.py "
                                "run?")
    try:
        return ml_collections.ConfigDict(json.loads(path.read_text()))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); it was not written by "
                         "train.py, or was edited by hand") from None


# -- paths ----------------------------------------------------------------------------------

def _path_source(config) -> tuple[str, str] | None:
    """(prefix, path) when `config.data.name` is a path ("" prefix for a CSV), else None."""
    from mmx_jax.data.forecasting import looks_like_path  # noqa: PLC0415

    name = str(config.data.name)
    kind, sep, rest = name.partition(":")
    if sep and kind in _PATH_KINDS:
        return f"{kind}:", rest
    if config.task == "forecasting" and looks_like_path(name):
        return "", name
    return None


def resolve_data_paths(config) -> None:
    """Makes the data paths of `config` absolute (in place), so that the saved config works
    from any directory: a path source in data.name, data.data_dir and data.cache_dir."""
    source = _path_source(config)
    if source is not None:
        prefix, path = source
        config.data.name = prefix + os.path.abspath(os.path.expanduser(path))
    for key in ("data_dir", "cache_dir"):
        value = config.data.get(key)
        if value:
            config.data[key] = os.path.abspath(os.path.expanduser(value))


def repoint_data(config, data_dir: str | os.PathLike) -> None:
    """Points every data source of `config` at `data_dir` (in place): data.data_dir becomes
    it, and a path source (a CSV, an image folder, archive or idx folder) is looked for there
    by its file or folder name (or is `data_dir` itself when the names match)."""
    data_dir = os.path.abspath(os.path.expanduser(os.fspath(data_dir)))
    if not os.path.isdir(data_dir):
        raise UsageError(f"--data_dir {data_dir!r} is not a folder")
    config.data.data_dir = data_dir
    source = _path_source(config)
    if source is None:
        return
    prefix, path = source
    base = os.path.basename(os.path.normpath(path))
    candidate = (data_dir if os.path.basename(data_dir) == base
                 else os.path.join(data_dir, base))
    if not os.path.exists(candidate):
        raise FileNotFoundError(f"--data_dir {data_dir!r}: the run's data {base!r} (saved as "
                                f"{path!r}) is not there")
    config.data.name = prefix + candidate


# -- config changes ---------------------------------------------------------------------------

def flat_config(config) -> dict[str, Any]:
    """A config (or its JSON dict) as {"dotted.key": value}, values as JSON has them."""
    tree = json.loads(config.to_json_best_effort()) if hasattr(config, "to_json_best_effort") \
        else config
    out: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}{key}.", value)
        else:
            out[prefix[:-1]] = node

    walk("", tree)
    return out


def _extensible(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in EXTENSIBLE_KEYS)


def config_changes(saved, new) -> tuple[list[str], list[str]]:
    """(refused, allowed): the differing keys of two configs, as "key: old -> new"."""
    old, cur = flat_config(saved), flat_config(new)
    refused, allowed = [], []
    for key in sorted(set(old) | set(cur)):
        if old.get(key, "<absent>") != cur.get(key, "<absent>"):
            line = (f"{key}: {json.dumps(old.get(key, '<absent>'))} -> "
                    f"{json.dumps(cur.get(key, '<absent>'))}")
            (allowed if _extensible(key) else refused).append(line)
    return refused, allowed


class RunLog(logging.Handler):
    """An entry point's log: kept in memory until the workdir is known and owned
    (`attach`), then workdir/logs/<entry>.<process>.log, appended to by every run."""

    def __init__(self, entry: str):
        super().__init__(logging.INFO)
        self.entry = entry
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname).1s %(name)s: "
                                            "%(message)s"))
        self.path: str | None = None
        self._file = None
        self._buffer: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        line = self.format(record) + "\n"
        if self._file is None:
            self._buffer.append(line)
        else:
            self._file.write(line)
            self._file.flush()

    def attach(self, workdir: str | os.PathLike) -> None:
        folder = os.path.join(os.fspath(workdir), "logs")
        os.makedirs(folder, exist_ok=True)
        self.path = os.path.join(folder, f"{self.entry}.{jax.process_index()}.log")
        self._file = open(self.path, "a")  # noqa: SIM115 - open for the life of the process
        self._file.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} process id {os.getpid()}: "
                         f"{' '.join(sys.argv)}\n" + "".join(self._buffer))
        self._file.flush()
        self._buffer.clear()

    def write_traceback(self, text: str) -> str:
        """Writes `text` to the log file (a temporary one before `attach`); returns its path."""
        if self._file is None:
            fd, self.path = tempfile.mkstemp(prefix=f"mmx_jax-{self.entry}-", suffix=".log")
            self._file = os.fdopen(fd, "w")
            self._file.write("".join(self._buffer))
            self._buffer.clear()
        self._file.write(text)
        self._file.flush()
        return self.path


def install_run_log(entry: str) -> RunLog:
    """Starts the log of an entry point (see `RunLog`) on the root logger."""
    global _run_log
    _run_log = RunLog(entry)
    logging.getLogger().addHandler(_run_log)
    return _run_log


def attach_log(workdir: str | os.PathLike) -> None:
    """Sends the running entry point's log to `workdir` (a no-op outside an entry point, or
    once attached)."""
    if _run_log is not None and _run_log.path is None:
        _run_log.attach(workdir)


# -- ownership --------------------------------------------------------------------------------

class WorkdirLock:
    """An exclusive `flock` on workdir/.lock, held for the life of the process.

    The kernel drops it when the process ends however it ends, so a killed run leaves no
    stale lock. The file names the holder (process id, host, start time) for the message of
    a second run. Works on local disks and NFSv4; where the file system has no locks, a
    warning says so and the run goes on unguarded.
    """

    def __init__(self, workdir: pathlib.Path):
        self.path = workdir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise WorkdirBusyError(
                f"workdir {self.path.parent} is in use by another run ({holder}); wait for "
                "it to end, stop it, or choose another --workdir") from None
        except OSError as err:  # no locks on this file system
            log.warning("cannot lock %s (%s): nothing stops a second run on this workdir",
                        self.path, err)
        os.ftruncate(fd, 0)
        started = datetime.datetime.now().isoformat(timespec="seconds")
        os.write(fd, (f"process id {os.getpid()} on host {socket.gethostname()}, started "
                      f"{started}: {' '.join(sys.argv)[:300]}\n").encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@contextlib.contextmanager
def claim_workdir(config, workdir: str | os.PathLike):
    """Owns `workdir` for a training run: every process agrees on the config, process 0 takes
    the lock, the config is checked against the saved one and saved (resolved paths).

    Yields the absolute workdir. Raises `WorkdirBusyError` or `ConfigChangedError` (on every
    process) before anything in the workdir is written.
    """
    workdir = pathlib.Path(workdir).absolute()
    if workdir.exists() and not workdir.is_dir():
        raise UsageError(f"--workdir {str(workdir)!r} is a file, not a folder")
    resolve_data_paths(config)
    distributed.agree("config and workdir", {"workdir": str(workdir),
                                             **{f"config key {k}": v
                                                for k, v in flat_config(config).items()}})
    check_config(config, workdir)  # before the lock: a refused run writes nothing
    lock = WorkdirLock(workdir)
    busy = None
    if jax.process_index() == 0:  # the lock is process 0's; the others learn the outcome
        try:
            lock.acquire()
        except WorkdirBusyError as err:
            busy = str(err)
    busy = distributed.gather_json(busy)[0]
    if busy:
        raise WorkdirBusyError(busy)
    try:
        check_config(config, workdir, log_changes=True)  # again: a run may have ended since
        if jax.process_index() == 0:
            atomic_write_text(workdir / CONFIG_FILE, config.to_json_best_effort(indent=2) + "\n")
        attach_log(workdir)
        kill_point("claimed")
        yield workdir
    finally:
        lock.release()


def _has_checkpoints(workdir: pathlib.Path) -> bool:
    folder = workdir / "checkpoints"
    return folder.is_dir() and any(p.name.isdigit() for p in folder.iterdir())


def check_config(config, workdir: pathlib.Path, *, log_changes: bool = False) -> None:
    """Raises `ConfigChangedError` when `config` changes the model, data or optimizer of the
    run saved in `workdir` (which has checkpoints); logs the allowed changes."""
    path = workdir / CONFIG_FILE
    if not path.exists():
        return
    if not _has_checkpoints(workdir):
        if log_changes:
            log.info("%s has no checkpoint yet: starting over with this config", workdir)
        return
    refused, allowed = config_changes(load_config(workdir), config)
    if refused:
        raise ConfigChangedError(
            f"the config differs from the one this workdir's run was trained with ({path}) "
            f"in {len(refused)} key(s) that change the model, data or optimizer: "
            f"{'; '.join(refused)}. Use a new --workdir, or re-run with the saved values (a "
            "re-run may change only: "
            f"{', '.join(k + ('*' if k.endswith('.') else '') for k in EXTENSIBLE_KEYS)})")
    if log_changes:
        for line in allowed:
            log.info("config change kept for this run: %s", line)
