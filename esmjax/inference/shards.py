"""Sharded outputs: one Parquet file per work unit (``units/<unit>.parquet``), and the check of a
job folder (``esmjax inspect-outputs``).

Why Parquet. The readers of proteome-scale outputs are pandas, polars, DuckDB, Spark, HF
``datasets`` and Arrow itself, and all of them read Parquet with nothing of ours installed. It is
columnar, so reading the mean embeddings or the pLDDT column of a million records skips the
per-residue arrays and the PDB text beside them; it holds strings (ids, PDB/mmCIF text) and
variable-length arrays natively; and a file carries its schema. safetensors holds flat tensors and
string metadata only (variable-length records need offset tables, text does not fit), and
ArrayRecord holds opaque byte records that only ``array_record``/grain read. BENCHMARKS.md
("Shard formats", ``tools/bench_shard_formats.py``) gives the sizes and read times of the three.

Layout of a shard: one row per record, in job order. ``id``, ``description`` (the header after
``>``), ``index`` (the record's position in the job's input) and ``length`` (residues run through
the model) come first; then the command's columns. A NumPy array of one record is a list column:
``[D]`` a list of float32, ``[L, D]`` a list of fixed-size lists (``[L, L]`` contacts: lists of
lists). One line reads a record back, with pyarrow (or ``pandas.read_parquet``)::

    t = pyarrow.parquet.read_table("out/units/000000.parquet")
    rep = numpy.array(t["repr_33"][i].as_py(), numpy.float32)   # [L, 1280]

``read_record(path, id)`` reads one record (its row group only: ``ROW_GROUP`` records), and
``read_records`` every row of a shard. The schema's metadata (key ``esmjax``) holds the
command and the shapes of the array columns.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from esmjax.io import paths

SUFFIX = ".parquet"
ROW_GROUP = 64  # records per Parquet row group


def _array_column(values: Sequence[np.ndarray]) -> pa.Array:
    """One record's array per row -> an Arrow list column (float32 values as given)."""
    arrays = [np.asarray(v) for v in values]
    ndim = arrays[0].ndim
    if any(a.ndim != ndim for a in arrays) or ndim not in (1, 2):
        raise ValueError(f"array columns hold 1-D or 2-D arrays of one rank, got {ndim}")
    flat = np.concatenate([a.reshape(-1) for a in arrays]) if arrays else np.zeros(0)
    values_arr = pa.array(flat)
    if ndim == 1:
        offsets = np.cumsum([0] + [len(a) for a in arrays], dtype=np.int32)
        return pa.ListArray.from_arrays(pa.array(offsets), values_arr)
    widths = {a.shape[1] for a in arrays}
    rows = np.cumsum([0] + [a.shape[0] for a in arrays], dtype=np.int32)
    if len(widths) == 1:
        inner = pa.FixedSizeListArray.from_arrays(values_arr, widths.pop())
    else:
        inner_offsets = np.cumsum([0] + [w for a in arrays for w in [a.shape[1]] * a.shape[0]])
        inner = pa.ListArray.from_arrays(pa.array(inner_offsets.astype(np.int32)), values_arr)
    return pa.ListArray.from_arrays(pa.array(rows), inner)


def shard_bytes(rows: Sequence[dict[str, Any]], meta: dict[str, Any]) -> bytes:
    """The Parquet file of ``rows`` (one dict per record, the same keys in each: str, int, float or
    NumPy arrays); ``meta`` goes into the schema's metadata with the array columns' shapes."""
    names = list(rows[0]) if rows else []
    columns, shapes = {}, {}
    for name in names:
        values = [r[name] for r in rows]
        if isinstance(values[0], np.ndarray):
            columns[name] = _array_column(values)
            shapes[name] = list(values[0].shape[1:]) if values[0].ndim == 2 else []
        else:
            columns[name] = pa.array(values)
    table = pa.table(columns)
    info = {**meta, "array_columns": shapes}
    table = table.replace_schema_metadata({"esmjax": json.dumps(info)})
    buf = io.BytesIO()
    # float columns gain nothing from dictionaries; zstd takes the list offsets and level runs
    # row groups of ROW_GROUP records: ``read_record`` reads one record's group alone
    pq.write_table(table, buf, compression="zstd", use_dictionary=False, row_group_size=ROW_GROUP)
    return buf.getvalue()


def open_table(path: Any, columns: Sequence[str] | None = None, filters: Any = None) -> pa.Table:
    """A shard (local or a bucket URL) as an Arrow table: only the ``columns`` asked for, and with
    ``filters`` only the row groups whose statistics may match, are read (range reads)."""
    cols = list(columns) if columns else None
    with paths.remote_errors(path), paths.given(path).open("rb") as f:
        return pq.read_table(f, columns=cols, filters=filters)


def read_record(path: Any, record_id: str) -> dict[str, Any]:
    """The record ``record_id`` of a shard: its ids are read, then its row group alone (found by
    the ``index`` column's statistics)."""
    table = open_table(path, ["id", "index"])
    ids = table.column("id").to_pylist()
    if record_id not in ids:
        raise KeyError(f"{path}: no record {record_id!r}")
    index = table.column("index")[ids.index(record_id)].as_py()
    row = open_table(path, filters=[("index", "=", index)])
    return {name: to_numpy(row.column(name))[0] for name in row.column_names}


def to_numpy(column: pa.ChunkedArray | pa.Array) -> list[Any]:
    """A column as one value per row: list columns as float32/int NumPy arrays."""
    col = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if not pa.types.is_list(col.type):
        return col.to_pylist()
    offsets = col.offsets.to_numpy()
    inner = col.values
    if pa.types.is_fixed_size_list(inner.type):
        width = inner.type.list_size
        flat = inner.values.to_numpy(zero_copy_only=False).reshape(-1, width)
        return [flat[offsets[i] : offsets[i + 1]] for i in range(len(col))]
    if pa.types.is_list(inner.type):
        return [np.array(col[i].as_py(), np.float32) for i in range(len(col))]
    flat = inner.to_numpy(zero_copy_only=False)
    return [flat[offsets[i] : offsets[i + 1]] for i in range(len(col))]


def read_records(path: Any, columns: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Every record of a shard as a dict (arrays as NumPy)."""
    table = open_table(path, columns)
    cols = {name: to_numpy(table.column(name)) for name in table.column_names}
    return [{k: v[i] for k, v in cols.items()} for i in range(table.num_rows)]


def num_rows(path: Any) -> int:
    """The record count of a shard from its footer (a damaged file raises)."""
    with paths.remote_errors(path), paths.given(path).open("rb") as f:
        return pq.ParquetFile(f).metadata.num_rows  # the footer only
