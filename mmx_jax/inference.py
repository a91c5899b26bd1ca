"""Using a trained model without its training data: forecasts of new series, classes of new
images. From a training workdir (its best checkpoint, EMA weights where the run kept them) or
from the pretrained zoo (`mmx_jax.models.list_pretrained`).

    forecaster = Forecaster.from_workdir("runs/tsm2")            # or .from_pretrained(name)
    future = forecaster.predict(pandas.read_csv("my.csv"))       # one row per future time stamp
    classifier = Classifier.from_workdir("runs/vim2_cifar")
    rows = classifier.classify(["cat.jpg", "photos/"])           # top-5 classes by name

What a model needs of its data (shapes, scaler statistics, column and class names, the
series' frequency) is the run's data card, workdir/data.json (`Task.describe`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmx_jax.errors import UsageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")


class InputError(ValueError):
    """An input to predict cannot be used as it is; the message names what and where."""


@dataclasses.dataclass
class Trained:
    """A trained model in evaluation mode, its config and its data card."""

    model: nnx.Module
    config: Any
    card: dict[str, Any]
    step: int | None = None


def load_trained(workdir: str | os.PathLike, checkpoint: str | int = "best") -> Trained:
    """The model of a checkpoint of a training workdir ("best", "latest" or a step), on the
    default device, with its EMA weights where the run kept an EMA."""
    from mmx_jax.train.checkpoint import Checkpoints, abstract_with_shardings  # noqa: PLC0415
    from mmx_jax.train.loop import _split, build_state, model_of_state  # noqa: PLC0415
    from mmx_jax.train.tasks.base import create_task_model  # noqa: PLC0415
    from mmx_jax.train.workdir import load_config  # noqa: PLC0415

    workdir = pathlib.Path(workdir)
    config = load_config(workdir)
    card = data_card(workdir, config)
    build = create_task_model(config, card["model_shapes"])
    graphdefs, abstract = _split(*nnx.eval_shape(lambda: build_state(config, build)))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = abstract_with_shardings(abstract, jax.tree.map(lambda _: device, abstract))
    checkpoints = Checkpoints(workdir, read_only=True)
    try:
        state, _, step = checkpoints.restore(checkpoint, target)
    finally:
        checkpoints.close()
    model = model_of_state(graphdefs["model"], state)
    model.eval()
    return Trained(model, config, card, step)


def data_card(workdir: str | os.PathLike, config) -> dict[str, Any]:
    """workdir/data.json; for runs older than it, rebuilt from the training data."""
    from mmx_jax.train.workdir import DATA_CARD  # noqa: PLC0415

    path = pathlib.Path(workdir) / DATA_CARD
    if path.exists():
        return json.loads(path.read_text())
    from mmx_jax.train.tasks import make_task  # noqa: PLC0415

    return make_task(config).describe()


def _jitted_apply(model: nnx.Module):
    """A jitted ``apply(x) -> model(x)`` with the weights held as arguments (not constants)."""
    graphdef, state = nnx.split(model)
    apply = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
    return lambda x: apply(state, x)


# -- forecasting --------------------------------------------------------------------------------

class Forecaster:
    """Forecasts of a trained TSM2 (see the module docstring)."""

    def __init__(self, model: nnx.Module, card: dict[str, Any]):
        if card.get("task") != "forecasting":
            raise UsageError(f"this model is a {card.get('task')} model, not a forecaster")
        self.card = card
        self.columns: list[str] = list(card["columns"])
        self.output_columns: list[str] = list(card["output_columns"])
        self.seq_len, self.pred_len = card["seq_len"], card["pred_len"]
        self.mean = np.asarray(card["scaler"]["mean"], np.float64)
        self.scale = np.asarray(card["scaler"]["scale"], np.float64)
        self._outputs = [self.columns.index(c) for c in self.output_columns]
        self._apply = _jitted_apply(model)

    @classmethod
    def from_workdir(cls, workdir, checkpoint: str | int = "best") -> Forecaster:
        trained = load_trained(workdir, checkpoint)
        return cls(trained.model, trained.card)

    @classmethod
    def from_pretrained(cls, name: str) -> Forecaster:
        from mmx_jax.models.pretrained import load_pretrained  # noqa: PLC0415

        model, card = load_pretrained(name)
        return cls(model, card["data"])

    def predict_scaled(self, x: np.ndarray) -> np.ndarray:
        """(B, seq_len, C_in) scaled inputs -> (B, pred_len, C_out) scaled forecasts."""
        pred = np.asarray(self._apply(jnp.asarray(x, jnp.float32)))
        return pred[..., self._outputs]

    def predict_window(self, values: np.ndarray) -> np.ndarray:
        """(B, seq_len, C_in) inputs in file units -> (B, pred_len, C_out) in file units
        (scaled in float64 as the training data was)."""
        scaled = (np.asarray(values, np.float64) - self.mean) / self.scale
        out = self.predict_scaled(scaled.astype(np.float32)).astype(np.float64)
        return out * self.scale[self._outputs] + self.mean[self._outputs]

    def predict(self, frame, *, end=None, freq: str | None = None, source: str = "the input"):
        """The forecast after the last `seq_len` rows of `frame` (those ending at `end`, a
        date, when given): a DataFrame with "date" (continuing the series at its inferred
        frequency, or `freq`) and one column per output, in file units.

        `frame` holds a "date" column and the model's input columns by name, in any order.
        Raises `InputError` naming the column, row or date at fault.
        """
        import pandas as pd  # noqa: PLC0415

        from mmx_jax.data.forecasting import future_dates, infer_frequency  # noqa: PLC0415

        dates, values = self._window(frame, end, source)
        freq = freq or infer_frequency(dates) or None
        if freq is None:
            raise InputError(f"{source}: the time stamps have no regular frequency to continue; "
                             "give it with --freq (e.g. h, 15min, D, W)")
        try:
            after = future_dates(dates[-1], freq, self.pred_len)
        except ValueError as err:
            raise InputError(f"--freq={freq!r} is not a pandas frequency ({err})") from None
        forecast = self.predict_window(values[None])[0]
        return pd.DataFrame({"date": after, **{c: forecast[:, j] for j, c in
                                              enumerate(self.output_columns)}})

    def _window(self, frame, end, source: str) -> tuple[np.ndarray, np.ndarray]:
        """(dates, values) of the input window: all rows up to it checked for order, the
        window's cells for values."""
        import pandas as pd  # noqa: PLC0415

        names = [str(c) for c in frame.columns]
        if "date" not in names:
            raise InputError(f"{source}: no 'date' column (the columns are {names})")
        missing = [c for c in self.columns if c not in names]
        extra = [c for c in names if c not in self.columns and c != "date"]
        if missing or extra:
            raise InputError(
                f"{source}: the columns do not match the model's "
                f"{self.columns}: " + "; ".join(
                    part for part in (f"missing {missing}" if missing else "",
                                      f"not the model's {extra}" if extra else "") if part))
        try:
            dates = pd.to_datetime(frame["date"]).to_numpy().astype("datetime64[ns]")
        except (ValueError, TypeError) as err:
            raise InputError(f"{source}: column 'date' has an unreadable date ({err})") from None
        steps = np.diff(dates)
        if (steps <= np.timedelta64(0)).any():
            r = int(np.argmax(steps <= np.timedelta64(0))) + 1
            raise InputError(f"{source}: the dates do not increase at data row {r} "
                             f"({dates[r]} after {dates[r - 1]}); sort the rows by date")
        stop = len(dates)
        if end is not None:
            stop = int(np.searchsorted(dates, np.datetime64(pd.Timestamp(end)), side="right"))
            if stop == 0:
                raise InputError(f"--end {end}: {source} starts later, at {dates[0]}")
        if stop < self.seq_len:
            raise InputError(f"{source}: the model reads the last {self.seq_len} rows before "
                             f"its forecast; there are {stop} rows"
                             + (f" up to --end {end}" if end is not None else ""))
        window = frame.iloc[stop - self.seq_len:stop]
        values = np.empty((self.seq_len, len(self.columns)))
        for j, name in enumerate(self.columns):
            column = pd.to_numeric(window[name], errors="coerce").to_numpy(np.float64)
            bad = ~np.isfinite(column)
            if bad.any():
                r = stop - self.seq_len + int(np.argmax(bad))
                raise InputError(f"{source}: column {name!r} has a missing or non-numeric "
                                 f"value {window[name].iloc[int(np.argmax(bad))]!r} at data row "
                                 f"{r} (line {r + 2} of a CSV file), inside the "
                                 f"{self.seq_len} rows the forecast reads")
            values[:, j] = column
        return dates[:stop], values

    def plot(self, path, frame, forecast, *, end=None, history: int | None = None):
        """Saves a PNG of the last `history` input rows (default 2 x pred_len) and the
        forecast, one panel per output (the target first, at most four)."""
        import pandas as pd  # noqa: PLC0415

        from mmx_jax.train.plots import plot_future  # noqa: PLC0415

        dates, values = self._window(frame, end, "the input")
        history = min(history or 2 * self.pred_len, self.seq_len)
        target = self.card.get("target")
        shown = sorted(self.output_columns, key=lambda c: c != target)[:4]
        past = pd.to_datetime(dates[-history:])
        return plot_future(
            path, past, values[-history:][:, [self.columns.index(c) for c in shown]],
            pd.to_datetime(forecast["date"]), forecast[shown].to_numpy(), names=shown,
            title=f"forecast of the next {self.pred_len} steps from {past[-1]}")


