r"""Reproduces the paper's TSM2 forecasting table: search on validation, then 3 seeds per row.

    python -m research.tsm2_reproduce run --data-dir ../shared/data/timeseries \
        --out results/tsm2_runs.jsonl --workers 8 --deadline 540
    python -m research.tsm2_reproduce table --runs results/tsm2_runs.jsonl   # for results/tsm2.md
    python -m research.tsm2_reproduce run --quick ...      # tiny shapes, a CPU smoke test
    python -m research.tsm2_reproduce look --datasets etth1,etth2 \
        --option 'wd1e-1={"optimizer.weight_decay": 0.1}' ...  # validation look at new options

`run` trains many configs of `configs/tsm2.py:paper` in parallel worker processes (several
small runs share one GPU well) and appends one JSON line per finished run to --out:

1. Hyper-parameter search, on the VALIDATION split only: every candidate of
   `grid_for(dataset)` at every horizon, seed 0. The candidate with the lowest validation MSE
   at a (data set, horizon) is chosen for it (the candidates' test MSE is recorded, never
   used). Stages 2 to 5 and 7 (`OPTIONS`): the stage-1 choice again with options added,
   seed 0; the lowest validation MSE over all stages is chosen.
2. Final runs: the chosen candidate at seeds 1 and 2 (its search run is seed 0). Stage 6,
   the re-seed check (`RESEED_TOLERANCE`): where the mean validation MSE of those two seeds
   is off the seed-0 value by more than 10 %, every candidate of that (data set, horizon)
   gets seeds 1 and 2 as well, and the lowest validation MSE averaged over the three seeds
   is chosen.
3. Shapes of the absent data sets: one epoch of Electricity (26304 x 321) and Traffic
   (17544 x 862) shaped synthetic data, timed, with the peak GPU memory.

Jobs are run in that priority order with a wall-clock deadline; runs not finished by then are
stopped and listed, and a rerun with the same --out completes what is missing. Note that the
search and final runs are started in that order but run concurrently (up to --workers).
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures as cf
import json
import multiprocessing
import os
import pathlib
import statistics
import time
import traceback

from configs import tsm2 as tsm2_config
from mmx_jax.models.tsm2 import MIXER_PARAMS

REPO = pathlib.Path(__file__).resolve().parents[1]

DATASETS = ("etth1", "etth2", "exchange_rate", "ettm1", "ettm2", "weather")
HORIZONS = (96, 192, 336, 720)
SEEDS = (0, 1, 2)
# Candidates (overrides of configs/tsm2.py's PAPER_DEFAULTS, so independent of the choices
# recorded in its PAPER_HPARAMS); chosen per data set on validation MSE.
SEARCH_GRID = {
    "d64_lr1e-3": {"model.d_model": 64, "optimizer.lr": 1e-3, "model.dropout": 0.2},
    "d32_lr5e-4": {"model.d_model": 32, "optimizer.lr": 5e-4, "model.dropout": 0.3},
}
# Smaller and slower-learning candidates for the ETT sets, where both above peak within the
# first epochs (results/tsm2.md, Protocol).
SMALL_GRID = {
    "d16_l1_n4": {"model.d_model": 16, "model.num_layers": 1, "model.state_dim": 4,
                  "model.dropout": 0.1, "optimizer.lr": 1e-3, "data.batch_size": 32,
                  "train.num_epochs": 6},
    "d16_l1_lr1e-4": {"model.d_model": 16, "model.num_layers": 1, "model.dropout": 0.3,
                      "optimizer.lr": 1e-4, "data.batch_size": 32, "train.num_epochs": 10},
    "d32_l1_lr1e-4": {"model.d_model": 32, "model.num_layers": 1, "model.dropout": 0.3,
                      "optimizer.lr": 1e-4, "train.num_epochs": 10},
}
SMALL_DATASETS = ("etth1", "etth2", "ettm1", "ettm2")


def grid_for(dataset: str) -> dict[str, dict]:
    """The search candidates of a data set."""
    return {**SEARCH_GRID, **(SMALL_GRID if dataset in SMALL_DATASETS else {})}


# Stages 2 to 5 and 7: the stage-1 choice of a (data set, horizon) again at seed 0 with one
# of these options; the lowest validation MSE over all stages wins, and a run is named
# "<stage-1 choice>+<option>". What each option does and the validation looks that led to it
# are in results/tsm2.md (Protocol):
#   td2_ra                        two time directions and a learned RevIN affine (stage 2)
#   ls0_mlr                       residual branches start as the identity (LayerScale 0), the
#                                 mixer layers at 0.1 x the lr: training starts from the
#                                 model's linear part (stage 3)
#   ls0_mlr_d0_lr1e-3             stage 3 without dropout, at lr 1e-3 (stage 4)
#   ls0_mlr001_d0_lr1e-3          stage 4 with the mixers at 0.01 x the lr (stage 5)
#   ls0_mlr001_d0_lr1e-3_wd1e-1   stage 5 with weight decay 0.1 (stage 7)
_LS0_MLR = {"model.layer_scale": 0.0, "optimizer.lr_scale_rules": ((MIXER_PARAMS, 0.1),)}
_D0_LR1E3 = {"model.dropout": 0.0, "optimizer.lr": 1e-3}
_STAGE5 = {**_LS0_MLR, **_D0_LR1E3, "optimizer.lr_scale_rules": ((MIXER_PARAMS, 0.01),)}
OPTIONS = {"td2_ra": {"model.time_directions": 2, "model.revin_affine": True},
           "ls0_mlr": _LS0_MLR,
           "ls0_mlr_d0_lr1e-3": {**_LS0_MLR, **_D0_LR1E3},
           "ls0_mlr001_d0_lr1e-3": _STAGE5,
           "ls0_mlr001_d0_lr1e-3_wd1e-1": {**_STAGE5, "optimizer.weight_decay": 0.1}}


def candidate_overrides(dataset: str, name: str) -> dict:
    """The config overrides of a candidate: stage 1 ("d32_lr5e-4") or a stage-1 choice with
    an option ("d32_lr5e-4+td2_ra", "d32_lr5e-4+ls0_mlr")."""
    base, _, option = name.partition("+")
    return {**grid_for(dataset)[base], **(OPTIONS[option] if option else {})}


def stage1_choice(dataset: str, found: dict[str, dict]) -> str | None:
    """The stage-1 choice among a (data set, horizon)'s seed-0 runs by candidate name, or
    None while a stage-1 candidate is missing."""
    if not set(grid_for(dataset)) <= set(found):
        return None
    return choose([found[n] for n in grid_for(dataset)])


# Stage 6, the re-seed check (validation MSE only; results/tsm2.md, Protocol): where the
# chosen candidate's seeds 1 and 2 have a mean validation MSE more than RESEED_TOLERANCE away
# from its seed 0, every candidate of that (data set, horizon) gets seeds 1 and 2 too, and the
# lowest validation MSE averaged over seeds 0-2 is chosen.
RESEED_TOLERANCE = 0.10


def seed_mean_val(runs: list[dict]) -> float:
    return statistics.mean(r["best_val_mse"] for r in runs)


def reseed_fired(found: dict[str, dict], more: dict[tuple[str, int], dict]) -> bool:
    """Whether the re-seed check fires at a (data set, horizon), from its seed-0 runs by
    candidate name (`found`) and its seed-1 and seed-2 runs by (candidate, seed) (`more`):
    the seed-0 winner's seeds 1 and 2 are in, and their mean validation MSE is off its
    seed-0 value by more than RESEED_TOLERANCE."""
    winner = choose(list(found.values()))
    seeds = [more.get((winner, s)) for s in SEEDS[1:]]
    return None not in seeds and abs(
        seed_mean_val(seeds) / found[winner]["best_val_mse"] - 1) > RESEED_TOLERANCE


def decide(found: dict[str, dict], more: dict[tuple[str, int], dict]) -> str | None:
    """The chosen candidate of a (data set, horizon) (arguments as `reseed_fired`): the
    lowest seed-0 validation MSE, unless the re-seed check fires; then the lowest mean over
    the three seeds, or None while some candidate's seeds 1 and 2 are missing."""
    if not reseed_fired(found, more):
        return choose(list(found.values()))
    if any((name, s) not in more for name in found for s in SEEDS[1:]):
        return None
    return min(found, key=lambda n: seed_mean_val([found[n]] + [more[n, s] for s in SEEDS[1:]]))


