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

import contextlib
import logging
import os
import re
import sys
import traceback
from collections.abc import Callable

from absl import flags

from mmx_jax.errors import UsageError
from mmx_jax.train import distributed
from mmx_jax.train.config_args import explain_override_error
from mmx_jax.train.workdir import RunLog, install_run_log

flags.DEFINE_bool("verbose", False, "Print tracebacks (they always go to the log file).")

log = logging.getLogger(__name__)


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
    reads still pending finish on an asyncio loop Orbax has closed or are dropped unawaited:
    each prints a traceback as an unraisable exception, and asyncio logs the read errors
    again. Hundreds of lines that add nothing: unraisable exceptions and asyncio's log go to
    the log file only."""
    default = sys.unraisablehook

    quiet = logging.getLogger("mmx_jax.unraisable")

    def hook(unraisable):
        quiet.warning("unraisable exception in %r: %s", unraisable.object,
                      unraisable.exc_value)

    del default
    sys.unraisablehook = hook
    console.addFilter(lambda record: record.name not in ("asyncio", quiet.name))
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


def _entry_flags() -> list:
    """The flags of the running entry point (its own and --verbose)."""
    own = flags.FLAGS.get_key_flags_for_module(sys.modules["__main__"])
    return [f for f in own if not f.name.startswith("config.")] + [flags.FLAGS["verbose"]]


def _flag_error(err: flags.Error) -> str:
    """One line for a flag error (config files raise inside absl's parser)."""
    text = str(err).strip()
    if "Traceback" in text:  # a config file's get_config raised: its last line says why
        last = text.splitlines()[-1]
        return last.split(": ", 1)[-1] if ": " in last else last
    if isinstance(err, flags.UnrecognizedFlagError):
        known = [f"--{flag.name}" for flag in _entry_flags()]
        return (f"unknown flag --{err.flagname}; the flags are {', '.join(known)} "
                "(--help describes them)")
    required = re.match(r"flag --(\w+)=None: Flag --\w+ must have a value other than None",
                        text)
    if required:
        return f"--{required.group(1)} is required"
    return text.splitlines()[0]


_HELP_FLAGS = ("-h", "--help", "-help", "--helpfull", "--helpshort")


def _config_spec(argv: list[str]) -> str | None:
    """The value of --config on a command line, if any."""
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _help(prog: str, usage: str, doc: str) -> str:
    """The entry point's help: usage, docstring, flags and, with --config, that config file's
    arguments (its docstring) and keys."""
    lines = [f"usage: {usage}", "", doc.strip(), "", "flags:"]
    for flag in _entry_flags():
        default = "" if flag.default is None else f" (default: {flag.default!r})"
        lines.append(f"  --{flag.name}: {flag.help}{default}")
    spec = _config_spec(sys.argv)
    if "config" not in flags.FLAGS:
        return "\n".join(lines)
    lines += ["", "Config files are Python (configs/*.py): the arguments after the colon are",
              "documented in the file's docstring, and every config key can be set with",
              "--config.<key>=<value>. With --config=<file>, --help shows both."]
    if spec:
        from mmx_jax.train.config_args import load_config_file  # noqa: PLC0415
        from mmx_jax.train.workdir import flat_config  # noqa: PLC0415

        path = spec.partition(":")[0]
        try:
            config = load_config_file(spec)
        except (OSError, ValueError) as err:
            return "\n".join(lines + ["", f"{prog}: cannot read --config={spec}: {err}"])
        module_doc = (_module_doc(path) or "").strip()
        lines += ["", f"{path}:", module_doc, "", "keys (with this command line's values):"]
        lines += [f"  {key} = {value!r}" for key, value in flat_config(config).items()]
    return "\n".join(lines)


def _module_doc(path: str) -> str | None:
    import ast  # noqa: PLC0415

    try:
        return ast.get_docstring(ast.parse(open(path).read()))
    except (OSError, SyntaxError):
        return None


def _parse_flags(prog: str, usage: str, doc: str) -> list[str]:
    """absl flag parsing with the error contract (usage errors exit 2) and our --help."""
    if any(arg in _HELP_FLAGS for arg in sys.argv[1:]):
        argv = [a for a in sys.argv if a not in _HELP_FLAGS]
        # Parsed where possible (the help shows the config the rest of the line makes).
        with contextlib.suppress(Exception):
            flags.FLAGS(argv, known_only=True)
        print(_help(prog, usage, doc))
        sys.exit(0)
    spec = _config_spec(sys.argv)
    if spec is not None:
        path = spec.partition(":")[0]
        if not path or not os.path.isfile(path):
            print(f"usage: {usage}\n{prog}: error: --config: config file {path!r} not found "
                  f"(the config files are in configs/: tsm2.py, vim2.py, viqs.py)",
                  file=sys.stderr)
            sys.exit(2)
    try:
        return flags.FLAGS(sys.argv)[1:]
    except (flags.Error, OSError, KeyError, AttributeError, ValueError) as err:
        if isinstance(err, flags.Error):
            message = _flag_error(err)
        elif isinstance(err, (KeyError, AttributeError)):  # --config.<unknown key>=...
            message = explain_override_error(err, sys.argv)
        else:
            message = _message(err)
        print(f"usage: {usage}\n{prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def main(entry: str, usage: str, body: Callable[..., int | None], doc: str = "",
         takes_args: bool = False) -> None:
    """Parses the flags and runs `body` under the error contract of the module docstring;
    with `takes_args`, `body(args)` gets the arguments that are not flags."""
    prog = f"{entry}.py"
    args = _parse_flags(prog, usage, doc)
    if args and not takes_args:
        print(f"usage: {usage}\n{prog}: error: unexpected argument {args[0]!r} (only flags, "
              "--help lists them)", file=sys.stderr)
        sys.exit(2)
    run_log = _setup_logging(entry)
    verbose = flags.FLAGS.verbose
    try:
        distributed.initialize_distributed()
        code = body(args) if takes_args else body()
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
        usage_error = isinstance(err, UsageError)
        if usage_error:
            print(f"usage: {usage}", file=sys.stderr)
        print(f"{prog}: error: {message}", file=sys.stderr)
        if not verbose and not usage_error:
            print(f"{prog}: (the traceback is in {where}; --verbose prints it)",
                  file=sys.stderr)
        distributed.report_failure(message)
        distributed.exit_after_failure(2 if usage_error else 1)
    distributed.finish()
    sys.exit(code or 0)
