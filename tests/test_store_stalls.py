"""An object store that accepts connections and never answers (issue 28, items 5 and 16): requests
time out and are retried a bounded number of times, each failed ``gs://`` attempt logged with the
object's URL; a range read fails within its deadline; the training data iterator warns, then stops
with one line, when no batch comes.

The store is a socket server in a thread of this process (``stalled``) that accepts connections
and reads nothing, sends nothing. gcsfs reaches it as it reaches the GCS emulator
(``STORAGE_EMULATOR_HOST``, tests/support/gcs_emulator.py), s3fs through
``AWS_ENDPOINT_URL_S3``. Each call under test runs in a daemon thread and is given at most ``BOUND``
seconds, so that a call that hangs (as every one of them did before) fails the test instead of
holding the session.
"""

import logging
import re
import socket
import threading
import time

import pytest
from support.data_fixtures import cath_head
from support.gcs_emulator import BUCKET, NoBackoff, forget_clients

from esmjax.config import DataConfig
from esmjax.data.build import build_dataset
from esmjax.data.pipeline import BatchIterator
from esmjax.data.source import FolderSplit, open_split
from esmjax.errors import InputError, StalledRead, StalledWrite
from esmjax.io import stores
from esmjax.io.ranges import RangeFile

BOUND = 30.0  # s: far above what any call below takes now, far below "forever"


@pytest.fixture
def stalled():
    """``http://127.0.0.1:PORT`` of a server that accepts every connection and never answers."""
    server = socket.create_server(("127.0.0.1", 0), backlog=128)
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                held.append(server.accept()[0])
            except OSError:  # closed: the test is over
                return

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    server.close()
    for conn in held:
        conn.close()


def point_clients(monkeypatch, env: dict[str, str]) -> None:
    """Sets ``env``, and makes the store clients made from now on take it up (their options are
    read once per process, their instances cached); undone after the test."""
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    stores.configure_stores()
    forget_clients()


@pytest.fixture(autouse=True)
def _restore_clients():
    yield
    stores.configure_stores()  # monkeypatch has restored the environment by now
    forget_clients()


def bounded(fn):
    """``fn()``'s result, or its exception raised here, and the seconds it took; fails the test if
    it is still running after ``BOUND`` seconds (it is left behind in its daemon thread)."""
    out: dict = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            out["error"] = e

    t0 = time.monotonic()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(BOUND)
    took = time.monotonic() - t0
    assert not thread.is_alive(), f"still waiting after {BOUND:.0f} s: the call hangs"
    if "error" in out:
        raise out["error"]
    return out["value"], took


def test_gs_requests_time_out_and_each_retry_is_logged(stalled, monkeypatch, caplog):
    """Opening a ``gs://`` dataset: every request gives up after ESMJAX_STORE_TIMEOUT without an
    answer, gcsfs retries it (6 attempts; its back-off is dropped here, as in test_buckets.py),
    each failed attempt is a WARNING naming the object and the attempt, and the failure is one
    line naming the URL."""
    pytest.importorskip("gcsfs")
    import gcsfs.retry

    point_clients(monkeypatch, {"STORAGE_EMULATOR_HOST": stalled, "ESMJAX_STORE_TIMEOUT": "0.3"})
    monkeypatch.setattr(gcsfs.retry, "asyncio", NoBackoff())
    url = f"gs://{BUCKET}/ds"
    with caplog.at_level(logging.WARNING, logger="esmjax.io.stores"):
        with pytest.raises(InputError) as e:
            bounded(lambda: open_split(url, "train"))
    assert "\n" not in str(e.value) and url in str(e.value), e.value
    assert "did not answer in time" in str(e.value), e.value
    tries = [r.getMessage() for r in caplog.records if r.name == "esmjax.io.stores"]
    want = f"{url}/esmjax_dataset.json: GET attempt 1 of 6 failed (SocketTimeoutError"
    assert tries and tries[0].startswith(want), tries
    assert tries[-1].endswith(
        "attempt 6 of 6 failed (SocketTimeoutError: Timeout on reading data from socket); giving up"
    ), tries


