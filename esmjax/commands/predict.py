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
    from esmjax.inference.task import predict_fasta

    msg = predict_fasta(args.checkpoint, args.fasta, args.out, args.step, args.max_tokens_per_batch)
    print(msg, file=sys.stderr)
    return 0
