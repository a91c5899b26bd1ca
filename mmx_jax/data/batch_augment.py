"""Batch-level image ops as pure, jittable JAX functions (run on device in the train step).

    normalize         uint8 (or mixed float) pixels in 0..255 -> (x / 255 - mean) / std
    smooth_labels     int labels (B,) -> soft labels (B, K) with label smoothing
    mixup_cutmix      the DeiT batch mix: mixup (alpha 0.8) or cutmix (alpha 1.0), each batch
                      mixed with its reverse, soft labels the matching convex combination
    random_crop_flip  the small-image recipe on device: random crop of the zero-padded batch
                      and horizontal flip, from a PRNG key
    cutout            a random square per example set to a fill value

Mixing happens before normalisation or after it, alike: normalisation is affine and the
mixing weights sum to one.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)


def _check_images(images, name: str = "images") -> None:
    if np.ndim(images) != 4:
        raise ValueError(f"{name} has shape {np.shape(images)}, wanted (B, H, W, C)")


def normalize(images, mean: Sequence[float], std: Sequence[float], dtype=jnp.float32):
    """Per-channel normalisation of pixels in 0..255: ``(images / 255 - mean) / std``.

    Args:
      images: (..., C) uint8 or float in 0..255, NumPy or JAX (the result is of the same kind).
      mean, std: (C,) in 0..1 units, e.g. `IMAGENET_MEAN`, `IMAGENET_STD`.
      dtype: the output float dtype.
    """
    xp = np if isinstance(images, np.ndarray) else jnp
    if max(mean) > 1 or max(std) > 1 or min(std) <= 0:
        raise ValueError(f"normalize: mean {tuple(mean)} and std {tuple(std)} must be in 0..1 "
                         "units (e.g. CIFAR10_MEAN), not pixel units")
    if np.shape(images)[-1] != len(mean) or len(mean) != len(std):
        raise ValueError(f"images have {np.shape(images)[-1]} channels (shape "
                         f"{np.shape(images)}), mean {len(mean)} and std {len(std)} values")
    scale = xp.asarray(np.asarray(std, np.float64) * 255.0, dtype)
    shift = xp.asarray(np.asarray(mean, np.float64) * 255.0, dtype)
    return (images.astype(dtype) - shift) / scale


def smooth_labels(labels: jax.Array, num_classes: int, smoothing: float = 0.0) -> jax.Array:
    """One-hot (B,) int -> (B, K) float32 with ``1 - smoothing + smoothing / K`` on the true
    class and ``smoothing / K`` elsewhere (rows sum to 1)."""
    off = smoothing / num_classes
    return jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) * (1.0 - smoothing) + off


def cutmix_box(key: jax.Array, height: int, width: int, lam: jax.Array
               ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """A cutmix box (y0, y1, x0, x1): sides sqrt(1 - lam) of the image's, centre uniform,
    clipped at the border (so its area may be smaller than 1 - lam)."""
    ky, kx = jax.random.split(key)
    cut = jnp.sqrt(1.0 - lam)
    cut_h = jnp.floor(height * cut).astype(jnp.int32)
    cut_w = jnp.floor(width * cut).astype(jnp.int32)
    cy = jax.random.randint(ky, (), 0, height)
    cx = jax.random.randint(kx, (), 0, width)
    y0 = jnp.clip(cy - cut_h // 2, 0, height)
    y1 = jnp.clip(cy + cut_h // 2, 0, height)
    x0 = jnp.clip(cx - cut_w // 2, 0, width)
    x1 = jnp.clip(cx + cut_w // 2, 0, width)
    return y0, y1, x0, x1


def mixup_cutmix(key: jax.Array, images: jax.Array, labels: jax.Array, *, num_classes: int,
                 mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0, switch_prob: float = 0.5,
                 prob: float = 1.0, label_smoothing: float = 0.1
                 ) -> tuple[jax.Array, jax.Array]:
    """Mixes each example with the example at the mirrored batch position (``images[::-1]``).

    With probability ``prob`` the batch is mixed: by cutmix (probability ``switch_prob`` when
    both alphas are > 0) with lam ~ Beta(cutmix_alpha, cutmix_alpha), a box of the partner
    pasted in and lam corrected to the kept area; otherwise by mixup with lam ~
    Beta(mixup_alpha, mixup_alpha), ``lam * x + (1 - lam) * partner``. Soft labels are
    ``lam * smooth(y) + (1 - lam) * smooth(partner_y)``; an alpha of 0 turns that mode off.

    Args:
      key: PRNG key (fold the step into it for a fresh mix per step).
      images: (B, H, W, C), uint8 or float.
      labels: (B,) int.

    Returns:
      images (B, H, W, C) float32 (or the input's float dtype), soft labels (B, K) float32
      whose rows sum to 1.
    """
    _check_images(images)
    if np.shape(labels) != np.shape(images)[:1]:
        raise ValueError(f"labels have shape {np.shape(labels)}, wanted ({np.shape(images)[0]},)")
    if mixup_alpha < 0 or cutmix_alpha < 0:
        raise ValueError(f"mixup_alpha {mixup_alpha} and cutmix_alpha {cutmix_alpha} must be >= 0")
    _, height, width, _ = images.shape
    dtype = images.dtype if jnp.issubdtype(images.dtype, jnp.floating) else jnp.float32
    x = images.astype(dtype)
    partner = x[::-1]
    targets = smooth_labels(labels, num_classes, label_smoothing)
    if mixup_alpha == 0 and cutmix_alpha == 0:
        return x, targets
    k_apply, k_switch, k_mix, k_cut, k_box = jax.random.split(key, 5)

    lam = jnp.float32(1.0)
    out = x
    if mixup_alpha > 0:
        lam = jax.random.beta(k_mix, mixup_alpha, mixup_alpha).astype(jnp.float32)
        out = (lam * x + (1.0 - lam) * partner).astype(dtype)
    if cutmix_alpha > 0:
        lam_cut = jax.random.beta(k_cut, cutmix_alpha, cutmix_alpha).astype(jnp.float32)
        y0, y1, x0, x1 = cutmix_box(k_box, height, width, lam_cut)
        rows = jnp.arange(height)[:, None]
        cols = jnp.arange(width)[None, :]
        box = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
        cut_out = jnp.where(box[None, :, :, None], partner, x)
        lam_cut = 1.0 - ((y1 - y0) * (x1 - x0)).astype(jnp.float32) / (height * width)
        use_cut = (jax.random.bernoulli(k_switch, switch_prob) if mixup_alpha > 0
                   else jnp.bool_(True))
        out = jnp.where(use_cut, cut_out, out)
        lam = jnp.where(use_cut, lam_cut, lam)
    apply = jax.random.bernoulli(k_apply, prob)
    out = jnp.where(apply, out, x)
    lam = jnp.where(apply, lam, 1.0)
    return out, lam * targets + (1.0 - lam) * targets[::-1]


def random_crop_flip(key: jax.Array, images: jax.Array, padding: int = 4,
                     flip_prob: float = 0.5) -> jax.Array:
    """Small-image training view on device: each example is cropped back to (H, W) at a
    random offset from the batch zero-padded by ``padding``, then mirrored left-right with
    probability ``flip_prob``.

    Args:
      key: PRNG key.
      images: (B, H, W, C), any dtype.

    Returns:
      (B, H, W, C), same dtype.
    """
    _check_images(images)
    b, h, w, c = images.shape
    k_y, k_x, k_flip = jax.random.split(key, 3)
    padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    top = jax.random.randint(k_y, (b,), 0, 2 * padding + 1)
    left = jax.random.randint(k_x, (b,), 0, 2 * padding + 1)
    crop = jax.vmap(lambda im, y, x: jax.lax.dynamic_slice(im, (y, x, 0), (h, w, c)))(
        padded, top, left)
    flip = jax.random.bernoulli(k_flip, flip_prob, (b,))
    return jnp.where(flip[:, None, None, None], crop[:, :, ::-1], crop)


def cutout(key: jax.Array, images: jax.Array, size: int, fill=0) -> jax.Array:
    """Sets a (size, size) square per example, centred anywhere and clipped at the border, to
    ``fill`` (a scalar or one value per channel): (B, H, W, C) -> same shape and dtype."""
    _check_images(images)
    b, h, w, _ = images.shape
    k_y, k_x = jax.random.split(key)
    cy = jax.random.randint(k_y, (b, 1, 1), 0, h)
    cx = jax.random.randint(k_x, (b, 1, 1), 0, w)
    rows = jnp.arange(h)[None, :, None] - (cy - size // 2)
    cols = jnp.arange(w)[None, None, :] - (cx - size // 2)
    square = (rows >= 0) & (rows < size) & (cols >= 0) & (cols < size)
    return jnp.where(square[..., None], jnp.asarray(fill, images.dtype), images)
