r"""Uses a trained model: forecasts a series' future, or classifies images.

  python predict.py --workdir runs/tsm2 --input my.csv --output forecast.csv --plot forecast.png
  python predict.py --workdir runs/tsm2 --input my.csv --end "2018-02-01 00:00"  # from a date
  python predict.py --pretrained tsm2_etth1_96 --input my.csv
  python predict.py --workdir runs/vim2_cifar cat.jpg photos/ --output classes.csv
  python predict.py --list_pretrained

Forecasts read the last seq_len rows of --input (a CSV with a "date" column and the model's
columns, by name, in any order), scale them with the run's own training statistics, and
write one row per future time stamp in the file's units, continuing its frequency (or
--freq). Images print their top-5 classes by name with probabilities (--output: .csv or
.json).
"""

from __future__ import annotations

import json
import pathlib
import sys

from absl import flags

from mmx_jax import cli
from mmx_jax.errors import UsageError

flags.DEFINE_string("workdir", None, "The workdir of a train.py run.")
flags.DEFINE_string("pretrained", None, "A pretrained model's name (--list_pretrained).")
flags.DEFINE_string("checkpoint", "best", "With --workdir: best, latest or a step number.")
flags.DEFINE_string("input", None, "Forecasting: the CSV whose future to forecast.")
flags.DEFINE_string("output", None, "Where to write the forecast (.csv) or the classes "
                    "(.csv or .json); default: print them.")
flags.DEFINE_string("plot", None, "Forecasting: a PNG of the history and the forecast.")
flags.DEFINE_string("end", None, "Forecasting: forecast from this date (its row the last "
                    "read) instead of the end of the file.")
flags.DEFINE_string("freq", None, "Forecasting: the series' frequency (h, 15min, D, ...) when "
                    "its dates do not show one.")
flags.DEFINE_integer("top", 5, "Classification: classes per image.")
flags.DEFINE_bool("skip_bad", False, "Classification: skip unreadable images (else an error).")
flags.DEFINE_bool("list_pretrained", False, "List the pretrained models and exit.")

USAGE = ("python predict.py (--workdir=<folder> | --pretrained=<name>) "
         "(--input=<file.csv> [--end=<date>] [--freq=<freq>] [--plot=<file.png>] | "
         "<image or folder> ...) [--output=<file>] [--verbose]")


def main(positional: list[str]) -> None:
    from mmx_jax.inference import Forecaster, image_files, predictor  # noqa: PLC0415
    from mmx_jax.models.pretrained import list_pretrained, pretrained_card  # noqa: PLC0415

    f = flags.FLAGS
    if f.list_pretrained:
        for name in list_pretrained():
            card = pretrained_card(name)
            metrics = ", ".join(f"{k} {v:.4f}" for k, v in card["metrics"].items()
                                if k.startswith("test_"))
            print(f"{name}: {card['summary']} ({metrics})")
        return
    if (f.workdir is None) == (f.pretrained is None):
        raise UsageError("give one of --workdir (a train.py run) and --pretrained (a name)")
    checkpoint = f.checkpoint
    if checkpoint not in ("best", "latest"):
        if not checkpoint.isdigit():
            raise UsageError(f"--checkpoint={checkpoint!r} is not best, latest or a step number")
        checkpoint = int(checkpoint)
    if f.workdir is not None and not (pathlib.Path(f.workdir) / "config.json").exists():
        raise UsageError(f"--workdir {f.workdir}: no config.json there; is it the workdir of a "
                         "train.py run?")
    model = predictor(f.workdir, f.pretrained, checkpoint)
    if isinstance(model, Forecaster):
        if positional:
            raise UsageError(f"this model forecasts: give --input=<file.csv>, not {positional}")
        _forecast(model)
    else:
        if f.input is not None or not positional:
            raise UsageError("this model classifies images: give image files or folders after "
                             "the flags (--input is for forecasts)")
        image_files(positional)  # a path that does not exist fails here, before decoding
        _classify(model, positional)


def _forecast(model) -> None:
    import pandas as pd  # noqa: PLC0415

    f = flags.FLAGS
    if f.input is None:
        raise UsageError("this model forecasts: give --input=<file.csv>")
    from mmx_jax.data.forecasting import read_frame  # noqa: PLC0415

    frame = read_frame(f.input)
    forecast = model.predict(frame, end=f.end, freq=f.freq, source=f.input)
    if f.output:
        dates = pd.DatetimeIndex(forecast["date"])
        daily = bool((dates == dates.normalize()).all())  # no time of day: dates alone
        forecast.to_csv(f.output, index=False,
                        date_format="%Y-%m-%d" if daily else "%Y-%m-%d %H:%M:%S")
        print(f"wrote {len(forecast)} rows to {f.output}", file=sys.stderr)
    else:
        with pd.option_context("display.max_rows", 1000, "display.width", 160):
            print(forecast.to_string(index=False))
    if f.plot:
        print(f"wrote {model.plot(f.plot, frame, forecast, end=f.end)}", file=sys.stderr)


def _classify(model, paths) -> None:
    f = flags.FLAGS
    rows, skipped = model.classify(paths, top=f.top, skip_bad=f.skip_bad)
    for line in skipped:
        print(f"skipped {line}", file=sys.stderr)
    if f.output:
        out = pathlib.Path(f.output)
        if out.suffix == ".json":
            out.write_text(json.dumps(rows, indent=2) + "\n")
        else:
            header = ["file"] + [f"{kind}{i + 1}" for i in range(f.top)
                                 for kind in ("class", "p")]
            lines = [",".join(header)] + [
                ",".join([json.dumps(r["file"])] + [x for c, p in r["top"]
                                                    for x in (json.dumps(c), f"{p:.6f}")])
                for r in rows]
            out.write_text("\n".join(lines) + "\n")
        print(f"wrote {len(rows)} rows to {out}", file=sys.stderr)
        return
    for r in rows:
        print(f"{r['file']}: " + ", ".join(f"{c} {p:.3f}" for c, p in r["top"]))


if __name__ == "__main__":
    cli.main("predict", USAGE, main, doc=__doc__, takes_args=True)
