"""Packing cropped sequences into fixed-shape rows, and assembling the rows.

A block of draws is packed by best-fit decreasing (Johnson 1973; Coffman, Garey & Johnson 1996,
"Approximation algorithms for bin packing: a survey"): items (``Draws.size`` tokens: the residues
plus BOS and EOS where the window keeps the sequence's ends) are taken longest first and each goes
into the open row with the least room that still fits it, a new row when none does. A row closes
when it holds ``max_segments`` items or has no room for a 1-residue item, so that on UniProt-like
lengths little of a row is padding. The rows of a block are then put in a seeded random order so
that a batch taken from part of a block mixes long and short sequences.

``assemble`` writes the rows: per segment ``BOS seq EOS`` for a whole sequence, and for a crop
(ESM-2, see ``esmjax.data.sampling``) BOS only when the window is the start of ``BOS seq EOS`` and
EOS only when it is its end; PAD after the last segment, ``segment_ids`` 1..k (0 on padding) and
rotary ``positions`` restarting at 0 at the first token of each segment (BOS or not: what fair-esm
computes on that cropped input alone), all [R, L] int32.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from esmjax.data.sampling import TAG_ROWS, Draws, derive_key, permute
from esmjax.models.alphabet import BOS, EOS, PAD

MIN_ITEM = 3  # the smallest item: a whole 1-residue sequence (BOS, residue, EOS); crops fill a row


@dataclass(frozen=True)
class Packed:
    """A packed block: item ``i`` (in row-major order) goes to ``row[i]`` at column ``col[i]``.

    Attributes:
      num_rows: rows in the block.
      row, col: [I] int64 placement of each item, sorted by (row, col).
      item: [I] int64 index of the item in the block's draws.
    """

    num_rows: int
    row: np.ndarray
    col: np.ndarray
    item: np.ndarray


def best_fit_decreasing(
    sizes: np.ndarray, capacity: int, max_segments: int
) -> tuple[np.ndarray, int]:
    """Assigns each item (``sizes`` [I], each <= capacity) to a bin; returns ([I] bin index, number
    of bins).

    Bins are numbered in the order they are opened; items keep their input order within a bin.
    """
    sizes = np.asarray(sizes, np.int64)
    if len(sizes) and (sizes.max() > capacity or sizes.min() < 1):
        raise ValueError(f"item sizes must lie in [1, {capacity}]")
    order = np.argsort(-sizes, kind="stable")
    bin_of = np.empty(len(sizes), np.int64)
    room_bins: dict[int, list[int]] = {}  # room -> open bins with exactly that room
    rooms: list[int] = []  # sorted distinct rooms of open bins
    fill: list[int] = []  # items per bin
    num_bins = 0
    for i, size in zip(order.tolist(), sizes[order].tolist()):
        k = bisect.bisect_left(rooms, size)
        if k == len(rooms):
            b, room = num_bins, capacity
            num_bins += 1
            fill.append(0)
        else:
            room = rooms[k]
            bins = room_bins[room]
            b = bins.pop()
            if not bins:
                del room_bins[room]
                rooms.pop(k)
        bin_of[i] = b
        fill[b] += 1
        left = room - size
        if left >= MIN_ITEM and fill[b] < max_segments:
            if left in room_bins:
                room_bins[left].append(b)
            else:
                room_bins[left] = [b]
                bisect.insort(rooms, left)
    return bin_of, num_bins


def pack_block(draws: Draws, capacity: int, max_segments: int, seed: int, block: int) -> Packed:
    """Packs one block of draws into rows of ``capacity`` tokens, rows in a seeded order."""
    sizes = np.asarray(draws.size, np.int64)
    bin_of, num_rows = best_fit_decreasing(sizes, capacity, max_segments)
    row_of = permute(bin_of, num_rows, derive_key(seed, TAG_ROWS, block))
    item = np.lexsort((np.arange(len(sizes)), row_of))
    row = row_of[item]
    # Column of each item: running sum of the sizes before it in its row.
    s = sizes[item]
    ends = np.cumsum(s)
    first = np.r_[True, row[1:] != row[:-1]] if len(row) else np.zeros(0, bool)
    row_start = np.maximum.accumulate(np.where(first, ends - s, 0)) if len(row) else ends
    col = ends - s - row_start
    return Packed(num_rows=num_rows, row=row, col=col, item=item)


def assemble(
    num_rows: int,
    seq_len: int,
    row: np.ndarray,
    col: np.ndarray,
    pieces: Sequence[np.ndarray],
    bos: np.ndarray,
    eos: np.ndarray,
) -> dict[str, np.ndarray]:
    """Writes packed rows.

    Args:
      num_rows: R rows to produce.
      seq_len: L tokens per row.
      row, col: [I] placement of each segment (sorted by row, then col).
      pieces: I residue-id arrays (already cropped), one per segment.
      bos, eos: [I] bool, whether each segment starts with BOS / ends with EOS (False for a window
        that does not reach that end of its sequence).

    Returns:
      ``tokens``, ``segment_ids``, ``positions``, all [R, L] int32.
    """
    tokens = np.full((num_rows, seq_len), PAD, np.int32)
    segment_ids = np.zeros((num_rows, seq_len), np.int32)
    positions = np.zeros((num_rows, seq_len), np.int32)
    if not len(row):
        return {"tokens": tokens, "segment_ids": segment_ids, "positions": positions}
    n = np.fromiter((len(p) for p in pieces), np.int64, len(pieces))
    bos = np.asarray(bos, bool)
    eos = np.asarray(eos, bool)
    size = n + bos + eos
    flat = tokens.reshape(-1)
    base = np.asarray(row, np.int64) * seq_len + np.asarray(col, np.int64)
    body = np.concatenate([np.asarray(p, np.int32) for p in pieces])
    # Flat indices of every residue: base + bos + (0 .. n - 1) per segment.
    offs = np.arange(len(body), dtype=np.int64) - np.repeat(np.cumsum(n) - n, n)
    flat[np.repeat(base + bos, n) + offs] = body
    flat[base[bos]] = BOS
    flat[(base + bos + n)[eos]] = EOS
    # Segment numbers 1..k within each row and positions 0..size-1 within each segment.
    first = np.r_[True, row[1:] != row[:-1]]
    idx = np.arange(len(row))
    seg_no = idx - np.maximum.accumulate(np.where(first, idx, 0)) + 1
    cover = np.repeat(base, size) + (
        np.arange(size.sum()) - np.repeat(np.cumsum(size) - size, size)
    )
    segment_ids.reshape(-1)[cover] = np.repeat(seg_no, size)
    positions.reshape(-1)[cover] = np.arange(size.sum()) - np.repeat(np.cumsum(size) - size, size)
    return {"tokens": tokens, "segment_ids": segment_ids, "positions": positions}
