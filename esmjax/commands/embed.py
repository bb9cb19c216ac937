"""``esmjax embed``: representations, logits and contacts of a FASTA file's records."""

from __future__ import annotations

import argparse

from esmjax.config import DTYPES
from esmjax.inference.options import EMBED_FORMATS, INCLUDE_CHOICES, EmbedOptions, from_args


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint",
        required=True,
        help="esmjax checkpoint folder or training workdir, or a released model by name "
        "(esm2_t33_650M_UR50D, facebook/esm2_t33_650M_UR50D): downloaded and converted once",
    )
    p.add_argument("--fasta", required=True, help="input FASTA (plain or gzip)")
    p.add_argument("--out", required=True, help="output folder (<id>.npz or <label>.pt files)")
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
        default="npz",
        choices=EMBED_FORMATS,
        help="npz: one <id>.npz per record; fair-esm: one <label>.pt as esm-extract writes",
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
    # imported here, not at the top: `--help` must not import jax
    from esmjax.inference.embed import embed_fasta
    from esmjax.io.convert import checkpoint_folder

    ckpt = checkpoint_folder(args.checkpoint)  # a name: converted once into the cache
    layers = " ".join(args.layers)  # `--repr-layers -1 -2` as esm-extract takes them
    opts = from_args(EmbedOptions, args, layers=layers, progress=not args.no_progress)
    embed_fasta(ckpt, opts)
    return 0
