"""The inference job model: the input cut into work units, units shared by processes, each unit's
output written whole and marked done, so that a job on any number of processes, stopped anywhere
(kill -9 included), resumes with nothing lost and nothing written twice.

``embed``, ``fold`` and ``evaluate perplexity --pseudo --out`` run through :func:`run`:

- **Units.** The input (FASTA files, local or ``gs://``/``s3://``, plain or gzip, read in the order
  given) is streamed and cut every ``unit_size`` valid records: unit ``k`` holds records
  ``[k * unit_size, (k + 1) * unit_size)`` of the job. The rule depends on the input and
  ``unit_size`` only, so a job on P processes and one on P' processes make the same units, and a
  rerun makes the units of the first run.
- **Processes.** Process ``i`` of ``n`` takes the units ``k`` with ``k % n == i``
  (:func:`worker`: the launchers' variables, as training reads them). Processes run independently:
  no ``jax.distributed`` start, no collective. A model is sharded over its process's local devices
  only, and a process that dies stops no other (on a pod, one host lost costs its units in flight,
  not the job).
- **Whole outputs, then a marker.** A unit's outputs are written by the command (each file whole:
  a renamed temporary locally, one object upload on a bucket), then ``done/<unit>.json``: the
  unit's record count, invalid records skipped (``--skip-invalid``, by reason), files written and
  throughput. A unit without its marker is redone by the next run, its files overwritten whole;
  so a killed job loses only the units in flight.
- **The job's settings** (command, inputs, unit size, format, model and options) are written to
  ``job.json`` by the first run; a rerun with other settings into the same ``--out`` is refused,
  so that no output mixes two settings. ``--skip-invalid`` is not one of them: a run without it
  stops at the first invalid record, before any unit that holds or follows it is done, so adding
  it to the rerun changes no unit done. When a process has read the input to its end it writes
  ``total.json`` (units, records, skipped); ``esmjax inspect-outputs`` checks a job against it.
- **Preemption.** SIGTERM/SIGINT stop the job at the next batch: the units written stay, the unit
  in flight is dropped, and the process exits 75 (``EXIT_PREEMPTED``), as training does, for the
  launchers to start it again.

Reading the next unit (a prefetch thread) and writing the last (a writer thread) overlap the device
work. Each finished unit is logged with records/s, tokens/s and the padding fraction, and its
figures go to its marker and, for a local ``--out``, to ``metrics/process-<i>-of-<n>.jsonl``.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from esmjax.errors import InputError
from esmjax.io import paths
from esmjax.io.fasta import FastaStats, Record

log = logging.getLogger("esmjax.inference.units")

JOB_FILE = "job.json"
TOTAL_FILE = "total.json"
DONE_DIR = "done"
UNIT_DIR = "units"
METRICS_DIR = "metrics"
EXIT_PREEMPTED = 75  # as esmjax.train.preemption: stopped by a signal, run again to resume


class Preempted(Exception):
    """SIGTERM/SIGINT reached a job: the units written stay, the unit in flight is dropped."""


# --------------------------------------------------------------------------------------------------
# Which process takes which units
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Worker:
    """Process ``index`` of ``count``: it takes the units ``k`` with ``k % count == index``."""

    index: int = 0
    count: int = 1

    def __post_init__(self):
        if self.count < 1 or not 0 <= self.index < self.count:
            raise InputError(f"process {self.index} of {self.count}: need 0 <= index < count")

    def takes(self, unit: int) -> bool:
        return unit % self.count == self.index

    def __str__(self) -> str:
        return f"process {self.index} of {self.count}"


def worker(
    env: Mapping[str, str] | None = None,
    process_id: int | None = None,
    num_processes: int | None = None,
) -> Worker:
    """This process's share: ``--process-id``/``--num-processes``, else the launchers' variables
    (``ESMJAX_PROCESS_ID``/``ESMJAX_NUM_PROCESSES`` of launch/local.sh; ``SLURM_PROCID``/
    ``SLURM_NTASKS``; a JobSet's indexed Jobs with ``ESMJAX_NUM_PROCESSES``, as training reads
    them; ``TPU_WORKER_ID`` and ``TPU_WORKER_HOSTNAMES`` on GKE TPU nodes), else the whole job."""
    from esmjax.parallel.distributed import kubernetes_process_id

    env = os.environ if env is None else env
    pairs = (("ESMJAX_PROCESS_ID", "ESMJAX_NUM_PROCESSES"), ("SLURM_PROCID", "SLURM_NTASKS"))
    for index_var, count_var in pairs:
        if process_id is None and env.get(index_var) not in (None, ""):
            process_id = int(env[index_var])
        if num_processes is None and env.get(count_var) not in (None, ""):
            num_processes = int(env[count_var])
    if process_id is None:  # an indexed Job of a JobSet (launch/k8s_jobset_*.yaml)
        process_id = kubernetes_process_id(env)
    hosts = env.get("TPU_WORKER_HOSTNAMES", "")
    if process_id is None and env.get("TPU_WORKER_ID") not in (None, "") and hosts:
        process_id, num_processes = int(env["TPU_WORKER_ID"]), len(hosts.split(","))
    if (process_id is None) != (num_processes is None):
        raise InputError(
            f"process id {process_id}, process count {num_processes}: give both "
            "(--process-id and --num-processes) or neither"
        )
    return Worker(process_id or 0, num_processes or 1)


def use_compilation_cache() -> str | None:
    """JAX's persistent compilation cache for a job: ``$JAX_COMPILATION_CACHE_DIR``, else
    ``$ESMJAX_HOME/compile_cache`` (``~/.cache/esmjax``). A job compiles one program per length
    bucket and row count in every process; with the cache, the processes of a host and every
    rerun (a resumed job, the next proteome) load what one of them compiled instead."""
    from esmjax.io.hub import models_dir
    from esmjax.parallel import platform

    default = str(models_dir().parent / "compile_cache")
    folder = os.environ.get("JAX_COMPILATION_CACHE_DIR") or default
    return platform.use_compilation_cache(folder, None)


# --------------------------------------------------------------------------------------------------
# Units
# --------------------------------------------------------------------------------------------------
@dataclass
class Unit:
    """Records ``[first, first + len(records))`` of the job."""

    index: int
    first: int
    records: list[Record]
    skipped: dict[str, int] = field(default_factory=dict)  # invalid entries read with this unit


def cut(
    records: Iterable[Record], unit_size: int, stats: FastaStats | None = None
) -> Iterator[Unit]:
    """``records`` (one stream over every input) in units of ``unit_size``; with ``stats`` (the
    reader's, kept with ``--skip-invalid``), each unit's skipped entries by reason: those read
    since the previous unit ended (the last unit also takes those after its last record)."""
    if unit_size < 1:
        raise InputError(f"--unit-size must be positive, got {unit_size}")
    seen: dict[str, int] = {}

    def skipped_since() -> dict[str, int]:
        now = dict(stats.reasons) if stats is not None else {}
        out = {r: n - seen.get(r, 0) for r, n in now.items() if n != seen.get(r, 0)}
        seen.update(now)
        return out

    index, batch = 0, []
    for rec in records:
        batch.append(rec)
        if len(batch) == unit_size:
            yield Unit(index, index * unit_size, batch, skipped_since())
            index, batch = index + 1, []
    rest = skipped_since()
    if batch or rest:
        yield Unit(index, index * unit_size, batch, rest)


def prefetched(items: Iterator[Any], depth: int = 2) -> Iterator[Any]:
    """``items`` read ahead by a thread (the next unit is parsed while the device works); an
    exception of the reader is raised here, in order."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    end = object()
    stop = threading.Event()

    def fill():
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put((item, None), timeout=0.2)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put((end, None))
        except BaseException as e:  # handed to the consumer
            q.put((end, e))

    thread = threading.Thread(target=fill, name="esmjax-unit-reader", daemon=True)
    thread.start()
    try:
        while True:
            item, error = q.get()
            if error is not None:
                raise error
            if item is end:
                return
            yield item
    finally:
        stop.set()


# --------------------------------------------------------------------------------------------------
# The job folder
# --------------------------------------------------------------------------------------------------
def marker_name(unit: int) -> str:
    return f"{DONE_DIR}/{unit:06d}.json"


def shard_name(unit: int, suffix: str = ".parquet") -> str:
    return f"{UNIT_DIR}/{unit:06d}{suffix}"


def read_json(p: Any) -> dict | None:
    """The JSON object at ``p``, or None when there is none."""
    with paths.remote_errors(p):
        q = paths.given(p)
        if not q.exists():
            return None
        return json.loads(paths.read_text(p, "a JSON file of an esmjax job"))


def done_units(out: str | os.PathLike) -> set[int]:
    """The units of the job in ``out`` that have a marker (a listing; no marker is read)."""
    folder = paths.path(out) / DONE_DIR
    with paths.remote_errors(out):
        if not folder.exists():
            return set()
        names = [p.name for p in folder.iterdir()]
    return {int(n[:-5]) for n in names if n.endswith(".json") and n[:-5].isdigit()}


def read_markers(out: str | os.PathLike, units: Iterable[int]) -> dict[int, dict]:
    """The markers of ``units`` (a damaged one is None: ``inspect-outputs`` reports it)."""
    root = paths.path(out)
    found: dict[int, dict] = {}
    for k in units:
        try:
            found[k] = read_json(root / marker_name(k))
        except (ValueError, InputError):
            found[k] = None
    return found


def settle_job(out: str | os.PathLike, spec: dict[str, Any]) -> dict[str, Any]:
    """The job in ``out``: ``spec`` written as ``job.json`` by the first run; a rerun's must be the
    same (the settings it differs in are named). Returns the job's spec."""
    root = paths.path(out)
    old = read_json(root / JOB_FILE)
    if old is None:
        paths.write_text(root / JOB_FILE, json.dumps(spec, indent=1, sort_keys=True) + "\n")
        return spec
    changed = sorted(k for k in set(old) | set(spec) if old.get(k) != spec.get(k))
    if changed:
        what = "; ".join(f"{k}: {old.get(k)!r} then, {spec.get(k)!r} now" for k in changed)
        raise InputError(
            f"--out {out} holds a job with other settings ({what}): resume it with the same "
            "command, or write to another --out"
        )
    return old


# --------------------------------------------------------------------------------------------------
# Running a job
# --------------------------------------------------------------------------------------------------
@dataclass
class Result:
    """What a command's ``process(unit, stopped)`` returns: the files to write (name relative to
    ``--out`` -> bytes) and the unit's figures."""

    files: dict[str, bytes]
    tokens: int = 0  # residues (and specials) that went through the model
    padded_tokens: int = 0  # batch slots, padding included
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Totals:
    units: int = 0
    records: int = 0
    tokens: int = 0
    padded_tokens: int = 0
    skipped_units: int = 0  # done by an earlier run or another process

    def line(self, seconds: float) -> str:
        s = max(seconds, 1e-9)
        pad = 1 - self.tokens / self.padded_tokens if self.padded_tokens else 0.0
        return (
            f"{self.units} units, {self.records} records in {seconds:.1f} s: "
            f"{self.records / s:.2f} records/s, {self.tokens / s:.0f} tokens/s, "
            f"padding {pad:.1%}"
            + (f"; {self.skipped_units} units were done before" if self.skipped_units else "")
        )


class _Signals:
    """SIGTERM/SIGINT set a flag the job checks between batches (the main thread only)."""

    def __init__(self):
        self.flag = threading.Event()
        self.old: dict[int, Any] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.old[sig] = signal.signal(sig, lambda *_: self.flag.set())
        return self

    def __exit__(self, *exc):
        for sig, handler in self.old.items():
            signal.signal(sig, handler)


def run(
    out: str | os.PathLike,
    units: Iterator[Unit],
    process: Callable[[Unit, Callable[[], bool]], Result],
    who: Worker,
    *,
    command: str,
    progress: Callable[[int], None] | None = None,
) -> Totals:
    """Runs ``process`` over this process's units of ``units`` not yet done in ``out``, writing
    each unit's files and then its marker on a writer thread. Raises ``Preempted`` after a signal
    (the units written stay)."""
    done = done_units(out)
    totals, started = Totals(), time.perf_counter()
    root = paths.path(out)
    metrics = None
    if not paths.is_remote(out):
        metrics = root / METRICS_DIR / f"process-{who.index}-of-{who.count}.jsonl"
    pending: list[Future] = []
    seen = {"units": 0, "records": 0, "skipped": 0}  # the whole stream's, for total.json

    def mine() -> Iterator[Unit]:
        for unit in units:
            seen["units"] = unit.index + 1
            seen["records"] = unit.first + len(unit.records)
            seen["skipped"] += sum(unit.skipped.values())
            if not who.takes(unit.index):
                continue
            if unit.index in done:
                totals.skipped_units += 1
                continue
            yield unit

    with _Signals() as signals, ThreadPoolExecutor(1, thread_name_prefix="esmjax-writer") as pool:
        try:
            for unit in prefetched(mine()):
                if signals.flag.is_set():
                    raise Preempted
                t0 = time.perf_counter()
                result = process(unit, signals.flag.is_set)
                seconds = time.perf_counter() - t0
                marker = _marker(unit, result, who, seconds, command)
                pending = [f for f in pending if not _finished(f)]
                pending.append(pool.submit(_write_unit, root, unit, result, marker, metrics))
                totals.units += 1
                totals.records += len(unit.records)
                totals.tokens += result.tokens
                totals.padded_tokens += result.padded_tokens
                log.info("unit %d: %s", unit.index, _unit_line(marker))
                if progress is not None:
                    progress(len(unit.records))
        finally:
            for f in pending:
                f.result()  # a failed write ends the job with its one line
    paths.write_text(root / TOTAL_FILE, json.dumps(seen) + "\n")  # the stream was read to its end
    log.info("%s: %s", who, totals.line(time.perf_counter() - started))
    return totals


def _finished(f: Future) -> bool:
    if f.done():
        f.result()
        return True
    return False


def _marker(unit: Unit, result: Result, who: Worker, seconds: float, command: str) -> dict:
    return {
        "unit": unit.index,
        "command": command,
        "first_record": unit.first,
        "records": len(unit.records),
        "skipped": unit.skipped,
        "files": sorted(result.files),
        "tokens": result.tokens,
        "padded_tokens": result.padded_tokens,
        "seconds": round(seconds, 3),
        "process": [who.index, who.count],
        **result.extra,
    }


def _unit_line(m: dict) -> str:
    s = max(m["seconds"], 1e-9)
    pad = 1 - m["tokens"] / m["padded_tokens"] if m["padded_tokens"] else 0.0
    skipped = f", {sum(m['skipped'].values())} invalid skipped" if m["skipped"] else ""
    return (
        f"{m['records']} records{skipped} in {m['seconds']:.1f} s "
        f"({m['records'] / s:.1f} records/s, {m['tokens'] / s:.0f} tokens/s, padding {pad:.0%})"
    )


def write_files(root: Any, files: Mapping[str, bytes]) -> None:
    """Each of ``files`` (name relative to ``root`` -> bytes) written whole."""
    for name, data in files.items():
        paths.write_bytes(root / name, data)


def _write_unit(root, unit: Unit, result: Result, marker: dict, metrics) -> None:
    write_files(root, result.files)
    paths.write_text(root / marker_name(unit.index), json.dumps(marker) + "\n")
    if metrics is not None:
        metrics.parent.mkdir(parents=True, exist_ok=True)
        with open(metrics, "a") as f:
            f.write(json.dumps({"time": time.time(), **marker}) + "\n")


def settle(
    out: str | os.PathLike, command: str, opts: Any, fmt: str, ckpt_path: Any, step: int, **extra
) -> None:
    """The job's settings (``job.json``): what every job has (inputs, unit size, format, the
    checkpoint and its step, ``opts``' dtype, batch budget and ``--unknown-as-x``) and ``extra``;
    written by the first run, checked by a rerun (``settle_job``)."""
    settings = {
        "command": command,
        "inputs": [paths.absolute(p) for p in opts.inputs],
        "unit_size": opts.unit_size,
        "format": fmt,
        "checkpoint": paths.absolute(ckpt_path),
        "step": step,
        "dtype": opts.dtype,
        "max_tokens_per_batch": opts.max_tokens_per_batch,
        "unknown_as_x": opts.unknown_as_x,
        **extra,
    }
    settle_job(out, {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()})


def esm2_engine(ckpt: Any, step: int | None, dtype: str) -> tuple[Any, int]:
    """(Engine, restored step): the ESM-2 of ``ckpt`` on this process's devices (``fsdp`` as far
    as the model divides, the rest ``data``), with the compilation cache in use."""
    from esmjax.inference.engine import Engine
    from esmjax.io import checkpoint
    from esmjax.parallel import sharding as shd

    use_compilation_cache()
    rules = shd.resolve_rules("fsdp")
    mesh = checkpoint.inference_mesh(ckpt, rules, dtype, local=True)
    model, restored = checkpoint.load_model(ckpt, step=step, mesh=mesh, rules=rules, dtype=dtype)
    return Engine(model, mesh, rules), restored
