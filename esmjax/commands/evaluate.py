"""``esmjax evaluate``: argv -> options -> ``esmjax.evaluate.run`` (one library call each);
``all`` runs the subcommands a suite YAML lists and ``compare`` prints report cards side by side."""

from __future__ import annotations

import argparse
import functools
import logging
from pathlib import Path

from esmjax.errors import InputError

log = logging.getLogger("esmjax.evaluate")

SUBCOMMANDS = {
    "perplexity": "masked-LM perplexity on held-out data or a FASTA file (optionally "
    "pseudo-perplexity)",
    "contacts": "unsupervised contact precision on PDB/mmCIF structures (optionally fit the "
    "contact head)",
    "variants": "zero-shot variant effects (masked marginals) and Spearman with a deep "
    "mutational scan",
    "proteingym": "zero-shot fitness on ProteinGym substitution assays (Spearman, AUC, MCC, NDCG, "
    "top-10% recall)",
    "structures": "predicted vs experimental structures: lDDT, TM-score, GDT-TS, RMSD, pLDDT "
    "calibration",
    "all": "a checkpoint's report card: the evaluations a suite YAML lists, one summary",
    "compare": "side-by-side table of several report cards (summary.json of `evaluate all`)",
}


def _texts(name: str) -> dict[str, str]:
    """A subcommand's help and description: argparse %-formats help strings (not descriptions
    without ``%(prog)``), so the ``%`` of "top-10% recall" is doubled there."""
    return {"help": SUBCOMMANDS[name].replace("%", "%%"), "description": SUBCOMMANDS[name]}


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint", required=True, help="training workdir or converted checkpoint folder"
    )
    p.add_argument(
        "--step", type=int, default=None, help="step to restore [default: latest complete]"
    )
    p.add_argument("--out", help="report folder [default: <checkpoint>/eval/step_<N>]")
    p.add_argument(
        "--plot", action="store_true", help="also write PNG figures to the report folder"
    )
    p.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype"
    )
    p.add_argument(
        "--rules", default="fsdp", choices=["dp", "fsdp", "fsdp_tp"], help="sharding rules preset"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--coordinator-address", help="host:port of process 0 (multi-process runs)")
    p.add_argument("--num-processes", type=int, help="number of processes (multi-process runs)")
    p.add_argument("--process-id", type=int, help="this process's index (multi-process runs)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="what", metavar="WHAT", required=True)
    p = sub.add_parser("perplexity", **_texts("perplexity"))
    _common(p)
    p.add_argument(
        "--data",
        help="dataset folder (its validation split) or FASTA file [default: the run's held-out "
        "data]",
    )
    p.add_argument(
        "--rows",
        type=int,
        default=32,
        help="global packed rows per batch (rounded up to the devices)",
    )
    p.add_argument(
        "--seq-len",
        type=int,
        help="tokens per packed row [default: the run's data.seq_len, or 1024]",
    )
    p.add_argument(
        "--eval-tokens",
        type=int,
        help="tokens to evaluate, 0 = all [default: the run's data.eval_tokens, or 65536]",
    )
    p.add_argument(
        "--pseudo", action="store_true", help="also pseudo-perplexity (FASTA --data only)"
    )
    p.add_argument(
        "--max-sequences", type=int, default=0, help="pseudo-perplexity: first N records (0 = all)"
    )
    p.add_argument(
        "--max-tokens-per-batch",
        type=int,
        default=8192,
        help="pseudo-perplexity: padded tokens per batch",
    )

    p = sub.add_parser("contacts", **_texts("contacts"))
    _common(p)
    p.add_argument(
        "--structures",
        nargs="+",
        required=True,
        metavar="FILE[:CHAIN]",
        help="PDB/mmCIF files to score",
    )
    p.add_argument(
        "--fit", nargs="+", metavar="FILE[:CHAIN]", help="fit the contact regression on these first"
    )
    p.add_argument(
        "--save",
        help="where --fit writes the checkpoint with the fitted head "
        "[default: <checkpoint>/contact_head/step_<N>]",
    )
    p.add_argument(
        "--fit-c",
        type=float,
        default=None,
        help="L1 logistic regression C (inverse penalty) [0.15]",
    )
    p.add_argument(
        "--sequence",
        default="seqres",
        choices=["seqres", "observed"],
        help="model input: full deposited sequence (SEQRES) or observed residues only",
    )

    p = sub.add_parser("variants", **_texts("variants"))
    _common(p)
    p.add_argument("--dms", required=True, help="P62593.fasta-style FASTA or a CSV (mutant,score)")
    p.add_argument("--wt-sequence", help="wild-type sequence or FASTA file (required for CSV)")
    p.add_argument(
        "--offset", type=int, default=1, help="number of the first residue in mutant names [1]"
    )
    p.add_argument("--mutant-column", default="mutant", help="CSV column of mutant names")
    p.add_argument("--score-column", default="score", help="CSV column of measured fitness")
    p.add_argument(
        "--sample",
        type=int,
        default=0,
        help="score N variants evenly spaced through the file (0 = all)",
    )
    p.add_argument(
        "--max-tokens-per-batch", type=int, default=8192, help="padded tokens per forward batch"
    )

    _add_suite_parsers(sub)


def _add_suite_parsers(sub) -> None:
    """``proteingym``, ``structures``, ``all`` and ``compare`` (benchmark suites)."""
    p = sub.add_parser("proteingym", **_texts("proteingym"))
    _common(p)
    p.add_argument("--folder", required=True, help="folder of ProteinGym assay CSVs")
    p.add_argument(
        "--reference", help="DMS_substitutions.csv [default: <folder>/DMS_substitutions.csv]"
    )
    p.add_argument("--assays", nargs="+", metavar="DMS_ID", help="score only these assays")
    p.add_argument(
        "--method",
        default="masked-marginals",
        choices=["masked-marginals", "wt-marginals", "pll"],
        help="variant score [masked-marginals]",
    )
    p.add_argument(
        "--window",
        type=int,
        default=1022,
        help="residues the model sees at once (longer targets "
        "are cropped around each position, as ProteinGym) [1022]",
    )
    p.add_argument(
        "--skip-invalid", action="store_true", help="skip and count bad rows instead of stopping"
    )
    p.add_argument(
        "--max-tokens-per-batch", type=int, default=8192, help="padded tokens per forward batch"
    )

    p = sub.add_parser("structures", **_texts("structures"))
    p.add_argument(
        "--predicted", nargs="+", metavar="FILE[:CHAIN]|DIR", help="predicted structures"
    )
    p.add_argument(
        "--reference",
        nargs="+",
        metavar="FILE[:CHAIN]|DIR",
        help="experimental structures, matched to the predictions by file name without extension",
    )
    p.add_argument("--pairs", help="TSV 'predicted<TAB>reference' per line instead of matching")
    p.add_argument("--out", required=True, help="report folder")
    p.add_argument("--plot", action="store_true", help="also write PNG figures")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("all", **_texts("all"))
    p.add_argument(
        "--checkpoint", required=True, help="training workdir or converted checkpoint folder"
    )
    p.add_argument("--suite", required=True, help="suite YAML (see esmjax/evaluate/suite.py)")
    p.add_argument(
        "--step", type=int, default=None, help="step to restore [default: latest complete]"
    )
    p.add_argument("--out", help="report folder [default: <checkpoint>/eval/step_<N>]")
    p.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype"
    )
    p.add_argument(
        "--rules", default="fsdp", choices=["dp", "fsdp", "fsdp_tp"], help="sharding rules preset"
    )
    p.add_argument("--plot", action="store_true", help="also write each evaluation's figures")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")

    p = sub.add_parser("compare", **_texts("compare"))
    p.add_argument("cards", nargs="+", metavar="CARD", help="summary.json files or their folders")
    p.add_argument("--names", nargs="+", help="column names [default: checkpoint@step]")
    p.add_argument("--out", help="also write the Markdown table to this file")


class _RaisingParser(argparse.ArgumentParser):
    """Option errors inside a suite section become one-line InputErrors."""

    def error(self, message: str):
        raise InputError(message)


def _latest_step(path: str) -> int:
    from esmjax.io import checkpoint

    steps = sorted(checkpoint.manager(path).all_steps())
    if not steps:
        raise InputError(f"{path}: no complete checkpoint")
    return steps[-1]


def all_main(args: argparse.Namespace) -> int:
    from esmjax.commands import _checks, fold
    from esmjax.evaluate import report, run
    from esmjax.evaluate import suite as st
    from esmjax.io import checkpoint, paths

    sections = st.read_suite(args.suite)
    is_esmfold = "esmfold" in checkpoint.read_config(args.checkpoint)
    _preflight(args)
    # Orbax (the latest step) uses JAX, whose distributed start-up must come first; the sections'
    # options, which name that step, are checked after it.
    _checks.start()
    step = args.step if args.step is not None else _latest_step(args.checkpoint)
    out = paths.given(args.out) if args.out else report.default_out_dir(args.checkpoint, step)
    common = ["--checkpoint", args.checkpoint, "--step", str(step), "--out", str(out)]
    common += ["--dtype", args.dtype, "--rules", args.rules]
    flags = (["--no-progress"] if args.no_progress else []) + (["--plot"] if args.plot else [])
    parser = _RaisingParser(prog="esmjax evaluate")
    add_arguments(parser)
    plan, skipped = [], {}  # (name, [parsed args, ...]) checked before anything runs
    for name, opts in sections.items():
        where = f"{args.suite}: {name}"
        if name == "structures":
            opts = dict(opts)
            fasta = opts.pop("fasta", None)
            if fasta is None and "predicted" not in opts and "pairs" not in opts:
                raise InputError(f"{where}: give fasta (ESMFold checkpoints) or predicted/pairs")
            if fasta is not None and not is_esmfold:
                skipped[name] = "folding needs an ESMFold checkpoint"
                continue
            steps = []
            if fasta is not None:
                fp = _RaisingParser(prog="esmjax fold")
                fold.add_arguments(fp)
                folds = out / "folds"
                fold_argv = ["--checkpoint", args.checkpoint, "--fasta", fasta, "--out", str(folds)]
                for k in ("num_recycles", "chunk_size", "max_tokens_per_batch"):
                    if k in opts:
                        fold_argv += [f"--{k.replace('_', '-')}", str(opts.pop(k))]
                fold_argv += ["--no-progress"] if args.no_progress else []
                steps.append(("fold", _parse(fp, fold_argv, where)))
                opts["predicted"] = [str(folds)]
            argv = ["structures", *st.to_argv(opts), "--out", str(out), *flags]
            steps.append((name, _parse(parser, argv, where)))
            plan.append((name, steps))
            continue
        if is_esmfold:
            skipped[name] = "language-model evaluations take an ESM-2 checkpoint"
            continue
        plan.append(
            (name, [(name, _parse(parser, [name, *common, *st.to_argv(opts), *flags], where))])
        )
    for _, steps in plan:  # every section, before any runs (and computes, fits or writes)
        for kind, parsed in steps:
            _preflight(parsed, command="fold" if kind == "fold" else "evaluate")
    reports = {}
    for name, steps in plan:
        log.info("evaluate all: %s", name)
        for kind, parsed in steps:
            (fold.main if kind == "fold" else main)(parsed)
        reports[name] = out / f"{name}.json"
    info = (
        report.checkpoint_info(args.checkpoint, step)
        if not is_esmfold
        else {
            "checkpoint": paths.absolute(args.checkpoint),
            "step": step,
            "config_hash": None,
        }
    )
    summary = st.card(info, args.suite, reports, skipped)
    path = report.write(summary, out / st.SUMMARY)
    table = st.markdown([summary])
    if run.is_main():
        paths.write_text(out / "summary.md", table + "\n")
        print(table)
        for name, why in skipped.items():
            print(f"skipped {name}: {why}")
        print(f"report card: {path}")
    return 0


def _parse(parser: argparse.ArgumentParser, argv: list[str], where: str) -> argparse.Namespace:
    try:
        return parser.parse_args(argv)
    except InputError as e:
        raise InputError(f"{where}: {e}") from None


def compare_main(args: argparse.Namespace) -> int:
    from esmjax.evaluate import suite as st
    from esmjax.io import paths

    cards = [st.load_card(c) for c in args.cards]
    if args.names and len(args.names) != len(cards):
        raise InputError(f"--names: {len(args.names)} names for {len(cards)} cards")
    table = st.markdown(cards, args.names)
    print(table)
    if args.out:
        paths.write_text(args.out, table + "\n")
    return 0


def main(args: argparse.Namespace) -> int:
    from esmjax.commands import _checks
    from esmjax.evaluate import run

    if args.what == "all":
        return all_main(args)
    _preflight(args)
    if args.what == "compare":
        return compare_main(args)
    if args.what == "structures":
        run.structures(
            args.out,
            predicted=args.predicted,
            reference=args.reference,
            pairs=args.pairs,
            plot=args.plot,
            progress=not args.no_progress,
        )
        return 0
    # The inputs are checked before the start-up (a bad one is the only line printed): here the
    # checkpoint, then each evaluation its own before it restores (run.restore starts).
    _checks.local_checkpoint(args.checkpoint)
    opts = _options(args)
    if args.what == "perplexity":
        run.perplexity(opts, _perplexity_options(args))
    elif args.what == "contacts":
        run.contacts(opts, _contacts_options(args))
    elif args.what == "variants":
        run.variants(opts, _variants_options(args))
    else:
        run.proteingym(opts, _proteingym_options(args))
    return 0


def _preflight(args: argparse.Namespace, command: str = "evaluate") -> None:
    """What an evaluation needs besides its options and inputs, checked before it runs (and in
    ``evaluate all`` before any section runs, as the README promises): matplotlib for --plot, a
    writable report folder (--out, or the default ``<checkpoint>/eval``), and a writable
    ``contacts --save``. In ``evaluate all`` (``--step`` pinned) also the fit a ``contacts --fit``
    section would save or reuse (``run.fit_target``: another fit there is refused)."""
    from esmjax.commands import _checks
    from esmjax.io import paths

    if getattr(args, "plot", False):
        _checks.plotting()
    what = "fold" if command == "fold" else args.what
    if args.out:
        _checks.output(args.out, f"--out {args.out}", folder=what != "compare")
    elif what not in ("compare", "structures") and not paths.is_remote(args.checkpoint):
        default = Path(args.checkpoint) / "eval"
        _checks.output(default, f"{default} (the default --out)")
    if what == "perplexity" and args.data is None and not paths.is_remote(args.checkpoint):
        from esmjax.evaluate import run

        run.check_run_data(args.checkpoint)
    if what != "contacts" or not args.fit:
        return
    if args.save:
        _checks.output(args.save, f"--save {args.save}")
    elif not paths.is_remote(args.checkpoint):
        default = Path(args.checkpoint) / "contact_head"
        _checks.output(default, f"{default} (the default --save)")
    if args.step is not None:
        from esmjax.evaluate import run
        from esmjax.io.structures import read_chain

        cmd = _contacts_options(args)
        train = [read_chain(s, sequence=cmd.sequence) for s in cmd.fit]
        run.fit_target(_options(args), cmd, train)


def _options(args: argparse.Namespace):
    from esmjax.commands import _checks
    from esmjax.evaluate import run

    start = (args.coordinator_address, args.num_processes, args.process_id)
    return run.Options(
        checkpoint=args.checkpoint,
        step=args.step,
        out=args.out,
        plot=args.plot,
        dtype=args.dtype,
        rules=args.rules,
        progress=not args.no_progress,
        start=functools.partial(_checks.start, *start),
    )


def _perplexity_options(args: argparse.Namespace):
    from esmjax.evaluate import run

    return run.PerplexityOptions(
        data=args.data,
        rows=args.rows,
        seq_len=args.seq_len,
        eval_tokens=args.eval_tokens,
        pseudo=args.pseudo,
        max_sequences=args.max_sequences,
        max_tokens_per_batch=args.max_tokens_per_batch,
    )


def _contacts_options(args: argparse.Namespace):
    from esmjax.evaluate import run

    return run.ContactsOptions(
        structures=tuple(args.structures),
        fit=tuple(args.fit) if args.fit else None,
        save=args.save,
        fit_c=args.fit_c,
        sequence=args.sequence,
    )


def _variants_options(args: argparse.Namespace):
    from esmjax.evaluate import run

    return run.VariantsOptions(
        dms=args.dms,
        wt_sequence=args.wt_sequence,
        offset=args.offset,
        mutant_column=args.mutant_column,
        score_column=args.score_column,
        sample=args.sample,
        max_tokens_per_batch=args.max_tokens_per_batch,
    )


def _proteingym_options(args: argparse.Namespace):
    from esmjax.evaluate import run

    return run.ProteinGymOptions(
        folder=args.folder,
        reference=args.reference,
        assays=tuple(args.assays) if args.assays else None,
        method=args.method,
        window=args.window,
        skip_invalid=args.skip_invalid,
        max_tokens_per_batch=args.max_tokens_per_batch,
    )
