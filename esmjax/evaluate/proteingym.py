"""``esmjax evaluate proteingym``: zero-shot fitness on ProteinGym substitution assays (Notin et al.
2023), scored as ProteinGym scores ESM models (``proteingym/baselines/esm/compute_fitness.py``).

Input, as users download it: a reference CSV (``DMS_substitutions.csv``; columns ``DMS_id``,
``DMS_filename``, ``target_seq``, ``coarse_selection_type``, optionally ``UniProt_ID``) and a folder
with one CSV per assay (``mutant``, ``mutated_sequence``, ``DMS_score``, ``DMS_score_bin``; mutants
``A42G`` or ``A42G:V50L``, numbered from 1 on ``target_seq``).

Scores (higher = fitter), per variant:

- ``masked-marginals`` (default; Meier et al. 2021, eq. 1): ``sum_i log p(mt_i | x_\\i) - log
  p(wt_i |
  x_\\i)``, position i masked in the wild type; one forward pass per distinct mutated position.
- ``wt-marginals`` (Meier et al. 2021): the same log-odds read from one unmasked pass of the wild
  type.
- ``pll``: pseudo-log-likelihood of the mutated sequence minus that of the wild type (Salazar et al.
  2020): every position masked in turn, L passes per variant (slow).

Long proteins: the model sees at most ``window`` residues (default 1022, ESM-2's 1024-token crop).
Longer targets are scored as ProteinGym/ESM-1v do (``get_optimal_window``): for each masked position
a ``window``-residue crop centred on it, shifted inside the sequence at the ends; wild-type
marginals
use the crop around each position too, PLL the crop around the mean mutated position. The report
records whether any crop was used.

Bad rows (a mutant that does not parse or does not match ``target_seq``, a ``mutated_sequence`` that
is not the wild type with the mutant applied, a missing score) stop with one line naming the file
and row, or with ``skip_invalid`` are skipped and counted. A missing assay file or column is always
an error. Every assay is checked (``check_assays``) before the checkpoint is restored. The
reference and the folder may be bucket URLs (``esmjax.io.paths``).

Each assay's per-variant scores go to ``proteingym_assays/<DMS_id>_scores.csv`` with every number
in full (``variants.exact``), so ProteinGym's scripts run on those files give esmjax's figures.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from esmjax.errors import InputError
from esmjax.evaluate import fitness_metrics as fm
from esmjax.evaluate.variants import (
    DMSError,
    Variant,
    apply_mutations,
    check_against,
    exact,
    marginal_scores,
    optimal_window,
    parse_mutant,
)
from esmjax.inference.engine import Engine, MaskedQuery, masked_logprobs
from esmjax.io import paths
from esmjax.models.alphabet import TOKEN_TO_ID

REFERENCE_COLUMNS = ("DMS_id", "DMS_filename", "target_seq", "coarse_selection_type")
ASSAY_COLUMNS = ("mutant", "DMS_score")
DEFAULT_WINDOW = 1022  # residues: ESM-2's 1024 tokens minus BOS/EOS


@dataclass(frozen=True)
class AssayInfo:
    """One row of the reference CSV."""

    dms_id: str
    path: Any  # a pathlib.Path, or an epath.Path for a bucket (paths.given)
    target_seq: str
    selection_type: str
    uniprot_id: str


@dataclass
class Assay:
    info: AssayInfo
    variants: list[Variant]
    bins: list[int] | None  # DMS_score_bin per variant, None when the column is absent
    skipped: dict[str, int] = field(default_factory=dict)


def read_reference(
    reference: str | Path, folder: str | Path, assays: Sequence[str] | None = None
) -> list[AssayInfo]:
    """The assays of ``reference`` (all, or the ``assays`` subset, in the reference's order).
    Either may be a bucket URL (``paths.given``); the assays' paths are then URLs too."""
    with paths.remote_errors(reference):
        infos = _read_reference(paths.given(reference), paths.given(folder))
    if assays:
        known = {a.dms_id: a for a in infos}
        unknown = [a for a in assays if a not in known]
        if unknown:
            raise InputError(f"--assays: {', '.join(unknown)} not in {reference}")
        infos = [a for a in infos if a.dms_id in set(assays)]
    with paths.remote_errors(folder):
        for a in infos:
            if not a.path.is_file():
                raise InputError(f"{reference}: assay {a.dms_id}: no such file {a.path}")
    if not infos:
        raise InputError(f"{reference}: no assays")
    return infos


def _read_reference(reference: Any, folder: Any) -> list[AssayInfo]:
    if not reference.is_file():
        raise InputError(
            f"{reference}: no such reference file (ProteinGym's DMS_substitutions.csv)"
        )
    with paths.remote_errors(str(folder)):
        if not folder.is_dir():
            raise InputError(f"{folder}: no such assay folder")
    out = []
    with paths.open_read(str(reference), newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in REFERENCE_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise InputError(f"{reference}:1: header lacks column(s) {', '.join(missing)}")
        for row in reader:
            where = f"{reference}:{reader.line_num}"
            seq = (row["target_seq"] or "").strip().upper()
            if not row["DMS_id"] or not seq:
                raise InputError(f"{where}: empty DMS_id or target_seq")
            out.append(
                AssayInfo(
                    row["DMS_id"].strip(),
                    folder / row["DMS_filename"].strip(),
                    seq,
                    (row["coarse_selection_type"] or "").strip() or "unknown",
                    (row.get("UniProt_ID") or "").strip(),
                )
            )
    return out


def read_assay(info: AssayInfo, skip_invalid: bool = False) -> Assay:
    """Parses one assay CSV against its ``target_seq``."""
    path, wt = info.path, info.target_seq
    skipped: Counter[str] = Counter()
    variants, bins = [], []
    with paths.remote_errors(str(path)), paths.open_read(str(path), newline="") as f:
        reader = csv.DictReader(f)
        cols = reader.fieldnames or []
        missing = [c for c in ASSAY_COLUMNS if c not in cols]
        if missing:
            raise InputError(f"{path}:1: header {cols} lacks column(s) {', '.join(missing)}")
        has_bin, has_seq = "DMS_score_bin" in cols, "mutated_sequence" in cols
        for row in reader:
            where = f"{path}:{reader.line_num}"
            try:
                name = (row["mutant"] or "").strip()
                muts = parse_mutant(name, 1, where)
                raw = (row["DMS_score"] or "").strip()
                try:
                    score = float(raw)
                except ValueError:
                    raise DMSError(f"{where}: DMS_score {raw!r} is not a number") from None
                if math.isnan(score):
                    raise DMSError(f"{where}: DMS_score is missing")
                v = Variant(name, muts, score, reader.line_num)
                check_against(wt, v, where, 1)
                if any(m.mt == "*" for m in muts):
                    skipped["stop codon"] += 1
                    continue
                if has_seq and (row["mutated_sequence"] or "").strip().upper() != apply_mutations(
                    wt, muts
                ):
                    raise DMSError(
                        f"{where}: mutated_sequence is not target_seq with {name} applied"
                    )
                b = None
                if has_bin:
                    braw = (row["DMS_score_bin"] or "").strip()
                    try:
                        b = int(float(braw))
                    except ValueError:
                        raise DMSError(f"{where}: DMS_score_bin {braw!r} is not 0 or 1") from None
                    if b not in (0, 1):
                        raise DMSError(f"{where}: DMS_score_bin {braw!r} is not 0 or 1")
            except DMSError as e:
                if not skip_invalid:
                    raise
                skipped[_reason(str(e))] += 1
                continue
            variants.append(v)
            bins.append(b)
    if not variants:
        raise InputError(f"{path}: no scorable variant rows")
    return Assay(info, variants, bins if has_bin else None, dict(skipped))


def check_assays(infos: Sequence[AssayInfo], skip_invalid: bool = False) -> None:
    """Parses every assay (raising ``read_assay``'s one-line error naming the file and row) before
    the checkpoint is restored: a bad row in the 200th assay otherwise surfaced after the restore
    and hours of scoring the 199 before it. The parse is repeated when each assay is scored, since
    holding every assay's variants (millions in the whole benchmark) would take gigabytes."""
    for info in infos:
        read_assay(info, skip_invalid)


_REASONS = (
    ("does not match", "wild-type mismatch"),
    ("outside the", "position outside target_seq"),
    ("cannot read mutant", "unreadable mutant"),
    ("names a position twice", "unreadable mutant"),
    ("mutated_sequence", "mutated_sequence mismatch"),
    ("DMS_score_bin", "bad DMS_score_bin"),
    ("DMS_score", "bad DMS_score"),
)


def _reason(message: str) -> str:
    """The skip-summary category of a row error."""
    return next((label for key, label in _REASONS if key in message), "invalid row")


# --------------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------------
def pll_scores(
    engine: Engine,
    wt: str,
    variants: Sequence[Variant],
    window: int = DEFAULT_WINDOW,
    max_tokens: int = 8192,
) -> np.ndarray:
    """[V] pseudo-log-likelihood of each mutated sequence minus the wild type's, over one crop."""
    crops = []
    for v in variants:
        centre = int(round(np.mean([m.position for m in v.mutations])))
        crops.append(optimal_window(centre, len(wt), window))
    seqs: dict[str, int] = {}
    items = []  # (variant index or -1 for wt, crop)
    for k, (s, e) in enumerate(crops):
        items.append(
            (seqs.setdefault(apply_mutations(wt, variants[k].mutations)[s:e], len(seqs)), s, e)
        )
    wt_crops = {(s, e) for s, e in crops}
    wt_index = {c: seqs.setdefault(wt[c[0] : c[1]], len(seqs)) for c in sorted(wt_crops)}
    order = list(seqs)
    queries = [MaskedQuery(i, p) for i, seq in enumerate(order) for p in range(len(seq))]
    logp = masked_logprobs(engine, order, queries, max_tokens)
    pll = np.zeros(len(order), np.float64)
    for q, lp in zip(queries, logp):
        pll[q.seq] += float(lp[TOKEN_TO_ID[order[q.seq][q.position]]])
    return np.array([pll[i] - pll[wt_index[(s, e)]] for i, s, e in items])


def score_assay(
    engine: Engine,
    assay: Assay,
    method: str = "masked-marginals",
    window: int = DEFAULT_WINDOW,
    max_tokens: int = 8192,
) -> np.ndarray:
    wt = assay.info.target_seq
    if method == "pll":
        return pll_scores(engine, wt, assay.variants, window, max_tokens)
    masked = method == "masked-marginals"
    return marginal_scores(engine, wt, assay.variants, masked, window, max_tokens)


# --------------------------------------------------------------------------------------------------
# One assay's result, cached in the report folder so an interrupted run resumes
# --------------------------------------------------------------------------------------------------
def cache_key(info: AssayInfo, settings: dict) -> str:
    """A digest of what decides an assay's scores: the checkpoint/settings and the assay file."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    h.update(info.target_seq.encode())
    with paths.remote_errors(str(info.path)):
        h.update(info.path.read_bytes())
    return h.hexdigest()[:16]


def evaluate_assay(
    engine: Engine, info: AssayInfo, settings: dict, cache_dir: Path, skip_invalid: bool = False
) -> dict:
    """Scores one assay (or reads its cached result) and returns its row of the report."""
    key = cache_key(info, settings)
    cached = cache_dir / f"{info.dms_id}.json"
    if cached.is_file():
        try:
            row = json.loads(cached.read_text())
            if row.get("cache_key") == key:
                row["cached"] = True
                return row
        except json.JSONDecodeError:
            pass  # a damaged cache entry is recomputed
    assay = read_assay(info, skip_invalid)
    scores = score_assay(
        engine, assay, settings["method"], settings["window"], settings["max_tokens"]
    )
    fitness = np.array([v.fitness for v in assay.variants])
    row = {
        "dms_id": info.dms_id,
        "uniprot_id": info.uniprot_id,
        "selection_type": info.selection_type,
        "file": str(info.path),
        "length": len(info.target_seq),
        "variants": len(assay.variants),
        "multi_mutants": sum(len(v.mutations) > 1 for v in assay.variants),
        "skipped": assay.skipped,
        "windowed": len(info.target_seq) > settings["window"],
        "metrics": fm.assay_metrics(fitness, assay.bins, scores),
        "cache_key": key,
    }
    if _is_main():  # every process computed the same numbers; one writes them
        _write_scores(cache_dir / f"{info.dms_id}_scores.csv", assay, scores)
        _atomic_json(cached, row)
    row["cached"] = False
    return row


def _is_main() -> bool:
    import jax

    return jax.process_index() == 0


def _write_scores(path: Path, assay: Assay, scores: np.ndarray) -> None:
    """The assay's variants with their scores, every number in full (``variants.exact``): the
    metrics recomputed from the file are the report's."""
    f = io.StringIO()
    w = csv.writer(f)
    w.writerow(["mutant", "DMS_score", "DMS_score_bin", "score"])
    bins = assay.bins or [""] * len(assay.variants)
    for v, b, s in zip(assay.variants, bins, scores):
        w.writerow((v.name, exact(v.fitness), b, exact(s)))
    paths.write_text(path, f.getvalue())  # whole: a renamed local file or one bucket object


def _atomic_json(path: Path, obj: dict) -> None:
    from esmjax.evaluate.report import clean

    paths.write_text(path, json.dumps(clean(obj), indent=2) + "\n")


def write_assay_table(rows: Sequence[dict], path: Path) -> Path:
    """The per-assay CSV: id, selection type, counts and the five metrics."""
    f = io.StringIO()
    w = csv.writer(f)
    w.writerow(
        ["DMS_id", "UniProt_ID", "selection_type", "length", "variants", "windowed"]
        + list(fm.METRICS)
    )
    for r in rows:
        w.writerow(
            [r["dms_id"], r["uniprot_id"], r["selection_type"], r["length"], r["variants"]]
            + [r["windowed"]]
            + [r["metrics"][m] for m in fm.METRICS]
        )
    paths.write_text(path, f.getvalue())
    return path


def plot_spearman(rows: Sequence[dict], path: Path, title: str = "") -> Path:
    """Per-assay Spearman, sorted, bars coloured by coarse selection type."""
    from esmjax.evaluate.plot import figure, save

    rows = sorted(rows, key=lambda r: -(r["metrics"]["spearman"] or -2))
    types = sorted({r["selection_type"] for r in rows})
    colours = {t: f"C{i % 10}" for i, t in enumerate(types)}
    fig = figure(max(4.5, 0.25 * len(rows) + 2), 4.0)
    ax = fig.subplots()
    values = [r["metrics"]["spearman"] for r in rows]
    values = [v if v is not None and math.isfinite(v) else 0.0 for v in values]
    ax.bar(range(len(rows)), values, color=[colours[r["selection_type"]] for r in rows])
    ax.set_xticks(range(len(rows)), [r["dms_id"] for r in rows], rotation=90, fontsize=7)
    ax.set_ylabel("Spearman")
    ax.axhline(0, color="k", lw=0.5)
    for t in types:
        ax.bar([], [], color=colours[t], label=t)
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    return save(fig, path)


# --------------------------------------------------------------------------------------------------
# The whole benchmark
# --------------------------------------------------------------------------------------------------
def run(
    engine: Engine,
    infos: Sequence[AssayInfo],
    settings: dict,
    out: Path,
    skip_invalid: bool = False,
    progress: bool = True,
) -> dict:
    """Scores every assay (resuming from ``out/proteingym_assays/``), writes the per-assay CSV and
    returns the results: per-assay rows, ProteinGym's aggregate, and what was windowed or
    skipped."""
    import sys

    from tqdm import tqdm

    cache_dir = out / "proteingym_assays"
    rows = []
    for info in tqdm(infos, desc="assays", unit="assay", file=sys.stderr, disable=not progress):
        rows.append(evaluate_assay(engine, info, settings, cache_dir, skip_invalid))
    skipped: Counter[str] = Counter()
    for r in rows:
        skipped.update(r["skipped"])
    return {
        "summary": fm.aggregate(rows),
        "assays": len(rows),
        "variants": sum(r["variants"] for r in rows),
        "skipped": dict(skipped),
        "windowed_assays": [r["dms_id"] for r in rows if r["windowed"]],
        "resumed_assays": sum(r["cached"] for r in rows),
        "per_assay": [
            {k: v for k, v in r.items() if k not in ("cache_key", "cached")} for r in rows
        ],
    }


def summary_text(results: dict) -> str:
    """The printed table: every assay, the selection-type means and the overall mean."""
    from esmjax.evaluate.report import table

    rows = [
        (r["dms_id"], r["selection_type"], r["variants"], *(r["metrics"][m] for m in fm.METRICS))
        for r in results["per_assay"]
    ]
    for t, v in results["summary"]["by_selection_type"].items():
        rows.append((f"mean {t}", t, None, *(v[m] for m in fm.METRICS)))
    rows.append(("mean", "all", None, *(results["summary"]["overall"][m] for m in fm.METRICS)))
    text = table(("assay", "selection", "variants", *fm.METRICS), rows)
    skipped = ", ".join(f"{n} {why}" for why, n in results["skipped"].items()) or "none"
    windowed = ", ".join(results["windowed_assays"]) or "none"
    return text + f"\nskipped: {skipped}; cropped to the window: {windowed}"
