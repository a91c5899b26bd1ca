r"""Searches the quick-start config of configs/tsm2.py on ETTh1's validation split alone.

    python -m research.quickstart_search run --out runs/quickstart
    python -m research.quickstart_search run --out runs/quickstart \
        --only s7_512_e2_lr3e-3_x1n2 --repeat 3          # wall times of one, three times
    python -m research.quickstart_search table --out runs/quickstart
    python -m research.quickstart_search table --runs results/quickstart_search.jsonl

`run` trains each candidate with train.py, the base config and the candidate's overrides,

    python train.py --config configs/tsm2.py:quickstart=false,seq_len=336 \
        --workdir <out>/<candidate> --config.<key>=<value>

one process at a time (each has the machine to itself, as a user's job would), and appends
one JSON line per run to <out>/search.jsonl: the wall time of the whole command (start-up,
compilation, training, validation, checkpoints and the test of the best checkpoint), its
processor time (user + system, which other jobs on a shared machine inflate less than the
wall time), the machine's load average before it, the best step and validation MSE, and the
test MSE and MAE of results.json. A candidate already in the file is skipped unless --repeat
asks for more runs of it (a workdir is removed before each run, so nothing resumes).

`table` prints the runs and the choice: among the candidates whose median wall time is at
most --budget seconds, the lowest validation MSE (seed 0; equal-validation ties go to the
faster). Test metrics are printed next to it and never used to choose.

Candidates are overrides of the base, the quick start's plain defaults. `s7` is the recipe
configs/tsm2.py's `paper` setting chose on validation for ETTh1 H=96 (stage 7 of
research/tsm2_reproduce.py: d_model 16, 1 layer, N = 4, no dropout, residual branches scaled
from 0, the mixers at 0.01 x the learning rate 1e-3, weight decay 0.1), at input 336 or 512
and for fewer epochs than its 6; every candidate evaluates in batches of 32 windows (on a
CPU, batches of 256 take about twice as long per window: benchmarks/README.md) and uses the
scan `auto` picks.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import shutil
import statistics
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]

# The candidates are overrides of the quick start's plain defaults, before its recipe was
# chosen (input 336, d_model 16, 1 layer, E = 2 d_model, N = 4, dropout 0.1, lr 1e-3, 4 epochs).
BASE = "configs/tsm2.py:quickstart=false,seq_len=336"
COMMON = {"model.scan_impl": "auto", "data.eval_batch_size": 32}
S7 = {"model.d_model": 16, "model.num_layers": 1, "model.state_dim": 4, "model.dropout": 0.0,
      "model.layer_scale": 0.0, "optimizer.lr": 1e-3, "optimizer.weight_decay": 0.1,
      "optimizer.lr_scale_rules": (("^mixer/", 0.01),)}
CANDIDATES: dict[str, dict] = {
    "default": {},  # the quick start before this search (input 336, d_model 16, 4 epochs)
    **{f"s7_{n}_e{e}": {**S7, "data.seq_len": n, "train.num_epochs": e}
       for n in (336, 512) for e in (2, 3)},
    # A higher learning rate for fewer epochs: in the runs above the validation MSE was still
    # falling at the last epoch.
    **{f"s7_{n}_e{e}_lr{lr}": {**S7, "data.seq_len": n, "train.num_epochs": e,
                               "optimizer.lr": float(lr)}
       for n in (336, 512) for e in (2, 3) for lr in ("2e-3", "3e-3")},
    # Narrower mixers (inner width E = d_model, N = 2 states): the mixers, at 0.01 x the
    # learning rate behind a scale that starts at 0, are most of the step's time.
    **{f"s7_512_e{e}_lr{lr}_x1n2": {**S7, "data.seq_len": 512, "train.num_epochs": e,
                                    "optimizer.lr": float(lr), "model.expand": 1,
                                    "model.state_dim": 2}
       for e in (2, 3) for lr in ("2e-3", "3e-3")},
}


def flag(key: str, value) -> str:
    return f"--config.{key}={value!r}" if isinstance(value, tuple) else f"--config.{key}={value}"


def read_runs(path: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def run_one(name: str, out: pathlib.Path) -> dict:
    workdir = out / name
    shutil.rmtree(workdir, ignore_errors=True)
    overrides = {**COMMON, **CANDIDATES[name]}
    cmd = [sys.executable, "train.py", "--config", BASE, "--workdir", str(workdir),
           *(flag(k, v) for k, v in overrides.items())]
    load = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if done.returncode:
        sys.exit(f"{name} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    results = json.loads((workdir / "results.json").read_text())
    return {"candidate": name, "overrides": {k: list(v) if isinstance(v, tuple) else v
                                             for k, v in overrides.items()},
            "wall_s": wall, "cpu_s": cpu, "load_before": load, "load_after": os.getloadavg()[0],
            **results}


def table(runs: list[dict], budget: float) -> None:
    by_name: dict[str, list[dict]] = {}
    for r in runs:
        by_name.setdefault(r["candidate"], []).append(r)
    print("| candidate | runs | wall s (median, each) | CPU s | load before | steps | best step | "
          "val MSE | test MSE | test MAE |\n|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for name, rs in by_name.items():
        wall = statistics.median(r["wall_s"] for r in rs)
        first = rs[0]
        rows.append((name, wall, first["best_val_mse"]))
        walls = ", ".join(f"{r['wall_s']:.0f}" for r in rs)
        loads = ", ".join(f"{r['load_before']:.1f}" for r in rs)
        cpu = ", ".join(f"{r['cpu_s']:.0f}" for r in rs if "cpu_s" in r) or "-"
        print(f"| {name} | {len(rs)} | {wall:.0f} ({walls}) | {cpu} | {loads} | {first['steps']} | "
              f"{first['best_step']} | {first['best_val_mse']:.4f} | {first['test_mse']:.4f} | "
              f"{first['test_mae']:.4f} |")
    fitting = [r for r in rows if r[1] <= budget]
    if fitting:
        name = min(fitting, key=lambda r: (round(r[2], 4), r[1]))[0]
        print(f"\nchosen on validation among the {len(fitting)} candidates within {budget:.0f} s: "
              f"{name} {CANDIDATES.get(name, '')}")
    else:
        print(f"\nno candidate within {budget:.0f} s")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("run", "table"))
    parser.add_argument("--out", default=pathlib.Path("runs/quickstart"), type=pathlib.Path,
                        help="workdirs and search.jsonl")
    parser.add_argument("--runs", default=None, type=pathlib.Path,
                        help="the runs file (default <out>/search.jsonl; the search recorded "
                             "here: results/quickstart_search.jsonl)")
    parser.add_argument("--only", default=None, help="comma-separated candidate names")
    parser.add_argument("--repeat", type=int, default=1, help="runs wanted per candidate")
    parser.add_argument("--budget", type=float, default=60.0, help="wall seconds")
    args = parser.parse_args()
    runs = args.runs or args.out / "search.jsonl"
    if args.command == "run":
        args.out.mkdir(parents=True, exist_ok=True)
        names = args.only.split(",") if args.only else list(CANDIDATES)
        unknown = [n for n in names if n not in CANDIDATES]
        if unknown:
            parser.error(f"unknown candidates {unknown}; known: {', '.join(CANDIDATES)}")
        for name in names:
            while sum(r["candidate"] == name for r in read_runs(runs)) < args.repeat:
                row = run_one(name, args.out)
                with open(runs, "a") as f:
                    f.write(json.dumps(row) + "\n")
                print(f"{name}: {row['wall_s']:.0f} s (load {row['load_before']:.1f}), val "
                      f"{row['best_val_mse']:.4f}, test {row['test_mse']:.4f}", flush=True)
    table(read_runs(runs), args.budget)


if __name__ == "__main__":
    main()
