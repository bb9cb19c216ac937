"""``esmjax data build`` (FASTA + membership TSV -> dataset folder) and ``esmjax data inspect``
(statistics and records drawn by the training sampler, one JSON line each)."""

from __future__ import annotations

import argparse
import sys

from esmjax.data import source

# Residue-length histogram edges for `inspect` (the last bin holds what a 1,024-token crop cuts).


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="data_command", metavar="{build,inspect}", required=True)
    b = sub.add_parser("build", help="build a dataset folder (TFDS ArrayRecord) from FASTA files")
    b.add_argument(
        "--fasta", nargs="+", required=True, metavar="F", help="FASTA files, plain or .gz"
    )
    b.add_argument(
        "--clusters",
        metavar="TSV",
        help="membership TSV 'cluster_id<TAB>member_id' (e.g. UniRef50 -> UniRef90 members, "
        "MMseqs2 createtsv); without it every record is its own cluster",
    )
    b.add_argument(
        "--out", required=True, metavar="DIR", help="dataset folder to create (must not exist)"
    )
    b.add_argument(
        "--val-fraction",
        type=float,
        default=0.005,
        help="fraction of clusters held out (default 0.005)",
    )
    b.add_argument(
        "--skip-invalid", action="store_true", help="skip and count bad records and rows"
    )
    b.add_argument(
        "--unknown-as-x", action="store_true", help="read characters outside the alphabet as X"
    )
    b.add_argument(
        "--beam-runner",
        metavar="RUNNER",
        help="build with Apache Beam on this runner (DirectRunner, DataflowRunner, FlinkRunner, "
        "...; needs the 'beam' extra)",
    )
    b.add_argument(
        "--beam-option",
        action="append",
        default=[],
        metavar="FLAG",
        help="a Beam pipeline flag, repeatable (e.g. --beam-option=--direct_num_workers=4)",
    )
    i = sub.add_parser(
        "inspect", help="dataset statistics and records drawn by the training sampler"
    )
    i.add_argument("dataset", metavar="DIR", help="a folder made by `esmjax data build`")
    i.add_argument(
        "--sample", type=int, default=0, metavar="N", help="print N sampled records as JSON lines"
    )
    i.add_argument("--seed", type=int, default=0, help="sampler seed (default 0)")
    i.add_argument(
        "--split", default="train", choices=source.SPLITS, help="split to sample (default train)"
    )
    i.add_argument(
        "--cluster-exponent",
        type=float,
        default=0.0,
        help="cluster weight size**exponent (default 0: uniform)",
    )


def main(args: argparse.Namespace) -> int:
    return build_main(args) if args.data_command == "build" else inspect_main(args)


def build_main(args: argparse.Namespace) -> int:
    from esmjax.data.build import build_dataset
    from esmjax.inference import preflight

    preflight.output(args.out, f"--out {args.out}")  # before the FASTA files are read
    meta = build_dataset(
        args.fasta,
        args.out,
        clusters=args.clusters,
        val_fraction=args.val_fraction,
        skip_invalid=args.skip_invalid,
        unknown_as_x=args.unknown_as_x,
        beam_runner=args.beam_runner,
        beam_options=args.beam_option,
    )
    tr, va = meta["splits"]["train"], meta["splits"]["validation"]
    print(
        f"wrote {args.out} in {meta['built_seconds']:.1f}s: train {tr['records']} records in "
        f"{tr['clusters']} clusters, validation {va['records']} records in {va['clusters']} "
        "clusters",
        file=sys.stderr,
    )
    print(meta["stats"]["summary"], file=sys.stderr)
    return 0


def inspect_main(args: argparse.Namespace) -> int:
    from esmjax.data.inspect import inspect_dataset

    inspect_dataset(
        args.dataset, args.split, args.sample, args.seed, args.cluster_exponent, out=sys.stdout
    )
    return 0
