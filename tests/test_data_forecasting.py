"""mmx_jax.data.forecasting against the TSLib split formulas and independently scaled raw rows."""

from __future__ import annotations

import functools
import hashlib
import pathlib

import numpy as np
import pandas as pd
import pytest

import mmx_jax.data
from mmx_jax.data import (
    DataFileNotFoundError,
    ForecastingDataError,
    StandardScaler,
    list_datasets,
    load_forecasting,
    synthetic_forecasting,
)

BUNDLED_ETTH1 = pathlib.Path(mmx_jax.data.__file__).parent / "bundled" / "ETTh1.csv.xz"
PRED_LEN = 96


@functools.cache
def _load(source: str, seq_len: int, pred_len: int = PRED_LEN, features: str = "M",
          data_dir: str | None = None):
    return load_forecasting(source, seq_len=seq_len, pred_len=pred_len, features=features,
                            data_dir=data_dir)


@functools.cache
def _raw(path: str) -> pd.DataFrame:
    return pd.read_csv(path)


def _tslib_ett(month: int, seq_len: int) -> list[tuple[int, int]]:
    """TSLib's Dataset_ETT_hour / _minute borders, written out (month = 30 days of rows)."""
    border1s = [0, 12 * month - seq_len, 12 * month + 4 * month - seq_len]
    border2s = [12 * month, 12 * month + 4 * month, 12 * month + 8 * month]
    return list(zip(border1s, border2s, strict=True))


def _tslib_custom(n: int, seq_len: int) -> list[tuple[int, int]]:
    """TSLib's Dataset_Custom borders, written out."""
    num_train, num_test = int(n * 0.7), int(n * 0.2)
    num_vali = n - num_train - num_test
    border1s = [0, num_train - seq_len, n - num_test - seq_len]
    border2s = [num_train, num_train + num_vali, n]
    return list(zip(border1s, border2s, strict=True))


def _check_against_raw(data, raw: np.ndarray, borders, rng, out_cols=None, dates=None):
    """Row counts, window counts, the scaler and random windows of every split against `raw`
    (float64 rows of the file in the expected column order) scaled here with NumPy."""
    seq_len, pred_len = data.seq_len, data.pred_len
    train = raw[borders[0][0]:borders[0][1]]
    mean, std = train.mean(axis=0), train.std(axis=0)
    np.testing.assert_allclose(data.scaler.mean, mean, rtol=1e-12)
    np.testing.assert_allclose(data.scaler.scale, std, rtol=1e-10)
    scaled = (raw - mean) / std
    out_cols = list(range(raw.shape[1])) if out_cols is None else out_cols
    for split, (b1, b2) in zip((data.train, data.val, data.test), borders, strict=True):
        assert (split.border1, split.border2) == (b1, b2)
        assert split.num_rows == b2 - b1
        assert len(split) == (b2 - b1) - seq_len - pred_len + 1
        idx = np.concatenate([[0, len(split) - 1], rng.choice(len(split), 6, replace=False)])
        x, y = split.get_batch(idx)
        assert x.dtype == y.dtype == np.float32
        assert x.shape == (len(idx), seq_len, raw.shape[1])
        assert y.shape == (len(idx), pred_len, len(out_cols))
        for k, i in enumerate(idx):
            s = b1 + i
            np.testing.assert_allclose(x[k], scaled[s:s + seq_len], rtol=1e-5, atol=1e-5)
            target_rows = scaled[s + seq_len:s + seq_len + pred_len][:, out_cols]
            np.testing.assert_allclose(y[k], target_rows, rtol=1e-5, atol=1e-5)
            if dates is not None:
                np.testing.assert_array_equal(split.target_dates([i])[0],
                                              dates[s + seq_len:s + seq_len + pred_len])


