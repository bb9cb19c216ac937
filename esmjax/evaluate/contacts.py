"""Unsupervised contact precision (Rao et al. 2021, ICLR, "Transformer protein language models are
unsupervised structure learners"; Lin et al. 2023) and the fit of the contact head's logistic
regression.

Metric, as the ESM papers and fair-esm's contact-prediction notebook compute it:

- A contact is a residue pair with CB-CB distance < 8 Angstrom (CA for glycine; see ``structures``).
- Ranges by sequence separation ``s = |i - j|``: short 6 <= s < 12, medium 12 <= s < 24, long s >=
  24.
- ``P@L/k``: rank the pairs of the range (i < j, both residues with coordinates) by predicted
  probability, take the top ``floor(L / k)`` and divide the true contacts among them by ``floor(L /
  k)``. A range with fewer pairs than that counts the shortfall as misses (fair-esm pads with
  zeros), so a perfect predictor scores ``min(1, contacts / floor(L / k))``. ``L`` is the number of
  residues with coordinates (the sequence length for a complete chain). Ties rank in pair order (i,
  then j), so results are deterministic.
- The figure for a set of structures is the mean over structures (fair-esm reports per-protein
  means).

Fit (``--fit``): ESM trained the regression over the N*H attention features on a handful of
  structures with an
L1-penalised logistic regression, on pairs with separation >= 6 (Rao et al. 2021, section 3 and
appendix). Here: minimise ``C * sum_pairs logloss + ||w||_1`` (scikit-learn's L1 form, intercept
unpenalised) with L-BFGS-B on the split ``w = w+ - w-``, ``w+- >= 0`` (a standard smooth
reformulation of the L1 problem).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from esmjax.errors import InputError
from esmjax.inference.engine import Engine, length_bucket
from esmjax.io.structures import ChainStructure
from esmjax.models.alphabet import batch_encode

log = logging.getLogger(__name__)

RANGES: tuple[tuple[str, int, int | None], ...] = (
    ("short", 6, 12),
    ("medium", 12, 24),
    ("long", 24, None),
)
DIVISORS: tuple[tuple[str, int], ...] = (("P@L", 1), ("P@L/2", 2), ("P@L/5", 5))
MIN_SEPARATION = 6
# Rao et al. 2021 fit with an L1 penalty; fair-esm does not record its strength: this C is our
# default.
DEFAULT_C = 0.15


def precision_at_l(
    pred: np.ndarray,
    target: np.ndarray,
    min_sep: int,
    max_sep: int | None,
    length: int | None = None,
) -> dict[str, float]:
    """Precision of the top L, L/2, L/5 predictions in one separation range.

    Args:
      pred: [L, L] predicted scores (only i < j is read).
      target: [L, L] int: 1 contact, 0 none, -1 unknown (excluded).
      min_sep, max_sep: the range ``min_sep <= j - i < max_sep`` (``max_sep=None``: no upper bound).
      length: the ``L`` of ``P@L``; default: residues with a known contact row (``target[i, i] >=
        0``).
    Returns:
      ``{"P@L": p, "P@L/2": p, "P@L/5": p}``; NaN where ``floor(L / k)`` is 0 or the range has no
      pair.
    """
    n = pred.shape[0]
    if length is None:
        length = int((np.diagonal(target) >= 0).sum())
    i, j = np.triu_indices(n, min_sep)
    sep = j - i
    keep = target[i, j] >= 0
    if max_sep is not None:
        keep &= sep < max_sep
    i, j = i[keep], j[keep]
    if (
        i.size == 0
    ):  # no pair with known coordinates at this separation (e.g. long range in a 20-residue chain)
        return {name: float("nan") for name, _ in DIVISORS}
    order = np.argsort(-pred[i, j], kind="stable")
    hits = (target[i, j][order] == 1).astype(np.int64)
    out = {}
    for name, div in DIVISORS:
        k = length // div
        out[name] = float(hits[:k].sum() / k) if k > 0 else float("nan")
    return out


def evaluate_map(pred: np.ndarray, target: np.ndarray) -> dict[str, dict[str, float]]:
    """``{range: {"P@L": ..., "P@L/2": ..., "P@L/5": ...}}`` for short, medium and long range."""
    return {name: precision_at_l(pred, target, lo, hi) for name, lo, hi in RANGES}


def contact_counts(target: np.ndarray) -> dict[str, int]:
    """True contacts per separation range (for reading the precision ceiling ``min(1, n /
    floor(L/k))``)."""
    i, j = np.triu_indices(target.shape[0], MIN_SEPARATION)
    sep = j - i
    is_contact = target[i, j] == 1
    return {
        name: int((is_contact & (sep >= lo) & ((sep < hi) if hi is not None else True)).sum())
        for name, lo, hi in RANGES
    }


def mean_metrics(
    per_structure: Sequence[dict[str, dict[str, float]]],
) -> dict[str, dict[str, float]]:
    """Mean over structures, ignoring NaN (a range too short for ``floor(L/k) >= 1``)."""
    out: dict[str, dict[str, float]] = {}
    for name, _, _ in RANGES:
        out[name] = {}
        for metric, _ in DIVISORS:
            vals = np.array([m[name][metric] for m in per_structure], np.float64)
            vals = vals[~np.isnan(vals)]
            out[name][metric] = float(vals.mean()) if vals.size else float("nan")
    return out


# --------------------------------------------------------------------------------------------------
# Model side
# --------------------------------------------------------------------------------------------------
def _tokens(chain: ChainStructure) -> np.ndarray:
    """[1, T] tokens padded to a length bucket (padding changes no contact: pad rows/columns are
    zeroed)."""
    return batch_encode([chain.sequence], pad_to=length_bucket(len(chain.sequence) + 2))


def predict_contacts(engine: Engine, chain: ChainStructure) -> np.ndarray:
    """[L, L] contact probabilities of the model's contact head for the chain's sequence."""
    n = len(chain.sequence)
    return engine.contacts(_tokens(chain))[0, :n, :n]


def pair_features(engine: Engine, chain: ChainStructure) -> tuple[np.ndarray, np.ndarray]:
    """Training pairs of one chain: features [P, N*H] and labels [P] for i < j, j - i >= 6, known
    contact."""
    n = len(chain.sequence)
    feats = engine.contact_features(_tokens(chain))[0, :n, :n]  # [L, L, N*H]
    target = chain.contact_map()
    i, j = np.triu_indices(n, MIN_SEPARATION)
    keep = target[i, j] >= 0
    i, j = i[keep], j[keep]
    return feats[i, j], target[i, j].astype(np.float32)


@dataclass(frozen=True)
class RegressionFit:
    kernel: np.ndarray  # [N*H]
    bias: float
    num_pairs: int
    num_contacts: int
    nonzero: int
    loss: float  # mean log-loss on the training pairs
    converged: bool


def fit_logistic_l1(
    x: np.ndarray, y: np.ndarray, c: float = DEFAULT_C, max_iter: int = 500
) -> RegressionFit:
    """L1-penalised logistic regression: ``min_w,b C * sum_i log(1 + exp(-s_i (x_i w + b))) +
    ||w||_1``.

    Args:
      x: [P, F] features; y: [P] labels in {0, 1}; c: inverse penalty strength (larger = weaker
        penalty).
    """
    from scipy.optimize import minimize

    if c <= 0:
        raise ValueError(f"C must be positive, got {c}")
    x = np.ascontiguousarray(x, np.float32)
    y = np.asarray(y, np.float64)
    p, f = x.shape
    if p == 0 or y.min() == y.max():
        raise ValueError("the training pairs need both contacts and non-contacts")
    s = 2.0 * y - 1.0  # labels in {-1, +1}

    def objective(z: np.ndarray) -> tuple[float, np.ndarray]:
        w = z[:f] - z[f : 2 * f]
        b = z[-1]
        margin = s * ((x @ w.astype(np.float32)).astype(np.float64) + b)
        loss = np.logaddexp(0.0, -margin).sum()
        g = -s * _sigmoid(-margin)  # d loss / d logit
        gw = (x.T @ g.astype(np.float32)).astype(np.float64) * c
        value = c * loss + z[: 2 * f].sum()
        grad = np.concatenate([gw + 1.0, -gw + 1.0, [c * g.sum()]])
        return value, grad

    z0 = np.zeros(2 * f + 1)
    z0[-1] = np.log(y.mean() / (1 - y.mean()))  # the base rate
    bounds = [(0.0, None)] * (2 * f) + [(None, None)]
    res = minimize(
        objective, z0, jac=True, method="L-BFGS-B", bounds=bounds, options={"maxiter": max_iter}
    )
    w = res.x[:f] - res.x[f : 2 * f]
    margin = s * (x.astype(np.float64) @ w + res.x[-1])
    return RegressionFit(
        kernel=w.astype(np.float32),
        bias=float(res.x[-1]),
        num_pairs=int(p),
        num_contacts=int(y.sum()),
        nonzero=int((np.abs(w) > 0).sum()),
        loss=float(np.logaddexp(0.0, -margin).mean()),
        converged=bool(res.success),
    )


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -x))


def fit_contact_head(
    engine: Engine, chains: Sequence[ChainStructure], c: float = DEFAULT_C
) -> RegressionFit:
    """Fits the regression on ``chains`` and installs it in ``engine``'s model."""
    xs, ys = zip(*(pair_features(engine, ch) for ch in chains))
    y = np.concatenate(ys)
    if y.size == 0 or y.min() == y.max():
        names = ", ".join(ch.name for ch in chains)
        raise InputError(
            f"--fit {names}: the training pairs (separation >= 6) need both contacts and "
            "non-contacts"
        )
    fit = fit_logistic_l1(np.concatenate(xs), y, c)
    if not fit.converged:
        log.warning("contact regression: L-BFGS-B stopped before convergence")
    if fit.nonzero == 0:
        log.warning(
            "contact regression: the L1 penalty (C=%g) zeroed every weight, so the head predicts "
            "one constant: the attention features carry no usable contact signal at this "
            "strength (an undertrained model?); a larger C or more structures may help",
            c,
        )
    engine.set_contact_regression(fit.kernel[:, None], np.array([fit.bias]))
    return fit
