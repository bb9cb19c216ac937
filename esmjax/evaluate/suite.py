"""``esmjax evaluate all`` (a checkpoint's report card) and ``esmjax evaluate compare``.

A suite is a YAML file with one section per evaluation; each section's keys are that subcommand's
options without the dashes (``max_tokens_per_batch`` or ``max-tokens-per-batch``), lists for
options taking several values, ``true`` for flags. ``--checkpoint``, ``--step``, ``--out`` and the
sharding/dtype options come from ``evaluate all`` itself::

    perplexity: {}                       # the run's held-out data
    contacts:
      fit: [S/biotite/1gya.pdb, S/biotite/3o5r.pdb]
      structures: [S/biotite/1aki.pdb, S/alphafold/2rbg.pdb]
    variants: {dms: ../shared/data/esm_examples/P62593.fasta}
    proteingym: {folder: DMS_ProteinGym_substitutions, assays: [BLAT_ECOLX_Stiffler_2015]}
    structures:                          # ESMFold: fold `fasta`, score against `reference`
      fasta: targets.fasta
      reference: [references/]

Relative paths are read relative to the suite file. For ``structures`` an ESMFold checkpoint first
folds ``fasta`` into ``<out>/folds`` (``esmjax fold``); ``predicted`` instead scores existing
predictions. Sections the checkpoint cannot run (``structures`` with neither) are an error; an
ESM-2 checkpoint with a ``fasta`` structures section is skipped and said so.

Every evaluation writes its own report into the report folder; the card (``summary.json`` and
``summary.md``) keeps one headline number per metric, named ``<evaluation>/<metric>`` so cards of
different checkpoints line up in ``compare``.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from esmjax.errors import InputError
from esmjax.io import checkpoint, paths

if TYPE_CHECKING:
    from esmjax.evaluate.options import Options

log = logging.getLogger("esmjax.evaluate")

SECTIONS = ("perplexity", "contacts", "variants", "proteingym", "structures")
PATH_KEYS = {"data", "fit", "structures", "dms", "wt_sequence", "folder", "reference", "fasta",
             "predicted", "pairs", "save"}  # fmt: skip
SUMMARY = "summary.json"


def read_suite(path: str | Path) -> dict[str, dict[str, Any]]:
    """The suite's sections in file order, keys normalised to ``snake_case``, paths resolved."""
    import yaml

    path = paths.given(path)  # a local file or a bucket URL
    with paths.remote_errors(str(path)):
        if not path.is_file():
            raise InputError(f"{path}: no such suite file")
        text = paths.read_text(path, "a suite YAML")
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise InputError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict) or not raw:
        raise InputError(f"{path}: expected a mapping of evaluations ({', '.join(SECTIONS)})")
    out = {}
    for name, section in raw.items():
        if name not in SECTIONS:
            raise InputError(f"{path}: unknown evaluation {name!r} (known: {', '.join(SECTIONS)})")
        if section in (None, True):
            section = {}
        if not isinstance(section, dict):
            raise InputError(f"{path}: {name}: expected a mapping of options")
        opts = {}
        for key, value in section.items():
            k = str(key).replace("-", "_")
            if k in PATH_KEYS:
                value = (
                    [_resolve(path, v) for v in value]
                    if isinstance(value, list)
                    else (_resolve(path, value))
                )
            opts[k] = value
        out[name] = opts
    return out


def _resolve(suite: Any, value: Any) -> str:
    """A path of the suite file: a bucket URL or an absolute path as written, a relative one
    relative to the suite's folder (which may be in a bucket)."""
    text = str(value)
    if paths.is_remote(text) or Path(text).is_absolute():
        return text
    candidate = suite.parent / text
    # FILE:CHAIN specs: resolve the file part
    with paths.remote_errors(str(suite)):
        if not candidate.exists() and ":" in text:
            file, chain = text.rsplit(":", 1)
            if (suite.parent / file).exists():
                return f"{suite.parent / file}:{chain}"
    return str(candidate)


