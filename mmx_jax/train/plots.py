"""Forecast plots: history, truth and forecast of test windows (eval.py), history and the
future (predict.py)."""

from __future__ import annotations

import pathlib

import numpy as np


def plot_forecasts(path: str | pathlib.Path, x: np.ndarray, y_true: np.ndarray,
                   y_pred: np.ndarray, *, input_columns, output_columns, window_ids,
                   title: str, history: int | None = None) -> pathlib.Path:
    """Saves a grid (windows x variates) of history + truth + forecast as a PNG.

    Args:
      x: (W, seq_len, C_in) inputs; y_true, y_pred: (W, pred_len, C_out), all in file units.
      input_columns, output_columns: names of the columns of x and y.
      window_ids: the window number of each row, for the subplot titles.
      history: how many input steps to draw (default: 2 * pred_len).
    """
    plt = _pyplot()
    windows, pred_len, variates = y_true.shape
    history = min(history or 2 * pred_len, x.shape[1])
    fig, axes = plt.subplots(windows, variates, figsize=(3.6 * variates, 2.4 * windows),
                             squeeze=False, sharex=True)
    steps_in = np.arange(-history, 0)
    steps_out = np.arange(pred_len)
    for w in range(windows):
        for v, name in enumerate(output_columns):
            ax = axes[w, v]
            col = list(input_columns).index(name)
            ax.plot(steps_in, x[w, -history:, col], color="0.55", lw=1, label="input")
            ax.plot(steps_out, y_true[w, :, v], color="black", lw=1.2, label="truth")
            ax.plot(steps_out, y_pred[w, :, v], color="tab:red", lw=1.2, label="forecast")
            ax.axvline(0, color="0.8", lw=0.8)
            ax.set_title(f"{name}, window {window_ids[w]}", fontsize=8)
            ax.tick_params(labelsize=7)
    axes[0, 0].legend(fontsize=7, loc="upper left")
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def plot_future(path: str | pathlib.Path, past_dates, past: np.ndarray, future_dates,
                future: np.ndarray, *, names, title: str) -> pathlib.Path:
    """Saves a PNG of a series' last rows and its forecast, one panel per name.

    Args:
      past_dates, past: (T,) time stamps and (T, V) values of the history.
      future_dates, future: (H,) time stamps and (H, V) values of the forecast.
      names: the V variates' names, one panel each.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(len(names), 1, figsize=(9, 2.2 * len(names)), squeeze=False,
                             sharex=True)
    for v, (ax, name) in enumerate(zip(axes[:, 0], names, strict=True)):
        ax.plot(past_dates, past[:, v], color="0.4", lw=1, label="history")
        ax.plot(future_dates, future[:, v], color="tab:red", lw=1.4, label="forecast")
        ax.axvline(past_dates[-1], color="0.8", lw=0.8)
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=7)
    axes[0, 0].legend(fontsize=7, loc="upper left")
    fig.suptitle(title, fontsize=9)
    fig.autofmt_xdate()
    return _save(fig, path)


def _pyplot():
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt


def _save(fig, path) -> pathlib.Path:
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig.tight_layout()
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
