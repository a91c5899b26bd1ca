"""Data the project has never seen, made here in kinds the bundled data sets are not: a daily
series with its target in the middle under another name, and grey-scale images in a folder.
Each trains and evaluates with train.py and eval.py from flags alone, and the series is
forecast with predict.py."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def env() -> dict[str, str]:
    return dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
                JAX_PLATFORMS="cpu", TQDM_DISABLE="1")


def entry(script: str, *args: str, cwd: pathlib.Path) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(REPO / script), *args], env=env(), cwd=cwd,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def daily_series(path: pathlib.Path, days: int = 900) -> None:
    """A daily series: date, then five variates with the target "load" in the middle."""
    import pandas as pd  # noqa: PLC0415

    rng = np.random.default_rng(3)
    t = np.arange(days)
    frame = pd.DataFrame({
        "date": pd.date_range("2021-03-01", periods=days, freq="D").strftime("%Y-%m-%d"),
        "temperature": 10 + 8 * np.sin(2 * np.pi * t / 365) + rng.normal(0, 1, days),
        "price": 50 + np.cumsum(rng.normal(0, 0.5, days)),
        "load": 100 + 20 * np.sin(2 * np.pi * t / 7) + 0.05 * t + rng.normal(0, 2, days),
        "wind": np.abs(rng.normal(5, 2, days)),
        "holiday": (t % 7 >= 5).astype(float),
    })
    frame.to_csv(path, index=False)


@pytest.mark.slow
def test_a_daily_series_with_another_layout_trains_and_evaluates_from_flags(tmp_path):
    daily_series(tmp_path / "sales.csv")
    entry("train.py", "--config=" + str(REPO / "configs" / "tsm2.py")
          + ":smoke,dataset=sales.csv,seq_len=56,horizon=14", "--workdir=run",
          "--config.data.target=load", cwd=tmp_path)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert np.isfinite(results["test_mse"])
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (config["data"]["seq_len"], config["data"]["pred_len"]) == (56, 14)
    report = json.loads(entry("eval.py", "--workdir=run", cwd=tmp_path).stdout)
    assert report["test_mse"] == pytest.approx(results["test_mse"], rel=1e-6)
    assert pathlib.Path(report["plot"]).stat().st_size > 10_000
    # The future of the series: 14 days after its last row, in its own units.
    entry("predict.py", "--workdir=run", "--input=sales.csv", "--output=future.csv",
          "--plot=future.png", cwd=tmp_path)
    import pandas as pd  # noqa: PLC0415

    future = pd.read_csv(tmp_path / "future.csv", parse_dates=["date"])
    # TSLib order: the target last.
    assert list(future.columns) == ["date", "temperature", "price", "wind", "holiday", "load"]
    last = pd.read_csv(tmp_path / "sales.csv", parse_dates=["date"])["date"].iloc[-1]
    assert list(future["date"]) == list(pd.date_range(last, periods=15, freq="D")[1:])
    # Daily dates are written as dates, as the file had them.
    assert (tmp_path / "future.csv").read_text().splitlines()[1].split(",")[0] == \
        future["date"].iloc[0].strftime("%Y-%m-%d")
    assert 50 < future["load"].mean() < 200  # file units, not scaled ones
    assert (tmp_path / "future.png").stat().st_size > 10_000


@pytest.mark.slow
def test_grey_scale_images_train_with_their_own_statistics_from_flags(tmp_path):
    from PIL import Image  # noqa: PLC0415

    rng = np.random.default_rng(4)
    for split, count in (("train", 48), ("test", 16)):
        for label, name in enumerate(("dark", "bright")):
            folder = tmp_path / "grey" / split / name
            folder.mkdir(parents=True)
            for i in range(count // 2):
                pixels = rng.integers(0, 120, (28, 28)) + 120 * label
                Image.fromarray(pixels.astype(np.uint8), mode="L").save(folder / f"{i}.png")
    entry("train.py", "--config=" + str(REPO / "configs" / "vim2.py")
          + ":smoke,dataset=folder:grey", "--workdir=run", "--config.data.val_holdout=8",
          "--config.data.image_size=32", "--config.data.channels=1", cwd=tmp_path)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    log = (tmp_path / "run" / "logs" / "train.0.log").read_text()
    # One channel (a model with a 1-channel stem), its statistics measured on the training
    # split (not CIFAR-10's three).
    assert "image statistics measured on the training split" in log
    measured = log.split("mean [", 1)[1].split("]", 1)[0]
    assert len(measured.split(",")) == 1 and 0.3 < float(measured) < 0.7
    report = json.loads(entry("eval.py", "--workdir=run", cwd=tmp_path).stdout)
    assert report["test_top1"] == pytest.approx(results["test_top1"], abs=1e-9)
