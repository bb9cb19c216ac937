"""Packed inference batches: several records per row where length buckets alone would pad.

With buckets alone each record gets a row of its bucket's width, and pads up to a third of it.
Here the records go longest first into the first row with room for them (first-fit decreasing),
and a record that fits nowhere opens a new row at its own bucket's width. So rows keep the
bucket widths (the same programs compile as for unpacked batches), attention never spans more than
one bucket's width, and the short records fill the padding of the long ones' rows.

Each record is its own segment of its row: ``BOS seq EOS``, rotary positions from 0, attention
within the segment only (``ESM2(tokens, segment_ids, positions)``, as packed training rows). Its
outputs are therefore the unpacked ones, up to float rounding (the softmax and the reductions run
over rows of other lengths). The contact head reads whole-row attention maps, so a job that asks
for contacts is not packed (``esmjax.inference.embed``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from esmjax.inference.engine import bucket_for, bucketed, length_buckets
from esmjax.io.fasta import Record
from esmjax.models.alphabet import PAD, encode_with_specials


@dataclass(frozen=True)
class Placed:
    """Where a record sits: its row of the batch, the column of its BOS, its residues kept."""

    record: Record
    row: int
    start: int
    n: int


@dataclass(frozen=True)
class PackedBatch:
    placed: list[Placed]
    tokens: np.ndarray  # [R, W]; rows past the packed ones are all padding
    segment_ids: np.ndarray | None  # [R, W] 1.. per record of a row, 0 padding; None: unpacked
    positions: np.ndarray | None  # [R, W] 0.. per record


def pack_rows(lengths: Sequence[int]) -> list[tuple[int, list[int]]]:
    """``(width, item indices in row order)`` of each row: items of ``lengths`` tokens, first-fit
    decreasing, each new row as wide as its first item's length bucket."""
    if not lengths:
        return []
    buckets = length_buckets(max(lengths))
    rows: list[tuple[int, list[int]]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[i]
        r = next((r for r, free in enumerate(room) if free >= n), None)
        if r is None:
            width = bucket_for(n, buckets)
            rows.append((width, []))
            room.append(width)
            r = len(rows) - 1
        rows[r][1].append(i)
        room[r] -= n
    return rows


def packed_batches(
    records: Sequence[Record], max_tokens: int, truncation: int | None, row_multiple: int = 1
) -> Iterator[PackedBatch]:
    """The records packed into rows (``pack_rows``), and the rows of one width batched as
    ``engine.bucketed`` batches records: a few fixed shapes per width."""
    encoded = [encode_with_specials(r.sequence, truncation) for r in records]
    rows = pack_rows([len(e) for e in encoded])
    widths = [w for w, _ in rows]
    for width, num_rows, chunk in bucketed(widths, max_tokens, row_multiple, fit_rows=True):
        tokens = np.full((num_rows, width), PAD, np.int32)
        segment_ids = np.zeros((num_rows, width), np.int32)
        positions = np.zeros((num_rows, width), np.int32)
        placed = []
        for row, r in enumerate(chunk):
            start = 0
            for segment, i in enumerate(rows[r][1], start=1):
                e = encoded[i]
                tokens[row, start : start + len(e)] = e
                segment_ids[row, start : start + len(e)] = segment
                positions[row, start : start + len(e)] = np.arange(len(e))
                placed.append(Placed(records[i], row, start, len(e) - 2))
                start += len(e)
        yield PackedBatch(placed, tokens, segment_ids, positions)
