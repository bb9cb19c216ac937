"""``esmjax embed``: representations, logits and contacts of a FASTA file's records."""

from __future__ import annotations

import argparse

from esmjax.config import DTYPES
from esmjax.inference.embed import embed_fasta
from esmjax.inference.options import INCLUDE_CHOICES, EmbedOptions, from_args


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint", required=True, help="esmjax checkpoint folder or training workdir"
    )
    p.add_argument("--fasta", required=True, help="input FASTA (plain or gzip)")
    p.add_argument("--out", required=True, help="output folder for <id>.npz files")
    p.add_argument("--step", type=int, default=None, help="training step (default: latest)")
    p.add_argument(
        "--layers",
        default="-1",
        help="layer indices (negatives from the end) or 'all' [default: -1]",
    )
    p.add_argument(
        "--include", nargs="+", default=["mean"], choices=INCLUDE_CHOICES, help="what to write"
    )
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="compute dtype")
    p.add_argument("--max-tokens-per-batch", type=int, default=4096, help="padded tokens per batch")
    p.add_argument(
        "--truncation-seq-length", type=int, default=1022, help="residues kept per record (0 = all)"
    )
    p.add_argument(
        "--unknown-as-x", action="store_true", help="read characters outside the alphabet as X"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    embed_fasta(args.checkpoint, from_args(EmbedOptions, args, progress=not args.no_progress))
    return 0
