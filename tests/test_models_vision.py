"""Vision backbones (ViM2, ViQS) and the Switch of Scans mixer: registry, parameter counts,
shapes and strides, the gate's selection and gradients, and overfitting real CIFAR-10 images.

    pytest tests/test_models_vision.py -s -k param_counts     # prints the parameter table
"""

from __future__ import annotations

import io
import pathlib
import tarfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from PIL import Image

from mmx_jax.layers import (
    ALL_ORDERS,
    S6,
    ChannelGroupMixer,
    CrossScanTokenMixer,
    SwitchOfScansTokenMixer,
    scan_order,
    shift_right,
)
from mmx_jax.models import ViM2, ViQS, count_params, create_model, list_models
from mmx_jax.models.vim2 import PAPER_PARAMS, ChannelMLP
from mmx_jax.ssm import selective_scan_sequential

# Tiny models for behaviour tests: every code path of the full ones, a fraction of the compile.
TINY = dict(widths=(8, 16, 16, 16), token_depths=(2, 1, 2, 1), channel_depths=(1, 1, 1, 1),
            state_dim=4, dt_rank="auto", channel_group_size=4, channel_state_dim=4,
            num_classes=5, drop_path_rate=0.0, scan_impl="sequential")
CIFAR_ARCHIVE = "images/cifar10_jpg.tar.xz"


def normal(rng, *shape):
    return jnp.asarray(rng.normal(size=shape).astype(np.float32))


def modules_of(module, kind) -> list:
    return [m for _, m in nnx.iter_graph(module) if isinstance(m, kind)]


