"""The jobs of ``esmjax evaluate``: what a saved checkpoint is worth, without the training job.

Each evaluation restores one step (default: the latest complete one) of a training workdir or a
converted checkpoint onto every device present (Orbax reshards), writes a JSON report to ``out``
(default ``<checkpoint>/eval/step_<N>/``) and prints a table; ``plot`` adds PNG figures next to the
report. In multi-process runs (started by the command) process 0 writes the files. ``check`` is
what a job needs besides its inputs, checked before it runs (``evaluate all``: before any runs);
``run`` checks and runs one job.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from esmjax.errors import InputError
from esmjax.evaluate.options import (
    ContactsOptions,
    Options,
    PerplexityOptions,
    ProteinGymOptions,
    StructuresOptions,
    VariantsOptions,
)
from esmjax.io import paths

log = logging.getLogger("esmjax.evaluate")


def restore(opts: Options, weights: Any = None):
    """Distributed start-up, mesh, model and provenance. ``weights``: a folder to load the model
    from instead (a contact-head fit of ``opts.checkpoint`` at its pinned step, which the report
    still names)."""
    from esmjax.evaluate import report
    from esmjax.inference.engine import Engine
    from esmjax.io import checkpoint

    if opts.start is not None:
        opts.start()
    ckpt = opts.checkpoint
    src = checkpoint.open(weights) if weights is not None else ckpt
    mesh = checkpoint.inference_mesh(src, opts.rules, opts.dtype)
    model, step = checkpoint.load_model(
        src,
        step=None if weights else ckpt.requested_step,
        mesh=mesh,
        rules=opts.rules,
        dtype=opts.dtype,
    )
    step = ckpt.requested_step if weights is not None else step
    info = report.checkpoint_info(ckpt, step)
    out = paths.given(opts.out) if opts.out else report.default_out_dir(ckpt.path, step)
    log.info("restored step %d of %s onto %d devices", step, ckpt.path, mesh.size)
    return Engine(model, mesh, opts.rules), info, out


def is_main() -> bool:
    import jax

    return jax.process_index() == 0


def finish(name: str, out: Path, rep: dict, text: str) -> None:
    from esmjax.evaluate import report

    path = report.write(rep, out / f"{name}.json")
    if is_main():
        print(report.header(rep))
        print(text)
        print(f"report: {path}")


def perplexity(opts: Options, cmd: PerplexityOptions) -> dict:
    from esmjax.config import DataConfig
    from esmjax.evaluate import perplexity, report

    run_data = _run_data(opts.checkpoint)
    if cmd.data is None and run_data is None:
        raise InputError(
            f"{opts.checkpoint.path} is not a training workdir: name the evaluation data with "
            "--data"
        )
    if cmd.data is None:
        _check_run_data(opts.checkpoint.path, run_data)
    overrides: dict = {}
    folder = False
    if cmd.data is not None:
        data = paths.given(cmd.data)  # a local path or a bucket URL
        with paths.remote_errors(cmd.data):
            found, folder = data.exists(), data.is_dir()
        if not found:
            raise InputError(f"--data {data}: no such dataset folder or FASTA file")
        overrides["eval"] = paths.absolute(cmd.data)  # a folder's validation split, or a FASTA
    if cmd.pseudo and (cmd.data is None or folder):
        raise InputError("--pseudo needs a FASTA file as --data")
    for key, value in (("seq_len", cmd.seq_len), ("eval_tokens", cmd.eval_tokens)):
        if value is not None:
            overrides[key] = value
    data_cfg = dataclasses.replace(run_data or DataConfig(seq_len=1024), **overrides)

    engine, info, out = restore(opts)

    from esmjax.data.pipeline import EVAL_SEED, eval_batches

    rows = -(-max(cmd.rows, 1) // engine.row_multiple) * engine.row_multiple
    batches = eval_batches(
        data_cfg,
        rows=rows // engine.share.count,
        process_index=engine.share.index,
        process_count=engine.share.count,
    )
    results = {
        "masked_lm": perplexity.masked_lm(engine, batches, local=True, progress=opts.progress)
    }
    ml = results["masked_lm"]
    table_rows = [("masked-LM", ml["perplexity"], ml["loss"], ml["masked_tokens"])]
    if cmd.pseudo:
        seqs = _fasta_sequences(cmd.data, cmd.max_sequences)
        pp = perplexity.pseudo_perplexity(
            engine, seqs, cmd.max_tokens_per_batch, progress=opts.progress
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
        dtype=opts.dtype,
        rules=opts.rules,
    )
    text = report.table(("metric", "perplexity", "loss (nats)", "tokens"), table_rows, digits=4)
    text += (
        f"\nmasked accuracy {ml['masked_accuracy']:.4f}; "
        f"unigram baseline perplexity {ml['unigram_perplexity']:.3f}"
    )
    finish("perplexity", out, rep, text)
    return rep


def _run_data(ckpt: Any) -> Any:
    """The ``DataConfig`` of a training run's checkpoint; None for converted weights."""
    from esmjax.config import DataConfig, from_dict

    raw = ckpt.config
    return from_dict(DataConfig, raw["data"], "data") if isinstance(raw.get("data"), dict) else None


