"""A census of a vision training step's jaxpr: what each primitive writes, before XLA fuses.

    PYTHONPATH=. python benchmarks/step_census.py                       # ViM2-T, batch 128
    PYTHONPATH=. python benchmarks/step_census.py --model viqs_tiny --batch 64
    PYTHONPATH=. python benchmarks/step_census.py --quick               # tiny (smoke test)

Traces the jitted AdamW training step of `--model` at 224x224 (bfloat16 compute, Pallas
scans) once per scan layout, with abstract arguments (no device time, no memory: it runs on
a CPU), and counts every primitive of the jaxpr, nested jaxprs included but not the bodies
of the Pallas kernels, with the bytes of its outputs. The layout ops of the cross-scan
(transpose, rev, gather, scatter-add, pad, concatenate, slice) show what the walks remove;
XLA fuses many of the elementwise ones, so the bytes are an upper bound of the traffic, not
a measurement (notes/vision_perf.md read the first census this way).
"""

from __future__ import annotations

import argparse
import collections
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax._src import source_info_util  # the user frame of an equation (no public API)
from jax.extend.core import jaxprs_in_params

from mmx_jax.models import create_model

REPO = pathlib.Path(__file__).resolve().parents[1]
LAYOUT_OPS = ("transpose", "rev", "gather", "scatter-add", "scatter_add", "pad",
              "concatenate", "slice", "dynamic_slice")


def _bytes(aval) -> int:
    """Bytes of an array value (0 for tokens, PRNG keys and other non-arrays)."""
    try:
        return int(np.prod(aval.shape)) * np.dtype(aval.dtype).itemsize
    except (AttributeError, TypeError):
        return 0


def census(jaxpr, counts=None, nbytes=None, sources=None):
    """primitive -> (count, output bytes) over `jaxpr` and its sub-jaxprs (not Pallas kernel
    bodies: those are the kernels' own loads and stores); with `sources`, also
    (primitive, source line) -> output bytes."""
    counts = collections.Counter() if counts is None else counts
    nbytes = collections.Counter() if nbytes is None else nbytes
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        counts[name] += 1
        size = sum(_bytes(v.aval) for v in eqn.outvars)
        nbytes[name] += size
        if sources is not None:
            where = source_info_util.summarize(eqn.source_info).replace(f"{REPO}/", "")
            sources[name, where] += size
        if name == "pallas_call":
            continue
        for sub in jaxprs_in_params(eqn.params):
            census(sub, counts, nbytes, sources)
    return counts, nbytes


def train_step_jaxpr(name: str, layout: str, *, size: int, batch: int, extra):
    model = create_model(name, scan_impl="pallas", scan_layout=layout, dtype=jnp.bfloat16,
                         **extra)
    optimizer = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)
    graphdef, state = nnx.split((model, optimizer))
    images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
    labels = jax.ShapeDtypeStruct((batch,), jnp.int32)

    def train(state, images, labels):
        model, optimizer = nnx.merge(graphdef, state)

        def loss_fn(m):
            return optax.softmax_cross_entropy_with_integer_labels(m(images), labels).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return nnx.state((model, optimizer)), loss

    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    return jax.make_jaxpr(train)(abstract, images, labels).jaxpr


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vim2_tiny")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--layouts", default="walks,permuted")
    parser.add_argument("--top", type=int, default=12, help="other primitives listed")
    parser.add_argument("--quick", action="store_true", help="a tiny model on 32x32 images")
    parser.add_argument("--where", default="transpose,rev,pad",
                        help="list the source lines writing the most of these primitives")
    args = parser.parse_args()
    size, batch, extra = 224, args.batch, {}
    if args.quick:
        size, batch = 32, 2
        extra = dict(widths=(8, 16, 32, 64), token_depths=(1, 1, 1, 1),
                     channel_depths=(1, 1, 1, 1), stem_stride=2, num_classes=10)
    layouts = args.layouts.split(",")
    sources = {layout: collections.Counter() for layout in layouts}
    tables = {layout: census(train_step_jaxpr(args.model, layout, size=size, batch=batch,
                                              extra=extra), sources=sources[layout])
              for layout in layouts}
    gib = 2.0**30
    print(f"{args.model}, training step, {size}x{size}, batch {batch}, bfloat16, Pallas scans: "
          "count / output GiB per primitive")
    print("| primitive | " + " | ".join(layouts) + " |")
    print("|---|" + "---|" * len(layouts))
    others = collections.Counter()
    for _, nbytes in tables.values():
        others.update({k: v for k, v in nbytes.items() if k not in LAYOUT_OPS})
    names = [n for n in LAYOUT_OPS if any(n in c for c, _ in tables.values())]
    names += [n for n, _ in others.most_common(args.top)]
    for name in names:
        cells = [f"{c[name]} / {b[name] / gib:.2f}" for c, b in tables.values()]
        print(f"| {name} | " + " | ".join(cells) + " |")
    totals = [f"{sum(c.values())} / {sum(b.values()) / gib:.2f}" for c, b in tables.values()]
    print("| all | " + " | ".join(totals) + " |")
    layout_bytes = [sum(b[n] for n in LAYOUT_OPS) / gib for _, b in tables.values()]
    print("| layout ops | " + " | ".join(f"{x:.2f}" for x in layout_bytes) + " |")
    wanted = [w for w in args.where.split(",") if w]
    for layout in layouts:
        print(f"\n{layout}: the source lines writing the most {', '.join(wanted)} (GiB)")
        rows = [(b, p, src) for (p, src), b in sources[layout].items() if p in wanted]
        for b, p, src in sorted(rows, reverse=True)[:args.top]:
            print(f"  {b / gib:7.2f}  {p:10s} {src}")


if __name__ == "__main__":
    main()
