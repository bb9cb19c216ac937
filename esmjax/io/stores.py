"""Timeouts and retries of the object stores (``gs://``, ``s3://``), for every client fsspec makes.

No request waits forever (``configure_stores``, on a process's first bucket path, through fsspec's
own defaults for its clients, ``fsspec.config.conf``): ``ESMJAX_STORE_TIMEOUT`` (seconds, default
60, the per-request default of google-cloud-storage and of botocore) bounds connecting and each
wait for the next bytes of an answer, so a server that accepts a connection and never answers
fails the request instead of hanging it. Failed requests are retried by the clients themselves:
gcsfs makes 6 attempts with exponential back-off (fixed when gcsfs is imported: its retry
decorator takes the class's ``retries``), each failed ``gs://`` attempt logged here at WARNING with
the object's URL and the attempt number (gcsfs logs retries at DEBUG only, which would leave a
failing store silent for the whole back-off); s3fs makes up to 5 attempts of
botocore's "standard" retry mode, 3 attempts each with its own back-off. Range reads
(``esmjax.io.ranges``, a training run's data) also have a deadline, retries included:
``ESMJAX_STORE_DEADLINE`` (seconds, default 300). Options given to fsspec itself (``FSSPEC_GS_*``
/ ``FSSPEC_S3_*`` variables, fsspec's config files) win over these.
"""

from __future__ import annotations

import functools
import logging
import os

from esmjax.errors import InputError

log = logging.getLogger(__name__)

STORE_TIMEOUT = 60.0  # s: connecting, and each wait for more of an answer
STORE_DEADLINE = 300.0  # s: one call of range reads, retries included
S3_ATTEMPTS = 3  # botocore's default for its "standard" retry mode

_configured = False
_fsspec_own: dict[str, dict] | None = None  # the user's options for fsspec itself, kept on top
_attempts: dict[tuple, int] = {}  # failed attempts of each gs:// request not yet answered


def env_seconds(name: str, default: float) -> float:
    """The positive number of seconds in the environment variable ``name`` (``default`` when it is
    unset or empty); anything else is one ``InputError`` line."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise InputError(f"{name}={text!r}: expected a positive number of seconds")
    return value


def store_deadline() -> float:
    return env_seconds("ESMJAX_STORE_DEADLINE", STORE_DEADLINE)


def configure_stores() -> None:
    """Makes ``ESMJAX_STORE_TIMEOUT`` and the retry log fsspec's defaults for the ``gs://`` and
    ``s3://`` clients it makes from now on (epath's included): for gcsfs, aiohttp's connect and
    read timeouts as its ``requests_timeout`` (a bare number there would be aiohttp's ``total``,
    which would cut off a large download that is still arriving) and the retry log as a trace of
    its aiohttp session; for s3fs, botocore's ``connect_timeout``, ``read_timeout`` and
    ``retries``. Runs on a process's first bucket path; tests call it again after changing the
    variable, then drop the cached clients."""
    global _configured, _fsspec_own
    import aiohttp
    from fsspec.config import conf

    if _fsspec_own is None:
        _fsspec_own = {p: dict(conf.get(p, {})) for p in ("gs", "s3")}
    t = env_seconds("ESMJAX_STORE_TIMEOUT", STORE_TIMEOUT)
    ours = {
        "gs": {
            "requests_timeout": aiohttp.ClientTimeout(sock_connect=t, sock_read=t),
            "session_kwargs": {"trace_configs": [_retry_log()]},
        },
        "s3": {
            "config_kwargs": {
                "connect_timeout": t,
                "read_timeout": t,
                "retries": {"max_attempts": S3_ATTEMPTS, "mode": "standard"},
            }
        },
    }
    for proto, options in ours.items():
        conf[proto] = {**options, **_fsspec_own[proto]}
    _configured = True


@functools.cache
def _retry_log():
    """The aiohttp trace (the session's documented hooks) that logs each failed ``gs://`` request
    that gcsfs retries: a connection error or timeout, or an answer with a status gcsfs retries.
    Pickled as a call of this function: gcsfs clients pickle their options."""
    import aiohttp

    class RetryLog(aiohttp.TraceConfig):
        def __reduce__(self):
            return _retry_log, ()

    async def failed(session, ctx, params) -> None:
        if isinstance(params.exception, Exception):  # not a cancelled call
            _failed_attempt(params.method, params.url, params.headers, params.exception)

    async def answered(session, ctx, params) -> None:
        from gcsfs.retry import errs

        if params.response.status in errs:
            _failed_attempt(params.method, params.url, params.headers, params.response.status)
        else:
            _attempts.pop((params.method, str(params.url), params.headers.get("Range")), None)

    trace = RetryLog()
    trace.on_request_exception.append(failed)
    trace.on_request_end.append(answered)
    return trace


def _failed_attempt(method: str, url, headers, why: BaseException | int) -> None:
    """Logs attempt n of gcsfs's attempts at one request (counted here: gcsfs does not say)."""
    from gcsfs import GCSFileSystem

    total = GCSFileSystem.retries  # the attempts gcsfs's retry decorator was given
    key = (method, str(url), headers.get("Range"))
    n = _attempts[key] = _attempts.get(key, 0) + 1
    if n >= total:
        del _attempts[key]
    elif len(_attempts) > 4096:  # requests that ended otherwise (an error gcsfs does not retry)
        _attempts.clear()
    reason = f"HTTP {why}" if isinstance(why, int) else first_line(why)
    then = "retrying" if n < total else "giving up"
    log.warning(
        "%s: %s attempt %d of %d failed (%s); %s", _object_url(url), method, n, total, reason, then
    )


def _object_url(url) -> str:
    """``gs://bucket/object`` for a GCS JSON API request (``.../b/BUCKET/o/OBJECT``, the object's
    name percent-encoded; an upload's in its ``name`` parameter, a listing's prefix in ``prefix``),
    else the request's URL."""
    from urllib.parse import unquote

    _, sep, tail = url.raw_path.partition("/b/")
    bucket, _, obj = tail.partition("/o")
    if not sep or not bucket or "/" in bucket:
        return str(url)
    name = unquote(obj.removeprefix("/")) or url.query.get("name") or url.query.get("prefix", "")
    return f"gs://{bucket}/{name}"


def ensure_configured() -> None:
    """:func:`configure_stores` once per process (on its first bucket path)."""
    if not _configured:
        configure_stores()
        # the first request waits silently for credentials: ~20 s where gcsfs probes for a GCE
        # metadata server that is not there
        log.info("first bucket path: looking up the store's credentials, then connecting ...")


def first_line(e: BaseException) -> str:
    """``Type: the first line of the message`` (at most 200 characters): a store's error as one
    line."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__
