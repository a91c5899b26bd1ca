"""ViM2: the hierarchical MambaMixer vision backbone (the MambaMixer paper's ViM2).

    image (B, H, W, 3) -> stem (s x s conv, stride s) + LayerNorm -> (B, H/s, W/s, C1)
    -> 4 stages; stage i at width C_i, between stages a 2x2 stride-2 conv to 2 C_i + LayerNorm
    -> LayerNorm -> global average pool -> Linear -> logits (B, num_classes) float32

A stage of depth (t, c) is a `MambaMixerStack` of c layers: each layer is t/c residual token
blocks (cross-scan selective mixing of the 2-D map) then one residual channel block (selective
mixing along channel groups, or a plain MLP for the ablation), with weighted averaging of all
earlier features of the stage. Drop-path grows linearly over the residual blocks, counted in
the order they run (token and channel blocks alike).

With the default stem (s = 4) the stages run at strides 4, 8, 16 and 32, so inputs must be
divisible by 32; `stem_stride=2` suits 32x32 images (stages at 16, 8, 4 and 2 pixels).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmx_jax.layers import (
    CROSS_SCAN,
    ChannelGroupMixer,
    CrossScanTokenMixer,
    DepthwiseConv2D,
    MambaMixerStack,
    ResidualBlock,
    make_norm,
)

CHANNEL_MIXERS = ("selective", "mlp")

#: The paper's sizes with our drop-path rates (Swin's for T/S/B, the recipe the
#: paper follows).
SIZES: dict[str, dict] = {
    "tiny": dict(widths=(96, 192, 384, 768), token_depths=(2, 2, 6, 2),
                 channel_depths=(1, 1, 3, 1), drop_path_rate=0.2),
    "small": dict(widths=(96, 192, 384, 768), token_depths=(2, 2, 18, 2),
                  channel_depths=(1, 1, 9, 1), drop_path_rate=0.3),
    "base": dict(widths=(128, 256, 512, 1024), token_depths=(2, 2, 18, 2),
                 channel_depths=(1, 1, 9, 1), drop_path_rate=0.5),
}
#: Parameter counts the paper reports at 224x224 and 1000 classes.
PAPER_PARAMS: dict[str, float] = {"tiny": 20e6, "small": 43e6, "base": 74e6}


class ChannelMLP(nnx.Module):
    """The MLP channel mixer of the ablation: Linear C -> width, GELU, Linear width -> C.

    It is `ChannelGroupMixer` (Linear C -> 2C, selective mixing of channel groups, Linear
    2C -> C) with the selective mixing replaced by a GELU, at the same width 2C.
    """

    def __init__(self, channels: int, *, width: int | None = None, dtype=None,
                 rngs: nnx.Rngs):
        width = width or 2 * channels
        self.up = nnx.Linear(channels, width, dtype=dtype, rngs=rngs)
        self.down = nnx.Linear(width, channels, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (..., C) -> (..., C)."""
        return self.down(jax.nn.gelu(self.up(x)))


STEMS = ("patch", "conv")


