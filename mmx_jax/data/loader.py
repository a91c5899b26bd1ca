"""Image batch loaders (no TensorFlow): the sampling plan, the grain loader, the in-memory path.

Two paths, one sampling plan (`EpochPlan`: a per-epoch permutation from the seed, split across
processes, cut into batches):

* General path, `ImageLoader`: a grain ``MapDataset`` of batches. Each example is read from a
  random-access source, augmented in NumPy/PIL with a generator seeded from
  ``(seed, epoch, index)``, and batched in the loader's worker processes (``worker_count``;
  0 runs in this process). Resume from any step with ``loader.iterate(start_step)`` or from
  grain's iterator state (``it.get_state()`` / ``it.set_state(state)``).
* In-memory path for small images, `array_batches`: a whole split decoded once into a uint8
  array (`decode_to_arrays`, cached as an ``.npz``) and gathered batch by batch; augment on
  device with `random_crop_flip` (the CIFAR speed run).

Batches are dicts of NumPy arrays::

    image (B, H, W, C) uint8   label (B,) int32   mask (B,) bool   index (B,) int64

Training drops the last partial batch of each epoch; evaluation keeps every example once and
pads the last batch (``mask`` False, ``index`` -1), so every batch and every process has the
same shape and step count. ``batch_size`` is per process.

Typical use::

    root = extract_archive("cifar10_jpg.tar.xz")                  # once; cached
    train = open_image_source(f"folder:{root}", "train")
    loader = ImageLoader(train, batch_size=128, train=True, seed=0, num_epochs=300,
                         transform=SmallImageTrainTransform(), worker_count=8)
    for step, batch in enumerate(loader.iterate(start_step), start_step): ...

    arrays = decode_to_arrays(train)                              # fast path, cached .npz
    for batch in array_batches(arrays, batch_size=512, train=True, seed=0): ...

Sources are in `image_sources`, the cache of decoded splits in `decode_cache`, the per-example
augmentations in `augment` and the batch-level ones in `batch_augment`; `mmx_jax.data` exports
them all.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import grain

from mmx_jax.data.augment import EvalTransform, example_rng
from mmx_jax.data.decode_cache import ImageArrays, resize
from mmx_jax.data.image_sources import ImageSource

Transform = Callable[[dict[str, Any], np.random.Generator], dict[str, Any]]


def _resolve_shard(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
    if shard_index is None or shard_count is None:
        import jax

        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} must be in [0, shard_count={shard_count})")
    return shard_index, shard_count


class EpochPlan:
    """Which source record sits at each position of this process's stream.

    Epoch ``e`` orders all records by a permutation drawn from ``(seed, e)`` (identity when
    not shuffling), the same on every process; process ``p`` of ``P`` takes global positions
    ``p, p + P, p + 2P, ...``. Training keeps ``steps_per_epoch = N // (P * batch_size)``
    batches per process (every example at most once per epoch, the rest of the permutation
    dropped); evaluation keeps ``ceil(N / (P * batch_size))`` and pads past the end (index -1),
    so every example appears exactly once across processes.
    """

    def __init__(self, num_records: int, *, batch_size: int, train: bool, seed: int = 0,
                 num_epochs: int | None = 1, shard_index: int = 0, shard_count: int = 1):
        if num_records < 1:
            raise ValueError(f"num_records must be >= 1, got {num_records}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_epochs is not None and num_epochs < 1:
            raise ValueError(f"num_epochs must be >= 1 or None (endless), got {num_epochs}")
        if not 0 <= shard_index < shard_count:
            raise ValueError(f"shard_index {shard_index} must be in [0, shard_count={shard_count})")
        self.num_records, self.batch_size, self.train = num_records, batch_size, train
        self.seed, self.num_epochs = int(seed), num_epochs
        self.shard_index, self.shard_count = shard_index, shard_count
        global_batch = batch_size * shard_count
        if train:
            self.steps_per_epoch = num_records // global_batch
            if self.steps_per_epoch == 0:
                raise ValueError(f"a training epoch of {num_records} records has no full batch "
                                 f"of {batch_size} x {shard_count} processes")
        else:
            self.steps_per_epoch = -(-num_records // global_batch)
        self.per_epoch = self.steps_per_epoch * batch_size  # positions per process and epoch
        self._cache: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()  # the loader's read threads share the cache

    @property
    def num_steps(self) -> int:
        """Batches over all epochs (a huge number when ``num_epochs`` is None)."""
        epochs = self.num_epochs if self.num_epochs is not None else sys.maxsize // self.per_epoch
        return epochs * self.steps_per_epoch

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """This process's record indices of ``epoch`` in order, (per_epoch,) int64, -1 = pad."""
        with self._lock:
            if epoch not in self._cache:
                self._cache[epoch] = self._compute_epoch_indices(epoch)
                if len(self._cache) > 2:
                    self._cache.pop(next(iter(self._cache)))
            return self._cache[epoch]

    def _compute_epoch_indices(self, epoch: int) -> np.ndarray:
        if self.train:
            order = np.random.default_rng([0, self.seed, int(epoch)]).permutation(
                self.num_records)
        else:
            order = np.arange(self.num_records)
        positions = self.shard_index + self.shard_count * np.arange(self.per_epoch)
        indices = np.full(self.per_epoch, -1, np.int64)
        valid = positions < self.num_records
        indices[valid] = order[positions[valid]]
        return indices

    def __len__(self) -> int:
        return self.num_steps * self.batch_size

    def __getitem__(self, position: int) -> tuple[int, int]:
        """(record index or -1, epoch) at a position of this process's stream."""
        epoch, offset = divmod(int(position), self.per_epoch)
        return int(self.epoch_indices(epoch)[offset]), epoch

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        del state["_lock"], state["_cache"]  # workers rebuild permutations lazily
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _cache={}, _lock=threading.Lock())


