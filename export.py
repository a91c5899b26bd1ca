r"""Exports a trained model for serving without this code: a serialized `jax.export` artifact
with a symbolic batch dimension, and a JSON of its input/output contract beside it.

  python export.py --workdir runs/tsm2 --out model.jax          # writes model.jax(.json)
  python export.py --pretrained tsm2_etth1_96 --out etth1.jax --platforms cpu,cuda

Load it anywhere JAX runs:
  from jax import export
  model = export.deserialize(open("model.jax", "rb").read())
  y = model.call(x)      # forecasting: (batch, seq_len, C) float32 in the training file's units
"""

from __future__ import annotations

import json
import pathlib

from absl import flags

from mmx_jax import cli
from mmx_jax.errors import UsageError

flags.DEFINE_string("workdir", None, "The workdir of a train.py run (its best checkpoint, "
                    "EMA weights where used).")
flags.DEFINE_string("pretrained", None, "A pretrained model's name instead.")
flags.DEFINE_string("checkpoint", "best", "With --workdir: best, latest or a step number.")
flags.DEFINE_string("out", None, "The artifact to write; the contract goes to <out>.json.")
flags.DEFINE_list("platforms", ["cpu"], "Platforms to lower for: cpu, cuda, rocm, tpu.")
flags.mark_flags_as_required(["out"])

USAGE = ("python export.py (--workdir=<folder> | --pretrained=<name>) --out=<file> "
         "[--platforms=cpu,cuda] [--verbose]")


def main() -> None:
    from mmx_jax.inference import export_model, predictor  # noqa: PLC0415

    f = flags.FLAGS
    if (f.workdir is None) == (f.pretrained is None):
        raise UsageError("give one of --workdir (a train.py run) and --pretrained (a name)")
    if f.workdir is not None and not (pathlib.Path(f.workdir) / "config.json").exists():
        raise UsageError(f"--workdir {f.workdir}: no config.json there; is it the workdir of a "
                         "train.py run?")
    unknown = sorted(set(f.platforms) - {"cpu", "cuda", "rocm", "tpu"})
    if unknown:
        raise UsageError(f"--platforms: {unknown} are not cpu, cuda, rocm or tpu")
    checkpoint = int(f.checkpoint) if f.checkpoint.isdigit() else f.checkpoint
    model = predictor(f.workdir, f.pretrained, checkpoint)
    contract = export_model(model, f.out, platforms=tuple(f.platforms),
                            source=f.workdir or f"pretrained:{f.pretrained}")
    print(json.dumps({"artifact": f.out, "contract": f"{f.out}.json",
                      "input": contract["input"]["shape"],
                      "output": contract["output"]["shape"]}, indent=2))


if __name__ == "__main__":
    cli.main("export", USAGE, main, doc=__doc__)
