r"""Where the time of a TSM2 training job goes on a CPU, part by part, side by side.

    PYTHONPATH=. python benchmarks/cpu_profile.py                  # the README's main job
    PYTHONPATH=. python benchmarks/cpu_profile.py --variant sequential=sequential \
        --variant auto=auto --rounds 3                             # two scans
    git archive <commit> | tar -x -C /tmp/before                   # an older version ...
    PYTHONPATH=. python benchmarks/cpu_profile.py --variant before=auto@/tmp/before \
        --variant after=auto                                       # ... against this one
    PYTHONPATH=. python benchmarks/cpu_profile.py --set data.seq_len=512 --set model.d_model=32
    PYTHONPATH=. python benchmarks/cpu_profile.py --variant eval256=auto \
        --variant eval64=auto,data.eval_batch_size=64                # config overrides

Builds the job of `python train.py --config <config>` (default: configs/tsm2.py, TSM2 on the
bundled ETTh1, input 336, H=96, batch 32) for each variant, `label=scan_impl[@code tree]`
followed by optional `,key=value` config overrides of its own (the tree: a checkout or
`git archive` export of this repository, default this one), and
measures it in a fresh process per variant and round; rounds alternate the variants, and the
tables give the median over the rounds (`--rounds`).

- The job: data and model set-up; compiling the training step and the evaluation step (trace,
  lower and XLA compile, one after the other: the loop overlaps them with the state's
  initialisation); the initialisation (compiled and run); one training step on a resident
  batch; loading and placing one training batch (the data windows); one validation and one
  test pass over every window; one checkpoint write (Orbax, waited for). The last column
  multiplies each part by how often the job runs it (steps, validations, checkpoints: the
  loop's schedule without early stopping); their sum estimates the job's wall time with
  nothing overlapped.
- The training step by part, forward alone and forward + backward (the vjp of a fixed random
  cotangent w.r.t. the parameters and the input): the embedding (RevIN, patching, Linear and
  positions), each mixer block (norm, mixer, dropout, residual) and, inside it, its scan
  alone (`selective_scan` at that block's shapes), the head (norm over patches and features,
  Linear, RevIN undone), the whole model with its loss, and the optimizer's update; then the
  real jitted training step.

Times are medians of `--repeat` calls after a warm-up: milliseconds for the step's parts,
seconds for the job's.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

REPO = pathlib.Path(__file__).resolve().parents[1]


def _code_tree() -> pathlib.Path:
    """The code a child process measures: --tree (another version's files) or this one."""
    return pathlib.Path(sys.argv[sys.argv.index("--tree") + 1]) if "--tree" in sys.argv \
        else REPO


sys.path.insert(0, str(_code_tree()))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from mmx_jax.layers.s6 import dt_bias_init, s4d_real_log  # noqa: E402
from mmx_jax.models.tsm2 import patchify  # noqa: E402
from mmx_jax.ssm import selective_scan  # noqa: E402
from mmx_jax.train.config_args import apply_overrides, load_config_file  # noqa: E402
from mmx_jax.train.loop import evaluate_split, place_batch, setup  # noqa: E402

try:  # the steps as objects; a --tree of before 2026-12-05 has them as functions
    from mmx_jax.train.loop import EvalStep as make_eval_step  # noqa: E402
    from mmx_jax.train.loop import TrainStep as make_train_step  # noqa: E402
except ImportError:
    from mmx_jax.train.loop import make_eval_step, make_train_step  # noqa: E402
from mmx_jax.train.optim import make_optimizer  # noqa: E402


def median_time(fn: Callable[[], object], repeat: int) -> float:
    """Median seconds of `repeat` synchronised calls after one warm-up call."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def random_like(tree):
    """Fixed random arrays shaped like the leaves of `tree` (a cotangent)."""
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), s.dtype), tree)


def fwd_and_grad(fn: Callable, *args) -> tuple[Callable, Callable]:
    """Jitted fn(*args) and the jitted vjp of a fixed random cotangent w.r.t. every argument."""
    cotangent = random_like(jax.eval_shape(fn, *args))
    forward = jax.jit(fn)
    grad = jax.jit(jax.grad(lambda *a: jnp.vdot(fn(*a), cotangent),
                            argnums=tuple(range(len(args)))))
    return (lambda: forward(*args)), (lambda: grad(*args))


def module_fwd_and_grad(module: nnx.Module, fn: Callable, *args) -> tuple[Callable, Callable]:
    """As `fwd_and_grad` for fn(module, *args): the vjp w.r.t. the module's parameters and
    every argument, taken as the training step takes it (nnx.grad inside the jitted function,
    so dropout draws its masks)."""
    graphdef, state = nnx.split(module)

    def apply(state, *a):
        return fn(nnx.merge(graphdef, state), *a)

    cotangent = random_like(jax.eval_shape(apply, state, *args))
    forward = jax.jit(apply)

    @jax.jit
    def grad(state, *a):
        return nnx.grad(lambda m, *b: jnp.vdot(fn(m, *b), cotangent),
                        argnums=tuple(range(len(a) + 1)))(nnx.merge(graphdef, state), *a)

    return (lambda: forward(state, *args)), (lambda: grad(state, *args))


def scan_part(impl: str, rng: np.random.Generator, batch: int, length: int, directions: int,
              e: int, n: int) -> tuple[Callable, Callable]:
    """One S6 call of `directions` x `e` channels as the layer makes it at initialisation."""
    channels = directions * e

    def normal(*shape):
        return jnp.asarray(rng.normal(size=shape), jnp.float32)

    args = (normal(batch, length, channels), normal(batch, length, channels) * 0.1,
            -jnp.exp(jnp.asarray(np.tile(s4d_real_log(e, n), (directions, 1)))),
            normal(batch, length, directions, n), normal(batch, length, directions, n),
            jnp.ones((channels,)),
            dt_bias_init(jax.random.key(0), (channels,), 1e-3, 1e-1, 1e-4))

    def scan(u, delta, A, B, C, D, delta_bias):
        return selective_scan(u, delta, A, B, C, D=D, delta_bias=delta_bias,
                              delta_softplus=True, impl=impl)

    return fwd_and_grad(scan, *args)


def job_counts(run) -> dict[str, int]:
    """How often the job runs each part: the loop's schedule, without early stopping."""
    tcfg = run.config.train
    steps, every = run.total_steps, tcfg.eval_every_steps or run.steps_per_epoch
    evals = len({*range(every, steps + 1, every), steps})
    # A save at every validation and every checkpoint_every_steps step (once where they
    # coincide), and a best checkpoint at each improving validation (here: all of them).
    saves = len({*range(every, steps + 1, every), steps,
                 *range(tcfg.checkpoint_every_steps, steps + 1,
                        tcfg.checkpoint_every_steps)}) + evals
    return {"training step": steps, "training batch (windows, placed)": steps,
            "validation pass": evals, "test pass": 1, "checkpoint write": saves}


def measure_job(config, workdir: pathlib.Path, repeat: int) -> tuple[dict, dict, object]:
    """Seconds per occurrence of each part of the job, the counts, and (run, state, batch)."""
    out = {}
    start = time.perf_counter()
    run = setup(config, workdir)
    out["set-up (data, model shapes)"] = time.perf_counter() - start
    batches = run.task.train_batches(0, run.steps_per_epoch)
    batch = place_batch(run, next(batches), run.task.train_batch_size)
    eval_batch = place_batch(run, next(run.task.eval_batches("val")), run.task.eval_batch_size)
    state_spec = jax.eval_shape(run.init_state)
    compiled = {}
    for name, make, example in (("train", make_train_step, batch),
                                ("eval", make_eval_step, eval_batch)):
        start = time.perf_counter()
        compiled[name] = make(run).trace(state_spec, example).lower().compile()
        out[f"compile the {name} step"] = time.perf_counter() - start
    start = time.perf_counter()
    state = jax.block_until_ready(run.init_state())
    out["initialise the state (compiled, run)"] = time.perf_counter() - start

    train_step = compiled["train"]
    position = np.float32(0.0)

    def step():
        nonlocal state
        state, metrics = train_step(state, batch, position)
        return metrics

    out["training step"] = median_time(step, repeat)
    out["training batch (windows, placed)"] = median_time(
        lambda: place_batch(run, next(batches), run.task.train_batch_size), repeat)
    for split, name in (("val", "validation pass"), ("test", "test pass")):
        start = time.perf_counter()
        evaluate_split(run, state, split, compiled["eval"])
        out[name] = time.perf_counter() - start
    start = time.perf_counter()
    run.checkpoints.save(1, state, {"step": 1})
    run.checkpoints.wait()
    out["checkpoint write"] = time.perf_counter() - start
    run.checkpoints.close()
    return out, job_counts(run), (run, state, batch)


def step_parts(run, state, batch, impl: str) -> dict[str, tuple[Callable, Callable | None]]:
    """(forward, forward + backward) of each part of the training step."""
    cfg = run.config
    model = run.model(jax.tree.map(jnp.copy, state))
    model.train()
    x = batch["x"]
    rng = np.random.default_rng(0)
    b, m = x.shape[0], x.shape[2]
    p, d = model.num_patches, cfg.model.d_model
    e, n, k = cfg.model.expand * d, cfg.model.state_dim, cfg.model.time_directions
    h = jnp.asarray(rng.normal(size=(b, m, p, d)), jnp.float32)
    parts = {}

    def embed(mdl, x):
        z, _ = mdl.revin.normalize(x)
        patches = patchify(jnp.swapaxes(z, 1, 2), mdl.patch_len, mdl.stride)
        return mdl.embed_dropout(mdl.patch_embed(patches) + mdl.pos_embed[...])

    def head(mdl, v, x):
        _, stats = mdl.revin.normalize(x)
        y = mdl.head(mdl.head_dropout(mdl.head_norm(v).reshape(*v.shape[:2], -1)))
        return mdl.revin.denormalize(jnp.swapaxes(y, 1, 2), stats)

    parts["embedding (RevIN, patches, Linear)"] = module_fwd_and_grad(model, embed, x)
    for i in range(cfg.model.num_layers):
        parts[f"time mixer block {i}"] = module_fwd_and_grad(
            model.mixer.token_blocks[i], lambda blk, v: blk(v), h)
        parts[f"- its scan ({b * m}, {p}, {k}x{e}, {n})"] = scan_part(impl, rng, b * m, p, k,
                                                                      e, n)
        parts[f"variate mixer block {i}"] = module_fwd_and_grad(
            model.mixer.channel_blocks[i], lambda blk, v: blk(v), h)
        parts[f"- its scan ({b * p}, {m}, 2x{e}, {n})"] = scan_part(impl, rng, b * p, m, 2, e,
                                                                    n)
    parts["head (norm, Linear, RevIN undone)"] = module_fwd_and_grad(model, head, h, x)
    parts["whole model and loss"] = module_fwd_and_grad(
        model, lambda mdl, x, y: run.task.loss(mdl, {"x": x, "y": y}), x, batch["y"])
    params = nnx.state(model, nnx.Param)
    tx = make_optimizer(cfg.optimizer, total_steps=run.total_steps,
                        steps_per_epoch=run.steps_per_epoch)
    opt_state = tx.init(params)
    update = jax.jit(tx.update)
    parts["optimizer update"] = (lambda: update(params, opt_state, params), None)
    return parts


def child(spec: dict) -> dict:
    """One variant's measurements, in this process."""
    config = apply_overrides(load_config_file(spec["config"]),
                             spec["set"] + [f"model.scan_impl={spec['impl']}"])
    with tempfile.TemporaryDirectory() as workdir:
        job, counts, (run, state, batch) = measure_job(config, pathlib.Path(workdir),
                                                       spec["repeat"])
        parts = {}
        for name, (fwd, grad) in step_parts(run, state, batch, spec["impl"]).items():
            parts[name] = [median_time(fwd, spec["repeat"]) * 1e3,
                           None if grad is None else median_time(grad, spec["repeat"]) * 1e3]
    return {"job": job, "counts": counts, "parts": parts,
            "steps": [run.total_steps, run.steps_per_epoch, run.task.train_batch_size],
            "device": f"{jax.devices()[0].device_kind} x {jax.device_count()}, jax "
                      f"{jax.__version__}"}


def med(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_tables(labels: list[str], rows: dict[str, list[dict]]) -> None:
    first = rows[labels[0]][0]
    print(f"\n{first['device']}. Seconds per occurrence, then times how often the job runs it")
    for lb in labels:
        total, per_epoch, batch = rows[lb][0]["steps"]
        print(f"- {lb}: {total} steps ({per_epoch} per epoch), batch {batch}")
    print()
    print("| part | " + " | ".join(f"{lb} | {lb} x count" for lb in labels) + " |")
    print("|---|" + "---|---|" * len(labels))
    sums = dict.fromkeys(labels, 0.0)
    for key in first["job"]:
        cells = []
        for lb in labels:
            count = rows[lb][0]["counts"].get(key, 1)
            value = med(r["job"][key] for r in rows[lb])
            sums[lb] += value * count
            cells += [fmt(value, 4 if value < 1 else 2), fmt(value * count, 1)]
        counts = "/".join(str(rows[lb][0]["counts"][key]) for lb in labels
                          ) if key in first["counts"] else ""
        name = f"{key} (x {counts})" if counts else key
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("| **sum (nothing overlapped)** | " + " | ".join(f" | **{sums[lb]:.1f}**"
                                                        for lb in labels) + " |")

    print("\nThe training step by part, ms: forward | forward + backward (a variant of other "
          "shapes has rows of its own)\n")
    print("| part | " + " | ".join(f"{lb} fwd | {lb} fwd+bwd" for lb in labels) + " |")
    print("|---|" + "---|---|" * len(labels))
    keys = list(dict.fromkeys(k for lb in labels for k in rows[lb][0]["parts"]))
    for key in keys:
        cells = []
        for lb in labels:
            cells += [fmt(med(r["parts"][key][i] for r in rows[lb] if key in r["parts"]), 2)
                      for i in (0, 1)]
        print(f"| {key} | " + " | ".join(cells) + " |")
    print("| the jitted training step (AdamW update included) | " + " | ".join(
        f" | {med(r['job']['training step'] for r in rows[lb]) * 1e3:.2f}" for lb in labels)
        + " |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "tsm2.py"),
                        help="configs/<file>.py[:args], as train.py's --config")
    parser.add_argument("--set", action="append", default=[], help="key=value overrides")
    parser.add_argument("--variant", action="append", default=[],
                        help="label=scan_impl[@code tree][,key=value...] (default: auto=auto)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over the variants")
    parser.add_argument("--repeat", type=int, default=10, help="timed calls per measurement")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--tree", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print("RESULT " + json.dumps(child(json.loads(args.child))), flush=True)
        return

    variants = {}
    for item in args.variant or ["auto=auto"]:
        label, sep, rest = item.partition("=")
        head, *overrides = rest.split(",")
        impl, _, tree = head.partition("@")
        if not sep or not impl or not all("=" in o for o in overrides):
            parser.error(f"--variant {item!r}: wanted label=scan_impl[@code tree][,key=value...]")
        variants[label] = (impl, str(pathlib.Path(tree).resolve()) if tree else str(REPO),
                           overrides)
    print(f"config {args.config} {args.set}; variants {variants}; {args.rounds} rounds, "
          f"{args.repeat} calls per measurement", flush=True)
    rows = {label: [] for label in variants}
    for r in range(args.rounds):
        for label, (impl, tree, overrides) in variants.items():
            spec = dict(config=args.config, set=args.set + overrides, impl=impl,
                        repeat=args.repeat)
            start = time.perf_counter()
            done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec),
                                   "--tree", tree], capture_output=True, text=True)
            lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
            if done.returncode or not lines:
                sys.exit(f"{label} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
            rows[label].append(json.loads(lines[-1][len("RESULT "):]))
            print(f"round {r + 1}: {label} measured in {time.perf_counter() - start:.0f} s",
                  flush=True)
    print_tables(list(variants), rows)


if __name__ == "__main__":
    main()
