"""Tests of the image input pipeline: augmentations, sources, archive cache, loaders."""

from __future__ import annotations

import gzip
import os
import pathlib
import sys
import tarfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from mmx_jax.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CorruptImageError,
    DeitTrainTransform,
    EpochPlan,
    EvalTransform,
    FolderSource,
    IdxSource,
    ImageArrays,
    ImageLoader,
    SmallImageTrainTransform,
    array_batches,
    decode_cache,
    decode_to_arrays,
    example_rng,
    extract_archive,
    mixup_cutmix,
    normalize,
    open_image_source,
    random_crop_flip,
    random_erasing,
    read_idx,
    smooth_labels,
)
from mmx_jax.data import cutout as cutout_jax
from mmx_jax.data.augment import (
    IMAGENET_FILL,
    RANDAUGMENT_OPS,
    apply_randaugment_op,
    center_crop,
    cutout,
    pad_random_crop,
    rand_augment,
    random_resized_crop_box,
)

CIFAR_ARCHIVE = "images/cifar10_jpg.tar.xz"
FASHION = "images/fashion_mnist"


def _cifar_members(shared_data: pathlib.Path, per_class: int, classes=("airplane", "automobile")
                   ) -> dict[str, list[tuple[str, bytes]]]:
    """The first ``per_class`` test-split JPEGs of a few classes, read by streaming the archive
    (the test split's first classes sit at its start, so this reads a small prefix)."""
    found: dict[str, list[tuple[str, bytes]]] = {c: [] for c in classes}
    with tarfile.open(shared_data / CIFAR_ARCHIVE, "r|xz") as tar:
        for member in tar:
            parts = member.name.split("/")
            if len(parts) == 4 and parts[1] == "test" and member.isfile():
                if parts[2] in found and len(found[parts[2]]) < per_class:
                    found[parts[2]].append((parts[3], tar.extractfile(member).read()))
                if all(len(v) == per_class for v in found.values()):
                    break
    return found


def _make_folder(root: pathlib.Path, members, rng: np.random.Generator,
                 split: str = "train") -> dict[str, np.ndarray]:
    """root/split/<class>/ from CIFAR JPEGs plus a class of synthetic PNGs (lossless); returns
    the PNG arrays by file name."""
    for cls, files in members.items():
        (root / split / cls).mkdir(parents=True)
        for name, data in files:
            (root / split / cls / name).write_bytes(data)
    (root / split / "synthetic").mkdir()
    pngs = {"a.png": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
            "b_grey.png": rng.integers(0, 256, (32, 32), dtype=np.uint8)}
    for name, array in pngs.items():
        Image.fromarray(array).save(root / split / "synthetic" / name)
    return pngs


@pytest.fixture
def cifar_folder(shared_data, tmp_path, rng):
    members = _cifar_members(shared_data, per_class=5)
    pngs = _make_folder(tmp_path / "data", members, rng)
    return tmp_path / "data", members, pngs


def _random_arrays(rng, n: int, shape=(8, 8, 3), num_classes: int = 5) -> ImageArrays:
    images = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
    labels = rng.integers(0, num_classes, n).astype(np.int32)
    return ImageArrays(images, labels, tuple(str(k) for k in range(num_classes)))


def _collect(iterator) -> list[dict[str, np.ndarray]]:
    out = [{k: np.array(v) for k, v in batch.items()} for batch in iterator]
    if hasattr(iterator, "close"):
        iterator.close()
    return out


# --- per-example augmentations (NumPy/PIL) -----------------------------------------------


@pytest.mark.parametrize("transform", [DeitTrainTransform(size=24),
                                       SmallImageTrainTransform(cutout_size=8)],
                         ids=["deit", "small_image"])
