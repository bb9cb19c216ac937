"""Byte ranges of one file, local or in a bucket: what a streamed dataset reads instead of a copy.

A dataset's token file (``esmjax.data.tokens``) is read a batch at a time as many small ranges (a
record is some hundreds of bytes, and cluster sampling scatters a batch's records over the whole
file). From a bucket, each range is an HTTP range request: ``RangeFile.read`` sends one call's
ranges together, concurrently on the client's event loop (gcsfs, s3fs), after ``coalesce`` has
merged the ranges that touch, overlap or lie within ``MERGE_GAP`` bytes of each other into one
request. A request costs a round trip (milliseconds to tens of milliseconds against a cloud
bucket, time enough to transfer tens of kB), so reading a few unwanted bytes between two records is
cheaper than asking for them separately; the gap is kept small so that a host still downloads
about the bytes it uses.

The filesystem comes from ``fsspec.core.url_to_fs`` (the client's own parse of the URL). It is not
pickled: a ``RangeFile`` sent to a data worker process (spawned, pipeline.py) makes its own client
there from the URL and the inherited environment (credentials, ``STORAGE_EMULATOR_HOST``,
``AWS_ENDPOINT_URL_S3``). Store failures become one ``InputError`` line naming the URL
(``paths.remote_errors``). Each request has the clients' timeout and retries (``paths``), and each
call a deadline, retries included (``ESMJAX_STORE_DEADLINE``, default 300 s: fsspec's own
``timeout`` of a blocking call, which cancels the call's requests), so a read from a store that
stopped answering fails instead of holding the training run forever.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import numpy as np

from esmjax.errors import InputError
from esmjax.io import paths, stores

MERGE_GAP = 4096  # bytes: ranges closer than this are fetched by one request


def coalesce(
    starts: np.ndarray, ends: np.ndarray, gap: int = MERGE_GAP
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merges byte ranges ``[starts[i], ends[i])`` into few larger ones.

    Ranges that overlap, touch or are at most ``gap`` bytes apart become one. Returns the merged
    ranges' starts and ends (sorted, disjoint, more than ``gap`` bytes apart) and, for each input
    range, the index of the merged range that holds it.
    """
    starts = np.asarray(starts, np.int64)
    ends = np.asarray(ends, np.int64)
    if len(starts) == 0:
        empty = np.zeros(0, np.int64)
        return empty, empty, empty
    order = np.argsort(starts, kind="stable")
    s, e = starts[order], ends[order]
    reach = np.maximum.accumulate(e)  # the furthest end of the ranges so far
    new = np.ones(len(s), bool)
    new[1:] = s[1:] > reach[:-1] + gap
    first = np.flatnonzero(new)
    merged_starts = s[first]
    merged_ends = np.maximum.reduceat(e, first)
    owner = np.empty(len(s), np.int64)
    owner[order] = np.cumsum(new) - 1
    return merged_starts, merged_ends, owner


def _settle_bucket_type(fs: Any, key: str) -> None:
    """Asks gcsfs once what kind of bucket ``key`` is in, instead of before every range read.

    gcsfs's ``ExtendedGcsFileSystem`` (gcsfs 2026.10's default ``gs://`` filesystem, unless
    ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false``) looks up the bucket's storage layout before each
    read, to send reads of zonal (Rapid) buckets over gRPC, and caches only a successful answer.
    When the lookup fails (no credentials for the storage control API, or an emulator), every read
    repeats it before falling back to a plain read, at several times the client CPU of the read
    itself. Here the lookup runs once, and an unknown answer is recorded as gcsfs's own fallback, a
    plain bucket. Other filesystems (s3fs, core gcsfs, another gcsfs version without that cache) are
    left alone.
    """
    lookup = getattr(fs, "_sync_lookup_bucket_type", None)
    cache = getattr(fs, "_storage_layout_cache", None)
    if lookup is None or not isinstance(cache, dict):
        return
    try:
        from gcsfs.extended_gcsfs import BucketType
    except ImportError:
        return
    bucket = fs.split_path(key)[0]
    if lookup(bucket) == BucketType.UNKNOWN:
        cache[bucket] = BucketType.NON_HIERARCHICAL


