"""Evaluation of a saved checkpoint: metrics.json and, for forecasting, a forecast plot."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mmx_jax.train.loop import evaluate_split, load_config, setup
from mmx_jax.train.plots import plot_forecasts


def _flip_tta(config) -> bool:
    return bool(config.get("eval", {}).get("flip_tta", False))


def eval_dir(workdir: str | pathlib.Path, checkpoint: str | int, config) -> pathlib.Path:
    """Where `evaluate_and_report` writes a checkpoint's report: workdir/eval/<checkpoint>, with
    a "_flip" suffix when the config asks for mirror test-time augmentation."""
    suffix = "_flip" if _flip_tta(config) else ""
    return pathlib.Path(workdir) / "eval" / f"{checkpoint}{suffix}"


def evaluate_and_report(workdir: str | pathlib.Path, *, checkpoint: str | int = "best",
                        split: str = "test", data_dir: str | None = None, config=None,
                        devices=None) -> dict[str, Any]:
    """Restores `checkpoint` ("best", "latest" or a step) of a workdir onto the current devices,
    evaluates `split`, writes workdir/eval/<checkpoint>/metrics.json (+ forecast.png)."""
    workdir = pathlib.Path(workdir)
    config = config or load_config(workdir)
    if data_dir is not None:
        config.data.data_dir = data_dir
    run = setup(config, workdir, devices=devices, read_only=True)
    try:
        state, _, step = run.restore(checkpoint)
        metrics = evaluate_split(run, state, split)
        flip = _flip_tta(config)
        out_dir = eval_dir(workdir, checkpoint, config)
        report = {"workdir": str(workdir), "checkpoint": str(checkpoint), "step": step,
                  "split": split, "devices": run.mesh.size, **({"flip_tta": True} if flip else {}),
                  **{f"{split}_{k}": v for k, v in metrics.items()}}
        if jax.process_index() == 0:
            out_dir.mkdir(parents=True, exist_ok=True)
            if config.task == "forecasting":
                report["plot"] = str(_forecast_plot(run, state, split, step, out_dir))
            (out_dir / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    finally:
        run.checkpoints.close()
    return report


def _forecast_plot(run, state, split: str, step: int, out_dir: pathlib.Path) -> pathlib.Path:
    task, cfg = run.task, run.config.eval
    data = task.data
    n = data.split(split).num_windows
    window_ids = np.linspace(0, n - 1, cfg.plot_windows).astype(int)
    batch = task.load(split, window_ids)
    model = run.model(state)
    model.eval()
    pred = np.asarray(jax.device_get(task.predict(model, jax.tree.map(jnp.asarray, batch))))
    # Scaled -> file units; show the target and the first other output variates.
    outputs = list(range(data.num_output_variates))
    shown = ([outputs[-1]] + outputs[:-1])[:cfg.plot_variates]
    to_units = data.inverse_transform_outputs
    return plot_forecasts(
        out_dir / "forecast.png", data.scaler.inverse_transform(batch["x"]),
        to_units(batch["y"])[..., shown], to_units(pred)[..., shown],
        input_columns=data.input_columns,
        output_columns=[data.output_columns[i] for i in shown], window_ids=window_ids,
        title=f"{data.name} {split}, H={data.pred_len}, checkpoint step {step}")
