"""Training and evaluation batches: cluster-sampled, cropped, packed into fixed ``[rows, seq_len]``
rows, masked.

The global stream of packed rows (``esmjax.data.stream``) does not depend on the number of processes
or on the batch size: every row, and its masking, is a pure function of the seed and its (block,
row) coordinates. Global batch ``g`` is the next ``rows * process_count`` rows of that stream;
process ``p`` yields rows ``p*rows .. (p+1)*rows - 1`` of it, so the processes' parts are disjoint
and concatenate to the global batch. The iterator state is the stream position ``(block, offset)``
(plus fingerprints that must match on restore): any process count, or even another batch size,
resumes at exactly the next unread row, repeating and skipping nothing.

Sequences longer than a row are cropped as ESM-2 did (``esmjax.data.sampling``): a window of
``seq_len`` tokens of ``BOS seq EOS``, so BOS/EOS appear only where the window reaches the real
start/end of the protein, and a middle window holds ``seq_len`` residues.

Evaluation reads the held-out split with a fixed seed (``EVAL_SEED``, independent of
``DataConfig.seed``): each held-out cluster once (one member, fixed crop, same crop rule) in a fixed
order until ``eval_tokens`` tokens, packed the same way; the last global batch is padded with empty
rows. The result is identical for any process count.

Work runs ahead of the consumer: a planner thread walks the stream (cheap: index arrays only) and
hands each batch's rows to a pool that reads and assembles them, ``num_workers`` processes or, with
0, one thread.

A watchdog bounds the wait for a batch, whatever holds it up (a store that stopped answering, a
stuck worker): after ``ESMJAX_DATA_WARN_AFTER`` seconds without one (default 120) a warning names
the dataset, and after ``ESMJAX_DATA_STOP_AFTER`` seconds (default 900) the iterator raises
``StalledRead``, one line, on which the CLI exits at once rather than wait for the stuck reader.
A streamed batch takes well under a second from a bucket, and a failing store ends a read sooner
(``esmjax.io.paths``: request timeouts and retries, a deadline per range read), so the defaults
are met only when something hangs.
"""

from __future__ import annotations

import concurrent.futures as cf
import functools
import logging
import multiprocessing
import queue
import threading
import time
from typing import Any

import numpy as np

from esmjax.config import DataConfig
from esmjax.data.sampling import TAG_MASK, ClusterSampler, derive_key
from esmjax.data.source import DatasetError, Split, is_dataset_dir, open_split
from esmjax.data.stream import BLOCK_DRAWS, Job, RowStream, materialise
from esmjax.errors import StalledRead
from esmjax.io.stores import env_seconds

log = logging.getLogger(__name__)

WARN_AFTER = 120.0  # s without a batch before a warning (ESMJAX_DATA_WARN_AFTER)
STOP_AFTER = 900.0  # s without a batch before the iterator stops (ESMJAX_DATA_STOP_AFTER)
EVAL_SEED = 0x5EED
# The stream's format (2: ESM-2 crops, BOS/EOS only at a protein's real ends): a state of another
# version belongs to a stream cropped otherwise, so resuming from it is refused.
STATE_VERSION = 2
BATCH_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")


_WORKER_SPLIT: Split | None = None


def _init_worker(split: Split) -> None:
    global _WORKER_SPLIT
    _WORKER_SPLIT = split


def _materialise_in_worker(job: Job) -> dict[str, np.ndarray]:
    assert _WORKER_SPLIT is not None
    return materialise(_WORKER_SPLIT, job)


