"""Images per second of the two image input paths (grain loader and in-memory arrays).

    python3 benchmarks/image_loader_bench.py                                # synthetic folder
    python3 benchmarks/image_loader_bench.py ../shared/data/images/cifar10_jpg.tar.xz
    python3 benchmarks/image_loader_bench.py <root with train/<class>/*.jpg> --workers 0 2 4 8
    python3 benchmarks/image_loader_bench.py <root> --recipe deit --size 224

The grain path reads, decodes and augments every example (``--recipe small``: pad-4 crop + flip,
``deit``: random-resized crop + flip + RandAugment + erasing) with N worker processes; the
in-memory path decodes the split once (or loads its ``.npz`` cache), then gathers batches and
augments them on the default JAX device with `random_crop_flip`. Prints a table; nothing is
asserted.
"""

from __future__ import annotations

import argparse
import pathlib
import tempfile
import time

import jax
import numpy as np
from PIL import Image

from mmx_jax.data import (
    DeitTrainTransform,
    FolderSource,
    ImageLoader,
    SmallImageTrainTransform,
    array_batches,
    decode_to_arrays,
    extract_archive,
    random_crop_flip,
)


def synthetic_folder(root: pathlib.Path, count: int, size: int = 32) -> pathlib.Path:
    """``count`` random JPEGs of (size, size) in 10 classes under root/train."""
    rng = np.random.default_rng(0)
    for i in range(count):
        folder = root / "train" / f"class_{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        # smooth noise compresses like a photo rather than like white noise
        small = rng.integers(0, 256, (size // 4, size // 4, 3), dtype=np.uint8)
        Image.fromarray(small).resize((size, size), Image.Resampling.BILINEAR).save(
            folder / f"{i:06d}.jpg", quality=75)
    return root


def time_batches(iterator, steps: int, warmup: int) -> float:
    """Seconds for ``steps`` batches after ``warmup`` batches (worker start-up excluded)."""
    for _ in range(warmup):
        next(iterator)
    start = time.perf_counter()
    for _ in range(steps):
        batch = next(iterator)
    jax.block_until_ready(batch)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("data", nargs="?", help="folder root or a .tar.xz archive of one")
    parser.add_argument("--split", default="train")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2, 4])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--recipe", choices=["small", "deit"], default="small")
    parser.add_argument("--size", type=int, default=32, help="output size of the deit recipe")
    parser.add_argument("--synthetic-count", type=int, default=8192)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        if args.data is None:
            root = synthetic_folder(pathlib.Path(scratch) / "synthetic", args.synthetic_count)
        elif args.data.endswith((".tar", ".tar.xz", ".tar.gz", ".tar.bz2")):
            root = extract_archive(args.data)
        else:
            root = pathlib.Path(args.data)
        source = FolderSource(root, args.split)
        transform = (SmallImageTrainTransform() if args.recipe == "small"
                     else DeitTrainTransform(size=args.size))
        print(f"{source}; batch {args.batch_size}, {args.steps} timed steps, "
              f"recipe {args.recipe}, {jax.device_count()} x {jax.devices()[0].platform}")
        rows = []
        for workers in args.workers:
            loader = ImageLoader(source, batch_size=args.batch_size, train=True, seed=0,
                                 num_epochs=None, shard_index=0, shard_count=1,
                                 transform=transform, worker_count=workers)
            iterator = loader.iterate()
            seconds = time_batches(iterator, args.steps, warmup=max(2, workers))
            iterator.close()
            rows.append((f"grain, {args.recipe} recipe", workers,
                         args.steps * args.batch_size / seconds))

        start = time.perf_counter()
        arrays = decode_to_arrays(source, progress=False)
        first = time.perf_counter() - start
        start = time.perf_counter()
        arrays = decode_to_arrays(source, progress=False)  # now from the .npz cache
        cached = time.perf_counter() - start
        print(f"in-memory split {arrays.images.shape}: first call {first:.2f} s, "
              f"cached load {cached:.2f} s")
        steps = min(args.steps, len(arrays) // args.batch_size)
        batches = array_batches(arrays, batch_size=args.batch_size, train=True, seed=0,
                                num_epochs=None, shard_index=0, shard_count=1)
        seconds = time_batches(batches, steps, warmup=1)
        rows.append(("in-memory gather", 0, steps * args.batch_size / seconds))

        augment = jax.jit(random_crop_flip)
        key = jax.random.key(0)

        def on_device():
            for step, batch in enumerate(batches):
                yield augment(jax.random.fold_in(key, step), jax.device_put(batch["image"]))

        seconds = time_batches(on_device(), steps, warmup=2)
        rows.append(("in-memory + device crop/flip", 0, steps * args.batch_size / seconds))

    print(f"{'path':<32} {'workers':>7} {'images/s':>12}")
    for name, workers, rate in rows:
        print(f"{name:<32} {workers:>7} {rate:>12,.0f}")


if __name__ == "__main__":
    main()
