"""``esmjax predict --checkpoint W --fasta F [F ...] --out preds.csv|preds.jsonl|FOLDER``: a
fine-tuned task model's predictions (``esmjax.inference.predictions``): one ``.csv``/``.jsonl`` file
written by one process, or, for a folder (or ``--format shards``), a job of work units with one
Parquet shard per unit (any number of processes, resumable). Each sequence is cropped to the run's
``data.max_length`` as the run's training and test figures cropped it (one warning line counts the
cropped ones; residue rows carry ``truncated_at``)."""

from __future__ import annotations

import argparse
import sys

from esmjax.inference.options import (
    PREDICT_FORMATS,
    PredictOptions,
    add_job_arguments,
    from_args,
    run_job,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="an esmjax finetune workdir")
    add_job_arguments(p, 1000, None)
    p.add_argument(
        "--format",
        default="auto",
        choices=PREDICT_FORMATS,
        help="auto: one file for an --out ending in .csv (sequence tasks) or .jsonl (residue "
        "tasks), else a job folder; shards: a job folder whatever --out's name",
    )
    p.add_argument("--step", type=int, default=None, help="run step (default: the best one)")
    p.add_argument("--max-tokens-per-batch", type=int, default=8192, help="tokens per batch")
    p.epilog = (
        "--out P.csv / P.jsonl: one file of every record, written by one process (--unit-size "
        "unused, more than one process refused). --out FOLDER (or a bucket URL): a job of work "
        "units, one Parquet shard per unit (units/<unit>.parquet: id, description, index, length "
        "and the file's columns; residue tasks add probabilities [L, C]), done/<unit>.json "
        "markers; rerun the same command to resume, run it on several processes "
        "(--process-id/--num-processes or a launcher) to share the units, and check it with "
        "`esmjax inspect-outputs FOLDER`."
    )


def main(args: argparse.Namespace) -> int:
    # imported here, not at the top: `--help` must not import jax
    from esmjax.inference.predictions import predict_file, predict_job

    opts = from_args(PredictOptions, args, progress=not args.no_progress)
    if opts.writes_file:
        print(predict_file(args.checkpoint, opts), file=sys.stderr)
        return 0
    return run_job(lambda: predict_job(args.checkpoint, opts))
