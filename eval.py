r"""Evaluates a checkpoint of a training workdir on the test split (any device count).

  python eval.py --workdir runs/tsm2                        # best checkpoint
  python eval.py --workdir runs/tsm2 --checkpoint latest
  python eval.py --workdir runs/tsm2 --checkpoint 1200 --split val
  python eval.py --workdir runs/vim2_cifar --flip_tta      # classification: + mirror images

Writes <workdir>/eval/<checkpoint>/metrics.json (eval/<checkpoint>_flip/ with --flip_tta) and,
for forecasting, forecast.png.
"""

from __future__ import annotations

import json
import logging
import pathlib

from absl import app, flags

from mmx_jax.train.evaluate import evaluate_and_report
from mmx_jax.train.loop import load_config
from mmx_jax.train.sharding import initialize_distributed

flags.DEFINE_string("workdir", None, "The workdir of a train.py run.")
flags.DEFINE_string("checkpoint", "best", "best, latest or a step number.")
flags.DEFINE_string("split", "test", "Split to evaluate: test, val or train.")
flags.DEFINE_string("data_dir", None, "Override the data folder saved in the run's config.")
flags.DEFINE_bool("flip_tta", False, "Classification: average the logits of each image and of "
                  "its mirror image (config eval.flip_tta).")
flags.mark_flags_as_required(["workdir"])


def main(argv):
    del argv
    initialize_distributed()
    logging.getLogger("absl").setLevel(logging.WARNING)
    f = flags.FLAGS
    checkpoint = int(f.checkpoint) if f.checkpoint.isdigit() else f.checkpoint
    config = load_config(f.workdir)
    if f.flip_tta:
        if config.task != "classification":
            raise app.UsageError(f"--flip_tta is for image classification; {f.workdir} holds a "
                                 f"{config.task} run")
        config.eval.flip_tta = True
    report = evaluate_and_report(pathlib.Path(f.workdir), checkpoint=checkpoint, split=f.split,
                                 data_dir=f.data_dir, config=config)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    app.run(main)
