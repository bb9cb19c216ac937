"""The global stream of packed rows, and the jobs that turn a process's part of a batch into
arrays.

The stream is a sequence of packed rows that does not depend on the number of processes or on the
batch size. Block ``b`` is draws ``b*B .. (b+1)*B - 1`` of the cluster sampler (``B =
BLOCK_DRAWS``), packed by best-fit decreasing into however many rows it needs, in a seeded row
order; the blocks' rows follow each other. Every row, and its MLM masking (``mask_tokens`` with a
generator seeded by ``(seed, block, row)``), is a pure function of the seed and its (block, row)
coordinates.

``RowStream.plan`` walks the stream and keeps a process's rows of each global batch,
``RowStream.job`` lists what those rows read (a ``Job``: everything but the split, so that a data
worker process can run it), and ``materialise`` reads, crops, packs and masks them.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from esmjax.config import DataConfig
from esmjax.data.masking import mask_tokens
from esmjax.data.packing import Packed, assemble, pack_block
from esmjax.data.sampling import ClusterSampler, Draws
from esmjax.data.source import Split

BLOCK_DRAWS = 4096


@dataclass(frozen=True)
class Job:
    """The rows one process materialises for one batch (everything but the split itself)."""

    num_rows: int
    seq_len: int
    record: np.ndarray  # [I] record index of each segment
    start: np.ndarray  # [I] first residue kept
    kept: np.ndarray  # [I] residues kept
    bos: np.ndarray  # [I] bool, BOS written before the residues
    eos: np.ndarray  # [I] bool, EOS written after them
    row: np.ndarray  # [I] destination row
    col: np.ndarray  # [I] destination column
    row_keys: np.ndarray  # [R, 2] (block, row in block) of each row, -1 for padding rows
    mask_key: int
    mask_prob: float
    mask_token_prob: float
    random_token_prob: float


def materialise(split: Split, job: Job) -> dict[str, np.ndarray]:
    """Reads, crops, packs and masks one batch part: a dict of [R, L] arrays (``tokens``,
    ``targets``, ``loss_mask``, ``segment_ids``, ``positions``)."""
    raw = split.read(job.record)
    pieces = [r[s : s + k] for r, s, k in zip(raw, job.start.tolist(), job.kept.tolist())]
    packed = assemble(job.num_rows, job.seq_len, job.row, job.col, pieces, job.bos, job.eos)
    tokens = np.empty_like(packed["tokens"])
    loss_mask = np.zeros(tokens.shape, bool)
    for j, (block, r) in enumerate(job.row_keys.tolist()):
        rng = np.random.default_rng([job.mask_key, block + 1, r + 1])
        m = mask_tokens(
            packed["tokens"][j : j + 1],
            rng,
            job.mask_prob,
            job.mask_token_prob,
            job.random_token_prob,
        )
        tokens[j], loss_mask[j] = m["tokens"][0], m["loss_mask"][0]
    return {
        "tokens": tokens,
        "targets": packed["tokens"],
        "loss_mask": loss_mask,
        "segment_ids": packed["segment_ids"],
        "positions": packed["positions"],
    }


def _cat(arrays: list[np.ndarray], dtype: type = np.int64) -> np.ndarray:
    return np.concatenate(arrays) if arrays else np.zeros(0, dtype)


class RowStream:
    """The packed rows of a split, block after block (finite when ``num_draws`` is given)."""

    def __init__(
        self,
        split: Split,
        sampler: ClusterSampler,
        seq_len: int,
        max_segments: int,
        seed: int,
        num_draws: int | None = None,
    ):
        self.split, self.sampler = split, sampler
        self.seq_len, self.max_segments, self.seed = seq_len, max_segments, seed
        self.num_draws = num_draws
        self._cache: OrderedDict[int, tuple[Draws, Packed]] = OrderedDict()

    def block(self, b: int) -> tuple[Draws, Packed] | None:
        """Block ``b``'s draws and packing, None past the end of a finite stream."""
        if b in self._cache:
            return self._cache[b]
        first = b * BLOCK_DRAWS
        count = BLOCK_DRAWS if self.num_draws is None else min(BLOCK_DRAWS, self.num_draws - first)
        if count <= 0:
            return None
        draws = self.sampler.draws(first, count)
        packed = pack_block(draws, self.seq_len, self.max_segments, self.seed, b)
        self._cache[b] = (draws, packed)
        if len(self._cache) > 4:
            self._cache.popitem(last=False)
        return draws, packed

    def plan(
        self, block: int, offset: int, rows: int, lo: int, hi: int
    ) -> tuple[list[tuple], int, int, int]:
        """Walks ``rows`` global rows from (block, offset) and keeps global rows ``lo .. hi - 1`` of
        them.

        Returns ([(block, first row in block, count, destination row)], new block, new offset, rows
        found).
        """
        pieces, taken = [], 0
        while taken < rows:
            got = self.block(block)
            if got is None:
                break
            n = min(got[1].num_rows - offset, rows - taken)
            a, z = max(taken, lo), min(taken + n, hi)  # overlap of [taken, taken + n) with [lo, hi)
            if a < z:
                pieces.append((block, offset + a - taken, z - a, a - lo))
            taken += n
            offset += n
            if offset == got[1].num_rows:
                block, offset = block + 1, 0
        return pieces, block, offset, taken

    def job(self, pieces: list[tuple], num_rows: int, mask_key: int, cfg: DataConfig) -> Job:
        """The ``Job`` of one process's rows of a batch, from the ``pieces`` of ``plan``."""
        rec, start, kept, bos, eos, row, col = [], [], [], [], [], [], []
        row_keys = np.full((num_rows, 2), -1, np.int64)
        for block, first, count, dest in pieces:
            draws, packed = self.block(block)
            a, z = np.searchsorted(packed.row, [first, first + count])
            items = packed.item[a:z]
            rec.append(draws.record[items])
            start.append(draws.start[items])
            kept.append(draws.kept[items])
            bos.append(draws.bos[items])
            eos.append(draws.eos[items])
            row.append(packed.row[a:z] - first + dest)
            col.append(packed.col[a:z])
            row_keys[dest : dest + count, 0] = block
            row_keys[dest : dest + count, 1] = np.arange(first, first + count)
        return Job(
            num_rows=num_rows,
            seq_len=cfg.seq_len,
            record=_cat(rec),
            start=_cat(start),
            kept=_cat(kept),
            bos=_cat(bos, bool),
            eos=_cat(eos, bool),
            row=_cat(row),
            col=_cat(col),
            row_keys=row_keys,
            mask_key=mask_key,
            mask_prob=cfg.mask_prob,
            mask_token_prob=cfg.mask_token_prob,
            random_token_prob=cfg.random_token_prob,
        )