def test_per_example_transforms_deterministic_label_preserving(transform, rng):
    images = rng.integers(0, 256, (6, 40, 40, 3), dtype=np.uint8)
    for index, image in enumerate(images):
        example = {"image": image, "label": np.int32(index % 3), "extra": "kept"}
        a = transform(example, example_rng(7, 2, index))
        b = transform(example, example_rng(7, 2, index))
        np.testing.assert_array_equal(a["image"], b["image"])
        assert a["label"] == example["label"] and a["extra"] == "kept"
        assert a["image"].dtype == np.uint8
        assert a["image"].shape == ((24, 24, 3) if isinstance(transform, DeitTrainTransform)
                                    else (40, 40, 3))
    views = [transform({"image": images[0], "label": 0}, example_rng(seed, 0, 0))["image"]
             for seed in range(6)]
    assert len({v.tobytes() for v in views}) > 1, "different seeds gave the same view"
    # the epoch and the index enter the seed too
    example = {"image": images[0], "label": 0}
    base = transform(example, example_rng(7, 2, 0))["image"]
    assert not np.array_equal(base, transform(example, example_rng(7, 3, 0))["image"])
    assert not np.array_equal(base, transform(example, example_rng(7, 2, 1))["image"])


def test_random_resized_crop_box_respects_scale_and_ratio(rng):
    height, width = 60, 80
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    for _ in range(300):
        top, left, h, w = random_resized_crop_box(rng, height, width, scale, ratio)
        assert top >= 0 and top + h <= height and left >= 0 and left + w <= width
        # rounding of h and w to whole pixels loosens the bounds by about one pixel per side
        area = h * w / (height * width)
        assert scale[0] * 0.8 <= area <= scale[1] + 1e-9
        assert ratio[0] * 0.85 <= w / h <= ratio[1] / 0.85
    # a narrow strip can never fit the ratio: the fallback is a centred crop of clamped aspect
    top, left, h, w = random_resized_crop_box(rng, 10, 100, (0.99, 1.0), ratio)
    assert (h, w) == (10, round(10 * ratio[1])) and left == (100 - w) // 2 and top == 0


def test_pad_random_crop_is_a_window_of_the_padded_image(rng):
    image = rng.integers(1, 256, (12, 10, 3), dtype=np.uint8)
    padded = np.zeros((20, 18, 3), np.uint8)
    padded[4:16, 4:14] = image
    offsets = set()
    for seed in range(20):
        out = pad_random_crop(image, np.random.default_rng(seed), 4)
        matches = [(y, x) for y in range(9) for x in range(9)
                   if np.array_equal(padded[y:y + 12, x:x + 10], out)]
        assert len(matches) == 1
        offsets.add(matches[0])
    assert len(offsets) > 5


def test_randaugment_ops_against_numpy(rng):
    image = rng.integers(0, 256, (16, 20, 3), dtype=np.uint8)
    np.testing.assert_array_equal(apply_randaugment_op(image, "identity", 9), image)
    # solarize at magnitude 9: pixels >= 255 * (1 - 9/30) = 178.5 are inverted
    expect = np.where(image >= 178.5, 255 - image, image)
    np.testing.assert_array_equal(apply_randaugment_op(image, "solarize", 9), expect)
    # posterize at magnitude 30 keeps 4 bits
    np.testing.assert_array_equal(apply_randaugment_op(image, "posterize", 30), image & 0xF0)
    # translate_x at magnitude 10 on a 20-wide image: 0.45 * (10/30) * 20 = 3 pixels
    expect = np.empty_like(image)
    expect[:] = IMAGENET_FILL
    expect[:, 3:] = image[:, :-3]
    np.testing.assert_array_equal(apply_randaugment_op(image, "translate_x", 10, sign=1), expect)
    expect[:] = IMAGENET_FILL
    expect[:, :-3] = image[:, 3:]
    np.testing.assert_array_equal(apply_randaugment_op(image, "translate_x", 10, sign=-1), expect)
    grey = image[:, :, :1]
    for name in RANDAUGMENT_OPS:
        for source in (image, grey):
            out = apply_randaugment_op(source, name, 9, sign=-1)
            assert out.shape == source.shape and out.dtype == np.uint8, name
    a = rand_augment(image, np.random.default_rng(3))
    np.testing.assert_array_equal(a, rand_augment(image, np.random.default_rng(3)))
    outs = {rand_augment(image, np.random.default_rng(s)).tobytes() for s in range(8)}
    assert len(outs) > 1


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_random_erasing_keeps_shape_dtype_and_erases_a_box(dtype, rng):
    image = (rng.integers(0, 256, (24, 30, 3)) if dtype == np.uint8
             else rng.standard_normal((24, 30, 3))).astype(dtype)
    np.testing.assert_array_equal(random_erasing(image, rng, p=0.0), image)
    erased = 0
    for seed in range(10):
        out = random_erasing(image, np.random.default_rng(seed), p=1.0)
        assert out.shape == image.shape and out.dtype == image.dtype
        changed = np.any(out != image, axis=-1)
        if changed.any():
            erased += 1
            rows, cols = np.nonzero(changed)
            box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
            # the changed pixels fill (almost: noise may repeat a value) one box of 2%..33%
            assert changed.sum() >= 0.9 * box
            assert box <= (1 / 3) * image.shape[0] * image.shape[1] + 24
    assert erased >= 8


