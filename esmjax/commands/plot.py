"""``esmjax plot W``: loss and perplexity curves of a training workdir."""

from __future__ import annotations

import argparse

from esmjax.evaluate.plot import METRICS_FILE, plot_workdir


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "workdir", help=f"training workdir (holding {METRICS_FILE}) or a {METRICS_FILE} file"
    )
    p.add_argument("--out", help="output PNG [default: W/plots/training.png]")


def main(args: argparse.Namespace) -> int:
    plot_workdir(args.workdir, args.out)
    return 0
