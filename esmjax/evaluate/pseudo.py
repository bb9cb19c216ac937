"""``esmjax evaluate pseudo-perplexity``: the pseudo-perplexity of every record of FASTA files as an
inference job (``esmjax.inference.units``: work units, any number of processes, resumable), for
sets too large for ``evaluate perplexity --pseudo`` (which scores its FASTA in one process and
one go).

Each unit's shard (``units/<unit>.parquet``) holds per record ``id``, ``description``, ``index``,
``length`` (residues scored), ``nll`` (the summed negative log-likelihood of each residue masked in
turn, float64), ``loss`` (``nll / length``) and ``pseudo_perplexity`` (``exp(loss)``). When the last
unit is written, the process that wrote it (or a rerun) adds ``summary.json``: the set's
token-weighted pseudo-perplexity, summed in record order, so that it is the same whatever the
process count.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from esmjax.config import DTYPES
from esmjax.evaluate import perplexity
from esmjax.evaluate.variants import masked_scan
from esmjax.inference import preflight, shards, units
from esmjax.inference.engine import Engine
from esmjax.inference.inputs import InputStream
from esmjax.inference.options import JobOptions, choice
from esmjax.io import checkpoint, paths

log = logging.getLogger("esmjax.evaluate.pseudo")

SUMMARY_FILE = "summary.json"


@dataclass(frozen=True, kw_only=True)
class PseudoOptions(JobOptions):
    """What ``esmjax evaluate pseudo-perplexity`` scores and where it writes."""

    step: int | None = None
    dtype: str = choice("float32", DTYPES)
    max_tokens_per_batch: int = 8192


class StopCheck:
    """The ``progress`` of ``variants.masked_scan``: after each batch, a signal (``stopped``) stops
    the unit there (``units.Preempted``), not at its end: a unit of long records runs for minutes
    and a preemption notice gives seconds."""

    def __init__(self, stopped: Callable[[], bool]):
        self.stopped = stopped

    def update(self, _rows: int) -> None:
        if self.stopped():
            raise units.Preempted


def pll_unit(
    engine: Engine, unit: units.Unit, max_tokens: int, stopped: Callable[[], bool] = lambda: False
) -> units.Result:
    """One unit's shard: every record's summed NLL with each residue masked in turn."""
    check = StopCheck(stopped)
    check.update(0)  # a signal before the unit starts
    seqs = [r.sequence for r in unit.records]
    scan = masked_scan(engine, seqs, None, max_tokens, check)
    scored = perplexity.pseudo_figures(seqs, scan.logprobs)["per_sequence"] if seqs else []
    rows = []
    for i, (rec, s) in enumerate(zip(unit.records, scored)):
        head = {"id": rec.id, "description": rec.description, "index": unit.first + i}
        nll = s["loss"] * s["length"]
        rows.append({**head, "length": s["length"], "nll": nll, **s})
    meta = {"command": "pseudo-perplexity", "unit": unit.index}
    files = {units.shard_name(unit.index): shards.shard_bytes(rows, meta)}
    return units.Result(files, scan.tokens, scan.padded_tokens)


def summarize(out: str) -> dict | None:
    """The set's figures once every unit is done (``summary.json``), else None."""
    total = units.read_json(paths.given(out) / units.TOTAL_FILE)
    done = units.done_units(out)
    if total is None or len(done) < total["units"]:
        return None
    nll, residues, sequences = 0.0, 0, 0
    for k in range(total["units"]):
        table = shards.open_table(paths.given(out) / units.shard_name(k), ["nll", "length"])
        for v, n in zip(table.column("nll").to_pylist(), table.column("length").to_pylist()):
            nll, residues, sequences = nll + v, residues + n, sequences + 1
    summary = {
        "pseudo_perplexity": math.exp(nll / residues) if residues else None,
        "loss": nll / residues if residues else None,
        "residues": residues,
        "sequences": sequences,
    }
    paths.write_text(paths.given(out) / SUMMARY_FILE, json.dumps(summary, indent=1) + "\n")
    return summary


def run_units(
    source: checkpoint.Checkpoint | str,
    opts: PseudoOptions,
    command: str,
    process: Callable[[Engine, units.Unit, Callable[[], bool]], units.Result],
    **settings: Any,
) -> None:
    """A per-record scoring job of an ESM-2 (pseudo-perplexity, masked marginals): this process's
    units not yet done, each ``process(engine, unit, stopped)``; ``settings`` join ``job.json``."""
    ckpt, out = checkpoint.opened(source).checked(), opts.out
    preflight.output(out, f"--out {out}")
    who = units.worker(process_id=opts.process_id, num_processes=opts.num_processes)
    stream = InputStream(opts.inputs, opts.unknown_as_x, opts.skip_invalid)
    with paths.output_folder(out):
        engine, restored = units.esm2_engine(ckpt, opts.step, opts.dtype)
        units.settle(out, command, opts, "shards", ckpt.path, restored, **settings)
        with stream.progress(command, opts.progress) as bar:
            units.run(
                out,
                stream.units(opts.unit_size),
                lambda unit, stopped: process(engine, unit, stopped),
                who,
                command=command,
                progress=bar.update,
            )


def score_fasta(source: checkpoint.Checkpoint | str, opts: PseudoOptions) -> dict | None:
    """The job: this process's units not yet done; returns the summary once the set is done."""
    out, budget = opts.out, opts.max_tokens_per_batch
    run_units(
        source,
        opts,
        "pseudo-perplexity",
        lambda engine, unit, stopped: pll_unit(engine, unit, budget, stopped),
    )
    summary = summarize(out)
    if summary is None:
        log.info("units of other processes are not done: the last one writes %s", SUMMARY_FILE)
    else:
        log.info(
            "pseudo-perplexity %.4f over %d sequences (%d residues)",
            summary["pseudo_perplexity"] or float("nan"),
            summary["sequences"],
            summary["residues"],
        )
    return summary