@pytest.mark.parametrize("seq_len", [512, 96])
def test_etth1_splits_scaler_and_windows(shared_data, rng, seq_len):
    path = shared_data / "timeseries" / "ETTh1.csv.xz"
    data = _load("ETTh1", seq_len, data_dir=str(shared_data / "timeseries"))
    assert data.path.resolve() == path.resolve()
    assert data.layout == "ett_hour"
    frame = _raw(str(path))
    raw = frame[frame.columns[1:]].to_numpy(np.float64)
    dates = pd.to_datetime(frame["date"]).to_numpy().astype("datetime64[ns]")
    borders = _tslib_ett(30 * 24, seq_len)
    assert [b2 - b1 for b1, b2 in borders] == [8640, 2880 + seq_len, 2880 + seq_len]
    assert [data.borders[s] for s in ("train", "val", "test")] == borders
    assert len(data.train) == 8640 - seq_len - PRED_LEN + 1
    assert len(data.val) == len(data.test) == 2880 + seq_len - seq_len - PRED_LEN + 1
    np.testing.assert_allclose(data.scaler.mean, raw[:8640].mean(axis=0), rtol=1e-12)
    assert data.columns == tuple(frame.columns[1:])
    _check_against_raw(data, raw, borders, rng, dates=dates)


def test_ettm1_rows_are_four_times_hourly(shared_data, rng):
    path = shared_data / "timeseries" / "ETTm1.csv.xz"
    data = _load("ettm1", 96, data_dir=str(shared_data / "timeseries"))
    assert data.layout == "ett_minute" and data.name == "ETTm1"
    borders = _tslib_ett(30 * 24 * 4, 96)
    assert [b2 - b1 for b1, b2 in borders] == [4 * 8640, 4 * 2880 + 96, 4 * 2880 + 96]
    frame = _raw(str(path))
    _check_against_raw(data, frame[frame.columns[1:]].to_numpy(np.float64), borders, rng)


@pytest.mark.parametrize("name", ["weather", "exchange_rate"])
def test_custom_csv_splits_and_windows(shared_data, rng, name):
    path = shared_data / "timeseries" / f"{name}.csv.xz"
    data = _load(name, 96, data_dir=str(shared_data / "timeseries"))
    assert data.layout == "custom"
    frame = _raw(str(path))
    expected_columns = [c for c in frame.columns if c not in ("date", "OT")] + ["OT"]
    assert data.columns == tuple(expected_columns)
    raw = frame[expected_columns].to_numpy(np.float64)
    borders = _tslib_custom(len(frame), 96)
    n = len(frame)
    assert [b2 - b1 for b1, b2 in borders] == [
        int(n * 0.7), n - int(n * 0.7) - int(n * 0.2) + 96, int(n * 0.2) + 96]
    _check_against_raw(data, raw, borders, rng)


def test_bundled_etth1_is_the_shared_file_and_the_default(shared_data, monkeypatch, tmp_path):
    shared = shared_data / "timeseries" / "ETTh1.csv.xz"
    digest = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (BUNDLED_ETTH1, shared)]
    assert digest[0] == digest[1]
    monkeypatch.setenv("MMX_DATA_DIR", str(tmp_path))  # an env folder does not shadow the copy
    for name in ("ETTh1", "etth1"):
        data = load_forecasting(name, seq_len=96, pred_len=PRED_LEN)
        assert data.path.resolve() == BUNDLED_ETTH1.resolve()
    reference = _load("ETTh1", 96, data_dir=str(shared_data / "timeseries"))
    np.testing.assert_array_equal(data.test.get_batch([0, 7])[1],
                                  reference.test.get_batch([0, 7])[1])


def test_names_resolve_in_data_dir_then_env(shared_data, monkeypatch, tmp_path):
    folder = shared_data / "timeseries"
    data = load_forecasting("ETTH2", seq_len=96, pred_len=24, data_dir=folder)
    assert data.path.name == "ETTh2.csv.xz" and data.layout == "ett_hour"
    monkeypatch.setenv("MMX_DATA_DIR", str(folder))
    data = load_forecasting("Exchange_Rate", seq_len=96, pred_len=24, data_dir=tmp_path)
    assert data.path.name == "exchange_rate.csv.xz" and data.name == "exchange_rate"
    assert {d.name for d in list_datasets()} >= {"ETTh1", "ETTm2", "weather", "traffic"}


def test_batches_keep_last_partial_and_shuffle_per_epoch():
    data = _load(str(BUNDLED_ETTH1), 512)  # bundled: runs without the shared folder
    test = data.test
    n = 2880 + 512 - 512 - PRED_LEN + 1
    assert len(test) == n
    plan = test.batch_indices(32)
    assert [len(b) for b in plan] == [32] * (n // 32) + [n % 32]
    np.testing.assert_array_equal(np.concatenate(plan), np.arange(n))
    batches = list(test.iter_batches(32))
    assert len(batches) == test.num_batches(32) == n // 32 + 1
    assert batches[-1][0].shape == (n % 32, 512, 7) and batches[-1][1].shape == (n % 32, 96, 7)
    assert [len(b) for b in test.batch_indices(32, drop_last=True)] == [32] * (n // 32)

    train = data.train
    m = len(train)
    epoch0 = train.batch_indices(64, shuffle=True, seed=3, epoch=0)
    again = train.batch_indices(64, shuffle=True, seed=3, epoch=0)
    epoch1 = train.batch_indices(64, shuffle=True, seed=3, epoch=1)
    other_seed = train.batch_indices(64, shuffle=True, seed=4, epoch=0)
    for plan in (epoch0, epoch1, other_seed):
        np.testing.assert_array_equal(np.sort(np.concatenate(plan)), np.arange(m))
    np.testing.assert_array_equal(np.concatenate(epoch0), np.concatenate(again))
    assert not np.array_equal(np.concatenate(epoch0), np.concatenate(epoch1))
    assert not np.array_equal(np.concatenate(epoch0), np.concatenate(other_seed))
    assert not np.array_equal(np.concatenate(epoch0), np.arange(m))
    dropped = np.concatenate(train.batch_indices(64, shuffle=True, seed=3, epoch=0,
                                                 drop_last=True))
    assert len(dropped) == m - m % 64 and len(np.unique(dropped)) == len(dropped)

    resumed = list(train.iter_batches(64, shuffle=True, seed=3, epoch=1, start_batch=120))
    assert len(resumed) == len(epoch1) - 120
    for (x, y), idx in zip(resumed[:3] + resumed[-1:], epoch1[120:123] + epoch1[-1:],
                           strict=True):
        xr, yr = train.get_batch(idx)
        np.testing.assert_array_equal(x, xr)
        np.testing.assert_array_equal(y, yr)


def test_s_and_ms_modes_column_counts_and_target_values(rng):
    frame = _raw(str(BUNDLED_ETTH1))
    raw = frame[frame.columns[1:]].to_numpy(np.float64)
    ot = raw[:, -1:]
    borders = _tslib_ett(30 * 24, 96)
    data_s = _load(str(BUNDLED_ETTH1), 96, features="S")
    assert data_s.columns == data_s.output_columns == ("OT",)
    assert (data_s.num_input_variates, data_s.num_output_variates) == (1, 1)
    _check_against_raw(data_s, ot, borders, rng)  # scaler fitted on OT alone

    data_ms = _load(str(BUNDLED_ETTH1), 96, features="MS")
    assert len(data_ms.columns) == 7 and data_ms.output_columns == ("OT",)
    _check_against_raw(data_ms, raw, borders, rng, out_cols=[6])
    _, y = data_ms.val.get_batch([5])
    start = borders[1][0] + 5 + 96
    np.testing.assert_allclose(data_ms.inverse_transform_outputs(y)[0],
                               ot[start:start + PRED_LEN], rtol=1e-5)


def _write(path: pathlib.Path, header: list[str], rows: list[list[str]], newline="\n") -> None:
    lines = [",".join(header)] + [",".join(r) for r in rows]
    path.write_text(newline.join(lines) + newline)


def _table(rng, num_rows: int, columns: int) -> tuple[list[str], np.ndarray]:
    dates = pd.date_range("2021-03-01", periods=num_rows, freq="h").strftime("%Y-%m-%d %H:%M:%S")
    return list(dates), rng.normal(10, 3, (num_rows, columns)).round(4)


def _rows(dates, values) -> list[list[str]]:
    return [[d, *map(str, v)] for d, v in zip(dates, values, strict=True)]


def test_custom_target_goes_last_and_ms_outputs_it(tmp_path, rng):
    dates, values = _table(rng, 300, 4)
    path = tmp_path / "toy.csv"
    _write(path, ["date", "a", "load", "b", "c"], _rows(dates, values), newline="\r\n")
    borders = _tslib_custom(300, 24)
    order = [0, 2, 3, 1]  # a, b, c, then the target "load"
    data = load_forecasting("TOY", seq_len=24, pred_len=12, target="load", data_dir=tmp_path)
    assert data.columns == ("a", "b", "c", "load") and data.layout == "custom"
    _check_against_raw(data, values[:, order], borders, rng,
                       dates=np.array(dates, dtype="datetime64[ns]"))
    data_ms = load_forecasting(path, seq_len=24, pred_len=12, features="MS", target="load")
    assert data_ms.output_columns == ("load",)
    _check_against_raw(data_ms, values[:, order], borders, rng, out_cols=[3])
    data_s = load_forecasting(path, seq_len=24, pred_len=12, features="S", target="load")
    assert data_s.columns == data_s.output_columns == ("load",)
    _check_against_raw(data_s, values[:, 1:2], borders, rng)


def test_trailing_blank_lines_are_ignored(tmp_path, rng):
    dates, values = _table(rng, 200, 2)
    path = tmp_path / "trailing.csv"
    _write(path, ["date", "a", "OT"], _rows(dates, values) + [[""], [""]])
    data = load_forecasting(path, seq_len=24, pred_len=12)
    assert data.num_rows == 200


def test_missing_files_say_where_they_looked(tmp_path, monkeypatch):
    monkeypatch.delenv("MMX_DATA_DIR", raising=False)
    with pytest.raises(DataFileNotFoundError) as err:
        load_forecasting("nosuch", seq_len=24, pred_len=12, data_dir=tmp_path)
    message = str(err.value)
    assert "nosuch.csv" in message and str(tmp_path) in message and "MMX_DATA_DIR" in message
    assert "bundled" in message
    with pytest.raises(DataFileNotFoundError, match="absent.csv"):
        load_forecasting(tmp_path / "absent.csv", seq_len=24, pred_len=12)
    with pytest.raises(FileNotFoundError, match="weather"):  # not bundled, no env, no data_dir
        load_forecasting("weather", seq_len=24, pred_len=12)


def _expect(path, match_all: list[str], **kwargs) -> None:
    kwargs = {"seq_len": 24, "pred_len": 12, **kwargs}
    with pytest.raises(ForecastingDataError) as err:
        load_forecasting(path, **kwargs)
    assert isinstance(err.value, ValueError)
    for text in [path.name, *match_all]:
        assert text in str(err.value), (text, str(err.value))


def test_bad_inputs_name_the_file_and_the_problem(tmp_path, rng):
    dates, values = _table(rng, 200, 3)
    good = _rows(dates, values)

    path = tmp_path / "nodate.csv"
    _write(path, ["time", "a", "b", "OT"], good)
    _expect(path, ["no 'date' column", "first column is 'time'"])

    path = tmp_path / "text_cell.csv"
    rows = [list(r) for r in good]
    rows[57][2] = "oops"  # column b
    _write(path, ["date", "a", "b", "OT"], rows)
    _expect(path, ["'b'", "non-numeric", "'oops'", "data row 57", "line 59"])

    path = tmp_path / "nan_cell.csv"
    rows = [list(r) for r in good]
    rows[80][1] = ""  # column a
    rows[150][3] = "NaN"
    _write(path, ["date", "a", "b", "OT"], rows)
    _expect(path, ["'a'", "empty or NaN", "data row 80", "line 82", "2 bad cell"])

    path = tmp_path / "bad_date.csv"
    rows = [list(r) for r in good]
    rows[33][0] = "not a date"
    _write(path, ["date", "a", "b", "OT"], rows)
    _expect(path, ["'date'", "'not a date'", "data row 33", "line 35"])

    path = tmp_path / "blank_line.csv"
    _write(path, ["date", "a", "b", "OT"], good[:40] + [[""]] + good[40:])
    _expect(path, ["data row 40", "line 42", "empty"])

    path = tmp_path / "ok.csv"
    _write(path, ["date", "a", "b", "OT"], good)
    _expect(path, ["target column 'zz'", "'a'", "'OT'"], target="zz")
    _expect(path, ["features", "'X'"], features="X")
    _expect(path, ["layout", "'hourly'"], layout="hourly")
    _expect(path, ["seq_len", "0"], seq_len=0)

    path = tmp_path / "short.csv"
    _write(path, ["date", "a", "b", "OT"], good[:100])
    (b1, b2), seq_len, pred_len = _tslib_custom(100, 24)[1], 24, 24
    assert b2 - b1 < seq_len + pred_len  # val: 10 own rows + 24 look-back
    _expect(path, ["val split", f"has {b2 - b1} rows", f"= {seq_len + pred_len}"],
            seq_len=seq_len, pred_len=pred_len)

    path = tmp_path / "ETTh_small.csv"
    _write(path, ["date", "a", "b", "OT"], good)
    _expect(path, ["'ett_hour'", "14400", "has 200"])


def test_standard_scaler_matches_population_std_and_constant_columns(rng):
    rows = rng.normal(3, 2, (50, 3))
    rows[:, 1] = 7.25
    scaler = StandardScaler.fit(rows)
    np.testing.assert_allclose(scaler.mean, rows.mean(axis=0), rtol=1e-12)
    expected_scale = np.sqrt(((rows - rows.mean(axis=0)) ** 2).sum(axis=0) / 50)
    expected_scale[1] = 1.0
    np.testing.assert_allclose(scaler.scale, expected_scale, rtol=1e-12)
    x = rng.normal(size=(4, 6, 3)).astype(np.float32)
    assert scaler.transform(x).dtype == np.float32
    np.testing.assert_allclose(scaler.inverse_transform(scaler.transform(x)), x, rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(scaler.inverse_transform(x[..., 2:], columns=[2]),
                               x[..., 2:] * expected_scale[2] + rows[:, 2].mean(), rtol=1e-6)


@pytest.mark.parametrize("features,c_in,c_out", [("M", 321, 321), ("S", 1, 1), ("MS", 321, 1)])
def test_synthetic_data_follows_the_custom_split(rng, features, c_in, c_out):
    data = synthetic_forecasting(1500, 321, seq_len=96, pred_len=24, seed=5, features=features)
    borders = _tslib_custom(1500, 96)
    assert [data.borders[s] for s in ("train", "val", "test")] == borders
    assert (data.num_input_variates, data.num_output_variates) == (c_in, c_out)
    x, y = data.val.get_batch(rng.choice(len(data.val), 4, replace=False))
    assert x.shape == (4, 96, c_in) and y.shape == (4, 24, c_out)
    train = data.train.input_rows.astype(np.float64)
    np.testing.assert_allclose(train.mean(axis=0), 0, atol=1e-4)
    np.testing.assert_allclose(train.std(axis=0), 1, atol=1e-4)
    same = synthetic_forecasting(1500, 321, seq_len=96, pred_len=24, seed=5, features=features)
    other = synthetic_forecasting(1500, 321, seq_len=96, pred_len=24, seed=6, features=features)
    np.testing.assert_array_equal(same.test.output_rows, data.test.output_rows)
    assert not np.allclose(other.test.output_rows, data.test.output_rows)
