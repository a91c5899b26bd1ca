"""Using a trained model: forecasts of new rows, their time stamps, their bad inputs, image
classes, the export round trip and the pretrained zoo."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from mmx_jax.data.forecasting import BUNDLED_DIR, future_dates, infer_frequency
from mmx_jax.inference import Forecaster, InputError

REPO = pathlib.Path(__file__).resolve().parents[1]
SHIPPED = REPO / "results" / "checkpoints" / "etth1_96"


def env() -> dict[str, str]:
    return dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
                JAX_PLATFORMS="cpu", TQDM_DISABLE="1")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A copy of the shipped ETTh1 H=96 run (input 512)."""
    path = tmp_path_factory.mktemp("etth1") / "run"
    shutil.copytree(SHIPPED, path)
    return path


@pytest.fixture(scope="module")
def forecaster(workdir):
    return Forecaster.from_workdir(workdir)


@pytest.fixture(scope="module")
def etth1():
    return pd.read_csv(BUNDLED_DIR / "ETTh1.csv.xz")


def test_a_forecast_of_real_rows_is_the_models_prediction_on_that_test_window(
        forecaster, workdir, etth1):
    from mmx_jax.data import load_forecasting
    from mmx_jax.inference import load_trained

    data = load_forecasting("ETTh1", seq_len=512, pred_len=96)
    trained = load_trained(workdir)
    for window in (0, 1234, data.test.num_windows - 1):
        x, _ = data.test.get_batch(np.array([window]))
        want = data.inverse_transform_outputs(np.asarray(trained.model(x)))[0]
        first = data.borders["test"][0] + window  # the file row of the window's first input
        rows = etth1.iloc[first:first + 512]
        # Columns matched by name, in any order.
        got = forecaster.predict(rows[["OT", *reversed(etth1.columns[1:-1]), "date"]])
        assert list(got.columns) == ["date", *forecaster.output_columns]
        np.testing.assert_allclose(got[forecaster.output_columns].to_numpy(), want,
                                   rtol=1e-5, atol=1e-5)
        last = pd.Timestamp(rows["date"].iloc[-1])
        assert got["date"].iloc[0] == last + pd.Timedelta(hours=1)
        assert got["date"].iloc[-1] == last + pd.Timedelta(hours=96)


def test_end_picks_the_window_that_ends_at_that_date(forecaster, etth1):
    end = etth1["date"].iloc[2999]
    whole = forecaster.predict(etth1, end=end)
    cut = forecaster.predict(etth1.iloc[2488:3000])
    pd.testing.assert_frame_equal(whole, cut)


@pytest.mark.parametrize("freq, step", [("h", "1h"), ("15min", "15min"), ("10min", "10min"),
                                        ("D", "1D"), ("W-SUN", "7D"), ("W-WED", "7D")])
def test_time_stamps_continue_at_the_series_frequency(freq, step):
    dates = pd.date_range("2023-01-01 00:00", periods=50, freq=freq).to_numpy()
    assert infer_frequency(dates) == freq
    after = future_dates(dates[-1], infer_frequency(dates), 4)
    want = [pd.Timestamp(dates[-1]) + k * pd.Timedelta(step) for k in range(1, 5)]
    np.testing.assert_array_equal(after, np.array(want, dtype="datetime64[ns]"))


def test_a_repeated_time_stamp_still_gives_the_frequency():
    dates = pd.date_range("2023-01-01", periods=200, freq="10min").to_numpy()
    dates = np.insert(dates, 50, dates[50])  # weather.csv repeats one time stamp
    assert infer_frequency(dates) == "10min"
    assert infer_frequency(np.array(["2023-01-01", "2023-01-05", "2023-01-06", "2023-02-01"],
                                    dtype="datetime64[ns]")) is None


@pytest.mark.parametrize("change, words", [
    (lambda f: f.drop(columns=["MULL"]), ("missing ['MULL']",)),
    (lambda f: f.assign(extra=1.0), ("not the model's ['extra']",)),
    (lambda f: f.iloc[-100:], ("last 512 rows", "there are 100")),
    (lambda f: f.assign(LUFL=f["LUFL"].where(f.index != f.index[-7])),
     ("column 'LUFL'", f"data row {2999 - 6}")),
    (lambda f: f.drop(columns=["date"]), ("no 'date' column",)),
    (lambda f: f.iloc[::-1], ("do not increase",)),
    (lambda f: f.assign(date=pd.to_datetime(f["date"]).where(
        np.arange(len(f)) % 3 != 0, pd.to_datetime(f["date"]) + pd.Timedelta(minutes=7))),
     ("no regular frequency", "--freq")),
])
def test_bad_forecast_inputs_are_named(forecaster, etth1, change, words):
    frame = change(etth1.iloc[:3000].copy())
    with pytest.raises(InputError) as err:
        forecaster.predict(frame, source="my.csv")
    for word in words:
        assert word in str(err.value), str(err.value)


