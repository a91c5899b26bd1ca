"""Image classification task: sources, the in-memory and grain pipelines, loss and metrics.

Two pipelines (`config.data.pipeline`):

* "memory": each split decoded once into a uint8 array (`decode_to_arrays`, cached), batches
  gathered from it, and the small-image augmentation (pad-4 random crop + flip, optional
  cutout and mixup/cutmix) done on device inside the jitted step. For CIFAR-sized data.
* "grain": a grain loader with worker processes reading the source and applying the DeiT/Swin
  per-example recipe (random-resized crop, flip, RandAugment, random erasing); mixup/cutmix
  and label smoothing on device. For ImageNet-sized data.

Validation uses `data.val_holdout` training examples held out from the training split (the
last ones of a fixed permutation), or the evaluation split when it is 0.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mmx_jax import data as img
from mmx_jax.train.sharding import process_batch_slice
from mmx_jax.train.tasks.base import Task

log = logging.getLogger(__name__)


class _Subset:
    """Records `indices` of a source, as a source."""

    def __init__(self, source, indices: np.ndarray):
        self.source, self.indices = source, np.asarray(indices)
        self.class_names = source.class_names

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.source[int(self.indices[i])]


def _take(source, indices: np.ndarray):
    """The examples `indices` of `source`: decoded arrays stay arrays, a source a `_Subset`."""
    if isinstance(source, img.ImageArrays):
        return img.ImageArrays(source.images[indices], source.labels[indices],
                               source.class_names)
    return _Subset(source, indices)


def _spread_subset(source, count: int):
    """`count` examples of `source` at evenly spaced positions (a split stored class by class
    keeps its classes), or the whole source if it has no more."""
    if len(source) <= count:
        return source
    return _take(source, np.linspace(0, len(source) - 1, count).round().astype(np.int64))


def _holdout_split(n: int, holdout: int) -> tuple[np.ndarray, np.ndarray]:
    if not 0 <= holdout < n:
        raise ValueError(f"data.val_holdout={holdout} must be in [0, {n}) for a training split "
                         f"of {n} examples")
    order = np.random.default_rng(1234).permutation(n)
    return np.sort(order[:n - holdout]), np.sort(order[n - holdout:])


@dataclasses.dataclass
class ClassificationTask(Task):
    """Softmax classification with label smoothing; metrics top-1, top-5 and loss."""

    config: Any
    sources: dict[str, Any]  # "train", "val", "test" -> ImageArrays or source
    num_classes: int
    # Per-channel statistics in 0..1 units: the config's, or measured on the training split.
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    validation_metric = "top1"
    validation_mode = "max"

    @classmethod
    def from_config(cls, config) -> ClassificationTask:
        d = config.data
        train = _open_split(d, "train_split")
        test = _open_split(d, "eval_split")
        if d.pipeline == "memory":
            size = d.image_size or None
            train = img.decode_to_arrays(train, image_size=size, cache_dir=d.cache_dir)
            test = img.decode_to_arrays(test, image_size=size, cache_dir=d.cache_dir)
        elif d.pipeline != "grain":
            raise ValueError(f"data.pipeline={d.pipeline!r} is not 'memory' or 'grain'")
        if d.val_holdout:
            keep, held = _holdout_split(len(train), d.val_holdout)
            val, train = _take(train, held), _take(train, keep)
        else:
            val = test
        if d.get("max_eval_images", 0):
            val, test = (_spread_subset(s, d.max_eval_images) for s in (val, test))
        task = cls(config, {"train": train, "val": val, "test": test}, len(train.class_names))
        task.mean, task.std = _statistics(d, train)
        return task

    @classmethod
    def synthetic(cls, config, num_classes: int = 10, *, seed: int = 0) -> ClassificationTask:
        """Random images and labels of the config's image size, two training batches of them
        in every split, in the memory pipeline (the config is switched to it): for timing and
        compiling a config's steps without its data."""
        d = config.data
        rng = np.random.default_rng(seed)
        n = 2 * d.batch_size
        arrays = img.ImageArrays(
            rng.integers(0, 256, (n, d.image_size, d.image_size, d.channels or 3), np.uint8),
            rng.integers(0, num_classes, n).astype(np.int32),
            tuple(str(i) for i in range(num_classes)))
        config.data.pipeline = "memory"
        task = cls(config, {"train": arrays, "val": arrays, "test": arrays}, num_classes)
        task.mean, task.std = _statistics(d, arrays)
        return task

    def describe_split(self, split: str) -> str:
        """How many examples `split` has (for messages)."""
        return (f"{len(self.sources[split])} image(s) in the {split} split of "
                f"{self.config.data.name}")

    def fingerprint(self) -> str:
        """The splits' sizes and class names, and the sources' own fingerprints where they
        have them (file lists and sizes of image folders)."""
        def digest(source) -> str:
            if isinstance(source, img.ImageArrays):  # labels and a sample of the images
                sample = source.images[::max(1, len(source) // 256)]
                return hashlib.sha256(source.labels.tobytes() + sample.tobytes()).hexdigest()
            return getattr(source, "fingerprint", lambda: "")()

        parts = [[split, len(source), digest(source)[:16]]
                 for split, source in sorted(self.sources.items())]
        return json.dumps([parts, list(self.sources["train"].class_names)])

    # -- model ----------------------------------------------------------------------------
    @property
    def channels(self) -> int:
        """Channels of the images as the pipeline delivers them."""
        return len(self.mean)

    def model_shapes(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes, "in_channels": self.channels}

    def describe(self) -> dict[str, Any]:
        d = self.config.data
        return {"task": "classification", "source": str(d.name),
                "class_names": list(self.sources["train"].class_names),
                "channels": self.channels, "image_size": d.image_size,
                "pipeline": d.pipeline, "mean": list(self.mean), "std": list(self.std),
                "model_shapes": self.model_shapes()}

    # -- batches --------------------------------------------------------------------------
    def _local(self, global_size: int) -> int:
        rows = process_batch_slice(global_size)
        return rows.stop - rows.start

    def steps_per_epoch(self) -> int:
        return len(self.sources["train"]) // self.train_batch_size

    def train_batches(self, start_step: int, steps_per_epoch: int
                      ) -> Iterator[dict[str, np.ndarray]]:
        """This process's rows of each training batch from `start_step` on (endless): image,
        label and the global step as the augmentation seed."""
        del steps_per_epoch  # the sampling plan has its own, the same (`steps_per_epoch`)
        for batch in self.train_stream(start_step):
            yield {"image": batch["image"], "label": batch["label"], "seed": batch["seed"]}

    def train_stream(self, start_step: int) -> Iterator[dict[str, np.ndarray]]:
        """`train_batches` with the training-split index of every row ("index"): each
        process reads its own shard of every epoch's permutation (`data.images.EpochPlan`)."""
        d, seed = self.config.data, self.config.seed
        local = self._local(self.train_batch_size)
        if d.pipeline == "memory":
            stream = img.array_batches(self.sources["train"], batch_size=local, train=True,
                                       seed=seed, num_epochs=None, start_step=start_step)
        else:
            flip_prob = 0.5 if d.get("flip", True) else 0.0
            if d.crop_padding >= 0:  # the small-image recipe, per example
                transform = img.SmallImageTrainTransform(
                    padding=d.crop_padding, flip_prob=flip_prob,
                    cutout_size=d.get("cutout_size", 0))
            else:  # DeiT/Swin's
                transform = img.DeitTrainTransform(
                    size=d.image_size, randaugment_ops=d.randaugment_ops,
                    randaugment_magnitude=d.randaugment_magnitude,
                    erasing_prob=d.erasing_prob, flip_prob=flip_prob)
            loader = img.ImageLoader(self.sources["train"], batch_size=local, train=True,
                                     seed=seed, transform=transform, num_epochs=None,
                                     worker_count=d.workers)
            stream = loader.iterate(start_step)
        for step, batch in enumerate(stream, start_step):
            # One augmentation seed per global step, the same on every process.
            yield {"image": batch["image"], "label": batch["label"], "index": batch["index"],
                   "seed": np.full(len(batch["label"]), step, np.uint32)}

    def eval_batches(self, split: str) -> Iterator[dict[str, np.ndarray]]:
        d = self.config.data
        local = self._local(self.eval_batch_size)
        source = self.sources[split]
        if isinstance(source, img.ImageArrays):
            stream = img.array_batches(source, batch_size=local, train=False)
        else:
            stream = img.ImageLoader(source, batch_size=local, train=False,
                                     transform=img.EvalTransform(size=d.image_size),
                                     worker_count=d.workers).iterate(0)
        for batch in stream:
            yield {"image": batch["image"], "label": batch["label"], "mask": batch["mask"]}

    # -- math -----------------------------------------------------------------------------
    def _normalize(self, images):
        return img.normalize(images, self.mean, self.std)

    def train_inputs(self, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        """The on-device augmentation of a training batch: (images, soft targets (B, classes)).
        Deterministic given the config's seed and the batch's step ("seed")."""
        d = self.config.data
        key = jax.random.fold_in(jax.random.key(self.config.seed), batch["seed"][0])
        k_crop, k_mix = jax.random.split(key)  # as before cutout existed: same crops and mixes
        k_cut = jax.random.fold_in(key, 2)
        images = batch["image"]
        flip = d.get("flip", True)
        if d.pipeline == "memory" and (d.crop_padding >= 0 or flip):  # -1 and no flip: off
            images = img.random_crop_flip(k_crop, images, padding=max(d.crop_padding, 0),
                                          flip_prob=0.5 if flip else 0.0)
        if d.pipeline == "memory" and d.get("cutout_size", 0) > 0:
            # The mean pixel: zero after normalisation.
            fill = np.round(255 * np.asarray(self.mean)).astype(np.uint8)
            images = img.cutout(k_cut, images, d.cutout_size, fill=fill)
        if d.mixup_alpha > 0 or d.cutmix_alpha > 0:
            return img.mixup_cutmix(
                k_mix, images, batch["label"], num_classes=self.num_classes,
                mixup_alpha=d.mixup_alpha, cutmix_alpha=d.cutmix_alpha, prob=d.mix_prob,
                label_smoothing=d.label_smoothing)
        return images, img.smooth_labels(batch["label"], self.num_classes, d.label_smoothing)

    def loss(self, model: nnx.Module, batch: dict[str, jax.Array]) -> jax.Array:
        images, targets = self.train_inputs(batch)
        logits = model(self._normalize(images))
        return jnp.mean(optax.softmax_cross_entropy(logits.astype(jnp.float32), targets))

    def predict(self, model: nnx.Module, batch: dict[str, jax.Array]) -> jax.Array:
        """Logits (B, classes), float32; with `eval.flip_tta`, the mean of the logits of each
        image and of its mirror image."""
        x = self._normalize(batch["image"])
        logits = model(x).astype(jnp.float32)
        if self.config.get("eval", {}).get("flip_tta", False):
            logits = (logits + model(x[:, :, ::-1]).astype(jnp.float32)) / 2
        return logits

    def eval_sums(self, model: nnx.Module, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        logits = self.predict(model, batch)
        labels, mask = batch["label"], batch["mask"].astype(jnp.float32)
        top5 = jax.lax.top_k(logits, min(5, self.num_classes))[1]
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        return {"correct1": jnp.sum(mask * (top5[:, 0] == labels)),
                "correct5": jnp.sum(mask * jnp.any(top5 == labels[:, None], axis=1)),
                "loss": jnp.sum(mask * loss), "count": jnp.sum(mask)}

    @staticmethod
    def metrics(sums: dict[str, float]) -> dict[str, float]:
        n = sums["count"]
        return {"top1": sums["correct1"] / n, "top5": sums["correct5"] / n,
                "loss": sums["loss"] / n}


_SPLIT_KINDS = ("folder", "archive")


def _open_split(d, key: str):
    """The source of split `d[key]`; a missing split names the config key and the splits the
    source has."""
    split = d[key]
    try:
        return img.open_image_source(d.name, split, data_dir=d.data_dir,
                                     channels=d.channels or None, cache_dir=d.cache_dir)
    except (FileNotFoundError, ValueError) as err:
        available = _available_splits(d)
        if available is None or split in available:
            raise
        raise FileNotFoundError(
            f"{d.name}: no split {split!r} (config key data.{key}={split!r}); this source has "
            f"the splits {', '.join(available)}: set --config.data.{key}=<one of them>") from err


def _available_splits(d) -> list[str] | None:
    import os  # noqa: PLC0415

    kind, _, rest = str(d.name).partition(":")
    if kind == "idx":
        return ["train", "test"]
    if kind == "folder" and os.path.isdir(rest):
        return sorted(e.name for e in os.scandir(rest) if e.is_dir() and e.name[0] != ".")
    return None


def _channel_statistics(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation of (..., C) pixels in 0..1 units. uint8 images
    go through a 256-bin histogram per channel (exact counts, no float copy of the images)."""
    channels = images.shape[-1]
    if images.dtype != np.uint8:
        pixels = images.reshape(-1, channels).astype(np.float64) / 255.0
        return pixels.mean(axis=0), pixels.std(axis=0)
    flat = images.reshape(-1, channels)
    values = np.arange(256, dtype=np.float64) / 255.0
    mean, std = np.empty(channels), np.empty(channels)
    for c in range(channels):
        counts = np.bincount(flat[:, c], minlength=256).astype(np.float64)
        total = counts.sum()
        mean[c] = counts @ values / total
        std[c] = np.sqrt(max(counts @ (values - mean[c]) ** 2 / total, 0.0))
    return mean, std


def _statistics(d, train) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per channel in 0..1 units: the config's, or, where it gives None, measured
    on (up to 5000 images of) the training split."""
    if d.get("mean") is not None and d.get("std") is not None:
        return tuple(map(float, d.mean)), tuple(map(float, d.std))
    if isinstance(train, img.ImageArrays):
        images = train.images
    else:
        picks = np.random.default_rng(0).permutation(len(train))[:5000]
        images = np.stack([np.asarray(train[int(i)]["image"]) for i in picks])
    mean, std = _channel_statistics(images)
    std = np.where(std > 0, std, 1.0)
    log.info("image statistics measured on the training split (%d images): mean %s, std %s",
             len(images), np.round(mean, 4).tolist(), np.round(std, 4).tolist())
    return (tuple(float(m) for m in (d.mean if d.get("mean") is not None else mean)),
            tuple(float(x) for x in (d.std if d.get("std") is not None else std)))
