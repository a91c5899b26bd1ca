"""The TSM2 reproduction driver: selection on validation only, and configs that match the runs."""

import argparse
import json
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
RUNS = REPO / "results" / "tsm2_runs.jsonl"


@pytest.fixture(scope="module")
def driver():
    from research import tsm2_reproduce  # noqa: PLC0415

    return tsm2_reproduce


def _row(tag, candidate, val, test, **extra):
    return dict(kind="search", dataset="etth1", horizon=96, seed=0, candidate=candidate,
                tag=tag, best_val_mse=val, test_mse=test, test_mae=test, wall_s=1.0, **extra)


def test_choice_looks_at_validation_only(driver):
    rows = [_row("a", "d64_lr1e-3", val=0.70, test=0.50),
            _row("b", "d32_lr5e-4", val=0.72, test=0.30),
            dict(_row("c", "d16_l1_n4", val=0.10, test=0.10), error="OOM")]
    assert driver.choose(rows) == "d64_lr1e-3"


def test_paper_config_is_what_the_recorded_runs_trained(driver):
    """configs/tsm2.py:paper must hold the hyper-parameters of the runs in the table: at each
    (data set, horizon), those of its chosen candidate's seed-1 run."""
    rows = [json.loads(line) for line in RUNS.read_text().splitlines()]
    ok = [r for r in rows if "error" not in r]
    chosen = driver.winners(ok)
    assert set(chosen) == {(d, h) for d in driver.DATASETS for h in driver.HORIZONS}
    module = driver.tsm2_config
    for (dataset, horizon), candidate in chosen.items():
        row = next(r for r in ok if (r["dataset"], r["horizon"], r["seed"], r["candidate"])
                   == (dataset, horizon, 1, candidate))
        ran = driver.job_config(row, quick=False)
        recorded = module.get_config(f"paper,dataset={dataset},horizon={horizon},seed=1")
        for key in module.HPARAM_KEYS.values():
            group, name = key.split(".")
            assert recorded[group][name] == ran[group][name], (dataset, horizon, key)


@pytest.mark.slow
def test_every_recorded_run_has_the_parameter_count_of_its_config(driver):
    """The parameter count each run recorded is that of the model its row's config builds, so a
    row names every option that changes the model (time directions, RevIN affine, LayerScale),
    also options a run once inherited from configs/tsm2.py's recorded choices."""
    import functools  # noqa: PLC0415

    import jax  # noqa: PLC0415
    from flax import nnx  # noqa: PLC0415

    from mmx_jax.data.forecasting import list_datasets  # noqa: PLC0415
    from mmx_jax.models.registry import create_model  # noqa: PLC0415
    from mmx_jax.train.tasks.base import model_spec  # noqa: PLC0415

    variates = {info.name.lower(): info.num_variates for info in list_datasets()}

    @functools.cache
    def count(name, kwargs):
        model = nnx.eval_shape(lambda: create_model(name, rngs=nnx.Rngs(0), **dict(kwargs)))
        return sum(leaf.size for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))

    rows = [json.loads(line) for line in RUNS.read_text().splitlines()]
    checked = 0
    for row in rows:
        if "params" not in row:  # the first runs did not record it
            continue
        config = driver.job_config(row, quick=False)
        name, kwargs = model_spec(config, {"num_variates": variates[row["dataset"]],
                                           "seq_len": config.data.seq_len,
                                           "pred_len": config.data.pred_len})
        kwargs.pop("dtype", None)
        assert count(name, tuple(sorted(kwargs.items()))) == row["params"], row["tag"]
        checked += 1
    assert checked > 400


def test_winners_are_chosen_per_horizon_on_validation(driver, monkeypatch):
    rows = [_row("a96", "d64_lr1e-3", val=0.5, test=0.9), _row("b96", "d32_lr5e-4", val=0.6,
                                                                 test=0.1),
            dict(_row("a192", "d64_lr1e-3", val=0.9, test=0.1), horizon=192),
            dict(_row("b192", "d32_lr5e-4", val=0.8, test=0.9), horizon=192, kind="final")]
    monkeypatch.setattr(driver, "grid_for", lambda dataset: {"d64_lr1e-3": {}, "d32_lr5e-4": {}})
    assert driver.winners(rows) == {("etth1", 96): "d64_lr1e-3", ("etth1", 192): "d32_lr5e-4"}
    assert driver.winners(rows[:3]) == {("etth1", 96): "d64_lr1e-3"}  # 192 is incomplete


