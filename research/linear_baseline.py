r"""A closed-form linear forecaster in the TSM2 pipeline: the floor that TSM2 must beat.

    python -m research.linear_baseline --data-dir ../shared/data/timeseries \
        --datasets etth1,etth2 --out results/linear_baseline.json

For each (data set, horizon) it fits one map from the last `seq_len` steps of a variate to its
next H steps, shared by all variates (channel-independent, like NLinear/DLinear), on windows
centred by their own mean (the mean is added back to the forecast), with an intercept, by ridge
regression in closed form. The ridge strength is chosen on the validation split from
`--ridge` (multiples of the number of training rows); test MSE and MAE are computed once, for
the chosen strength. Same splits, scaling and windows as `configs/tsm2.py:paper` (input 512,
stride 1, the test's last partial batch kept: every window counts once).

Memory stays small: the normal equations are summed over batches of windows.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import numpy as np

from mmx_jax.data.forecasting import ForecastingSplit, load_forecasting
from research.tsm2_reproduce import HORIZONS, PAPER_MSE

RIDGE = (0.0, 0.01, 0.1, 1.0)


def _rows(split: ForecastingSplit, start: int, stop: int) -> tuple[np.ndarray, np.ndarray,
                                                                    np.ndarray]:
    """Windows [start, stop) as per-variate rows: inputs with an intercept column (n*M, L+1),
    targets (n*M, H), both centred by the input's mean, and that mean (n*M, 1)."""
    x, y = split.get_batch(np.arange(start, stop))
    x = np.swapaxes(x, 1, 2).reshape(-1, x.shape[1]).astype(np.float64)
    y = np.swapaxes(y, 1, 2).reshape(-1, y.shape[1]).astype(np.float64)
    mean = x.mean(axis=1, keepdims=True)
    return np.concatenate([x - mean, np.ones_like(mean)], axis=1), y - mean, mean


def _batches(split: ForecastingSplit, batch: int):
    for start in range(0, split.num_windows, batch):
        yield _rows(split, start, min(start + batch, split.num_windows))


def fit_ridge(split: ForecastingSplit, ridge: tuple[float, ...], *,
              batch: int = 2048) -> dict[float, np.ndarray]:
    """Ridge solutions (L+1, H) for each strength, as a multiple of the number of rows (the
    intercept is not penalised)."""
    gram = rhs = None
    count = 0
    for x, y, _ in _batches(split, batch):
        gram = x.T @ x if gram is None else gram + x.T @ x
        rhs = x.T @ y if rhs is None else rhs + x.T @ y
        count += len(x)
    penalty = np.eye(len(gram))
    penalty[-1, -1] = 0.0
    # A tiny floor keeps lambda = 0 solvable when windows repeat (a least-squares solution).
    floor = 1e-9 * np.trace(gram) / len(gram)
    return {r: np.linalg.solve(gram + (r * count + floor) * penalty, rhs) for r in ridge}


def evaluate(split: ForecastingSplit, weights: np.ndarray, *, batch: int = 2048
             ) -> tuple[float, float]:
    """MSE and MAE over every window and variate of a split."""
    sq = ab = 0.0
    count = 0
    for x, y, _ in _batches(split, batch):
        err = x @ weights - y  # centring cancels in the error
        sq += float(np.sum(err**2))
        ab += float(np.sum(np.abs(err)))
        count += err.size
    return sq / count, ab / count


def run_one(name: str, horizon: int, *, seq_len: int, data_dir: str | None,
            ridge: tuple[float, ...]) -> dict:
    start = time.perf_counter()
    data = load_forecasting(name, seq_len=seq_len, pred_len=horizon, data_dir=data_dir)
    solutions = fit_ridge(data.train, ridge)
    val = {r: evaluate(data.val, w)[0] for r, w in solutions.items()}
    best = min(val, key=val.get)
    test_mse, test_mae = evaluate(data.test, solutions[best])
    return dict(dataset=name, horizon=horizon, seq_len=seq_len, ridge=best, val_mse=val[best],
                val_mse_by_ridge={str(r): v for r, v in val.items()}, test_mse=test_mse,
                test_mae=test_mae, seconds=time.perf_counter() - start)


def table(results: list[dict]) -> str:
    lines = ["| data set | H | ridge | val MSE | test MSE | test MAE | paper TSM2 MSE |",
             "|---|---|---|---|---|---|---|"]
    by_set: dict[str, list[dict]] = {}
    for r in results:
        by_set.setdefault(r["dataset"], []).append(r)
        paper = PAPER_MSE.get(r["dataset"])
        ref = (f"{paper[HORIZONS.index(r['horizon'])]:.3f}"
               if paper and r["horizon"] in HORIZONS else "-")
        lines.append(f"| {r['dataset']} | {r['horizon']} | {r['ridge']:g} | {r['val_mse']:.4f} "
                     f"| {r['test_mse']:.3f} | {r['test_mae']:.3f} | {ref} |")
    for name, rows in by_set.items():
        if name in PAPER_MSE and sorted(r["horizon"] for r in rows) == list(HORIZONS):
            lines.append(f"| {name} | mean | | | {np.mean([r['test_mse'] for r in rows]):.3f} | "
                         f"{np.mean([r['test_mae'] for r in rows]):.3f} | "
                         f"{np.mean(PAPER_MSE[name]):.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", default="etth1",
                        help="comma-separated names (etth1 is bundled; the others need "
                             "--data-dir)")
    parser.add_argument("--horizons", default=",".join(map(str, HORIZONS)))
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--data-dir", default=None, help="folder with the CSV(.xz) files")
    parser.add_argument("--ridge", default=",".join(map(str, RIDGE)),
                        help="ridge strengths to choose from on validation, as multiples of "
                             "the number of training rows")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    ridge = tuple(float(r) for r in args.ridge.split(","))
    results = []
    for name in args.datasets.split(","):
        for horizon in (int(h) for h in args.horizons.split(",")):
            results.append(run_one(name, horizon, seq_len=args.seq_len,
                                   data_dir=args.data_dir, ridge=ridge))
            r = results[-1]
            print(f"{name} H={horizon}: ridge {r['ridge']:g}, val {r['val_mse']:.4f}, "
                  f"test {r['test_mse']:.4f} / {r['test_mae']:.4f} ({r['seconds']:.0f} s)",
                  flush=True)
    print(table(results))
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
