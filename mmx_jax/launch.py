r"""Starts one JAX process per GPU (or per group of simulated CPU devices) on this machine.

    python -m mmx_jax.launch --processes 2 -- train.py --config configs/tsm2.py --workdir runs/t
    python -m mmx_jax.launch --processes 8 -- eval.py --workdir runs/t        # 8 GPUs
    python -m mmx_jax.launch --processes 2 --devices-per-process 2 --platform cpu -- train.py ...

In the spirit of torchrun: it picks a free port for JAX's coordinator, gives each process its
JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (read by
`mmx_jax.train.distributed.initialize_distributed`), and its devices: on GPUs, its own
`--devices-per-process` cards (CUDA_VISIBLE_DEVICES); on a CPU, that many simulated devices.
Each process's output is forwarded with a "[<process>] " prefix. When one process fails, the
others are stopped (SIGTERM, then SIGKILL after `--grace` seconds) and the launcher exits with
the first failure's exit code (128 + N for a process killed by signal N). Ctrl-C and SIGTERM
are passed on to every process.

The command after "--" is a Python script (run with this interpreter), "-m <module> ...", or
any program. Several machines: start the entry point on each with the JAX variables instead
(README, "Pods and several hosts").
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
    """A TCP port that was free a moment ago on this machine."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gpu_count() -> int:
    """GPUs visible to this launcher (CUDA_VISIBLE_DEVICES, else nvidia-smi), 0 if none."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip()])
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(line.startswith("GPU ") for line in out.stdout.splitlines())


def _gpu_ids() -> list[str]:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip()]
    return [str(i) for i in range(_gpu_count())]


def _platform(requested: str) -> str:
    if requested != "auto":
        return requested
    if "cpu" in os.environ.get("JAX_PLATFORMS", "").lower().split(","):
        return "cpu"
    return "gpu" if _gpu_count() else "cpu"


def _with_device_count(xla_flags: str, count: int) -> str:
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", xla_flags).split()
    return " ".join([*flags, f"--xla_force_host_platform_device_count={count}"])


def process_envs(processes: int, devices_per_process: int | None, platform: str,
                 port: int, base: dict[str, str] | None = None) -> list[dict[str, str]]:
    """The environment of each process (see the module docstring)."""
    base = dict(os.environ if base is None else base)
    envs = []
    gpus = _gpu_ids() if platform == "gpu" else []
    per = devices_per_process or (max(1, len(gpus) // processes) if gpus else 1)
    if platform == "gpu" and processes * per > len(gpus):
        raise ValueError(f"{processes} processes x {per} GPUs need {processes * per} GPUs; "
                         f"{len(gpus)} are visible")
    for index in range(processes):
        env = dict(base, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                   JAX_NUM_PROCESSES=str(processes), JAX_PROCESS_ID=str(index),
                   PYTHONUNBUFFERED="1")
        if platform == "gpu":
            env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus[index * per:(index + 1) * per])
        else:
            env["JAX_PLATFORMS"] = "cpu"
            env["XLA_FLAGS"] = _with_device_count(base.get("XLA_FLAGS", ""), per)
        envs.append(env)
    return envs


def _command(args: list[str]) -> list[str]:
    if args[0] == "-m" or args[0].endswith(".py"):
        return [sys.executable, *args]
    return args


def _forward(stream, out, prefix: str) -> None:
    for line in iter(stream.readline, ""):
        out.write(prefix + line if line.strip() else line)
        out.flush()
    stream.close()


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


class Launch:
    """The running processes: start, watch, stop."""

    def __init__(self, command: list[str], envs: list[dict[str, str]], grace_s: float):
        self.grace_s = grace_s
        self.procs: list[subprocess.Popen] = []
        self.threads: list[threading.Thread] = []
        width = len(str(len(envs) - 1))
        for index, env in enumerate(envs):
            proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, bufsize=1,
                                    errors="replace")
            self.procs.append(proc)
            prefix = f"[{index:>{width}}] "
            for stream, out in ((proc.stdout, sys.stdout), (proc.stderr, sys.stderr)):
                thread = threading.Thread(target=_forward, args=(stream, out, prefix),
                                          daemon=True)
                thread.start()
                self.threads.append(thread)

    def signal_all(self, sig: int) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(sig)

    def stop_all(self) -> None:
        """SIGTERM to the running processes, SIGKILL to those still running after grace."""
        self.signal_all(signal.SIGTERM)
        deadline = time.time() + self.grace_s
        while time.time() < deadline and any(p.poll() is None for p in self.procs):
            time.sleep(0.1)
        self.signal_all(signal.SIGKILL)

    def wait(self) -> int:
        """Waits for all processes; returns the launcher's exit code."""
        failure: tuple[int, int] | None = None
        while True:
            codes = [p.poll() for p in self.procs]
            if failure is None:
                failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
                if failed:
                    failure = failed[0]
                    if any(c is None for c in codes):
                        print(f"launch: process {failure[0]} {_describe(failure[1])}; "
                              "stopping the others", file=sys.stderr, flush=True)
                        self.stop_all()
            if all(c is not None for c in codes):
                break
            time.sleep(0.1)
        for thread in self.threads:
            thread.join(timeout=5)
        if failure is None:
            return 0
        index, code = failure
        print(f"launch: process {index} {_describe(code)}", file=sys.stderr, flush=True)
        return 128 - code if code < 0 else code


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" in argv:
        split = argv.index("--")
        ours, command = argv[:split], argv[split + 1:]
    else:
        ours, command = argv, []
    parser = argparse.ArgumentParser(
        prog="python -m mmx_jax.launch",
        usage="python -m mmx_jax.launch --processes N [--devices-per-process K] "
              "[--platform auto|cpu|gpu] [--port P] [--grace S] -- <script.py> [args ...]",
        description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, required=True, help="processes to start")
    parser.add_argument("--devices-per-process", type=int, default=None,
                        help="GPUs (or simulated CPU devices) per process; GPUs default to "
                             "all visible ones shared out, CPUs to 1")
    parser.add_argument("--platform", choices=("auto", "cpu", "gpu"), default="auto")
    parser.add_argument("--port", type=int, default=0, help="coordinator port (0: a free one)")
    parser.add_argument("--grace", type=float, default=10.0,
                        help="seconds between SIGTERM and SIGKILL when stopping processes")
    args = parser.parse_args(ours)
    if args.processes < 1:
        parser.error(f"--processes={args.processes} must be at least 1")
    if args.devices_per_process is not None and args.devices_per_process < 1:
        parser.error(f"--devices-per-process={args.devices_per_process} must be at least 1")
    if not command:
        parser.error("give the command to start after --, e.g. -- train.py --config ...")
    command = _command(command)
    try:
        envs = process_envs(args.processes, args.devices_per_process,
                            _platform(args.platform), args.port or free_port())
    except ValueError as err:
        parser.error(str(err))
    launch = Launch(command, envs, args.grace)

    def forward(signum, frame):
        launch.signal_all(signum)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    return launch.wait()


if __name__ == "__main__":
    sys.exit(main())
