"""Several JAX processes on one CPU machine (JAX's distributed runtime, gloo collectives),
started by `python -m mmx_jax.launch` as a user would: the same results as one process, each
process its own shard of the data and parameters, and bounded, clear failures."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import tarfile
import time

import pytest

from mmx_jax.launch import free_port

REPO = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT = 600
TSM2 = f"{REPO / 'configs' / 'tsm2.py'}:smoke"
VIM2 = f"{REPO / 'configs' / 'vim2.py'}"
# 3 epochs of 6 steps, validation at 6, 12 and 18.
RUN_FLAGS = ("--config.train.num_epochs=3", "--config.train.checkpoint_every_steps=4",
             "--config.train.log_every_steps=1", "--config.train.patience=0")

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


def env(devices: int = 1, **extra) -> dict[str, str]:
    return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                PYTHONPATH=str(REPO), TQDM_DISABLE="1", JAX_PLATFORMS="cpu",
                MMX_HEARTBEAT_TIMEOUT_S="10", **extra)


def launch(processes: int, devices: int, *command: str, check: bool = True):
    """`python -m mmx_jax.launch` (1 process: the command alone, on `devices` devices)."""
    if processes == 1:
        cmd = [sys.executable, *command]
    else:
        cmd = [sys.executable, "-m", "mmx_jax.launch", f"--processes={processes}",
               f"--devices-per-process={devices}", "--platform=cpu", "--", *command]
    result = subprocess.run(cmd, env=env(devices), cwd=REPO, capture_output=True, text=True,
                            timeout=TIMEOUT)
    if check:
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def train_cmd(workdir, config=TSM2, *flags) -> list[str]:
    return [str(REPO / "train.py"), f"--config={config}", f"--workdir={workdir}", *flags]


def rows(workdir) -> list[dict]:
    lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "steps_per_sec"}
            for line in lines]


def assert_same_metrics(got_dir, want_dir, rel=1e-5) -> None:
    got, want = rows(got_dir), rows(want_dir)
    assert [(r["step"], sorted(r)) for r in got] == [(r["step"], sorted(r)) for r in want]
    for g, w in zip(got, want, strict=True):
        for key in w:
            assert g[key] == pytest.approx(w[key], rel=rel), (w["step"], key)


MESHES = {"data4": ("--config.mesh.data=4", "--config.mesh.fsdp=1"),
          "data2_fsdp2": ("--config.mesh.data=2", "--config.mesh.fsdp=2",
                          "--config.sharding.fsdp_min_size=32")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """workdir of (processes, mesh) -> trained with the same flags: 1 x 4 and 2 x 2 devices."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for mesh, mesh_flags in MESHES.items():
        for processes in (1, 2):
            workdir = root / f"{mesh}_{processes}"
            result = launch(processes, 4 // processes,
                            *train_cmd(workdir, TSM2, *RUN_FLAGS, *mesh_flags))
            out[processes, mesh] = (workdir, result)
    return out


@pytest.mark.parametrize("mesh", sorted(MESHES))
def test_two_processes_train_and_test_as_one_process_does(runs, mesh):
    (one, _), (two, launched) = runs[1, mesh], runs[2, mesh]
    assert_same_metrics(two, one)
    want = json.loads((one / "results.json").read_text())
    got = json.loads((two / "results.json").read_text())
    assert got["best_step"] == want["best_step"] and got["steps"] == want["steps"] == 18
    for key in ("best_val_mse", "test_mse", "test_mae"):
        assert got[key] == pytest.approx(want[key], rel=1e-5), key
    # Written once: one results.json printed by process 0 only, one log line per event.
    assert launched.stdout.count('"test_mse"') == 1
    assert len(rows(two)) == len(rows(one))
    assert sorted(p.name for p in (two / "logs").iterdir()) == ["train.0.log", "train.1.log"]
    if mesh == "data2_fsdp2":  # eval.py on both processes: the metrics and one plot
        launch(2, 2, str(REPO / "eval.py"), f"--workdir={two}")
        report = json.loads((two / "eval" / "best" / "metrics.json").read_text())
        assert report["test_mse"] == pytest.approx(got["test_mse"], rel=1e-6)
        assert (two / "eval" / "best" / "forecast.png").stat().st_size > 10_000


