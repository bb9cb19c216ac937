"""A real GCS API server (``gcp-storage-emulator``) on 127.0.0.1 for the bucket tests
(tests/test_buckets.py, tests/test_bucket_outputs.py), and the environment that points gcsfs
(``STORAGE_EMULATOR_HOST``) and TensorStore (``TENSORSTORE_GCS_HTTP_URL``, with
``GOOGLE_AUTH_TOKEN_FOR_TESTING`` as its token: the emulator checks none) at it."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

BUCKET = "esmjax-test"


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# The emulator serves one connection at a time from a listen queue of 5 (the default of
# ``http.server.HTTPServer``): concurrent clients beyond that (gcsfs sends a batch's range reads at
# once) have their connection attempts dropped and retried by TCP after 1 s, 3 s, ... A longer
# queue lets them wait their turn instead.
BOOT = (
    "import sys, http.server; http.server.HTTPServer.request_queue_size = 1024; "
    "from gcp_storage_emulator.__main__ import main; main(sys.argv[1:])"
)


def start_emulator(port: int, data_dir: Path | None = None) -> subprocess.Popen:
    """The server in memory, or persisting to ``data_dir`` (a restart on the same folder serves
    the same objects)."""
    store = ["--data-dir", str(data_dir)] if data_dir else []
    proc = subprocess.Popen(
        [sys.executable, "-c", BOOT, *store, "start"]
        + ["--host", "127.0.0.1", "--port", str(port), "--default-bucket", BUCKET]
        + ([] if data_dir else ["--in-memory"]),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            assert proc.poll() is None, "gcp-storage-emulator did not start"
            time.sleep(0.2)
    proc.kill()
    raise TimeoutError("gcp-storage-emulator did not open its port")


def emulator_env(url: str) -> dict[str, str]:
    return {
        "STORAGE_EMULATOR_HOST": url,
        "TENSORSTORE_GCS_HTTP_URL": url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
    }


def forget_clients() -> None:
    """Drops the gcsfs clients cached in this process (by etils.epath and fsspec): they keep the
    endpoint they were made with, and each test module starts its server on a new port."""
    import gcsfs
    from etils.epath import backend

    gcsfs.GCSFileSystem.clear_instance_cache()
    backend.fsspec_backend._get_filesystem.cache_clear()


@contextlib.contextmanager
def running(stage_dir: Path) -> Iterator[dict[str, str]]:
    """A running in-memory server; yields the environment (also set in ``os.environ`` meanwhile)
    that points every client at it."""
    port = free_port()
    proc = start_emulator(port)
    env = {
        **emulator_env(f"http://127.0.0.1:{port}"),
        "ESMJAX_STAGE_DIR": str(stage_dir),
        # The emulator answers reads with generation 0, so TensorStore cannot update an OCDBT
        # manifest it had to read back ("Malformed StorageGeneration" when shards race): write
        # each array as its own zarr folder (README "Object storage").
        "ESMJAX_CHECKPOINT_OCDBT": "0",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    forget_clients()
    try:
        yield env
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        forget_clients()
        proc.terminate()
        proc.wait(timeout=30)


class NoBackoff:
    """``asyncio`` for gcsfs's retry loop, with sleeps of zero: a test keeps the retries of a
    refused or silent store and drops their waits (about 33 s of back-off)."""

    def __getattr__(self, name):
        import asyncio

        return getattr(asyncio, name)

    @staticmethod
    async def sleep(delay, *args, **kwargs):
        import asyncio

        await asyncio.sleep(0)


def committed_steps(url: str) -> list[int]:
    """Steps whose Orbax commit marker is in the bucket (what a restore may use); listed by a fresh
    client, since fsspec caches listings within a process."""
    import gcsfs

    fs = gcsfs.GCSFileSystem(skip_instance_cache=True, use_listings_cache=False)
    root = url.removeprefix("gs://") + "/checkpoints/"
    try:
        names = fs.find(root)
    except FileNotFoundError:
        return []
    steps = {n.removeprefix(root).split("/")[0] for n in names if n.endswith("/commit_success.txt")}
    return sorted(int(s) for s in steps if s.isdigit() and f"{root}{s}/commit_success.txt" in names)
