"""Run by tests/test_multiprocess.py under `python -m mmx_jax.launch`: reports what this process
of a multi-process run holds, as JSON in <out>/<what>.<process>.json.

    python tests/multiprocess_probe.py shards <config spec> <out> [key=value ...]
        the index ranges of this process's shards of every parameter of the initial state
    python tests/multiprocess_probe.py indices <config spec> <out> [key=value ...]
        the training examples (indices into the training split) this process loads in the
        first epoch
"""

from __future__ import annotations

import json
import pathlib
import sys
import tempfile

import jax

from mmx_jax.train.config_args import apply_overrides, load_config_file
from mmx_jax.train.distributed import initialize_distributed


def shards(config) -> dict:
    from mmx_jax.train.loop import setup  # noqa: PLC0415
    from mmx_jax.train.sharding import path_str  # noqa: PLC0415

    with tempfile.TemporaryDirectory() as workdir:
        run = setup(config, workdir, read_only=True)
        state = run.init_state()
        run.checkpoints.close()
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(state["model"]):
        if hasattr(leaf, "addressable_shards") and leaf.ndim:
            out[path_str(path)] = sorted({tuple((i.start or 0, i.stop or n) for i, n in
                                                zip(s.index, leaf.shape, strict=True))
                                          for s in leaf.addressable_shards})
    return out


def indices(config) -> list[int]:
    from mmx_jax.train.tasks.classification import ClassificationTask  # noqa: PLC0415

    task = ClassificationTask.from_config(config)
    stream = task.train_stream(0)
    return [int(i) for _ in range(task.steps_per_epoch()) for i in next(stream)["index"]]


def main() -> None:
    what, spec, out, *overrides = sys.argv[1:]
    initialize_distributed()
    config = apply_overrides(load_config_file(spec), overrides)
    result = {"shards": shards, "indices": indices}[what](config)
    path = pathlib.Path(out) / f"{what}.{jax.process_index()}.json"
    path.write_text(json.dumps({"process": jax.process_index(), what: result}))


if __name__ == "__main__":
    main()