def test_eval_transform_resize_and_center_crop(rng):
    image = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    out = EvalTransform(size=28)({"image": image, "label": 4})
    assert out["image"].shape == (28, 28, 3) and out["label"] == 4
    # independent: shorter side to floor(28 / 0.875) = 32 -> (32, 48), then the central 28x28
    resized = np.asarray(Image.fromarray(image).resize((48, 32), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(out["image"], resized[2:30, 10:38])
    assert EvalTransform(size=16)({"image": image[:, :, :1], "label": 0})["image"].shape == \
        (16, 16, 1)
    with pytest.raises(ValueError, match="smaller than the crop"):
        center_crop(image, 50)


def test_cutout_numpy_square(rng):
    image = rng.integers(1, 256, (16, 16, 3), dtype=np.uint8)
    for seed in range(10):
        out = cutout(image, np.random.default_rng(seed), 6)
        zero = np.all(out == 0, axis=-1)
        rows, cols = np.nonzero(zero)
        assert zero.sum() == (np.ptp(rows) + 1) * (np.ptp(cols) + 1) <= 36
        np.testing.assert_array_equal(out[~zero], image[~zero])


# --- batch ops (JAX) -----------------------------------------------------------------------


def test_smooth_labels_values():
    labels = jnp.array([0, 3, 9])
    out = np.asarray(smooth_labels(labels, 10, 0.1))
    expect = np.full((3, 10), 0.01)
    expect[np.arange(3), [0, 3, 9]] = 0.91
    np.testing.assert_allclose(out, expect, rtol=1e-6)
    np.testing.assert_allclose(out.sum(-1), 1.0, rtol=1e-6)


def _smooth_np(labels, num_classes, smoothing):
    out = np.full((len(labels), num_classes), smoothing / num_classes)
    out[np.arange(len(labels)), labels] += 1 - smoothing
    return out


def test_mixup_soft_labels_match_pixel_weights(rng):
    images = rng.uniform(0, 255, (6, 8, 8, 3)).astype(np.float32)
    labels = np.array([0, 1, 2, 3, 4, 0])
    fn = jax.jit(lambda k: mixup_cutmix(k, images, labels, num_classes=5, cutmix_alpha=0.0))
    lams = []
    for seed in range(4):
        out, soft = map(np.asarray, fn(jax.random.key(seed)))
        x, p = images.astype(np.float64), images[::-1].astype(np.float64)
        lam = np.sum((out - p) * (x - p)) / np.sum((x - p) ** 2)  # least squares, float64
        np.testing.assert_allclose(out, lam * x + (1 - lam) * p, atol=1e-3)
        expect = lam * _smooth_np(labels, 5, 0.1) + (1 - lam) * _smooth_np(labels[::-1], 5, 0.1)
        np.testing.assert_allclose(soft, expect, atol=1e-5)
        np.testing.assert_allclose(soft.sum(-1), 1.0, atol=1e-6)
        lams.append(lam)
    assert len(set(np.round(lams, 6))) > 1


def test_cutmix_soft_labels_match_pasted_area(rng):
    images = rng.integers(0, 256, (4, 16, 12, 3), dtype=np.uint8)
    labels = np.array([2, 0, 1, 3])
    fn = jax.jit(lambda k: mixup_cutmix(k, images, labels, num_classes=4, mixup_alpha=0.0,
                                        label_smoothing=0.0))
    cut_seen = False
    for seed in range(6):
        out, soft = map(np.asarray, fn(jax.random.key(seed)))
        x, p = images.astype(np.float32), images[::-1].astype(np.float32)
        pasted = np.all(out == p, axis=-1) & np.any(x != p, axis=-1)
        kept = np.all(out == x, axis=-1)
        assert np.all(pasted | kept)
        lam = kept[0].mean()  # the box is shared by the batch
        for i in range(4):
            assert kept[i].mean() == pytest.approx(lam, abs=1 / 192)
        expect = lam * np.eye(4)[labels] + (1 - lam) * np.eye(4)[labels[::-1]]
        np.testing.assert_allclose(soft, expect, atol=1e-6)
        np.testing.assert_allclose(soft.sum(-1), 1.0, atol=1e-6)
        cut_seen |= lam < 1
    assert cut_seen


def test_mixup_cutmix_switch_deterministic_and_jittable(rng):
    images = rng.uniform(0, 255, (4, 8, 8, 3)).astype(np.float32)
    labels = np.array([0, 1, 2, 3])
    fn = jax.jit(lambda k, prob: mixup_cutmix(k, images, labels, num_classes=4, prob=prob))
    first = fn(jax.random.key(1), 1.0)
    assert first[0].dtype == jnp.float32 and first[1].shape == (4, 4)
    again = fn(jax.random.key(1), 1.0)
    np.testing.assert_array_equal(np.asarray(first[0]), np.asarray(again[0]))
    np.testing.assert_array_equal(np.asarray(first[1]), np.asarray(again[1]))
    modes = set()
    for seed in range(12):
        out, soft = map(np.asarray, fn(jax.random.key(seed), 1.0))
        np.testing.assert_allclose(soft.sum(-1), 1.0, atol=1e-6)
        is_cut = np.all((out == images) | (out == images[::-1]))
        modes.add(bool(is_cut))
    assert modes == {True, False}, "the switch never chose one of mixup / cutmix"
    off, soft = fn(jax.random.key(0), 0.0)
    np.testing.assert_array_equal(np.asarray(off), images)
    np.testing.assert_allclose(np.asarray(soft), _smooth_np(labels, 4, 0.1), atol=1e-6)


def test_random_crop_flip_jax_windows_of_padded_batch(rng):
    images = rng.integers(1, 256, (8, 10, 12, 3), dtype=np.uint8)
    fn = jax.jit(lambda k: random_crop_flip(k, images, padding=4))
    out = np.asarray(fn(jax.random.key(0)))
    assert out.shape == images.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out, np.asarray(fn(jax.random.key(0))))
    assert not np.array_equal(out, np.asarray(fn(jax.random.key(1))))
    padded = np.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)))
    flips = set()
    for i in range(len(images)):
        found = [(y, x, f) for y in range(9) for x in range(9) for f in (False, True)
                 if np.array_equal((padded[i, y:y + 10, x:x + 12])[:, ::-1 if f else 1], out[i])]
        assert found, f"example {i} is not a (flipped) window of its padded image"
        flips.add(found[0][2])
    assert flips == {True, False}


