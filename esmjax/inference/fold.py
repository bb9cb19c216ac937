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

Devices (``fold_engine``): the model is restored onto this process's devices with the ESM-2 stem
sharded as ``embed`` shards an ESM-2 (``fsdp`` as far as the stem's dimensions divide, the rest
``data``; ``inference_mesh(local=True)``), since the stem is what grows (3B, 15B), and the trunk's
and heads' parameters replicated. The batch is not split (``stem_rules`` drop ``act_batch``): every
device runs the whole trunk on every row, as one device did, so the rows, buckets and compilations
are those of one device, and XLA's only collectives are the stem's (weight gathers, partial sums;
their summation order moves the outputs by float32 rounding, about 1e-6 of their scale). One local
device gives a 1x1x1 mesh on which every rule is void: exactly the one-device fold.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import jax
import numpy as np

from esmjax.errors import InputError
from esmjax.inference import preflight, shards, units
from esmjax.inference.engine import Engine, bucketed
from esmjax.inference.inputs import InputStream
from esmjax.inference.options import FoldOptions
from esmjax.io import checkpoint, paths
from esmjax.io.fasta import Record, check_unique_ids, read_fasta, sanitize_id
from esmjax.io.structure_writer import Structure, to_mmcif, to_pdb
from esmjax.models.esmfold.heads import max_predicted_aligned_error
from esmjax.models.esmfold.model import ESMFold
from esmjax.models.geometry import residue_constants as rc
from esmjax.parallel import sharding as shd

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


def stem_rules(rules: shd.Rules | str = "fsdp") -> shd.Rules:
    """The ESM-2 ``rules`` for an ESMFold: their parameter rules, which name only the stem's axes,
    without ``act_batch``, so that inputs and activations keep every row on every device (the
    trunk's rows stay as on one device, and a batch needs no multiple of the device count)."""
    return tuple(rule for rule in shd.resolve_rules(rules) if rule[0] != shd.ACT_BATCH)


def fold_engine(
    ckpt: checkpoint.Checkpoint,
    dtype: str | None = None,
    step: int | None = None,
    mesh: jax.sharding.Mesh | None = None,
    rules: shd.Rules | str = "fsdp",
) -> tuple[Engine, int]:
    """(Engine, restored step): the ESMFold of ``ckpt`` on ``mesh`` (default: this process's
    devices, ``fsdp`` as far as the stem divides, the rest ``data``), its stem sharded by
    ``stem_rules(rules)``, its trunk and heads replicated."""
    rules = stem_rules(rules)
    if mesh is None:
        mesh = checkpoint.inference_mesh(ckpt, rules, dtype, local=True)
    model, restored = checkpoint.load_esmfold(ckpt, dtype=dtype, step=step, mesh=mesh, rules=rules)
    log.info("ESMFold: stem on mesh %s, trunk replicated", shd.mesh_sizes(mesh))
    return Engine(model, mesh, rules), restored


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


@dataclass(frozen=True)
class Request:
    """What one folding job computes and writes."""

    max_tokens: int
    fmt: str  # files | shards
    mmcif: bool = False
    num_recycles: int | None = None
    chunk_size: int | None = None


def fold_unit(
    engine: Engine, unit: units.Unit, req: Request, stopped=lambda: False, bar=None
) -> tuple[units.Result, list[dict]]:
    """One unit's outputs (``<id>.pdb``/``.json``/``.cif`` files, or its shard with the PDB and
    mmCIF text beside the confidences) and the records' JSON dicts in input order."""
    position = {id(r): unit.first + i for i, r in enumerate(unit.records)}
    files: dict[str, bytes] = {}
    rows: list[dict] = []
    tokens = padded = 0
    for batch in make_batches(unit.records, req.max_tokens):
        if stopped():
            raise units.Preempted
        out = fold_batch(
            engine, batch.aatype, batch.mask, batch.residx, req.num_recycles, req.chunk_size
        )
        padded += batch.aatype.size
        for row, (rec, enc) in enumerate(zip(batch.records, batch.encoded)):
            tokens += len(enc.aatype)
            structure, info = record_outputs(rec, enc, out, row)
            name = sanitize_id(rec.id)
            texts = {"pdb": to_pdb(structure, remark=f"esmjax fold {rec.id}")}
            if req.mmcif:
                texts["cif"] = to_mmcif(structure, name)
            if req.fmt == "files":
                for ext, text in texts.items():
                    files[f"{name}.{ext}"] = text.encode()
                files[f"{name}.json"] = json.dumps(info).encode()
            head = {"id": rec.id, "description": rec.description, "index": position[id(rec)]}
            rows.append({**head, "info": info, **texts})
            if bar is not None:
                bar.set_postfix(
                    id=rec.id[:20], plddt=f"{info['mean_plddt']:.1f}", ptm=f"{info['ptm']:.3f}"
                )
    rows.sort(key=lambda r: r["index"])
    if req.fmt == "shards":
        table = [shard_row(r) for r in rows]
        meta = {"command": "fold", "unit": unit.index}
        files[units.shard_name(unit.index)] = shards.shard_bytes(table, meta)
    return units.Result(files, tokens, padded), [r["info"] for r in rows]