def follow_up(dataset: str, horizon: int, found: dict[str, dict],
              more: dict[tuple[str, int], dict] | None = None) -> tuple[str, list[str]]:
    """What a (data set, horizon) needs next, given its seed-0 runs by candidate name and its
    seed-1 and seed-2 runs by (candidate, seed): ("stage1", names missing), ("stage2", option
    runs missing, stages 2 to 5 alike), ("final", [the seed-0 winner]) while its seeds 1 and 2
    are missing, ("reseed", candidates whose seeds 1 and 2 are missing) or ("done", [the
    choice])."""
    first = stage1_choice(dataset, found)
    if first is None:
        return "stage1", [n for n in grid_for(dataset) if n not in found]
    missing = [f"{first}+{o}" for o in OPTIONS if f"{first}+{o}" not in found]
    if missing:
        return "stage2", missing
    more = more or {}
    winner = choose(list(found.values()))
    if any((winner, s) not in more for s in SEEDS[1:]):
        return "final", [winner]
    choice = decide(found, more)
    if choice is None:
        return "reseed", [n for n in found if any((n, s) not in more for s in SEEDS[1:])]
    return "done", [choice]

SYNTHETIC = {"electricity": (26304, 321), "traffic": (17544, 862)}
PAPER_MSE = {
    "etth1": (0.375, 0.398, 0.419, 0.422), "etth2": (0.253, 0.334, 0.347, 0.401),
    "ettm1": (0.322, 0.349, 0.366, 0.407), "ettm2": (0.173, 0.230, 0.279, 0.388),
    "weather": (0.161, 0.208, 0.252, 0.337), "exchange_rate": (0.163, 0.229, 0.383, 0.999),
    "electricity": (0.142, 0.153, 0.175, 0.209), "traffic": (0.396, 0.408, 0.427, 0.449),
}


