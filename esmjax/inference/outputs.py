"""``esmjax inspect-outputs``: what an inference job folder holds (``esmjax.inference.units``), and
what is missing or damaged.

A unit is *done* when its marker (``done/<unit>.json``) is there and readable, and every file it
lists is there; a shard must also open (its Parquet footer) with the marker's record count. A
shard without a marker was in flight when its process stopped (a rerun writes it again). The
units expected are those of ``total.json``, which a process writes when it has read the whole
input; before that, the count is unknown and only the done ones are listed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from esmjax.errors import InputError
from esmjax.inference import shards, units
from esmjax.io import paths


@dataclass
class Inspection:
    job: dict
    total: dict | None
    done: dict[int, dict] = field(default_factory=dict)
    missing: list[int] = field(default_factory=list)  # expected, no marker
    bad: dict[int, str] = field(default_factory=dict)  # marker there, outputs not
    in_flight: list[int] = field(default_factory=list)  # a shard without its marker

    @property
    def complete(self) -> bool:
        return self.total is not None and not self.missing and not self.bad


def inspect(out: str | os.PathLike, check_shards: bool = True) -> Inspection:
    """The state of the job in ``out``; ``check_shards`` opens every shard's footer."""
    root = paths.given(out)
    job = units.read_json(root / units.JOB_FILE)
    if job is None:
        raise InputError(f"{out}: no {units.JOB_FILE}: not the output folder of an esmjax job")
    total = units.read_json(root / units.TOTAL_FILE)
    found = units.done_units(out)
    markers = units.read_markers(out, sorted(found))
    listed = _listing(root)
    report = Inspection(job, total)
    for k, marker in markers.items():
        if marker is None:
            report.bad[k] = "its marker is not readable JSON"
            continue
        absent = [f for f in marker["files"] if f not in listed]
        if absent:
            report.bad[k] = f"{len(absent)} of its files missing ({absent[0]})"
            continue
        problem = _shard_problem(root, marker) if check_shards else None
        if problem:
            report.bad[k] = problem
        else:
            report.done[k] = marker
    expected = range(total["units"]) if total is not None else []
    report.missing = [k for k in expected if k not in markers]
    shard_units = {
        int(name[len(units.UNIT_DIR) + 1 : -len(shards.SUFFIX)])
        for name in listed
        if name.startswith(units.UNIT_DIR + "/") and name.endswith(shards.SUFFIX)
    }
    report.in_flight = sorted(shard_units - set(markers))
    return report


def _listing(root) -> set[str]:
    """Every file under ``root``, as paths relative to it."""
    with paths.remote_errors(root):
        return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def _shard_problem(root, marker: dict) -> str | None:
    for name in marker["files"]:
        if not name.endswith(shards.SUFFIX):
            continue
        try:
            rows = shards.num_rows(root / name)
        except (OSError, ValueError) as e:  # pyarrow's errors are ValueError/OSError subclasses
            return f"{name} is not a readable Parquet file ({type(e).__name__})"
        if rows != marker["records"]:
            return f"{name} holds {rows} records, its marker {marker['records']}"
    return None


def forget(out: str | os.PathLike, bad: list[int]) -> None:
    """Removes the markers of the units ``bad``: the next run of the job redoes them."""
    root = paths.given(out)
    with paths.remote_errors(out):
        for k in bad:
            (root / units.marker_name(k)).unlink(missing_ok=True)


def spans(numbers: list[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``"0-2, 5, 7-8"``."""
    out, start = [], None
    for i, k in enumerate(numbers):
        if start is None:
            start = k
        if i + 1 == len(numbers) or numbers[i + 1] != k + 1:
            out.append(f"{start}" if start == k else f"{start}-{k}")
            start = None
    return ", ".join(out)


def text(out: str, r: Inspection) -> str:
    """The report ``esmjax inspect-outputs`` prints."""
    job = r.job
    records = sum(m["records"] for m in r.done.values())
    skipped: dict[str, int] = {}
    for m in r.done.values():
        for reason, n in m["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + n
    expected = f"of {r.total['units']}" if r.total else "of ? (no process read the whole input yet)"
    lines = [
        f"{out}: esmjax {job['command']} ({job['format']}), {job['unit_size']} records per unit",
        f"units done: {len(r.done)} {expected}",
        f"records: {records}" + (f" of {r.total['records']}" if r.total else ""),
    ]
    if skipped:
        why = ", ".join(f"{n} {k}" for k, n in skipped.items())
        lines.append(f"invalid records skipped: {why}")
    seconds = sum(m["seconds"] for m in r.done.values())
    if seconds > 0:
        tokens = sum(m["tokens"] for m in r.done.values())
        padded = sum(m["padded_tokens"] for m in r.done.values())
        pad = 1 - tokens / padded if padded else 0.0
        lines.append(
            f"throughput (per process, while computing): {records / seconds:.2f} records/s, "
            f"{tokens / seconds:.0f} tokens/s, padding {pad:.1%}"
        )
    if r.missing:
        lines.append(f"missing units ({len(r.missing)}): {spans(r.missing)}")
    for k, why in sorted(r.bad.items()):
        lines.append(f"bad unit {k}: {why}")
    if r.in_flight:
        lines.append(f"in flight when stopped (redone by a rerun): {spans(r.in_flight)}")
    lines.append("complete" if r.complete else "not complete: run the same command again")
    return "\n".join(lines)
