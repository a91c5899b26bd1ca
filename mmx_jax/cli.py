"""What every entry point (train.py, eval.py, ...) shares: flags, logging and the error contract.

    usage error (a flag, a config argument or key)  ->  usage line + one line, exit code 2
    any other error                                  ->  one line of cause, exit code 1
    Ctrl-C                                           ->  exit code 130

The traceback never reaches the terminal unless `--verbose` is given: it goes to the run's
log file (workdir/logs/<entry>.<process>.log, once the workdir is claimed; before that, a
file in the temporary folder, named in the message). With several processes the failing one
tells the others (`distributed.report_failure`), which stop with a line naming it.
"""

from __future__ import annotations

import logging
import sys
import traceback
from collections.abc import Callable

from absl import flags

from mmx_jax.train import distributed
from mmx_jax.train.config_args import explain_override_error
from mmx_jax.train.workdir import RunLog, install_run_log

flags.DEFINE_bool("verbose", False, "Print tracebacks (they always go to the log file).")

log = logging.getLogger(__name__)


class UsageError(ValueError):
    """A bad command line or config (exit code 2)."""


def _setup_logging(entry: str) -> RunLog:
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("%(asctime)s %(levelname).1s %(name)s: %(message)s",
                                           "%H:%M:%S"))
    root.handlers[:] = [console]
    _quiet_failed_restores(console)
    run_log = install_run_log(entry)
    for noisy in ("absl", "jax._src", "orbax", "jax._src.xla_bridge"):
        logging.getLogger(noisy).setLevel(logging.WARNING)  # orbax logs every file it writes
    return run_log


def _quiet_failed_restores(console: logging.Handler) -> None:
    """After a failed Orbax restore (a corrupt checkpoint, which the caller reports), the
    reads still pending finish on an asyncio loop Orbax has closed: each prints an "Event
    loop is closed" traceback as an unraisable exception, and asyncio logs the read errors
    again. Hundreds of lines that add nothing: they go to the log file only."""
    default = sys.unraisablehook

    def hook(unraisable):
        value = unraisable.exc_value
        if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
            log.debug("after a failed restore: %s", value)
            return
        default(unraisable)

    sys.unraisablehook = hook
    console.addFilter(lambda record: record.name != "asyncio")
    # Orbax warns that a read-only manager (eval.py) does not write: as it should not.
    console.addFilter(lambda record: not record.getMessage().startswith(
        "Given directory is read only"))


def _message(err: BaseException) -> str:
    """One line for an exception: ours carry their own; others get their type name."""
    text = " ".join(str(err).strip().split("\n")[:1]).strip() or type(err).__name__
    text = text if len(text) <= 600 else text[:597] + "..."
    if err.__class__.__module__.startswith("mmx_jax") or isinstance(
            err, (ValueError, FileNotFoundError, NotADirectoryError, KeyError)):
        return text.strip("'\"") if isinstance(err, KeyError) else text
    return f"{type(err).__name__}: {text}"


def _config_error(err: flags.Error) -> str:
    """The useful last line of a flag error (config files raise inside absl's parser)."""
    text = str(err).strip()
    if "Traceback" in text:  # a config file's get_config raised: its last line says why
        last = text.splitlines()[-1]
        return last.split(": ", 1)[-1] if ": " in last else last
    return text.splitlines()[0]


def main(entry: str, usage: str, body: Callable[[], int | None]) -> None:
    """Parses the flags and runs `body` under the error contract of the module docstring."""
    prog = f"{entry}.py"
    try:
        flags.FLAGS(sys.argv)
    except (flags.Error, OSError, KeyError, AttributeError, ValueError) as err:
        if isinstance(err, flags.Error):
            message = _config_error(err)
        elif isinstance(err, (KeyError, AttributeError)):  # --config.<unknown key>=...
            message = explain_override_error(err, sys.argv)
        else:
            message = _message(err)
        print(f"usage: {usage}\n{prog}: error: {message}", file=sys.stderr)
        sys.exit(2)
    run_log = _setup_logging(entry)
    verbose = flags.FLAGS.verbose
    try:
        distributed.initialize_distributed()
        code = body()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        distributed.exit_after_failure(130)
    except BaseException as err:  # noqa: BLE001 - every error ends in one line
        if isinstance(err, SystemExit):
            raise
        distributed.blame_another_process(err)
        message = _message(err)
        where = run_log.write_traceback(traceback.format_exc())
        if verbose:
            traceback.print_exc()
        if isinstance(err, UsageError):
            print(f"usage: {usage}", file=sys.stderr)
        print(f"{prog}: error: {message}", file=sys.stderr)
        if not verbose:
            print(f"{prog}: (the traceback is in {where}; --verbose prints it)",
                  file=sys.stderr)
        distributed.report_failure(message)
        distributed.exit_after_failure(2 if isinstance(err, UsageError) else 1)
    distributed.finish()
    sys.exit(code or 0)