def job_config(job: dict, quick: bool):
    """`configs/tsm2.py:paper` with every searched hyper-parameter (HPARAM_KEYS) reset, to
    PAPER_DEFAULTS or to the config's plain default, then the job's overrides: a candidate means
    the same whatever configs/tsm2.py has recorded as chosen for the data set. (Until
    2026-12-05 only PAPER_DEFAULTS' keys were reset, so runs inherited the recorded choice's
    options; results/tsm2.md, "Inherited options", lists them, and their rows name them.)"""
    module = tsm2_config
    pair = f"dataset={job['dataset']},horizon={job['horizon']},seed={job['seed']}"
    config = module.get_config(f"paper,{pair}")
    plain = module.get_config(f"quickstart=false,{pair}")
    groups_names = [key.split(".") for key in module.HPARAM_KEYS.values()]
    config.update_from_flattened_dict({f"{group}.{name}": plain[group][name]
                                       for group, name in groups_names})
    config.update_from_flattened_dict({module.HPARAM_KEYS[k]: v
                                       for k, v in module.PAPER_DEFAULTS.items()})
    config.data.data_dir = job.get("data_dir")
    if quick:  # CPU smoke: tiny model, few steps
        config.data.seq_len = 96
        config.model.update(d_model=8, num_layers=1, state_dim=4, scan_impl="sequential")
        config.train.update(num_epochs=1, steps_per_epoch=3, log_every_steps=1)
        config.data.update(batch_size=8, eval_batch_size=64, max_eval_windows=64)
    # Overrides read back from the JSON lines have lists where the config holds tuples.
    config.update_from_flattened_dict({k: _as_tuples(v)
                                       for k, v in job.get("overrides", {}).items()})
    return config


