"""The closed-form linear baseline: batched normal equations are least squares, and the ridge
strength is chosen on validation."""


import numpy as np
import pytest

from mmx_jax.data.forecasting import synthetic_forecasting


@pytest.fixture(scope="module")
def baseline():
    from research import linear_baseline  # noqa: PLC0415

    return linear_baseline


def test_batched_normal_equations_are_least_squares(baseline):
    data = synthetic_forecasting(400, 3, seq_len=24, pred_len=6, seed=0)
    weights = baseline.fit_ridge(data.train, (0.0, 1.0), batch=7)  # many partial batches
    split = data.train
    x, y = split.get_batch(np.arange(split.num_windows))
    x = np.swapaxes(x, 1, 2).reshape(-1, 24).astype(np.float64)
    y = np.swapaxes(y, 1, 2).reshape(-1, 6).astype(np.float64)
    mean = x.mean(axis=1, keepdims=True)
    design = np.concatenate([x - mean, np.ones_like(mean)], axis=1)
    want = np.linalg.lstsq(design, y - mean, rcond=None)[0]
    np.testing.assert_allclose(weights[0.0], want, rtol=1e-5, atol=1e-6)
    assert np.abs(weights[1.0][:-1]).sum() < np.abs(want[:-1]).sum()  # the ridge shrinks
    mse, mae = baseline.evaluate(split, want, batch=5)
    err = design @ want - (y - mean)
    np.testing.assert_allclose((mse, mae), (np.mean(err**2), np.mean(np.abs(err))), rtol=1e-9)


def test_ridge_is_chosen_on_validation(baseline, monkeypatch):
    data = synthetic_forecasting(400, 2, seq_len=24, pred_len=6, seed=1)
    monkeypatch.setattr(baseline, "load_forecasting", lambda *a, **k: data)
    real_evaluate = baseline.evaluate
    looked = []

    def evaluate(split, weights, **kw):
        looked.append(split.name)
        return real_evaluate(split, weights, **kw)

    monkeypatch.setattr(baseline, "evaluate", evaluate)
    row = baseline.run_one("synthetic", 6, seq_len=24, data_dir=None, ridge=(0.0, 10.0, 1e4))
    assert looked == ["val", "val", "val", "test"]
    assert row["val_mse"] == min(row["val_mse_by_ridge"].values())
    assert row["val_mse_by_ridge"][str(row["ridge"])] == row["val_mse"]
    assert row["test_mse"] == real_evaluate(data.test, baseline.fit_ridge(
        data.train, (row["ridge"],))[row["ridge"]])[0]
