r"""Makes the pretrained zoo's entries (mmx_jax/models/weights/) from training runs.

    python -m research.make_zoo train --pairs etth2:96,etth2:192 \
        --data-dir ../shared/data/timeseries --runs runs/zoo      # train.py, then add
        [--workers 8]                                             # runs at a time (GPU)
    python -m research.make_zoo add --workdir runs/zoo/etth2_96 --name tsm2_etth2_96 \
        --command "python train.py ..." --date 2026-12-05
    python -m research.make_zoo recast [NAME ...] [--dtype float16]  # re-store the weights
    python -m research.make_zoo check                             # every entry's test MSE
    python -m research.make_zoo table [--write]   # the zoo's table (into results/checkpoints)

`train` runs `configs/tsm2.py:paper,dataset=<d>,horizon=<h>,seed=0` (the chosen configuration
of results/tsm2.md, seed 0) for each pair with train.py, then `add`s its best checkpoint.
`add` writes the weights (float16, no optimizer state) and the card: data set, split, config
and command, seed, validation and test metrics, the seed-0 test MSE recorded in
results/tsm2_runs.jsonl, hardware and date, and the test MSE of the weights as stored.
float16 halves the zoo (all 24 entries take about 31 MB, not 63); it moves the test MSE by at
most 1e-5 of itself on the ETTh1 entries (bfloat16: 6e-5). `recast` re-stores entries in another
dtype and measures them again. `check` evaluates every TSM2 entry on its test split and compares
with its card.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import pathlib
import platform
import subprocess
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
RUNS = REPO / "results" / "tsm2_runs.jsonl"
PAPER_SPLIT = {"ett_hour": "Time-Series-Library: 12 / 4 / 4 months of hourly rows",
               "ett_minute": "Time-Series-Library: 12 / 4 / 4 months of 15-minute rows",
               "custom": "Time-Series-Library: 70 / 10 / 20 % of the rows"}


def hardware() -> str:
    """The CPU (and GPU, if JAX sees one) this process runs on."""
    import jax  # noqa: PLC0415

    cpu = platform.processor() or platform.machine()
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os  # noqa: PLC0415

    device = jax.devices()[0]
    gpu = "" if device.platform == "cpu" else f", {device.device_kind}"
    return f"{os.cpu_count()}-core {cpu}{gpu}"


def recorded_seed0(dataset: str, horizon: int) -> dict | None:
    """The seed-0 run of the chosen candidate of (dataset, horizon) in results/tsm2_runs.jsonl."""
    return _recorded_seed0_runs().get((dataset, horizon))


@functools.cache
def _recorded_seed0_runs() -> dict[tuple[str, int], dict]:
    """results/tsm2_runs.jsonl read once: (dataset, horizon) -> its chosen seed-0 run."""
    from research import tsm2_reproduce as driver  # noqa: PLC0415

    rows = driver.read_runs(RUNS)
    chosen = driver.winners(rows)
    return {(row["dataset"], row["horizon"]): row for row in rows
            if row.get("seed") == 0 and "error" not in row
            and chosen.get((row.get("dataset"), row.get("horizon"))) == row.get("candidate")}


def add(workdir: pathlib.Path, name: str, command: str, date: str, hw: str,
        dtype: str = "float16", data_dir: str | None = None) -> pathlib.Path:
    import jax.numpy as jnp  # noqa: PLC0415

    from mmx_jax.inference import load_trained  # noqa: PLC0415
    from mmx_jax.models.pretrained import save_pretrained  # noqa: PLC0415
    from mmx_jax.train.tasks.base import model_spec  # noqa: PLC0415

    trained = load_trained(workdir, "best")
    config, card = trained.config, dict(trained.card)
    results = json.loads((workdir / "results.json").read_text())
    model_name, kwargs = model_spec(config, card["model_shapes"])
    if "dtype" in kwargs:
        kwargs["dtype"] = str(jnp.dtype(kwargs["dtype"]))
    kwargs["scan_impl"] = "auto"  # the same numbers; the Pallas kernel where there is a GPU
    dataset, horizon = config.data.name, config.data.pred_len
    card["source"] = (f"{dataset} (bundled with mmx_jax)" if dataset.lower() == "etth1"
                      else f"{dataset} (Time-Series-Library's file)")
    recorded = recorded_seed0(dataset, horizon)
    entry = {
        "name": name,
        "summary": f"TSM2 on {dataset}, input {config.data.seq_len}, horizon {horizon}",
        "dataset": dataset, "split": PAPER_SPLIT.get(card.get("layout"), ""),
        "seed": config.seed, "command": command, "hardware": hw, "date": date,
        "best_step": results["best_step"],
        "metrics": {k: v for k, v in results.items() if k.startswith(("best_val_", "test_"))},
        "recorded_seed0_test_mse": recorded["test_mse"] if recorded else None,
        "model": {"name": model_name, "kwargs": kwargs},
        # The data folder is the trainer's machine's: the card names the data set instead.
        "config": {**json.loads(config.to_json_best_effort()),
                   "data": {**json.loads(config.data.to_json_best_effort()), "data_dir": None}},
        "data": card,
    }
    save_pretrained(name, trained.model, entry, dtype=dtype)
    return measure_stored(name, data_dir or config.data.data_dir)


def measure_stored(name: str, data_dir: str | None) -> pathlib.Path:
    """Writes into entry `name`'s card the test MSE of its weights as stored (their dtype)."""
    from mmx_jax.inference import Forecaster  # noqa: PLC0415
    from mmx_jax.models.pretrained import WEIGHTS, pretrained_card  # noqa: PLC0415

    card = pretrained_card(name)
    card["stored_weights_test_mse"] = test_mse(Forecaster.from_pretrained(name), card, data_dir)
    path = WEIGHTS / f"{name}.json"
    path.write_text(json.dumps(card, indent=2) + "\n")
    return path