def _as_tuples(value):
    """Lists (nested) -> tuples; anything else unchanged."""
    return tuple(map(_as_tuples, value)) if isinstance(value, list) else value


def _worker_init(cache_dir: str | None):
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    os.environ["TQDM_DISABLE"] = "1"  # many workers share one log
    import jax

    if cache_dir:  # seeds and reruns of a shape reuse its compiled executables
        jax.config.update("jax_compilation_cache_dir", cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def run_job(job: dict, quick: bool, workroot: str) -> dict:
    """Trains one configuration; returns its results (or the error)."""
    import logging

    import jax

    logging.getLogger("absl").setLevel(logging.WARNING)
    from mmx_jax.data import synthetic_forecasting
    from mmx_jax.train.loop import train_and_evaluate
    from mmx_jax.train.tasks.forecasting import ForecastingTask

    started = time.time()
    out = dict(job)
    try:
        config = job_config(job, quick)
        workdir = pathlib.Path(workroot) / job["tag"]
        task = None
        if job["kind"] == "synthetic":
            rows, variates = SYNTHETIC[job["dataset"]]
            data = synthetic_forecasting(rows, variates, seq_len=config.data.seq_len,
                                         pred_len=config.data.pred_len, seed=0)
            config.train.num_epochs = 1
            config.data.batch_size = 16 if not quick else 8
            config.data.eval_batch_size = 16  # 862 variates x 512 steps per window
            task = ForecastingTask(config, data)
        results = train_and_evaluate(config, workdir, task=task)
        out.update(results)
        if job["seed"] == 0 and job["kind"] != "synthetic":  # eval/best/forecast.png
            from mmx_jax.train.evaluate import evaluate_and_report

            out["plot"] = evaluate_and_report(workdir).get("plot")
        out["train_steps_per_sec"] = _last_rate(workdir)
        stats = jax.local_devices()[0].memory_stats() or {}
        out["peak_gpu_mib"] = stats.get("peak_bytes_in_use", 0) / 2**20
        out["params"] = _params(config, task)
    except Exception as err:  # noqa: BLE001  (one failed run must not stop the others)
        out["error"] = f"{type(err).__name__}: {err}\n{traceback.format_exc()[-2000:]}"
    out["wall_s"] = time.time() - started
    return out


def _last_rate(workdir: pathlib.Path) -> float | None:
    rates = [json.loads(line).get("steps_per_sec") for line in
             (workdir / "metrics.jsonl").read_text().splitlines() if "steps_per_sec" in line]
    return rates[-1] if rates else None


def _params(config, task) -> int:
    from flax import nnx

    from mmx_jax.models import count_params
    from mmx_jax.train.tasks import make_task

    task = task or make_task(config)
    return count_params(nnx.eval_shape(lambda: task.create_model(nnx.Rngs(0))))


def _search_job(dataset, horizon, name, data_dir):
    return dict(kind="search", dataset=dataset, horizon=horizon, seed=0, candidate=name,
                overrides=candidate_overrides(dataset, name), data_dir=data_dir,
                tag=f"{dataset}_{horizon}_s0_{name}")


def _search_jobs(data_dir, datasets=DATASETS):
    for dataset in datasets:
        for horizon in HORIZONS:
            for name in grid_for(dataset):
                yield _search_job(dataset, horizon, name, data_dir)


def _final_jobs(dataset, horizon, candidate, data_dir, patience=0):
    for seed in SEEDS[1:]:
        overrides = candidate_overrides(dataset, candidate)
        if patience:
            overrides["train.patience"] = patience
        yield dict(kind="final", dataset=dataset, horizon=horizon, seed=seed,
                   candidate=candidate, overrides=overrides, data_dir=data_dir,
                   tag=f"{dataset}_{horizon}_s{seed}_{candidate}")


def _synthetic_jobs():
    for dataset in SYNTHETIC:
        yield dict(kind="synthetic", dataset=dataset, horizon=96, seed=0,
                   candidate="d64_lr1e-3", overrides=SEARCH_GRID["d64_lr1e-3"],
                   tag=f"{dataset}_synthetic")


def choose(search_rows: list[dict]) -> str:
    """The candidate with the lowest validation MSE (test MSE is never looked at)."""
    ok = [r for r in search_rows if "error" not in r]
    return min(ok, key=lambda r: r["best_val_mse"])["candidate"]


def _is_search_run(row: dict) -> bool:
    """A successful seed-0 run of a candidate (a seed-0 run recorded as "final" by an earlier
    protocol, which chose once per data set, is the same run)."""
    return "error" not in row and row["seed"] == 0 and row["kind"] in ("search", "final")


def _is_seed_run(row: dict) -> bool:
    """A successful seed-1 or seed-2 run of a candidate."""
    return "error" not in row and row["seed"] in SEEDS[1:] and row["kind"] == "final"


def runs_by_pair(rows: list[dict]) -> tuple[dict, dict]:
    """Per (data set, horizon): the seed-0 runs by candidate, and the seed-1 and seed-2 runs
    by (candidate, seed)."""
    found, more = collections.defaultdict(dict), collections.defaultdict(dict)
    for r in rows:
        if _is_search_run(r):
            found[r["dataset"], r["horizon"]][r["candidate"]] = r
        elif _is_seed_run(r):
            more[r["dataset"], r["horizon"]][r["candidate"], r["seed"]] = r
    return found, more


def winners(rows: list[dict]) -> dict[tuple[str, int], str]:
    """The chosen candidate of every (data set, horizon) whose search is complete (the search
    runs of all its candidates) and, where the re-seed check fires, its re-seed runs too."""
    found, more = runs_by_pair(rows)
    chosen = {key: decide(cands, more[key]) for key, cands in found.items()
              if set(grid_for(key[0])) <= set(cands)}
    return {key: name for key, name in chosen.items() if name is not None}


def read_runs(path) -> list[dict]:
    """The rows of a JSON-lines runs file."""
    return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]