def test_stage_two_retries_the_stage_one_choice_with_the_options(driver, monkeypatch):
    monkeypatch.setattr(driver, "grid_for", lambda dataset: {"a": {"model.d_model": 8},
                                                             "b": {"model.d_model": 16}})
    monkeypatch.setattr(driver, "OPTIONS", {"td2": {"model.time_directions": 2}})
    found = {"a": _row("a", "a", val=0.6, test=0.1)}
    assert driver.follow_up("etth1", 96, found) == ("stage1", ["b"])
    found["b"] = _row("b", "b", val=0.5, test=0.9)
    assert driver.follow_up("etth1", 96, found) == ("stage2", ["b+td2"])
    assert driver.candidate_overrides("etth1", "b+td2") == {"model.d_model": 16,
                                                            "model.time_directions": 2}
    found["b+td2"] = _row("c", "b+td2", val=0.55, test=0.0)  # worse on validation
    assert driver.follow_up("etth1", 96, found) == ("final", ["b"])
    found["b+td2"] = _row("c", "b+td2", val=0.45, test=0.9)
    assert driver.follow_up("etth1", 96, found) == ("final", ["b+td2"])
    assert driver.winners(list(found.values())) == {("etth1", 96): "b+td2"}


def _seed_rows(candidate, vals, horizon=96):
    return {(candidate, seed): dict(_row(f"{candidate}_s{seed}", candidate, val=val, test=0.0),
                                    kind="final", seed=seed, horizon=horizon)
            for seed, val in zip((1, 2), vals, strict=True)}


def test_reseed_check_chooses_on_the_three_seed_mean_where_seed_zero_misled(driver,
                                                                            monkeypatch):
    monkeypatch.setattr(driver, "grid_for", lambda dataset: {"a": {}, "b": {}})
    monkeypatch.setattr(driver, "OPTIONS", {})
    found = {"a": _row("a", "a", val=0.50, test=0.9), "b": _row("b", "b", val=0.60, test=0.1)}
    assert driver.follow_up("etth1", 96, found, {}) == ("final", ["a"])
    # a's other seeds agree with its seed 0 within 10 %: a stays chosen.
    more = _seed_rows("a", (0.54, 0.55))
    assert driver.follow_up("etth1", 96, found, more) == ("done", ["a"])
    # They do not: b gets seeds 1 and 2, and the mean over seeds 0-2 decides.
    more = _seed_rows("a", (0.80, 0.90))
    assert driver.follow_up("etth1", 96, found, more) == ("reseed", ["b"])
    rows = list(found.values()) + list(more.values())
    assert driver.winners(rows) == {}  # incomplete until b's seeds are in
    more |= _seed_rows("b", (0.62, 0.61))
    assert driver.follow_up("etth1", 96, found, more) == ("done", ["b"])
    assert driver.winners(list(found.values()) + list(more.values())) == {("etth1", 96): "b"}
    more |= _seed_rows("b", (0.95, 0.99))  # now a's mean (0.733) is the lower
    assert driver.follow_up("etth1", 96, found, more) == ("done", ["a"])


def test_run_queues_the_reseed_runs_and_a_rerun_repeats_nothing(driver, monkeypatch, tmp_path):
    """The driver's job flow with training replaced by a table of validation MSEs."""
    import concurrent.futures as cf  # noqa: PLC0415

    val = {("a", 0): 0.50, ("b", 0): 0.60, ("a", 1): 0.80, ("a", 2): 0.90, ("b", 1): 0.62,
           ("b", 2): 0.61}
    submitted = []

    def fake_run(job, quick, workroot):
        submitted.append(job["tag"])
        return dict(job, best_val_mse=val[job["candidate"], job["seed"]], test_mse=0.0,
                    test_mae=0.0, wall_s=0.0)

    monkeypatch.setattr(driver, "grid_for", lambda dataset: {"a": {}, "b": {}})
    monkeypatch.setattr(driver, "OPTIONS", {})
    monkeypatch.setattr(driver, "HORIZONS", (96,))
    monkeypatch.setattr(driver, "run_job", fake_run)
    monkeypatch.setattr(cf, "ProcessPoolExecutor",
                        lambda workers, **kwargs: cf.ThreadPoolExecutor(workers))
    out = tmp_path / "runs.jsonl"
    args = argparse.Namespace(out=str(out), deadline=60.0, workers=2, cache_dir=None,
                              datasets="etth1", no_synthetic=True, data_dir=None,
                              final_patience=0, quick=True, workroot=str(tmp_path))
    driver.cmd_run(args)
    assert sorted(submitted) == sorted(f"etth1_96_s{s}_{c}" for c in "ab" for s in (0, 1, 2))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert driver.winners(rows) == {("etth1", 96): "b"}
    submitted.clear()
    driver.cmd_run(args)
    assert submitted == []


def test_reseed_check_fires_at_exchange_336_and_720_only(driver):
    """The recorded runs: every other chosen candidate's seeds 1 and 2 agree with its seed 0."""
    rows = [json.loads(line) for line in RUNS.read_text().splitlines()]
    found, more = driver.runs_by_pair([r for r in rows if "error" not in r])
    fired = {key for key, cands in found.items() if driver.reseed_fired(cands, more[key])}
    assert fired == {("exchange_rate", 336), ("exchange_rate", 720)}


