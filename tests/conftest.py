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
from support.shared_paths import SHARED  # noqa: E402


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
    from support.data_fixtures import built

    return built(tmp_path_factory, "cath")


@pytest.fixture(scope="session")
def scope_dir(tmp_path_factory):
    """SCOPe ASTRAL 40 clustered by family (very skewed clusters), built once per session."""
    from support.data_fixtures import built

    return built(tmp_path_factory, "scope")


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory) -> Path:
    """A tiny ESM-2 (random weights, seed 0) as a converted checkpoint folder, written once per
    session; tests read it and write elsewhere."""
    from flax import nnx

    from esmjax.config import ESM2_PRESETS
    from esmjax.io import checkpoint
    from esmjax.models.esm2 import ESM2

    path = tmp_path_factory.mktemp("ck") / "tiny"
    model = ESM2(ESM2_PRESETS["tiny"], rngs=nnx.Rngs(0))
    checkpoint.save_converted(path, model.cfg, checkpoint.params_numpy(model))
    return path


@pytest.fixture(scope="session")
def dataset(tmp_path_factory, shared_data) -> Path:
    """The first 800 records of CATH S20 as a training dataset (5% held out), built once per
    session: the data of the training-run tests."""
    from support.data_fixtures import cath_head

    from esmjax.data.build import build_dataset

    d = tmp_path_factory.mktemp("train_data")
    build_dataset([cath_head(d / "small.fa", 800)], d / "ds", val_fraction=0.05)
    return d / "ds"


@pytest.fixture(scope="session")
def files(tmp_path_factory, shared_data, ckpt) -> Path:
    """The fine-tuning tests' inputs, written once per session: the tiny backbone (``bb``, a copy
    of ``ckpt``) and the labelled files of ``data_fixtures.finetune_inputs``."""
    from support.data_fixtures import finetune_inputs

    d = tmp_path_factory.mktemp("finetune")
    shutil.copytree(ckpt, d / "bb")
    return finetune_inputs(d)


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """A GCS emulator running for one test module; yields the environment that points every
    client at it (``gcs_emulator.running``). Skips where the test extra's gcsfs or emulator is
    missing."""
    pytest.importorskip("gcsfs")
    pytest.importorskip("gcp_storage_emulator")
    from support.gcs_emulator import running

    with running(tmp_path_factory.mktemp("staged")) as env:
        yield env


def pytest_sessionfinish(session):
    """The compilation cache goes with the run (by the xdist controller, or the only process)."""
    if not hasattr(session.config, "workerinput"):
        shutil.rmtree(XLA_CACHE, ignore_errors=True)