def _done_runs(out: pathlib.Path) -> dict[str, dict]:
    """The successful runs already in a JSON-lines file, by tag."""
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = read_runs(out) if out.exists() else []
    return {row["tag"]: row for row in rows if "error" not in row}


def _pool(args) -> cf.ProcessPoolExecutor:
    return cf.ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn"),
                                  initializer=_worker_init, initargs=(args.cache_dir,))


def _record(out: pathlib.Path, row: dict, show_test: bool = True) -> None:
    """Appends a finished run to `out` and prints one line about it."""
    with out.open("a") as f:
        f.write(json.dumps(row) + "\n")
    test = f"test_mse={row.get('test_mse', float('nan')):.4f} " if show_test else ""
    status = "ERROR " + row["error"].splitlines()[0] if "error" in row else \
        f"{test}val_mse={row.get('best_val_mse', float('nan')):.4f}"
    print(f"[{time.strftime('%H:%M:%S')}] {row['tag']}: {status} ({row['wall_s']:.0f}s)",
          flush=True)


def _shut_down(pool: cf.ProcessPoolExecutor, left: list[str]) -> None:
    """Shuts the pool down; runs still going at the deadline (`left`) are abandoned: their
    workers are killed first, so that the shutdown does not wait for them."""
    if left:
        print(f"deadline: {len(left)} runs not finished: {', '.join(left)}", flush=True)
        for proc in list((getattr(pool, "_processes", None) or {}).values()):
            proc.kill()
    pool.shutdown(wait=True, cancel_futures=True)