def shard_row(row: dict) -> dict:
    """A folded record as a shard row: its text outputs and confidences (pLDDT per residue, PAE
    as an [L, L] float32 array)."""
    info = row["info"]
    out = {k: row[k] for k in ("id", "description", "index")}
    out["length"] = len(info["plddt"])
    out["sequence"] = info["sequence"]
    for k in ("pdb", "cif"):
        if k in row:
            out[k] = row[k]
    out["plddt"] = np.asarray(info["plddt"], np.float32)
    out["mean_plddt"], out["ptm"], out["max_pae"] = info["mean_plddt"], info["ptm"], info["max_pae"]
    out["pae"] = np.asarray(info["pae"], np.float32)
    return out


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
    """Folds ``records`` as one unit into ``<id>.pdb`` / ``<id>.json`` (and ``<id>.cif``) in
    ``out_dir``, without a job folder (a library call); returns the JSON dicts in input order."""
    req = Request(max_tokens, "files", mmcif, num_recycles, chunk_size)
    result, infos = fold_unit(engine, units.Unit(0, 0, list(records)), req)
    units.write_files(paths.output_dir(out_dir), result.files)
    return infos


def load_records(path: str, unknown_as_x: bool, max_length: int) -> list[Record]:
    """The records of ``path``, all checked (``record_problem``)."""
    records = list(read_fasta(path, unknown_as_x=unknown_as_x, extra_chars=":"))
    check_unique_ids(records, path, ".pdb")
    for r in records:
        bad = record_problem(path, r, max_length)
        if bad is not None:
            raise InputError(bad[1])
    return records


def record_problem(path: str, r: Record, max_length: int) -> tuple[str, str] | None:
    """None for a record ``fold`` can take, else (reason, message): an empty chain, or more than
    ``max_length`` residues with the linkers."""
    if r.sequence.startswith(":") or r.sequence.endswith(":") or "::" in r.sequence:
        return "empty chain", (
            f"{path}:{r.line}: record {r.id!r} has an empty chain (':' separates chains)"
        )
    n = len(encode(r.sequence).aatype)
    if n > max_length:
        return f"over --max-length {max_length}", (
            f"{path}:{r.line}: record {r.id!r} has {n} residues (linkers included), over "
            f"--max-length {max_length}"
        )
    return None


def check(ckpt: checkpoint.Checkpoint, opts: FoldOptions) -> None:
    """An ESMFold checkpoint, a place to write and sane options: before the model loads (a wrong
    checkpoint leaves no empty output folder)."""
    ckpt.checked(esmfold=True)
    preflight.output(opts.out, f"--out {opts.out}")
    if opts.num_recycles is not None and opts.num_recycles < 0:
        raise InputError("--num-recycles must be >= 0")
    if opts.chunk_size is not None and opts.chunk_size < 1:
        raise InputError("--chunk-size must be positive")


def fold_fasta(source: checkpoint.Checkpoint | str, opts: FoldOptions) -> int:
    """``esmjax fold``: folds the records of ``opts.fasta`` with the ESMFold checkpoint ``source``
    (opened, or its path) into ``opts.out``, as a job of work units (``esmjax.inference.units``):
    this process's units not yet done. Returns the records folded by this process; raises
    ``units.Preempted`` after SIGTERM."""
    ckpt, out = checkpoint.opened(source), opts.out
    check(ckpt, opts)
    who = units.worker(process_id=opts.process_id, num_processes=opts.num_processes)
    stream = InputStream(
        opts.inputs,
        opts.unknown_as_x,
        opts.skip_invalid,
        extra_chars=":",
        check=lambda path, r: record_problem(path, r, opts.max_length),
    )
    fmt = stream.resolve_format(opts.format, "files")
    if fmt == "files":
        stream.check_names("pdb")
    req = Request(opts.max_tokens_per_batch, fmt, opts.mmcif, opts.num_recycles, opts.chunk_size)
    # a missing bucket fails before the model loads; a failed run leaves no empty folder
    with paths.output_folder(out):
        units.use_compilation_cache()
        engine, restored = fold_engine(ckpt, opts.dtype)
        extra = {"num_recycles": opts.num_recycles, "chunk_size": opts.chunk_size}
        extra.update(mmcif=opts.mmcif, max_length=opts.max_length)
        units.settle(out, "fold", opts, fmt, ckpt.path, restored, **extra)
        with stream.progress("fold", opts.progress) as bar:
            totals = units.run(
                out,
                stream.units(opts.unit_size),
                lambda unit, stopped: fold_unit(engine, unit, req, stopped, bar)[0],
                who,
                command="fold",
                progress=bar.update,
            )
    log.info("folded %d records into %s (%d compilations)", totals.records, out, engine.traces)
    return totals.records
