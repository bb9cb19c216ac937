"""Metrics of fine-tuned task heads, computed on the host in float64.

- Classification (single label): accuracy, macro-F1 (the unweighted mean of per-class F1 over the
  classes present in labels or predictions, as ``sklearn.metrics.f1_score(average="macro")``),
  MCC (Gorodkin's multi-class form, ``sklearn.metrics.matthews_corrcoef``) and, with two classes,
  AUROC of the positive class's probability.
- Multi-label: per-label accuracy, macro-F1 over labels, mean AUROC over labels with both values.
- Regression: Spearman, Pearson and RMSE, averaged over targets.
- Residue classification: per-residue accuracy (Q3/Q8 for 3/8 secondary-structure states) and
  macro-F1 over the scored positions only (mask 1).
- Baselines: the majority training class, or the training mean, scored the same way.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import pearsonr

from esmjax.evaluate.fitness_metrics import auc, spearman


def _confusion(y: np.ndarray, p: np.ndarray, k: int) -> np.ndarray:
    return np.bincount(y * k + p, minlength=k * k).reshape(k, k).astype(np.float64)


def macro_f1(y: np.ndarray, p: np.ndarray, k: int) -> float:
    c = _confusion(y, p, k)
    tp = np.diag(c)
    denom = c.sum(0) + c.sum(1)
    present = denom > 0
    return float(np.mean(2 * tp[present] / denom[present])) if present.any() else float("nan")


def mcc(y: np.ndarray, p: np.ndarray, k: int) -> float:
    c = _confusion(y, p, k)
    t, pr, n, correct = c.sum(1), c.sum(0), c.sum(), np.trace(c)
    denom = np.sqrt((n * n - pr @ pr) * (n * n - t @ t))
    return float((correct * n - t @ pr) / denom) if denom > 0 else 0.0


def classification(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """logits [N, C], integer labels [N]."""
    k = logits.shape[1]
    pred = logits.argmax(1)
    out = {
        "accuracy": float(np.mean(pred == labels)),
        "macro_f1": macro_f1(labels, pred, k),
        "mcc": mcc(labels, pred, k),
    }
    if k == 2:
        z = logits - logits.max(1, keepdims=True)
        prob = np.exp(z[:, 1]) / np.exp(z).sum(1)
        out["auroc"] = auc(labels, prob)
    return out


def multi_label(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """logits [N, C], 0/1 labels [N, C] (sigmoid per label)."""
    pred = (logits > 0).astype(int)
    y = labels.astype(int)
    f1 = [macro_f1(y[:, j], pred[:, j], 2) for j in range(y.shape[1])]
    aucs = [auc(y[:, j], logits[:, j]) for j in range(y.shape[1])]
    aucs = [a for a in aucs if np.isfinite(a)]
    return {
        "accuracy": float(np.mean(pred == y)),
        "macro_f1": float(np.nanmean(f1)),
        "auroc": float(np.mean(aucs)) if aucs else float("nan"),
    }


def regression(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """pred, target [N, T]."""
    sp, pe = [], []
    for j in range(target.shape[1]):
        sp.append(spearman(target[:, j], pred[:, j]))
        ok = np.ptp(target[:, j]) > 1e-9 and np.ptp(pred[:, j]) > 1e-9 and len(target) > 1
        pe.append(float(pearsonr(target[:, j], pred[:, j]).statistic) if ok else float("nan"))
    return {
        "spearman": float(np.mean(sp)),
        "pearson": float(np.mean(pe)),
        "rmse": float(np.sqrt(np.mean((pred - target) ** 2))),
    }


def residue(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """logits [P, C] and labels [P] of the scored positions only."""
    pred = logits.argmax(1)
    return {
        "accuracy": float(np.mean(pred == labels)) if len(labels) else float("nan"),
        "macro_f1": macro_f1(labels, pred, logits.shape[1]),
    }


def for_task(task: str, multi: bool, outputs: np.ndarray, targets: np.ndarray) -> dict:
    if task == "sequence_regression":
        return regression(outputs, targets)
    if task == "residue_classification":
        return residue(outputs, targets)
    return multi_label(outputs, targets) if multi else classification(outputs, targets)


def baseline_outputs(task: str, multi: bool, train_targets: np.ndarray, n: int, k: int):
    """Outputs of the trivial predictor (majority class / label frequencies / training mean)."""
    if task == "sequence_regression":
        return np.broadcast_to(train_targets.mean(0), (n, train_targets.shape[1])).copy()
    if multi:
        freq = train_targets.mean(0)
        return np.broadcast_to(np.log(freq + 1e-9) - np.log(1 - freq + 1e-9), (n, k)).copy()
    counts = np.bincount(train_targets.astype(int), minlength=k)
    out = np.zeros((n, k))
    out[:, int(counts.argmax())] = 1.0
    return out
