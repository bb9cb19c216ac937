"""``esmjax embed``: representations, logits and contacts for every record of a FASTA file (fair-esm
``esm-extract``'s counterpart).

Records are sorted by length, padded to a small fixed set of length buckets and grouped into batches
of a fixed row count per bucket, so the jitted forward compiles at most once per bucket. Each
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
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from esmjax.errors import InputError
from esmjax.inference import preflight
from esmjax.inference.engine import Engine, bucketed
from esmjax.inference.options import EmbedOptions
from esmjax.io import checkpoint, paths
from esmjax.io.fasta import FastaError, Record, check_unique_ids, read_fasta, sanitize_id
from esmjax.models.alphabet import PAD, batch_encode
from esmjax.parallel import sharding as shd

log = logging.getLogger("esmjax.inference.embed")


@dataclass(frozen=True)
class Batch:
    records: list[Record]
    tokens: np.ndarray  # [R, T]; rows past len(records) are all padding


def make_batches(
    records: Sequence[Record], max_tokens: int, truncation: int | None, row_multiple: int = 1
) -> Iterator[Batch]:
    """Groups length-sorted records into fixed-shape batches: one row count per length bucket."""
    lengths = [min(len(r.sequence), truncation or len(r.sequence)) + 2 for r in records]
    for width, rows, idx in bucketed(lengths, max_tokens, row_multiple):
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


def load_records(path: str, unknown_as_x: bool, fmt: str = "npz") -> list[Record]:
    """Reads and validates the whole FASTA before any output is written."""
    records = list(read_fasta(path, unknown_as_x=unknown_as_x))
    if fmt == "fair-esm":
        check_labels(records, path)
    else:
        check_unique_ids(records, path, ".npz")
    return records


def check_labels(records: Sequence[Record], path: str) -> None:
    """Each record's ``<label>.pt`` stays inside the output folder and is written once (esm-extract
    would silently overwrite a repeated label)."""
    seen: dict[str, int] = {}
    for r in records:
        if any(part in ("", ".", "..") for part in r.description.split("/")):
            raise FastaError(f"{path}:{r.line}: header {r.description!r} is not a usable file name")
        if r.description in seen:
            raise FastaError(
                f"{path}:{r.line}: header {r.description!r} repeats line {seen[r.description]} "
                f"(output {r.description}.pt)"
            )
        seen[r.description] = r.line


def write_npz(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    paths.write_bytes(path, buf.getvalue())


def torch_module():
    """PyTorch, which ``--format fair-esm`` writes its ``.pt`` files with."""
    try:
        import torch
    except ImportError:
        raise InputError(
            "--format fair-esm writes .pt files with PyTorch: pip install 'esmjax[torch]'"
        ) from None
    return torch


def write_pt(path: str | os.PathLike, result: dict) -> None:
    """``result`` (NumPy arrays, also inside dicts) saved with ``torch.save`` as torch tensors."""
    torch = torch_module()

    def tensor(x):
        if isinstance(x, dict):
            return {k: tensor(v) for k, v in x.items()}
        return torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x

    buf = io.BytesIO()
    torch.save(tensor(result), buf)
    paths.write_bytes(path, buf.getvalue())


def npz_arrays(
    out: dict, row: int, n: int, layers: tuple[int, ...], include: set[str]
) -> dict[str, np.ndarray]:
    """One record's arrays for ``<id>.npz``: residue positions only, BOS and EOS removed."""
    arrays: dict[str, np.ndarray] = {}
    for layer in layers:
        h = out["representations"][layer][row]
        if "per_tok" in include:
            arrays[f"repr_{layer}"] = h[1 : n + 1]
        if "mean" in include:
            arrays[f"mean_{layer}"] = h[1 : n + 1].mean(0)
        if "bos" in include:
            arrays[f"bos_{layer}"] = h[0]
    if "logits" in include:
        arrays["logits"] = out["logits"][row, 1 : n + 1]
    if "contacts" in include:
        arrays["contacts"] = out["contacts"][row, :n, :n]
    return arrays


def fair_esm_result(
    out: dict, row: int, n: int, layers: tuple[int, ...], include: set[str], label: str
) -> dict:
    """One record's dict as esm-extract writes it: float32 arrays, layers as int keys."""
    reps = {layer: out["representations"][layer][row].astype(np.float32) for layer in layers}
    result: dict = {"label": label}
    if "per_tok" in include:
        result["representations"] = {k: h[1 : n + 1] for k, h in reps.items()}
    if "mean" in include:
        result["mean_representations"] = {k: h[1 : n + 1].mean(0) for k, h in reps.items()}
    if "bos" in include:
        result["bos_representations"] = {k: h[0] for k, h in reps.items()}
    if "contacts" in include:
        result["contacts"] = out["contacts"][row, :n, :n].astype(np.float32)
    return result


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
    include = set(include)
    want_repr = bool(include & {"per_tok", "mean", "bos"})
    repr_layers = layers if want_repr else ()
    out_dir = paths.output_dir(out_dir)
    for r in records:
        if truncation is not None and len(r.sequence) > truncation:
            log.warning("%s: %d residues truncated to %d", r.id, len(r.sequence), truncation)
    bar = tqdm(total=len(records), desc="embed", unit="seq", file=sys.stderr, disable=not progress)
    done = 0
    for batch in make_batches(records, max_tokens, truncation, engine.row_multiple):
        out = engine.embed(batch.tokens, repr_layers, "contacts" in include, "logits" in include)
        for row, rec in enumerate(batch.records):
            n = min(len(rec.sequence), truncation or len(rec.sequence))
            if fmt == "fair-esm":
                result = fair_esm_result(out, row, n, repr_layers, include, rec.description)
                write_pt(out_dir / f"{rec.description}.pt", result)
            else:
                arrays = npz_arrays(out, row, n, repr_layers, include)
                write_npz(out_dir / f"{sanitize_id(rec.id)}.npz", arrays)
            done += 1
        bar.update(len(batch.records))
    bar.close()
    return done


def embed_fasta(source: checkpoint.Checkpoint | str, opts: EmbedOptions) -> int:
    """``esmjax embed``: every record of ``opts.fasta`` through the model of the checkpoint
    ``source`` (opened, or its path), sharded over all local devices (fsdp); writes
    ``<out>/<id>.npz`` (or esm-extract's ``<label>.pt``) and returns the record count."""
    ckpt, out = checkpoint.opened(source).checked(), opts.out
    if opts.format == "fair-esm":  # before the model loads
        torch_module()
        if "logits" in opts.include:
            raise InputError("--include logits: esm-extract's .pt files hold none (--format npz)")
    preflight.output(out, f"--out {out}")  # before the model loads
    records = load_records(opts.fasta, opts.unknown_as_x, opts.format)
    truncation = opts.truncation_seq_length or None
    # a missing bucket fails before the model loads; a failed run leaves no empty folder
    with paths.output_folder(out):
        rules = shd.resolve_rules("fsdp")
        mesh = checkpoint.inference_mesh(ckpt, rules, opts.dtype)
        model, restored = checkpoint.load_model(
            ckpt, step=opts.step, mesh=mesh, rules=rules, dtype=opts.dtype
        )
        engine = Engine(model, mesh, rules)
        repr_layers = parse_layers(opts.layers, model.cfg.num_layers)
        n = embed_records(
            engine,
            records,
            out,
            repr_layers,
            opts.include,
            opts.max_tokens_per_batch,
            truncation,
            opts.progress,
            opts.format,
        )
    log.info(
        "wrote %d records to %s (checkpoint step %d, %d compilations)",
        n,
        out,
        restored,
        engine.traces,
    )
    return n