@pytest.mark.parametrize("scheme", ["gs", "s3"])
def test_range_read_fails_within_its_deadline(scheme, stalled, monkeypatch, caplog):
    """A streamed token file's range read (what a training batch waits for) ends with one line at
    ESMJAX_STORE_DEADLINE, retries included, its requests cancelled; a gs:// retry is logged."""
    pytest.importorskip({"gs": "gcsfs", "s3": "s3fs"}[scheme])
    env = {"ESMJAX_STORE_TIMEOUT": "1", "ESMJAX_STORE_DEADLINE": "3"}
    if scheme == "gs":
        env["STORAGE_EMULATOR_HOST"] = stalled
    else:
        env.update(
            AWS_ENDPOINT_URL_S3=stalled,
            AWS_ACCESS_KEY_ID="testing",
            AWS_SECRET_ACCESS_KEY="testing",
            AWS_DEFAULT_REGION="us-east-1",
        )
    point_clients(monkeypatch, env)
    url = f"{scheme}://{BUCKET}/ds/train.tokens.bin"
    with caplog.at_level(logging.WARNING, logger="esmjax.io.stores"):
        with pytest.raises(InputError, match="did not answer in time") as e:
            bounded(lambda: RangeFile(url).read([0, 9000], [100, 9100]))
    assert str(e.value).startswith(f"{url}: ") and "\n" not in str(e.value), e.value
    assert "deadline of 3 s" in str(e.value), e.value
    if scheme == "gs":
        assert f"{url}: GET attempt 1 of 6 failed (SocketTimeoutError" in caplog.text


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory, shared_data):
    base = tmp_path_factory.mktemp("stall_ds")
    build_dataset([cath_head(base / "small.fa", 300)], base / "ds", val_fraction=0.05)
    return base / "ds"


def test_data_watchdog_warns_then_stops(small_dataset, stalled, monkeypatch, caplog):
    """The training iterator of a dataset streamed from the silent store (its index local, as
    after ``open_split`` staged it): a WARNING naming the URL after ESMJAX_DATA_WARN_AFTER, then a
    one-line ``StalledRead`` (the CLI's exit-at-once error) after ESMJAX_DATA_STOP_AFTER, and the
    iterator closes without waiting for the stuck reader, which ends at the range read's deadline.
    The store's limits are set longer here, so that only the watchdog can end the wait."""
    pytest.importorskip("gcsfs")
    env = {
        "STORAGE_EMULATOR_HOST": stalled,
        "ESMJAX_STORE_TIMEOUT": "30",
        "ESMJAX_STORE_DEADLINE": "4",  # the stuck reader's own end, after the watchdog's
        "ESMJAX_DATA_WARN_AFTER": "1",
        "ESMJAX_DATA_STOP_AFTER": "2",
    }
    point_clients(monkeypatch, env)
    url = f"gs://{BUCKET}/ds"
    before = set(threading.enumerate())  # other tests of this worker may have left theirs
    split = FolderSplit(small_dataset, "train", remote=url, check=False)
    cfg = DataConfig(train=url, seq_len=64, max_segments=4)
    it = BatchIterator(split, cfg, rows=4, process_index=0, process_count=1, seed=0, kind="train")
    with caplog.at_level(logging.WARNING, logger="esmjax.data.pipeline"):
        with pytest.raises(StalledRead) as e:
            bounded(lambda: next(it))
    message = str(e.value)
    assert isinstance(e.value, StalledWrite)  # esmjax.cli: print the line, exit 2 at once
    assert "\n" not in message and re.search(f"no train batch from {url} in [2-9] s", message)
    assert re.search(f"no train batch from {url} for [1-9] s", caplog.text), caplog.text
    _, took = bounded(it.close)
    assert took < 1.0, took
    # the reader left behind ends at its own deadline, its requests cancelled
    ours = [t for t in threading.enumerate() if t not in before]
    bounded(lambda: [t.join() for t in ours if t.name.startswith("esmjax-data")])
