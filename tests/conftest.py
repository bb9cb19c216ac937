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