def test_stage_seven_is_next_after_the_recorded_stages(driver):
    """The search stages, in order; every (data set, horizon) of the recorded runs has stages 1
    to 5 and needs just its stage-7 run, on its stage-1 choice, next."""
    assert list(driver.OPTIONS) == ["td2_ra", "ls0_mlr", "ls0_mlr_d0_lr1e-3",
                                    "ls0_mlr001_d0_lr1e-3", "ls0_mlr001_d0_lr1e-3_wd1e-1"]
    rows = [json.loads(line) for line in RUNS.read_text().splitlines()]
    found = {}
    for r in filter(driver._is_search_run, rows):
        found.setdefault((r["dataset"], r["horizon"]), {})[r["candidate"]] = r
    assert set(found) == {(d, h) for d in driver.DATASETS for h in driver.HORIZONS}
    for key, runs in found.items():
        runs = {n: r for n, r in runs.items() if not n.endswith("_wd1e-1")}
        first = driver.stage1_choice(key[0], runs)
        assert driver.follow_up(*key, runs) == ("stage2",
                                                [f"{first}+ls0_mlr001_d0_lr1e-3_wd1e-1"])
    overrides = driver.candidate_overrides("etth1", "d32_l1_lr1e-4+ls0_mlr001_d0_lr1e-3_wd1e-1")
    assert overrides == {**driver.SMALL_GRID["d32_l1_lr1e-4"], "model.layer_scale": 0.0,
                         "model.dropout": 0.0, "optimizer.lr": 1e-3,
                         "optimizer.lr_scale_rules": ((driver.MIXER_PARAMS, 0.01),),
                         "optimizer.weight_decay": 0.1}
    config = driver.job_config(dict(dataset="etth1", horizon=336, seed=0, overrides=overrides),
                               quick=False)
    assert config.optimizer.lr_scale_rules == ((driver.MIXER_PARAMS, 0.01),)
    assert (config.model.d_model, config.optimizer.lr, config.train.patience,
            config.optimizer.weight_decay) == (32, 1e-3, 3, 0.1)


def test_a_look_run_is_the_search_run_of_the_stage_it_becomes(driver):
    """Stage 7's ETTh search runs are those of the look that led to it: the look's job and
    the stage's job agree, and so do the recorded runs' overrides."""
    base = "d32_l1_lr1e-4+ls0_mlr001_d0_lr1e-3"
    look = driver.look_job("etth1", 336, base, "wd1e-1", {"optimizer.weight_decay": 0.1}, "d")
    assert look == driver._search_job("etth1", 336, f"{base}_wd1e-1", "d")
    rows = [json.loads(line) for line in RUNS.read_text().splitlines()]
    looked = [r for r in rows if "look" in r.get("note", "")]
    assert {r["dataset"] for r in looked} == {"etth1", "etth2"} and len(looked) == 8
    for r in looked:
        recorded = {k: driver._as_tuples(v) for k, v in r["overrides"].items()}
        assert recorded == driver.candidate_overrides(r["dataset"], r["candidate"])


def test_candidates_do_not_inherit_the_recorded_choice(driver):
    # etth1's recorded choice is a one-layer model; the d64 candidate must still have two.
    job = dict(dataset="etth1", horizon=96, seed=0,
               overrides=driver.grid_for("etth1")["d64_lr1e-3"])
    config = driver.job_config(job, quick=False)
    assert (config.model.d_model, config.model.num_layers, config.model.state_dim) == (64, 2, 16)


def test_table_counts_a_rerun_once_and_forgets_its_earlier_error(driver, tmp_path, capsys):
    grid = driver.grid_for("etth2")
    rows = [dict(_row(f"etth2_96_s0_{name}", name, val=0.3 + i / 10, test=0.3),
                 dataset="etth2") for i, name in enumerate(grid)]
    first = rows[0]
    rows.insert(0, dict(first, error="JaxRuntimeError: out of memory"))
    rows.append(dict(first))  # the same run recorded twice
    for seed in (1, 2):
        rows.append(dict(first, kind="final", seed=seed, tag=f"etth2_96_s{seed}",
                         test_mse=0.3 + seed / 100))
    path = tmp_path / "runs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    driver.cmd_table(argparse.Namespace(runs=str(path)))
    out = capsys.readouterr().out
    search_line, line = [x for x in out.splitlines() if x.startswith("| etth2 | 96 |")]
    assert "**0.3000**" in search_line  # the chosen candidate's validation MSE
    assert "0.310 ± 0.010" in line  # seeds 0, 1, 2: 0.30, 0.31, 0.32
    assert "error" not in out


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "results" / "checkpoints").glob(
    "etth1_*") if p.is_dir()))
def test_shipped_checkpoint_reproduces_its_test_mse(tmp_path, name):
    """The shipped ETTh1 checkpoints still load and give the test MSE they were trained to."""
    import shutil  # noqa: PLC0415

    from mmx_jax.train.evaluate import evaluate_and_report  # noqa: PLC0415

    workdir = tmp_path / name
    shutil.copytree(REPO / "results" / "checkpoints" / name, workdir)
    recorded = json.loads((workdir / "results.json").read_text())
    metrics = evaluate_and_report(workdir)
    assert metrics["step"] == recorded["best_step"]
    assert metrics["test_mse"] == pytest.approx(recorded["test_mse"], rel=1e-4)
    assert metrics["test_mae"] == pytest.approx(recorded["test_mae"], rel=1e-4)