def cmd_run(args):
    out = pathlib.Path(args.out)
    done = _done_runs(out)
    deadline = time.time() + args.deadline
    pool = _pool(args)
    search = collections.defaultdict(dict)
    more = collections.defaultdict(dict)  # (data set, horizon) -> (candidate, seed) -> row
    for row in filter(_is_seed_run, done.values()):  # what the re-seed check can reuse
        more[row["dataset"], row["horizon"]][row["candidate"], row["seed"]] = row
    pending: dict[cf.Future, dict] = {}
    datasets = args.datasets.split(",") if args.datasets else DATASETS  # in this order
    queue = [] if args.no_synthetic else list(_synthetic_jobs())
    queue += list(_search_jobs(args.data_dir, datasets))
    followed: set[tuple] = set()  # (data set, horizon, stage) already queued

    def after_run(row):
        key = row["dataset"], row["horizon"]
        if _is_search_run(row):
            search[key][row["candidate"]] = row
        elif _is_seed_run(row):
            more[key][row["candidate"], row["seed"]] = row
        else:
            return
        stage, names = follow_up(*key, search[key], more[key])
        if stage == "stage1" or (*key, stage) in followed:
            return
        followed.add((*key, stage))
        # Stage 2, final and re-seed runs go before the remaining searches.
        if stage == "stage2":
            queue[:0] = [_search_job(*key, name, args.data_dir) for name in names]
        elif stage == "final":
            print(f"search {key}: chose {names[0]}", flush=True)
            queue[:0] = list(_final_jobs(*key, names[0], args.data_dir, args.final_patience))
        elif stage == "reseed":
            print(f"search {key}: re-seeding {', '.join(names)}", flush=True)
            queue[:0] = [job for name in names for job in
                         _final_jobs(*key, name, args.data_dir, args.final_patience)]
        else:
            print(f"search {key}: done, chose {names[0]}", flush=True)

    while queue or pending:
        while queue and len(pending) < args.workers and time.time() < deadline:
            job = queue.pop(0)
            if job["tag"] in done:
                after_run(done[job["tag"]])
                continue
            pending[pool.submit(run_job, job, args.quick, args.workroot)] = job
        if not pending:
            break
        finished, _ = cf.wait(pending, timeout=max(1.0, deadline - time.time()),
                              return_when=cf.FIRST_COMPLETED)
        if not finished and time.time() >= deadline:
            break
        for future in finished:
            pending.pop(future)
            row = future.result()
            _record(out, row)
            if "error" not in row:
                after_run(row)
    _shut_down(pool, [j["tag"] for j in pending.values()] + [j["tag"] for j in queue])


def look_job(dataset, horizon, base, name, overrides, data_dir):
    """A look's run: candidate `base` with `overrides` on top, named "<base>_<name>". Once
    OPTIONS has the option "<base's option>_<name>", this is that stage's search run."""
    job = _search_job(dataset, horizon, base, data_dir)
    return dict(job, candidate=f"{base}_{name}", tag=f"{job['tag']}_{name}",
                overrides={**job["overrides"], **overrides})


def cmd_look(args):
    """Exploration before a stage is added: options (`--option NAME=JSON`) put on top of
    every pair's stage-1 choice with the `--base` option, seed 0, written to their own file
    (which `run` and `table` never read). Prints validation MSE only, next to the base's and
    the current choice's, so that test numbers play no part in deciding on a new stage."""
    looks = {}
    for text in args.option:
        name, _, overrides = text.partition("=")
        try:
            looks[name] = json.loads(overrides)
        except json.JSONDecodeError as err:
            raise SystemExit(f"--option {text!r}: not NAME={{JSON object}} ({err})") from None
        if not name or not isinstance(looks[name], dict):
            raise SystemExit(f"--option {text!r}: not NAME={{JSON object}}")
    found, more = runs_by_pair(read_runs(args.runs))
    out = pathlib.Path(args.out)
    done = _done_runs(out)
    jobs, cells = [], {}
    datasets = args.datasets.split(",") if args.datasets else DATASETS
    for key in ((d, h) for d in datasets for h in HORIZONS):
        first = stage1_choice(key[0], found[key])
        if first is None:
            raise SystemExit(f"{args.runs}: the stage-1 search of {key} is incomplete")
        base = f"{first}+{args.base}"
        cells[key] = [decide(found[key], more[key]), found[key].get(base)]
        for name, overrides in looks.items():
            job = look_job(*key, base, name, overrides, args.data_dir)
            cells[key].append(job["tag"])
            if job["tag"] not in done:
                jobs.append(job)
    pool = _pool(args)
    futures = {pool.submit(run_job, job, args.quick, args.workroot): job for job in jobs}
    try:
        for future in cf.as_completed(futures, timeout=args.deadline):
            done[futures[future]["tag"]] = row = future.result()
            _record(out, row, show_test=False)
    except TimeoutError:
        pass
    _shut_down(pool, [job["tag"] for f, job in futures.items() if not f.done()])

    def val(row):
        return f"{row['best_val_mse']:.4f}" if row and "error" not in row else "-"

    print(f"| data set | H | current choice | + {args.base} | " +
          " | ".join(f"+ {args.base}_{n}" for n in looks) + " |")
    print("|---|---|---|---|" + "---|" * len(looks))
    for (dataset, horizon), (choice, base, *tags) in cells.items():
        current = f"{choice} {val(found[dataset, horizon].get(choice))}"
        print(f"| {dataset} | {horizon} | {current} | {val(base)} | " +
              " | ".join(val(done.get(t)) for t in tags) + " |")


