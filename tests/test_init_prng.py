"""The state initialisation lowers threefry to GPU kernel calls (faster to compile), without
changing a single parameter value."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmx_jax.train.loop import _split, _threefry_as_kernel, setup
from mmx_jax.train.tasks.classification import ClassificationTask


def _draw(key):
    return jax.random.normal(key, (64, 32)) + jax.random.uniform(jax.random.fold_in(key, 1))


def test_the_context_switches_the_cuda_lowering_of_threefry_for_this_thread_only():
    """Cross-lowered for CUDA: the kernel call inside the context, inlined rounds outside."""
    key = jax.random.key(0)

    def cuda_text():
        return jax.jit(_draw).trace(key).lower(lowering_platforms=("cuda",)).as_text()

    plain = cuda_text()
    with _threefry_as_kernel():
        kernel = cuda_text()
    assert "custom_call @cu_threefry2x32" in kernel, kernel[:2000]
    assert "cu_threefry2x32" not in plain
    assert cuda_text() == plain  # restored on leaving the context


@pytest.mark.gpu
def test_init_state_is_the_same_with_the_kernel_lowering(tmp_path):
    """On the GPU: Run.init_state (kernel calls) equals the same jitted build with the inlined
    threefry, leaf for leaf and bit for bit."""
    from configs import vim2  # noqa: PLC0415

    config = vim2.get_config("variant=cifar,dataset=cifar10")
    run = setup(config, tmp_path, task=ClassificationTask.synthetic(config))
    kernel = run.init_state()
    plain = jax.jit(lambda: _split(*run._build())[1], out_shardings=run.shardings)()
    leaves_k, leaves_p = jax.tree.leaves(kernel), jax.tree.leaves(plain)
    assert len(leaves_k) == len(leaves_p) > 100
    for a, b in zip(leaves_k, leaves_p, strict=True):
        if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