# -- classification -------------------------------------------------------------------------------

class Classifier:
    """Classes of images by a trained ViM2 or ViQS (see the module docstring)."""

    def __init__(self, model: nnx.Module, card: dict[str, Any], *, flip_tta: bool = False):
        if card.get("task") != "classification":
            raise UsageError(f"this model is a {card.get('task')} model, not a classifier")
        self.card = card
        self.class_names: list[str] = list(card["class_names"])
        self.size, self.channels = card["image_size"], card["channels"]
        self.pipeline = card.get("pipeline", "memory")
        mean, std = np.asarray(card["mean"]), np.asarray(card["std"])
        graphdef, state = nnx.split(model)

        def probabilities(state, images):
            from mmx_jax.data.batch_augment import normalize  # noqa: PLC0415

            net = nnx.merge(graphdef, state)
            x = normalize(images, mean, std)
            logits = net(x).astype(jnp.float32)
            if flip_tta:
                logits = (logits + net(x[:, :, ::-1]).astype(jnp.float32)) / 2
            return jax.nn.softmax(logits, axis=-1)

        jitted = jax.jit(probabilities)
        self._probabilities_of = lambda images: probabilities(state, images)  # for export
        self._probabilities = lambda images: np.asarray(jitted(state, images))

    @classmethod
    def from_workdir(cls, workdir, checkpoint: str | int = "best") -> Classifier:
        trained = load_trained(workdir, checkpoint)
        flip = bool(trained.config.get("eval", {}).get("flip_tta", False))
        return cls(trained.model, trained.card, flip_tta=flip)

    @classmethod
    def from_pretrained(cls, name: str) -> Classifier:
        from mmx_jax.models.pretrained import load_pretrained  # noqa: PLC0415

        model, card = load_pretrained(name)
        return cls(model, card["data"])

    def view(self, image: np.ndarray) -> np.ndarray:
        """A decoded image (H, W[, C]) uint8 as the model's evaluation pipeline shows it."""
        from mmx_jax.data import eval_view  # noqa: PLC0415
        from mmx_jax.data.image_sources import to_channels  # noqa: PLC0415

        return eval_view(to_channels(np.asarray(image, np.uint8), self.channels),
                         size=self.size, pipeline=self.pipeline)

    def predict(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """(N, size, size, channels) uint8 evaluation views -> (N, classes) probabilities."""
        out = [self._probabilities(jnp.asarray(images[i:i + batch_size]))
               for i in range(0, len(images), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, len(self.class_names)))

    def classify(self, paths: Iterable[str | os.PathLike], *, top: int = 5,
                 skip_bad: bool = False) -> tuple[list[dict[str, Any]], list[str]]:
        """([{"file", "top": [[class, probability], ...]}], [skipped files and why]) for image
        files and folders (searched recursively). An unreadable file raises `InputError`
        naming it, or is skipped with `skip_bad`."""
        from mmx_jax.data.image_sources import CorruptImageError, decode_image  # noqa: PLC0415

        files = image_files(paths)
        views, kept, skipped = [], [], []
        for path in files:
            try:
                views.append(self.view(decode_image(path, channels=None)))
            except (CorruptImageError, OSError, ValueError) as err:
                if not skip_bad:
                    raise InputError(f"{path}: cannot be read as an image ({err}); --skip_bad "
                                     "skips such files") from None
                skipped.append(f"{path}: {err}")
                continue
            kept.append(path)
        probs = self.predict(np.stack(views)) if views else np.zeros((0, 0))
        k = min(top, len(self.class_names))
        rows = []
        for path, p in zip(kept, probs, strict=True):
            best = np.argsort(-p)[:k]
            rows.append({"file": str(path),
                         "top": [[self.class_names[i], float(p[i])] for i in best]})
        return rows, skipped


def image_files(paths: Iterable[str | os.PathLike]) -> list[str]:
    """The image files among `paths`, folders searched recursively (sorted); a path that does
    not exist raises `InputError`."""
    out = []
    for path in map(pathlib.Path, paths):
        if path.is_dir():
            out += sorted(str(p) for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.exists():
            out.append(str(path))
        else:
            raise InputError(f"{path}: no such file or folder")
    if not out:
        raise InputError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in "
                         f"{', '.join(map(str, paths))}")
    return out


def predictor(workdir: str | os.PathLike | None = None, pretrained: str | None = None,
              checkpoint: str | int = "best") -> Forecaster | Classifier:
    """A Forecaster or Classifier, as the model's task says."""
    if pretrained is not None:
        from mmx_jax.models.pretrained import pretrained_task  # noqa: PLC0415

        kind = Forecaster if pretrained_task(pretrained) == "forecasting" else Classifier
        return kind.from_pretrained(pretrained)
    trained = load_trained(workdir, checkpoint)
    if trained.card["task"] == "forecasting":
        return Forecaster(trained.model, trained.card)
    return Classifier(trained.model, trained.card,
                      flip_tta=bool(trained.config.get("eval", {}).get("flip_tta", False)))


# -- export -------------------------------------------------------------------------------------

def export_model(model: Forecaster | Classifier, path: str | os.PathLike, *,
                 platforms: tuple[str, ...] = ("cpu",), source: str = "") -> dict[str, Any]:
    """Writes `model` as a serialized `jax.export` artifact at `path` with a symbolic batch
    dimension, and its contract beside it (`path` + ".json"); returns the contract.

    The artifact holds the weights: it runs with JAX alone (`jax.export.deserialize(data)
    .call(x)`), without mmx_jax. A forecaster takes (batch, seq_len, C_in) float32 inputs in
    the units of its training file and returns (batch, pred_len, C_out) in the same units (the
    scaling is inside); a classifier takes (batch, size, size, channels) uint8 images, viewed
    as its evaluation pipeline does, and returns (batch, classes) probabilities.
    """
    from jax import export  # noqa: PLC0415

    if isinstance(model, Forecaster):
        card = model.card
        mean, scale = jnp.asarray(model.mean, jnp.float32), jnp.asarray(model.scale, jnp.float32)
        outputs = np.asarray(model._outputs)
        apply = model._apply

        def fn(x):
            y = apply((x - mean) / scale)[..., outputs]
            return y * scale[outputs] + mean[outputs]

        shape = export.symbolic_shape(f"batch, {model.seq_len}, {len(model.columns)}")
        spec = jax.ShapeDtypeStruct(shape, jnp.float32)
        contract = {
            "task": "forecasting",
            "input": {"shape": ["batch", model.seq_len, len(model.columns)], "dtype": "float32",
                      "columns": model.columns, "units": "those of the training file"},
            "output": {"shape": ["batch", model.pred_len, len(model.output_columns)],
                       "dtype": "float32", "columns": model.output_columns,
                       "units": "those of the training file"},
            "scaler": card["scaler"], "freq": card.get("freq"), "target": card.get("target")}
    else:
        fn = model._probabilities_of
        shape = export.symbolic_shape(f"batch, {model.size}, {model.size}, {model.channels}")
        spec = jax.ShapeDtypeStruct(shape, jnp.uint8)
        contract = {
            "task": "classification",
            "input": {"shape": ["batch", model.size, model.size, model.channels],
                      "dtype": "uint8", "view": f"the {model.pipeline} pipeline's evaluation "
                      "view (mmx_jax.data.images.eval_view)"},
            "output": {"shape": ["batch", len(model.class_names)], "dtype": "float32",
                       "meaning": "class probabilities"},
            "class_names": model.class_names, "mean": model.card["mean"],
            "std": model.card["std"]}
    exported = export.export(jax.jit(fn), platforms=platforms)(spec)
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(exported.serialize())
    contract = {"format": "jax.export (jax.export.deserialize(bytes).call(x))",
                "jax_version": jax.__version__, "platforms": list(platforms),
                "source": source, **contract}
    path.with_name(path.name + ".json").write_text(json.dumps(contract, indent=2) + "\n")
    return contract
