"""``esmjax fold``: ESMFold structures and confidences for a FASTA file's records."""

from __future__ import annotations

import argparse

from esmjax.commands import _checks
from esmjax.inference.fold import fold_fasta


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint",
        required=True,
        help="esmjax ESMFold checkpoint folder (from `esmjax convert`)",
    )
    p.add_argument(
        "--fasta", required=True, help="input FASTA; ':' inside a record separates multimer chains"
    )
    p.add_argument("--out", required=True, help="output folder for <id>.pdb and <id>.json")
    p.add_argument(
        "--num-recycles",
        type=int,
        default=None,
        help="extra trunk passes (default: the model's max_recycles passes in all, 4 for "
        "esmfold_v1)",
    )
    p.add_argument(
        "--chunk-size",
        type=int,
        default=None,
        help="row chunk of the triangle attentions: less memory for long sequences (e.g. 128, "
        "64, 32)",
    )
    p.add_argument(
        "--max-tokens-per-batch", type=int, default=1024, help="padded residues per batch [1024]"
    )
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="compute dtype of the language model (the trunk is always float32)",
    )
    p.add_argument("--mmcif", action="store_true", help="also write <id>.cif")
    p.add_argument(
        "--max-length", type=int, default=4096, help="refuse longer records (linkers included)"
    )
    p.add_argument(
        "--unknown-as-x", action="store_true", help="read characters outside the alphabet as X"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    # before fold_fasta creates --out: a wrong --checkpoint leaves no empty output folder
    _checks.local_checkpoint(args.checkpoint, esmfold=True)
    _checks.output(args.out, f"--out {args.out}")  # before the model loads
    fold_fasta(
        args.checkpoint,
        args.fasta,
        args.out,
        num_recycles=args.num_recycles,
        chunk_size=args.chunk_size,
        max_tokens=args.max_tokens_per_batch,
        dtype=args.dtype,
        mmcif=args.mmcif,
        max_length=args.max_length,
        unknown_as_x=args.unknown_as_x,
        progress=not args.no_progress,
    )
    return 0