class Stem(nnx.Module):
    """The stem, (B, H, W, in_channels) -> (B, H/s, W/s, dim), ending in a norm.

    kind="patch": one s x s convolution of stride s (the paper's patch embedding).
    kind="conv" (our small-image option): two 3x3 convolutions with a norm and a GELU between
    them, to dim/2 channels at stride s/2 and then to dim at stride 2 (stride 1 and 1 when
    s = 1). On 32x32 images with s = 2 the first sees every pixel with overlapping windows
    instead of cutting the image into disjoint 2x2 patches.
    """

    def __init__(self, in_channels: int, dim: int, *, stride: int, kind: str = "patch",
                 norm: str = "layernorm", dtype=None, rngs: nnx.Rngs):
        if kind not in STEMS:
            raise ValueError(f"Stem: kind={kind!r}, wanted one of {STEMS}")
        if kind == "conv" and stride > 1 and stride % 2:
            raise ValueError(f"Stem: kind='conv' wants an even stride (or 1), got {stride}")
        if kind == "patch":
            self.convs = nnx.List([nnx.Conv(in_channels, dim, (stride, stride),
                                            strides=(stride, stride), padding="VALID",
                                            dtype=dtype, rngs=rngs)])
            self.norms = nnx.List([make_norm(norm, dim, dtype=dtype, rngs=rngs)])
        else:
            strides = (stride // 2, 2) if stride > 1 else (1, 1)
            dims = (in_channels, max(dim // 2, 1), dim)
            self.convs = nnx.List([
                nnx.Conv(dims[i], dims[i + 1], (3, 3), strides=(s, s), padding="SAME",
                         dtype=dtype, rngs=rngs) for i, s in enumerate(strides)])
            self.norms = nnx.List([make_norm(norm, d, dtype=dtype, rngs=rngs)
                                   for d in dims[1:]])

    def __call__(self, x: jax.Array) -> jax.Array:
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms, strict=True)):
            x = norm(conv(x))
            if i + 1 < len(self.convs):
                x = jax.nn.gelu(x)
        return x


DOWNSAMPLES = ("conv", "separable")


class Downsample(nnx.Module):
    """2x2 stride-2 downsampling to `out_dim` channels, then a norm: (B, H, W, C) ->
    (B, H/2, W/2, out_dim).

    kind="conv": one full 2x2 convolution (4 C out_dim weights).  kind="separable": a depthwise
    2x2 convolution then a pointwise Linear C -> out_dim (C out_dim + 4 C weights).
    """

    def __init__(self, dim: int, out_dim: int, *, kind: str = "conv", norm: str = "layernorm",
                 dtype=None, rngs: nnx.Rngs):
        if kind not in DOWNSAMPLES:
            raise ValueError(f"Downsample: kind={kind!r}, wanted one of {DOWNSAMPLES}")
        separable = kind == "separable"
        self.conv = (DepthwiseConv2D(dim, (2, 2), strides=(2, 2), padding="VALID", dtype=dtype,
                                     rngs=rngs) if separable else
                     nnx.Conv(dim, out_dim, (2, 2), strides=(2, 2), padding="VALID", dtype=dtype,
                              rngs=rngs))
        self.pointwise = nnx.Linear(dim, out_dim, dtype=dtype, rngs=rngs) if separable else None
        self.norm = make_norm(norm, out_dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv(x)
        if self.pointwise is not None:
            x = self.pointwise(x)
        return self.norm(x)


class ViM2(nnx.Module):
    """Vision MambaMixer backbone: classification logits or the four stage feature maps.

    Args:
      num_classes: size of the classification head (0: no head, `features` only).
      widths: C_i of the four stages (each 2x the previous in the paper's models).
      token_depths, channel_depths: (t_i, c_i) per stage: c_i MambaMixer layers, each with
        t_i / c_i token blocks and one channel block.
      in_channels: image channels.
      stem_stride: the stem's patch size and stride (4; 2 for 32x32 images).
      stem: "patch" (an s x s patch embedding) or "conv" (two overlapping 3x3 convolutions,
        `Stem`).
      downsample: "separable" (depthwise 2x2 stride 2 + Linear C -> 2C) or "conv" (a full
        2x2 stride-2 conv); both followed by the norm.
      expand: token mixer inner width E = expand * C.
      state_dim: N of the token mixer's S6.  dt_rank: its step-size rank, one value for every
        stage, or "auto" for Mamba's ceil(C/16) per stage.
      conv_size: depthwise conv of the token mixer.  scans: its scan orders (cross-scan).
      channel_mixer: "selective" (`ChannelGroupMixer`) or "mlp" (`ChannelMLP`, the ablation).
      channel_group_size: F, features per channel group (the groups G = 2C / F are scanned).
      channel_expand, channel_state_dim, channel_conv_width: the S6 mixer along the groups
        (inner width channel_expand * F, state size, causal conv width of each direction).
      quasi_separable_channels: use the quasi-separable S6 along the channel groups.
      norm: "layernorm" or "rmsnorm" for every block, the stem, downsampling and the head.
      drop_path_rate: stochastic depth of the last residual block (0 for the first, linear in
        between).  dropout: inside residual branches.  head_dropout: before the head.
      learnable_averaging: train the weighted-averaging scalars of each stage.
      scan_impl: `selective_scan` implementation of every S6.
      scan_layout: how the token mixers scan the 2-D map (`layers.SCAN_LAYOUTS`): "walks" (the
        map read in place by the walks, `selective_scan_2d`) or "permuted" (a permuted copy
        per scan order and the 1-D scan); likewise the quasi-separable channel mixers' two
        directions. The same model either way: the choice is speed.
      dtype: compute dtype (e.g. bfloat16); parameters stay float32, logits are float32.

    Parameter budget (our choice of the details the paper leaves open): with these depths the
    paper's 20M / 43M / 74M cannot all be met by one design (S - T is 6 layers at width 384,
    and T's stage 4 alone is 4x such a layer), so the defaults balance the three at about 9 %:
    separable downsampling (a full 2x2 conv costs T a further 1.2M) and dt_rank 22 at every
    stage (Mamba's ceil(C/16) gives T 22.5M, +12 %). N stays 16 for the Pallas kernels.
    """

    def __init__(self, *, num_classes: int = 1000, widths: Sequence[int] = (96, 192, 384, 768),
                 token_depths: Sequence[int] = (2, 2, 6, 2),
                 channel_depths: Sequence[int] = (1, 1, 3, 1), in_channels: int = 3,
                 stem_stride: int = 4, stem: str = "patch", downsample: str = "separable",
                 expand: int = 2,
                 state_dim: int = 16, dt_rank: int | str = 22, conv_size: int = 3,
                 scans: Sequence[str] = CROSS_SCAN, channel_mixer: str = "selective",
                 channel_group_size: int = 16, channel_expand: int = 2,
                 channel_state_dim: int = 16, channel_conv_width: int = 4,
                 quasi_separable_channels: bool = False, norm: str = "layernorm",
                 drop_path_rate: float = 0.2, dropout: float = 0.0, head_dropout: float = 0.0,
                 learnable_averaging: bool = True, scan_impl: str = "auto",
                 scan_layout: str = "walks", dtype=None, rngs: nnx.Rngs):
        widths, token_depths, channel_depths = (tuple(int(v) for v in seq) for seq in
                                                (widths, token_depths, channel_depths))
        if not len(widths) == len(token_depths) == len(channel_depths) >= 1:
            raise ValueError(f"{type(self).__name__}: widths {widths}, token_depths "
                             f"{token_depths} and channel_depths {channel_depths} must have "
                             "the same (non-zero) length")
        for t, c in zip(token_depths, channel_depths, strict=True):
            if c < 1 or t < 1 or t % c:
                raise ValueError(f"{type(self).__name__}: stage depth (t={t}, c={c}) wanted "
                                 "c >= 1 and t divisible by c")
        if channel_mixer not in CHANNEL_MIXERS:
            raise ValueError(f"{type(self).__name__}: channel_mixer={channel_mixer!r}, wanted "
                             f"one of {CHANNEL_MIXERS}")
        if stem_stride < 1:
            raise ValueError(f"{type(self).__name__}: stem_stride={stem_stride}, wanted >= 1")
        self.num_classes, self.widths, self.stem_stride = num_classes, widths, stem_stride
        self.token_depths, self.channel_depths = token_depths, channel_depths
        self.dtype = dtype
        self.mixer_args = dict(expand=expand, state_dim=state_dim, dt_rank=dt_rank,
                               conv_size=conv_size, scans=tuple(scans), impl=scan_impl,
                               scan_layout=scan_layout, dtype=dtype)
        self.channel_args = dict(kind=channel_mixer, group_size=channel_group_size,
                                 expand=channel_expand, state_dim=channel_state_dim,
                                 conv_width=channel_conv_width,
                                 quasi_separable=quasi_separable_channels, impl=scan_impl,
                                 scan_layout=scan_layout, dtype=dtype)

        self.stem = Stem(in_channels, widths[0], stride=stem_stride, kind=stem, norm=norm,
                         dtype=dtype, rngs=rngs)
        num_blocks = sum(token_depths) + sum(channel_depths)
        rates = iter(np.linspace(0.0, drop_path_rate, num_blocks).tolist())
        stages, downsamples = [], []
        for i, (dim, t, c) in enumerate(zip(widths, token_depths, channel_depths, strict=True)):
            if i:
                downsamples.append(Downsample(widths[i - 1], dim, kind=downsample, norm=norm,
                                              dtype=dtype, rngs=rngs))
            # Rates in execution order: layer l's t/c token blocks, then its channel block.
            layer_rates = [[next(rates) for _ in range(t // c + 1)] for _ in range(c)]

            def block(mixer, rate, dim=dim):
                return ResidualBlock(dim, mixer, norm=norm, dropout=dropout, drop_path=rate,
                                     dtype=dtype, rngs=rngs)

            def token_blocks(layer, dim=dim, layer_rates=layer_rates, block=block):
                return nnx.Sequential(*(block(self.make_token_mixer(dim, rngs=rngs), rate)
                                        for rate in layer_rates[layer][:-1]))

            def channel_block(layer, dim=dim, layer_rates=layer_rates, block=block):
                return block(self.make_channel_mixer(dim, rngs=rngs), layer_rates[layer][-1])

            stages.append(MambaMixerStack(c, token_blocks, channel_block,
                                          learnable_averaging=learnable_averaging))
        self.stages = nnx.List(stages)
        self.downsamples = nnx.List(downsamples)
        self.head_norm = make_norm(norm, widths[-1], dtype=dtype, rngs=rngs)
        self.head_dropout = nnx.Dropout(head_dropout, rngs=rngs)
        self.head = (nnx.Linear(widths[-1], num_classes, dtype=dtype, rngs=rngs)
                     if num_classes else None)

    # Factories that the family members (ViQS) override.

    def make_token_mixer(self, dim: int, *, rngs: nnx.Rngs) -> nnx.Module:
        """The token mixer of one token block at width `dim`: (B, H, W, dim) -> same."""
        return CrossScanTokenMixer(dim, rngs=rngs, **self.mixer_args)

    def make_channel_mixer(self, dim: int, *, rngs: nnx.Rngs) -> nnx.Module:
        """The channel mixer of one channel block at width `dim`: (..., dim) -> same."""
        args = dict(self.channel_args)
        if args.pop("kind") == "mlp":
            return ChannelMLP(dim, width=2 * dim, dtype=args["dtype"], rngs=rngs)
        return ChannelGroupMixer(dim, rngs=rngs, **args)

    @property
    def min_input_multiple(self) -> int:
        """Input height and width must be multiples of this (stem stride x 2^(stages-1))."""
        return self.stem_stride * 2 ** (len(self.widths) - 1)

    def features(self, x: jax.Array) -> list[jax.Array]:
        """x: (B, H, W, in_channels) -> the stage outputs [(B, H/s_i, W/s_i, C_i)] at strides
        s_i = stem_stride * 2^i (4, 8, 16, 32 by default), in the compute dtype, before any
        head norm (dense-prediction heads add their own)."""
        multiple = self.min_input_multiple
        if x.ndim != 4 or x.shape[1] % multiple or x.shape[2] % multiple:
            raise ValueError(f"{type(self).__name__}: input has shape {x.shape}, wanted "
                             f"(batch, H, W, channels) with H and W divisible by {multiple}")
        if self.dtype is not None:
            x = x.astype(self.dtype)
        h = self.stem(x)
        outputs = []
        for i, stage in enumerate(self.stages):
            if i:
                h = self.downsamples[i - 1](h)
            h = stage(h)
            outputs.append(h)
        return outputs

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (B, H, W, in_channels) images -> logits (B, num_classes) float32 (or the pooled
        (B, C_last) features when num_classes is 0)."""
        h = self.head_norm(self.features(x)[-1]).mean(axis=(1, 2))
        h = self.head_dropout(h)
        if self.head is not None:
            h = self.head(h)
        return h.astype(jnp.float32)
