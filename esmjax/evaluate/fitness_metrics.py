"""ProteinGym's zero-shot fitness metrics (Notin et al. 2023, "ProteinGym: Large-Scale Benchmarks
for
Protein Design and Fitness Prediction", NeurIPS Datasets and Benchmarks).

Each function follows ``proteingym/performance_DMS_benchmarks.py`` of the ``proteingym`` 1.3 package
(the reference scoring code; ``tests/test_evaluate_proteingym.py`` checks every function against it
on
the same inputs):

- Spearman: ``scipy.stats.spearmanr(DMS_score, model_score)``.
- AUC: ROC AUC of the model score against ``DMS_score_bin`` (``sklearn.metrics.roc_auc_score``; here
  the Mann-Whitney form with average ranks for ties, which is the same number).
- MCC: the model score binarised at its own median (``>= median`` is 1) against ``DMS_score_bin``
  (``sklearn.metrics.matthews_corrcoef``, 0 when a margin of the confusion table is empty).
- NDCG: at the top 10% (``k = floor(0.1 n)``), gains are the min-max scaled ``DMS_score``, ranks of
  the
  model score (ties broken by position, as ``np.argsort``), zero gains dropped (``calc_ndcg``).
- Top-10% recall: of the variants at or above the 90th percentile of ``DMS_score``, the fraction
  also at
  or above the 90th percentile of the model score (``calc_toprecall``; NumPy's linear percentile).

Aggregation (``aggregate``) as ProteinGym's summary: assays are averaged per (UniProt id, coarse
selection type), those per selection type, and the selection types' means are averaged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy.stats import rankdata, spearmanr

METRICS = ("spearman", "auc", "mcc", "ndcg", "top_recall")


def spearman(y_true: Sequence[float], y_score: Sequence[float]) -> float:
    """Spearman rank correlation; NaN when either side is constant."""
    t, s = np.asarray(y_true, np.float64), np.asarray(y_score, np.float64)
    if len(t) < 2 or np.all(t == t[0]) or np.all(s == s[0]):
        return float("nan")
    return float(spearmanr(t, s).statistic)


def auc(y_bin: Sequence[int], y_score: Sequence[float]) -> float:
    """ROC AUC (probability a positive outranks a negative, ties half); NaN with one class only."""
    b, s = np.asarray(y_bin).astype(bool), np.asarray(y_score, np.float64)
    pos, neg = int(b.sum()), int((~b).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    ranks = rankdata(s)  # average ranks for ties
    return float((ranks[b].sum() - pos * (pos + 1) / 2) / (pos * neg))


def mcc(y_bin: Sequence[int], y_score: Sequence[float]) -> float:
    """Matthews correlation of ``y_score >= median(y_score)`` with the measured binary label."""
    b = np.asarray(y_bin).astype(bool)
    s = np.asarray(y_score, np.float64)
    pred = s >= np.median(s)
    tp, tn = float(np.sum(pred & b)), float(np.sum(~pred & ~b))
    fp, fn = float(np.sum(pred & ~b)), float(np.sum(~pred & b))
    denom = (tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)
    return 0.0 if denom == 0 else float((tp * tn - fp * fn) / np.sqrt(denom))


def ndcg(y_true: Sequence[float], y_score: Sequence[float], top: float = 10) -> float:
    """Normalised discounted cumulative gain over the model's top ``top`` percent."""
    t, s = np.asarray(y_true, np.float64), np.asarray(y_score, np.float64)
    k = int(np.floor(len(t) * top / 100))
    gains = (t - t.min()) / (t.max() - t.min())

    def dcg(ranks: np.ndarray) -> float:
        keep = (ranks <= k) & (gains != 0)
        return float(np.sum(gains[keep] / np.log2(ranks[keep] + 1)))

    got = dcg(np.argsort(np.argsort(-s)) + 1)
    if got == 0:
        return 0.0
    return got / dcg(np.argsort(np.argsort(-gains)) + 1)


def top_recall(y_true: Sequence[float], y_score: Sequence[float], top: float = 10) -> float:
    """Recall of the measured top ``top`` percent among the model's top ``top`` percent."""
    t, s = np.asarray(y_true, np.float64), np.asarray(y_score, np.float64)
    top_true = t >= np.percentile(t, 100 - top)
    top_model = s >= np.percentile(s, 100 - top)
    n = int(top_true.sum())
    return float((top_true & top_model).sum() / n) if n else 0.0


def assay_metrics(
    dms_score: Sequence[float], dms_bin: Sequence[int] | None, model_score: Sequence[float]
) -> dict[str, float]:
    """The five metrics of one assay (AUC and MCC NaN when the assay has no ``DMS_score_bin``)."""
    out = {
        "spearman": spearman(dms_score, model_score),
        "ndcg": ndcg(dms_score, model_score),
        "top_recall": top_recall(dms_score, model_score),
    }
    if dms_bin is None:
        out["auc"] = out["mcc"] = float("nan")
    else:
        out["auc"], out["mcc"] = auc(dms_bin, model_score), mcc(dms_bin, model_score)
    return {k: out[k] for k in METRICS}


def _mean(values: Sequence[float]) -> float:
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], np.float64)
    return float(v.mean()) if len(v) else float("nan")


def aggregate(rows: Sequence[Mapping]) -> dict:
    """ProteinGym's summary of per-assay rows (``metrics``, ``selection_type``, ``uniprot_id``).

    Returns ``{"by_selection_type": {type: {metric: mean}}, "overall": {metric: mean of the
    types}}``;
    NaN metrics are left out of means (pandas' ``mean`` skips them too).
    """
    by_protein: dict[tuple[str, str], list[Mapping]] = {}
    for r in rows:
        key = (r.get("uniprot_id") or r["dms_id"], r["selection_type"])
        by_protein.setdefault(key, []).append(r["metrics"])
    protein_means = {
        key: {m: _mean([x[m] for x in group]) for m in METRICS} for key, group in by_protein.items()
    }
    by_type: dict[str, dict[str, float]] = {}
    for t in sorted({t for _, t in protein_means}):
        group = [v for (_, tt), v in protein_means.items() if tt == t]
        by_type[t] = {m: _mean([x[m] for x in group]) for m in METRICS}
    overall = {m: _mean([v[m] for v in by_type.values()]) for m in METRICS}
    return {"by_selection_type": by_type, "overall": overall}
