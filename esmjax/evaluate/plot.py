"""``esmjax plot W``: training curves from a workdir's ``metrics.jsonl``, and the figures of
``esmjax evaluate --plot`` (contact maps, variant-effect scatter).

Figures are drawn with matplotlib's Agg canvas directly (no pyplot, no display, no global state), so
plotting works on headless machines and inside other programs. A figure's path may be a bucket URL
(``gs://``, ``s3://``): the PNG is rendered in memory and written as one object (``save``).

``metrics.jsonl`` holds one JSON object per line: training lines carry ``step, loss, perplexity,
...``, evaluation lines ``step, eval_loss, eval_perplexity, ...``. A last line cut off by a running
or killed job is skipped with a warning; any other unreadable line is an error naming it.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from esmjax.errors import InputError
from esmjax.io import paths

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


def figure(width: float, height: float):
    """An off-screen (Agg) matplotlib figure, without pyplot's global state."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise InputError("plotting needs matplotlib: pip install 'esmjax[eval]'") from None

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save(fig, path: str | os.PathLike) -> Path:
    """Writes the figure ``path`` (PNG, or the format its suffix names): a bucket URL as one
    object upload (whole or absent), a local file as a temporary sibling renamed into place
    (``paths.write_bytes``)."""
    buf = io.BytesIO()
    fig.savefig(buf, format=os.path.splitext(str(path))[1].lstrip(".") or "png")
    paths.write_bytes(path, buf.getvalue())
    return paths.path(path) if paths.is_remote(path) else Path(path)


# --------------------------------------------------------------------------------------------------
# Training curves
# --------------------------------------------------------------------------------------------------
def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The JSON objects of a ``metrics.jsonl`` file (or of ``W/metrics.jsonl`` for a workdir
    ``W``), which may be in a bucket."""
    p = paths.path(path) if paths.is_remote(path) else Path(path)
    with paths.remote_errors(path):
        if p.is_dir():
            p = p / METRICS_FILE
        if not p.is_file():
            raise InputError(f"{p}: no such metrics file (a training workdir holds {METRICS_FILE})")
        text = paths.read_text(p, f"JSON lines ({METRICS_FILE})")
    lines = text.split("\n")
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            if n == len(lines) and not text.endswith("\n"):  # a line still being written
                log.warning("%s:%d: incomplete last line skipped", p, n)
                continue
            raise InputError(f"{p}:{n}: not a JSON object ({e.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("step"), (int, float)):
            raise InputError(f"{p}:{n}: expected a JSON object with a numeric 'step'")
        rows.append(obj)
    return rows


def series(rows: Sequence[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of the lines that carry a finite ``key``; a resumed run's repeated steps
    keep the last."""
    by_step: dict[float, float] = {}
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and math.isfinite(v):
            by_step[r["step"]] = float(v)
    steps = np.array(sorted(by_step), np.float64)
    return steps, np.array([by_step[s] for s in steps], np.float64)


