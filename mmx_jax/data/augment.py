"""Per-example image augmentations in NumPy/PIL (they run in the loader's worker processes).

Every random op takes a ``np.random.Generator``; the loader seeds one per example from
``(seed, epoch, index)`` (`example_rng`), so a pipeline is deterministic given its seed. Images
are (H, W, C) uint8 with C = 1 or 3; labels are never touched.

Recipes (frozen dataclasses, picklable, called as ``transform(example, rng) -> example``):

    DeitTrainTransform     random-resized crop, flip, RandAugment(2, 9), random erasing 0.25
    EvalTransform          resize the shorter side to size / 0.875, center crop
    SmallImageTrainTransform   pad-4 random crop, flip, optional cutout (32x32 CIFAR)

Batch-level ops (mixup/cutmix, label smoothing) and normalisation live in `batch_augment`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

# Mean pixel of ImageNet in 0..255: the fill of pixels that geometric ops move in.
IMAGENET_FILL = (124, 116, 104)
RANDAUGMENT_MAX_MAGNITUDE = 30
_RESAMPLE = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
             "bicubic": Image.Resampling.BICUBIC}


def example_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of one example: a pure function of (seed, epoch, index)."""
    return np.random.default_rng([1, int(seed), int(epoch), int(index)])


def _to_pil(image: np.ndarray) -> Image.Image:
    if image.ndim != 3 or image.shape[-1] not in (1, 3) or image.dtype != np.uint8:
        raise ValueError(f"image has shape {image.shape} and dtype {image.dtype}; wanted "
                         "(H, W, 1|3) uint8")
    return Image.fromarray(image[:, :, 0] if image.shape[-1] == 1 else image)


def _from_pil(im: Image.Image) -> np.ndarray:
    array = np.asarray(im, np.uint8)
    return array[:, :, None] if array.ndim == 2 else array


def _fill_for(im: Image.Image, fill: tuple[int, ...]) -> int | tuple[int, ...]:
    return int(round(sum(fill) / len(fill))) if im.mode == "L" else tuple(fill)


