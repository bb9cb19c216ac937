"""What every form of ``esmjax data build`` shares: FASTA (+ cluster membership TSV) -> a TFDS
ArrayRecord dataset grouped by cluster.

A build has four steps; a back-end (``Backend``) does steps 1-3 and this module the rest:

1. The membership TSV (``cluster_id<TAB>member_id``, e.g. UniRef50 -> UniRef90 members or MMseqs2
   ``createtsv``; ``read_tsv``) is read. Without a TSV every record is its own
   cluster.
2. Every FASTA record is validated (``esmjax.io.fasta.read_fasta``: plain or gzip,
   binary/HTML/truncated files refused); duplicate ids, records the TSV does not place, members
   listed twice and TSV members that are no FASTA record are refused. ``skip_invalid`` skips and
   counts instead of stopping.
3. TFDS (an ``EsmjaxProteinClusters`` subclass, ``file_format="array_record"``; no TensorFlow)
   writes the ``train`` and ``validation`` splits. A cluster is held out when a hash of its name
   falls below ``val_fraction`` (``source.held_out``). Records are keyed by (cluster hash, member
   hash) with shuffling disabled, so TFDS's external sort writes each cluster's members contiguously
   (ESM-2 / BioNeMo hold out whole UniRef50 clusters).
4. An index pass (``write_index``) reads the splits back once and writes ``<split>.lengths.npy``,
   ``<split>.offsets.npy`` and the token file ``<split>.tokens.bin`` (every record's residue ids
   concatenated in record order, ``esmjax.data.tokens``: what training reads, locally memory-mapped
   and from a bucket by byte ranges); ``esmjax_dataset.json`` records sources, counts, each token
   file's size and the skip summary.

The back-ends are ``esmjax.data.build_local`` (one process; an SQLite registry keeps memory bounded)
and ``esmjax.data.build_beam`` (Apache Beam, for UniRef scale); ``esmjax.data.build`` picks one
from ``beam_runner``. This module imports neither. Everything is written into a temporary sibling
folder that is renamed onto ``out`` only when complete, so a failed or interrupted build leaves
nothing behind. An ``out`` in a bucket (``gs://``, ``s3://``) is built in a local temporary folder
and uploaded with ``esmjax_dataset.json`` last (a folder without it is not a dataset), so the
build needs the dataset's size free on the local temporary disk; FASTA/TSV inputs may be bucket
URLs too. (A Beam build on remote workers, e.g. Dataflow, would need its work folder in the
bucket; that is not supported yet.)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import tensorflow_datasets as tfds
from tqdm import tqdm

from esmjax.data import source, tokens
from esmjax.io import paths
from esmjax.io.fasta import FastaError, FastaStats, open_text
from esmjax.models.alphabet import encode

_BATCH = 4096
_TFDS_LOG = logging.getLogger("tensorflow_datasets")  # quiet unless `esmjax --verbose`


class BuildError(source.DatasetError):
    """Bad build input (FASTA, membership TSV or output folder); the message names the file and
    line."""


@dataclass
class BuildStats:
    """What a build read, kept and skipped (``--skip-invalid``)."""

    fasta: FastaStats = field(default_factory=FastaStats)
    kept: int = 0
    tsv_rows: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str, n: int = 1) -> None:
        if n:
            self.skipped[reason] = self.skipped.get(reason, 0) + n

    def summary(self) -> str:
        skipped = dict(self.fasta.reasons)
        for r, n in self.skipped.items():
            skipped[r] = skipped.get(r, 0) + n
        text = f"read {self.fasta.records + self.fasta.skipped} FASTA records, kept {self.kept}"
        if self.tsv_rows:
            text += f"; {self.tsv_rows} membership rows"
        if self.fasta.mapped_to_x:
            text += f"; {self.fasta.mapped_to_x} unknown characters read as X"
        if skipped:
            text += "; skipped: " + ", ".join(f"{n} {r}" for r, n in sorted(skipped.items()))
        return text


def read_tsv(path: Path, skip_invalid: bool, stats: BuildStats) -> Iterator[tuple[int, str, str]]:
    """(line, cluster, member) per row of the membership TSV ``cluster_id<TAB>member_id``, streamed;
    blank and ``#`` lines are ignored. A malformed row, or a file that is not UTF-8 text (binary,
    truncated gzip), raises BuildError naming the file (and line); with ``skip_invalid`` malformed
    rows are counted in ``stats`` instead."""
    try:
        with open_text(path) as f:
            for lineno, line in enumerate(f, 1):
                text = line.rstrip("\r\n")
                if not text.strip() or text.startswith("#"):
                    continue
                fields = text.split("\t")
                if len(fields) == 2 and fields[0].strip() and fields[1].strip():
                    yield lineno, fields[0].strip(), fields[1].strip()
                elif skip_invalid:
                    stats.skip("malformed membership rows")
                else:
                    raise BuildError(
                        f"{path}:{lineno}: malformed membership row {text[:80]!r}: expected "
                        "'cluster_id<TAB>member_id'"
                    )
    except FastaError as e:  # open_text's binary / gzip errors
        raise BuildError(str(e).replace("not a FASTA file", "not a membership TSV")) from None
    except UnicodeDecodeError:
        raise BuildError(f"{path}: not UTF-8 text, not a membership TSV") from None


# --------------------------------------------------------------------------------------------------
# The TFDS builder
# --------------------------------------------------------------------------------------------------
def features() -> tfds.features.FeaturesDict:
    """One record: its FASTA id, its cluster's name and its residue ids (one byte each)."""
    return tfds.features.FeaturesDict(
        {
            "id": tfds.features.Text(),
            "cluster": tfds.features.Text(),
            "tokens": tfds.features.Tensor(
                shape=(None,), dtype=np.uint8, encoding=tfds.features.Encoding.BYTES
            ),
        }
    )


