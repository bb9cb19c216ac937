"""``esmjax inspect-outputs``: the units of an inference job folder, its record count, and the units
missing or damaged (``esmjax.inference.outputs``)."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", help="the --out of an embed, fold, predict or evaluate job")
    p.add_argument(
        "--no-shard-check",
        action="store_true",
        help="do not open each shard's footer (one read per shard) to check its record count",
    )
    p.add_argument(
        "--redo-bad",
        action="store_true",
        help="remove the markers of damaged units, so that the next run of the job redoes them",
    )


def main(args: argparse.Namespace) -> int:
    """0 when the job is complete; 1 when units are missing or damaged (run the job again)."""
    from esmjax.inference import outputs

    report = outputs.inspect(args.out, check_shards=not args.no_shard_check)
    print(outputs.text(args.out, report))
    if args.redo_bad and report.bad:
        outputs.forget(args.out, sorted(report.bad))
        print(f"removed the markers of {len(report.bad)} damaged units: run the job again")
    return 0 if report.complete else 1
