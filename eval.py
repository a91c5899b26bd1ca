r"""Evaluates a checkpoint of a training workdir on the test split (any device count).

  python eval.py --workdir runs/tsm2                        # best checkpoint
  python eval.py --workdir runs/tsm2 --checkpoint latest
  python eval.py --workdir runs/tsm2 --checkpoint 1200 --split val
  python eval.py --workdir runs/vim2_cifar --flip_tta      # classification: + mirror images
  python eval.py --workdir runs/tsm2 --data_dir /elsewhere  # the data moved

Writes <workdir>/eval/<checkpoint>/metrics.json (eval/<checkpoint>_flip/ with --flip_tta) and,
for forecasting, forecast.png.
"""

from __future__ import annotations

import json

import jax
from absl import flags

from mmx_jax import cli
from mmx_jax.errors import UsageError

flags.DEFINE_string("workdir", None, "The workdir of a train.py run.")
flags.DEFINE_string("checkpoint", "best", "best, latest or a step number.")
flags.DEFINE_enum("split", "test", ["test", "val", "train"], "Split to evaluate.")
flags.DEFINE_string("data_dir", None, "Where the data is now, if it moved since training: "
                    "every data source of the run is looked for there.")
flags.DEFINE_bool("flip_tta", False, "Classification: average the logits of each image and of "
                  "its mirror image (config eval.flip_tta).")
flags.mark_flags_as_required(["workdir"])

USAGE = ("python eval.py --workdir=<folder> [--checkpoint=best|latest|<step>] "
         "[--split=test|val|train] [--data_dir=<folder>] [--flip_tta] [--verbose]")


def main() -> None:
    from mmx_jax.train.checkpoint import CheckpointNotFoundError  # noqa: PLC0415
    from mmx_jax.train.evaluate import evaluate_and_report  # noqa: PLC0415
    from mmx_jax.train.workdir import load_config  # noqa: PLC0415

    f = flags.FLAGS
    checkpoint = f.checkpoint
    if checkpoint not in ("best", "latest"):
        if not checkpoint.isdigit():
            raise UsageError(f"--checkpoint={checkpoint!r} is not best, latest or a step "
                                 "number")
        checkpoint = int(checkpoint)
    try:
        config = load_config(f.workdir)
    except FileNotFoundError as err:
        raise UsageError(f"--workdir: {err}") from None
    if f.flip_tta:
        if config.task != "classification":
            raise UsageError(f"--flip_tta is for image classification; {f.workdir} holds "
                                 f"a {config.task} run")
        config.eval.flip_tta = True
    try:
        report = evaluate_and_report(f.workdir, checkpoint=checkpoint, split=f.split,
                                     data_dir=f.data_dir, config=config)
    except CheckpointNotFoundError as err:
        if isinstance(checkpoint, int):  # a step the workdir does not have
            raise UsageError(f"--checkpoint={checkpoint}: {err}") from None
        raise
    if jax.process_index() == 0:
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    cli.main("eval", USAGE, main, doc=__doc__)