def cmd_recast(args) -> None:
    """Re-stores entries' weights as `--dtype` and measures their test MSE again."""
    from mmx_jax.models import pretrained as zoo  # noqa: PLC0415

    for name in args.names or zoo.list_pretrained():
        model, card = zoo.load_pretrained(name)
        if card["data"]["task"] != "forecasting":
            continue
        if np.dtype(args.dtype).itemsize > np.dtype(card.get("weights_dtype", "float32")).itemsize:
            print(f"{name}: stored as {card['weights_dtype']}; {args.dtype} would not bring back "
                  "the lost digits (retrain it)", flush=True)
            continue
        card.pop("sha256"), card.pop("weights_dtype", None)
        zoo.save_pretrained(name, model, card, dtype=args.dtype)
        card = json.loads(measure_stored(name, args.data_dir).read_text())
        print(f"{name}: {args.dtype}, test MSE {card['stored_weights_test_mse']:.6f} "
              f"(trained: {card['metrics']['test_mse']:.6f})", flush=True)


def cmd_add(args) -> None:
    path = add(pathlib.Path(args.workdir), args.name, args.command, args.date, args.hardware
               or hardware(), args.dtype, args.data_dir)
    print(path)


def cmd_train(args) -> None:
    """Trains the pairs (`--workers` at a time, each train.py's output to its log) and adds each
    run as it finishes."""
    import concurrent.futures  # noqa: PLC0415

    hw = hardware()
    jobs = []
    for pair in args.pairs.split(","):
        dataset, horizon = pair.split(":")
        workdir = pathlib.Path(args.runs) / f"{dataset}_{horizon}"
        spec = f"configs/tsm2.py:paper,dataset={dataset},horizon={horizon},seed=0"
        command = ["train.py", f"--config={spec}", f"--workdir={workdir}"]
        if args.data_dir:
            command.append(f"--config.data.data_dir={args.data_dir}")
        jobs.append((dataset, horizon, workdir if workdir.is_absolute() else REPO / workdir,
                     command))

    def train(job) -> float:
        *_, workdir, command = job
        workdir.mkdir(parents=True, exist_ok=True)
        started = time.time()
        with open(workdir.parent / f"{workdir.name}.log", "ab") as log:
            subprocess.run([sys.executable, *command], cwd=REPO, check=True, stdout=log,
                           stderr=subprocess.STDOUT)
        return time.time() - started

    with concurrent.futures.ThreadPoolExecutor(args.workers) as pool:
        futures = {pool.submit(train, job): job for job in jobs}
        for future in concurrent.futures.as_completed(futures):
            dataset, horizon, workdir, command = futures[future]
            try:
                seconds = future.result()
            except subprocess.CalledProcessError as err:
                print(f"{dataset}:{horizon} failed (rc {err.returncode}); see "
                      f"{workdir.parent / workdir.name}.log", flush=True)
                continue
            shown = " ".join(["python", *command]).replace(str(args.data_dir or "~"),
                                                            "<data folder>")
            path = add(workdir, f"tsm2_{dataset}_{horizon}", shown,
                       datetime.date.today().isoformat(), hw, args.dtype, args.data_dir)
            print(f"{dataset}:{horizon} trained in {seconds:.0f} s: {path}", flush=True)


def cmd_check(args) -> None:
    """Evaluates every TSM2 entry on its test split: MSE against its card."""
    from mmx_jax.inference import Forecaster  # noqa: PLC0415
    from mmx_jax.models.pretrained import list_pretrained, pretrained_card  # noqa: PLC0415

    print("| entry | test MSE (trained) | as stored (card) | now | recorded seed 0 |")
    print("|---|---|---|---|---|")
    for name in list_pretrained():
        card = pretrained_card(name)
        if card["data"]["task"] != "forecasting":
            continue
        mse = test_mse(Forecaster.from_pretrained(name), card, args.data_dir)
        print(f"| {name} | {card['metrics']['test_mse']:.5f} | "
              f"{card['stored_weights_test_mse']:.5f} | {mse:.5f} | "
              f"{card['recorded_seed0_test_mse'] or float('nan'):.5f} |")


