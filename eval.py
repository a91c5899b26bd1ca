r"""Evaluates a checkpoint of a training workdir on the test split (any device count).

  python eval.py --workdir runs/tsm2                        # best checkpoint
  python eval.py --workdir runs/tsm2 --checkpoint latest
  python eval.py --workdir runs/tsm2 --checkpoint 1200 --split val

Writes <workdir>/eval/<checkpoint>/metrics.json and, for forecasting, forecast.png.
"""

from __future__ import annotations

import json
import logging
import pathlib

from absl import app, flags

from mmx_jax.train.evaluate import evaluate_and_report
from mmx_jax.train.sharding import initialize_distributed

flags.DEFINE_string("workdir", None, "The workdir of a train.py run.")
flags.DEFINE_string("checkpoint", "best", "best, latest or a step number.")
flags.DEFINE_string("split", "test", "Split to evaluate: test, val or train.")
flags.DEFINE_string("data_dir", None, "Override the data folder saved in the run's config.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
    del argv
    initialize_distributed()
    logging.getLogger("absl").setLevel(logging.WARNING)
    f = flags.FLAGS
    checkpoint = int(f.checkpoint) if f.checkpoint.isdigit() else f.checkpoint
    report = evaluate_and_report(pathlib.Path(f.workdir), checkpoint=checkpoint, split=f.split,
                                 data_dir=f.data_dir)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    app.run(main)
