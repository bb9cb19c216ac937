"""Test setup: 8 host CPU devices, so every sharded path runs in CI; shared fixtures."""

import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# JAX's persistent compilation cache, shared by this test run's processes: the pytest-xdist workers
# (one PYTEST_XDIST_TESTRUNUID) and every esmjax subprocess a test starts (they inherit the
# environment). Many tests compile the same small programs again (the same training step in a fresh
# CLI process, a new jax.jit of the same step), which the in-memory cache cannot serve. A size limit
# turns on JAX's file lock around reads and writes, so that concurrent processes never read a
# half-written entry. Removed at the end of the run.
_RUN = os.environ.get("PYTEST_XDIST_TESTRUNUID") or f"pid{os.getpid()}"
XLA_CACHE = os.path.join(tempfile.gettempdir(), f"esmjax-tests-xla-{_RUN}")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", XLA_CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(8 << 30))
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


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """A GCS emulator running for one test module; yields the environment that points every
    client at it (``gcs_emulator.running``). Skips where the test extra's gcsfs or emulator is
    missing."""
    pytest.importorskip("gcsfs")
    pytest.importorskip("gcp_storage_emulator")
    from gcs_emulator import running

    with running(tmp_path_factory.mktemp("staged")) as env:
        yield env


def pytest_sessionfinish(session):
    """The compilation cache goes with the run (by the xdist controller, or the only process)."""
    if not hasattr(session.config, "workerinput"):
        shutil.rmtree(XLA_CACHE, ignore_errors=True)
