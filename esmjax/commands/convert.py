"""``esmjax convert SRC [OUT]``: fair-esm / HuggingFace weights -> an esmjax checkpoint."""

from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "src",
        help="fair-esm .pt (e.g. esm2_t33_650M_UR50D.pt) or a HuggingFace model folder; or a "
        "released model by name, downloaded first: a fair-esm name (esm2_t33_650M_UR50D, cached "
        "like torch hub) or an HF hub id (facebook/esmfold_v1)",
    )
    p.add_argument(
        "out",
        nargs="?",
        default=None,
        help="esmjax checkpoint folder to create (default for a name: "
        "$ESMJAX_HOME/models/<name>, ~/.cache/esmjax/models/<name>)",
    )
    p.add_argument(
        "--esm",
        default=None,
        help="ESMFold .pt only: the ESM-2 it folds with (fair-esm .pt, HF folder, esmjax "
        "checkpoint or a fair-esm name), e.g. esm2_t36_3B_UR50D for esmfold_3B_v1.pt",
    )


def main(args: argparse.Namespace) -> int:
    from esmjax.errors import InputError
    from esmjax.inference import preflight
    from esmjax.io import hub
    from esmjax.io.convert import convert

    out = args.out
    if out is None:
        if not hub.is_name(args.src):
            raise InputError(
                f"{args.src}: give OUT, the checkpoint folder to create (a released model's name "
                "alone converts into the model cache)"
            )
        out = str(hub.cached_checkpoint(args.src))
        if (hub.cached_checkpoint(args.src) / "config.json").exists():  # converted before
            print(out)
            return 0
    preflight.output(out, f"out {out}")  # before the weights are read
    print(convert(args.src, out, esm=args.esm), file=sys.stderr)
    print(out)
    return 0