def random_resized_crop_box(rng: np.random.Generator, height: int, width: int,
                            scale: tuple[float, float] = (0.08, 1.0),
                            ratio: tuple[float, float] = (3 / 4, 4 / 3),
                            attempts: int = 10) -> tuple[int, int, int, int]:
    """Samples the crop (top, left, h, w) of a random-resized crop.

    Area fraction ~ U(scale), aspect ratio w/h log-uniform in ``ratio``; up to ``attempts``
    draws, then a center crop with the aspect clamped into ``ratio``.
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(attempts):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif aspect > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(image: np.ndarray, rng: np.random.Generator, size: int,
                        scale: tuple[float, float] = (0.08, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3),
                        interpolation: str = "bicubic") -> np.ndarray:
    """Crops a random box (`random_resized_crop_box`) and resizes it.

    Returns:
      (size, size, C) uint8 from (H, W, C) uint8.
    """
    top, left, h, w = random_resized_crop_box(rng, image.shape[0], image.shape[1], scale, ratio)
    im = _to_pil(image).resize((size, size), _RESAMPLE[interpolation],
                               box=(left, top, left + w, top + h))
    return _from_pil(im)


def horizontal_flip(image: np.ndarray, rng: np.random.Generator, p: float = 0.5) -> np.ndarray:
    """Mirrors left-right with probability ``p``."""
    return image[:, ::-1] if rng.random() < p else image


def resize_shorter(image: np.ndarray, size: int, interpolation: str = "bicubic") -> np.ndarray:
    """Resizes so the shorter side is ``size``, keeping the aspect ratio."""
    h, w = image.shape[:2]
    if min(h, w) == size:
        return image
    new_h, new_w = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
    return _from_pil(_to_pil(image).resize((new_w, new_h), _RESAMPLE[interpolation]))


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """The central (size, size) window of an image at least that large."""
    h, w = image.shape[:2]
    if h < size or w < size:
        raise ValueError(f"image of shape {image.shape} is smaller than the crop {size}")
    top, left = int(round((h - size) / 2)), int(round((w - size) / 2))
    return image[top:top + size, left:left + size]


def eval_resize_crop(image: np.ndarray, size: int, crop_fraction: float = 0.875,
                     interpolation: str = "bicubic") -> np.ndarray:
    """Evaluation view: shorter side to floor(size / crop_fraction), then a center crop."""
    return center_crop(resize_shorter(image, int(math.floor(size / crop_fraction)),
                                      interpolation), size)


# RandAugment. Each op maps (PIL image, level in [0, 1], sign, fill) -> PIL image; the level is
# magnitude / 30 and the ranges at level 1 are those of the usual op set: shear 0.3, translate
# 45% of the side, rotate 30 degrees, enhance factors 1 +- 0.9, posterize down to 4 bits,
# solarize threshold down to 0.

def _affine(im: Image.Image, coeffs: tuple[float, ...], fill) -> Image.Image:
    return im.transform(im.size, Image.Transform.AFFINE, coeffs, Image.Resampling.BILINEAR,
                        fillcolor=_fill_for(im, fill))


def _shear_x(im, level, sign, fill):
    s = sign * 0.3 * level
    return _affine(im, (1, s, -s * im.size[1] / 2, 0, 1, 0), fill)


def _shear_y(im, level, sign, fill):
    s = sign * 0.3 * level
    return _affine(im, (1, 0, 0, s, 1, -s * im.size[0] / 2), fill)


def _translate_x(im, level, sign, fill):
    return _affine(im, (1, 0, -sign * 0.45 * level * im.size[0], 0, 1, 0), fill)


def _translate_y(im, level, sign, fill):
    return _affine(im, (1, 0, 0, 0, 1, -sign * 0.45 * level * im.size[1]), fill)


def _rotate(im, level, sign, fill):
    return im.rotate(sign * 30.0 * level, Image.Resampling.BILINEAR,
                     fillcolor=_fill_for(im, fill))


def _enhance(enhancer) -> Callable:
    return lambda im, level, sign, fill: enhancer(im).enhance(1.0 + sign * 0.9 * level)


RANDAUGMENT_OPS: dict[str, tuple[Callable, bool]] = {
    # name: (op, whether the magnitude takes a random sign)
    "identity": (lambda im, level, sign, fill: im, False),
    "autocontrast": (lambda im, level, sign, fill: ImageOps.autocontrast(im), False),
    "equalize": (lambda im, level, sign, fill: ImageOps.equalize(im), False),
    "rotate": (_rotate, True),
    "solarize": (lambda im, level, sign, fill: ImageOps.solarize(im, 255.0 * (1.0 - level)),
                 False),
    "color": (_enhance(ImageEnhance.Color), True),
    "posterize": (lambda im, level, sign, fill: ImageOps.posterize(im, 8 - round(4 * level)),
                  False),
    "contrast": (_enhance(ImageEnhance.Contrast), True),
    "brightness": (_enhance(ImageEnhance.Brightness), True),
    "sharpness": (_enhance(ImageEnhance.Sharpness), True),
    "shear_x": (_shear_x, True),
    "shear_y": (_shear_y, True),
    "translate_x": (_translate_x, True),
    "translate_y": (_translate_y, True),
}


def apply_randaugment_op(image: np.ndarray, name: str, magnitude: float, sign: int = 1,
                         fill: tuple[int, ...] = IMAGENET_FILL) -> np.ndarray:
    """Applies one named RandAugment op at ``magnitude`` (0..30) to (H, W, C) uint8."""
    if name not in RANDAUGMENT_OPS:
        raise ValueError(f"unknown RandAugment op {name!r}; wanted one of {list(RANDAUGMENT_OPS)}")
    op, _ = RANDAUGMENT_OPS[name]
    return _from_pil(op(_to_pil(image), magnitude / RANDAUGMENT_MAX_MAGNITUDE, sign, fill))


def rand_augment(image: np.ndarray, rng: np.random.Generator, num_ops: int = 2,
                 magnitude: float = 9, fill: tuple[int, ...] = IMAGENET_FILL) -> np.ndarray:
    """RandAugment: ``num_ops`` ops drawn uniformly (with replacement) from `RANDAUGMENT_OPS`,
    each at ``magnitude`` out of 30, signed ops mirrored with probability 1/2.

    Args:
      image: (H, W, C) uint8.
    Returns:
      (H, W, C) uint8.
    """
    if not 0 <= magnitude <= RANDAUGMENT_MAX_MAGNITUDE:
        raise ValueError(f"magnitude must be in [0, {RANDAUGMENT_MAX_MAGNITUDE}], got {magnitude}")
    names = list(RANDAUGMENT_OPS)
    im = _to_pil(image)
    level = magnitude / RANDAUGMENT_MAX_MAGNITUDE
    for _ in range(num_ops):
        op, signed = RANDAUGMENT_OPS[names[int(rng.integers(len(names)))]]
        sign = -1 if signed and rng.random() < 0.5 else 1
        im = op(im, level, sign, fill)
    return _from_pil(im)


def random_erasing(image: np.ndarray, rng: np.random.Generator, p: float = 0.25,
                   scale: tuple[float, float] = (0.02, 1 / 3),
                   ratio: tuple[float, float] = (0.3, 3.3), attempts: int = 10) -> np.ndarray:
    """With probability ``p`` replaces a random box by per-pixel noise; shape and dtype kept.

    The box has area fraction ~ U(scale) and log-uniform aspect in ``ratio``. The noise is
    uniform over 0..255 for integer images (before normalisation) and standard normal for
    float images (after normalisation).
    """
    if rng.random() >= p:
        return image
    h_img, w_img, channels = image.shape
    area = h_img * w_img
    for _ in range(attempts):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        h = int(round(math.sqrt(target * aspect)))
        w = int(round(math.sqrt(target / aspect)))
        if 0 < h < h_img and 0 < w < w_img:
            top = int(rng.integers(0, h_img - h + 1))
            left = int(rng.integers(0, w_img - w + 1))
            if np.issubdtype(image.dtype, np.integer):
                noise = rng.integers(0, 256, (h, w, channels)).astype(image.dtype)
            else:
                noise = rng.standard_normal((h, w, channels)).astype(image.dtype)
            out = image.copy()
            out[top:top + h, left:left + w] = noise
            return out
    return image


def pad_random_crop(image: np.ndarray, rng: np.random.Generator, padding: int = 4) -> np.ndarray:
    """Zero-pads by ``padding`` on every side and crops back to (H, W) at a random offset."""
    h, w = image.shape[:2]
    padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
    top = int(rng.integers(0, 2 * padding + 1))
    left = int(rng.integers(0, 2 * padding + 1))
    return padded[top:top + h, left:left + w]


def cutout(image: np.ndarray, rng: np.random.Generator, size: int, fill: int = 0) -> np.ndarray:
    """Sets a (size, size) square, centred anywhere in the image and clipped at the border,
    to ``fill``."""
    h, w = image.shape[:2]
    cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
    top, left = cy - size // 2, cx - size // 2
    out = image.copy()
    out[max(top, 0):top + size, max(left, 0):left + size] = fill
    return out


def _with_image(example: dict[str, Any], image: np.ndarray) -> dict[str, Any]:
    return {**example, "image": np.ascontiguousarray(image)}


@dataclasses.dataclass(frozen=True)
class DeitTrainTransform:
    """Training view of the DeiT/Swin recipe: random-resized crop to ``size``, horizontal flip,
    RandAugment, random erasing (mixup/cutmix and label smoothing follow on the batch)."""

    size: int = 224
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_prob: float = 0.5
    randaugment_ops: int = 2  # 0 turns RandAugment off
    randaugment_magnitude: float = 9
    erasing_prob: float = 0.25
    interpolation: str = "bicubic"
    fill: tuple[int, ...] = IMAGENET_FILL

    def __call__(self, example: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        image = random_resized_crop(example["image"], rng, self.size, self.scale, self.ratio,
                                    self.interpolation)
        image = horizontal_flip(image, rng, self.flip_prob)
        if self.randaugment_ops:
            image = rand_augment(image, rng, self.randaugment_ops, self.randaugment_magnitude,
                                 self.fill)
        if self.erasing_prob:
            image = random_erasing(image, rng, self.erasing_prob)
        return _with_image(example, image)


@dataclasses.dataclass(frozen=True)
class EvalTransform:
    """Evaluation view: resize the shorter side to size / crop_fraction, center crop ``size``."""

    size: int = 224
    crop_fraction: float = 0.875
    interpolation: str = "bicubic"

    def __call__(self, example: dict[str, Any], rng: np.random.Generator | None = None
                 ) -> dict[str, Any]:
        return _with_image(example, eval_resize_crop(example["image"], self.size,
                                                     self.crop_fraction, self.interpolation))


@dataclasses.dataclass(frozen=True)
class SmallImageTrainTransform:
    """Small-image (32x32 CIFAR) training view: pad-``padding`` random crop, flip, and a
    ``cutout_size`` square cutout when it is > 0."""

    padding: int = 4
    flip_prob: float = 0.5
    cutout_size: int = 0

    def __call__(self, example: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        image = pad_random_crop(example["image"], rng, self.padding)
        image = horizontal_flip(image, rng, self.flip_prob)
        if self.cutout_size:
            image = cutout(image, rng, self.cutout_size)
        return _with_image(example, image)
