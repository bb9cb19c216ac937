"""``esmjax embed``: representations, logits and contacts of a FASTA file's records."""

from __future__ import annotations

import argparse

from esmjax.config import DTYPES
from esmjax.inference.options import (
    EMBED_FORMATS,
    INCLUDE_CHOICES,
    EmbedOptions,
    add_job_arguments,
    from_args,
    run_job,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint",
        required=True,
        help="esmjax checkpoint folder or training workdir, or a released model by name "
        "(esm2_t33_650M_UR50D, facebook/esm2_t33_650M_UR50D): downloaded and converted once",
    )
    add_job_arguments(p, 1000, "<id>.npz (or esm-extract's <label>.pt)")
    p.add_argument("--step", type=int, default=None, help="training step (default: latest)")
    p.add_argument(
        "--layers",
        "--repr-layers",
        nargs="+",
        default=["-1"],
        help="layer indices (negatives from the end) or 'all' [default: -1]",
    )
    p.add_argument(
        "--include", nargs="+", default=["mean"], choices=INCLUDE_CHOICES, help="what to write"
    )
    p.add_argument(
        "--format",
        default="auto",
        choices=EMBED_FORMATS,
        help="npz: one <id>.npz per record; fair-esm: one <label>.pt as esm-extract writes; "
        "shards: one Parquet file per unit; auto: npz up to 1000 records, shards above",
    )
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="compute dtype")
    p.add_argument("--max-tokens-per-batch", type=int, default=4096, help="padded tokens per batch")
    p.add_argument(
        "--truncation-seq-length", type=int, default=1022, help="residues kept per record (0 = all)"
    )


def main(args: argparse.Namespace) -> int:
    # imported here, not at the top: `--help` must not import jax
    from esmjax.inference.embed import embed_fasta
    from esmjax.io.convert import checkpoint_folder

    ckpt = checkpoint_folder(args.checkpoint)  # a name: converted once into the cache
    layers = " ".join(args.layers)  # `--repr-layers -1 -2` as esm-extract takes them
    opts = from_args(EmbedOptions, args, layers=layers, progress=not args.no_progress)
    return run_job(lambda: embed_fasta(ckpt, opts))
