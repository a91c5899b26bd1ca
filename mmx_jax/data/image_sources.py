"""Random-access image sources.

Every source is a sequence: ``len(source)`` and ``source[i] -> {"image": uint8 (H, W, C),
"label": int}``, with ``class_names`` and ``num_classes``. Three kinds:

    FolderSource(root, split)   root/split/<class>/*.jpg|jpeg|png, classes sorted -> label ids
    IdxSource(folder, split)    MNIST/Fashion-MNIST idx files (``train-images-idx3-ubyte[.gz]``)
    TfdsSource(name, split)     a prepared tensorflow-datasets data source (ArrayRecord, no TF)

``open_image_source("folder:<root>" | "archive:<file.tar.xz>" | "idx:<folder>" | "tfds:<name>",
split)`` builds one from a config string (archives are unpacked once by
`archives.extract_archive`; `decode_cache.decode_to_arrays` decodes a whole small split into
memory for the fast path).

A corrupt image fails fast with `CorruptImageError` naming the file; with ``on_error="skip"``
a folder source logs it, counts it (``num_skipped``, per process) and serves the next readable
record in its place so that batch shapes and step counts do not change.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib
import logging
import os
import pathlib
import sys
from collections.abc import Sequence
from typing import Any, Literal, Protocol

import numpy as np
from PIL import Image

from mmx_jax.data.archives import extract_archive

log = logging.getLogger(__name__)


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
OnError = Literal["raise", "skip"]
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot")
_IDX_PREFIXES = {"train": "train", "test": "t10k", "t10k": "t10k"}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


class CorruptImageError(ValueError):
    """An image file that cannot be decoded; the message names the file."""


class ImageSource(Protocol):
    """What the loaders need from a source: random access to ``{"image", "label"}`` dicts."""

    class_names: tuple[str, ...]

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, Any]: ...


def _check_channels(channels: int | None) -> None:
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be None (as stored), 1 or 3, got {channels!r}")


def _check_on_error(on_error: str) -> None:
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")


def to_channels(image: np.ndarray, channels: int | None) -> np.ndarray:
    """Returns ``image`` as (H, W, C) uint8 with ``channels`` channels (None keeps it as is).

    Args:
      image: (H, W) or (H, W, 1|3|4) uint8.
      channels: 1 (luma), 3 (RGB; grey is repeated, alpha dropped) or None.
    """
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(f"image has shape {image.shape}, wanted (H, W), (H, W, 1), (H, W, 3) "
                         "or (H, W, 4)")
    if image.shape[-1] == 4:
        image = image[..., :3]
    if channels is None or image.shape[-1] == channels:
        return image
    if channels == 3:
        return np.repeat(image, 3, axis=-1)
    # ITU-R 601-2 luma, the weights PIL's "L" conversion uses.
    luma = image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return np.clip(np.rint(luma), 0, 255).astype(np.uint8)[:, :, None]


def decode_image(path: str | os.PathLike, channels: int | None = 3) -> np.ndarray:
    """Decodes an image file fully into (H, W, C) uint8.

    Args:
      path: a JPEG or PNG file.
      channels: 3 converts everything (grey, palette, CMYK, alpha) to RGB, 1 to luma
        (H, W, 1); None keeps grey as (H, W, 1) and everything else as RGB.

    Raises:
      CorruptImageError: naming the file, when it cannot be read or decoded.
    """
    _check_channels(channels)
    try:
        with Image.open(path) as im:
            im.load()  # decode now: a truncated file must fail here, not in a later op
            grey = im.mode in ("1", "L", "LA", "I;16", "I", "F") or channels == 1
            im = im.convert("RGB" if channels == 3 or not grey else "L")
            array = np.asarray(im, dtype=np.uint8)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise CorruptImageError(f"cannot decode image file {os.fspath(path)!r}: {e}") from e
    return array[:, :, None] if array.ndim == 2 else array


class FolderSource:
    """Images in ``root/split/<class>/*.jpg|jpeg|png``; class folders sorted by name -> labels.

    Files are listed once at construction (sorted by class, then file name) and decoded on
    access. The list is kept as one bytes array of ``<class>/<file>`` names, so that the source
    pickles quickly into loader workers even for ImageNet's 1.28M files. Attributes:
    ``paths`` (built on access), ``labels`` (int32), ``class_names``, ``num_skipped``.
    """

    def __init__(self, root: str | os.PathLike, split: str, *, channels: int | None = 3,
                 on_error: OnError = "raise"):
        """Lists the split.

        Args:
          root: folder that holds one sub-folder per split.
          split: the split's folder name (``"train"``, ``"test"``, ``"val"``...).
          channels: see `decode_image`; 3 (RGB) by default, so that a folder with a few grey
            or CMYK JPEGs (ImageNet has some) still batches.
          on_error: "raise" (fail fast naming the file) or "skip" (log, count, serve the next
            readable image instead).

        Raises:
          FileNotFoundError: when ``root/split`` is not a folder.
          ValueError: when it has no class folders, or a class folder holds no images.
        """
        _check_channels(channels)
        _check_on_error(on_error)
        self.root = pathlib.Path(root)
        self.split = split
        self.split_dir = self.root / split
        self.channels = channels
        self.on_error = on_error
        self.num_skipped = 0
        if not self.split_dir.is_dir():
            raise FileNotFoundError(f"image folder {os.fspath(self.split_dir)!r} (root "
                                    f"{os.fspath(self.root)!r}, split {split!r}) does not exist; "
                                    "wanted root/split/<class>/*.jpg")
        classes = sorted(e.name for e in os.scandir(self.split_dir)
                         if e.is_dir() and not e.name.startswith("."))
        if not classes:
            raise ValueError(f"image folder {os.fspath(self.split_dir)!r} has no class "
                             "sub-folders; wanted root/split/<class>/*.jpg")
        names, labels = [], []
        for label, name in enumerate(classes):
            class_dir = self.split_dir / name
            files = sorted(e.name for e in os.scandir(class_dir)
                           if e.is_file() and e.name.lower().endswith(IMAGE_SUFFIXES))
            if not files:
                raise ValueError(f"class folder {os.fspath(class_dir)!r} holds no images "
                                 f"(wanted files ending in {', '.join(IMAGE_SUFFIXES)})")
            names.extend(os.fsencode(f"{name}/{f}") for f in files)
            labels.extend([label] * len(files))
        self.class_names: tuple[str, ...] = tuple(classes)
        self._names = np.array(names, dtype=bytes)
        self.labels = np.asarray(labels, np.int32)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def path(self, index: int) -> str:
        """The file of record ``index``."""
        return os.path.join(self.split_dir, os.fsdecode(self._names[index]))

    @property
    def paths(self) -> list[str]:
        """All files in record order."""
        return [self.path(i) for i in range(len(self))]

    def __len__(self) -> int:
        return len(self._names)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a source of {len(self)} images")
        for attempt in range(len(self)):
            i = (index + attempt) % len(self)
            try:
                image = decode_image(self.path(i), self.channels)
            except CorruptImageError as e:
                if self.on_error == "raise":
                    raise
                self.num_skipped += 1
                log.warning("skipping unreadable image (%d skipped so far in this process): %s",
                            self.num_skipped, e)
                continue
            return {"image": image, "label": np.int32(self.labels[i])}
        raise CorruptImageError(f"no image in {os.fspath(self.split_dir)!r} could be decoded")

    def fingerprint(self) -> str:
        """A short hash of the listed files and their sizes (keys the in-memory cache)."""
        digest = hashlib.sha1()
        for i, name in enumerate(self._names):  # relative names: the root may move
            digest.update(b"%s\0%d\n" % (name, os.stat(self.path(i)).st_size))
        return digest.hexdigest()[:16]

    def __repr__(self) -> str:
        return (f"FolderSource({os.fspath(self.root)!r}, split={self.split!r}, "
                f"{len(self)} images, {self.num_classes} classes)")


def _open_maybe_gzip(path: pathlib.Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads an idx file (the MNIST format; plain or ``.gz``) into a NumPy array.

    The header is two zero bytes, a dtype code (0x08 = uint8...), the number of dimensions and
    one big-endian uint32 per dimension; the data follow in C order.

    Raises:
      ValueError: naming the file when the header or the size is wrong.
    """
    path = pathlib.Path(path)
    with _open_maybe_gzip(path) as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"idx file {os.fspath(path)!r} has a bad header {data[:4]!r}; wanted "
                         "0x00 0x00 <dtype code> <ndim>")
    dtype, ndim = np.dtype(_IDX_DTYPES[data[2]]), data[3]
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    offset = 4 + 4 * ndim
    want = int(np.prod(shape)) * dtype.itemsize
    if len(data) - offset != want:
        raise ValueError(f"idx file {os.fspath(path)!r} holds {len(data) - offset} data bytes, "
                         f"wanted {want} for shape {shape}")
    return np.frombuffer(data, dtype, offset=offset).reshape(shape).astype(dtype.newbyteorder("="))


def _find_idx(folder: pathlib.Path, stem: str) -> pathlib.Path:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"idx file {os.fspath(folder / stem)!r} (or .gz) does not exist")


class IdxSource:
    """MNIST-style idx files of one split, held in memory.

    ``split`` "train" reads ``train-images-idx3-ubyte[.gz]`` and ``train-labels-idx1-ubyte[.gz]``,
    "test" (or "t10k") the ``t10k-`` pair. Attributes: ``images`` (N, H, W) uint8, ``labels``
    (N,) int32, ``class_names``.
    """

    def __init__(self, folder: str | os.PathLike, split: str, *, channels: int | None = 1,
                 class_names: Sequence[str] | None = None):
        """Reads the pair.

        Args:
          folder: the folder holding the idx files.
          split: "train", "test" or "t10k".
          channels: 1 (H, W, 1) by default; 3 repeats the grey channel.
          class_names: names for the labels (e.g. `FASHION_MNIST_CLASSES`); default
            "0".."K-1".

        Raises:
          ValueError: on an unknown split or when the image and label counts differ.
          FileNotFoundError: when a file of the pair is missing.
        """
        _check_channels(channels)
        if split not in _IDX_PREFIXES:
            raise ValueError(f"idx split must be one of {sorted(_IDX_PREFIXES)}, got {split!r}")
        folder = pathlib.Path(folder)
        prefix = _IDX_PREFIXES[split]
        images_path = _find_idx(folder, f"{prefix}-images-idx3-ubyte")
        labels_path = _find_idx(folder, f"{prefix}-labels-idx1-ubyte")
        self.images = read_idx(images_path)
        self.labels = read_idx(labels_path).astype(np.int32)
        if self.images.ndim != 3 or self.labels.ndim != 1 or \
                len(self.images) != len(self.labels):
            raise ValueError(f"idx pair {os.fspath(images_path)!r} / {os.fspath(labels_path)!r} "
                             f"has shapes {self.images.shape} / {self.labels.shape}; wanted "
                             "(N, H, W) / (N,)")
        self.channels = channels
        self.split = split
        if class_names is None:
            class_names = [str(k) for k in range(int(self.labels.max()) + 1)]
        self.class_names = tuple(class_names)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image = to_channels(self.images[int(index)], self.channels)
        return {"image": image, "label": np.int32(self.labels[int(index)])}

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """All images as (N, H, W, C) uint8 and labels as (N,) int32."""
        images = self.images[:, :, :, None]
        if self.channels == 3:
            images = np.repeat(images, 3, axis=-1)
        return images, self.labels


def _import_tfds():
    try:
        return importlib.import_module("tensorflow_datasets")
    except ImportError as e:
        raise ImportError("a tfds:<name> image source needs tensorflow-datasets: run "
                          "`pip install tensorflow-datasets array_record` and prepare the data "
                          "set once in ArrayRecord format (`tfds build <name> "
                          "--file_format=array_record`, on any machine with TensorFlow); "
                          "reading a prepared data set needs no TensorFlow") from e


class TfdsSource:
    """A prepared tensorflow-datasets split, read through ``tfds.data_source`` (no TensorFlow).

    The data set must already be prepared in ArrayRecord format under ``data_dir``;
    tensorflow_datasets is imported only when this source is built.
    """

    def __init__(self, name: str, split: str, *, data_dir: str | os.PathLike | None = None,
                 channels: int | None = 3, image_key: str = "image", label_key: str = "label"):
        """Opens the split.

        Args:
          name: the tfds name, e.g. "imagenet2012" or "cifar10".
          split: a tfds split, slices included ("train", "validation", "train[:90%]").
          data_dir: the tfds data folder (default: tfds's own default).
          channels: see `decode_image`.
          image_key, label_key: the record's feature names.

        Raises:
          ImportError: when tensorflow_datasets is not installed, saying what to install.
          ValueError: when the data set is not prepared there.
        """
        _check_channels(channels)
        tfds = _import_tfds()
        try:
            self._source = tfds.data_source(name, split=split, data_dir=data_dir,
                                            download=False)
        except Exception as e:
            raise ValueError(f"tfds data set {name!r} split {split!r} (data_dir {data_dir!r}) "
                             "could not be opened; prepare it in ArrayRecord format first "
                             f"(`tfds build {name} --file_format=array_record`, which needs "
                             f"TensorFlow): {e}") from e
        self.name, self.split, self.channels = name, split, channels
        self.image_key, self.label_key = image_key, label_key
        try:
            info = tfds.builder(name, data_dir=data_dir).info
            self.class_names = tuple(info.features[label_key].names)
        except Exception:  # class names are a convenience only
            self.class_names = ()

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self._source[int(index)]
        image = to_channels(np.asarray(record[self.image_key], np.uint8), self.channels)
        return {"image": image, "label": np.int32(record[self.label_key])}


def open_image_source(dataset: str, split: str, *, data_dir: str | os.PathLike | None = None,
                      channels: int | None = None, on_error: OnError = "raise",
                      cache_dir: str | os.PathLike | None = None) -> ImageSource:
    """Builds a source from a config string.

    Args:
      dataset: ``"folder:<root>"`` (root/split/<class>/*.jpg), ``"archive:<file.tar.xz>"``
        (extracted once with `extract_archive`, then read as a folder), ``"idx:<folder>"``
        (MNIST-style idx files) or ``"tfds:<name>"`` / a bare tfds name like ``"imagenet2012"``.
      split: the split name ("train", "test", "validation"...).
      data_dir: tfds data folder (tfds sources only).
      channels: None keeps each kind's default (RGB for folders and tfds, grey for idx).
      on_error: "raise" or "skip" for unreadable files (folder sources).
      cache_dir: where archives are extracted (default `default_cache_dir()`).
    """
    kind, sep, rest = dataset.partition(":")
    if not sep:
        kind, rest = "tfds", dataset
    if not rest:
        raise ValueError(f"dataset {dataset!r} names no path or data set after {kind + ':'!r}")
    extra = {} if channels is None else {"channels": channels}
    match kind:
        case "folder":
            return FolderSource(rest, split, on_error=on_error, **extra)
        case "archive":
            root = extract_archive(rest, cache_dir, progress=sys.stderr.isatty())
            return FolderSource(root, split, on_error=on_error, **extra)
        case "idx":
            return IdxSource(rest, split, **extra)
        case "tfds":
            return TfdsSource(rest, split, data_dir=data_dir, **extra)
        case _:
            raise ValueError(f"dataset {dataset!r} has an unknown kind {kind!r}; wanted "
                             "folder:, archive:, idx: or tfds:")
