"""One run per workdir: a lease file that works on local disks and in buckets.

Two ``esmjax train`` (or ``finetune``) runs in one workdir would both log every step and both save
checkpoints over each other. So process 0 of a run holds a lease, ``<workdir>/.esmjax.lock``
(JSON: an owner id, host, pid, and when it was last renewed), renews it every ``RENEW`` seconds from
a daemon thread, and deletes it when the run ends. A run that finds a lease:

- held by a live process on this host, or renewed while it watches (every run renews within
  ``RENEW`` seconds): stops with one line naming the holder;
- held by a process of this host that is gone, or not renewed for ``LEASE`` seconds (the holder
  was killed with -9, or its host was lost): takes it over with one warning line. A run started
  right after its predecessor died on another host (a requeued job) therefore waits up to
  ``LEASE`` seconds, saying so.

Object stores have no atomic create-if-absent that every emulator serves, so taking a lease
writes it and reads it back after a pause: of two runs that start together, the one whose write
landed last owns it, and the other stops. ``ESMJAX_LOCK_RENEW`` / ``ESMJAX_LOCK_LEASE`` set the
periods (seconds; defaults 10 and 60).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from esmjax.errors import InputError
from esmjax.io import paths

log = logging.getLogger(__name__)

LOCK_FILE = ".esmjax.lock"


class WorkdirBusy(InputError):
    """Another run holds the workdir's lease."""


def _periods() -> tuple[float, float]:
    return (
        float(os.environ.get("ESMJAX_LOCK_RENEW", "10")),
        float(os.environ.get("ESMJAX_LOCK_LEASE", "60")),
    )


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (ValueError, OSError):  # torn or foreign: nobody can be renewing it
        return {"owner": "?", "host": "?", "pid": -1, "renewed": 0.0}


def _pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs on this host. A process killed with -9 whose parent died too stays a
    zombie where no init reaps orphans (a container): that counts as ended."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def _ended(pid: int, grace: float = 5.0) -> bool:
    """Whether ``pid`` has ended, or ends within ``grace`` seconds: a run just killed with -9 (a
    scheduler's requeue on the same host) takes a moment to exit, most of it freeing its memory."""
    deadline = time.monotonic() + grace
    while _pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _holder(info: dict[str, Any]) -> str:
    return f"a run on {info.get('host')} (pid {info.get('pid')})"


def _wait_for_free(path: Path, workdir: Any) -> None:
    """Returns once the lease is free or stale; raises ``WorkdirBusy`` when its holder lives."""
    renew, lease = _periods()
    first = None  # the renewal time seen first: a live holder changes it within ``renew``
    while (info := _read(path)) is not None:
        age = time.time() - float(info.get("renewed", 0))
        here = info.get("host") == socket.gethostname()
        if here and _ended(int(info.get("pid", -1))):
            log.warning("%s: taking over the lease of %s, which has ended", workdir, _holder(info))
            return
        if age > lease:
            log.warning(
                "%s: taking over the lease of %s, last renewed %.0f s ago",
                workdir,
                _holder(info),
                age,
            )
            return
        if here or (first is not None and info.get("renewed") != first):
            raise WorkdirBusy(
                f"{workdir} is in use by {_holder(info)} (lease renewed {age:.0f} s ago): one run "
                f"per workdir; if that run is gone, {path} expires {lease:.0f} s after its last "
                "renewal"
            )
        if first is None:
            first = info.get("renewed")
            log.warning(
                "%s: a lease of %s, renewed %.0f s ago; waiting up to %.0f s to see whether it "
                "is alive",
                workdir,
                _holder(info),
                age,
                lease - age,
            )
        time.sleep(min(1.0, renew / 2))


@contextlib.contextmanager
def workdir_lease(workdir: Any, enabled: bool = True) -> Iterator[None]:
    """Holds ``workdir``'s lease for the body (``enabled``: on process 0 only)."""
    if not enabled:
        yield
        return
    root = paths.path(workdir)
    path = root / LOCK_FILE
    me = {"owner": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid()}
    renew, _ = _periods()
    with paths.remote_errors(workdir):
        _wait_for_free(path, workdir)
        created = not root.exists()
        root.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**me, "renewed": time.time()}))
        time.sleep(min(1.0, renew / 4))  # a run that wrote at the same time: the last write owns it
        got = _read(path)
    if got is None or got.get("owner") != me["owner"]:
        raise WorkdirBusy(
            f"{workdir} is in use by {_holder(got or {})}, which started with this one"
        )
    stop = threading.Event()

    def renewing() -> None:
        while not stop.wait(renew):
            try:
                path.write_text(json.dumps({**me, "renewed": time.time()}))
            except Exception as e:  # a store hiccup: the next renewal tries again
                log.warning("%s: could not renew the lease (%s)", workdir, e)

    thread = threading.Thread(target=renewing, name="esmjax-lease", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
        with contextlib.suppress(Exception):
            if (_read(path) or {}).get("owner") == me["owner"]:
                path.unlink()
            if created and not any(root.iterdir()):  # a run that stopped before writing anything
                root.rmdir()


@contextlib.contextmanager
def run_lease(workdir: Any) -> Iterator[None]:
    """The lease of a multi-process run: process 0 holds it, and every process learns whether it
    got it (one broadcast), so that all of them stop together instead of waiting for process 0 in
    a collective."""
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    with contextlib.ExitStack() as stack:
        error: WorkdirBusy | None = None
        try:
            stack.enter_context(workdir_lease(workdir, enabled=jax.process_index() == 0))
        except WorkdirBusy as e:
            error = e
        if jax.process_count() > 1:
            busy = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
            if busy and error is None:
                error = WorkdirBusy(f"{workdir} is in use by another run (process 0 names it)")
        if error is not None:
            raise error
        yield
