"""``esmjax export CKPT --to fair-esm|hf|esmfold OUT``: an esmjax checkpoint (or a fine-tuning
workdir: an HF task model, or its merged backbone) in other formats."""

from __future__ import annotations

import argparse
import sys

from esmjax.inference.task import export_any


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="esmjax checkpoint folder, training or fine-tuning workdir")
    p.add_argument("out", help="output: a .pt file (fair-esm) or a folder (hf)")
    p.add_argument(
        "--to",
        required=True,
        choices=["fair-esm", "hf", "esmfold", "peft"],
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
    from esmjax.commands import _checks

    # where the export goes, before the weights are read (a fair-esm .pt is a file, the rest
    # folders)
    _checks.output(args.out, f"out {args.out}", folder=args.to != "fair-esm")
    print(
        export_any(
            args.checkpoint, args.out, args.to, step=args.step, folding_head=args.folding_head
        ),
        file=sys.stderr,
    )
    return 0
