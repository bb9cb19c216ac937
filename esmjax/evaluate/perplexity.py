"""Masked-LM perplexity (the ESM-2 paper's validation metric) and pseudo-perplexity.

- Masked-LM perplexity: ``exp(mean NLL over the selected positions)`` of BERT-masked batches with a
  fixed masking seed (15% selected; 80% ``<mask>``, 10% random, 10% kept), as training's held-out
  evaluation computes it. The batches come from ``esmjax.data.pipeline.eval_batches``: packed rows,
  each process reading its share.
- Pseudo-perplexity (Salazar et al. 2020, "Masked language model scoring", ACL): every residue is
  masked in turn and scored given the rest, ``exp(-sum_i log p(x_i | x_without_i) / sum of
  lengths)``; one forward pass per residue, batched. Per-sequence values are reported too.

Both reduce per-row results that every process reads in full, summed in float64 in row order, so the
numbers do not depend on the device count, the sharding or the number of processes.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Sequence

import numpy as np
from tqdm import tqdm

from esmjax.errors import InputError
from esmjax.evaluate.variants import masked_scan
from esmjax.inference.engine import Engine
from esmjax.models.alphabet import VOCAB_SIZE, encode


class NoMaskedTokens(InputError):
    """The evaluation data selected no position to score (e.g. an empty held-out split)."""


def masked_lm(
    engine: Engine,
    batches: Iterable[dict[str, np.ndarray]],
    local: bool = True,
    progress: bool = False,
):
    """Masked-LM loss, perplexity and accuracy over ``batches`` (dicts of [rows, seq_len] arrays).

    Args:
      engine: the model on its mesh.
      batches: ``tokens, targets, loss_mask, segment_ids, positions``; with ``local`` each process
        passes its own rows (``eval_batches(process_index=..., process_count=...)``), otherwise
        every process passes the same global batch.
    Returns:
      dict with ``loss`` (nats per masked token), ``perplexity``, ``masked_accuracy``,
      ``masked_tokens``, ``rows``, ``batches`` and ``unigram_perplexity`` (perplexity of the masked
      targets' own amino-acid frequencies: the score of a model that ignores context).
    """
    nll, count, correct, rows, n_batches = 0.0, 0, 0, 0, 0
    hist = np.zeros(VOCAB_SIZE, np.int64)
    bar = tqdm(desc="perplexity", unit="batch", file=sys.stderr, disable=not progress)
    for batch in batches:
        row_nll, row_count, row_correct = engine.mlm_rows(batch, local=local)
        nll += float(np.sum(row_nll.astype(np.float64)))
        count += int(row_count.sum())
        correct += int(row_correct.sum())
        rows += len(row_nll)
        n_batches += 1
        hist += _global_histogram(batch, local)
        bar.update(1)
    bar.close()
    if count == 0:
        raise NoMaskedTokens("no masked tokens in the evaluation data")
    loss = nll / count
    p = hist[hist > 0] / hist.sum()
    return {
        "loss": loss,
        "perplexity": math.exp(loss),
        "masked_accuracy": correct / count,
        "masked_tokens": count,
        "rows": rows,
        "batches": n_batches,
        "unigram_perplexity": float(np.exp(-(p * np.log(p)).sum())),
    }


def _global_histogram(batch: dict[str, np.ndarray], local: bool) -> np.ndarray:
    """Counts of the masked targets over every process's rows."""
    import jax

    targets = np.asarray(batch["targets"])[np.asarray(batch["loss_mask"]).astype(bool)]
    hist = np.bincount(targets, minlength=VOCAB_SIZE)[:VOCAB_SIZE].astype(np.int64)
    if local and jax.process_count() > 1:
        from jax.experimental import multihost_utils

        hist = (
            np.asarray(multihost_utils.process_allgather(hist[None])).reshape(-1, VOCAB_SIZE).sum(0)
        )
    return hist


def pseudo_perplexity(
    engine: Engine, sequences: Sequence[str], max_tokens: int = 8192, progress: bool = False
) -> dict:
    """Pseudo-perplexity of each sequence and of the set (token-weighted).

    Returns:
      dict with ``pseudo_perplexity`` (the set), ``loss`` (mean NLL per residue), ``residues``,
      ``sequences`` and
      ``per_sequence``: a list of ``{"length", "loss", "pseudo_perplexity"}`` in input order.
    """
    bar = tqdm(
        total=sum(len(encode(seq)) for seq in sequences),
        desc="pseudo-perplexity",
        unit="pos",
        file=sys.stderr,
        disable=not progress,
    )
    scan = masked_scan(engine, sequences, None, max_tokens, bar)
    bar.close()
    return pseudo_figures(sequences, scan.logprobs)


def pseudo_figures(sequences: Sequence[str], logprobs: Sequence[np.ndarray]) -> dict:
    """``pseudo_perplexity``'s figures from each sequence's [L, V] masked log-probabilities
    (``variants.masked_scan``): the wild-type column, summed in float64 in input order."""
    per_seq, total, residues = [], 0.0, 0
    for seq, logp in zip(sequences, logprobs):
        ids = encode(seq)
        nll = -float(np.sum(logp[np.arange(len(ids)), ids].astype(np.float64)))
        per_seq.append(
            {
                "length": len(ids),
                "loss": nll / len(ids),
                "pseudo_perplexity": math.exp(nll / len(ids)),
            }
        )
        total += nll
        residues += len(ids)
    if residues == 0:
        raise ValueError("no residues to score")
    return {
        "pseudo_perplexity": math.exp(total / residues),
        "loss": total / residues,
        "residues": residues,
        "sequences": len(sequences),
        "per_sequence": per_seq,
    }
