r"""Trains a model from a config file; re-running the same command resumes the run.

  python train.py --config configs/tsm2.py --workdir runs/tsm2
  python train.py --config configs/tsm2.py:dataset=etth2,horizon=336 --workdir runs/etth2 \
      --config.optimizer.lr=3e-4
  python -m mmx_jax.launch --processes 2 -- train.py --config configs/tsm2.py --workdir runs/t

A workdir has one owner (a second train.py on it stops at once) and one config (a re-run may
only extend the run: mmx_jax/train/workdir.py lists what it may change).
"""

from __future__ import annotations

import json

import jax
from absl import flags
from ml_collections import config_flags

from mmx_jax import cli

config_flags.DEFINE_config_file("config", None, "Config file (path[:arguments]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, logs and results go.")
flags.mark_flags_as_required(["config", "workdir"])

USAGE = ("python train.py --config=<config file>[:<arguments>] --workdir=<folder> "
         "[--config.<key>=<value> ...] [--verbose]")


def main() -> None:
    from mmx_jax.train.loop import train_and_evaluate  # noqa: PLC0415 - after the flags

    results = train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)
    if jax.process_index() == 0:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    cli.main("train", USAGE, main, doc=__doc__)
