"""Tasks: what the generic training loop needs to know about a problem, registered by name.

    forecasting     `forecasting.ForecastingTask` (TSM2; MSE and MAE)
    classification  `classification.ClassificationTask` (ViM2, ViQS; top-1, top-5)

`config.task` picks one; its module is imported when picked.
"""

from __future__ import annotations

import importlib

TASKS = {"forecasting": ("mmx_jax.train.tasks.forecasting", "ForecastingTask"),
         "classification": ("mmx_jax.train.tasks.classification", "ClassificationTask")}


def make_task(config):
    """The task named by `config.task`, built from the config (it loads the data)."""
    if config.task not in TASKS:
        raise ValueError(f"config.task={config.task!r} is not one of {', '.join(TASKS)}")
    module, name = TASKS[config.task]
    return getattr(importlib.import_module(module), name).from_config(config)
