"""Which rows of a global batch each process loads, and how they become one global array.

A batch's rows are split over the mesh axes of the ``act_batch`` rule (``data``, ``fsdp``); the
other axes (``tensor``) hold every row of their shard. When a tensor group spans processes (a
15B ``fsdp_tp`` mesh on a TPU pod with 4 chips per host), several processes hold the same rows:
they must load the same rows, or ``make_array_from_process_local_data`` refuses the batch. So the
processes are grouped by the rows their devices hold (:func:`row_share`): each group is one
*loader*, and the data pipeline runs with ``process_index=share.index``, ``process_count=
share.count`` instead of the process numbers. Each process then places the rows it loaded on its
own devices (:func:`assemble`), whatever the mesh's device order.

A layout whose groups are not equal, disjoint, contiguous row blocks (possible only with a
hand-made device order) falls back to one loader: every process loads every row and keeps its own.
That is correct, and costs host work, so it is logged.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RowShare:
    """This process loads rows ``[index * w, (index + 1) * w)`` of every batch of ``count * w``
    rows, shared with the other processes of its loader group."""

    index: int
    count: int


def _row_blocks(sharding: NamedSharding, dim: int, rows: int) -> dict[int, set[tuple[int, int]]]:
    shape = [1] * len(sharding.spec) if len(sharding.spec) > dim else [1] * (dim + 1)
    shape[dim] = rows
    blocks: dict[int, set[tuple[int, int]]] = {}
    for device, index in sharding.devices_indices_map(tuple(shape)).items():
        s = index[dim]
        blocks.setdefault(device.process_index, set()).add(
            (s.start or 0, rows if s.stop is None else s.stop)
        )
    return blocks


def row_share(sharding: NamedSharding, dim: int = 0) -> RowShare:
    """The loader group of this process for arrays split by ``sharding`` along ``dim``."""
    parts = int(np.prod([sharding.mesh.shape[a] for a in _axes(sharding.spec, dim)] or [1]))
    blocks = _row_blocks(sharding, dim, parts)
    spans = {}
    for p, held in blocks.items():
        lo, hi = min(a for a, _ in held), max(b for _, b in held)
        covered = sum(b - a for a, b in held)
        spans[p] = (lo, hi) if covered == hi - lo else None
    widths = {None if s is None else s[1] - s[0] for s in spans.values()}
    distinct = {s for s in spans.values() if s is not None}
    regular = (
        None not in widths
        and len(widths) == 1
        and all(lo % (hi - lo) == 0 for lo, hi in distinct)
        and len(distinct) * next(iter(widths)) == parts
    )
    if not regular:
        if jax.process_count() > 1:
            log.warning(
                "the processes' batch rows are not equal contiguous blocks; every process loads "
                "every row of a batch"
            )
        return RowShare(0, 1)
    lo, hi = spans[jax.process_index()]
    return RowShare(lo // (hi - lo), parts // (hi - lo))


def _axes(spec, dim: int) -> tuple[str, ...]:
    if dim >= len(spec) or spec[dim] is None:
        return ()
    entry = spec[dim]
    return (entry,) if isinstance(entry, str) else tuple(entry)


def assemble(
    local: np.ndarray, sharding: NamedSharding, share: RowShare, dim: int = 0
) -> jax.Array:
    """The global array whose rows (axis ``dim``) ``[share.index * w, ...)`` are ``local``
    (``w = local.shape[dim]``), every process of the group passing the same ``local``: each
    addressable device gets its own slice of it."""
    w = local.shape[dim]
    shape = list(local.shape)
    shape[dim] = w * share.count
    offset = share.index * w

    def piece(index: Sequence[slice]) -> np.ndarray:
        s = index[dim]
        lo = (s.start or 0) - offset
        hi = (shape[dim] if s.stop is None else s.stop) - offset
        if lo < 0 or hi > w:
            raise ValueError(f"rows {lo + offset}:{hi + offset} are not among this loader's")
        index = list(index)
        index[dim] = slice(lo, hi)
        return local[tuple(index)]

    return jax.make_array_from_callback(tuple(shape), sharding, piece)
