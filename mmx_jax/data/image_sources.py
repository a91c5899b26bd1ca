"""Random-access image sources, archive extraction and the in-memory decode of small splits.

Every source is a sequence: ``len(source)`` and ``source[i] -> {"image": uint8 (H, W, C),
"label": int}``, with ``class_names`` and ``num_classes``. Three kinds:

    FolderSource(root, split)   root/split/<class>/*.jpg|jpeg|png, classes sorted -> label ids
    IdxSource(folder, split)    MNIST/Fashion-MNIST idx files (``train-images-idx3-ubyte[.gz]``)
    TfdsSource(name, split)     a prepared tensorflow-datasets data source (ArrayRecord, no TF)

``open_image_source("folder:<root>" | "archive:<file.tar.xz>" | "idx:<folder>" | "tfds:<name>",
split)`` builds one from a config string. ``extract_archive`` unpacks an image archive once into
a cache folder; ``decode_to_arrays`` decodes a whole small split into one uint8 array, cached as
an ``.npz`` beside the data, for the fast in-memory path.

A corrupt image fails fast with `CorruptImageError` naming the file; with ``on_error="skip"``
a folder source logs it, counts it (``num_skipped``, per process) and serves the next readable
record in its place so that batch shapes and step counts do not change.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import gzip
import hashlib
import importlib
import logging
import multiprocessing
import os
import pathlib
import shutil
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from typing import Any, Literal, Protocol

import numpy as np
from PIL import Image

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


def default_cache_dir() -> pathlib.Path:
    """``$MMX_CACHE_DIR``, else ``$XDG_CACHE_HOME/mmx_jax``, else ``~/.cache/mmx_jax``."""
    if os.environ.get("MMX_CACHE_DIR"):
        return pathlib.Path(os.environ["MMX_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base) / "mmx_jax"


def _archive_stem(archive: pathlib.Path) -> str:
    name = archive.name
    for suffix in (".tar.xz", ".tar.gz", ".tar.bz2", ".tgz", ".txz", ".tar"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return archive.stem


def _single_top_folder(folder: pathlib.Path) -> pathlib.Path:
    entries = [e for e in folder.iterdir() if not e.name.startswith(".")]
    return entries[0] if len(entries) == 1 and entries[0].is_dir() else folder


def extract_archive(archive: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
                    *, progress: bool = True) -> pathlib.Path:
    """Extracts a tar archive once into ``cache_dir`` and returns the folder root.

    The archive is unpacked into a temporary folder beside the destination and renamed into
    place only when complete, so an interrupted extraction is never taken for a finished one
    (its leftover temporary folder is ignored and can be deleted). The destination is keyed by
    the archive's name and size; later calls return at once. When the archive holds a single
    top-level folder (``cifar10_jpg/train/...``) that folder is returned, so
    ``FolderSource(root, "train")`` works on the result.

    Args:
      archive: a ``.tar``, ``.tar.xz``, ``.tar.gz`` or ``.tar.bz2`` file.
      cache_dir: where to extract; default `default_cache_dir()`.
      progress: show a tqdm bar over the members.

    Raises:
      FileNotFoundError: naming the archive when it does not exist.
    """
    archive = pathlib.Path(archive)
    if not archive.is_file():
        raise FileNotFoundError(f"archive {os.fspath(archive)!r} does not exist")
    cache_dir = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    dest = cache_dir / f"{_archive_stem(archive)}-{archive.stat().st_size}"
    if dest.is_dir():
        return _single_top_folder(dest)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=cache_dir))
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar
            if progress:
                from tqdm.auto import tqdm
                members = tqdm(tar, desc=f"extracting {archive.name}", unit=" files")
            for member in members:
                if hasattr(tarfile, "data_filter"):
                    tar.extract(member, tmp, filter="data")
                else:  # Python < 3.11.4: refuse what the "data" filter would refuse
                    if member.name.startswith("/") or ".." in pathlib.PurePosixPath(
                            member.name).parts or not (member.isdir() or member.isfile()):
                        raise ValueError(f"archive {os.fspath(archive)!r} has an unsafe member "
                                         f"{member.name!r}")
                    tar.extract(member, tmp)
        os.chmod(tmp, 0o755)  # mkdtemp made it private
        try:
            os.rename(tmp, dest)
        except OSError:
            if not dest.is_dir():  # a concurrent extraction that finished first is fine
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _single_top_folder(dest)


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
    bar = tqdm(total=len(paths), desc=f"decoding {source.split}", unit=" images",
               disable=not progress)
    parts = []
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
    bar.close()
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
