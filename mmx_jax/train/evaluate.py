"""Evaluation of a saved checkpoint: metrics.json and, for forecasting, a forecast plot."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import jax
import numpy as np

from mmx_jax.train import distributed
from mmx_jax.train.loop import evaluate_split, make_predict_step, setup
from mmx_jax.train.plots import plot_forecasts
from mmx_jax.train.workdir import atomic_write_text, attach_log, load_config, repoint_data


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
    evaluates `split`, writes workdir/eval/<checkpoint>/metrics.json (+ forecast.png).
    `data_dir` re-points the run's data (`workdir.repoint_data`)."""
    workdir = pathlib.Path(workdir).absolute()
    config = config or load_config(workdir)
    if data_dir is not None:
        repoint_data(config, data_dir)
    _fit_mesh(config, len(devices) if devices is not None else jax.device_count())
    attach_log(workdir)
    run = setup(config, workdir, devices=devices, read_only=True)
    try:
        distributed.agree("data and devices", run.facts())
        state, _, step = run.restore(checkpoint)
        metrics = evaluate_split(run, state, split)
        flip = _flip_tta(config)
        out_dir = eval_dir(workdir, checkpoint, config)
        report = {"workdir": str(workdir), "checkpoint": str(checkpoint), "step": step,
                  "split": split, "devices": run.mesh.size, **({"flip_tta": True} if flip else {}),
                  **{f"{split}_{k}": v for k, v in metrics.items()}}
        if config.task == "forecasting":  # every process predicts, process 0 draws
            report["plot"] = str(_forecast_plot(run, state, split, step, out_dir))
        if jax.process_index() == 0:
            atomic_write_text(out_dir / "metrics.json", json.dumps(report, indent=2) + "\n")
    finally:
        run.checkpoints.close()
    return report


def _fit_mesh(config, count: int) -> None:
    """The run's mesh on `count` devices: all of them, its FSDP size kept where it divides
    the count (the checkpoint is resharded on restore)."""
    fsdp = config.mesh.fsdp
    if fsdp == -1:
        config.mesh.data = 1
    else:
        config.mesh.update(data=-1, fsdp=fsdp if count % fsdp == 0 else 1)


def _forecast_plot(run, state, split: str, step: int, out_dir: pathlib.Path) -> pathlib.Path:
    task, cfg = run.task, run.config.eval
    data = task.data
    n = data.split(split).num_windows
    window_ids = np.linspace(0, n - 1, cfg.plot_windows).astype(int)
    batch = task.load(split, window_ids)
    pred = make_predict_step(run)(state, batch)
    path = out_dir / "forecast.png"
    if jax.process_index() != 0:
        return path
    # Scaled -> file units; show the target and the first other output variates.
    outputs = list(range(data.num_output_variates))
    shown = ([outputs[-1]] + outputs[:-1])[:cfg.plot_variates]
    to_units = data.inverse_transform_outputs
    return plot_forecasts(
        path, data.scaler.inverse_transform(batch["x"]),
        to_units(batch["y"])[..., shown], to_units(pred)[..., shown],
        input_columns=data.input_columns,
        output_columns=[data.output_columns[i] for i in shown], window_ids=window_ids,
        title=f"{data.name} {split}, H={data.pred_len}, checkpoint step {step}")
