r"""Trains a model from a config file; re-running the same command resumes the run.

  python train.py --config configs/tsm2.py --workdir runs/tsm2
  python train.py --config configs/tsm2.py:dataset=etth2,horizon=336 --workdir runs/etth2 \
      --config.optimizer.lr=3e-4
"""

from __future__ import annotations

import json
import logging
import sys

from absl import app, flags
from ml_collections import config_flags

from mmx_jax.train.config_args import explain_override_error
from mmx_jax.train.loop import train_and_evaluate
from mmx_jax.train.sharding import initialize_distributed

config_flags.DEFINE_config_file("config", None, "Config file (path[:arguments]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, logs and results go.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    initialize_distributed()
    logging.getLogger().setLevel(logging.INFO)
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every file it writes
    results = train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)
    print(json.dumps(results, indent=2))


def parse_flags(argv):
    """absl flag parsing with a one-line error for unknown --config.* keys."""
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError) as err:
        sys.exit(f"train.py: {explain_override_error(err, argv)}")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
