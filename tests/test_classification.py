"""Image classification through the real training loop: inputs are normalised as the model
expects, and a tiny ViM2 learns real CIFAR images."""

from __future__ import annotations

import pathlib
import tarfile

import jax
import numpy as np
import pytest

from configs import vim2
from mmx_jax.data.batch_augment import CIFAR10_MEAN, CIFAR10_STD, normalize
from mmx_jax.train.loop import train_and_evaluate
from mmx_jax.train.tasks.classification import ClassificationTask
from mmx_jax.train.writers import read_metrics

REPO = pathlib.Path(__file__).resolve().parents[1]
CLASSES = ("airplane", "automobile")


def vim2_config(arg: str):
    return vim2.get_config(arg)


@pytest.fixture
def cifar_folder(shared_data, tmp_path):
    """root/{train,test}/<class>/*.jpg with 24 real CIFAR-10 images of two classes (the first
    members of the archive's test split, streamed)."""
    per_class, found = 24, {c: 0 for c in CLASSES}
    root = tmp_path / "cifar"
    with tarfile.open(shared_data / "images" / "cifar10_jpg.tar.xz", "r|xz") as tar:
        for member in tar:
            parts = member.name.split("/")
            if len(parts) == 4 and parts[1] == "test" and parts[2] in found and \
                    found[parts[2]] < per_class and member.isfile():
                data = tar.extractfile(member).read()
                for split in ("train", "test"):
                    folder = root / split / parts[2]
                    folder.mkdir(parents=True, exist_ok=True)
                    (folder / parts[3]).write_bytes(data)
                found[parts[2]] += 1
            if all(n == per_class for n in found.values()):
                break
    return root


def test_normalize_rejects_pixel_unit_statistics():
    images = np.zeros((1, 2, 2, 3), np.uint8)
    pixel_units = tuple(255 * m for m in CIFAR10_MEAN)
    with pytest.raises(ValueError, match="must be in 0..1 units"):
        normalize(images, pixel_units, CIFAR10_STD)


def _config(root, **data):
    config = vim2_config(f"smoke,dataset=folder:{root}")
    config.mesh.update(data=1, fsdp=1)
    config.data.update(batch_size=16, eval_batch_size=16, val_holdout=8, crop_padding=-1,
                       flip=False, label_smoothing=0.0, **data)
    config.optimizer.update(lr=3e-3, warmup_steps=1, weight_decay=0.0)
    config.train.update(num_epochs=14, steps_per_epoch=0, log_every_steps=1,
                        checkpoint_every_steps=1000)
    return config


def test_training_inputs_are_normalised(cifar_folder):
    task = ClassificationTask.from_config(_config(cifar_folder))
    batch = next(task.train_batches(0, task.steps_per_epoch()))
    x = np.asarray(task._normalize(batch["image"]))
    assert abs(x.mean()) < 0.5 and 0.5 < x.std() < 2.0, (x.mean(), x.std())
    assert set(np.unique(batch["label"])) <= {0, 1}


@pytest.mark.slow
def test_tiny_vim2_learns_real_images_through_the_loop(cifar_folder, tmp_path):
    config = _config(cifar_folder)
    results = train_and_evaluate(config, tmp_path / "run", devices=jax.devices()[:1])
    losses = [row["train_loss"] for row in read_metrics(tmp_path / "run") if "train_loss" in row]
    assert len(losses) == 14 * (40 // 16)
    assert np.mean(losses[-4:]) < 0.6 * np.mean(losses[:4]), losses
    assert results["test_top1"] > 0.7  # the training images themselves (two classes)

    from mmx_jax.train.evaluate import evaluate_and_report  # noqa: PLC0415
    from mmx_jax.train.workdir import load_config  # noqa: PLC0415

    config = load_config(tmp_path / "run")
    config.eval.flip_tta = True
    report = evaluate_and_report(tmp_path / "run", config=config, devices=jax.devices()[:1])
    assert report["flip_tta"] and report["test_top1"] > 0.7
    assert (tmp_path / "run" / "eval" / "best_flip" / "metrics.json").exists()


def test_cutout_sets_one_mean_square_per_image_and_is_deterministic(cifar_folder):
    task = ClassificationTask.from_config(_config(cifar_folder, cutout_size=8))
    batch = next(task.train_batches(3, task.steps_per_epoch()))
    images, targets = task.train_inputs(batch)
    images, original = np.asarray(images), np.asarray(batch["image"])
    np.testing.assert_array_equal(np.argmax(targets, -1), batch["label"])
    fill = np.round(255 * np.asarray(task.mean)).astype(np.uint8)  # measured: config has None
    changed = np.any(images != original, axis=-1)  # (B, H, W)
    for example, mask in zip(images, changed, strict=True):
        rows, cols = np.nonzero(mask)
        assert 0 < len(rows) <= 64
        # the changed pixels hold the fill and lie in one square of side at most 8
        np.testing.assert_array_equal(example[rows, cols], np.broadcast_to(fill, (len(rows), 3)))
        assert rows.max() - rows.min() < 8 and cols.max() - cols.min() < 8
    again, _ = task.train_inputs(batch)
    np.testing.assert_array_equal(np.asarray(again), images)
    other, _ = task.train_inputs({**batch, "seed": batch["seed"] + 1})
    assert np.any(np.asarray(other) != images)


@pytest.mark.slow
def test_flip_test_time_augmentation_makes_predictions_mirror_invariant(cifar_folder):
    from flax import nnx  # noqa: PLC0415

    config = _config(cifar_folder)
    task = ClassificationTask.from_config(config)
    model = task.create_model(nnx.Rngs(0))
    model.eval()
    batch = next(task.eval_batches("test"))
    mirrored = {**batch, "image": batch["image"][:, :, ::-1]}
    plain = np.asarray(task.predict(model, batch))
    assert not np.allclose(plain, np.asarray(task.predict(model, mirrored)), atol=1e-4)
    config.eval.flip_tta = True
    np.testing.assert_allclose(task.predict(model, batch), task.predict(model, mirrored),
                               rtol=1e-4, atol=1e-5)