@dataclass(frozen=True)
class BuildPlan:
    """What the builder reads, made once by ``build`` (``work_dir``: the temporary build folder).
    The back-end's ``prepare`` settles ``splits`` (those to write) and its own fields (``db``: the
    local validation pass's SQLite file)."""

    fastas: tuple[str, ...]
    clusters: str | None
    val_fraction: float
    unknown_as_x: bool
    skip_invalid: bool
    splits: tuple[str, ...]
    db: str | None = None
    work_dir: str | None = None


class EsmjaxProteinClusters(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Protein sequences grouped by cluster; ``train`` and ``validation`` (whole clusters held
    out). Abstract: each back-end's subclass generates the examples (``_split_generators``)."""

    name = source.TFDS_NAME
    VERSION = tfds.core.Version(source.TFDS_VERSION)
    RELEASE_NOTES = {source.TFDS_VERSION: "esmjax protein clusters, format 1"}

    def __init__(self, *, plan: BuildPlan, **kwargs: Any):
        self._plan = plan
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description="Protein sequences grouped by cluster (esmjax data build).",
            features=features(),
            disable_shuffling=True,
        )

    # TFDS prints these two to stdout ("Downloading and preparing dataset Unknown size ..."); they
    # go to its logger instead, shown with `esmjax --verbose`
    def _log_download_bytes(self) -> None:
        _TFDS_LOG.info("preparing dataset %s in %s", self.name, self.data_dir)

    def _log_download_done(self) -> None:
        _TFDS_LOG.info("dataset %s prepared in %s", self.name, self.data_dir)


def example(rec_id: str, cluster: str, sequence: str) -> tuple[int, dict[str, Any]]:
    """(TFDS key, example) of one record: keyed by (cluster hash, member hash) so that the sort
    writes each cluster's members contiguously."""
    key = source.record_key(cluster, rec_id)
    return key, {"id": rec_id, "cluster": cluster, "tokens": encode(sequence).astype(np.uint8)}


