"""``esmjax fold``: structures and confidences for every record of a FASTA file (fair-esm
``esm-fold``).

Records are encoded as fair-esm ``infer`` does (multimer chains joined by ":" in the record get a
25-glycine linker and a residue-index jump of 512 per chain), padded to a fixed set of length
buckets, and batched by a token budget with one row count per bucket, so the jitted fold compiles
once per bucket. Each record gives ``<id>.pdb`` (atom37 coordinates, per-atom pLDDT 0-100 as
B-factor, chains A, B, ..., residues numbered from 1 per chain, linker hidden) and ``<id>.json``
(``sequence``, per-residue CA ``plddt``, ``mean_plddt`` over atoms, ``ptm``, ``pae`` in Angstrom
over the shown residues, ``max_pae``). ``--out`` may be a bucket URL: each file is one object upload
through ``esmjax.io.paths.write_text`` (whole or absent), a local one a renamed temporary sibling.
"""

from __future__ import annotations

import json
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
from esmjax.inference.options import FoldOptions
from esmjax.io import checkpoint, paths
from esmjax.io.fasta import Record, check_unique_ids, read_fasta, sanitize_id
from esmjax.io.structure_writer import Structure, to_mmcif, to_pdb
from esmjax.models.esmfold.heads import max_predicted_aligned_error
from esmjax.models.esmfold.model import ESMFold
from esmjax.models.geometry import residue_constants as rc

log = logging.getLogger("esmjax.inference.fold")

CHAIN_LINKER = "G" * 25
RESIDUE_INDEX_OFFSET = 512


@dataclass(frozen=True)
class Encoded:
    """One record as model input (fair-esm ``misc.encode_sequence``); arrays have the joined
    length."""

    aatype: np.ndarray  # AF2 types, unknown -> X
    residx: np.ndarray  # arange + 512 x chain (the linker after chain i belongs to chain i)
    linker_mask: np.ndarray  # 0 on linker residues
    chain_index: np.ndarray  # the linker belongs to the preceding chain
    residue_number: np.ndarray  # 1-based within each chain (what the PDB shows)


def encode(sequence: str) -> Encoded:
    chains = sequence.split(":")
    if any(not c for c in chains):
        raise InputError(f"empty chain in {sequence[:40]!r}... (':' separates chains)")
    aatype, residx, linker, chain, number = [], [], [], [], []
    for i, c in enumerate(chains):
        if i:
            n = len(CHAIN_LINKER)
            aatype += [rc.RESTYPE_ORDER["G"]] * n
            residx += list(range(len(residx), len(residx) + n))
            linker += [0] * n
            chain += [i - 1] * n
            number += [0] * n
        start = len(residx)
        aatype += [rc.RESTYPE_ORDER.get(a, rc.UNK) for a in c]
        residx += list(range(start, start + len(c)))
        linker += [1] * len(c)
        chain += [i] * len(c)
        number += list(range(1, len(c) + 1))
    chain_arr = np.asarray(chain, np.int32)
    residx_arr = np.asarray(residx, np.int32) + RESIDUE_INDEX_OFFSET * chain_arr
    return Encoded(
        np.asarray(aatype, np.int32),
        residx_arr,
        np.asarray(linker, np.float32),
        chain_arr,
        np.asarray(number, np.int32),
    )


def fold_pass(model: ESMFold, aatype, mask, residx, num_recycles, chunk_size):
    out = model(aatype, mask, residx, num_recycles=num_recycles, chunk_size=chunk_size)
    keys = ("atom37", "atom37_exists", "plddt", "ptm", "predicted_aligned_error")
    return {k: out[k] for k in keys}


def fold_batch(
    engine: Engine,
    aatype: np.ndarray,
    mask: np.ndarray,
    residx: np.ndarray,
    num_recycles: int | None = None,
    chunk_size: int | None = None,
) -> dict[str, np.ndarray]:
    """One jitted ESMFold pass over a padded batch (compiled once per shape)."""
    fold = engine.cached_forward("fold", fold_pass, static_argnums=(3, 4))
    return fold(aatype, mask, residx, num_recycles, chunk_size)


@dataclass(frozen=True)
class Batch:
    records: list[Record]
    encoded: list[Encoded]
    aatype: np.ndarray  # [R, Lb]; rows past len(records) are empty (mask 0)
    mask: np.ndarray
    residx: np.ndarray


def make_batches(records: Sequence[Record], max_tokens: int) -> Iterator[Batch]:
    """Length-sorted records grouped by bucket; each bucket's batches have ``min(max_tokens //
    bucket, n)`` rows."""
    encoded = [encode(r.sequence) for r in records]
    lengths = [len(e.aatype) for e in encoded]
    for width, rows, chunk in bucketed(lengths, max_tokens, fit_rows=True):
        aatype = np.zeros((rows, width), np.int32)
        mask = np.zeros((rows, width), np.float32)
        residx = np.zeros((rows, width), np.int32)
        for r, i in enumerate(chunk):
            n = lengths[i]
            aatype[r, :n], mask[r, :n], residx[r, :n] = encoded[i].aatype, 1.0, encoded[i].residx
        yield Batch([records[i] for i in chunk], [encoded[i] for i in chunk], aatype, mask, residx)


