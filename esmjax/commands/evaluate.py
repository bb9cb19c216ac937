"""``esmjax evaluate {perplexity,contacts,variants}``: what a saved checkpoint is worth, without the
training job.

Each command restores one step (default: the latest complete one) of a training workdir or a
converted checkpoint onto every device present (Orbax reshards), writes a JSON report to ``--out``
(default ``<checkpoint>/eval/step_<N>/``) and prints a table; ``--plot`` adds PNG figures next to
the report. Multi-process runs take the same ``--coordinator-address/--num-processes/--process-id``
flags (or launcher environment) as ``esmjax train``; process 0 writes the files.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import logging
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from esmjax.errors import InputError

log = logging.getLogger("esmjax.evaluate")

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


# --------------------------------------------------------------------------------------------------
def _restore(args: argparse.Namespace):
    """Distributed start-up, mesh, model and provenance."""
    from esmjax.evaluate import report
    from esmjax.inference.engine import Engine
    from esmjax.io import checkpoint
    from esmjax.parallel import distributed

    distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    mesh = checkpoint.inference_mesh(args.checkpoint, args.rules)
    model, step = checkpoint.load_model(
        args.checkpoint,
        step=args.step,
        mesh=mesh,
        rules=args.rules,
        dtype=args.dtype,
    )
    info = report.checkpoint_info(args.checkpoint, step)
    out = Path(args.out) if args.out else report.default_out_dir(args.checkpoint, step)
    log.info("restored step %d of %s onto %d devices", step, args.checkpoint, mesh.size)
    return Engine(model, mesh, args.rules), info, out


def _is_main() -> bool:
    import jax

    return jax.process_index() == 0


def _finish(name: str, out: Path, rep: dict, text: str) -> None:
    from esmjax.evaluate import report

    path = report.write(rep, out / f"{name}.json")
    if _is_main():
        print(report.header(rep))
        print(text)
        print(f"report: {path}")


# --------------------------------------------------------------------------------------------------
def perplexity_main(args: argparse.Namespace) -> int:
    from esmjax.config import DataConfig, from_dict
    from esmjax.evaluate import perplexity, report
    from esmjax.io import checkpoint

    raw = checkpoint.read_config(args.checkpoint)
    run_data = (
        from_dict(DataConfig, raw["data"], "data") if isinstance(raw.get("data"), dict) else None
    )
    if args.data is None and run_data is None:
        raise InputError(
            f"{args.checkpoint} is not a training workdir: name the evaluation data with --data"
        )
    overrides: dict = {}
    if args.data is not None:
        data = Path(args.data)
        if not data.exists():
            raise InputError(f"--data {data}: no such dataset folder or FASTA file")
        overrides["eval"] = str(
            data.absolute()
        )  # a folder's validation split, or a whole FASTA file
    if args.pseudo and (args.data is None or Path(args.data).is_dir()):
        raise InputError("--pseudo needs a FASTA file as --data")
    for key, value in (("seq_len", args.seq_len), ("eval_tokens", args.eval_tokens)):
        if value is not None:
            overrides[key] = value
    data_cfg = dataclasses.replace(run_data or DataConfig(seq_len=1024), **overrides)

    engine, info, out = _restore(args)
    import jax

    from esmjax.data.pipeline import EVAL_SEED, eval_batches

    rows = -(-max(args.rows, 1) // engine.row_multiple) * engine.row_multiple
    batches = eval_batches(
        data_cfg,
        rows=rows // jax.process_count(),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    results = {
        "masked_lm": perplexity.masked_lm(
            engine, batches, local=True, progress=not args.no_progress
        )
    }
    ml = results["masked_lm"]
    table_rows = [("masked-LM", ml["perplexity"], ml["loss"], ml["masked_tokens"])]
    if args.pseudo:
        seqs = _fasta_sequences(Path(args.data), args.max_sequences)
        pp = perplexity.pseudo_perplexity(
            engine, seqs, args.max_tokens_per_batch, progress=not args.no_progress
        )
        results["pseudo"] = pp
        table_rows.append(("pseudo", pp["pseudo_perplexity"], pp["loss"], pp["residues"]))
    rep = report.build(
        "perplexity",
        info,
        results,
        data=data_cfg.eval or f"{data_cfg.train} (held-out part)",
        rows=rows,
        seq_len=data_cfg.seq_len,
        eval_tokens=data_cfg.eval_tokens,
        masking_seed=EVAL_SEED,
        mask_prob=data_cfg.mask_prob,
        dtype=args.dtype,
        rules=args.rules,
    )
    text = report.table(("metric", "perplexity", "loss (nats)", "tokens"), table_rows, digits=4)
    text += (
        f"\nmasked accuracy {ml['masked_accuracy']:.4f}; "
        f"unigram baseline perplexity {ml['unigram_perplexity']:.3f}"
    )
    _finish("perplexity", out, rep, text)
    return 0


def _fasta_sequences(path: Path, limit: int) -> list[str]:
    from esmjax.io.fasta import read_fasta

    seqs = []
    for rec in read_fasta(path):
        seqs.append(rec.sequence)
        if limit and len(seqs) >= limit:
            break
    if not seqs:
        raise InputError(f"{path}: no FASTA records")
    return seqs


# --------------------------------------------------------------------------------------------------
def contacts_main(args: argparse.Namespace) -> int:
    from esmjax.evaluate import contacts as ct
    from esmjax.evaluate import report
    from esmjax.io import checkpoint
    from esmjax.io.structures import read_chain

    if args.fit_c is not None and not args.fit:
        raise InputError("--fit-c is only used with --fit")
    test = [read_chain(s, sequence=args.sequence) for s in args.structures]
    train = [read_chain(s, sequence=args.sequence) for s in (args.fit or [])]
    overlap = {c.name for c in test} & {c.name for c in train}
    if overlap:
        log.warning(
            "structures both fitted on and evaluated (precision will be optimistic): %s",
            sorted(overlap),
        )
    engine, info, out = _restore(args)
    import jax

    if train and jax.process_count() > 1:
        raise InputError(
            "--fit runs in a single process (the fit and its checkpoint are written by one host)"
        )
    if not train and info["config_kind"] == "train":
        log.warning(
            "a training run never trains the contact head: these precisions use its initial "
            "(random) regression; fit it first with --fit STRUCTURES (ESM fitted on about 20 "
            "proteins)"
        )
    results: dict = {}
    if train:
        c = args.fit_c if args.fit_c is not None else ct.DEFAULT_C
        fit = ct.fit_contact_head(engine, train, c)
        fit_info = {
            "structures": [f"{ch.path}:{ch.chain}" for ch in train],
            "C": c,
            "pairs": fit.num_pairs,
            "contacts": fit.num_contacts,
            "nonzero_weights": fit.nonzero,
            "train_logloss": fit.loss,
            "converged": fit.converged,
        }
        save = (
            Path(args.save)
            if args.save
            else Path(args.checkpoint) / "contact_head" / f"step_{info['step']}"
        )
        params = checkpoint.params_numpy(_model_of(engine))
        source = {
            "checkpoint": info["checkpoint"],
            "step": info["step"],
            "config_hash": info["config_hash"],
        }
        checkpoint.save_converted(
            save,
            checkpoint.model_config(args.checkpoint),
            params,
            extra={"source": source, "contact_regression": fit_info},
        )
        fit_info["saved_to"] = str(save.absolute())
        results["fit"] = fit_info
    per, rows = [], []
    for chain in tqdm(
        test, desc="contacts", unit="chain", file=sys.stderr, disable=args.no_progress
    ):
        pred = ct.predict_contacts(engine, chain)
        target = chain.contact_map()
        m = ct.evaluate_map(pred, target)
        per.append(
            {
                "file": chain.path,
                "chain": chain.chain,
                "length": len(chain.sequence),
                "observed": int(chain.observed.sum()),
                "sequence_source": chain.source,
                "models": chain.num_models,
                "contacts": ct.contact_counts(target),
                "precision": m,
            }
        )
        rows.append(
            (
                chain.name,
                len(chain.sequence),
                *(m[r][k] for r, _, _ in ct.RANGES for k, _ in ct.DIVISORS),
            )
        )
        if args.plot and _is_main():
            from esmjax.evaluate.plot import plot_contact_map

            plot_contact_map(
                pred,
                target,
                out / f"contacts_{Path(chain.path).stem}_{chain.chain}.png",
                chain.name,
            )
    mean = ct.mean_metrics([p["precision"] for p in per])
    rows.append(("mean", None, *(mean[r][k] for r, _, _ in ct.RANGES for k, _ in ct.DIVISORS)))
    results.update({"mean": mean, "structures": per})
    rep = report.build(
        "contacts", info, results, sequence=args.sequence, threshold_angstrom=8.0, dtype=args.dtype
    )
    headers = ("structure", "L", *(f"{r} {k}" for r, _, _ in ct.RANGES for k, _ in ct.DIVISORS))
    text = report.table(headers, rows)
    if train:
        saved = results["fit"]["saved_to"]
        text += f"\ncontact head fitted on {len(train)} structure(s), saved to {saved}"
    _finish("contacts", out, rep, text)
    return 0


def _model_of(engine):
    from flax import nnx

    return nnx.merge(engine.graphdef, engine.state)


# --------------------------------------------------------------------------------------------------
def variants_main(args: argparse.Namespace) -> int:
    from esmjax.evaluate import report
    from esmjax.evaluate import variants as vr

    wt = vr.read_wt_sequence(args.wt_sequence) if args.wt_sequence else None
    dms = vr.read_dms(args.dms, wt, args.offset, args.mutant_column, args.score_column)
    chosen = dms.variants
    if (
        0 < args.sample < len(chosen)
    ):  # scans are often sorted (P62593 by fitness): spread the sample
        chosen = [
            chosen[i] for i in np.linspace(0, len(chosen) - 1, args.sample).round().astype(int)
        ]
    engine, info, out = _restore(args)
    positions = len({m.position for v in chosen for m in v.mutations})
    bar = tqdm(
        total=positions, desc="variants", unit="pos", file=sys.stderr, disable=args.no_progress
    )
    scores = vr.masked_marginal_scores(
        engine, dms.wild_type, chosen, args.max_tokens_per_batch, progress=bar
    )
    bar.close()
    fitness = np.array([v.fitness for v in chosen])
    rho = vr.spearman(scores, fitness)
    results = {
        "spearman": rho,
        "variants": len(chosen),
        "positions": positions,
        "skipped": dms.skipped,
        "wild_type": dms.wild_type,
        "wild_type_source": dms.wild_type_source,
        "wild_type_length": len(dms.wild_type),
        "multi_mutants": sum(len(v.mutations) > 1 for v in chosen),
    }
    if _is_main():
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "variants_scores.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["mutant", "fitness", "score"])
            w.writerows((v.name, v.fitness, f"{s:.6f}") for v, s in zip(chosen, scores))
        if args.plot:
            from esmjax.evaluate.plot import plot_variant_scatter

            plot_variant_scatter(
                scores, fitness, out / "variants_scatter.png", Path(args.dms).name, rho
            )
    rep = report.build(
        "variants",
        info,
        results,
        dms=str(Path(args.dms).absolute()),
        offset=args.offset,
        sample=args.sample,
        dtype=args.dtype,
        scores_csv=str((out / "variants_scores.csv").absolute()),
    )
    skipped = ", ".join(f"{n} {why}" for why, n in dms.skipped.items()) or "none"
    text = report.table(
        ("dms", "variants", "positions", "spearman"),
        [(Path(args.dms).name, len(chosen), positions, rho)],
        digits=4,
    )
    text += (
        f"\nwild type: {len(dms.wild_type)} residues ({dms.wild_type_source}); skipped: {skipped}"
    )
    if not np.isfinite(rho):
        text += (
            "\nSpearman is undefined: the scores or the fitness values are all equal "
            "(e.g. only synonymous mutants)"
        )
    _finish("variants", out, rep, text)
    return 0


def main(args: argparse.Namespace) -> int:
    return {"perplexity": perplexity_main, "contacts": contacts_main, "variants": variants_main}[
        args.what
    ](args)