def _fmt(values):
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f} (1 seed)"
    seeds = "" if len(values) == len(SEEDS) else f" ({len(values)} seeds)"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}{seeds}"


def _search_cell(found: dict[str, dict], name: str, winner: str | None) -> str:
    text = f"{found[name]['best_val_mse']:.4f}" if name in found else "-"
    return f"**{text}**" if name == winner else text


def print_search(ok: list[dict], chosen: dict[tuple[str, int], str]) -> None:
    """Validation MSE of every searched candidate (seed 0), the chosen one in bold: the
    stage-1 grid, then the stage-1 choice and its stage-2 runs."""
    names = list(dict.fromkeys(n for d in DATASETS for n in grid_for(d)))
    runs = collections.defaultdict(dict)
    for r in filter(_is_search_run, ok):
        runs[r["dataset"], r["horizon"]][r["candidate"]] = r
    print("| data set | H | " + " | ".join(names) + " | stage 1 choice " +
          "".join(f"| + {o} " for o in OPTIONS) + "| chosen |")
    print("|---|---|" + "---|" * (len(names) + len(OPTIONS) + 2))
    for dataset in DATASETS:
        for horizon in HORIZONS:
            found, winner = runs[dataset, horizon], chosen.get((dataset, horizon))
            first = stage1_choice(dataset, found)
            cells = [_search_cell(found, name, winner) for name in names] + [first or "-"]
            cells += [_search_cell(found, f"{first}+{o}", winner) for o in OPTIONS]
            print(f"| {dataset} | {horizon} | " + " | ".join(cells) +
                  f" | {winner or 'incomplete'} |")
    print()


def print_reseeds(ok: list[dict], chosen: dict[tuple[str, int], str]) -> None:
    """The (data set, horizon) pairs where the re-seed check fired: every candidate's
    validation MSE at seeds 0, 1 and 2 and their mean, the chosen candidate in bold."""
    found, more = runs_by_pair(ok)
    fired = [key for key in sorted(found, key=lambda k: (DATASETS.index(k[0]), k[1]))
             if reseed_fired(found[key], more[key])]
    if not fired:
        return
    print("| data set | H | candidate | val seed 0 | val seed 1 | val seed 2 | mean |")
    print("|---|---|---|---|---|---|---|")
    for key in fired:
        for name, row in found[key].items():
            runs = [row] + [more[key].get((name, s)) for s in SEEDS[1:]]
            cells = [f"{r['best_val_mse']:.4f}" if r else "-" for r in runs]
            mean = f"{seed_mean_val(runs):.4f}" if None not in runs else "-"
            if name == chosen.get(key):
                name, mean = f"**{name}**", f"**{mean}**"
            print(f"| {key[0]} | {key[1]} | {name} | " + " | ".join(cells) + f" | {mean} |")
    print()


