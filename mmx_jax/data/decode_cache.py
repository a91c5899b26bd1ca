"""Whole small splits decoded once into uint8 arrays, cached as an ``.npz`` beside the data (the
fast in-memory path: CIFAR-sized images, a split per array)."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import multiprocessing
import os
import pathlib
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from mmx_jax.data.image_sources import (
    CorruptImageError,
    FolderSource,
    IdxSource,
    ImageSource,
    decode_image,
)

log = logging.getLogger(__name__)



@dataclasses.dataclass(frozen=True)
class ImageArrays:
    """A whole split in memory: images (N, H, W, C) uint8, labels (N,) int32."""

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    num_skipped: int = 0

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Random access like a source: ``{"image": (H, W, C) uint8, "label": int32}``."""
        return {"image": self.images[int(index)], "label": np.int32(self.labels[int(index)])}

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W, C) uint8 resized to `size` = (height, width), bicubic (unchanged if it has it)."""
    if image.shape[:2] == size:
        return image
    im = Image.fromarray(image[:, :, 0] if image.shape[-1] == 1 else image)
    out = np.asarray(im.resize((size[1], size[0]), Image.Resampling.BICUBIC), np.uint8)
    return out[:, :, None] if out.ndim == 2 else out


def _decode_chunk(paths: Sequence[str], channels: int | None, size: tuple[int, int] | None,
                  shape: tuple[int, int, int], skip: bool) -> tuple[np.ndarray, np.ndarray]:
    """Decodes ``paths`` into (n, H, W, C) uint8 and an ok mask (pool worker)."""
    out = np.zeros((len(paths), *shape), np.uint8)
    ok = np.ones(len(paths), bool)
    for k, path in enumerate(paths):
        try:
            image = decode_image(path, channels)
        except CorruptImageError as e:
            if not skip:
                raise
            log.warning("skipping unreadable image: %s", e)
            ok[k] = False
            continue
        if size is not None:
            image = resize(image, size)
        if image.shape != shape:
            raise ValueError(f"image file {path!r} has shape {image.shape}, wanted {shape} like "
                             "the first image of the split; pass image_size= to resize")
        out[k] = image
    return out, ok


def _cache_path(source: FolderSource, cache_dir: pathlib.Path | None,
                image_size: tuple[int, int] | None) -> pathlib.Path:
    size = "native" if image_size is None else f"{image_size[0]}x{image_size[1]}"
    channels = "asis" if source.channels is None else f"c{source.channels}"
    folder = cache_dir if cache_dir is not None else source.root
    return folder / f"{source.split}.{size}-{channels}.arrays.npz"


def _is_writable_dir(folder: pathlib.Path) -> bool:
    return folder.is_dir() and os.access(folder, os.W_OK)


def decode_to_arrays(source: FolderSource | IdxSource | ImageSource, *,
                     image_size: int | tuple[int, int] | None = None, cache: bool = True,
                     cache_dir: str | os.PathLike | None = None, num_workers: int | None = None,
                     chunk_size: int = 512, progress: bool = True) -> ImageArrays:
    """Decodes a whole split into one uint8 array, with an ``.npz`` cache for later runs.

    For a `FolderSource` the files are decoded by a process pool (``num_workers`` processes,
    default the CPU count; 0 decodes in this process) and the result is cached as
    ``<root>/<split>.<size>-<channels>.arrays.npz`` (or in ``cache_dir``), keyed by the split,
    the size and a fingerprint of the listed files, so later runs load it in about a second.
    The cache is written atomically; when the folder is read-only and no ``cache_dir`` is
    given, nothing is cached (with a warning). An `IdxSource` is already in memory and is
    returned as is; any other source is read record by record.

    Args:
      source: the split to decode.
      image_size: resize every image to this (H, W) (or square) with bicubic filtering; None
        requires all images to have the first image's shape.
      cache, cache_dir: whether and where to cache (folder sources only).
      num_workers, chunk_size: process pool size and files per task.
      progress: show a tqdm bar.

    Returns:
      `ImageArrays` with images (N, H, W, C) uint8 and labels (N,) int32; with
      ``on_error="skip"`` unreadable files are left out and counted in ``num_skipped``.
    """
    size = (image_size, image_size) if isinstance(image_size, int) else image_size
    if isinstance(source, IdxSource) and size is None:
        images, labels = source.arrays()
        return ImageArrays(images, labels, source.class_names)
    if not isinstance(source, FolderSource):
        return _read_records(source, size, progress)

    path = _cache_path(source, pathlib.Path(cache_dir) if cache_dir else None, size)
    fingerprint = source.fingerprint()
    if cache and path.is_file():
        with np.load(path, allow_pickle=False) as data:
            if str(data["fingerprint"]) == fingerprint:
                return ImageArrays(data["images"], data["labels"],
                                   tuple(str(c) for c in data["class_names"]),
                                   int(data["num_skipped"]))
        log.info("cache %s is stale (the folder changed); decoding again", path)

    images, labels, num_skipped = _decode_folder(source, size, num_workers, chunk_size, progress)
    if num_skipped:
        log.warning("%d unreadable image(s) skipped in %s", num_skipped, source.split_dir)
    result = ImageArrays(images, labels, source.class_names, num_skipped)
    if cache:
        if not _is_writable_dir(path.parent):
            if cache_dir is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
            else:
                log.warning("folder %s is not writable: the decoded split is not cached "
                            "(pass cache_dir=)", path.parent)
                return result
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial",
                                   dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, images=images, labels=labels,
                         class_names=np.asarray(source.class_names, str),
                         fingerprint=np.asarray(fingerprint), num_skipped=np.asarray(num_skipped))
            os.chmod(tmp, 0o644)  # mkstemp made it private
            os.replace(tmp, path)
        except BaseException:
            pathlib.Path(tmp).unlink(missing_ok=True)
            raise
    return result


def _decode_folder(source: FolderSource, size: tuple[int, int] | None, num_workers: int | None,
                   chunk_size: int, progress: bool) -> tuple[np.ndarray, np.ndarray, int]:
    from tqdm.auto import tqdm

    skip = source.on_error == "skip"
    first = source[0]["image"]  # raises (or skips) like the source would
    shape = (*size, first.shape[-1]) if size is not None else first.shape
    paths = source.paths
    chunks = [paths[i:i + chunk_size] for i in range(0, len(paths), chunk_size)]
    args = (source.channels, size, shape, skip)
    workers = (os.cpu_count() or 1) if num_workers is None else num_workers
    parts = []
    # Closed on errors too, so that an error message starts on a line of its own.
    with tqdm(total=len(paths), desc=f"decoding {source.split}", unit=" images",
              disable=not progress) as bar:
        if workers == 0 or len(chunks) == 1:
            for chunk in chunks:
                parts.append(_decode_chunk(chunk, *args))
                bar.update(len(chunk))
        else:
            # spawn, not fork: the parent may already run JAX's threads.
            context = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(min(workers, len(chunks)),
                                                        mp_context=context) as pool:
                futures = [pool.submit(_decode_chunk, chunk, *args) for chunk in chunks]
                for future, chunk in zip(futures, chunks, strict=True):
                    parts.append(future.result())
                    bar.update(len(chunk))
    images = np.concatenate([p[0] for p in parts])
    ok = np.concatenate([p[1] for p in parts])
    if not ok.any():
        raise CorruptImageError(f"no image in {os.fspath(source.split_dir)!r} could be decoded")
    return images[ok], source.labels[ok], int((~ok).sum())


def _read_records(source: ImageSource, size: tuple[int, int] | None,
                  progress: bool) -> ImageArrays:
    from tqdm.auto import tqdm

    images, labels = [], []
    for i in tqdm(range(len(source)), desc="reading", unit=" images", disable=not progress):
        example = source[i]
        image = example["image"] if size is None else resize(example["image"], size)
        if images and image.shape != images[0].shape:
            raise ValueError(f"record {i} has image shape {image.shape}, wanted "
                             f"{images[0].shape}; pass image_size= to resize")
        images.append(image)
        labels.append(example["label"])
    return ImageArrays(np.stack(images), np.asarray(labels, np.int32),
                       tuple(getattr(source, "class_names", ())),
                       int(getattr(source, "num_skipped", 0)))
