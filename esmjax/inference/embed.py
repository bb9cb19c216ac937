"""``esmjax embed``: representations, logits and contacts for every record of a FASTA file (fair-esm
``esm-extract``'s counterpart).

Records are packed several to a row, rows as wide as a small fixed set of length buckets
(``esmjax.inference.packed``; one record per row when contacts are asked for), and rows are
grouped into batches of a fixed row count per bucket, so the jitted forward compiles a few times
per bucket. Each
record's arrays are written to ``<id>.npz`` with BOS and EOS removed; ``--out`` may be a bucket URL
(``gs://``, ``s3://``): each file is written through ``esmjax.io.paths.write_bytes``, as one object
upload (it appears whole or not at all), a local file as a temporary sibling renamed into place.
A write the disk refuses (full, quota, read-only) ends the run with one line naming the file
(``esmjax.errors.WriteFailed``); the records written before it are complete, and a rerun writes
them all again.

``--format fair-esm`` writes what fair-esm's ``esm-extract`` writes instead, for pipelines that read
its files: one ``<label>.pt`` per record (``label`` the whole header line after ``>``; a ``/`` in it
makes a subfolder, as there) holding a dict with ``label`` and, as ``--include`` asks,
``representations`` / ``mean_representations`` / ``bos_representations`` (each ``{layer: float32
tensor}``) and ``contacts`` (``[L, L]``), written with ``torch.save`` (the ``torch`` extra).
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from esmjax.errors import InputError
from esmjax.inference import preflight, shards, units
from esmjax.inference.engine import Engine, bucketed
from esmjax.inference.inputs import InputStream
from esmjax.inference.options import EmbedOptions
from esmjax.inference.packed import PackedBatch, Placed, packed_batches
from esmjax.io import checkpoint, paths
from esmjax.io.fasta import Record, sanitize_id
from esmjax.models.alphabet import PAD, batch_encode

log = logging.getLogger("esmjax.inference.embed")


@dataclass(frozen=True)
class Batch:
    records: list[Record]
    tokens: np.ndarray  # [R, T]; rows past len(records) are all padding


def make_batches(
    records: Sequence[Record], max_tokens: int, truncation: int | None, row_multiple: int = 1
) -> Iterator[Batch]:
    """Groups length-sorted records into batches of a few fixed shapes per length bucket (a
    bucket's last batch with the power of two of rows that holds it: ``engine.bucketed``)."""
    lengths = [min(len(r.sequence), truncation or len(r.sequence)) + 2 for r in records]
    for width, rows, idx in bucketed(lengths, max_tokens, row_multiple, fit_rows=True):
        chunk = [records[i] for i in idx]
        tokens = batch_encode([r.sequence for r in chunk], truncation, pad_to=width)
        full = np.full((rows, width), PAD, np.int32)
        full[: len(chunk)] = tokens
        yield Batch(chunk, full)


def parse_layers(spec: str, num_layers: int) -> tuple[int, ...]:
    """``all`` or comma/space separated indices (negatives count from the end) -> sorted
    non-negative indices."""
    if spec.strip() == "all":
        return tuple(range(num_layers + 1))
    out = set()
    for tok in spec.replace(",", " ").split():
        try:
            i = int(tok)
        except ValueError:
            raise InputError(f"--layers: {tok!r} is not an integer") from None
        if not -(num_layers + 1) <= i <= num_layers:
            raise InputError(
                f"--layers: {i} out of range for a model with {num_layers} layers (0..{num_layers})"
            )
        out.add(i % (num_layers + 1))
    return tuple(sorted(out))


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def torch_module():
    """PyTorch, which ``--format fair-esm`` writes its ``.pt`` files with."""
    try:
        import torch
    except ImportError:
        raise InputError(
            "--format fair-esm writes .pt files with PyTorch: pip install 'esmjax[torch]'"
        ) from None
    return torch


def pt_bytes(result: dict) -> bytes:
    """``result`` (NumPy arrays, also inside dicts) saved with ``torch.save`` as torch tensors."""
    torch = torch_module()

    def tensor(x):
        if isinstance(x, dict):
            return {k: tensor(v) for k, v in x.items()}
        return torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x

    buf = io.BytesIO()
    torch.save(tensor(result), buf)
    return buf.getvalue()


def npz_arrays(
    out: dict, at: Placed, layers: tuple[int, ...], include: set[str]
) -> dict[str, np.ndarray]:
    """One record's arrays for ``<id>.npz``: residue positions only, BOS and EOS removed."""
    row, bos, n = at.row, at.start, at.n
    arrays: dict[str, np.ndarray] = {}
    for layer in layers:
        h = out["representations"][layer][row]
        if "per_tok" in include:
            arrays[f"repr_{layer}"] = h[bos + 1 : bos + n + 1]
        if "mean" in include:
            arrays[f"mean_{layer}"] = h[bos + 1 : bos + n + 1].mean(0)
        if "bos" in include:
            arrays[f"bos_{layer}"] = h[bos]
    if "logits" in include:
        arrays["logits"] = out["logits"][row, bos + 1 : bos + n + 1]
    if "contacts" in include:  # unpacked rows only
        arrays["contacts"] = out["contacts"][row, :n, :n]
    return arrays


def fair_esm_result(
    out: dict, at: Placed, layers: tuple[int, ...], include: set[str], label: str
) -> dict:
    """One record's dict as esm-extract writes it: float32 arrays, layers as int keys."""
    row, bos, n = at.row, at.start, at.n
    reps = {layer: out["representations"][layer][row].astype(np.float32) for layer in layers}
    result: dict = {"label": label}
    if "per_tok" in include:
        result["representations"] = {k: h[bos + 1 : bos + n + 1] for k, h in reps.items()}
    if "mean" in include:
        result["mean_representations"] = {
            k: h[bos + 1 : bos + n + 1].mean(0) for k, h in reps.items()
        }
    if "bos" in include:
        result["bos_representations"] = {k: h[bos] for k, h in reps.items()}
    if "contacts" in include:  # unpacked rows only
        result["contacts"] = out["contacts"][row, :n, :n].astype(np.float32)
    return result


@dataclass(frozen=True)
class Request:
    """What one embedding job computes and writes."""

    layers: tuple[int, ...]
    include: frozenset[str]
    max_tokens: int
    truncation: int | None
    fmt: str  # npz | fair-esm | shards


def embed_unit(
    engine: Engine, unit: units.Unit, req: Request, stopped=lambda: False
) -> units.Result:
    """One unit's outputs: its ``.npz``/``.pt`` files, or its shard (records in input order)."""
    repr_layers = req.layers if req.include & {"per_tok", "mean", "bos"} else ()
    position = {id(r): unit.first + i for i, r in enumerate(unit.records)}
    files: dict[str, bytes] = {}
    rows: list[dict] = []
    tokens = padded = 0
    truncated: list[str] = []
    for batch, out in _passes(engine, unit.records, req, repr_layers, stopped):
        padded += batch.tokens.size
        for at in batch.placed:
            rec, n = at.record, at.n
            tokens += n + 2
            if n < len(rec.sequence):
                truncated.append(rec.id)
            if req.fmt == "fair-esm":
                result = fair_esm_result(out, at, repr_layers, req.include, rec.description)
                files[f"{rec.description}.pt"] = pt_bytes(result)
                continue
            arrays = npz_arrays(out, at, repr_layers, req.include)
            if req.fmt == "npz":
                files[f"{sanitize_id(rec.id)}.npz"] = npz_bytes(arrays)
            else:
                head = {"id": rec.id, "description": rec.description, "index": position[id(rec)]}
                rows.append({**head, "length": n, **arrays})
    if truncated:  # one line per unit: a proteome has many long records
        log.warning(
            "unit %d: %d records truncated to %d residues (%s)",
            unit.index,
            len(truncated),
            req.truncation,
            ", ".join(truncated[:3]) + (", ..." if len(truncated) > 3 else ""),
        )
    if req.fmt == "shards":
        rows.sort(key=lambda r: r["index"])
        meta = {"command": "embed", "unit": unit.index, "layers": list(repr_layers)}
        files[units.shard_name(unit.index)] = shards.shard_bytes(rows, meta)
    return units.Result(files, tokens, padded)


def _passes(
    engine: Engine,
    records: Sequence[Record],
    req: Request,
    repr_layers: tuple[int, ...],
    stopped: Callable[[], bool],
) -> Iterator[tuple[PackedBatch, dict]]:
    """Each batch of ``records`` with its outputs: packed rows (``esmjax.inference.packed``),
    or one record per row where contacts are asked for (the contact head reads whole rows). A
    signal (``stopped``) ends the unit before the next pass."""
    logits = "logits" in req.include
    if "contacts" not in req.include:
        for batch in packed_batches(records, req.max_tokens, req.truncation, engine.row_multiple):
            if stopped():
                raise units.Preempted
            args = (batch.tokens, batch.segment_ids, batch.positions)
            yield batch, engine.embed_packed(*args, repr_layers, logits)
        return
    for b in make_batches(records, req.max_tokens, req.truncation, engine.row_multiple):
        placed = [
            Placed(r, row, 0, min(len(r.sequence), req.truncation or len(r.sequence)))
            for row, r in enumerate(b.records)
        ]
        batch = PackedBatch(placed, b.tokens, None, None)
        if stopped():
            raise units.Preempted
        yield batch, engine.embed(b.tokens, repr_layers, True, logits)


def embed_records(
    engine: Engine,
    records: Sequence[Record],
    out_dir: str | os.PathLike,
    layers: tuple[int, ...],
    include: Sequence[str],
    max_tokens: int,
    truncation: int | None,
    progress: bool = True,
    fmt: str = "npz",
) -> int:
    """Embeds ``records`` into ``out_dir`` as one unit, without a job folder (a library call)."""
    req = Request(layers, frozenset(include), max_tokens, truncation, fmt)
    result = embed_unit(engine, units.Unit(0, 0, list(records)), req)
    units.write_files(paths.output_dir(out_dir), result.files)
    return len(records)


def embed_fasta(source: checkpoint.Checkpoint | str, opts: EmbedOptions) -> int:
    """``esmjax embed``: the records of ``opts.fasta`` through the model of the checkpoint
    ``source`` (opened, or its path), sharded over this process's devices, as a job of work units
    (``esmjax.inference.units``): this process's units not yet done in ``opts.out``. Returns the
    records embedded by this process; raises ``units.Preempted`` after SIGTERM."""
    ckpt, out = checkpoint.opened(source).checked(), opts.out
    if opts.format == "fair-esm":  # before the model loads
        torch_module()
        if "logits" in opts.include:
            raise InputError("--include logits: esm-extract's .pt files hold none (--format npz)")
    preflight.output(out, f"--out {out}")  # before the model loads
    who = units.worker(process_id=opts.process_id, num_processes=opts.num_processes)
    stream = InputStream(opts.inputs, opts.unknown_as_x, opts.skip_invalid)
    fmt = stream.resolve_format(opts.format, "npz")
    if fmt in ("npz", "fair-esm"):
        stream.check_names(fmt)
    truncation = opts.truncation_seq_length or None
    # a missing bucket fails before the model loads; a failed run leaves no empty folder
    with paths.output_folder(out):
        engine, restored = units.esm2_engine(ckpt, opts.step, opts.dtype)
        layers = parse_layers(opts.layers, engine.cfg.num_layers)
        req = Request(layers, frozenset(opts.include), opts.max_tokens_per_batch, truncation, fmt)
        extra = {"layers": list(layers), "include": sorted(req.include)}
        extra["truncation_seq_length"] = opts.truncation_seq_length
        units.settle(out, "embed", opts, fmt, ckpt.path, restored, **extra)
        with stream.progress("embed", opts.progress) as bar:
            totals = units.run(
                out,
                stream.units(opts.unit_size),
                lambda unit, stopped: embed_unit(engine, unit, req, stopped),
                who,
                command="embed",
                progress=bar.update,
            )
    log.info(
        "wrote %d records to %s (checkpoint step %d, %d compilations)",
        totals.records,
        out,
        restored,
        engine.traces,
    )
    return totals.records
