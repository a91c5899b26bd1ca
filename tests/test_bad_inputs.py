"""Every bad input a user can give ends in a few lines that name it: configs and flags, CSV
files, image folders, command lines of train.py, eval.py and the launcher. Each case runs the
entry point as a user would and checks the exit code (2: usage, 1: other), the length of the
output and the names in it."""

from __future__ import annotations

import dataclasses
import json
import lzma
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
TSM2 = str(REPO / "configs" / "tsm2.py")
VIM2 = str(REPO / "configs" / "vim2.py")
COLUMNS = ("a", "b", "c", "OT")


def csv_text(rows: int = 400, *, columns=COLUMNS, freq="h", start="2020-01-01") -> str:
    """A valid hourly series: date then `columns` (target OT last), sinusoids and noise."""
    rng = np.random.default_rng(0)
    import pandas as pd  # noqa: PLC0415

    dates = pd.date_range(start, periods=rows, freq=freq).strftime("%Y-%m-%d %H:%M:%S")
    t = np.arange(rows)[:, None]
    values = np.sin(t / 12 + np.arange(len(columns))) + 0.1 * rng.standard_normal(
        (rows, len(columns)))
    lines = [",".join(("date", *columns))]
    lines += [",".join((d, *(f"{v:.4f}" for v in row))) for d, row in zip(dates, values,
                                                                          strict=True)]
    return "\n".join(lines) + "\n"


def edit_line(text: str, row: int, column: int, value: str) -> str:
    """Sets data row `row`, column `column` (0 is the date) to `value`."""
    lines = text.splitlines()
    cells = lines[row + 1].split(",")
    cells[column] = value
    lines[row + 1] = ",".join(cells)
    return "\n".join(lines) + "\n"


def swap_rows(text: str, i: int, j: int) -> str:
    lines = text.splitlines()
    lines[i + 1], lines[j + 1] = lines[j + 1], lines[i + 1]
    return "\n".join(lines) + "\n"


CSVS = {  # file name -> contents (None: the file is absent)
    "absent.csv": None,
    "empty.csv": "",
    "header_only.csv": "date,a,b,OT\n",
    "no_date.csv": csv_text().replace("date,", "time,", 1),
    "no_target.csv": csv_text().replace(",OT", ",target", 1),
    "text_cell.csv": edit_line(csv_text(), 123, 2, "n/a"),
    "empty_cell.csv": edit_line(csv_text(), 77, 3, ""),
    "bad_date.csv": edit_line(csv_text(), 42, 0, "2020-13-45 99:00:00"),
    "unsorted.csv": swap_rows(csv_text(), 200, 201),
    "index_column.csv": "\n".join(
        ("," + line if i == 0 else f"{i - 1}," + line)
        for i, line in enumerate(csv_text().splitlines())) + "\n",
    "duplicate_column.csv": csv_text().replace("date,a,b,c,OT", "date,a,b,a,OT", 1),
    "huge.csv": edit_line(csv_text(), 150, 1, "1e200"),
    "short.csv": csv_text(rows=60),
    "bad_number.csv": edit_line(csv_text(), 10, 4, "12.5.3"),
}


@dataclasses.dataclass(frozen=True)
class Case:
    """One bad input: the command (with {tmp}, {data}, {workdir}, {trained} filled in), the
    exit code and the text the output must name."""

    command: tuple[str, ...]
    code: int
    names: tuple[str, ...]


def train(config: str, *flags: str) -> tuple[str, ...]:
    return ("train.py", f"--config={config}", "--workdir={tmp}/run", *flags)


def smoke_csv(name: str, *flags: str) -> tuple[str, ...]:
    return train(f"{TSM2}:smoke,dataset={{data}}/{name}", *flags)


def vim2(arg: str, *flags: str) -> tuple[str, ...]:
    return train(f"{VIM2}:smoke,{arg}", *flags)