def plot_training(rows: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Loss and perplexity against step, training and held-out evaluation curves."""
    fig = figure(10, 4)
    axes = fig.subplots(1, 2)
    for ax, (train_key, eval_key, label) in zip(
        axes,
        (
            ("loss", "eval_loss", "masked-LM loss (nats)"),
            ("perplexity", "eval_perplexity", "perplexity"),
        ),
    ):
        for key, style, name in ((train_key, "-", "train"), (eval_key, "o-", "held-out")):
            x, y = series(rows, key)
            if len(x):
                ax.plot(x, y, style, label=name, markersize=4, linewidth=1.2)
        if label == "perplexity":  # what a context-free model scores on the same held-out tokens
            x, y = series(rows, "eval_unigram_perplexity")
            if len(x):
                ax.axhline(
                    y[-1], color="grey", linestyle="--", linewidth=1, label="unigram baseline"
                )
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    if title:
        fig.suptitle(title)
    return save(fig, path)


def summary_rows(rows: Sequence[dict[str, Any]]) -> list[tuple[str, Any, Any, Any]]:
    """(metric, first value, last value, last step) for the curves present."""
    out = []
    for key in (
        "loss",
        "perplexity",
        "masked_accuracy",
        "eval_loss",
        "eval_perplexity",
        "tokens_per_second",
        "mfu",
    ):
        x, y = series(rows, key)
        if len(x):
            out.append((key, float(y[0]), float(y[-1]), int(x[-1])))
    return out


# --------------------------------------------------------------------------------------------------
# Evaluation figures
# --------------------------------------------------------------------------------------------------
def plot_contact_map(
    pred: np.ndarray, target: np.ndarray, path: str | Path, title: str = "", min_sep: int = 6
) -> Path:
    """Predicted probabilities (left) and the true map with the top-L predictions at separation >=
    ``min_sep`` marked as hits (green) or misses (red) (right); unknown pairs are grey."""
    n = len(pred)
    fig = figure(10, 4.8)
    ax1, ax2 = fig.subplots(1, 2)
    from matplotlib.colors import ListedColormap

    lo, hi = float(np.nanmin(pred)), float(np.nanmax(pred))
    im = ax1.imshow(pred, cmap="Blues", vmin=lo, vmax=hi if hi > lo else lo + 1e-6, origin="upper")
    fig.colorbar(im, ax=ax1, shrink=0.8, label="predicted contact probability")
    ax1.set_title("predicted")
    # -1 unknown (light grey), 0 no contact (white), 1 contact (black)
    ax2.imshow(
        target,
        cmap=ListedColormap(["#d9d9d9", "white", "black"]),
        vmin=-1.5,
        vmax=1.5,
        origin="upper",
        interpolation="nearest",
    )
    i, j = np.triu_indices(n, min_sep)
    keep = target[i, j] >= 0
    i, j = i[keep], j[keep]
    top = np.argsort(-pred[i, j], kind="stable")[: int((np.diagonal(target) >= 0).sum())]
    hit = target[i[top], j[top]] == 1
    ax2.scatter(j[top][hit], i[top][hit], s=6, c="tab:green", label="top-L hit")
    ax2.scatter(j[top][~hit], i[top][~hit], s=6, c="tab:red", label="top-L miss")
    ax2.set_title("true (CB < 8 Å) and top-L predictions")
    ax2.legend(loc="lower left", fontsize=7)
    for ax in (ax1, ax2):
        ax.set_xlabel("residue")
        ax.set_ylabel("residue")
    if title:
        fig.suptitle(title)
    return save(fig, path)


def plot_variant_scatter(
    scores: np.ndarray,
    fitness: np.ndarray,
    path: str | Path,
    title: str = "",
    rho: float | None = None,
) -> Path:
    """Masked-marginal score against measured fitness."""
    fig = figure(5.5, 4.5)
    ax = fig.subplots()
    ax.scatter(scores, fitness, s=5, alpha=0.5, linewidths=0)
    ax.set_xlabel("masked-marginal score (log-odds mutant vs wild type)")
    ax.set_ylabel("measured fitness")
    ax.grid(alpha=0.3)
    label = title + (
        f"  (Spearman {rho:.3f}, n={len(scores)})" if rho is not None and math.isfinite(rho) else ""
    )
    if label:
        ax.set_title(label.strip(), fontsize=9)
    return save(fig, path)


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def plot_workdir(src: str | Path, out: str | Path | None = None) -> Path:
    """``esmjax plot``: the training curves of a workdir (or a ``metrics.jsonl``) as a PNG, with a
    first/last table of every metric on stdout; returns the PNG's path. ``src`` and ``out`` may be
    bucket URLs (the default ``out`` is then in the bucket too). matplotlib and the PNG's place
    are checked before the metrics are read and drawn."""
    from esmjax.inference import preflight

    preflight.plotting("esmjax plot")
    if out:
        preflight.output(out, f"--out {out}", folder=False)
    elif not paths.is_remote(src) and Path(src).exists():
        w = Path(src)
        default = (w if w.is_dir() else w.parent) / "plots" / "training.png"
        preflight.output(default, f"{default} (the default --out)", folder=False)
    rows = read_metrics(src)
    if not rows:
        raise InputError(f"{src}: no metrics yet")
    p = paths.path(src)
    with paths.remote_errors(src):
        workdir = p if p.is_dir() else p.parent
    out = out or workdir / "plots" / "training.png"
    path = plot_training(rows, out, title=workdir.name)
    print(f"{'metric':<18} {'first':>12} {'last':>12} {'at step':>8}")
    for key, first, last, step in summary_rows(rows):
        print(f"{key:<18} {first:>12.4g} {last:>12.4g} {step:>8d}")
    print(f"wrote {path}")
    return path
