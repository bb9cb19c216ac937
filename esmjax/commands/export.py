"""``esmjax export CKPT --to fair-esm|hf|esmfold OUT``: an esmjax checkpoint (or a fine-tuning
workdir: an HF task model, or its merged backbone) in other formats."""

from __future__ import annotations

import argparse
import sys

from esmjax.inference.options import EXPORT_TARGETS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="esmjax checkpoint folder, training or fine-tuning workdir")
    p.add_argument("out", help="output: a .pt file (fair-esm) or a folder (hf)")
    p.add_argument(
        "--to",
        required=True,
        choices=EXPORT_TARGETS,
        help="target format (peft: a LoRA fine-tuning run's adapters)",
    )
    p.add_argument(
        "--folding-head",
        default=None,
        help="--to esmfold: the ESMFold (esmjax folder, fair-esm .pt or HF folder) whose trunk "
        "and heads fold with this checkpoint's ESM-2",
    )
    p.add_argument(
        "--step", type=int, default=None, help="training step to export (default: latest)"
    )


def main(args: argparse.Namespace) -> int:
    # imported here, not at the top: `--help` must not import jax
    from esmjax.inference.export import export_any

    print(
        export_any(
            args.checkpoint, args.out, args.to, step=args.step, folding_head=args.folding_head
        ),
        file=sys.stderr,
    )
    return 0
