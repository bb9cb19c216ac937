"""``esmjax evaluate``: argv -> options (``esmjax.evaluate.options``) -> one library call:
``esmjax.evaluate.jobs.run`` for one evaluation, ``suite.run`` for ``all`` (the evaluations a suite
YAML lists) and ``suite.compare`` (report cards side by side)."""

from __future__ import annotations

import argparse
import functools

from esmjax.config import DTYPES, RULE_PRESETS
from esmjax.inference.options import VARIANT_METHODS, add_job_arguments
from esmjax.io.structures import SEQUENCE_MODES

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
    "pseudo-perplexity": "pseudo-perplexity of every record of FASTA files as a resumable, "
    "multi-process job of work units (Parquet shards)",
    "masked-marginals": "the masked-marginal log-likelihood ratio of every single substitution of "
    "every record of FASTA files, as a resumable, multi-process job of work units (Parquet shards)",
    "all": "a checkpoint's report card: the evaluations a suite YAML lists, one summary",
    "compare": "side-by-side table of several report cards (summary.json of `evaluate all`)",
}


def _texts(name: str) -> dict[str, str]:
    """A subcommand's help and description: argparse %-formats help strings (not descriptions
    without ``%(prog)``), so the ``%`` of "top-10% recall" is doubled there."""
    return {"help": SUBCOMMANDS[name].replace("%", "%%"), "description": SUBCOMMANDS[name]}


def _restore(p: argparse.ArgumentParser, plot: str) -> None:
    """The checkpoint an evaluation restores, how, and where it reports."""
    p.add_argument(
        "--checkpoint",
        required=True,
        help="training workdir, converted checkpoint folder, or a released model's name "
        "(esm2_t6_8M_UR50D, facebook/esm2_t6_8M_UR50D)",
    )
    p.add_argument(
        "--step", type=int, default=None, help="step to restore [default: latest complete]"
    )
    p.add_argument("--out", help="report folder [default: <checkpoint>/eval/step_<N>]")
    p.add_argument("--plot", action="store_true", help=plot)
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="compute dtype")
    p.add_argument(
        "--rules", default="fsdp", choices=tuple(RULE_PRESETS), help="sharding rules preset"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _common(p: argparse.ArgumentParser) -> None:
    _restore(p, "also write PNG figures to the report folder")
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
        choices=SEQUENCE_MODES,
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
        choices=VARIANT_METHODS,
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

    _scoring_job(sub.add_parser("pseudo-perplexity", **_texts("pseudo-perplexity")), 1000)
    p = sub.add_parser("masked-marginals", **_texts("masked-marginals"))
    _scoring_job(p, 100)
    p.add_argument(
        "--window",
        type=int,
        default=1022,
        help="residues per pass: a longer record has each position scored in the crop centred "
        "on it, as `evaluate proteingym` (0 = whole records) [1022]",
    )

    p = sub.add_parser("all", **_texts("all"))
    _restore(p, "also write each evaluation's figures")
    p.add_argument("--suite", required=True, help="suite YAML (see esmjax/evaluate/suite.py)")

    p = sub.add_parser("compare", **_texts("compare"))
    p.add_argument("cards", nargs="+", metavar="CARD", help="summary.json files or their folders")
    p.add_argument("--names", nargs="+", help="column names [default: checkpoint@step]")
    p.add_argument("--out", help="also write the Markdown table to this file")


def _scoring_job(p: argparse.ArgumentParser, unit_size: int) -> None:
    """The options of a per-record scoring job (pseudo-perplexity, masked marginals)."""
    p.add_argument(
        "--checkpoint",
        required=True,
        help="training workdir, converted checkpoint folder, or a released model's name",
    )
    p.add_argument("--step", type=int, default=None, help="step to restore [default: latest]")
    add_job_arguments(p, unit_size, None)
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="compute dtype")
    p.add_argument(
        "--max-tokens-per-batch", type=int, default=8192, help="padded tokens per batch [8192]"
    )


def main(args: argparse.Namespace) -> int:
    from esmjax.evaluate import jobs, suite
    from esmjax.evaluate import options as op
    from esmjax.inference import preflight
    from esmjax.inference.options import from_args, run_job
    from esmjax.io import checkpoint
    from esmjax.io.convert import checkpoint_folder

    if args.what == "compare":
        suite.compare(args.cards, args.names, args.out)
        return 0
    progress = not args.no_progress
    if args.what == "pseudo-perplexity":  # a job of work units: no distributed start-up
        from esmjax.evaluate.pseudo import PseudoOptions, score_fasta

        ckpt = checkpoint_folder(args.checkpoint)
        scoring = from_args(PseudoOptions, args, progress=progress)
        return run_job(lambda: score_fasta(ckpt, scoring))
    if args.what == "masked-marginals":  # the same kind of job
        from esmjax.evaluate import marginals

        ckpt = checkpoint_folder(args.checkpoint)
        maps = from_args(marginals.MarginalsOptions, args, progress=progress)
        return run_job(lambda: marginals.score_fasta(ckpt, maps))
    if args.what == "structures":
        jobs.run(None, from_args(op.StructuresOptions, args, progress=progress))
        return 0
    # The inputs are checked before the start-up (a bad one is the only line printed): each
    # evaluation checks its own before it restores (jobs.restore starts).
    start = [getattr(args, k, None) for k in ("coordinator_address", "num_processes", "process_id")]
    opts = from_args(
        op.Options,
        args,
        # a released model's name: converted once into the cache
        checkpoint=checkpoint.open(checkpoint_folder(args.checkpoint), args.step),
        progress=progress,
        start=functools.partial(preflight.start, *start),
    )
    if args.what == "all":
        suite.run(opts, args.suite)
    else:
        jobs.run(opts, from_args(op.JOBS[args.what], args))
    return 0
