"""Fine-tuning examples as arrays: label vocabularies, target encoding and length-bucketed
batches.

Batches are padded rows (one sequence per row, ``BOS seq EOS PAD...``) of a length bucket's width
(``esmjax.inference.engine.length_buckets``: 16, 24, 32, 48, ...), so the train step compiles once
per bucket. Packing several sequences per row (as pretraining does) saves padding but needs
per-segment pooling in every head; sorting each epoch's sequences by length within windows of 16
batches keeps 77% of the tokens residues on SCOPe (44% for random batches;
``tools/finetune_padding.py``), so packing could save at most a quarter of the tokens: buckets
were chosen, packing left for later.

The order of training examples is a function of the step alone (epoch ``e`` is a permutation drawn
from ``seed`` and ``e``), so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from esmjax.config import FinetuneConfig
from esmjax.inference.engine import bucket_for, length_buckets
from esmjax.io.labeled import Example, LabeledDataError
from esmjax.models.alphabet import PAD, encode_with_specials

IGNORE = -1  # residue label of an unscored position


class Targets:
    """How a task's targets become arrays: class names (``labels``) and the output width."""

    def __init__(self, cfg: FinetuneConfig, train: list[Example]):
        self.task, self.multi = cfg.task, cfg.multi_label
        if self.task == "sequence_regression":
            widths = {len(ex.target) for ex in train}
            if len(widths) != 1:
                raise LabeledDataError(f"data: rows hold different numbers of targets {widths}")
            self.labels: tuple[str, ...] = ()
            self.num_outputs = widths.pop()
            return
        if cfg.labels:
            self.labels = tuple(str(x) for x in cfg.labels)
        elif self.task == "residue_classification":
            seen: set[str] = set()
            for ex in train:
                scored = ex.target if ex.mask is None else np.array(list(ex.target))[ex.mask]
                seen.update(scored)
            self.labels = tuple(sorted(seen))
        else:
            self.labels = tuple(sorted({t for ex in train for t in ex.target}))
        if len(self.labels) < 2 and not self.multi:
            raise LabeledDataError(f"data: the training rows hold one class only {self.labels}")
        self.num_outputs = len(self.labels)
        self.index = {name: i for i, name in enumerate(self.labels)}

    def encode(self, ex: Example) -> np.ndarray:
        """The target array of one example (residue tasks: [L] ids, IGNORE where unscored)."""
        if self.task == "sequence_regression":
            if len(ex.target) != self.num_outputs:
                raise LabeledDataError(
                    f"{ex.where}: {len(ex.target)} targets, not {self.num_outputs}"
                )
            return np.asarray(ex.target, np.float32)
        if self.task == "residue_classification":
            ids = np.array([self.index.get(c, IGNORE) for c in ex.target], np.int32)
            scored = np.ones(len(ids), bool) if ex.mask is None else ex.mask
            bad = sorted({c for c, i, m in zip(ex.target, ids, scored) if m and i == IGNORE})
            if bad:
                raise LabeledDataError(f"{ex.where}: unknown label(s) {bad}; known {self.labels}")
            ids[~scored] = IGNORE
            return ids
        unknown = [t for t in ex.target if t not in self.index]
        if unknown:
            raise LabeledDataError(f"{ex.where}: unknown label(s) {unknown}; known {self.labels}")
        if self.multi:
            out = np.zeros(self.num_outputs, np.float32)
            out[[self.index[t] for t in ex.target]] = 1.0
            return out
        if len(ex.target) != 1:
            raise LabeledDataError(f"{ex.where}: several labels; set multi_label: true")
        return np.int32(self.index[ex.target[0]])


class Encoded:
    """Tokens and targets of one split; rows that cannot be encoded are raised or skipped."""

    def __init__(self, examples: list[Example], targets: Targets, skip: bool, skipped: Counter):
        self.ids: list[str] = []
        self.tokens: list[np.ndarray] = []
        self.targets: list[np.ndarray] = []
        for ex in examples:
            try:
                y = targets.encode(ex)
            except LabeledDataError:
                if not skip:
                    raise
                skipped["unknown label"] += 1
                continue
            self.ids.append(ex.id)
            self.tokens.append(encode_with_specials(ex.sequence))
            self.targets.append(y)
        self.task = targets.task
        self.lengths = [len(t) for t in self.tokens]

    def __len__(self) -> int:
        return len(self.tokens)

    def batch(self, idx: list[int], width: int, rows: int) -> dict[str, np.ndarray]:
        """Rows ``idx`` padded to ``[rows, width]``; extra rows are padding with weight 0."""
        tokens = np.full((rows, width), PAD, np.int32)
        for r, i in enumerate(idx):
            tokens[r, : self.lengths[i]] = self.tokens[i]
        out: dict[str, np.ndarray] = {"tokens": tokens}
        if self.task == "residue_classification":
            labels = np.full((rows, width), IGNORE, np.int32)
            for r, i in enumerate(idx):
                y = self.targets[i]
                labels[r, 1 : 1 + len(y)] = y  # position 0 is BOS
            out["labels"] = labels
            out["weights"] = (labels != IGNORE).astype(np.float32)
            return out
        first = np.asarray(self.targets[idx[0]]) if idx else np.zeros((), np.int32)
        labels = np.zeros((rows, *first.shape), first.dtype)
        for r, i in enumerate(idx):
            labels[r] = self.targets[i]
        weights = np.zeros(rows, np.float32)
        weights[: len(idx)] = 1.0
        out.update(labels=labels, weights=weights)
        return out

    def stacked_targets(self) -> np.ndarray:
        if self.task == "residue_classification":
            return np.concatenate(self.targets) if self.targets else np.zeros(0, np.int32)
        return np.stack(self.targets)


def epoch_order(lengths: list[int], batch: int, seed: int, epoch: int) -> np.ndarray:
    """A permutation of the examples, sorted by length within windows of 16 batches."""
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(len(lengths))
    window = 16 * batch
    for start in range(0, len(perm), window):
        chunk = perm[start : start + window]
        perm[start : start + window] = chunk[np.argsort([lengths[i] for i in chunk], kind="stable")]
    return perm


def train_batch(data: Encoded, step: int, batch: int, seed: int) -> dict[str, Any]:
    """The global batch of optimizer step ``step`` (0-based): ``batch`` examples in epoch order,
    padded to the bucket of the longest."""
    n = len(data)
    orders: dict[int, np.ndarray] = {}
    idx = []
    for i in range(step * batch, (step + 1) * batch):
        epoch, pos = divmod(i, n)
        if epoch not in orders:
            orders[epoch] = epoch_order(data.lengths, batch, seed, epoch)
        idx.append(int(orders[epoch][pos]))
    longest = max(data.lengths[i] for i in idx)
    width = bucket_for(longest, length_buckets(longest))
    return data.batch(idx, width, batch)