class BatchIterator:
    """Yields this process's part of each global batch, prefetched in the background.

    ``get_state()`` / ``set_state()`` save and restore the position (a small JSON-serialisable
    dict); ``stats()`` reports what has been yielded, including the packing efficiency (non-pad
    fraction).
    """

    def __init__(
        self,
        split: Split,
        cfg: DataConfig,
        *,
        rows: int,
        process_index: int,
        process_count: int,
        seed: int,
        kind: str,
        exponent: float = 0.0,
        num_draws: int | None = None,
    ):
        if rows < 1:
            raise ValueError(f"rows must be positive, got {rows}")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
        if cfg.seq_len < 3 or cfg.max_segments < 1:
            raise ValueError("seq_len must be at least 3 and max_segments at least 1")
        self.split, self.cfg, self.rows = split, cfg, rows
        self.process_index, self.process_count = process_index, process_count
        self.kind, self.seed = kind, seed
        sampler = ClusterSampler(split.offsets, split.lengths, cfg.seq_len, seed, exponent)
        self.stream = RowStream(split, sampler, cfg.seq_len, cfg.max_segments, seed, num_draws)
        self._fixed = {
            "kind": kind,
            "seed": seed,
            "seq_len": cfg.seq_len,
            "max_segments": cfg.max_segments,
            "cluster_exponent": exponent,
            "block_draws": BLOCK_DRAWS,
            "split": split.fingerprint,
        }
        self._position = (0, 0, 0)  # block, offset, batches yielded (consumer side)
        self._counts = {
            "batches": 0,
            "rows": 0,
            "tokens": 0,
            "nonpad_tokens": 0,
            "segments": 0,
            "loss_tokens": 0,
        }
        self._mask_key = derive_key(seed, TAG_MASK) >> 1  # SeedSequence entropy: non-negative
        self._thread: threading.Thread | None = None
        self._pool: cf.Executor | None = None
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        self._work: Any = None
        self._exhausted = False
        self._warn_after = env_seconds("ESMJAX_DATA_WARN_AFTER", WARN_AFTER)
        self._stop_after = env_seconds("ESMJAX_DATA_STOP_AFTER", STOP_AFTER)
        self._warned = False
        self._stalled = False  # a reader is stuck: the pool is shut down without waiting for it

    # -- state
    # ----------------------------------------------------------------------------------------------
    def get_state(self) -> dict[str, Any]:
        block, offset, batches = self._position
        return {
            "version": STATE_VERSION,
            "block": block,
            "offset": offset,
            "batches": batches,
            **self._fixed,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise DatasetError(
                f"data iterator state has version {state.get('version')}, expected {STATE_VERSION} "
                "(saved by an esmjax whose batches differ); start a new workdir"
            )
        for k, v in self._fixed.items():
            if state.get(k) != v:
                raise DatasetError(
                    f"data iterator state was saved with {k}={state.get(k)!r}, this pipeline has "
                    f"{k}={v!r}; resuming would not continue the same stream"
                )
        self._shutdown()
        self._exhausted = False
        self._position = (int(state["block"]), int(state["offset"]), int(state["batches"]))

    def stats(self) -> dict[str, float]:
        c = dict(self._counts)
        c["packing_efficiency"] = c["nonpad_tokens"] / c["tokens"] if c["tokens"] else 0.0
        return c

    @property
    def packing_efficiency(self) -> float:
        return self.stats()["packing_efficiency"]

    # -- iteration
    # ----------------------------------------------------------------------------------------------
    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._exhausted:
            raise StopIteration
        if self._thread is None:
            self._start()
        since, self._warned = time.monotonic(), False
        item = self._get(since)
        if item is None:  # a finite (evaluation) stream ended: release the workers now
            self._shutdown()
            self._exhausted = True
            raise StopIteration
        if isinstance(item, BaseException):
            self._shutdown()
            raise item
        future, position, segments = item
        while not cf.wait([future], timeout=self._patience(since))[0]:
            pass
        batch = future.result()
        self._position = position
        nonpad = int(np.count_nonzero(batch["segment_ids"]))
        c = self._counts
        c["batches"] += 1
        c["rows"] += self.rows
        c["tokens"] += batch["tokens"].size
        c["nonpad_tokens"] += nonpad
        c["segments"] += segments
        c["loss_tokens"] += int(np.count_nonzero(batch["loss_mask"]))
        return batch

    def _get(self, since: float) -> Any:
        """The planner's next item, waited for under the watchdog (``_patience``)."""
        while True:
            try:
                return self._queue.get(timeout=self._patience(since))
            except queue.Empty:
                pass

    def _patience(self, since: float) -> float:
        """The watchdog, between the waits of ``__next__`` for the batch asked for at ``since``:
        warns once, or stops the iterator with ``StalledRead``, when the wait has lasted long
        enough; returns how long the next wait may last (until the next of those moments)."""
        waited = time.monotonic() - since
        what = f"{self.kind} batch from {_dataset_name(self.split)}"
        if waited >= self._stop_after:
            self._stalled = True
            self._shutdown()
            raise StalledRead(
                f"no {what} in {waited:.0f} s: its reads are stalled (is the store reachable?); "
                "stopping (ESMJAX_DATA_STOP_AFTER sets the wait); run again to resume from the "
                "last checkpoint"
            )
        if waited >= self._warn_after and not self._warned:
            self._warned = True
            log.warning(
                "no %s for %.0f s (the store slow or not answering?); the run stops after %.0f s "
                "without one (ESMJAX_DATA_STOP_AFTER)",
                what,
                waited,
                self._stop_after,
            )
        return max((self._stop_after if self._warned else self._warn_after) - waited, 0.01)

    def _produce(self, block: int, offset: int, batches: int) -> None:
        """The planner thread: walks the stream and submits one job per batch, ``prefetch``
        ahead."""
        total = self.rows * self.process_count
        lo = self.process_index * self.rows
        try:
            while not self._stop.is_set():
                pieces, block, offset, found = self.stream.plan(
                    block, offset, total, lo, lo + self.rows
                )
                if found == 0:
                    break
                batches += 1
                job = self.stream.job(pieces, self.rows, self._mask_key, self.cfg)
                future = self._pool.submit(self._work, job)
                self._put((future, (block, offset, batches), len(job.record)))
                if found < total:
                    break
            self._put(None)
        except BaseException as e:  # handed to the consumer
            self._put(e)

    def _put(self, item: Any) -> None:
        """Queues ``item``, waiting for room unless the iterator is being shut down."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _start(self) -> None:
        workers = self.cfg.num_workers
        if workers > 0:
            self._pool = cf.ProcessPoolExecutor(
                workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker,
                initargs=(self.split,),
            )
            self._work = _materialise_in_worker
        else:
            self._pool = cf.ThreadPoolExecutor(1, thread_name_prefix="esmjax-data")
            self._work = functools.partial(materialise, self.split)
        self._queue = queue.Queue(maxsize=max(1, self.cfg.prefetch, workers))
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._produce, args=self._position, name="esmjax-data-planner", daemon=True
        )
        self._thread.start()

    def _shutdown(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        # a stuck reader never returns: waiting for it would hold the caller as the read holds it
        self._pool.shutdown(wait=not self._stalled, cancel_futures=True)
        self._thread = self._pool = self._queue = None
        self._stop.clear()

    def close(self) -> None:
        """Stops the background planner and workers (also done when the iterator is garbage
        collected)."""
        self._shutdown()

    def __enter__(self) -> BatchIterator:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self._shutdown()
        except Exception:
            pass


def _dataset_name(split: Split) -> str:
    """What a message names: the bucket URL a split streams from, else its folder or file."""
    for attr in ("remote", "folder", "path"):
        if where := getattr(split, attr, None):
            return str(where)
    return "the dataset"


def train_batches(
    cfg: DataConfig, *, rows: int, process_index: int = 0, process_count: int = 1
) -> BatchIterator:
    """The endless training stream of ``cfg.train`` (a built folder's ``train`` split, or a FASTA
    file's records outside the ``cfg.val_fraction`` hold-out); this process's ``rows`` rows of
    each global batch."""
    split = open_split(cfg.train, "train", val_fraction=cfg.val_fraction)
    return BatchIterator(
        split,
        cfg,
        rows=rows,
        process_index=process_index,
        process_count=process_count,
        seed=cfg.seed,
        kind="train",
        exponent=cfg.cluster_exponent,
    )


def eval_split(cfg: DataConfig) -> Split:
    """``cfg.eval`` (a built folder's ``validation`` split or a whole FASTA file) or, when empty,
    the held-out part of ``cfg.train``."""
    if cfg.eval:
        return open_split(cfg.eval, "validation" if is_dataset_dir(cfg.eval) else "all")
    return open_split(cfg.train, "validation", val_fraction=cfg.val_fraction)


def eval_draws(split: Split, cfg: DataConfig) -> int:
    """How many evaluation draws (one per held-out cluster, in the fixed order) cover
    ``cfg.eval_tokens``."""
    sampler = ClusterSampler(split.offsets, split.lengths, cfg.seq_len, EVAL_SEED)
    n = split.num_clusters
    if cfg.eval_tokens <= 0:
        return n
    sizes = sampler.draws(0, n).size
    return int(min(n, np.searchsorted(np.cumsum(sizes), cfg.eval_tokens) + 1))


def eval_batches(
    cfg: DataConfig, *, rows: int, process_index: int = 0, process_count: int = 1
) -> BatchIterator:
    """The fixed evaluation batches (finite; the same for every step, run and process count)."""
    split = eval_split(cfg)
    return BatchIterator(
        split,
        cfg,
        rows=rows,
        process_index=process_index,
        process_count=process_count,
        seed=EVAL_SEED,
        kind="eval",
        num_draws=eval_draws(split, cfg),
    )