def test_each_process_holds_its_own_shards_of_fsdp_parameters(tmp_path):
    """fsdp is the mesh's inner axis: within a process at (data=2, fsdp=2), across the
    processes at (data=1, fsdp=4), where each holds half of every sharded parameter."""
    probe = str(REPO / "tests" / "multiprocess_probe.py")
    held = {}
    for name, (data, fsdp) in {"within": (2, 2), "across": (1, 4)}.items():
        out = tmp_path / name
        out.mkdir()
        launch(2, 2, probe, "shards", TSM2, str(out), f"mesh.data={data}",
               f"mesh.fsdp={fsdp}", "sharding.fsdp_min_size=32")
        held[name] = [json.loads((out / f"shards.{p}.json").read_text())["shards"]
                      for p in (0, 1)]
    kernel = "head/kernel/value"
    assert held["within"][0][kernel] == held["within"][1][kernel]
    assert len(held["within"][0][kernel]) == 2  # both halves, one per local device
    first, second = (held["across"][p][kernel] for p in (0, 1))
    assert len(first) == len(second) == 2  # 4 quarters: two per process, none shared
    assert not {json.dumps(r) for r in first} & {json.dumps(r) for r in second}
    sharded = [k for k, v in held["across"][0].items() if v != held["across"][1][k]]
    assert len(sharded) >= 3, sharded


def test_a_killed_process_stops_the_other_within_a_minute_and_the_run_resumes(runs,
                                                                               tmp_path):
    """Processes started by hand (no launcher): SIGKILL one mid-run; the other names it and
    exits by itself; the same command then resumes and ends as the uninterrupted run."""
    workdir = tmp_path / "run"
    command = [sys.executable, *train_cmd(workdir, TSM2, *RUN_FLAGS, *MESHES["data4"])]
    port = free_port()
    procs = [subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True,
                              env=env(2, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                                      JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)))
             for i in (0, 1)]
    try:
        deadline = time.time() + TIMEOUT
        folder = workdir / "checkpoints"
        while time.time() < deadline and all(p.poll() is None for p in procs):
            if folder.is_dir() and any(p.name.isdigit() and int(p.name) >= 4
                                       for p in folder.iterdir()):
                break
            time.sleep(0.05)
        assert all(p.poll() is None for p in procs), "the run ended before the kill"
        procs[1].send_signal(signal.SIGKILL)
        killed_at = time.time()
        _, stderr = procs[0].communicate(timeout=120)
        waited = time.time() - killed_at
    finally:
        for p in procs:
            p.kill()
            p.wait(timeout=60)
    assert waited < 60, f"process 0 took {waited:.0f} s to stop"
    assert procs[0].returncode == 1, stderr[-3000:]
    assert "process 1 of 2 stopped" in stderr, stderr[-3000:]
    assert not (workdir / "results.json").exists()
    launch(2, 2, *train_cmd(workdir, TSM2, *RUN_FLAGS, *MESHES["data4"]))
    reference, _ = runs[2, "data4"]
    assert_same_metrics(workdir, reference, rel=1e-6)