class _ReadExample:
    """Grain map function: plan item -> augmented example with label, mask and index."""

    def __init__(self, source: ImageSource, transform: Transform | None, seed: int):
        self.source, self.transform, self.seed = source, transform, seed

    def __call__(self, item: tuple[int, int]) -> dict[str, np.ndarray]:
        index, epoch = item
        example = self.source[max(index, 0)]  # padding reads record 0, masked out
        if self.transform is not None:
            example = self.transform(example, example_rng(self.seed, epoch, max(index, 0)))
        return {"image": np.asarray(example["image"], np.uint8),
                "label": np.int32(example["label"]),
                "mask": np.bool_(index >= 0),
                "index": np.int64(index)}


class ImageLoader:
    """Batches of a random-access image source through grain, sharded across processes.

    Attributes:
      plan: the `EpochPlan` (``steps_per_epoch``, ``num_steps``).
      dataset: the grain ``MapDataset`` whose element k is batch k of this process.
    """

    def __init__(self, source: ImageSource, *, batch_size: int, train: bool, seed: int = 0,
                 transform: Transform | None = None, num_epochs: int | None = 1,
                 shard_index: int | None = None, shard_count: int | None = None,
                 worker_count: int = 0, worker_buffer_size: int = 2, read_threads: int = 2):
        """Builds the pipeline (nothing is read until iteration).

        Args:
          source: random access to ``{"image": (H, W, C) uint8, "label": int}``.
          batch_size: examples per batch on this process.
          train: shuffle every epoch and drop the remainder (else: source order, padded
            last batch with ``mask``).
          seed: seeds the epoch permutations and the per-example augmentation.
          transform: ``transform(example, rng) -> example`` applied per example; its images
            must all have one shape (None: the source's images must).
          num_epochs: epochs in the stream; None for endless.
          shard_index, shard_count: this process's shard; default ``jax.process_index()`` and
            ``jax.process_count()``.
          worker_count: worker processes reading and augmenting (0: in this process).
          worker_buffer_size: batches each worker keeps ready.
          read_threads: threads per process building batches (0: sequential).
        """
        shard_index, shard_count = _resolve_shard(shard_index, shard_count)
        if worker_count < 0:
            raise ValueError(f"worker_count must be >= 0, got {worker_count}")
        self.source = source
        self.plan = EpochPlan(len(source), batch_size=batch_size, train=train, seed=seed,
                              num_epochs=num_epochs, shard_index=shard_index,
                              shard_count=shard_count)
        self.worker_count, self.worker_buffer_size = worker_count, worker_buffer_size
        self.read_threads = read_threads
        import grain  # noqa: PLC0415  (only this loader needs grain; the in-memory path not)

        self.dataset = (grain.MapDataset.source(self.plan)
                        .map(_ReadExample(source, transform, seed))
                        .batch(batch_size, drop_remainder=True))

    @property
    def steps_per_epoch(self) -> int:
        return self.plan.steps_per_epoch

    def __len__(self) -> int:
        return self.plan.num_steps

    def iterate(self, start_step: int = 0) -> grain.DatasetIterator:
        """An iterator over the batches from ``start_step`` on (close it when done early)."""
        if not 0 <= start_step <= len(self):
            raise ValueError(f"start_step must be in [0, {len(self)}], got {start_step}")
        import grain  # noqa: PLC0415

        read = grain.ReadOptions(num_threads=self.read_threads,
                                 prefetch_buffer_size=max(self.read_threads, 1))
        ds = self.dataset[start_step:].to_iter_dataset(read)
        if self.worker_count:
            from absl import flags

            # grain's worker processes read its absl flags; outside an absl app (scripts,
            # tests) nothing has parsed them, so take their defaults.
            if not flags.FLAGS.is_parsed():
                flags.FLAGS.mark_as_parsed()
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(
                num_workers=self.worker_count, per_worker_buffer_size=self.worker_buffer_size))
        return iter(ds)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self.iterate(0)


