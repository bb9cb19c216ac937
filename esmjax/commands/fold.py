"""``esmjax fold``: ESMFold structures and confidences for a FASTA file's records."""

from __future__ import annotations

import argparse

from esmjax.config import DTYPES
from esmjax.inference.options import (
    FOLD_FORMATS,
    FoldOptions,
    add_job_arguments,
    from_args,
    run_job,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint",
        required=True,
        help="esmjax ESMFold checkpoint folder (from `esmjax convert`), or an HF hub id "
        "(facebook/esmfold_v1): downloaded and converted once",
    )
    add_job_arguments(p, 100, "<id>.pdb and <id>.json (and <id>.cif)")
    p.add_argument(
        "--format",
        default="auto",
        choices=FOLD_FORMATS,
        help="files: <id>.pdb/.json per record; shards: one Parquet file per unit (PDB/mmCIF "
        "text, pLDDT, pTM, PAE); auto: files up to 1000 records, shards above",
    )
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
        choices=DTYPES,
        help="compute dtype of the language model (the trunk is always float32)",
    )
    p.add_argument("--mmcif", action="store_true", help="also write <id>.cif")
    p.add_argument(
        "--max-length", type=int, default=4096, help="refuse longer records (linkers included)"
    )


def main(args: argparse.Namespace) -> int:
    # imported here, not at the top: `--help` must not import jax
    from esmjax.inference.fold import fold_fasta
    from esmjax.io.convert import checkpoint_folder

    ckpt = checkpoint_folder(args.checkpoint)  # a name: converted once into the cache
    opts = from_args(FoldOptions, args, progress=not args.no_progress)
    return run_job(lambda: fold_fasta(ckpt, opts))