# --------------------------------------------------------------------------------------------------
# The suite run
# --------------------------------------------------------------------------------------------------
def run(opts: Options, suite: str) -> dict:
    """``evaluate all``: the report card of ``opts.checkpoint`` for the suite file ``suite``.
    Every section is checked before any runs (and computes, fits or writes); the card goes to
    ``opts.out`` (default ``<checkpoint>/eval/step_<N>``) with each evaluation's report."""
    import dataclasses

    from esmjax.evaluate import jobs, report

    sections = read_suite(suite)
    jobs.check_report(opts)
    # Orbax (the latest step) uses JAX, whose distributed start-up must come first; the sections'
    # options, which name that step, are checked after it.
    if opts.start is not None:
        opts.start()
    ckpt = opts.checkpoint.pinned()
    step = ckpt.requested_step
    out = paths.given(opts.out) if opts.out else report.default_out_dir(ckpt.path, step)
    opts = dataclasses.replace(opts, checkpoint=ckpt, out=str(out))
    plan, skipped = _plan(opts, sections, suite)
    for steps in plan.values():  # every section, before any runs
        for options, cmd in steps:
            jobs.check(options, cmd)
    reports = {}
    for name, steps in plan.items():
        log.info("evaluate all: %s", name)
        for options, cmd in steps:
            jobs.run(options, cmd, checked=True)
        reports[name] = out / f"{name}.json"
    if ckpt.kind == checkpoint.ESMFOLD:
        info = {"checkpoint": paths.absolute(ckpt.path), "step": step, "config_hash": None}
    else:
        info = report.checkpoint_info(ckpt, step)
    summary = card(info, suite, reports, skipped)
    path = report.write(summary, out / SUMMARY)
    table = markdown([summary])
    if jobs.is_main():
        paths.write_text(out / "summary.md", table + "\n")
        print(table)
        for name, why in skipped.items():
            print(f"skipped {name}: {why}")
        print(f"report card: {path}")
    return summary


def _plan(opts: Options, sections: dict[str, dict], suite: str) -> tuple[dict, dict[str, str]]:
    """``({section: [(options, job options), ...]}, {section: why skipped})``: the typed options
    of every section the checkpoint can run, each section's mistakes one line naming it."""
    import dataclasses

    from esmjax.evaluate import options as op

    esmfold = opts.checkpoint.kind == checkpoint.ESMFOLD
    plan, skipped = {}, {}
    for name, section in sections.items():
        where = f"{suite}: {name}"
        if name == "structures":
            steps = _structures(opts, dict(section), where, esmfold)
            if steps is None:
                skipped[name] = "folding needs an ESMFold checkpoint"
            else:
                plan[name] = steps
            continue
        if esmfold:
            skipped[name] = "language-model evaluations take an ESM-2 checkpoint"
            continue
        job = op.JOBS[name]
        known = {**op.keys(job), **op.keys(op.Options, op.SECTION_SETTINGS, required=False)}
        values = op.from_section(section, where, known)
        settings = {k: values.pop(k) for k in op.SECTION_SETTINGS if k in values}
        plan[name] = [(dataclasses.replace(opts, **settings), job(**values))]
    return plan, skipped


def _structures(opts: Options, section: dict, where: str, esmfold: bool) -> list | None:
    """The steps of a ``structures`` section: fold ``fasta`` into ``<out>/folds`` (an ESMFold
    checkpoint; None for another) and score the folds, or score ``predicted``/``pairs``."""
    from esmjax.evaluate import options as op
    from esmjax.inference.options import FoldOptions

    fasta = section.pop("fasta", None)
    if fasta is None and "predicted" not in section and "pairs" not in section:
        raise InputError(f"{where}: give fasta (ESMFold checkpoints) or predicted/pairs")
    if fasta is not None and not esmfold:
        return None
    steps = []
    if fasta is not None:
        names = ("num_recycles", "chunk_size", "max_tokens_per_batch")
        given = {k: section.pop(k) for k in names if k in section}
        values = op.from_section(given, where, op.keys(FoldOptions, names, required=False))
        folds = str(paths.given(opts.out) / "folds")
        fold = FoldOptions(
            fasta=str(fasta), out=folds, format="files", progress=opts.progress, **values
        )
        steps.append((opts, fold))
        section["predicted"] = [folds]
    names = ("predicted", "reference", "pairs", "plot")
    values = op.from_section(section, where, op.keys(op.StructuresOptions, names))
    values["plot"] = values.get("plot", False) or opts.plot
    steps.append((None, op.StructuresOptions(out=opts.out, progress=opts.progress, **values)))
    return steps