CASES = {
    # -- config files, their arguments and keys ------------------------------------------------
    "config file missing": Case(train("configs/nope.py"), 2, ("'configs/nope.py' not found",)),
    "unknown argument": Case(train(f"{TSM2}:horizn=96"), 2, ("unknown config argument "
                                                             "'horizn'", "horizon")),
    "argument type": Case(train(f"{TSM2}:horizon=long"), 2, ("horizon='long'",
                                                            "whole number")),
    "argument without value": Case(train(f"{TSM2}:horizon"), 2, ("'horizon' needs a value",)),
    "unknown key": Case(train(TSM2, "--config.optimizer.lrr=0.1"), 2,
                        ("--config.optimizer.lrr=0.1", "no key 'optimizer.lrr'", '"lr"')),
    "unknown section": Case(train(TSM2, "--config.optimizr.lr=0.1"), 2,
                            ("--config.optimizr.lr", '"optimizer"')),
    "key type": Case(train(TSM2, "--config.optimizer.lr=abc"), 2, ("optimizer.lr=abc",)),
    "negative lr": Case(train(f"{TSM2}:smoke", "--config.optimizer.lr=-0.01"), 2,
                        ("optimizer.lr=-0.01", "gradient ascent")),
    "dropout above 1": Case(train(f"{TSM2}:smoke", "--config.model.dropout=1.5"), 2,
                            ("model.dropout=1.5", "< 1")),
    "zero stride": Case(train(f"{TSM2}:smoke", "--config.model.stride=0"), 2,
                        ("model.stride=0", ">= 1")),
    "zero epochs": Case(train(f"{TSM2}:smoke", "--config.train.num_epochs=0"), 2,
                        ("train.num_epochs=0",)),
    "zero batch": Case(train(f"{TSM2}:smoke", "--config.data.batch_size=0"), 2,
                       ("data.batch_size=0",)),
    "patch longer than input": Case(train(f"{TSM2}:smoke", "--config.model.patch_len=100"), 2,
                                    ("model.patch_len=100", "data.seq_len=64")),
    "unknown schedule": Case(train(f"{TSM2}:smoke", "--config.optimizer.schedule=linear"), 2,
                             ("optimizer.schedule='linear'", "'cosine'")),
    "unknown scan": Case(train(f"{TSM2}:smoke", "--config.model.scan_impl=fast"), 2,
                         ("model.scan_impl='fast'", "'sequential'")),
    "unknown features": Case(train(f"{TSM2}:smoke", "--config.data.features=X"), 2,
                             ("data.features='X'", "'MS'")),
    "unknown dtype": Case(train(f"{TSM2}:smoke", "--config.model.dtype=float16"), 2,
                          ("model.dtype='float16'", "'bfloat16'")),
    "adam beta of 1": Case(train(f"{TSM2}:smoke", "--config.optimizer.b2=1.0"), 2,
                           ("optimizer.b2=1.0",)),
    "mesh larger than the devices": Case(train(f"{TSM2}:smoke", "--config.mesh.data=3"), 2,
                                         ("mesh.data=3", "1 available devices")),
    "batch larger than the windows": Case(
        train(f"{TSM2}:smoke", "--config.data.batch_size=100000"), 2,
        ("data.batch_size=100000", "training split", "window(s)")),
    "unknown data set": Case(train(f"{TSM2}:smoke,dataset=etth3"), 1,
                             ("'etth3'", "ETTh1", "ETTm2")),
    "unknown task": Case(train(f"{TSM2}:smoke", "--config.task=regression"), 2,
                         ("task='regression'", "'forecasting'")),
    # -- flags ---------------------------------------------------------------------------------
    "unknown flag": Case(train(TSM2, "--bogus=1"), 2, ("unknown flag --bogus", "--workdir")),
    "missing workdir": Case(("train.py", f"--config={TSM2}"), 2, ("--workdir is required",)),
    "workdir is a file": Case(("train.py", f"--config={TSM2}:smoke", "--workdir={tmp}/file"), 2,
                              ("file'", "is a file, not a folder")),
    "eval: not a workdir": Case(("eval.py", "--workdir={tmp}"), 2,
                                ("config.json not found", "--workdir")),
    "eval: bad checkpoint name": Case(("eval.py", "--workdir={trained}", "--checkpoint=foo"), 2,
                                      ("--checkpoint='foo'", "best, latest")),
    "eval: absent step": Case(("eval.py", "--workdir={trained}", "--checkpoint=7"), 2,
                              ("--checkpoint=7", "available steps: [1004]")),
    "eval: unknown split": Case(("eval.py", "--workdir={trained}", "--split=bogus"), 2,
                                ("--split=bogus", "test|val|train")),
    "eval: mirror TTA on forecasts": Case(("eval.py", "--workdir={trained}", "--flip_tta"), 2,
                                          ("--flip_tta", "forecasting")),
    "eval: data_dir not a folder": Case(("eval.py", "--workdir={trained}",
                                         "--data_dir={tmp}/nowhere"), 2,
                                        ("--data_dir", "nowhere", "not a folder")),
    "eval: config of another model": Case(("eval.py", "--workdir={mismatched}"), 1,
                                          ("checkpoints/1004", "cannot be restored")),
    "launch: no processes": Case(("-m", "mmx_jax.launch", "--processes=0", "--", "train.py"), 2,
                                 ("--processes=0", "at least 1")),
    "launch: no command": Case(("-m", "mmx_jax.launch", "--processes=2"), 2,
                               ("give the command",)),
    # -- CSV files -----------------------------------------------------------------------------
    "CSV absent": Case(smoke_csv("absent.csv"), 1, ("absent.csv", "does not exist")),
    "CSV empty": Case(smoke_csv("empty.csv"), 1, ("empty.csv", "cannot be read")),
    "CSV header only": Case(smoke_csv("header_only.csv"), 1, ("header_only.csv", "no data rows")),
    "CSV without date": Case(smoke_csv("no_date.csv"), 1, ("no_date.csv", "no 'date' column")),
    "CSV without target": Case(smoke_csv("no_target.csv"), 1,
                               ("no_target.csv", "target column 'OT'")),
    "CSV text cell": Case(smoke_csv("text_cell.csv"), 1,
                          ("text_cell.csv", "column 'b'", "'n/a'", "data row 123")),
    "CSV empty cell": Case(smoke_csv("empty_cell.csv"), 1,
                           ("empty_cell.csv", "column 'c'", "data row 77")),
    "CSV malformed number": Case(smoke_csv("bad_number.csv"), 1,
                                 ("bad_number.csv", "column 'OT'", "'12.5.3'", "data row 10")),
    "CSV bad date": Case(smoke_csv("bad_date.csv"), 1,
                         ("bad_date.csv", "column 'date'", "data row 42")),
    "CSV out of order": Case(smoke_csv("unsorted.csv"), 1,
                             ("unsorted.csv", "not in order", "data row 201")),
    "CSV index column": Case(smoke_csv("index_column.csv"), 1,
                             ("index_column.csv", "column 0 has no name", "index=False")),
    "CSV duplicate column": Case(smoke_csv("duplicate_column.csv"), 1,
                                 ("duplicate_column.csv", "'a' appears twice")),
    "CSV huge value": Case(smoke_csv("huge.csv"), 1,
                           ("huge.csv", "column 'a'", "1e+200", "data row 150")),
    "CSV too short": Case(smoke_csv("short.csv"), 1, ("short.csv",)),
    "CSV truncated xz": Case(smoke_csv("truncated.csv.xz"), 1,
                             ("truncated.csv.xz", "cannot be read")),
    # -- images ----------------------------------------------------------------------------------
    "images: split missing": Case(vim2("dataset=folder:{data}/images_no_test"), 1,
                                  ("no split 'test'", "data.eval_split", "train")),
    "images: idx with the ImageNet recipe": Case(
        train(f"{VIM2}:variant=tiny,dataset=idx:{{data}}/fashion"), 1,
        ("no split 'validation'", "data.eval_split", "train, test")),
    "images: empty class folder": Case(vim2("dataset=folder:{data}/images_empty_class"), 1,
                                       ("holds no images", "cat")),
    "images: no class folders": Case(vim2("dataset=folder:{data}/images_flat"), 1,
                                     ("has no class", "images_flat")),
    "images: statistics of another channel count": Case(
        vim2("dataset=folder:{data}/images", "--config.data.channels=3",
             "--config.data.mean=(0.5,)", "--config.data.std=(0.5,)"), 2,
        ("data.mean=(0.5,)", "data.channels=3")),
    "images: size not divisible": Case(
        vim2("dataset=folder:{data}/images", "--config.data.image_size=36"), 2,
        ("data.image_size=36", "multiple of 16")),
    "images: corrupt file": Case(vim2("dataset=folder:{data}/images_corrupt"), 1,
                                 ("broken.jpg",)),
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The bad (and a few good) data files the cases read."""
    root = tmp_path_factory.mktemp("bad_inputs")
    for name, text in CSVS.items():
        if text is not None:
            (root / name).write_text(text)
    (root / "truncated.csv.xz").write_bytes(lzma.compress(csv_text().encode())[:500])
    rng = np.random.default_rng(1)
    from PIL import Image  # noqa: PLC0415

    def images(folder, classes=("cat", "dog"), per_class=20, splits=("train", "test")):
        for split in splits:
            for c in classes:
                (folder / split / c).mkdir(parents=True, exist_ok=True)
                for i in range(per_class):
                    Image.fromarray(rng.integers(0, 255, (32, 32, 3), np.uint8)).save(
                        folder / split / c / f"{i}.png")

    images(root / "images")
    images(root / "images_no_test", splits=("train",))
    images(root / "images_empty_class")
    shutil.rmtree(root / "images_empty_class" / "train" / "cat")
    (root / "images_empty_class" / "train" / "cat").mkdir()
    (root / "images_flat" / "train").mkdir(parents=True)
    (root / "images_flat" / "test").mkdir()
    images(root / "images_corrupt")
    (root / "images_corrupt" / "train" / "cat" / "broken.jpg").write_bytes(b"\xff\xd8 no jpeg")
    fashion = REPO.parent / "shared" / "data" / "images" / "fashion_mnist"
    (root / "fashion").mkdir()
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):  # no test pair needed
        if (fashion / f"{name}.gz").exists():
            shutil.copy(fashion / f"{name}.gz", root / "fashion")
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A copy of the shipped ETTh1 checkpoint (a workdir eval.py accepts), and a copy whose
    config.json names another model."""
    root = tmp_path_factory.mktemp("trained")
    shutil.copytree(REPO / "results" / "checkpoints" / "etth1_96", root / "run")
    shutil.copytree(REPO / "results" / "checkpoints" / "etth1_96", root / "mismatched")
    config = json.loads((root / "mismatched" / "config.json").read_text())
    config["model"]["d_model"] = 32
    (root / "mismatched" / "config.json").write_text(json.dumps(config))
    return root


def run(case: Case, tmp: pathlib.Path, data: pathlib.Path, trained: pathlib.Path):
    (tmp / "file").write_text("not a folder")
    values = {"tmp": str(tmp), "data": str(data), "trained": str(trained / "run"),
              "mismatched": str(trained / "mismatched")}
    args = [part.format(**values) for part in case.command]
    if args[0].endswith(".py"):
        args[0] = str(REPO / args[0])
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
               JAX_PLATFORMS="cpu", TQDM_DISABLE="1")
    return subprocess.run([sys.executable, *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_a_bad_input_ends_in_a_few_lines_that_name_it(name, tmp_path, data, trained):
    case = CASES[name]
    result = run(case, tmp_path, data, trained)
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == case.code, output[-3000:]
    lines = [line for line in output.splitlines() if not line.startswith("decoding ")]
    assert len(lines) <= 3, output[-3000:]
    assert "Traceback" not in output
    for name_ in case.names:
        assert name_ in output, (name_, output[-3000:])
    if os.environ.get("MMX_BAD_INPUTS_TABLE"):  # a report: one line per case (name, code, text)
        with open(os.environ["MMX_BAD_INPUTS_TABLE"], "a") as f:
            f.write(json.dumps({"case": name, "code": result.returncode, "lines": lines}) + "\n")
