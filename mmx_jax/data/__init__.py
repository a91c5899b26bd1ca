"""Input pipelines: time-series forecasting windows (`forecasting`)."""

from mmx_jax.data.forecasting import (
    DataFileNotFoundError,
    DatasetInfo,
    ForecastingData,
    ForecastingDataError,
    ForecastingSplit,
    StandardScaler,
    dataset_path,
    layout_for_file,
    list_datasets,
    load_forecasting,
    split_borders,
    synthetic_forecasting,
)

__all__ = [
    "DataFileNotFoundError",
    "DatasetInfo",
    "ForecastingData",
    "ForecastingDataError",
    "ForecastingSplit",
    "StandardScaler",
    "dataset_path",
    "layout_for_file",
    "list_datasets",
    "load_forecasting",
    "split_borders",
    "synthetic_forecasting",
]