def compare(
    cards: Sequence[str], names: Sequence[str] | None = None, out: str | None = None
) -> str:
    """``evaluate compare``: the report cards side by side, printed (and written to ``out``)."""
    from esmjax.inference import preflight

    preflight.output(out, f"--out {out}", folder=False)
    loaded = [load_card(c) for c in cards]
    if names and len(names) != len(loaded):
        raise InputError(f"--names: {len(names)} names for {len(loaded)} cards")
    table = markdown(loaded, names)
    print(table)
    if out:
        paths.write_text(out, table + "\n")
    return table


# --------------------------------------------------------------------------------------------------
# Headline numbers
# --------------------------------------------------------------------------------------------------
def headline(name: str, report: dict[str, Any]) -> dict[str, float | None]:
    """The numbers of one evaluation's report that go on the card."""
    r = report["results"]
    if name == "perplexity":
        ml = r["masked_lm"]
        out = {"perplexity": ml["perplexity"], "masked_accuracy": ml["masked_accuracy"]}
        out["unigram_perplexity"] = ml["unigram_perplexity"]
        if "pseudo" in r:
            out["pseudo_perplexity"] = r["pseudo"]["pseudo_perplexity"]
        return out
    if name == "contacts":
        return {
            f"{rng} {k}": r["mean"][rng][k] for rng in ("medium", "long") for k in ("P@L", "P@L/5")
        }
    if name == "variants":
        return {"spearman": r["spearman"], "variants": r["variants"]}
    if name == "proteingym":
        return {**r["summary"]["overall"], "assays": r["assays"]}
    if name == "structures":
        keys = ("lddt", "lddt_ca", "tm_score", "gdt_ts", "rmsd_ca", "plddt_lddt_pearson")
        return {**{k: r["mean"][k] for k in keys}, "targets": r["targets"]}
    raise KeyError(name)


def card(
    info: dict[str, Any], suite: str, reports: dict[str, Path], skipped: dict[str, str]
) -> dict:
    """One checkpoint's card: provenance, ``<evaluation>/<metric>`` numbers, report paths."""
    metrics: dict[str, Any] = {}
    for name, path in reports.items():
        with paths.remote_errors(str(path)):
            text = paths.given(path).read_text()  # the report folder may be a bucket
        for k, v in headline(name, json.loads(text)).items():
            metrics[f"{name}/{k}"] = v
    return {
        "command": "evaluate all",
        "checkpoint": info["checkpoint"],
        "step": info["step"],
        "config_hash": info["config_hash"],
        "suite": paths.absolute(suite),
        "metrics": metrics,
        "reports": {k: paths.absolute(v) for k, v in reports.items()},
        "skipped": skipped,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def markdown(cards: Sequence[dict], names: Sequence[str] | None = None) -> str:
    """A Markdown table: one row per metric, one column per card (metrics in first-seen order)."""
    names = list(names or [f"{paths.given(c['checkpoint']).name}@{c['step']}" for c in cards])
    keys: list[str] = []
    for c in cards:
        keys += [k for k in c["metrics"] if k not in keys]
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---:|" * len(cards)]
    for k in keys:
        lines.append(f"| {k} | " + " | ".join(_fmt(c["metrics"].get(k)) for c in cards) + " |")
    return "\n".join(lines)


def load_card(arg: str | Path) -> dict:
    """A ``summary.json`` or a folder holding one (a local path or a bucket URL)."""
    p = paths.given(arg)
    with paths.remote_errors(str(arg)):
        if p.is_dir():
            p = p / SUMMARY
        if not p.is_file():
            raise InputError(f"{arg}: no {SUMMARY} (written by `esmjax evaluate all`)")
        text = paths.read_text(p, f"a report card ({SUMMARY})")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{p}: not JSON ({e.msg})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("metrics"), dict):
        raise InputError(f"{p}: not a report card (no 'metrics')")
    return obj
