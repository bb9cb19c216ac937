"""``esmjax predict``: a fine-tuned task model's predictions, as one file or as an inference job.

``--out P.csv`` / ``P.jsonl`` writes one file from one process (``task.predict_fasta``). Any other
``--out`` (a folder or a bucket URL), or ``--format shards``, runs the input as a job of work units
(``esmjax.inference.units``: any number of processes, resumable, ``esmjax inspect-outputs``), for
inputs too large for one process and one file.

Each unit's shard (``units/<unit>.parquet``) holds per record ``id``, ``description``, ``index``
(the record's position in the input) and ``length`` (the residues the model saw: the crop to the
run's ``data.max_length``), then the columns of the file's rows (``task.prediction_rows``, one
implementation for both): ``prediction`` and ``prob_<label>`` (sequence classification),
``prediction_<i>`` (regression), or ``sequence``, ``prediction`` (one label per residue) and
``truncated_at`` (residue tasks, which add ``probabilities`` [L, C], the per-residue softmax in the
order of the schema metadata's ``labels``). Each marker counts the unit's cropped sequences
(``cropped``); each process logs one warning line counting its own.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

from esmjax.errors import InputError
from esmjax.inference import preflight, shards, task, units
from esmjax.inference.engine import Engine, bucketed
from esmjax.inference.inputs import AUTO_SHARDS_ABOVE, InputStream
from esmjax.inference.options import PredictOptions
from esmjax.io import paths

log = logging.getLogger("esmjax.inference.predictions")


def predict_file(source: Any, opts: PredictOptions) -> str:
    """``task.predict_fasta`` into the one file ``opts.out``; its message. A file is written by one
    process: a process count above 1 (the options or a launcher's variables) is refused, as two
    processes would each write every record into it."""
    who = units.worker(process_id=opts.process_id, num_processes=opts.num_processes)
    if who.count > 1:
        raise InputError(
            f"--out {opts.out} is one file, written by one process ({who}): give a folder "
            "(or --format shards) to share the input between processes as a job of work units"
        )
    return task.predict_fasta(
        source,
        opts.inputs,
        opts.out,
        opts.step,
        opts.max_tokens_per_batch,
        opts.unknown_as_x,
        opts.skip_invalid,
    )


def predict_unit(
    engine: Engine,
    setup: task.Setup,
    unit: units.Unit,
    max_tokens: int,
    stopped: Callable[[], bool] = lambda: False,
) -> units.Result:
    """One unit's shard: ``task.predict`` on the unit's crops, rows as ``task.prediction_rows``."""
    if stopped():
        raise units.Preempted
    tokens, cropped = task.cropped_tokens(setup, unit.records)
    outputs = task.predict(engine, tokens, max_tokens)
    cfg = setup.cfg
    per_residue = cfg.task == "residue_classification"
    rows = []
    found = zip(unit.records, tokens, outputs, task.prediction_rows(setup, unit.records, outputs))
    for i, (rec, t, o, row) in enumerate(found):
        head = {"id": rec.id, "description": rec.description, "index": unit.first + i}
        arrays = {"probabilities": task.probabilities(o, cfg.multi_label)} if per_residue else {}
        rows.append({**head, "length": len(t) - 2, **row, **arrays})  # t holds BOS and EOS
    meta = {"command": "predict", "unit": unit.index, "task": cfg.task}
    meta["labels"] = list(setup.labels)  # the order of the probabilities columns
    files = {units.shard_name(unit.index): shards.shard_bytes(rows, meta)}
    # the padded batches task.predict runs
    lengths = [len(t) for t in tokens]
    padded = sum(w * r for w, r, _ in bucketed(lengths, max_tokens, engine.row_multiple))
    return units.Result(files, sum(lengths), padded, {"cropped": cropped})


def predict_job(source: Any, opts: PredictOptions) -> int:
    """``esmjax predict`` into the folder ``opts.out``: this process's units not yet done, on this
    process's devices. Returns the records this process predicted; raises ``units.Preempted``
    after SIGTERM."""
    run, _ = task.finetune_task(source)
    out = opts.out
    preflight.output(out, f"--out {out}")
    who = units.worker(process_id=opts.process_id, num_processes=opts.num_processes)
    stream = InputStream(opts.inputs, opts.unknown_as_x, opts.skip_invalid)
    # a small input is checked whole before the model loads, as the one-file predict checks it
    stream.peek(AUTO_SHARDS_ABOVE + 1)
    seen = {"records": 0, "cropped": 0}  # this process's, for its one warning line
    # a missing bucket fails before the model loads; a failed run leaves no empty folder
    with paths.output_folder(out):
        units.use_compilation_cache()
        setup, engine, got = task.task_engine(run, opts.step)
        cfg = setup.cfg
        settings = dataclasses.replace(opts, dtype=cfg.dtype)
        extra = {"task": cfg.task, "max_length": cfg.data.max_length}
        units.settle(out, "predict", settings, "shards", run.path, got, **extra)

        def process(unit: units.Unit, stopped: Callable[[], bool]) -> units.Result:
            result = predict_unit(engine, setup, unit, opts.max_tokens_per_batch, stopped)
            seen["records"] += len(unit.records)
            seen["cropped"] += result.extra["cropped"]
            return result

        with stream.progress("predict", opts.progress) as bar:
            totals = units.run(
                out,
                stream.units(opts.unit_size),
                process,
                who,
                command="predict",
                progress=bar.update,
            )
    task.warn_cropped(setup, seen["cropped"], seen["records"])
    log.info("wrote %d records to %s (step %d)", totals.records, out, got)
    return totals.records