def _check_run_data(checkpoint: str, data: Any) -> None:
    """The run's own held-out data (its config.json's ``data.eval``, else ``data.train``) is
    still there. Runs saved before paths were stored absolute name it relative to the folder they
    were started in, and a copied workdir names a place on another machine: either way the line
    says to pass ``--data`` (checked before the model loads)."""
    where, key = (data.eval, "data.eval") if data.eval else (data.train, "data.train")
    if not where or paths.is_remote(where) or Path(where).exists():
        return
    raise InputError(
        f"{checkpoint}: the run's data {where} (config.json {key}) "
        "is not there (a copied or moved workdir?); name the evaluation data with --data"
    )


def _fasta_sequences(path: str, limit: int) -> list[str]:
    from esmjax.io.fasta import read_fasta

    seqs = []
    for rec in read_fasta(path):
        seqs.append(rec.sequence)
        if limit and len(seqs) >= limit:
            break
    if not seqs:
        raise InputError(f"{path}: no FASTA records")
    return seqs


def contacts(opts: Options, cmd: ContactsOptions) -> dict:
    from esmjax.evaluate import contacts as ct
    from esmjax.evaluate import report
    from esmjax.io.structures import read_chain

    if cmd.fit_c is not None and not cmd.fit:
        raise InputError("--fit-c is only used with --fit")
    test = [read_chain(s, sequence=cmd.sequence) for s in cmd.structures]
    train = [read_chain(s, sequence=cmd.sequence) for s in (cmd.fit or [])]
    overlap = {c.name for c in test} & {c.name for c in train}
    if overlap:
        log.warning(
            "structures both fitted on and evaluated (precision will be optimistic): %s",
            sorted(overlap),
        )
    save, done = None, None
    if train:  # where the fit goes, checked before the model loads (fit_target)
        opts = pinned(opts)
        save, done = fit_target(opts, cmd, train)
    engine, info, out = restore(opts, weights=save if done else None)
    import jax

    if train and not done and jax.process_count() > 1:
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
        results["fit"] = done or _fit_and_save(engine, train, _fit_c(cmd), save, opts, info)
    per, rows = [], []
    for chain in tqdm(
        test, desc="contacts", unit="chain", file=sys.stderr, disable=not opts.progress
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
        if opts.plot and is_main():
            from esmjax.evaluate.plot import plot_contact_map

            plot_contact_map(
                pred,
                target,
                out / f"contacts_{paths.given(chain.path).stem}_{chain.chain}.png",
                chain.name,
            )
    mean = ct.mean_metrics([p["precision"] for p in per])
    rows.append(("mean", None, *(mean[r][k] for r, _, _ in ct.RANGES for k, _ in ct.DIVISORS)))
    results.update({"mean": mean, "structures": per})
    rep = report.build(
        "contacts", info, results, sequence=cmd.sequence, threshold_angstrom=8.0, dtype=opts.dtype
    )
    headers = ("structure", "L", *(f"{r} {k}" for r, _, _ in ct.RANGES for k, _ in ct.DIVISORS))
    text = report.table(headers, rows)
    if done:
        text += f"\ncontact head: the earlier fit in {done['saved_to']} (same checkpoint, step, "
        text += "structures and C)"
    elif train:
        saved = results["fit"]["saved_to"]
        text += f"\ncontact head fitted on {len(train)} structure(s), saved to {saved}"
    finish("contacts", out, rep, text)
    return rep


def _fit_c(cmd: ContactsOptions) -> float:
    from esmjax.evaluate import contacts as ct

    return cmd.fit_c if cmd.fit_c is not None else ct.DEFAULT_C


def _fit_names(chains: list) -> list[str]:
    return [f"{ch.path}:{ch.chain}" for ch in chains]


def _fit_and_save(engine: Any, train: list, c: float, save: Any, opts: Options, info: dict) -> dict:
    """Fits the contact head on ``train`` and saves the model with it as a new checkpoint folder
    (its config.json records the source and the fit); returns the fit's report entry."""
    from esmjax.evaluate import contacts as ct
    from esmjax.io import checkpoint

    fit = ct.fit_contact_head(engine, train, c)
    fit_info = {
        "structures": _fit_names(train),
        "C": c,
        "pairs": fit.num_pairs,
        "contacts": fit.num_contacts,
        "nonzero_weights": fit.nonzero,
        "train_logloss": fit.loss,
        "converged": fit.converged,
    }
    source = {k: info[k] for k in ("checkpoint", "step", "config_hash")}
    checkpoint.save_converted(
        save,
        opts.checkpoint.model_config,
        checkpoint.params_numpy(engine.model),
        extra={"source": source, "contact_regression": fit_info},
    )
    return {**fit_info, "saved_to": paths.absolute(save)}


def pinned(opts: Options) -> Options:
    """``opts`` with the checkpoint's step pinned (by default its newest, listed after the
    start-up: Orbax lists steps with JAX), so that the folder a fit is saved to (named after the
    step) is known before the model loads."""
    if opts.checkpoint.requested_step is None and opts.start is not None:
        opts.start()
    return dataclasses.replace(opts, checkpoint=opts.checkpoint.pinned())


def fit_target(opts: Options, cmd: ContactsOptions, train: list) -> tuple[Any, dict | None]:
    """Where ``contacts --fit`` saves the fitted model (``--save``, default
    ``<checkpoint>/contact_head/step_<N>``, the step pinned) and the fit already there: its
    ``contact_regression`` when the folder holds a fit of the same checkpoint, step and config on
    the same structures with the same C, which a rerun then evaluates with instead of fitting
    again; None when nothing is there. Anything else there is refused now, before the model
    loads and the fit runs (a fit is never written over)."""
    from esmjax.evaluate import report
    from esmjax.io import checkpoint

    if cmd.save:
        save, label = paths.given(cmd.save), f"--save {cmd.save}"
    else:
        step = opts.checkpoint.requested_step
        save = paths.given(opts.checkpoint.path) / "contact_head" / f"step_{step}"
        label = f"{save} (the default --save)"
    with paths.remote_errors(str(save)):
        if not paths.nonempty(save):
            return save, None
    found = checkpoint.peek(save)
    config = found.config if found is not None else {}
    fit = config.get("contact_regression") if isinstance(config, dict) else None
    if not isinstance(fit, dict):
        raise InputError(f"{label}: exists and holds no contact-head fit; give another --save")
    info = report.checkpoint_info(opts.checkpoint, opts.checkpoint.requested_step)
    want = {k: info[k] for k in ("checkpoint", "step", "config_hash")}
    have = config.get("source") or {}
    other = [k for k in want if have.get(k) != want[k]]
    asked = {"structures": _fit_names(train), "C": _fit_c(cmd)}
    other += [k for k, v in asked.items() if fit.get(k) != v]
    if other:
        raise InputError(
            f"{label}: holds a fit with another {', '.join(other)}; give another --save (or "
            "remove it to fit again)"
        )
    return save, {**fit, "saved_to": paths.absolute(save), "reused": True}


def variants(opts: Options, cmd: VariantsOptions) -> dict:
    from esmjax.evaluate import report
    from esmjax.evaluate import variants as vr

    wt = vr.read_wt_sequence(cmd.wt_sequence) if cmd.wt_sequence else None
    dms = vr.read_dms(cmd.dms, wt, cmd.offset, cmd.mutant_column, cmd.score_column)
    chosen = dms.variants
    if (
        0 < cmd.sample < len(chosen)
    ):  # scans are often sorted (P62593 by fitness): spread the sample
        chosen = [
            chosen[i] for i in np.linspace(0, len(chosen) - 1, cmd.sample).round().astype(int)
        ]
    engine, info, out = restore(opts)
    positions = len({m.position for v in chosen for m in v.mutations})
    bar = tqdm(
        total=positions, desc="variants", unit="pos", file=sys.stderr, disable=not opts.progress
    )
    scores = vr.masked_marginal_scores(
        engine, dms.wild_type, chosen, cmd.max_tokens_per_batch, progress=bar
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
    if is_main():
        f = io.StringIO()
        w = csv.writer(f)
        w.writerow(["mutant", "fitness", "score"])
        w.writerows((v.name, vr.exact(v.fitness), vr.exact(s)) for v, s in zip(chosen, scores))
        paths.write_text(out / "variants_scores.csv", f.getvalue())
        if opts.plot:
            from esmjax.evaluate.plot import plot_variant_scatter

            plot_variant_scatter(
                scores, fitness, out / "variants_scatter.png", paths.given(cmd.dms).name, rho
            )
    rep = report.build(
        "variants",
        info,
        results,
        dms=paths.absolute(cmd.dms),
        offset=cmd.offset,
        sample=cmd.sample,
        dtype=opts.dtype,
        scores_csv=str((out / "variants_scores.csv").absolute()),
    )
    skipped = ", ".join(f"{n} {why}" for why, n in dms.skipped.items()) or "none"
    text = report.table(
        ("dms", "variants", "positions", "spearman"),
        [(paths.given(cmd.dms).name, len(chosen), positions, rho)],
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
    finish("variants", out, rep, text)
    return rep


def proteingym(opts: Options, cmd: ProteinGymOptions) -> dict:
    from esmjax.evaluate import proteingym as pg
    from esmjax.evaluate import report

    folder = paths.given(cmd.folder)  # local paths or bucket URLs
    reference = paths.given(cmd.reference) if cmd.reference else folder / "DMS_substitutions.csv"
    infos = pg.read_reference(str(reference), str(folder), list(cmd.assays) if cmd.assays else None)
    if cmd.window < 16:
        raise InputError(f"--window {cmd.window}: at least 16 residues")
    pg.check_assays(infos, cmd.skip_invalid)  # every row, before the restore and any scoring
    engine, info, out = restore(opts)
    settings = {
        "method": cmd.method,
        "window": cmd.window,
        "max_tokens": cmd.max_tokens_per_batch,
        "dtype": opts.dtype,
        "checkpoint": info["checkpoint"],
        "step": info["step"],
        "config_hash": info["config_hash"],
    }
    results = pg.run(engine, infos, settings, out, cmd.skip_invalid, opts.progress)
    if is_main():
        pg.write_assay_table(results["per_assay"], out / "proteingym_assays.csv")
        if opts.plot:
            pg.plot_spearman(results["per_assay"], out / "proteingym_spearman.png", cmd.method)
    rep = report.build(
        "proteingym",
        info,
        results,
        reference=paths.absolute(reference),
        folder=paths.absolute(folder),
        method=cmd.method,
        window=cmd.window,
        dtype=opts.dtype,
        skip_invalid=cmd.skip_invalid,
    )
    finish("proteingym", out, rep, pg.summary_text(results))
    return rep


def structures(cmd: StructuresOptions) -> dict:
    from esmjax.evaluate import report
    from esmjax.evaluate import structure_scores as ss

    if not cmd.pairs and not (cmd.predicted and cmd.reference):
        raise InputError("give --predicted and --reference, or --pairs TSV")
    matched = ss.match_pairs(list(cmd.predicted or []), cmd.reference, cmd.pairs)
    results = ss.run(matched, progress=cmd.progress)
    out = paths.given(cmd.out)
    ss.write_table(results["per_target"], out / "structures.csv")
    if cmd.plot:
        ss.plot(results["per_target"], out)
    rep = {
        "command": "evaluate structures",
        "settings": {"pairs": cmd.pairs, "inclusion_radius": 15.0, "thresholds": [0.5, 1, 2, 4]},
        "results": results,
    }
    rows = [
        (t["predicted"], t["reference"], t["coverage"], *(t[m] for m in ss.METRICS))
        for t in results["per_target"]
    ]
    rows.append(
        ("mean", "", results["mean"]["coverage"], *(results["mean"][m] for m in ss.METRICS))
    )
    path = report.write(rep, out / "structures.json")
    print(report.table(("predicted", "reference", "coverage", *ss.METRICS), rows))
    print(f"report: {path}")
    return rep


def check_report(opts: Options) -> None:
    """matplotlib for ``plot`` and a writable report folder (``out``, or the default
    ``<checkpoint>/eval``)."""
    from esmjax.inference import preflight

    if opts.plot:
        preflight.plotting()
    if opts.out:
        preflight.output(opts.out, f"--out {opts.out}")
    elif not paths.is_remote(opts.checkpoint.path):
        default = Path(opts.checkpoint.path) / "eval"
        preflight.output(default, f"{default} (the default --out)")


def check(opts: Options | None, cmd: Any) -> None:
    """What a job needs besides its options and inputs, checked before it runs (``evaluate all``:
    every section before any runs): ``check_report``, the checkpoint's model, a training run's
    own data (perplexity without ``data``) and a writable ``contacts --save``; with the step
    pinned (``--step``, ``evaluate all``) also the fit a ``contacts --fit`` would save or reuse
    (``fit_target``: another fit there is refused). ``opts``: None for ``structures``; a fold
    (``FoldOptions``, an ``evaluate all`` structures section) is ``fold.check``."""
    from esmjax.inference import fold, preflight
    from esmjax.inference.options import FoldOptions

    if isinstance(cmd, FoldOptions):
        fold.check(opts.checkpoint, cmd)
        return
    if opts is None:
        if cmd.plot:
            preflight.plotting()
        preflight.output(cmd.out, f"--out {cmd.out}")
        return
    check_report(opts)
    ckpt = opts.checkpoint
    local = not paths.is_remote(ckpt.path)
    if isinstance(cmd, PerplexityOptions) and cmd.data is None and local:
        data = _run_data(ckpt)
        if data is not None:
            _check_run_data(ckpt.path, data)
    ckpt.checked()
    if not isinstance(cmd, ContactsOptions) or not cmd.fit:
        return
    if cmd.save:
        preflight.output(cmd.save, f"--save {cmd.save}")
    elif local:
        default = Path(ckpt.path) / "contact_head"
        preflight.output(default, f"{default} (the default --save)")
    if ckpt.requested_step is not None:
        from esmjax.io.structures import read_chain

        fit_target(opts, cmd, [read_chain(s, sequence=cmd.sequence) for s in cmd.fit])


def run(opts: Options | None, cmd: Any, *, checked: bool = False) -> dict | list:
    """The job of ``cmd``'s type, checked first (``check``) unless ``checked``: its report (a
    fold: its records' JSON)."""
    from esmjax.inference import fold
    from esmjax.inference.options import FoldOptions

    if not checked:
        check(opts, cmd)
    if isinstance(cmd, FoldOptions):
        return fold.fold_fasta(opts.checkpoint, cmd)
    if isinstance(cmd, StructuresOptions):
        return structures(cmd)
    job = {
        PerplexityOptions: perplexity,
        ContactsOptions: contacts,
        VariantsOptions: variants,
        ProteinGymOptions: proteingym,
    }[type(cmd)]
    return job(opts, cmd)
