r"""CIFAR-10 from scratch with the small-image ViM2 (or ViQS), in one time-boxed GPU run.

    python -m research.cifar_speedrun --archive ../shared/data/images/cifar10_jpg.tar.xz \
        --workdir runs/vim2_cifar --cache-dir /tmp/cifar_cache --flip-tta

Extracts and decodes the JPEG archive once (cached), trains `configs/<family>.py:variant=cifar`
(train split minus 1000 held-out validation images), then runs `eval.py` on the workdir: the
test metrics are those of eval.py over the 10000 test images. Prints the accuracy, the epochs
done, the training images/s and the wall time of each phase, compile included.

Every second counts here, so the run validates and checkpoints only at its end (or at the time
limit, or on SIGTERM/Ctrl-C); `--set train.eval_every_steps=95` restores per-epoch validation.
With `--cache-dir` JAX's persistent compilation cache lives in cache_dir/jax, so eval.py loads
the evaluation step that training compiled instead of compiling it again.
With a time limit the learning-rate schedule runs on the clock (`optimizer.schedule_clock=
"time"`): it reaches its end at the limit however fast the machine is, and `--epochs` is then
an upper bound that a fast machine would reach first.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archive", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--family", default="vim2", choices=("vim2", "viqs"))
    parser.add_argument("--epochs", type=int, default=130,
                        help="at most this many (an H100 ran 26-30 steps/s at batch 512 after "
                             "about 50 s of compilation: about 118 epochs in 440 s)")
    parser.add_argument("--time-limit", type=float, default=440.0,
                        help="training seconds, compile included (0: none)")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--set", action="append", default=[], help="key=value overrides")
    parser.add_argument("--flip-tta", action="store_true",
                        help="evaluate with mirror test-time augmentation (config "
                             "eval.flip_tta: the run's own test pass and eval.py's)")
    parser.add_argument("--smoke", action="store_true", help="tiny model, 4 steps (CPU)")
    args = parser.parse_args()
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", level=logging.WARNING)
    logging.getLogger("absl").setLevel(logging.WARNING)
    logging.getLogger("mmx_jax.train.loop").setLevel(logging.INFO)  # phase times
    if args.cache_dir:  # read by JAX here and in the eval.py process
        os.environ["JAX_COMPILATION_CACHE_DIR"] = str(pathlib.Path(args.cache_dir) / "jax")

    from mmx_jax.data import FolderSource, decode_to_arrays, extract_archive
    from mmx_jax.train.config_args import apply_overrides, load_config_file
    from mmx_jax.train.evaluate import eval_dir
    from mmx_jax.train.loop import train_and_evaluate

    timings = {}
    start = time.time()
    root = extract_archive(args.archive, args.cache_dir)
    for split in ("train", "test"):
        decode_to_arrays(FolderSource(root, split), cache_dir=args.cache_dir)
    timings["extract_decode_s"] = time.time() - start

    arg = "smoke" if args.smoke else f"variant=cifar,epochs={args.epochs}"
    config = load_config_file(f"{REPO / 'configs' / args.family}.py:{arg},dataset=folder:{root}")
    config.data.cache_dir = args.cache_dir
    config.train.time_limit_s = args.time_limit
    config.optimizer.schedule_clock = "time" if args.time_limit > 0 else "steps"
    config.eval.flip_tta = args.flip_tta
    if not args.smoke:
        config.train.eval_every_steps = config.train.checkpoint_every_steps = 10**9
    apply_overrides(config, args.set)

    start = time.time()
    results = train_and_evaluate(config, args.workdir)
    timings["train_s"] = time.time() - start

    start = time.time()
    subprocess.run([sys.executable, str(REPO / "eval.py"), f"--workdir={args.workdir}"],
                   check=True)
    timings["eval_s"] = time.time() - start
    report = json.loads((eval_dir(args.workdir, "best", config) / "metrics.json").read_text())
    rows = [json.loads(line) for line in
            (pathlib.Path(args.workdir) / "metrics.jsonl").read_text().splitlines()]
    # The loop logs its mean rate since the start (compilation included): the steady rate is
    # that of the second half of the logged steps.
    logged = [(r["step"], r["step"] / r["steps_per_sec"]) for r in rows
              if r.get("steps_per_sec")]
    steady = None
    if len(logged) >= 4:
        (s0, t0), (s1, t1) = logged[len(logged) // 2], logged[-1]
        steady = (s1 - s0) / (t1 - t0) * config.data.batch_size
    steps = results["steps"]
    summary = {
        "family": args.family, "test_top1": report["test_top1"],
        "test_top5": report["test_top5"], "flip_tta": bool(config.eval.flip_tta), "steps": steps,
        "epochs_done": steps / (49000 // config.data.batch_size),
        "train_images_per_s_incl_compile": steps * config.data.batch_size / timings["train_s"],
        "train_images_per_s_steady": steady,
        **timings, "total_s": sum(timings.values()), "train_results": results,
    }
    (pathlib.Path(args.workdir) / "speedrun.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
