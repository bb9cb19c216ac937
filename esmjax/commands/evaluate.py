"""``esmjax evaluate {perplexity,contacts,variants}``: argv -> options -> ``evaluate.run``."""

from __future__ import annotations

import argparse

SUBCOMMANDS = {
    "perplexity": "masked-LM perplexity on held-out data or a FASTA file (optionally "
    "pseudo-perplexity)",
    "contacts": "unsupervised contact precision on PDB/mmCIF structures (optionally fit the "
    "contact head)",
    "variants": "zero-shot variant effects (masked marginals) and Spearman with a deep "
    "mutational scan",
}


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
    p = sub.add_parser(
        "perplexity", help=SUBCOMMANDS["perplexity"], description=SUBCOMMANDS["perplexity"]
    )
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

    p = sub.add_parser(
        "contacts", help=SUBCOMMANDS["contacts"], description=SUBCOMMANDS["contacts"]
    )
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

    p = sub.add_parser(
        "variants", help=SUBCOMMANDS["variants"], description=SUBCOMMANDS["variants"]
    )
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


def main(args: argparse.Namespace) -> int:
    from esmjax.evaluate import run
    from esmjax.parallel import distributed

    distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    opts = run.Options(
        checkpoint=args.checkpoint,
        step=args.step,
        out=args.out,
        plot=args.plot,
        dtype=args.dtype,
        rules=args.rules,
        progress=not args.no_progress,
    )
    if args.what == "perplexity":
        run.perplexity(
            opts,
            run.PerplexityOptions(
                data=args.data,
                rows=args.rows,
                seq_len=args.seq_len,
                eval_tokens=args.eval_tokens,
                pseudo=args.pseudo,
                max_sequences=args.max_sequences,
                max_tokens_per_batch=args.max_tokens_per_batch,
            ),
        )
    elif args.what == "contacts":
        run.contacts(
            opts,
            run.ContactsOptions(
                structures=tuple(args.structures),
                fit=tuple(args.fit) if args.fit else None,
                save=args.save,
                fit_c=args.fit_c,
                sequence=args.sequence,
            ),
        )
    else:
        run.variants(
            opts,
            run.VariantsOptions(
                dms=args.dms,
                wt_sequence=args.wt_sequence,
                offset=args.offset,
                mutant_column=args.mutant_column,
                score_column=args.score_column,
                sample=args.sample,
                max_tokens_per_batch=args.max_tokens_per_batch,
            ),
        )
    return 0