def eval_view(image: np.ndarray, *, size: int, pipeline: str) -> np.ndarray:
    """A decoded (H, W, C) uint8 image as `pipeline`'s evaluation sees it: "memory" resizes
    it to (size, size) as `decode_to_arrays` does; "grain" resizes the shorter side and
    crops the centre (`EvalTransform`)."""
    if pipeline == "memory":
        return resize(image, (size, size))
    return EvalTransform(size=size)({"image": image})["image"]


def array_batches(arrays: ImageArrays, *, batch_size: int, train: bool, seed: int = 0,
                  num_epochs: int | None = 1, start_step: int = 0,
                  shard_index: int | None = None, shard_count: int | None = None
                  ) -> Iterator[dict[str, np.ndarray]]:
    """Batches of an in-memory split, by the same `EpochPlan` as `ImageLoader`.

    No per-example augmentation: apply `random_crop_flip` (and `mixup_cutmix`) on device.
    ``EpochPlan(len(arrays), ...).steps_per_epoch`` gives the batches per epoch.

    Yields:
      dicts with image (B, H, W, C) uint8, label (B,) int32, mask (B,) bool, index (B,) int64;
      padded rows (evaluation) repeat record 0 with mask False and index -1.
    """
    shard_index, shard_count = _resolve_shard(shard_index, shard_count)
    plan = EpochPlan(len(arrays), batch_size=batch_size, train=train, seed=seed,
                     num_epochs=num_epochs, shard_index=shard_index, shard_count=shard_count)
    for step in range(start_step, plan.num_steps):
        epoch, offset = divmod(step, plan.steps_per_epoch)
        index = plan.epoch_indices(epoch)[offset * batch_size:(offset + 1) * batch_size]
        take = np.maximum(index, 0)
        yield {"image": arrays.images[take], "label": arrays.labels[take].astype(np.int32),
               "mask": index >= 0, "index": index}
