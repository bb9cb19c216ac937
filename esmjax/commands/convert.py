"""``esmjax convert SRC OUT``: fair-esm / HuggingFace weights -> an esmjax checkpoint."""

from __future__ import annotations

import argparse
import sys

from esmjax.io.convert import convert


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "src", help="fair-esm .pt (e.g. esm2_t33_650M_UR50D.pt) or a HuggingFace model folder"
    )
    p.add_argument("out", help="esmjax checkpoint folder to create")
    p.add_argument(
        "--esm",
        default=None,
        help="ESMFold .pt only: the ESM-2 it folds with (fair-esm .pt, HF folder or esmjax "
        "checkpoint), e.g. esm2_t36_3B_UR50D.pt for esmfold_3B_v1.pt",
    )


def main(args: argparse.Namespace) -> int:
    from esmjax.inference import preflight

    preflight.output(args.out, f"out {args.out}")  # before the weights are read
    print(convert(args.src, args.out, esm=args.esm), file=sys.stderr)
    return 0
