"""Shared test fixtures. Tests needing ../shared/data skip with a reason when it is absent."""

from __future__ import annotations

import os
import pathlib
import tempfile
import zlib

# Eight simulated CPU devices for the sharding tests; must be set before jax is imported.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()

# One persistent compilation cache for the whole run, its subprocesses included: many tests
# train the same small configs, and a warm cache turns a 10 s compilation into a read.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), f"mmx_jax-tests-jax-cache-{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = pathlib.Path(os.environ.get("MMX_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture
def rng(request) -> np.random.Generator:
    """A fresh generator per test, seeded from the test's name (reproducible, never zeros)."""
    seed = zlib.crc32(request.node.nodeid.encode())
    return np.random.default_rng(seed)


@pytest.fixture
def shared_data() -> pathlib.Path:
    """The ../shared/data folder beside the repository, or a skip saying why it is missing."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent (CI always provides it); "
                    "set MMX_SHARED_DATA to point at a copy")
    return SHARED_DATA
