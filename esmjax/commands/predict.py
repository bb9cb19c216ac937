"""``esmjax predict --checkpoint W --fasta F --out preds.csv|preds.jsonl``: a fine-tuned task
model's predictions (``esmjax.inference.task.predict_fasta``). Each sequence is cropped to the
run's ``data.max_length`` as the run's training and test figures cropped it (one warning line
counts the cropped ones; residue rows carry ``truncated_at``)."""

from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="an esmjax finetune workdir")
    p.add_argument("--fasta", required=True, help="sequences to predict")
    p.add_argument("--out", required=True, help=".csv (sequence tasks) or .jsonl (residue tasks)")
    p.add_argument("--step", type=int, default=None, help="run step (default: the best one)")
    p.add_argument("--max-tokens-per-batch", type=int, default=8192, help="tokens per batch")


def main(args: argparse.Namespace) -> int:
    from esmjax.commands import _checks
    from esmjax.inference.task import predict_fasta

    # The checkpoint's task and the output, checked before the model loads and computes.
    _check_workdir(args.checkpoint, args.out)
    _checks.output(args.out, f"--out {args.out}", folder=False)
    msg = predict_fasta(args.checkpoint, args.fasta, args.out, args.step, args.max_tokens_per_batch)
    print(msg, file=sys.stderr)
    return 0


def _check_workdir(workdir: str, out: str) -> None:
    """A local ``--checkpoint`` is a fine-tuning run whose task writes ``out``'s format (the
    checks ``predict_fasta`` makes once the model is loaded, made first)."""
    from pathlib import PurePosixPath

    from esmjax.commands._checks import holds
    from esmjax.errors import InputError
    from esmjax.io import checkpoint, paths

    if paths.is_remote(workdir):
        return
    raw = checkpoint.read_config(workdir)
    if "finetune" not in raw:
        raise InputError(
            f"--checkpoint {workdir} holds {holds(raw)}, not a fine-tuning run "
            "(esmjax predict reads `esmjax finetune` workdirs)"
        )
    task = raw["finetune"].get("task") if isinstance(raw["finetune"], dict) else None
    residue = task == "residue_classification"
    if residue != (PurePosixPath(out).suffix == ".jsonl"):
        raise InputError(f"--out {out}: residue tasks write .jsonl, sequence tasks .csv")