def split_apply(model):
    """A jitted `fn(x) -> model(x), model.features(x)` on the split model."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def apply(state, x):
        m = nnx.merge(graphdef, state)
        return m(x), m.features(x)

    return lambda x: apply(state, x)


@pytest.fixture(scope="module")
def tiny_vim2():
    return create_model("vim2_tiny", **TINY)


# --- registry and parameter counts -----------------------------------------------------------


def test_registry_names_every_vision_model():
    names = set(list_models())
    for size in ("tiny", "small", "base"):
        assert {f"vim2_{size}", f"vim2_{size}_mlp", f"viqs_{size}"} <= names


@pytest.mark.slow
def test_param_counts_of_the_full_size_models():
    """Counted on abstract shapes (nothing initialised); ViM2 within 10 % of the paper."""
    rows = []
    for family in ("vim2", "viqs"):
        for size, paper in PAPER_PARAMS.items():
            model = nnx.eval_shape(lambda f=family, s=size: create_model(f"{f}_{s}"))
            assert isinstance(model, ViQS if family == "viqs" else ViM2)
            rows.append((f"{family}_{size}", count_params(model), paper))
    print("\n| model | params | paper | difference |\n|---|---|---|---|")
    for name, count, paper in rows:
        print(f"| {name} | {count / 1e6:.2f}M | {paper / 1e6:.0f}M | "
              f"{100 * (count / paper - 1):+.1f} % |")
    counts = {name: count for name, count, _ in rows}
    for size, paper in PAPER_PARAMS.items():
        assert abs(counts[f"vim2_{size}"] / paper - 1) < 0.10, (size, counts)
        # Switch of Scans adds the gate and a second S6 per slot: more, but not 2x.
        assert 1.0 < counts[f"viqs_{size}"] / counts[f"vim2_{size}"] < 1.3, (size, counts)
    assert counts["vim2_tiny"] < counts["vim2_small"] < counts["vim2_base"]


def test_mlp_ablation_has_no_selective_channel_mixer():
    selective = nnx.eval_shape(lambda: create_model("vim2_tiny", **TINY))
    mlp = nnx.eval_shape(lambda: create_model("vim2_tiny_mlp", **TINY))
    channel_blocks = [b for stage in mlp.stages for b in stage.channel_blocks]
    assert channel_blocks and all(isinstance(b.mixer, ChannelMLP) for b in channel_blocks)
    assert not any(modules_of(b, S6) for b in channel_blocks)
    assert all(modules_of(b, S6) for stage in mlp.stages for b in stage.token_blocks)
    # The same width 2C: exactly the group mixers' S6 machinery is gone.
    groups = sum(count_params(m.groups) for m in modules_of(selective, ChannelGroupMixer))
    assert count_params(selective) - count_params(mlp) == groups > 0


def test_drop_path_grows_linearly_over_the_blocks_in_execution_order():
    model = nnx.eval_shape(lambda: create_model("vim2_tiny", **{**TINY,
                                                                "drop_path_rate": 0.3}))
    rates = []
    for stage in model.stages:
        for tokens, channel in zip(stage.token_blocks, stage.channel_blocks, strict=True):
            rates += [b.drop_path.dropout.rate for b in tokens.layers]
            rates.append(channel.drop_path.dropout.rate)
    assert len(rates) == sum(TINY["token_depths"]) + sum(TINY["channel_depths"])
    np.testing.assert_allclose(rates, np.linspace(0, 0.3, len(rates)), atol=1e-7)


# --- shapes, strides and dtypes --------------------------------------------------------------


def test_tiny_vim2_logits_and_feature_strides(rng, tiny_vim2):
    model = tiny_vim2
    assert len(modules_of(model, CrossScanTokenMixer)) == sum(TINY["token_depths"])
    apply = split_apply(model)
    logits, feats = apply(normal(rng, 2, 64, 64, 3))
    assert logits.shape == (2, 5) and logits.dtype == jnp.float32
    assert np.all(np.isfinite(logits))
    assert [f.shape for f in feats] == [(2, 64 // s, 64 // s, c)
                                        for s, c in zip((4, 8, 16, 32), TINY["widths"],
                                                        strict=True)]
    # Any size divisible by 32, not only squares (shapes traced, nothing compiled).
    logits, feats = jax.eval_shape(lambda v: (model(v), model.features(v)),
                                   jax.ShapeDtypeStruct((1, 96, 64, 3), jnp.float32))
    assert logits.shape == (1, 5) and logits.dtype == jnp.float32
    assert [f.shape[1:3] for f in feats] == [(24, 16), (12, 8), (6, 4), (3, 2)]
    with pytest.raises(ValueError, match=r"input has shape \(1, 80, 64, 3\).*divisible by 32"):
        model(jnp.zeros((1, 80, 64, 3)))


def test_viqs_in_bfloat16_with_the_small_image_stem(rng):
    """ViQS end to end under jit: bfloat16 activations, float32 parameters and logits."""
    model = ViQS(**{**TINY, "stem_stride": 2}, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    mixers = modules_of(model, SwitchOfScansTokenMixer)
    assert len(mixers) == sum(TINY["token_depths"])
    assert all(m.quasi_separable and m.top_k == 4 and m.scans == ALL_ORDERS for m in mixers)
    assert all(m.groups.mixer.quasi_separable for m in modules_of(model, ChannelGroupMixer))
    params = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert all(p.dtype == jnp.float32 for p in params)
    logits, feats = split_apply(model)(normal(rng, 2, 32, 32, 3))
    assert logits.dtype == jnp.float32 and logits.shape == (2, 5)
    assert np.all(np.isfinite(logits))
    assert [f.shape[1:3] for f in feats] == [(16, 16), (8, 8), (4, 4), (2, 2)]
    assert all(f.dtype == jnp.bfloat16 for f in feats)


@pytest.mark.parametrize("stride,sizes", [(2, [(16, 16), (8, 8), (4, 4), (2, 2)]),
                                          (4, [(8, 8), (4, 4), (2, 2), (1, 1)])])
@pytest.mark.slow
def test_conv_stem_keeps_the_stage_strides(rng, stride, sizes):
    """The overlapping 3x3 conv stem: same stage shapes as the patch stem of that stride, two
    convolutions (to C/2, then C), and every output pixel of the first stage depends on a
    window wider than its stride (the patch stem's depends on its own s x s patch only)."""
    args = {**TINY, "stem_stride": stride}
    conv = ViM2(**args, stem="conv", rngs=nnx.Rngs(0))
    patch = ViM2(**args, stem="patch", rngs=nnx.Rngs(0))
    assert [c.kernel.shape for c in conv.stem.convs] == [(3, 3, 3, 4), (3, 3, 4, 8)]
    x = normal(rng, 1, 32, 32, 3)
    for model in (conv, patch):
        assert [f.shape[1:3] for f in model.features(x)] == sizes

    def receptive_field(model):
        grad = jax.grad(lambda v: model.stem(v)[0, 4, 4].sum())(x)
        rows = np.nonzero(np.abs(np.asarray(grad[0])).sum(axis=(1, 2)))[0]
        return rows.max() - rows.min() + 1

    assert receptive_field(patch) == stride
    assert receptive_field(conv) > stride
    with pytest.raises(ValueError, match="Stem: kind=.conv. wants an even stride"):
        ViM2(**{**TINY, "stem_stride": 3}, stem="conv", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="kind='pixel'"):
        ViM2(**TINY, stem="pixel", rngs=nnx.Rngs(0))


# --- Switch of Scans -------------------------------------------------------------------------


def qs_slot_reference(mixer, u, order, slot):
    """Slot `slot` of a quasi-separable Switch of Scans mixer along one named `order`, in
    NumPy-indexed row-major output: (B, H*W, E) from the conv output u (B, H, W, E)."""
    b, h, w, e = u.shape
    perm = scan_order(order, h, w)
    seq = u.reshape(b, h * w, e)[:, perm]
    s6 = mixer.s6
    r, n = s6.dt_rank, s6.state_dim
    A = -jnp.exp(s6.A_log[...][slot])

    def scan(k, x):
        x_dbl = x @ s6.x_proj[...][k]
        return selective_scan_sequential(
            x, x_dbl[..., :r] @ s6.dt_proj[...][k], A, x_dbl[..., r:r + n],
            x_dbl[..., r + n:], delta_bias=s6.dt_bias[...][k], delta_softplus=True)

    fwd = shift_right(scan(2 * slot, seq))
    bwd = jnp.flip(shift_right(scan(2 * slot + 1, jnp.flip(seq, 1))), 1)
    y_scan = np.asarray(fwd + bwd)
    y = np.empty_like(y_scan)
    y[:, perm] = y_scan  # back to row-major
    return y + np.asarray(mixer.D[...][slot] * u.reshape(b, h * w, e))


def test_top_k_picks_the_highest_logits(rng):
    mixer = SwitchOfScansTokenMixer(8, state_dim=3, rngs=nnx.Rngs(0))
    logits = normal(rng, 5, len(ALL_ORDERS))
    indices, weights = mixer.select(logits)
    want = np.argsort(-np.asarray(logits), axis=1)[:, :4]
    np.testing.assert_array_equal(indices, want)
    top = np.take_along_axis(np.asarray(logits, np.float64), want, axis=1)
    np.testing.assert_allclose(weights, np.exp(top) / np.exp(top).sum(1, keepdims=True),
                               rtol=1e-5)


def test_switch_of_scans_runs_the_chosen_orders_in_their_slots(rng):
    mixer = SwitchOfScansTokenMixer(8, state_dim=3, top_k=3, rngs=nnx.Rngs(1))
    mixer.D[...] = normal(rng, 3, 16)
    x = normal(rng, 2, 4, 5, 8)
    # Force the gate: no dependence on x, logits = bias; the top 3 are scans 6, 1, 4.
    bias = np.array([0.1, 2.0, -1.0, 0.5, 1.5, 0.0, 3.0, -2.0], np.float32)
    mixer.scan_gate.proj.kernel[...] = jnp.zeros_like(mixer.scan_gate.proj.kernel[...])
    mixer.scan_gate.proj.bias[...] = jnp.asarray(bias)
    chosen = (6, 1, 4)
    weights = np.exp(bias[list(chosen)]) / np.exp(bias[list(chosen)]).sum()
    u = jax.nn.silu(mixer.conv(mixer.in_proj(x)))
    y = sum(weights[j] * qs_slot_reference(mixer, u, ALL_ORDERS[c], j)
            for j, c in enumerate(chosen))
    want = mixer.out_proj(jax.nn.silu(mixer.gate_proj(x)) * jnp.asarray(y).reshape(u.shape))
    np.testing.assert_allclose(mixer(x), want, rtol=1e-4, atol=1e-5)
    # Per sample: a different set of orders (and weights) for each sample of the batch.
    per_sample = np.array([[2, 7, 0], [5, 3, 6]])
    w = jax.nn.softmax(normal(rng, 2, 3))
    got = mixer.mix(mixer.in_proj(x), jnp.asarray(per_sample), w)
    for i in range(2):
        ref = sum(w[i, j] * qs_slot_reference(mixer, u[i:i + 1], ALL_ORDERS[c], j)
                  for j, c in enumerate(per_sample[i]))
        np.testing.assert_allclose(got[i], ref[0].reshape(4, 5, 16), rtol=1e-4, atol=1e-5)


def test_one_directional_slots_follow_their_orders(rng):
    mixer = SwitchOfScansTokenMixer(8, state_dim=3, top_k=2, quasi_separable=False,
                                    rngs=nnx.Rngs(2))
    assert mixer.s6.num_directions == 2 and mixer.D is None
    x = normal(rng, 1, 3, 4, 8)
    u = jax.nn.silu(mixer.conv(mixer.in_proj(x))).reshape(1, 12, 16)
    s6, (r, n) = mixer.s6, (mixer.s6.dt_rank, mixer.s6.state_dim)
    want = np.zeros((1, 12, 16), np.float32)
    for j, (c, wj) in enumerate(((3, 0.7), (4, 0.3))):
        perm = scan_order(ALL_ORDERS[c], 3, 4)
        seq = u[:, perm]
        x_dbl = seq @ s6.x_proj[...][j]
        y = selective_scan_sequential(
            seq, x_dbl[..., :r] @ s6.dt_proj[...][j], -jnp.exp(s6.A_log[...][j]),
            x_dbl[..., r:r + n], x_dbl[..., r + n:], D=s6.D[...][j],
            delta_bias=s6.dt_bias[...][j], delta_softplus=True)
        want[:, perm] += wj * np.asarray(y)
    got = mixer.mix(mixer.in_proj(x), jnp.asarray([[3, 4]]), jnp.asarray([[0.7, 0.3]]))
    np.testing.assert_allclose(got.reshape(1, 12, 16), want, rtol=1e-4, atol=1e-5)


def test_the_gate_receives_gradients(rng):
    mixer = SwitchOfScansTokenMixer(8, state_dim=3, rngs=nnx.Rngs(3))
    x = normal(rng, 2, 4, 4, 8)
    target = normal(rng, 2, 4, 4, 8)
    grads = nnx.jit(nnx.grad(lambda m: jnp.mean((m(x) - target) ** 2)))(mixer)
    kernel, bias = grads.scan_gate.proj.kernel[...], grads.scan_gate.proj.bias[...]
    assert np.all(np.isfinite(kernel)) and np.abs(np.asarray(kernel)).max() > 1e-6
    # Only the chosen logits enter the softmax: the unchosen scans get exactly zero.
    chosen = np.unique(np.asarray(mixer.select(mixer.scan_gate(x))[0]))
    unchosen = np.setdiff1d(np.arange(len(ALL_ORDERS)), chosen)
    assert np.abs(np.asarray(bias)[chosen]).max() > 1e-7
    np.testing.assert_array_equal(np.asarray(bias)[unchosen], 0.0)
    assert np.abs(np.asarray(grads.scan_gate.convs[0].kernel[...])).max() > 0


# --- the two scan layouts ("walks" and "permuted") compute the same ---------------------------


@nnx.jit
def output_and_grads(module, x):
    """module(x) and the gradients of a fixed random projection of it w.r.t. every parameter
    (jitted: eager scans are slow)."""
    out_shape = nnx.eval_shape(lambda m: m(x), module).shape
    weights = jax.random.normal(jax.random.key(0), out_shape, jnp.float32)

    def loss(m):
        y = m(x)
        return jnp.sum(y.astype(jnp.float32) * weights), y

    (_, y), grads = nnx.value_and_grad(loss, has_aux=True)(module)
    return y, jax.tree.leaves(nnx.state(grads, nnx.Param))


def assert_same(a, b, rtol, atol=0.0):
    """|a - b| <= rtol |b| + atol in the 2-norm."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape
    err, scale = np.linalg.norm(a - b), np.linalg.norm(b)
    assert err <= rtol * scale + atol, f"error {err:.3g}, norm {scale:.3g}"


def assert_same_grads(grads, grads_ref, rtol, global_rtol):
    """Each parameter's gradient within `rtol` of its own norm, or within `global_rtol` of
    the whole gradient's (a parameter whose gradient nearly vanishes, as the gate's at a 1x2
    map, keeps only float32 noise)."""
    total = np.sqrt(sum(float(np.sum(np.asarray(g, np.float64) ** 2)) for g in grads_ref))
    for g, g_ref in zip(grads, grads_ref, strict=True):
        assert_same(g, g_ref, rtol, global_rtol * total)


def assert_layouts_agree(make, x):
    """`make(scan_layout)` twice, from the same seed: the same parameters, the same output
    (1e-5) and the same parameter gradients (1e-4 each, or 1e-6 of the whole: the gate's go
    through a softmax of the slots' weights, whose Jacobian cancels most of its float32
    inputs)."""
    walks, permuted = make("walks"), make("permuted")
    for p, q in zip(jax.tree.leaves(nnx.state(walks, nnx.Param)),
                    jax.tree.leaves(nnx.state(permuted, nnx.Param)), strict=True):
        np.testing.assert_array_equal(p, q)
    (y, grads), (y_ref, grads_ref) = output_and_grads(walks, x), output_and_grads(permuted, x)
    assert_same(y, y_ref, 1e-5)
    assert_same_grads(grads, grads_ref, 1e-4, 1e-6)


MIXERS = {
    "cross_scan": lambda layout, **kw: CrossScanTokenMixer(
        8, state_dim=3, scan_layout=layout, rngs=nnx.Rngs(0), **kw),
    "switch_qs": lambda layout, **kw: SwitchOfScansTokenMixer(
        8, state_dim=3, top_k=3, scan_layout=layout, rngs=nnx.Rngs(1), **kw),
    "switch_one_directional": lambda layout, **kw: SwitchOfScansTokenMixer(
        8, state_dim=3, top_k=2, quasi_separable=False, scan_layout=layout,
        rngs=nnx.Rngs(2), **kw),
    # QS along 5 channel groups of 4 features (ViQS's channel mixer)
    "channel_groups_qs": lambda layout, **kw: ChannelGroupMixer(
        10, group_size=4, state_dim=3, quasi_separable=True, scan_layout=layout,
        rngs=nnx.Rngs(3), **kw),
}
#: Their inputs: odd maps with H != W (the gate's choice differing between samples), and
#: (batch, tokens, channels) for the channel mixer.
MIXER_INPUTS = {"channel_groups_qs": (2, 7, 10)}


@pytest.mark.slow
@pytest.mark.parametrize("mixer", list(MIXERS))
def test_scan_layouts_agree_in_the_mixers(rng, mixer):
    assert_layouts_agree(lambda layout: MIXERS[mixer](layout, impl="sequential"),
                         normal(rng, *MIXER_INPUTS.get(mixer, (2, 5, 7, 8))))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vim2_tiny", "viqs_tiny"])
def test_scan_layouts_give_the_same_model(rng, name):
    """Logits and every parameter gradient of the tiny models (float32, one token and one
    channel mixer a stage) on 32x64 images: maps of 8x16 down to 1x2."""
    tiny = dict(TINY, token_depths=(1, 1, 1, 1))
    assert_layouts_agree(lambda layout: create_model(name, **tiny, scan_layout=layout),
                         normal(rng, 2, 32, 64, 3))


@pytest.mark.slow
@pytest.mark.parametrize("mixer", ["cross_scan", "switch_qs", "channel_groups_qs"])
def test_walk_kernels_in_the_mixers(rng, mixer):
    """The mixers on the Pallas walk kernels (interpret mode) against the permuted layout path
    on the sequential scan: outputs and parameter gradients."""
    walks = MIXERS[mixer]("walks", impl="pallas")
    permuted = MIXERS[mixer]("permuted", impl="sequential")
    x = normal(rng, *{"channel_groups_qs": (2, 3, 10)}.get(mixer, (2, 3, 4, 8)))
    (y, grads), (y_ref, grads_ref) = output_and_grads(walks, x), output_and_grads(permuted, x)
    assert_same(y, y_ref, 2e-5)
    assert_same_grads(grads, grads_ref, 1e-4, 1e-6)


def test_scan_layout_is_checked():
    with pytest.raises(ValueError, match="scan_layout='copies', wanted one of"):
        CrossScanTokenMixer(8, scan_layout="copies", rngs=nnx.Rngs(0))


# --- learning on real images -----------------------------------------------------------------


def cifar_train_images(shared_data: pathlib.Path, classes: tuple[str, ...], per_class: int):
    """The first `per_class` train JPEGs of each class, decoded: (N, 32, 32, 3) uint8 and
    (N,) labels. Streams the archive (the test split comes first, then train by class)."""
    images, labels = [], []
    counts = dict.fromkeys(classes, 0)
    with tarfile.open(shared_data / CIFAR_ARCHIVE, "r|xz") as tar:
        for member in tar:
            parts = member.name.split("/")
            if len(parts) == 4 and parts[1] == "train" and member.isfile():
                if counts.get(parts[2], per_class) < per_class:
                    with Image.open(io.BytesIO(tar.extractfile(member).read())) as im:
                        images.append(np.asarray(im.convert("RGB")))
                    labels.append(classes.index(parts[2]))
                    counts[parts[2]] += 1
                if all(c == per_class for c in counts.values()):
                    break
    return np.stack(images), np.asarray(labels, np.int32)


@pytest.mark.slow
def test_tiny_vim2_overfits_a_few_real_cifar_images(shared_data):
    classes = ("airplane", "automobile", "bird", "cat")
    images, labels = cifar_train_images(shared_data, classes, per_class=4)
    assert images.shape == (16, 32, 32, 3) and images.std() > 10
    x = jnp.asarray((images.astype(np.float32) / 255.0 - 0.5) / 0.25)
    y = jnp.asarray(labels)
    # Two stages keep the compile short; every kind of block is there (t/c = 2).
    model = create_model("vim2_tiny", **{**TINY, "widths": (8, 16), "token_depths": (2, 2),
                                         "channel_depths": (1, 1), "stem_stride": 2,
                                         "num_classes": 4})
    optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
        def loss_fn(m):
            return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer)) for _ in range(30)]
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.5 * losses[0], losses
