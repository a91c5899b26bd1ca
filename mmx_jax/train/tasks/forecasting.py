"""Multivariate long-term forecasting (Time-Series-Library protocol) as a task."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmx_jax.data import ForecastingData, load_forecasting
from mmx_jax.data.forecasting import infer_frequency
from mmx_jax.train.sharding import process_batch_slice
from mmx_jax.train.tasks.base import Task

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ForecastingTask(Task):
    """Multivariate forecasting with MSE loss; metrics MSE and MAE on the scaled data."""

    config: Any
    data: ForecastingData

    @classmethod
    def from_config(cls, config) -> ForecastingTask:
        d = config.data
        data = load_forecasting(d.name, seq_len=d.seq_len, pred_len=d.pred_len,
                                features=d.features, target=d.target, data_dir=d.data_dir)
        return cls(config, data)

    # -- model ----------------------------------------------------------------------------
    def model_shapes(self) -> dict[str, Any]:
        d = self.data
        return {"num_variates": d.num_input_variates, "seq_len": d.seq_len,
                "pred_len": d.pred_len}

    def describe(self) -> dict[str, Any]:
        d = self.data
        train_dates = d.split("train").dates
        return {"task": "forecasting", "source": str(d.path or d.name), "layout": d.layout,
                "features": d.features, "target": d.target, "seq_len": d.seq_len,
                "pred_len": d.pred_len, "columns": list(d.columns),
                "output_columns": list(d.output_columns),
                "scaler": {"mean": d.scaler.mean.tolist(), "scale": d.scaler.scale.tolist()},
                "freq": infer_frequency(train_dates),
                "model_shapes": self.model_shapes()}

    def fingerprint(self) -> str:
        """A digest of the data as loaded (file contents, columns, splits)."""
        digest = hashlib.sha256(json.dumps(list(self.data.columns)).encode())
        for split in ("train", "val", "test"):
            digest.update(np.ascontiguousarray(self.data.split(split).input_rows).tobytes())
        return f"{self.data.name}:{digest.hexdigest()[:16]}"

    def describe_split(self, split: str) -> str:
        """How many windows `split` has, and why (for messages)."""
        d = self.data
        part = d.split(split)
        return (f"{part.num_windows} window(s) of {d.seq_len} + {d.pred_len} rows in the "
                f"{part.num_rows} rows of the {split} split of {d.path or d.name}")

    def check_splits(self) -> None:
        """Warns about validation and test splits too short to measure much."""
        for split in ("val", "test"):
            n = self.data.split(split).num_windows
            if n < self.train_batch_size:
                log.warning("the %s split has only %s (fewer than a batch of %d): its metrics "
                            "are noisy; a longer series or a shorter data.seq_len + "
                            "data.pred_len gives more windows", split,
                            self.describe_split(split), self.train_batch_size)

    # -- batches --------------------------------------------------------------------------
    def steps_per_epoch(self) -> int:
        return self.data.train.num_batches(self.train_batch_size, drop_last=True)

    def train_plan(self, epoch: int) -> list[np.ndarray]:
        """Global batches of window indices for `epoch` (shuffled from (seed, epoch))."""
        return self.data.train.batch_indices(self.train_batch_size, shuffle=True,
                                             seed=self.config.seed, epoch=epoch, drop_last=True)

    def load(self, split: str, indices: np.ndarray, mask: np.ndarray | None = None
             ) -> dict[str, np.ndarray]:
        """The windows `indices` of a split as a batch dict (x, y, mask)."""
        x, y = self.data.split(split).get_batch(indices)
        mask = np.ones(len(indices), bool) if mask is None else mask
        return {"x": x, "y": y, "mask": mask}

    def train_batches(self, start_step: int, steps_per_epoch: int
                      ) -> Iterator[dict[str, np.ndarray]]:
        """This process's rows of every global training batch from `start_step` on (endless)."""
        rows = process_batch_slice(self.train_batch_size)
        epoch, offset = divmod(start_step, steps_per_epoch)
        while True:
            for indices in self.train_plan(epoch)[offset:steps_per_epoch]:
                yield self.load("train", indices[rows])
            epoch, offset = epoch + 1, 0

    def eval_batches(self, split: str) -> Iterator[dict[str, np.ndarray]]:
        """This process's rows of batches over a split, the last padded (mask False)."""
        n = self.data.split(split).num_windows
        if self.config.data.max_eval_windows:
            n = min(n, self.config.data.max_eval_windows)
        size, rows = self.eval_batch_size, process_batch_slice(self.eval_batch_size)
        for start in range(0, n, size):
            indices = np.arange(start, start + size)
            mask = indices < n
            yield self.load(split, np.where(mask, indices, 0)[rows], mask[rows])

    # -- math -----------------------------------------------------------------------------
    def predict(self, model: nnx.Module, batch: dict[str, jax.Array]) -> jax.Array:
        """(B, pred_len, C_out) forecast."""
        pred = model(batch["x"])
        return pred[..., np.asarray(self.data.output_index)]

    def loss(self, model: nnx.Module, batch: dict[str, jax.Array]) -> jax.Array:
        return jnp.mean((self.predict(model, batch) - batch["y"]) ** 2)

    def eval_sums(self, model: nnx.Module, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        err = self.predict(model, batch) - batch["y"]
        mask = batch["mask"].astype(err.dtype)[:, None, None]
        return {"se": jnp.sum(mask * err**2), "ae": jnp.sum(mask * jnp.abs(err)),
                "count": jnp.sum(mask) * err.shape[1] * err.shape[2]}

    @staticmethod
    def metrics(sums: dict[str, float]) -> dict[str, float]:
        return {"mse": sums["se"] / sums["count"], "mae": sums["ae"] / sums["count"]}

    validation_metric = "mse"
    validation_mode = "min"