def test_cutout_jax_square(rng):
    images = rng.uniform(1, 2, (6, 12, 12, 3)).astype(np.float32)
    out = np.asarray(jax.jit(lambda k: cutout_jax(k, images, 5))(jax.random.key(3)))
    assert out.shape == images.shape and out.dtype == np.float32
    for i in range(len(images)):
        zero = np.all(out[i] == 0, axis=-1)
        rows, cols = np.nonzero(zero)
        assert 0 < zero.sum() == (np.ptp(rows) + 1) * (np.ptp(cols) + 1) <= 25
        np.testing.assert_array_equal(out[i][~zero], images[i][~zero])


def test_normalize_numpy_and_jax(rng):
    images = rng.integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
    expect = (images.astype(np.float64) / 255 - np.array(CIFAR10_MEAN)) / np.array(CIFAR10_STD)
    out_np = normalize(images, CIFAR10_MEAN, CIFAR10_STD)
    assert isinstance(out_np, np.ndarray) and out_np.dtype == np.float32
    np.testing.assert_allclose(out_np, expect, rtol=1e-5, atol=1e-5)
    out_jax = jax.jit(lambda x: normalize(x, CIFAR10_MEAN, CIFAR10_STD))(jnp.asarray(images))
    np.testing.assert_allclose(np.asarray(out_jax), expect, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="channels"):
        normalize(images[..., :1], CIFAR10_MEAN, CIFAR10_STD)