def test_predict_py_writes_the_forecast_and_its_plot(workdir, etth1, tmp_path):
    etth1.iloc[:3000].to_csv(tmp_path / "mine.csv", index=False)
    result = subprocess.run(
        [sys.executable, str(REPO / "predict.py"), f"--workdir={workdir}", "--input=mine.csv",
         "--output=forecast.csv", "--plot=forecast.png"], env=env(), cwd=tmp_path,
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    forecast = pd.read_csv(tmp_path / "forecast.csv")
    assert len(forecast) == 96 and forecast["date"].iloc[0] == "2016-11-03 00:00:00"
    assert (tmp_path / "forecast.png").stat().st_size > 20_000
    bad = subprocess.run(
        [sys.executable, str(REPO / "predict.py"), f"--workdir={workdir}", "--input=mine.csv",
         "--end=2016-07-02"], env=env(), cwd=tmp_path, capture_output=True, text=True,
        timeout=300)
    assert bad.returncode == 1 and "last 512 rows" in bad.stderr and "--end" in bad.stderr


def test_the_exported_forecaster_runs_without_mmx_jax_and_gives_the_same_forecast(
        workdir, forecaster, etth1, tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "export.py"), f"--workdir={workdir}",
                             f"--out={tmp_path / 'model.jax'}"], env=env(), cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    contract = json.loads((tmp_path / "model.jax.json").read_text())
    assert contract["input"]["shape"] == ["batch", 512, 7]
    assert contract["output"]["columns"] == forecaster.output_columns
    x = etth1[forecaster.columns].to_numpy(np.float32)[:3 * 512].reshape(3, 512, 7)
    np.save(tmp_path / "x.npy", x)
    fresh = ("import sys, numpy as np\n"
             "from jax import export\n"
             "model = export.deserialize(open('model.jax', 'rb').read())\n"
             "np.save('y.npy', np.asarray(model.call(np.load('x.npy'))))\n"
             "np.save('y1.npy', np.asarray(model.call(np.load('x.npy')[:1])))\n"
             "assert not any(m.startswith('mmx_jax') for m in sys.modules)\n")
    ran = subprocess.run([sys.executable, "-c", fresh], env=env(), cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr[-2000:]
    want = forecaster.predict_window(x)
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), want, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(np.load(tmp_path / "y1.npy"), want[:1], rtol=1e-6, atol=1e-5)


# -- the zoo ------------------------------------------------------------------------------

def test_every_pretrained_entry_loads_and_its_checksum_holds(tmp_path, monkeypatch):
    from mmx_jax.models import create_model, list_pretrained
    from mmx_jax.models import pretrained as zoo

    names = list_pretrained()
    assert names, "the zoo is empty"
    for name in names:
        card = zoo.pretrained_card(name)
        for key in ("dataset", "split", "command", "seed", "metrics", "hardware", "date",
                    "config", "data"):
            assert card[key] not in (None, "", {}), (name, key)
        model = create_model(name, pretrained=True)
        assert zoo.param_arrays(model).keys()
    # One damaged byte and the checksum refuses the file.
    folder = tmp_path / "weights"
    shutil.copytree(zoo.WEIGHTS, folder)
    weights = folder / f"{names[0]}.npz"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    monkeypatch.setattr(zoo, "WEIGHTS", folder)
    with pytest.raises(zoo.PretrainedError, match="SHA-256"):
        zoo.load_pretrained(names[0])
    with pytest.raises(zoo.PretrainedError, match="no pretrained model 'tsm2_mars_7'; the zoo"):
        zoo.load_pretrained("tsm2_mars_7")


@pytest.mark.slow
@pytest.mark.parametrize("name", [f"tsm2_{d}_{h}" for d in ("etth1", "etth2")
                                  for h in (96, 192, 336, 720)])
def test_the_ett_hourly_entries_reproduce_their_recorded_test_mse(name, request):
    from mmx_jax.models.pretrained import list_pretrained, pretrained_card
    from research.make_zoo import test_mse

    assert name in list_pretrained(), "the zoo lost an ETT hourly entry"
    # ETTh1 is bundled with the package; ETTh2 comes from the shared data folder.
    data_dir = None if "etth1" in name else str(request.getfixturevalue("shared_data")
                                                 / "timeseries")
    card = pretrained_card(name)
    mse = test_mse(Forecaster.from_pretrained(name), card, data_dir)
    # The card's figure for the weights as stored (float16), then the training run's.
    assert mse == pytest.approx(card["stored_weights_test_mse"], rel=1e-5)
    assert mse == pytest.approx(card["recorded_seed0_test_mse"], rel=1e-4)