DOC = REPO / "results" / "checkpoints" / "README.md"
MARKS = ("<!-- zoo table: python -m research.make_zoo table --write -->",
         "<!-- end of zoo table -->")


def zoo_table() -> str:
    """The markdown table of the TSM2 entries and the list of the missing ones, from the cards."""
    from mmx_jax.models.pretrained import WEIGHTS, list_pretrained, pretrained_card  # noqa: PLC0415
    from research.tsm2_reproduce import DATASETS, HORIZONS  # noqa: PLC0415

    lines = ["| entry | parameters | file | best step | val MSE | test MSE | as stored | "
             "recorded seed-0 test MSE | trained on | date |", "|---" * 10 + "|"]
    have = set(list_pretrained())
    order = [f"tsm2_{d}_{h}" for d in DATASETS for h in HORIZONS]
    for name in [n for n in order if n in have]:
        card, path = pretrained_card(name), WEIGHTS / f"{name}.npz"
        with np.load(path) as stored:
            count = sum(stored[k].size for k in stored.files)
        metrics = card["metrics"]
        recorded = f"{card['recorded_seed0_test_mse']:.5f}"
        differs = recorded_differs(card)
        if differs:
            recorded += f" (that run had {', '.join(differs)})"
        lines.append(
            f"| `{name}` | {count / 1e3:.1f} k | {path.stat().st_size / 1e6:.1f} MB | "
            f"{card['best_step']} | {metrics['best_val_mse']:.5f} | {metrics['test_mse']:.5f} | "
            f"{card['stored_weights_test_mse']:.5f} ({card['weights_dtype']}) | "
            f"{recorded} | {card['hardware']} | {card['date']} |")
    missing = [n[len("tsm2_"):] for n in order if n not in have]
    lines += ["", f"TSM2 entries: {len(order) - len(missing)} of {len(order)}."
              + (f" Missing: {', '.join(missing)}." if missing else "")]
    return "\n".join(lines)


def recorded_differs(card: dict) -> list[str]:
    """The options of the recorded seed-0 run that the entry's config does not have
    ("model.time_directions=2"; results/tsm2.md, "Inherited options")."""
    row = recorded_seed0(card["dataset"], card["config"]["data"]["pred_len"])
    differs = []
    for key, value in (row or {}).get("overrides", {}).items():
        group, name = key.split(".")
        if card["config"][group][name] != value:  # both read from JSON: lists, not tuples
            differs.append(f"{name}={json.dumps(value)}")
    return differs


def cmd_table(args) -> None:
    table = zoo_table()
    if not args.write:
        print(table)
        return
    text = DOC.read_text()
    start, end = text.index(MARKS[0]) + len(MARKS[0]), text.index(MARKS[1])
    DOC.write_text(text[:start] + "\n" + table + "\n" + text[end:])
    print(f"wrote the table into {DOC.relative_to(REPO)}")


def test_mse(forecaster, card, data_dir=None, batch: int = 256) -> float:
    """MSE of `forecaster` over every test window of its data set, on the scaled data."""
    from mmx_jax.data import load_forecasting  # noqa: PLC0415

    d = card["config"]["data"]
    data = load_forecasting(d["name"], seq_len=d["seq_len"], pred_len=d["pred_len"],
                            features=d["features"], target=d["target"], data_dir=data_dir)
    split = data.split("test")
    total, count = 0.0, 0
    for start in range(0, split.num_windows, batch):
        x, y = split.get_batch(np.arange(start, min(start + batch, split.num_windows)))
        err = forecaster.predict_scaled(x) - y
        total += float(np.sum(err.astype(np.float64) ** 2))
        count += err.size
    return total / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("add", help="an entry from a training workdir")
    p.add_argument("--workdir", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--command", required=True, help="the command that trained it")
    p.add_argument("--date", default=datetime.date.today().isoformat())
    p.add_argument("--hardware", default=None, help="default: this machine's")
    p.add_argument("--data-dir", default=None, help="default: the run's")
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"],
                   help="of the stored weights")
    p.set_defaults(run=cmd_add)
    p = sub.add_parser("train", help="train (dataset, horizon) pairs and add them")
    p.add_argument("--pairs", required=True, help="e.g. etth2:96,etth2:192")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--runs", default="runs/zoo")
    p.add_argument("--workers", type=int, default=1, help="train.py processes at a time")
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"],
                   help="of the stored weights")
    p.set_defaults(run=cmd_train)
    p = sub.add_parser("recast", help="re-store entries' weights in another dtype")
    p.add_argument("names", nargs="*", help="default: every TSM2 entry")
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    p.add_argument("--data-dir", default=None)
    p.set_defaults(run=cmd_recast)
    p = sub.add_parser("table", help="the zoo's markdown table, from the cards")
    p.add_argument("--write", action="store_true", help=f"into {DOC.relative_to(REPO)}")
    p.set_defaults(run=cmd_table)
    p = sub.add_parser("check", help="every TSM2 entry's test MSE against its card")
    p.add_argument("--data-dir", default=None)
    p.set_defaults(run=cmd_check)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
