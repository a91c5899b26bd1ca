"""Depthwise 2-D convolution as a sum of shifted maps.

XLA hands a grouped convolution with one channel per group to cuDNN, which on the H100 ran
the dilated 3x3 ones of the scan gate at about 2.5 ms a call in bfloat16 and split others
into one kernel per group (`benchmarks/profile_step.py`, notes/vision_perf.md). Written as
kernel_size^2 shifted multiply-adds, the convolution is one elementwise fusion forward and a
few reductions backward, memory-bound like it should be.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx


def depthwise_conv2d(x: jax.Array, kernel: jax.Array, *, strides: Sequence[int] = (1, 1),
                     dilation: Sequence[int] = (1, 1), padding: str = "SAME") -> jax.Array:
    """Depthwise convolution of x (B, H, W, C) with kernel (kh, kw, C), no bias.

    `padding` is "SAME" (zeros around, output ceil(H / stride)) or "VALID"; the same output
    as `lax.conv_general_dilated(..., feature_group_count=C)` in the NHWC/HWIO layout.
    """
    (kh, kw, _), (sh, sw), (dh, dw) = kernel.shape, strides, dilation
    _, height, width, _ = x.shape
    span_h, span_w = dh * (kh - 1) + 1, dw * (kw - 1) + 1
    if padding == "SAME":
        out_h, out_w = -(-height // sh), -(-width // sw)
        pad_h = max((out_h - 1) * sh + span_h - height, 0)
        pad_w = max((out_w - 1) * sw + span_w - width, 0)
        x = jnp.pad(x, ((0, 0), (pad_h // 2, pad_h - pad_h // 2),
                        (pad_w // 2, pad_w - pad_w // 2), (0, 0)))
    elif padding == "VALID":
        out_h, out_w = (height - span_h) // sh + 1, (width - span_w) // sw + 1
    else:
        raise ValueError(f"depthwise_conv2d: padding={padding!r}, wanted 'SAME' or 'VALID'")
    kernel = kernel.astype(x.dtype)
    out = None
    for i in range(kh):
        for j in range(kw):
            tap = x[:, i * dh:i * dh + (out_h - 1) * sh + 1:sh,
                    j * dw:j * dw + (out_w - 1) * sw + 1:sw] * kernel[i, j]
            out = tap if out is None else out + tap
    return out


class DepthwiseConv2D(nnx.Module):
    """A depthwise 2-D convolution with the parameters of `nnx.Conv(C, C, (kh, kw),
    feature_group_count=C)`: kernel (kh, kw, 1, C), lecun-normal, and bias (C,), zeros, so
    checkpoints of either load into the other."""

    def __init__(self, channels: int, kernel_size: Sequence[int], *,
                 strides: Sequence[int] = (1, 1), dilation: Sequence[int] = (1, 1),
                 padding: str = "SAME", use_bias: bool = True, dtype=None, rngs: nnx.Rngs):
        shape = (*kernel_size, 1, channels)
        self.kernel = nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), shape))
        self.bias = nnx.Param(jnp.zeros((channels,))) if use_bias else None
        self.strides, self.dilation = tuple(strides), tuple(dilation)
        self.padding, self.dtype = padding, dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...]
        x = x.astype(self.dtype or jnp.result_type(x.dtype, kernel.dtype))
        y = depthwise_conv2d(x, kernel[:, :, 0], strides=self.strides,
                             dilation=self.dilation, padding=self.padding)
        if self.bias is not None:
            y = y + self.bias[...].astype(y.dtype)
        return y
