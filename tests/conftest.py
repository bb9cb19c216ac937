"""Test setup: 8 host CPU devices, so every sharded path runs in CI; shared fixtures."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
from shared_paths import SHARED  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _eight_devices():
    assert jax.device_count() == 8, f"tests need 8 host devices, got {jax.device_count()}"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    assert SHARED.exists(), f"shared data folder missing: {SHARED}"
    return SHARED


@pytest.fixture(scope="session")
def cath_dir(tmp_path_factory):
    """CATH S20 built as a dataset once per session (2% held out; each record its own cluster)."""
    from data_fixtures import built

    return built(tmp_path_factory, "cath")


@pytest.fixture(scope="session")
def scope_dir(tmp_path_factory):
    """SCOPe ASTRAL 40 clustered by family (very skewed clusters), built once per session."""
    from data_fixtures import built

    return built(tmp_path_factory, "scope")


_CACHE_OPTIONS = {
    "jax_compilation_cache_dir": None,
    "jax_persistent_cache_min_compile_time_secs": 0,
    "jax_persistent_cache_min_entry_size_bytes": 0,
}


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory):
    """JAX's persistent compilation cache in a temporary folder while the module that asks for it
    runs (for modules whose runs compile the same programs again: a new ``jax.jit`` of the same
    step misses the in-memory cache); the previous settings afterwards (``reset_cache`` makes JAX
    read them again). Uses ``jax._src.compilation_cache.reset_cache``, a private function."""
    from jax._src import compilation_cache as cc

    old = {k: getattr(jax.config, k) for k in _CACHE_OPTIONS}
    new = dict(_CACHE_OPTIONS, jax_compilation_cache_dir=str(tmp_path_factory.mktemp("xla")))
    for k, v in new.items():
        jax.config.update(k, v)
    cc.reset_cache()
    try:
        yield
    finally:
        for k, v in old.items():
            jax.config.update(k, v)
        cc.reset_cache()