class Backend(Protocol):
    """Steps 1-3 of a build: ``build_local.LocalBackend`` or ``build_beam.BeamBackend``.

    ``builder_class`` is the TFDS builder that generates the examples; ``build`` makes it with
    the plan that ``prepare`` returned and runs it with ``download_config()``."""

    builder_class: type[EsmjaxProteinClusters]

    def prepare(self, plan: BuildPlan, stats: BuildStats) -> BuildPlan:
        """Runs before TFDS in ``plan.work_dir``: checks what it needs (and may validate the input,
        counting into ``stats``); returns ``plan`` with the splits to write and its own fields
        set. Raises BuildError."""
        ...

    def download_config(self) -> tfds.download.DownloadConfig:
        """How TFDS runs ``builder_class`` (the Beam runner and its options, if any)."""
        ...

    def finish(self, plan: BuildPlan, stats: BuildStats) -> None:
        """After TFDS: merges the back-end's counts into ``stats``, removes its scratch files."""
        ...


# --------------------------------------------------------------------------------------------------
# Index pass and the whole build
# --------------------------------------------------------------------------------------------------
def _write_npy(path: Path, chunks_file: Path, dtype: np.dtype, count: int) -> None:
    """Turns a raw little-endian chunk file into a .npy file without loading it whole."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(count,))
    with open(chunks_file, "rb") as f:
        pos = 0
        while chunk := f.read(1 << 24):
            a = np.frombuffer(chunk, dtype)
            out[pos : pos + len(a)] = a
            pos += len(a)
    out.flush()
    del out
    chunks_file.unlink()


def write_index(folder: Path, split: str, num_records: int) -> dict[str, Any]:
    """Reads a written split in order and writes its lengths, cluster offsets and token file;
    returns the split's stats (``tokens_bytes``: the token file's size, which readers check)."""
    builder = tfds.builder_from_directory(str(folder / source.TFDS_NAME / source.TFDS_VERSION))
    data = builder.as_data_source(split=split)
    if len(data) != num_records:
        raise BuildError(f"{folder}: split {split} has {len(data)} records, expected {num_records}")
    raw_len, raw_off = folder / f".{split}.lengths.raw", folder / f".{split}.offsets.raw"
    digest_len, digest_off = hashlib.blake2b(digest_size=8), hashlib.blake2b(digest_size=8)
    prev: bytes | None = None
    clusters = residues = 0
    tokens_file = folder / tokens.file_name(split)
    with open(raw_len, "wb") as fl, open(raw_off, "wb") as fo, open(tokens_file, "wb") as ft:
        for lo in tqdm(
            range(0, num_records, _BATCH), desc=f"indexing {split}", unit=" chunks", file=sys.stderr
        ):
            recs = data.__getitems__(list(range(lo, min(lo + _BATCH, num_records))))
            lengths = np.fromiter((len(r["tokens"]) for r in recs), np.int32, len(recs))
            ft.write(b"".join(np.asarray(r["tokens"], np.uint8).tobytes() for r in recs))
            starts = []
            for i, r in enumerate(recs):
                if r["cluster"] != prev:
                    starts.append(lo + i)
                    prev = r["cluster"]
            b = lengths.tobytes()
            fl.write(b)
            digest_len.update(b)
            o = np.asarray(starts, np.int64).tobytes()
            fo.write(o)
            digest_off.update(o)
            clusters += len(starts)
            residues += int(lengths.sum(dtype=np.int64))
        end = np.asarray([num_records], np.int64).tobytes()
        fo.write(end)
        digest_off.update(end)
    _write_npy(folder / f"{split}.lengths.npy", raw_len, np.dtype(np.int32), num_records)
    _write_npy(folder / f"{split}.offsets.npy", raw_off, np.dtype(np.int64), clusters + 1)
    # Same value as source.fingerprint(lengths, offsets), computed while streaming.
    fp = hashlib.blake2b(digest_len.digest() + digest_off.digest(), digest_size=8).hexdigest()
    if tokens_file.stat().st_size != residues:
        raise BuildError(f"{tokens_file}: wrote {tokens_file.stat().st_size} bytes, not {residues}")
    return {
        "records": num_records,
        "clusters": clusters,
        "residues": residues,
        "fingerprint": fp,
        "tokens_bytes": residues,
    }


def build(
    fastas: Sequence[str | Path],
    out: str | Path,
    backend: Backend,
    *,
    clusters: str | Path | None = None,
    val_fraction: float = 0.005,
    skip_invalid: bool = False,
    unknown_as_x: bool = False,
) -> dict[str, Any]:
    """Builds a dataset folder at ``out`` with ``backend``; returns its metadata (also written as
    ``esmjax_dataset.json``). ``esmjax.data.build.build_dataset`` documents the arguments and picks
    the back-end."""
    remote_out = str(out) if paths.is_remote(out) else None
    out = paths.path(out) if remote_out else Path(out)
    fastas = [f if paths.is_remote(f) else Path(f) for f in fastas]
    if not fastas:
        raise BuildError("no FASTA input given")
    with paths.remote_errors(str(out)):
        if out.exists() and (not remote_out or any(out.iterdir())):
            raise BuildError(f"{out} exists; remove it or choose another --out folder")
    if not 0.0 <= val_fraction < 1.0:
        raise BuildError(f"--val-fraction must lie in [0, 1), got {val_fraction}")
    for f in fastas + ([clusters] if clusters else []):
        with paths.remote_errors(str(f)):
            if not paths.path(f).is_file():
                raise BuildError(f"{f}: no such file")
    if remote_out:  # built on local disk, then uploaded, esmjax_dataset.json last
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-"))
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    t0 = time.time()
    try:
        stats = BuildStats()
        plan = BuildPlan(
            fastas=tuple(str(f) for f in fastas),
            clusters=str(clusters) if clusters else None,
            val_fraction=val_fraction,
            unknown_as_x=unknown_as_x,
            skip_invalid=skip_invalid,
            splits=source.SPLITS,
            work_dir=str(tmp),
        )
        plan = backend.prepare(plan, stats)
        if "train" not in plan.splits:
            raise BuildError("no training records: every cluster was held out or skipped")
        builder = backend.builder_class(plan=plan, data_dir=str(tmp), file_format="array_record")
        tfds.display_progress_bar(_TFDS_LOG.isEnabledFor(logging.INFO))  # as its log lines
        builder.download_and_prepare(
            download_dir=str(tmp / ".downloads"), download_config=backend.download_config()
        )
        shutil.rmtree(tmp / ".downloads", ignore_errors=True)
        backend.finish(plan, stats)
        built = {s: builder.info.splits[s].num_examples for s in plan.splits}
        stats.kept = sum(built.values())
        if not built["train"]:
            raise BuildError("no training records: every cluster was held out or skipped")
        splits = {
            s: {"records": 0, "clusters": 0, "residues": 0, "fingerprint": ""}
            for s in source.SPLITS
        }
        for s in plan.splits:
            splits[s] = write_index(tmp, s, built[s])
        meta = {
            "format": source.FORMAT,
            "version": source.FORMAT_VERSION,
            "tfds": {"name": source.TFDS_NAME, "version": source.TFDS_VERSION},
            "fasta": [str(f) for f in fastas],
            "clusters": str(clusters) if clusters else None,
            "val_fraction": val_fraction,
            "unknown_as_x": unknown_as_x,
            "skip_invalid": skip_invalid,
            "splits": splits,
            "stats": {"summary": stats.summary(), **asdict(stats)},
            "built_seconds": round(time.time() - t0, 2),
        }
        (tmp / source.META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp made it private
        if remote_out:
            paths.upload(tmp, remote_out, last=source.META_FILE)
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta
