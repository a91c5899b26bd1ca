"""Long-term forecasting data, split and scaled as in thuml/Time-Series-Library (TSLib).

    data = load_forecasting("ETTh1", seq_len=512, pred_len=96)          # bundled copy
    data = load_forecasting("weather", seq_len=512, pred_len=96, data_dir="path/to/csvs")
    for x, y in data.train.iter_batches(32, shuffle=True, seed=0, epoch=epoch, drop_last=True):
        ...  # x: (32, 512, 7) float32, y: (32, 96, 7) float32

A file is a CSV (or ``.csv.xz``) whose header names a ``date`` column; every other column is a
variate. Three layouts decide the split (L = seq_len; rows of the file, end excluded):

    ett_hour    train [0, 8640)    val [8640 - L, 11520)    test [11520 - L, 14400)
                (12 / 4 / 4 months of 30 days; rows after 14400 are not used)
    ett_minute  the same times 4
    custom      n_train = int(0.7 n), n_test = int(0.2 n), n_val = n - n_train - n_test;
                train [0, n_train)  val [n_train - L, n_train + n_val)  test [n - n_test - L, n)

Val and test reach back L rows, so their first window's first target is the split's first own
row. The custom layout orders the columns as date, the others in file order, the target last;
ETT files keep their file order. A StandardScaler (population std, ddof 0) is fitted on the
train rows of the used columns and applied to every row. Window i of a split is
x = rows [i, i + L) and y = rows [i + L, i + L + pred_len) of that split, stride 1.

features: "M" all columns in and out; "S" the target alone in and out (the scaler sees only the
target); "MS" all columns in, the target out. Unlike TSLib, which takes the last column as the
MS output, MS here always outputs the named target (the same column whenever it is last, as in
every published file).

Known data sets (`list_datasets`), found as ``<file>.csv`` or ``<file>.csv.xz``, any letter case:

    name           file              layout       variates  interval
    ETTh1, ETTh2   ETTh1, ETTh2      ett_hour            7  1 hour
    ETTm1, ETTm2   ETTm1, ETTm2      ett_minute          7  15 minutes
    weather        weather           custom             21  10 minutes
    exchange_rate  exchange_rate     custom              8  1 day
    electricity    electricity       custom            321  1 hour
    traffic        traffic           custom            862  1 hour
    illness        national_illness  custom              7  1 week

ETTh1 ships inside this package (zhouhaoyi/ETDataset, CC BY-ND 4.0, unchanged).
"""

from __future__ import annotations

import dataclasses
import logging
import lzma
import os
import pathlib
import warnings
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np

log = logging.getLogger(__name__)

ENV_DATA_DIR = "MMX_DATA_DIR"
LAYOUTS: tuple[str, ...] = ("ett_hour", "ett_minute", "custom")
FEATURES: tuple[str, ...] = ("M", "S", "MS")
SPLITS: tuple[str, ...] = ("train", "val", "test")
BUNDLED_DIR = pathlib.Path(__file__).resolve().with_name("bundled")

_HOURS_PER_MONTH = 30 * 24  # TSLib's ETT months are 30 days
_SUFFIXES = (".csv", ".csv.xz")


class DataFileNotFoundError(FileNotFoundError):
    """A data file could not be found; the message says where it was looked for."""


class ForecastingDataError(ValueError):
    """A data file or an argument cannot give forecasting windows; the message says why."""


class DatasetInfo(NamedTuple):
    """One known data set: its name, the file stem, the split layout and its shape."""

    name: str
    file_stem: str
    layout: str
    num_variates: int
    interval: str


_DATASETS: tuple[DatasetInfo, ...] = (
    DatasetInfo("ETTh1", "ETTh1", "ett_hour", 7, "1 hour"),
    DatasetInfo("ETTh2", "ETTh2", "ett_hour", 7, "1 hour"),
    DatasetInfo("ETTm1", "ETTm1", "ett_minute", 7, "15 minutes"),
    DatasetInfo("ETTm2", "ETTm2", "ett_minute", 7, "15 minutes"),
    DatasetInfo("weather", "weather", "custom", 21, "10 minutes"),
    DatasetInfo("exchange_rate", "exchange_rate", "custom", 8, "1 day"),
    DatasetInfo("electricity", "electricity", "custom", 321, "1 hour"),
    DatasetInfo("traffic", "traffic", "custom", 862, "1 hour"),
    DatasetInfo("illness", "national_illness", "custom", 7, "1 week"),
)
_BY_NAME = {key.lower(): d for d in _DATASETS for key in (d.name, d.file_stem)}


def list_datasets() -> tuple[DatasetInfo, ...]:
    """The known data sets (names are matched case-insensitively by `load_forecasting`)."""
    return _DATASETS


def layout_for_file(path: str | os.PathLike) -> str:
    """The split layout TSLib uses for a file name: ETTh* -> ett_hour, ETTm* -> ett_minute,
    anything else -> custom (letter case ignored)."""
    name = pathlib.Path(path).name.lower()
    if name.startswith("etth"):
        return "ett_hour"
    if name.startswith("ettm"):
        return "ett_minute"
    return "custom"


def split_borders(layout: str, num_rows: int, seq_len: int) -> dict[str, tuple[int, int]]:
    """TSLib's (border1, border2) file rows of each split, end excluded, val and test reaching
    back ``seq_len`` rows. Lengths are not checked here (`load_forecasting` checks them)."""
    if layout in ("ett_hour", "ett_minute"):
        month = _HOURS_PER_MONTH * (4 if layout == "ett_minute" else 1)
        ends = (12 * month, 16 * month, 20 * month)
        starts = (0, ends[0] - seq_len, ends[1] - seq_len)
    elif layout == "custom":
        num_train = int(num_rows * 0.7)
        num_test = int(num_rows * 0.2)
        num_val = num_rows - num_train - num_test
        starts = (0, num_train - seq_len, num_rows - num_test - seq_len)
        ends = (num_train, num_train + num_val, num_rows)
    else:
        raise ForecastingDataError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return {name: (s, e) for name, s, e in zip(SPLITS, starts, ends, strict=True)}


@dataclasses.dataclass(frozen=True, eq=False)
class StandardScaler:
    """Per-column standardisation like sklearn's: ``(x - mean) / scale`` with the population
    std (ddof 0); a column constant over the fitted rows gets scale 1.

    Attributes:
      mean, scale: (C,) float64.
    """

    mean: np.ndarray
    scale: np.ndarray

    @classmethod
    def fit(cls, rows: np.ndarray) -> StandardScaler:
        """Fits on ``rows`` of shape (R, C), R >= 1, in float64."""
        rows = np.asarray(rows)
        if rows.ndim != 2 or rows.shape[0] < 1:
            raise ValueError(f"StandardScaler.fit: rows has shape {rows.shape}, wanted (R, C) "
                             "with R >= 1")
        mean = rows.mean(axis=0, dtype=np.float64)
        std = rows.std(axis=0, dtype=np.float64)
        constant = np.ptp(rows, axis=0) == 0
        return cls(mean=mean, scale=np.where(constant, 1.0, std))

    def _select(self, x: np.ndarray, columns: Sequence[int] | None):
        mean, scale = self.mean, self.scale
        if columns is not None:
            mean, scale = mean[list(columns)], scale[list(columns)]
        if x.shape[-1:] != mean.shape:
            raise ValueError(f"StandardScaler: array has shape {x.shape}, wanted a last axis of "
                             f"{mean.shape[0]} columns")
        dtype = x.dtype if x.dtype in (np.float32, np.float64) else np.float64
        return mean, scale, dtype

    def transform(self, x: np.ndarray, columns: Sequence[int] | None = None) -> np.ndarray:
        """Scales ``x`` of shape (..., C); ``columns`` picks the scaler columns x holds.
        float32 stays float32, anything else becomes float64."""
        x = np.asarray(x)
        mean, scale, dtype = self._select(x, columns)
        return ((x - mean) / scale).astype(dtype, copy=False)

    def inverse_transform(self, x: np.ndarray,
                          columns: Sequence[int] | None = None) -> np.ndarray:
        """Undoes `transform`: ``x * scale + mean``, x of shape (..., C) or (..., len(columns))."""
        x = np.asarray(x)
        mean, scale, dtype = self._select(x, columns)
        return (x * scale + mean).astype(dtype, copy=False)


@dataclasses.dataclass(frozen=True, eq=False)
class ForecastingSplit:
    """One split's scaled rows and its stride-1 windows.

    Window ``i`` (0 <= i < num_windows) is x = input_rows[i : i + seq_len] and
    y = output_rows[i + seq_len : i + seq_len + pred_len]; its first target is file row
    ``border1 + i + seq_len``.

    Attributes:
      name: "train", "val" or "test".
      border1, border2: the split's rows in the file, [border1, border2).
      input_rows: (R, C_in) float32 scaled, R = border2 - border1.
      output_rows: (R, C_out) float32 scaled (the same array as input_rows in M and S modes).
      dates: (R,) datetime64[ns], the date of each row.
    """

    name: str
    border1: int
    border2: int
    seq_len: int
    pred_len: int
    input_rows: np.ndarray
    output_rows: np.ndarray
    dates: np.ndarray

    @property
    def num_rows(self) -> int:
        return self.border2 - self.border1

    @property
    def num_windows(self) -> int:
        return self.num_rows - self.seq_len - self.pred_len + 1

    def __len__(self) -> int:
        return self.num_windows

    def num_batches(self, batch_size: int, *, drop_last: bool = False) -> int:
        """How many batches `batch_indices` gives."""
        _check_positive_int("batch_size", batch_size)
        full, rest = divmod(self.num_windows, batch_size)
        return full + (1 if rest and not drop_last else 0)

    def batch_indices(self, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                      epoch: int = 0, drop_last: bool = False) -> list[np.ndarray]:
        """The epoch's batch plan: a list of int64 window-index arrays of ``batch_size`` each
        (the last one shorter unless ``drop_last``). Every window appears once per epoch.

        The shuffled order depends only on (seed, epoch), so a run resumes mid-epoch by skipping
        batches, and each host of a multi-host run can take its own slice of each global batch.
        """
        _check_positive_int("batch_size", batch_size)
        n = self.num_windows
        if shuffle:
            for arg, value in (("seed", seed), ("epoch", epoch)):
                _check_positive_int(arg, value, minimum=0)
            order = np.random.default_rng([int(seed), int(epoch)]).permutation(n)
        else:
            order = np.arange(n, dtype=np.int64)
        stop = n - n % batch_size if drop_last else n
        return [order[s:s + batch_size] for s in range(0, stop, batch_size)]

    def get_batch(self, indices: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Windows ``indices`` (b,) as x (b, seq_len, C_in) and y (b, pred_len, C_out), float32."""
        idx = self._check_indices(indices)
        x = self.input_rows[idx[:, None] + np.arange(self.seq_len)]
        y = self.output_rows[idx[:, None] + np.arange(self.seq_len, self.seq_len + self.pred_len)]
        return x, y

    def iter_batches(self, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                     epoch: int = 0, drop_last: bool = False,
                     start_batch: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yields `get_batch` of each entry of `batch_indices`, from batch ``start_batch`` on."""
        plan = self.batch_indices(batch_size, shuffle=shuffle, seed=seed, epoch=epoch,
                                  drop_last=drop_last)
        _check_positive_int("start_batch", start_batch, minimum=0)
        if start_batch > len(plan):
            raise ValueError(f"start_batch is {start_batch}, but the {self.name} split has only "
                             f"{len(plan)} batches of {batch_size}")
        for indices in plan[start_batch:]:
            yield self.get_batch(indices)

    def target_dates(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """The dates of the targets of windows ``indices``: (b, pred_len) datetime64[ns]."""
        idx = self._check_indices(indices)
        return self.dates[idx[:, None] + np.arange(self.seq_len, self.seq_len + self.pred_len)]

    def _check_indices(self, indices) -> np.ndarray:
        idx = np.asarray(indices)
        if idx.ndim != 1 or not (idx.size == 0 or np.issubdtype(idx.dtype, np.integer)):
            raise ValueError(f"indices must be a 1-D array of window numbers, got shape "
                             f"{idx.shape} dtype {idx.dtype}")
        idx = idx.astype(np.int64, copy=False)
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_windows):
            raise ValueError(f"indices must lie in [0, {self.num_windows}) for the {self.name} "
                             f"split, got values from {idx.min()} to {idx.max()}")
        return idx


@dataclasses.dataclass(frozen=True, eq=False)
class ForecastingData:
    """A data set split and scaled for one (seq_len, pred_len).

    Attributes:
      name: the data set name (the known name, or the file stem).
      path: the file read (None for synthetic data).
      layout, features, target, seq_len, pred_len: as loaded.
      num_rows: rows in the file.
      columns: the scaled columns in order (inputs are all of them: M, MS; only the target: S).
      output_columns: the columns of y.
      output_index: positions of output_columns in columns.
      scaler: fitted on the train rows of `columns`.
      borders: split name -> (border1, border2), file rows, end excluded.
      train, val, test: the splits.
    """

    name: str
    path: pathlib.Path | None
    layout: str
    features: str
    target: str
    seq_len: int
    pred_len: int
    num_rows: int
    columns: tuple[str, ...]
    output_columns: tuple[str, ...]
    output_index: tuple[int, ...]
    scaler: StandardScaler
    borders: dict[str, tuple[int, int]]
    train: ForecastingSplit
    val: ForecastingSplit
    test: ForecastingSplit

    @property
    def input_columns(self) -> tuple[str, ...]:
        return self.columns

    @property
    def num_input_variates(self) -> int:
        return len(self.columns)

    @property
    def num_output_variates(self) -> int:
        return len(self.output_columns)

    def split(self, name: str) -> ForecastingSplit:
        """The split called ``name`` ("train", "val" or "test")."""
        if name not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {name!r}")
        return getattr(self, name)

    def inverse_transform_outputs(self, y: np.ndarray) -> np.ndarray:
        """Scaled outputs (..., C_out) in file units (inputs: `scaler.inverse_transform`)."""
        return self.scaler.inverse_transform(y, columns=self.output_index)


def dataset_path(source: str | os.PathLike, *, data_dir: str | os.PathLike | None = None
                 ) -> pathlib.Path:
    """The file `load_forecasting` reads for ``source``.

    A path (os.PathLike, or a string containing a path separator or ending in .csv / .csv.xz) is
    taken as is. A name is matched case-insensitively against the known data sets and looked
    up as ``<file>.csv`` or ``<file>.csv.xz`` (any letter case, .csv preferred) in: data_dir,
    then $MMX_DATA_DIR, then the bundled folder when data_dir is given; without data_dir, the
    bundled folder first (so "ETTh1" is the bundled copy), then $MMX_DATA_DIR.
    """
    if isinstance(source, os.PathLike) or looks_like_path(str(source)):
        path = pathlib.Path(source).expanduser()
        if not path.is_file():
            raise DataFileNotFoundError(f"data file {str(path)!r} does not exist "
                                        f"(as given; the working directory is {os.getcwd()!r})")
        return path
    info = _BY_NAME.get(source.lower())
    stem = info.file_stem if info else source
    env = os.environ.get(ENV_DATA_DIR)
    folders: list[tuple[str, pathlib.Path]] = []
    if data_dir is not None:
        folders.append(("data_dir", pathlib.Path(data_dir).expanduser()))
    else:
        folders.append(("bundled", BUNDLED_DIR))
    if env:
        folders.append((f"${ENV_DATA_DIR}", pathlib.Path(env).expanduser()))
    if data_dir is not None:
        folders.append(("bundled", BUNDLED_DIR))
    for _, folder in folders:
        found = _find_in_folder(folder, stem)
        if found is not None:
            return found
    looked = "; ".join(f"{label} {str(folder)!r}" + ("" if folder.is_dir() else " (no such folder)")
                       for label, folder in folders)
    hint = "" if env else f"; ${ENV_DATA_DIR} is not set"
    known = "" if info else (f" ({source!r} is not a known data set: "
                             f"{', '.join(d.name for d in _DATASETS)}; or give a path to a CSV)")
    raise DataFileNotFoundError(f"no file for data set {source!r}{known}: looked for "
                                f"{stem}.csv and {stem}.csv.xz in {looked}{hint}")


def load_forecasting(source: str | os.PathLike = "ETTh1", *, seq_len: int, pred_len: int,
                     features: str = "M", target: str = "OT", layout: str | None = None,
                     data_dir: str | os.PathLike | None = None) -> ForecastingData:
    """Loads, splits and scales a forecasting CSV the TSLib way.

    Args:
      source: a data set name (see `list_datasets`; case-insensitive) or a path to a CSV
        (.csv or .csv.xz); how names are found: `dataset_path`.
      seq_len: L, the input window (the paper uses 512).
      pred_len: H, the horizon (96, 192, 336, 720).
      features: "M", "S" or "MS" (module docstring).
      target: the target column (last in the custom layout; the output of S and MS).
      layout: "ett_hour", "ett_minute" or "custom"; None picks it from the file name.
      data_dir: a folder to look in first.

    Returns:
      `ForecastingData`; batches are x (b, seq_len, C_in), y (b, pred_len, C_out), float32.

    Raises:
      DataFileNotFoundError: the file is missing (the message says where it looked).
      ForecastingDataError: a bad argument, no ``date`` column, a missing target, an empty,
        non-numeric or unreadable cell (column, data row and file line named), or a split too
        short for seq_len + pred_len.
    """
    path = dataset_path(source, data_dir=data_dir)
    seq_len, pred_len = _check_window(seq_len, pred_len, where=str(path))
    _check_features(features, where=str(path))
    if layout is not None and layout not in LAYOUTS:
        raise ForecastingDataError(f"{path}: layout must be one of {LAYOUTS} or None, got "
                                   f"{layout!r}")
    layout = layout or layout_for_file(path)
    dates, values, columns = _read_csv(path, target=target, features=features, layout=layout)
    stem = _strip_suffix(path.name)
    info = _BY_NAME.get(stem.lower())
    return _assemble(name=info.name if info else stem, path=path, label=str(path),
                     layout=layout, features=features, target=target, columns=columns,
                     values=values, dates=dates, seq_len=seq_len, pred_len=pred_len)


def synthetic_forecasting(num_rows: int, num_variates: int, *, seq_len: int, pred_len: int,
                          seed: int, features: str = "M") -> ForecastingData:
    """Noisy sinusoids (a daily-like and a slow period per variate), hourly from 2000-01-01,
    split and scaled like a custom CSV. For shape tests and for stand-ins of absent files
    (Electricity: 26304 x 321, Traffic: 17544 x 862). Columns v0, v1, ..., the last is "OT".
    """
    _check_positive_int("num_rows", num_rows)
    _check_positive_int("num_variates", num_variates)
    seq_len, pred_len = _check_window(seq_len, pred_len)
    _check_features(features)
    rng = np.random.default_rng(seed)
    v = num_variates

    def uniform(low: float, high: float) -> np.ndarray:
        return rng.uniform(low, high, v).astype(np.float32)

    t = np.arange(num_rows, dtype=np.float32)[:, None]
    values = rng.normal(0, 3, v).astype(np.float32) + uniform(0.05, 0.3) * rng.standard_normal(
        (num_rows, v), dtype=np.float32)
    for low, high in ((12, 36), (100, 400)):  # a daily-like and a slow period per variate
        values += uniform(0.5, 2) * np.sin(np.float32(2 * np.pi) * t / uniform(low, high)
                                           + uniform(0, 2 * np.pi))
    columns = tuple(f"v{i}" for i in range(v - 1)) + ("OT",)
    if features == "S":
        values, columns = values[:, -1:], ("OT",)
    dates = np.datetime64("2000-01-01T00:00", "ns") + np.arange(num_rows) * np.timedelta64(1, "h")
    return _assemble(name="synthetic", path=None,
                     label=f"synthetic data ({num_rows} rows x {num_variates} variates)",
                     layout="custom", features=features, target="OT", columns=columns,
                     values=values, dates=dates, seq_len=seq_len, pred_len=pred_len)


def _assemble(*, name: str, path: pathlib.Path | None, label: str, layout: str, features: str,
              target: str, columns: tuple[str, ...], values: np.ndarray, dates: np.ndarray,
              seq_len: int, pred_len: int) -> ForecastingData:
    """Checks the lengths, fits the scaler on the train rows and cuts the splits."""
    n = values.shape[0]
    borders = split_borders(layout, n, seq_len)
    if layout != "custom" and n < borders["test"][1]:
        raise ForecastingDataError(f"{label}: layout {layout!r} needs at least "
                                   f"{borders['test'][1]} rows (12 + 4 + 4 months), the file has "
                                   f"{n}")
    for split_name, (b1, b2) in borders.items():
        if b2 - b1 < seq_len + pred_len:
            raise ForecastingDataError(
                f"{label}: the {split_name} split has {b2 - b1} rows (file rows {b1} to "
                f"{b2 - 1}, {n} rows in all, layout {layout!r}), fewer than seq_len + pred_len "
                f"= {seq_len} + {pred_len} = {seq_len + pred_len}: no window fits")
    scaler = StandardScaler.fit(values[slice(*borders["train"])])
    scaled = scaler.transform(values).astype(np.float32, copy=False)
    output_index = (columns.index(target),) if features == "MS" else tuple(range(len(columns)))
    outputs = scaled if features != "MS" else np.ascontiguousarray(scaled[:, list(output_index)])
    splits = {s: ForecastingSplit(name=s, border1=b1, border2=b2, seq_len=seq_len,
                                  pred_len=pred_len, input_rows=scaled[b1:b2],
                                  output_rows=outputs[b1:b2], dates=dates[b1:b2])
              for s, (b1, b2) in borders.items()}
    return ForecastingData(name=name, path=path, layout=layout, features=features, target=target,
                           seq_len=seq_len, pred_len=pred_len, num_rows=n, columns=columns,
                           output_columns=tuple(columns[i] for i in output_index),
                           output_index=output_index, scaler=scaler, borders=borders, **splits)


def read_frame(path: str | os.PathLike):
    """A CSV file (.csv or .csv.xz) as a pandas DataFrame, its header checked (`_read_csv`'s
    first part; what `mmx_jax.inference.Forecaster.predict` reads)."""
    import pandas as pd  # here, not at module level: importing mmx_jax.data stays cheap

    path = pathlib.Path(path)
    try:
        # Blank lines are kept as empty rows so that data row r is always line r + 2.
        # Only empty cells are missing: "n/a" or "NaN" in a file is reported as written.
        frame = pd.read_csv(path, skip_blank_lines=False, encoding_errors="replace",
                            keep_default_na=False, na_values=[""])
    except FileNotFoundError as err:
        raise DataFileNotFoundError(f"data file {str(path)!r} does not exist") from err
    except (ValueError, lzma.LZMAError, EOFError) as err:  # parser, empty-file and xz errors
        raise ForecastingDataError(f"{path}: cannot be read as a CSV file: {err}") from err
    _check_header(path, [str(c) for c in frame.columns])
    return frame


def _read_csv(path: pathlib.Path, *, target: str, features: str, layout: str
              ) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Reads the file; returns dates (n,) datetime64[ns], values (n, C) float64 and the C column
    names in TSLib order (only the target in S mode). Every cell of them is checked."""
    import pandas as pd

    frame = read_frame(path)
    names = [str(c) for c in frame.columns]
    if "date" not in names:
        raise ForecastingDataError(f"{path}: no 'date' column; the first column is {names[0]!r} "
                                   "(the header must name the date column 'date', as TSLib needs)")
    if target not in names or target == "date":
        raise ForecastingDataError(f"{path}: target column {target!r} not found; the columns are "
                                   f"{_describe(names)}")
    empty = frame.isna().all(axis=1).to_numpy()
    num_rows = len(frame) - (np.argmin(empty[::-1]) if not empty.all() else len(frame))
    frame = frame.iloc[:num_rows]  # blank lines at the end of the file are harmless
    if num_rows == 0:
        raise ForecastingDataError(f"{path}: the file has a header but no data rows")
    if empty[:num_rows].any():
        r = int(np.argmax(empty))
        raise ForecastingDataError(f"{path}: data row {r} (line {r + 2} of the file) is empty")

    others = [c for c in names if c not in ("date", target)]
    if features == "S":
        columns = [target]
    elif layout == "custom":
        columns = [*others, target]
    else:
        columns = [c for c in names if c != "date"]
    values = np.empty((num_rows, len(columns)), dtype=np.float64)
    for j, col in enumerate(columns):
        values[:, j] = pd.to_numeric(frame[col], errors="coerce").to_numpy(
            dtype=np.float64, na_value=np.nan)
    bad = ~np.isfinite(values)
    if bad.any():
        r, j = (int(i) for i in np.argwhere(bad)[0])
        cell = frame[columns[j]].iloc[r]
        if pd.isna(cell):
            what = "an empty or NaN cell"
        elif isinstance(cell, (int, float, np.number)):
            what = f"a non-finite value {cell!r}"
        else:
            what = f"a non-numeric cell {cell!r}"
        raise ForecastingDataError(f"{path}: column {columns[j]!r} has {what} at data row {r} "
                                   f"(line {r + 2} of the file); {int(bad.sum())} bad cell(s) in "
                                   "the columns used")
    _check_scale(path, values, columns)
    dates = _parse_dates(frame["date"], path)
    _check_order(path, dates)
    return dates, values, tuple(columns)


def infer_frequency(dates: np.ndarray) -> str | None:
    """The pandas frequency of regular time stamps ("h", "15min", "10min", "D", "W-SUN",
    "B", ...), or None when they have none. Looks at the last 1000; a few irregular steps
    (a repeated or a missing time stamp) fall back on the most common step."""
    import pandas as pd

    index = pd.DatetimeIndex(np.asarray(dates)[-1000:])
    if len(index) < 3:
        return None
    with warnings.catch_warnings():  # pandas 3 warns that it will return an offset later
        warnings.simplefilter("ignore")
        freq = pd.infer_freq(index)
    freq = getattr(freq, "freqstr", freq)
    if freq is None:
        nanoseconds = np.asarray(index.values, "datetime64[ns]").astype(np.int64)
        steps, counts = np.unique(np.diff(nanoseconds), return_counts=True)
        step = steps[np.argmax(counts)]
        if step <= 0 or counts.max() < 0.9 * counts.sum():
            return None
        for unit, ns in (("D", 86_400 * 10**9), ("h", 3_600 * 10**9), ("min", 60 * 10**9),
                         ("s", 10**9), ("ms", 10**6), ("us", 10**3), ("ns", 1)):
            if step % ns == 0:
                count = int(step // ns)
                return f"{count if count > 1 else ''}{unit}"
    return freq


def future_dates(last, freq: str, count: int) -> np.ndarray:
    """The `count` time stamps after `last` at frequency `freq`, datetime64[ns]."""
    import pandas as pd

    offset = pd.tseries.frequencies.to_offset(freq)
    return pd.date_range(pd.Timestamp(last) + offset, periods=count, freq=offset).to_numpy()


def _check_header(path: pathlib.Path, names: list[str]) -> None:
    """Duplicate column names (pandas would rename the second 'a' to 'a.1') and nameless
    columns (a pandas index written by to_csv, read back as 'Unnamed: 0') are refused."""
    import pandas as pd

    raw = [str(c).strip() for c in pd.read_csv(path, header=None, nrows=1,
                                               encoding_errors="replace").iloc[0]]
    seen: dict[str, int] = {}
    for i, name in enumerate(raw):
        if name in seen:
            raise ForecastingDataError(f"{path}: column name {name!r} appears twice in the "
                                       f"header (columns {seen[name]} and {i}); every column "
                                       "needs its own name")
        seen[name] = i
    for name in names:
        if name.startswith("Unnamed: "):
            raise ForecastingDataError(
                f"{path}: column {int(name.split(': ')[1])} has no name in the header (read as "
                f"{name!r}); it looks like a row index saved by pandas' to_csv: drop it, or "
                "write the file with to_csv(index=False)")


def _check_scale(path: pathlib.Path, values: np.ndarray, columns: list[str]) -> None:
    """Values the float32 pipeline cannot hold, or whose statistics overflow, are refused."""
    big = np.finfo(np.float32).max / 16
    with np.errstate(over="ignore", invalid="ignore"):
        spread = values.std(axis=0)
    for j, name in enumerate(columns):
        column = values[:, j]
        if np.abs(column).max() > big or not np.isfinite(spread[j]):
            r = int(np.argmax(np.abs(column)))
            raise ForecastingDataError(
                f"{path}: column {name!r} holds {column[r]:.3g} at data row {r} (line {r + 2} "
                f"of the file), beyond what float32 statistics can scale (|x| <= {big:.1g}); "
                "rescale the column (e.g. to other units) or drop it")


def _check_order(path: pathlib.Path, dates: np.ndarray) -> None:
    """The splits are by row order (the first rows train), so the time stamps must not go
    back: out-of-order rows would mix the future into the training rows. A repeated time
    stamp is reported."""
    step = np.diff(dates)
    zero = np.flatnonzero(step == np.timedelta64(0))
    back = np.flatnonzero(step < np.timedelta64(0))
    if back.size:
        r = int(back[0]) + 1
        raise ForecastingDataError(
            f"{path}: the dates are not in order: data row {r} (line {r + 2} of the file, "
            f"{dates[r]}) comes before the row above it ({dates[r - 1]}); {back.size} such "
            "place(s). The splits take the first rows for training, so the file must be sorted "
            "by date: sort it (e.g. pandas' sort_values('date')) and remove duplicates")
    if zero.size:  # reported, not refused: TSLib's own weather.csv repeats one time stamp
        r = int(zero[0]) + 1
        log.warning("%s: the time stamp %s appears twice, at data rows %d and %d (lines %d and "
                    "%d of the file); %d repeated time stamp(s) in all, kept as rows", path,
                    dates[r], r - 1, r, r + 1, r + 2, zero.size)


def _parse_dates(column, path: pathlib.Path) -> np.ndarray:
    import pandas as pd

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "could not infer format" on mixed dates
        try:
            dates = pd.to_datetime(column)
        except (ValueError, TypeError, OverflowError):
            dates = pd.to_datetime(column, format="mixed", errors="coerce")
    missing = dates.isna().to_numpy()
    if missing.any():
        r = int(np.argmax(missing))
        raise ForecastingDataError(f"{path}: column 'date' has an unreadable date "
                                   f"{column.iloc[r]!r} at data row {r} (line {r + 2} of the "
                                   "file)")
    if getattr(dates.dt, "tz", None) is not None:
        dates = dates.dt.tz_convert(None)
    return dates.to_numpy().astype("datetime64[ns]")


def _check_positive_int(name: str, value, *, minimum: int = 1, where: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        prefix = f"{where}: " if where else ""
        raise ForecastingDataError(f"{prefix}{name} must be an integer >= {minimum}, got "
                                   f"{value!r}")
    return int(value)


def _check_window(seq_len, pred_len, *, where: str = "") -> tuple[int, int]:
    return (_check_positive_int("seq_len", seq_len, where=where),
            _check_positive_int("pred_len", pred_len, where=where))


def _check_features(features, *, where: str = "") -> None:
    if features not in FEATURES:
        prefix = f"{where}: " if where else ""
        raise ForecastingDataError(f"{prefix}features must be one of {FEATURES} (M: all in and "
                                   f"out, S: target in and out, MS: all in, target out), got "
                                   f"{features!r}")


def looks_like_path(source: str) -> bool:
    """Whether a data source string is a file path (else a data set name)."""
    return (os.sep in source or "/" in source
            or any(source.lower().endswith(s) for s in _SUFFIXES))


def _strip_suffix(filename: str) -> str:
    for suffix in sorted(_SUFFIXES, key=len, reverse=True):
        if filename.lower().endswith(suffix):
            return filename[:-len(suffix)]
    return pathlib.Path(filename).stem


def _find_in_folder(folder: pathlib.Path, stem: str) -> pathlib.Path | None:
    if not folder.is_dir():
        return None
    wanted = [(stem + s).lower() for s in _SUFFIXES]
    matches = sorted((wanted.index(p.name.lower()), p.name, p) for p in folder.iterdir()
                     if p.name.lower() in wanted and p.is_file())
    return matches[0][2] if matches else None


def _describe(names: Sequence[str]) -> str:
    if len(names) <= 12:
        return repr(list(names))
    return f"{list(names[:10])!r} ... ({len(names)} in all)"