def record_outputs(
    rec: Record, enc: Encoded, out: dict[str, np.ndarray], row: int
) -> tuple[Structure, dict]:
    """The structure and JSON of one batch row, linker removed."""
    n = len(enc.aatype)
    keep = enc.linker_mask > 0
    exists = out["atom37_exists"][row, :n] * enc.linker_mask[:, None]
    plddt = out["plddt"][row, :n]
    structure = Structure(
        aatype=enc.aatype[keep],
        atom37=out["atom37"][row, :n][keep],
        atom_mask=exists[keep],
        residue_number=enc.residue_number[keep],
        chain_index=enc.chain_index[keep],
        b_factors=plddt[keep],
    )
    pae = out["predicted_aligned_error"][row, :n, :n][np.ix_(keep, keep)]
    ca = rc.ATOM_ORDER["CA"]
    info = {
        "id": rec.id,
        "sequence": rec.sequence,
        "plddt": [round(float(v), 4) for v in plddt[keep, ca]],
        "mean_plddt": round(float((plddt * exists).sum() / max(exists.sum(), 1.0)), 4),
        "ptm": round(float(out["ptm"][row]), 6),
        "pae": [[round(float(v), 4) for v in r] for r in pae],
        "max_pae": max_predicted_aligned_error(),
    }
    return structure, info


def fold_records(
    engine: Engine,
    records: Sequence[Record],
    out_dir: str | os.PathLike,
    max_tokens: int,
    mmcif: bool = False,
    progress: bool = True,
    num_recycles: int | None = None,
    chunk_size: int | None = None,
) -> list[dict]:
    """Folds every record and writes ``<id>.pdb`` / ``<id>.json`` (and ``<id>.cif``); returns the
    JSON dicts."""
    out_dir = paths.output_dir(out_dir)
    bar = tqdm(total=len(records), desc="fold", unit="seq", file=sys.stderr, disable=not progress)
    results = []
    for batch in make_batches(records, max_tokens):
        out = fold_batch(engine, batch.aatype, batch.mask, batch.residx, num_recycles, chunk_size)
        for row, (rec, enc) in enumerate(zip(batch.records, batch.encoded)):
            structure, info = record_outputs(rec, enc, out, row)
            name = sanitize_id(rec.id)
            pdb = to_pdb(structure, remark=f"esmjax fold {rec.id}")
            paths.write_text(out_dir / f"{name}.pdb", pdb)
            if mmcif:
                paths.write_text(out_dir / f"{name}.cif", to_mmcif(structure, name))
            paths.write_text(out_dir / f"{name}.json", json.dumps(info))
            results.append(info)
            bar.set_postfix(
                id=rec.id[:20], plddt=f"{info['mean_plddt']:.1f}", ptm=f"{info['ptm']:.3f}"
            )
        bar.update(len(batch.records))
    bar.close()
    return results


def load_records(path: str, unknown_as_x: bool, max_length: int) -> list[Record]:
    records = list(read_fasta(path, unknown_as_x=unknown_as_x, extra_chars=":"))
    check_unique_ids(records, path, ".pdb")
    for r in records:
        if r.sequence.startswith(":") or r.sequence.endswith(":") or "::" in r.sequence:
            raise InputError(
                f"{path}:{r.line}: record {r.id!r} has an empty chain (':' separates chains)"
            )
        n = len(encode(r.sequence).aatype)
        if n > max_length:
            raise InputError(
                f"{path}:{r.line}: record {r.id!r} has {n} residues (linkers included), over "
                f"--max-length {max_length}"
            )
    return records


def check(ckpt: checkpoint.Checkpoint, opts: FoldOptions) -> None:
    """An ESMFold checkpoint, and a place to write: before the model loads (a wrong checkpoint
    leaves no empty output folder)."""
    ckpt.checked(esmfold=True)
    preflight.output(opts.out, f"--out {opts.out}")


def fold_fasta(source: checkpoint.Checkpoint | str, opts: FoldOptions) -> list[dict]:
    """``esmjax fold``: folds every record of ``opts.fasta`` with the ESMFold checkpoint
    ``source`` (opened, or its path) into ``opts.out``."""
    ckpt, out = checkpoint.opened(source), opts.out
    check(ckpt, opts)
    if opts.num_recycles is not None and opts.num_recycles < 0:
        raise InputError("--num-recycles must be >= 0")
    if opts.chunk_size is not None and opts.chunk_size < 1:
        raise InputError("--chunk-size must be positive")
    records = load_records(opts.fasta, opts.unknown_as_x, opts.max_length)
    # a missing bucket fails before the model loads; a failed run leaves no empty folder
    with paths.output_folder(out):
        model, _ = checkpoint.load_esmfold(ckpt, dtype=opts.dtype)
        engine = Engine(model)
        results = fold_records(
            engine,
            records,
            out,
            opts.max_tokens_per_batch,
            opts.mmcif,
            opts.progress,
            opts.num_recycles,
            opts.chunk_size,
        )
    log.info("folded %d records into %s (%d compilations)", len(results), out, engine.traces)
    return results
