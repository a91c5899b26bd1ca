"""A run that cannot be lost, on one process: kills at any instant, corrupt checkpoints, one
owner and one config per workdir, paths that resolve from anywhere. Each test drives train.py
and eval.py as a user would, in subprocesses, with a timeout."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest

from mmx_jax.train.workdir import WorkdirLock

REPO = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT = 300  # seconds for one train.py run on a loaded 2-core machine

# 3 epochs of 6 steps; validation (and a save) at 6, 12, 18; saves at 4, 8, 16 too; one
# checkpoint kept besides the best, so pruning deletes and keeps the best apart.
RUN_FLAGS = ("--config.train.num_epochs=3", "--config.train.checkpoint_every_steps=4",
             "--config.train.log_every_steps=1", "--config.train.keep_checkpoints=1",
             "--config.train.patience=0")


def env(**extra) -> dict[str, str]:
    return dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
                PYTHONPATH=str(REPO), TQDM_DISABLE="1", JAX_PLATFORMS="cpu", **extra)


def train(workdir, *flags, cwd=None, kill_at=None, config="smoke", check=True):
    cmd = [sys.executable, str(REPO / "train.py"),
           f"--config={REPO / 'configs' / 'tsm2.py'}:{config}", f"--workdir={workdir}",
           *RUN_FLAGS, *flags]
    extra = {"MMX_KILL_AT": kill_at} if kill_at else {}
    result = subprocess.run(cmd, env=env(**extra), cwd=cwd or REPO, capture_output=True,
                            text=True, timeout=TIMEOUT)
    if kill_at:
        assert result.returncode == -signal.SIGKILL, (kill_at, result.stderr[-2000:])
    elif check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def eval_py(workdir, *flags, cwd=None):
    return subprocess.run([sys.executable, str(REPO / "eval.py"), f"--workdir={workdir}",
                           *flags], env=env(), cwd=cwd or REPO, capture_output=True,
                          text=True, timeout=TIMEOUT)


def metric_rows(workdir) -> list[dict]:
    """metrics.jsonl without the wall-clock rates, which differ between runs."""
    rows = [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl")
            .read_text().splitlines()]
    return [{k: v for k, v in row.items() if k != "steps_per_sec"} for row in rows]


def assert_same_run(workdir, reference) -> None:
    want = json.loads((reference / "results.json").read_text())
    got = json.loads((pathlib.Path(workdir) / "results.json").read_text())
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-6), key
    got_rows, want_rows = metric_rows(workdir), metric_rows(reference)
    assert [sorted(r) for r in got_rows] == [sorted(r) for r in want_rows]
    for g, w in zip(got_rows, want_rows, strict=True):
        assert g["step"] == w["step"]
        for key in w:
            assert g[key] == pytest.approx(w[key], rel=1e-6), (w["step"], key)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run every interrupted one must end up equal to."""
    workdir = tmp_path_factory.mktemp("reference") / "run"
    train(workdir)
    return workdir