def cmd_table(args):
    rows = read_runs(args.runs)
    # A tag run again (a rerun after an error or a lost machine) counts once: its last success.
    ok = list({r["tag"]: r for r in rows if "error" not in r}.values())
    errors = [r for r in rows if "error" in r and r["tag"] not in {o["tag"] for o in ok}]
    chosen = winners(ok)
    print_search(ok, chosen)
    print_reseeds(ok, chosen)
    print("| data set | H | ours MSE (mean ± std, 3 seeds) | ours MAE | paper MSE | chosen | "
          "train time per run (s) | command |")
    print("|---|---|---|---|---|---|---|---|")
    for dataset in DATASETS:
        means = []
        for i, horizon in enumerate(HORIZONS):
            cand = chosen.get((dataset, horizon))
            runs = [r for r in ok if r["dataset"] == dataset and r["horizon"] == horizon
                    and r.get("candidate") == cand and r["kind"] in ("search", "final")]
            mse = [r["test_mse"] for r in runs]
            mae = [r["test_mae"] for r in runs]
            if len(mse) == len(SEEDS):
                means.append(statistics.mean(mse))
            wall = statistics.mean(r["wall_s"] for r in runs) if runs else float("nan")
            command = (f"`python train.py --config configs/tsm2.py:paper,dataset={dataset},"
                       f"horizon={horizon},seed=S`")
            print(f"| {dataset} | {horizon} | {_fmt(mse)} | {_fmt(mae)} | "
                  f"{PAPER_MSE[dataset][i]:.3f} | {cand or '-'} | {wall:.0f} | {command} |")
        paper_mean = statistics.mean(PAPER_MSE[dataset])
        ours = f"{statistics.mean(means):.3f}" if len(means) == len(HORIZONS) else "incomplete"
        print(f"| {dataset} | mean | {ours} | | {paper_mean:.3f} | | | |")
    print()
    print("| absent data set (synthetic data of its shape) | variates | one epoch (s) | "
          "steps/s | peak GPU MiB | params |")
    print("|---|---|---|---|---|---|")
    for r in ok:
        if r["kind"] == "synthetic":
            print(f"| {r['dataset']} | {SYNTHETIC[r['dataset']][1]} | {r['wall_s']:.0f} | "
                  f"{r.get('train_steps_per_sec') or 0:.1f} | {r['peak_gpu_mib']:.0f} | "
                  f"{r['params']} |")
    for r in errors:
        print(f"\nerror in {r['tag']}: {r['error'].splitlines()[0]}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run")
    run.add_argument("--out", default="results/tsm2_runs.jsonl")
    run.add_argument("--no-synthetic", action="store_true")
    run.add_argument("--final-patience", type=int, default=0,
                     help="early-stopping patience of the final runs (0: the config's, 3)")
    look = sub.add_parser("look", help=cmd_look.__doc__.splitlines()[0])
    look.add_argument("--option", action="append", default=[], metavar="NAME=JSON",
                      help='e.g. wd1e-1=\'{"optimizer.weight_decay": 0.1}\'')
    look.add_argument("--base", default=list(OPTIONS)[-1], choices=list(OPTIONS))
    look.add_argument("--runs", default="results/tsm2_runs.jsonl")
    look.add_argument("--out", default="runs/tsm2_look.jsonl")
    for parser_ in (run, look):
        parser_.add_argument("--data-dir",
                             default=str(REPO.parent / "shared" / "data" / "timeseries"))
        parser_.add_argument("--workroot", default="runs/tsm2_reproduce")
        parser_.add_argument("--workers", type=int, default=8)
        parser_.add_argument("--deadline", type=float, default=540.0, help="seconds")
        parser_.add_argument("--cache-dir", default=None,
                             help="JAX persistent compilation cache")
        parser_.add_argument("--datasets", default="", help="comma-separated subset")
        parser_.add_argument("--quick", action="store_true",
                             help="tiny shapes (CPU smoke test)")
    table = sub.add_parser("table")
    table.add_argument("--runs", default="results/tsm2_runs.jsonl")
    args = parser.parse_args()
    {"run": cmd_run, "look": cmd_look, "table": cmd_table}[args.command](args)


if __name__ == "__main__":
    main()
