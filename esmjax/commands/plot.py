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
    from pathlib import Path

    from esmjax.commands import _checks
    from esmjax.io import paths

    # matplotlib and the PNG's place, before the metrics are read and drawn
    _checks.plotting("esmjax plot")
    if args.out:
        _checks.output(args.out, f"--out {args.out}", folder=False)
    elif not paths.is_remote(args.workdir) and Path(args.workdir).exists():
        w = Path(args.workdir)
        default = (w if w.is_dir() else w.parent) / "plots" / "training.png"
        _checks.output(default, f"{default} (the default --out)", folder=False)
    plot_workdir(args.workdir, args.out)
    return 0