def tree_digest(folder: pathlib.Path) -> str:
    """A digest of every file's path and contents under `folder`."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


# Each run of a chain is killed at a point of its own (mmx_jax/train/faults.py), counted from
# that process's start, then the same command runs again; the last runs to the end.
KILL_CHAINS = {
    "before-and-around-saves": ["logged:2", "saving:1", "committed:1", "pruned:1", "save:2",
                                "step:5"],
    "around-validation-and-the-end": ["validated:1", "saving:2", "committed:3", "results:1",
                                      "resumed:1", "claimed:1"],
}


@pytest.mark.slow
@pytest.mark.parametrize("chain", sorted(KILL_CHAINS))
def test_a_run_killed_anywhere_resumes_to_the_uninterrupted_result(tmp_path, reference, chain):
    workdir = tmp_path / "run"
    for point in KILL_CHAINS[chain]:
        train(workdir, kill_at=point)
        assert not (workdir / "results.json").exists() or point in ("claimed:1", "resumed:1")
    train(workdir)
    assert_same_run(workdir, reference)
    assert not list((workdir / "checkpoints").glob("*tmp*")), "leftover partial save"


@pytest.mark.slow
def test_a_kill_in_the_middle_of_a_checkpoint_write_found_by_polling(tmp_path, reference):
    """SIGKILL while Orbax's temporary folder of a save exists (polled, no hook)."""
    workdir = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "train.py"),
           f"--config={REPO / 'configs' / 'tsm2.py'}:smoke", f"--workdir={workdir}", *RUN_FLAGS]
    proc = subprocess.Popen(cmd, env=env(), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline, seen = time.time() + TIMEOUT, False
    try:
        while time.time() < deadline and proc.poll() is None and not seen:
            folder = workdir / "checkpoints"
            seen = folder.is_dir() and any("tmp" in p.name for p in folder.iterdir())
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert seen, "no checkpoint write was caught in flight"
    train(workdir)
    assert_same_run(workdir, reference)


@pytest.mark.slow
def test_a_corrupt_latest_checkpoint_is_reported_and_the_one_before_used(tmp_path, reference):
    workdir = tmp_path / "run"
    train(workdir, "--config.train.keep_checkpoints=3")
    os.remove(workdir / "results.json")
    latest = max(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    for data in (workdir / "checkpoints" / str(latest) / "state").rglob("d/*"):
        data.write_bytes(data.read_bytes()[:7])  # truncated array files
    result = train(workdir, "--config.train.keep_checkpoints=3")
    assert f"checkpoint {workdir / 'checkpoints' / str(latest)} cannot be restored" in result.stderr
    assert "moved to" in result.stderr
    moved = list((workdir / "corrupt").iterdir())
    assert len(moved) == 1 and moved[0].name.startswith(f"{latest}-")
    assert_same_run(workdir, reference)


@pytest.mark.slow
def test_a_second_run_on_a_busy_workdir_is_refused_and_a_stale_lock_is_not(tmp_path):
    workdir = tmp_path / "run"
    lock = WorkdirLock(workdir)
    lock.acquire()  # this test process holds the workdir
    try:
        result = train(workdir, check=False)
    finally:
        lock.release()
    assert result.returncode == 1
    assert f"is in use by another run (process id {os.getpid()} on host" in result.stderr
    assert len(result.stderr.strip().splitlines()) <= 3, result.stderr
    assert not (workdir / "config.json").exists()
    # A holder killed with SIGKILL leaves the file but not the lock.
    holder = subprocess.Popen([sys.executable, "-c", (
        "import pathlib, sys, time; from mmx_jax.train.workdir import WorkdirLock; "
        f"WorkdirLock(pathlib.Path({str(workdir)!r})).acquire(); print('held', flush=True); "
        "time.sleep(600)")], env=env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RuntimeError, match=f"process id {holder.pid} on host"):
            WorkdirLock(workdir).acquire()
    finally:
        holder.kill()
        holder.wait(timeout=60)
    WorkdirLock(workdir).acquire()


@pytest.mark.slow
def test_a_changed_config_is_refused_with_its_keys_and_an_extension_is_allowed(tmp_path,
                                                                              reference):
    workdir = tmp_path / "run"
    shutil.copytree(reference, workdir)
    before = tree_digest(workdir)
    saved = json.loads((workdir / "config.json").read_text())
    result = train(workdir, "--config.optimizer.lr=0.01", "--config.model.d_model=16",
                   check=False)
    assert result.returncode == 1
    line = result.stderr.strip().splitlines()[0]
    assert f"optimizer.lr: {saved['optimizer']['lr']} -> 0.01" in line, line
    assert f"model.d_model: {saved['model']['d_model']} -> 16" in line, line
    assert tree_digest(workdir) == before, "the refused run touched the workdir"
    # One more epoch is an extension of the run: it continues from the last checkpoint.
    result = train(workdir, "--config.train.num_epochs=4")
    assert "resumed from" in result.stderr
    assert json.loads((workdir / "results.json").read_text())["steps"] == 24
    assert json.loads((workdir / "config.json").read_text())["train"]["num_epochs"] == 4


@pytest.mark.slow
def test_a_relative_data_path_is_saved_resolved_and_data_dir_repoints_it(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(REPO / "mmx_jax" / "data" / "bundled" / "ETTh1.csv.xz", data / "mine.csv.xz")
    train("run", config="smoke,dataset=data/mine.csv.xz", cwd=tmp_path)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["data"]["name"] == str(data / "mine.csv.xz")
    want = json.loads((tmp_path / "run" / "results.json").read_text())["test_mse"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = eval_py(tmp_path / "run", cwd=elsewhere)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout)["test_mse"] == pytest.approx(want, rel=1e-6)
    moved = tmp_path / "moved"
    data.rename(moved)
    result = eval_py(tmp_path / "run", cwd=elsewhere)
    assert result.returncode == 1 and "mine.csv.xz" in result.stderr
    result = eval_py(tmp_path / "run", f"--data_dir={moved}", cwd=elsewhere)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout)["test_mse"] == pytest.approx(want, rel=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("flags, cause, code", [
    (("--config.train.num_epochs=0",), "config key train.num_epochs=0 is not allowed", 2),
    # Diverges at once: the error is raised inside the loop, with the checkpoint managers and
    # a compiler thread running (which used to abort the interpreter at exit).
    (("--config.optimizer.lr=1e12", "--config.optimizer.grad_clip=0"),
     "non-finite training loss", 1),
])
def test_errors_end_in_one_line_without_an_abort(tmp_path, flags, cause, code):
    result = train(tmp_path / "run", *flags, check=False)
    assert result.returncode == code, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("train.py:")]
    assert cause in errors[0], result.stderr[-2000:]
    assert len(errors) == (1 if code == 2 else 2)  # usage errors: no traceback pointer
    assert code == 2 or "--verbose prints it" in errors[1]
    assert "Fatal Python error" not in result.stderr and "Traceback" not in result.stderr