def test_processes_started_differently_stop_at_start_up_saying_so(tmp_path):
    """Process 1 gets another learning rate: both stop before training, naming the key."""
    port = free_port()
    procs = []
    for i, lr in ((0, "0.001"), (1, "0.002")):
        command = [sys.executable, *train_cmd(tmp_path / "run", TSM2,
                                              f"--config.optimizer.lr={lr}")]
        procs.append(subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True,
                                      env=env(1, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                                              JAX_NUM_PROCESSES="2",
                                              JAX_PROCESS_ID=str(i))))
    try:
        errors = [p.communicate(timeout=TIMEOUT)[1] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, err in zip(procs, errors, strict=True):
        assert p.returncode == 1, err[-2000:]
        assert ("config key optimizer.lr: process 0 has 0.001, process 1 has 0.002"
                in err), err[-2000:]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_launcher_stops_the_others_when_one_fails_and_returns_its_code(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(
        "import os, sys, time\n"
        "index = int(os.environ['JAX_PROCESS_ID'])\n"
        "print(f'hello from {index} of', os.environ['JAX_NUM_PROCESSES'], flush=True)\n"
        "if index == 1:\n"
        "    time.sleep(0.5)\n"
        "    sys.exit(3)\n"
        "time.sleep(120)\n")
    began = time.time()
    result = launch(3, 1, str(script), check=False)
    assert time.time() - began < 60
    assert result.returncode == 3
    assert "[1] hello from 1 of 3" in result.stdout and "[0] hello from 0 of 3" in result.stdout
    assert "launch: process 1 exited with code 3; stopping the others" in result.stderr


# -- images -----------------------------------------------------------------------------------

CLASSES = ("airplane", "automobile", "bird", "cat")


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """root/{train,test}/<class>/*.jpg: 48 real CIFAR-10 training images per class and 12 test
    images per class, streamed from the archive in ../shared/data."""
    from conftest import SHARED_DATA  # noqa: PLC0415

    archive = SHARED_DATA / "images" / "cifar10_jpg.tar.xz"
    if not archive.exists():
        pytest.skip(f"{archive} is absent (CI always provides it)")
    wanted = {"train": 48, "test": 12}
    found = {(s, c): 0 for s in wanted for c in CLASSES}
    root = tmp_path_factory.mktemp("images")
    with tarfile.open(archive, "r|xz") as tar:
        for member in tar:
            parts = member.name.split("/")
            if (len(parts) == 4 and member.isfile() and (parts[1], parts[2]) in found
                    and found[parts[1], parts[2]] < wanted[parts[1]]):
                folder = root / parts[1] / parts[2]
                folder.mkdir(parents=True, exist_ok=True)
                (folder / parts[3]).write_bytes(tar.extractfile(member).read())
                found[parts[1], parts[2]] += 1
            if all(n == wanted[s] for (s, _), n in found.items()):
                break
    return root


def vim2_flags() -> tuple[str, ...]:
    return ("--config.train.num_epochs=1", "--config.data.val_holdout=32",
            "--config.train.steps_per_epoch=0")


def test_image_shards_cover_the_training_set_once_per_epoch(image_folder, tmp_path):
    spec = f"{VIM2}:smoke,dataset=folder:{image_folder}"
    launch(2, 1, str(REPO / "tests" / "multiprocess_probe.py"), "indices", spec,
           str(tmp_path), "data.val_holdout=32")
    seen = [json.loads((tmp_path / f"indices.{p}.json").read_text())["indices"]
            for p in (0, 1)]
    union = seen[0] + seen[1]
    assert len(seen[0]) == len(seen[1]) == 80  # 160 training examples: 10 batches of 16
    assert sorted(union) == list(range(160)), "duplicates or missing examples"


def test_a_two_process_vim2_checkpoint_evaluates_the_same_on_one_process(image_folder,
                                                                         tmp_path):
    workdir = tmp_path / "run"
    launch(2, 1, *train_cmd(workdir, f"{VIM2}:smoke,dataset=folder:{image_folder}",
                            *vim2_flags()))
    want = json.loads((workdir / "results.json").read_text())
    launch(1, 1, str(REPO / "eval.py"), f"--workdir={workdir}")
    report = json.loads((workdir / "eval" / "best" / "metrics.json").read_text())
    assert report["step"] == want["best_step"] and report["devices"] == 1
    assert report["test_top1"] == pytest.approx(want["test_top1"], abs=1e-9)
    assert report["test_loss"] == pytest.approx(want["test_loss"], rel=1e-5)


def test_a_one_process_checkpoint_evaluates_the_same_on_two_processes(runs):
    workdir, _ = runs[1, "data4"]
    want = json.loads((workdir / "results.json").read_text())
    launch(2, 1, str(REPO / "eval.py"), f"--workdir={workdir}", "--split=test")
    report = json.loads((workdir / "eval" / "best" / "metrics.json").read_text())
    assert report["step"] == want["best_step"] and report["devices"] == 2
    assert report["test_mse"] == pytest.approx(want["test_mse"], rel=1e-6)