class RangeFile:
    """Reads byte ranges of the file at ``url`` (a bucket URL or a local path) in few requests.

    ``requests`` and ``bytes_read`` count what this process has fetched (the benchmark reports
    them); they are not pickled.
    """

    def __init__(self, url: str, gap: int | None = None):
        self.url = str(url)
        self.gap = MERGE_GAP if gap is None else gap
        self._fs: Any = None
        self._key: str | None = None
        self._lock = threading.Lock()
        self.requests = 0
        self.bytes_read = 0

    def __getstate__(self) -> dict[str, Any]:
        return {"url": self.url, "gap": self.gap}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["url"], state["gap"])

    def _client(self) -> tuple[Any, str]:
        with self._lock:
            if self._fs is None:
                import fsspec

                paths.path(self.url)  # a missing client package: one line naming the extra
                with paths.remote_errors(self.url):
                    self._fs, self._key = fsspec.core.url_to_fs(self.url)
                    _settle_bucket_type(self._fs, self._key)
        return self._fs, self._key

    def _deadline(self) -> dict[str, float]:
        """The ``timeout`` of a blocking call of an async client (gcsfs, s3fs): fsspec runs the
        call on its event loop and cancels it after that long. Local files take none."""
        return (
            {"timeout": stores.store_deadline()} if getattr(self._fs, "async_impl", False) else {}
        )

    def size(self) -> int:
        """The file's size in bytes."""
        with paths.remote_errors(self.url):
            fs, key = self._client()
            return int(fs.size(key, **self._deadline()))

    def _fetch(self, fs: Any, key: str, starts: list[int], ends: list[int]) -> list[bytes]:
        """The merged ranges' bytes, one request each, all sent at once (the client's connection
        pool bounds how many are in flight), as fsspec's ``cat_ranges`` sends them; for an async
        client, in a task group and under the deadline, so that the deadline, or one request's
        failure, cancels every request of the call (fsspec 2026.9's ``cat_ranges`` leaves them
        running, and retrying, in the background)."""
        if not getattr(fs, "async_impl", False):
            return fs.cat_ranges([key] * len(starts), starts, ends, on_error="raise")
        import fsspec.asyn

        async def fetch() -> list[bytes]:
            async with asyncio.TaskGroup() as group:
                tasks = [
                    group.create_task(fs._cat_file(key, start=a, end=z))
                    for a, z in zip(starts, ends)
                ]
            return [t.result() for t in tasks]

        try:
            return fsspec.asyn.sync(fs.loop, fetch, **self._deadline())
        except ExceptionGroup as e:  # the first failure, as cat_ranges would raise it
            raise e.exceptions[0] from None

    def read(self, starts: np.ndarray, ends: np.ndarray) -> list[memoryview]:
        """The bytes ``[starts[i], ends[i])`` of the file, one buffer per range (views into the
        merged ranges' downloads). Empty ranges cost no request."""
        starts = np.asarray(starts, np.int64)
        ends = np.asarray(ends, np.int64)
        if np.any(ends < starts):
            raise ValueError("byte ranges must not end before they start")
        out = [memoryview(b"")] * len(starts)
        todo = np.flatnonzero(ends > starts)
        if len(todo) == 0:
            return out
        ms, me, owner = coalesce(starts[todo], ends[todo], self.gap)
        fs, key = self._client()
        with paths.remote_errors(self.url):
            blobs = self._fetch(fs, key, ms.tolist(), me.tolist())
        with self._lock:
            self.requests += len(ms)
            self.bytes_read += int((me - ms).sum())
        got = [memoryview(b) for b in blobs]
        for g, a, z in zip(got, ms.tolist(), me.tolist()):
            if len(g) != z - a:  # past the end of the object: a truncated or replaced file
                raise InputError(
                    f"{self.url}: read {len(g)} bytes at offset {a}, expected {z - a} (the file "
                    "is shorter than its index says)"
                )
        rel = (starts[todo] - ms[owner]).tolist()
        size = (ends[todo] - starts[todo]).tolist()
        for i, o, r, n in zip(todo.tolist(), owner.tolist(), rel, size):
            out[i] = got[o][r : r + n]
        return out