# --- sources --------------------------------------------------------------------------------


def test_folder_source_real_cifar_and_png(cifar_folder):
    root, members, pngs = cifar_folder
    source = FolderSource(root, "train")
    assert source.class_names == ("airplane", "automobile", "synthetic")
    assert len(source) == 5 + 5 + 2
    for i in range(len(source)):
        example = source[i]
        path = pathlib.Path(source.paths[i])
        assert source.class_names[example["label"]] == path.parent.name
        assert example["image"].shape == (32, 32, 3) and example["image"].dtype == np.uint8
        with Image.open(path) as im:
            expect = np.asarray(im.convert("RGB"))
        np.testing.assert_array_equal(example["image"], expect)
    by_name = {pathlib.Path(p).name: i for i, p in enumerate(source.paths)}
    np.testing.assert_array_equal(source[by_name["a.png"]]["image"], pngs["a.png"])
    np.testing.assert_array_equal(source[by_name["b_grey.png"]]["image"],
                                  np.repeat(pngs["b_grey.png"][:, :, None], 3, axis=-1))
    as_stored = FolderSource(root, "train", channels=None)
    np.testing.assert_array_equal(as_stored[by_name["b_grey.png"]]["image"],
                                  pngs["b_grey.png"][:, :, None])
    grey = FolderSource(root, "train", channels=1)[0]["image"]
    assert grey.shape == (32, 32, 1)
    assert len(open_image_source(f"folder:{root}", "train")) == len(source)


def test_idx_reader_on_fashion_mnist(shared_data):
    folder = shared_data / FASHION
    train, test = IdxSource(folder, "train"), IdxSource(folder, "test")
    assert (len(train), len(test)) == (60000, 10000)
    assert train[0]["image"].shape == (28, 28, 1) and train[0]["image"].dtype == np.uint8
    for split in (train, test):
        assert split.labels.min() == 0 and split.labels.max() == 9
        assert set(np.unique(split.labels)) == set(range(10))
    # independent parse of a few records straight from the gz bytes
    with gzip.open(folder / "t10k-images-idx3-ubyte.gz") as f:
        raw_images = f.read()
    with gzip.open(folder / "t10k-labels-idx1-ubyte.gz") as f:
        raw_labels = f.read()
    assert int.from_bytes(raw_images[:4], "big") == 0x803
    assert int.from_bytes(raw_images[4:8], "big") == 10000
    for i in (0, 1, 4321, 9999):
        record = np.frombuffer(raw_images, np.uint8, 784, 16 + 784 * i).reshape(28, 28)
        np.testing.assert_array_equal(test[i]["image"][:, :, 0], record)
        assert test[i]["label"] == raw_labels[8 + i]
    rgb = IdxSource(folder, "test", channels=3)[5]["image"]
    assert rgb.shape == (28, 28, 3) and np.all(rgb == rgb[:, :, :1])
    arrays = decode_to_arrays(test)
    assert arrays.images.shape == (10000, 28, 28, 1) and arrays.labels.dtype == np.int32
    assert len(open_image_source(f"idx:{folder}", "test")) == 10000