def test_predict_py_lists_and_uses_pretrained_models(etth1, tmp_path):
    listed = subprocess.run([sys.executable, str(REPO / "predict.py"), "--list_pretrained"],
                            env=env(), capture_output=True, text=True, timeout=300)
    assert listed.returncode == 0 and "tsm2_etth1_96: TSM2 on etth1" in listed.stdout
    etth1.iloc[:1000].to_csv(tmp_path / "mine.csv", index=False)
    result = subprocess.run([sys.executable, str(REPO / "predict.py"),
                             "--pretrained=tsm2_etth1_96", "--input=mine.csv"], env=env(),
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(result.stdout.strip().splitlines()) == 97  # the header and 96 rows


# -- images ---------------------------------------------------------------------------------------

@pytest.mark.slow
def test_image_classes_match_eval_and_the_export_round_trip(shared_data, tmp_path):
    """A tiny ViM2 trained on real CIFAR images: predict.py's classes of the test images are
    the evaluation pipeline's argmax, their accuracy is eval.py's top-1, and the exported
    classifier gives the same probabilities without mmx_jax."""
    import tarfile

    import jax
    from PIL import Image

    from mmx_jax.inference import Classifier
    from mmx_jax.train.evaluate import evaluate_and_report
    from mmx_jax.train.loop import make_predict_step, setup
    from mmx_jax.train.workdir import load_config

    wanted = {("train", c): 16 for c in ("cat", "ship")} | {("test", c): 8 for c in ("cat",
                                                                                     "ship")}
    with tarfile.open(shared_data / "images" / "cifar10_jpg.tar.xz", "r|xz") as tar:
        for member in tar:
            parts = member.name.split("/")
            key = tuple(parts[1:3]) if len(parts) == 4 else None
            if member.isfile() and wanted.get(key, 0) > 0:
                folder = tmp_path / "cifar" / parts[1] / parts[2]
                folder.mkdir(parents=True, exist_ok=True)
                (folder / parts[3]).write_bytes(tar.extractfile(member).read())
                wanted[key] -= 1
            if not any(wanted.values()):
                break
    trained = subprocess.run(
        [sys.executable, str(REPO / "train.py"),
         f"--config={REPO / 'configs' / 'vim2.py'}:smoke,dataset=folder:cifar", "--workdir=run",
         "--config.data.val_holdout=8", "--config.data.eval_batch_size=8"],
        env=env(), cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert trained.returncode == 0, trained.stderr[-3000:]
    report = evaluate_and_report(tmp_path / "run", devices=jax.devices()[:1])
    # The evaluation pipeline's own predictions of the test split.
    config = load_config(tmp_path / "run")
    config.mesh.update(data=1, fsdp=1)
    run = setup(config, tmp_path / "run", devices=jax.devices()[:1], read_only=True)
    state, _, _ = run.restore("best")
    run.checkpoints.close()
    predict = make_predict_step(run)
    source = run.task.sources["test"]
    logits = predict(state, {"image": source.images})
    files = [str(p) for p in sorted((tmp_path / "cifar" / "test").rglob("*.jpg"))]
    classifier = Classifier.from_workdir(tmp_path / "run")
    rows, skipped = classifier.classify([tmp_path / "cifar" / "test"])
    assert not skipped and [r["file"] for r in rows] == files
    # decode_to_arrays reads the folder in the same (class, file name) order.
    names = [source.class_names[i] for i in np.argmax(logits, -1)]
    assert [r["top"][0][0] for r in rows] == names
    labels = [pathlib.Path(f).parent.name for f in files]
    top1 = np.mean([r["top"][0][0] == label for r, label in zip(rows, labels, strict=True)])
    assert top1 == pytest.approx(report["test_top1"], abs=1e-9)
    assert all(len(r["top"]) == 2 and abs(sum(p for _, p in r["top"]) - 1) < 1e-5 for r in rows)
    # The export round trip.
    from mmx_jax.inference import export_model

    export_model(classifier, tmp_path / "classifier.jax")
    views = np.stack([classifier.view(np.asarray(Image.open(f))) for f in files])
    np.save(tmp_path / "views.npy", views)
    fresh = ("import numpy as np\nfrom jax import export\n"
             "m = export.deserialize(open('classifier.jax', 'rb').read())\n"
             "np.save('probs.npy', np.asarray(m.call(np.load('views.npy'))))\n")
    ran = subprocess.run([sys.executable, "-c", fresh], env=env(), cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr[-2000:]
    np.testing.assert_allclose(np.load(tmp_path / "probs.npy"), classifier.predict(views),
                               rtol=1e-5, atol=1e-6)