def test_read_idx_plain_file_and_bad_header(tmp_path, rng):
    data = rng.integers(0, 256, (3, 4, 5), dtype=np.uint8)
    header = bytes([0, 0, 0x08, 3]) + b"".join(d.to_bytes(4, "big") for d in data.shape)
    (tmp_path / "x-idx3-ubyte").write_bytes(header + data.tobytes())
    np.testing.assert_array_equal(read_idx(tmp_path / "x-idx3-ubyte"), data)
    (tmp_path / "bad").write_bytes(b"\x01\x02" + header[2:] + data.tobytes())
    with pytest.raises(ValueError, match="bad header"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(header + data.tobytes()[:-1])
    with pytest.raises(ValueError, match="data bytes"):
        read_idx(tmp_path / "short")


def test_folder_source_errors(tmp_path, rng):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        FolderSource(tmp_path / "nowhere", "train")
    (tmp_path / "flat" / "train").mkdir(parents=True)
    with pytest.raises(ValueError, match="no class"):
        FolderSource(tmp_path / "flat", "train")
    (tmp_path / "d" / "train" / "cat").mkdir(parents=True)
    (tmp_path / "d" / "train" / "dog").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(
        tmp_path / "d" / "train" / "cat" / "0.png")
    (tmp_path / "d" / "train" / "dog" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="dog.*holds no images"):
        FolderSource(tmp_path / "d", "train")
    with pytest.raises(ValueError, match="unknown kind"):
        open_image_source("zip:somewhere", "train")


def test_corrupt_jpeg_fails_fast_or_is_skipped_and_counted(cifar_folder, caplog):
    root, _, _ = cifar_folder
    bad = root / "train" / "automobile" / "0002.jpg"
    bad.write_bytes(os.urandom(300))
    source = FolderSource(root, "train")
    index = source.paths.index(str(bad))
    with pytest.raises(CorruptImageError, match="0002.jpg"):
        source[index]
    with pytest.raises(CorruptImageError, match="0002.jpg"):
        decode_to_arrays(source, num_workers=0, cache=False, progress=False)

    skipping = FolderSource(root, "train", on_error="skip")
    example = skipping[index]
    assert skipping.num_skipped == 1 and "0002.jpg" in caplog.text
    np.testing.assert_array_equal(example["image"], skipping[index + 1]["image"])
    assert example["label"] == skipping.labels[index + 1]
    arrays = decode_to_arrays(FolderSource(root, "train", on_error="skip"), num_workers=0,
                              cache=False, progress=False)
    assert arrays.num_skipped == 1 and len(arrays) == len(source) - 1
    expect = [source[i]["image"] for i in range(len(source)) if i != index]
    np.testing.assert_array_equal(arrays.images, np.stack(expect))


def test_tfds_source_missing_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import fails
    with pytest.raises(ImportError, match="pip install tensorflow-datasets"):
        open_image_source("tfds:cifar10", "train")
    with pytest.raises(ImportError, match="pip install tensorflow-datasets"):
        open_image_source("imagenet2012", "validation")


def test_extract_archive_once_and_atomically(shared_data, tmp_path, monkeypatch):
    members = _cifar_members(shared_data, per_class=3)
    archive = tmp_path / "tiny_jpg.tar.xz"
    with tarfile.open(archive, "w:xz") as tar:
        for cls, files in members.items():
            for name, data in files:
                path = tmp_path / "src" / "tiny_jpg" / "train" / cls / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
        tar.add(tmp_path / "src" / "tiny_jpg", arcname="tiny_jpg")
    cache = tmp_path / "cache"

    real_extract = tarfile.TarFile.extract
    calls = []

    def interrupted(self, member, *args, **kwargs):
        calls.append(member.name)
        if len(calls) > 4:
            raise KeyboardInterrupt
        return real_extract(self, member, *args, **kwargs)

    monkeypatch.setattr(tarfile.TarFile, "extract", interrupted)
    with pytest.raises(KeyboardInterrupt):
        extract_archive(archive, cache, progress=False)
    assert list(cache.iterdir()) == [], "an interrupted extraction left something behind"
    monkeypatch.setattr(tarfile.TarFile, "extract", real_extract)

    root = extract_archive(archive, cache, progress=False)
    assert root.name == "tiny_jpg"
    source = FolderSource(root, "train")
    assert source.class_names == ("airplane", "automobile") and len(source) == 6
    for cls, files in members.items():
        for name, data in files:
            assert (root / "train" / cls / name).read_bytes() == data

    def no_second_extraction(*args, **kwargs):
        raise AssertionError("the archive was extracted again")

    monkeypatch.setattr(tarfile, "open", no_second_extraction)
    assert extract_archive(archive, cache, progress=False) == root
    with pytest.raises(FileNotFoundError, match="missing.tar.xz"):
        extract_archive(tmp_path / "missing.tar.xz", cache)


def test_decode_to_arrays_caches_beside_the_data(cifar_folder, monkeypatch):
    root, _, pngs = cifar_folder
    source = FolderSource(root, "train")
    arrays = decode_to_arrays(source, num_workers=0, progress=False)
    assert arrays.images.shape == (len(source), 32, 32, 3) and arrays.images.dtype == np.uint8
    np.testing.assert_array_equal(arrays.labels, source.labels)
    for i in range(len(source)):
        np.testing.assert_array_equal(arrays.images[i], source[i]["image"])
    assert arrays.class_names == source.class_names
    cached = list(root.glob("train.*.npz"))
    assert len(cached) == 1

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again instead of loading the cache")

    monkeypatch.setattr(decode_cache, "_decode_folder", no_decoding)
    again = decode_to_arrays(FolderSource(root, "train"), num_workers=0, progress=False)
    np.testing.assert_array_equal(again.images, arrays.images)
    np.testing.assert_array_equal(again.labels, arrays.labels)
    # a changed folder makes the cache stale
    Image.fromarray(pngs["a.png"]).save(root / "train" / "synthetic" / "c.png")
    with pytest.raises(AssertionError, match="decoded again"):
        decode_to_arrays(FolderSource(root, "train"), num_workers=0, progress=False)
    monkeypatch.undo()
    resized = decode_to_arrays(FolderSource(root, "train"), image_size=16, num_workers=0,
                               progress=False)
    assert resized.images.shape == (len(source) + 1, 16, 16, 3)


def test_decode_to_arrays_process_pool_matches_in_process(cifar_folder, tmp_path):
    root, _, _ = cifar_folder
    source = FolderSource(root, "train")
    pooled = decode_to_arrays(source, num_workers=2, chunk_size=4, cache=False, progress=False)
    single = decode_to_arrays(source, num_workers=0, cache=False, progress=False)
    np.testing.assert_array_equal(pooled.images, single.images)
    np.testing.assert_array_equal(pooled.labels, single.labels)


# --- loaders ----------------------------------------------------------------------------------


def test_loader_every_example_once_per_epoch_across_two_processes(rng):
    arrays = _random_arrays(rng, 24)
    transform = SmallImageTrainTransform()
    seen = {0: [], 1: []}
    for shard in (0, 1):
        loader = ImageLoader(arrays, batch_size=4, train=True, seed=5, num_epochs=2,
                             shard_index=shard, shard_count=2, transform=transform)
        assert loader.steps_per_epoch == 3 and len(loader) == 6
        for step, batch in enumerate(_collect(loader.iterate())):
            assert batch["image"].shape == (4, 8, 8, 3) and batch["mask"].all()
            seen[step // 3].extend(batch["index"].tolist())
            for row, index in enumerate(batch["index"]):
                assert batch["label"][row] == arrays.labels[index]
                expect = transform(arrays[index], example_rng(5, step // 3, index))["image"]
                np.testing.assert_array_equal(batch["image"][row], expect)
    for epoch in (0, 1):
        assert sorted(seen[epoch]) == list(range(24))
    assert seen[0] != seen[1], "both epochs had the same order"


def test_eval_loader_pads_and_masks_every_example_once(rng):
    arrays = _random_arrays(rng, 11)
    indices, labels = [], []
    for shard in (0, 1):
        loader = ImageLoader(arrays, batch_size=4, train=False, shard_index=shard, shard_count=2)
        batches = _collect(loader)
        assert len(batches) == loader.steps_per_epoch == 2  # ceil(11 / 8)
        for batch in batches:
            assert batch["image"].shape == (4, 8, 8, 3)
            np.testing.assert_array_equal(batch["mask"], batch["index"] >= 0)
            indices.extend(batch["index"][batch["mask"]].tolist())
            labels.extend(batch["label"][batch["mask"]].tolist())
    assert sorted(indices) == list(range(11))
    np.testing.assert_array_equal(np.array(labels), arrays.labels[np.array(indices)])


def test_loader_deterministic_and_resumable(rng):
    arrays = _random_arrays(rng, 20)

    def make(seed):
        return ImageLoader(arrays, batch_size=3, train=True, seed=seed, num_epochs=3,
                           shard_index=0, shard_count=1, transform=SmallImageTrainTransform(),
                           read_threads=2)

    full = _collect(make(1).iterate())
    assert len(full) == 18
    again = _collect(make(1).iterate())
    for a, b in zip(full, again, strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    other = _collect(make(2).iterate())
    assert any(not np.array_equal(a["index"], b["index"]) for a, b in zip(full, other, strict=True))

    resumed = _collect(make(1).iterate(start_step=7))
    assert len(resumed) == 11
    for a, b in zip(full[7:], resumed, strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])

    it = make(1).iterate()
    for _ in range(5):
        next(it)
    state = it.get_state()
    it.close()
    restored = make(1).iterate()
    restored.set_state(state)
    for a, b in zip(full[5:], _collect(restored), strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])


def test_loader_with_worker_processes_matches_in_process(cifar_folder):
    root, _, _ = cifar_folder
    source = FolderSource(root, "train")
    transform = DeitTrainTransform(size=16)

    def batches(workers):
        loader = ImageLoader(source, batch_size=4, train=True, seed=3, shard_index=0,
                             shard_count=1, transform=transform, worker_count=workers)
        return _collect(loader.iterate(start_step=1))

    in_process, workers = batches(0), batches(2)
    assert len(in_process) == len(workers) == 2
    for a, b in zip(in_process, workers, strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_array_batches_follow_the_same_plan(rng):
    arrays = _random_arrays(rng, 17)
    kwargs = {"batch_size": 4, "train": True, "seed": 9, "num_epochs": 2, "shard_index": 1,
              "shard_count": 2}
    fast = list(array_batches(arrays, **kwargs))
    grain_path = _collect(ImageLoader(arrays, **kwargs).iterate())
    assert len(fast) == len(grain_path) == 2 * EpochPlan(17, batch_size=4, train=True,
                                                         shard_count=2).steps_per_epoch
    for a, b in zip(fast, grain_path, strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    resumed = list(array_batches(arrays, start_step=1, **kwargs))
    np.testing.assert_array_equal(resumed[0]["index"], fast[1]["index"])
    evaluation = list(array_batches(arrays, batch_size=8, train=False, shard_index=0,
                                    shard_count=1))
    assert [int(b["mask"].sum()) for b in evaluation] == [8, 8, 1]
    np.testing.assert_array_equal(evaluation[2]["index"][:1], [16])
