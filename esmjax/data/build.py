"""``esmjax data build``: FASTA (+ cluster membership TSV) -> a TFDS ArrayRecord dataset grouped by
cluster.

Steps, all streaming (memory bounded by the longest record plus SQLite's page cache):

1. The membership TSV (``cluster_id<TAB>member_id``, e.g. UniRef50 -> UniRef90 members or MMseqs2
   ``createtsv``) goes into an on-disk SQLite table. Without a TSV every record is its own cluster.
2. A validation pass reads every FASTA record (``esmjax.io.fasta.read_fasta``: plain or gzip,
   binary/HTML/truncated files refused), rejects duplicate ids and records the TSV does not place,
   then checks that every TSV member was found. ``skip_invalid`` skips and counts instead of
   stopping.
3. TFDS (``GeneratorBasedBuilder``, ``file_format="array_record"``; no TensorFlow) writes the
   ``train`` and ``validation`` splits. A cluster is held out when a hash of its name falls below
   ``val_fraction`` (``source.held_out``). Records are keyed by (cluster hash, member hash) with
   shuffling disabled, so TFDS's external sort writes each cluster's members contiguously (ESM-2 /
   BioNeMo hold out whole UniRef50 clusters).
4. An index pass reads the splits back once and writes ``<split>.lengths.npy`` and
   ``<split>.offsets.npy``.

Everything is written into a temporary sibling folder that is renamed onto ``out`` only when
complete, so a failed or interrupted build leaves nothing behind. The Apache Beam variant of steps
1-3 is in ``esmjax.data.beam_build``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sqlite3
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from tqdm import tqdm

from esmjax.data import source
from esmjax.io.fasta import FastaError, FastaStats, open_text, read_fasta
from esmjax.models.alphabet import encode

log = logging.getLogger("esmjax.data")

_BATCH = 4096


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


# --------------------------------------------------------------------------------------------------
# Membership and record registry (SQLite on disk)
# --------------------------------------------------------------------------------------------------
def parse_tsv_line(path: Path, lineno: int, line: str) -> tuple[str, str] | None:
    """(cluster, member) of a TSV line, None for blank or ``#`` lines; raises BuildError if
    malformed."""
    text = line.rstrip("\r\n")
    if not text.strip() or text.startswith("#"):
        return None
    fields = text.split("\t")
    if len(fields) != 2 or not fields[0].strip() or not fields[1].strip():
        raise BuildError(
            f"{path}:{lineno}: malformed membership row {text[:80]!r}: expected "
            "'cluster_id<TAB>member_id'"
        )
    return fields[0].strip(), fields[1].strip()


class Registry:
    """Cluster membership and the accepted FASTA records, in an SQLite file (bounded memory at
    UniRef scale)."""

    def __init__(self, db_path: Path):
        self.db = sqlite3.connect(db_path)
        self.db.executescript(
            # a scratch file
            "PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF; PRAGMA cache_size=-65536;"
            "CREATE TABLE membership (member TEXT PRIMARY KEY, cluster TEXT NOT NULL, line "
            "INTEGER NOT NULL) WITHOUT ROWID;CREATE TABLE seen (id TEXT PRIMARY KEY, file "
            "INTEGER NOT NULL, line INTEGER NOT NULL, cluster TEXT NOT NULL) WITHOUT ROWID;"
        )
        self.has_tsv = False

    def close(self) -> None:
        self.db.close()

    def _insert(self, table: str, rows: list[tuple], where: str, locate, on_duplicate) -> None:
        """Inserts rows keeping the first of equal keys (column 0); calls ``on_duplicate(row)`` for
        each later one, in order. ``where`` names the columns that locate a row in its file and
        ``locate(row)`` gives their values, which tells the kept row from the ignored ones."""
        before = self.db.total_changes
        marks = ",".join("?" * len(rows[0]))
        self.db.executemany(f"INSERT OR IGNORE INTO {table} VALUES ({marks})", rows)
        if self.db.total_changes - before == len(rows):
            return
        key = {"membership": "member", "seen": "id"}[table]
        for row in rows:
            kept = self.db.execute(
                f"SELECT {where} FROM {table} WHERE {key}=?", (row[0],)
            ).fetchone()
            if tuple(kept) != locate(row):
                on_duplicate(row)

    def load_tsv(self, path: Path, skip_invalid: bool, stats: BuildStats) -> None:
        """Streams the membership TSV into the ``membership`` table."""
        self.has_tsv = True
        if not path.is_file():
            raise BuildError(f"{path}: no such file")

        def duplicate(row: tuple) -> None:
            member, cluster, line = row
            first = self.db.execute(
                "SELECT cluster, line FROM membership WHERE member=?", (member,)
            ).fetchone()
            if not skip_invalid:
                raise BuildError(
                    f"{path}:{line}: member {member!r} of cluster {cluster!r} is already listed "
                    f"in cluster {first[0]!r} (line {first[1]})"
                )
            stats.skip("membership rows repeating a member")

        rows: list[tuple] = []
        try:
            with (
                open_text(path) as f,
                tqdm(desc="reading clusters", unit=" rows", file=sys.stderr) as bar,
            ):
                for lineno, line in enumerate(f, 1):
                    try:
                        parsed = parse_tsv_line(path, lineno, line)
                    except BuildError:
                        if not skip_invalid:
                            raise
                        stats.skip("malformed membership rows")
                        continue
                    if parsed is None:
                        continue
                    rows.append((parsed[1], parsed[0], lineno))
                    if len(rows) == _BATCH:
                        self._insert("membership", rows, "line", lambda r: (r[2],), duplicate)
                        bar.update(len(rows))
                        rows = []
                if rows:
                    self._insert("membership", rows, "line", lambda r: (r[2],), duplicate)
                    bar.update(len(rows))
        except FastaError as e:  # open_text's binary / gzip errors
            raise BuildError(str(e).replace("not a FASTA file", "not a membership TSV")) from None
        except UnicodeDecodeError:
            raise BuildError(f"{path}: not UTF-8 text, not a membership TSV") from None
        stats.tsv_rows = self.db.execute("SELECT COUNT(*) FROM membership").fetchone()[0]
        if stats.tsv_rows == 0:
            raise BuildError(f"{path}: no membership rows")

    def register(
        self, fastas: Sequence[Path], unknown_as_x: bool, skip_invalid: bool, stats: BuildStats
    ) -> None:
        """The validation pass: every FASTA record once, duplicates and unplaced records
        rejected."""

        def duplicate(row: tuple) -> None:
            rec_id, file, line, _ = row
            f0, l0 = self.db.execute("SELECT file, line FROM seen WHERE id=?", (rec_id,)).fetchone()
            if not skip_invalid:
                raise BuildError(
                    f"{fastas[file]}:{line}: duplicate record id {rec_id!r} (first at "
                    f"{fastas[f0]}:{l0})"
                )
            stats.skip("duplicate ids")

        with tqdm(desc="validating FASTA", unit=" seq", file=sys.stderr) as bar:
            for file, path in enumerate(fastas):
                rows: list[tuple] = []
                for rec in read_fasta(
                    path, unknown_as_x=unknown_as_x, skip_invalid=skip_invalid, stats=stats.fasta
                ):
                    bar.update()
                    if self.has_tsv:
                        hit = self.db.execute(
                            "SELECT cluster FROM membership WHERE member=?", (rec.id,)
                        ).fetchone()
                        if hit is None:
                            if not skip_invalid:
                                raise BuildError(
                                    f"{path}:{rec.line}: record {rec.id!r} is in no cluster of "
                                    "the membership TSV"
                                )
                            stats.skip("records in no cluster")
                            continue
                        cluster = hit[0]
                    else:
                        cluster = rec.id
                    rows.append((rec.id, file, rec.line, cluster))
                    if len(rows) == _BATCH:
                        self._insert("seen", rows, "file, line", lambda r: (r[1], r[2]), duplicate)
                        rows = []
                if rows:
                    self._insert("seen", rows, "file, line", lambda r: (r[1], r[2]), duplicate)

    def check_members(self, tsv: Path, skip_invalid: bool, stats: BuildStats) -> None:
        """Every TSV member must be a FASTA record (a wrong id format otherwise goes unnoticed)."""
        if not self.has_tsv:
            return
        missing = "FROM membership m WHERE NOT EXISTS (SELECT 1 FROM seen s WHERE s.id = m.member)"
        if skip_invalid:
            (n,) = self.db.execute(f"SELECT COUNT(*) {missing}").fetchone()
            stats.skip("membership rows naming unknown members", n)
            return
        row = self.db.execute(
            f"SELECT m.line, m.member, m.cluster {missing} ORDER BY m.line LIMIT 1"
        ).fetchone()
        if row is not None:
            raise BuildError(
                f"{tsv}:{row[0]}: member {row[1]!r} of cluster {row[2]!r} is not a record of any "
                "FASTA input"
            )

    def split_counts(self, val_fraction: float) -> dict[str, int]:
        counts = {s: 0 for s in source.SPLITS}
        for (cluster,) in self.db.execute("SELECT cluster FROM seen"):
            counts["validation" if source.held_out(cluster, val_fraction) else "train"] += 1
        return counts


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
    """What the builder reads. ``db`` is the validation pass's SQLite file (local build only)."""

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
    out)."""

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

    def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
        return {s: self._generate_examples(s) for s in self._plan.splits}

    def _generate_examples(self, split: str) -> Iterator[tuple[int, dict[str, Any]]]:
        plan = self._plan
        registry = sqlite3.connect(plan.db)
        want_validation = split == "validation"
        try:
            for file, path in enumerate(plan.fastas):
                for rec in read_fasta(
                    path, unknown_as_x=plan.unknown_as_x, skip_invalid=plan.skip_invalid
                ):
                    hit = registry.execute(
                        "SELECT file, line, cluster FROM seen WHERE id=?", (rec.id,)
                    ).fetchone()
                    if hit is None or hit[0] != file or hit[1] != rec.line:
                        continue
                    cluster = hit[2]
                    if source.held_out(cluster, plan.val_fraction) != want_validation:
                        continue
                    yield source.record_key(cluster, rec.id), example(rec.id, cluster, rec.sequence)
        finally:
            registry.close()


def example(rec_id: str, cluster: str, sequence: str) -> dict[str, Any]:
    return {"id": rec_id, "cluster": cluster, "tokens": encode(sequence).astype(np.uint8)}


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
    """Reads a written split in order and writes its lengths and cluster offsets; returns the
    split's stats."""
    builder = tfds.builder_from_directory(str(folder / source.TFDS_NAME / source.TFDS_VERSION))
    data = builder.as_data_source(split=split)
    if len(data) != num_records:
        raise BuildError(f"{folder}: split {split} has {len(data)} records, expected {num_records}")
    raw_len, raw_off = folder / f".{split}.lengths.raw", folder / f".{split}.offsets.raw"
    digest_len, digest_off = hashlib.blake2b(digest_size=8), hashlib.blake2b(digest_size=8)
    prev: bytes | None = None
    clusters = residues = 0
    with open(raw_len, "wb") as fl, open(raw_off, "wb") as fo:
        for lo in tqdm(
            range(0, num_records, _BATCH), desc=f"indexing {split}", unit=" chunks", file=sys.stderr
        ):
            recs = data.__getitems__(list(range(lo, min(lo + _BATCH, num_records))))
            lengths = np.fromiter((len(r["tokens"]) for r in recs), np.int32, len(recs))
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
    return {"records": num_records, "clusters": clusters, "residues": residues, "fingerprint": fp}


def build_dataset(
    fastas: Sequence[str | Path],
    out: str | Path,
    *,
    clusters: str | Path | None = None,
    val_fraction: float = 0.005,
    skip_invalid: bool = False,
    unknown_as_x: bool = False,
    beam_runner: str | None = None,
    beam_options: Sequence[str] = (),
) -> dict[str, Any]:
    """Builds a dataset folder at ``out``; returns its metadata (also written as
    ``esmjax_dataset.json``).

    Args:
      fastas: FASTA files, plain or gzip.
      out: the folder to create (must not exist).
      clusters: optional membership TSV ``cluster_id<TAB>member_id``; without it each record is its
        own cluster.
      val_fraction: fraction of clusters held out as the ``validation`` split.
      skip_invalid: skip and count bad records and rows instead of stopping at the first.
      unknown_as_x: read characters outside the alphabet as ``X``.
      beam_runner: run steps 1-3 as an Apache Beam pipeline on this runner (e.g. ``DirectRunner``).
      beam_options: extra Beam pipeline flags (``--direct_num_workers=4`` ...).
    """
    out = Path(out)
    fastas = [Path(f) for f in fastas]
    if not fastas:
        raise BuildError("no FASTA input given")
    if out.exists():
        raise BuildError(f"{out} exists; remove it or choose another --out folder")
    if not 0.0 <= val_fraction < 1.0:
        raise BuildError(f"--val-fraction must lie in [0, 1), got {val_fraction}")
    for f in fastas + ([Path(clusters)] if clusters else []):
        if not f.is_file():
            raise BuildError(f"{f}: no such file")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    t0 = time.time()
    try:
        if beam_runner:
            from esmjax.data import beam_build

            stats, counts, plan = beam_build.prepare(
                tmp, fastas, clusters, val_fraction, unknown_as_x, skip_invalid
            )
        else:
            stats, counts, plan = _prepare_local(
                tmp, fastas, clusters, val_fraction, unknown_as_x, skip_invalid
            )
        if counts["train"] == 0:
            raise BuildError("no training records: every cluster was held out or skipped")
        builder_cls = beam_build.BeamBuilder if beam_runner else EsmjaxProteinClusters
        builder = builder_cls(plan=plan, data_dir=str(tmp), file_format="array_record")
        download_config = tfds.download.DownloadConfig()
        if beam_runner:
            download_config = tfds.download.DownloadConfig(
                beam_runner=beam_runner, beam_options=beam_build.options(beam_options)
            )
        if beam_runner:
            beam_build.run(builder, tmp / ".downloads", download_config)
        else:
            builder.download_and_prepare(
                download_dir=str(tmp / ".downloads"), download_config=download_config
            )
        shutil.rmtree(tmp / ".downloads", ignore_errors=True)
        if plan.db:
            Path(plan.db).unlink()
        built = {s: builder.info.splits[s].num_examples for s in plan.splits}
        if beam_runner:
            beam_build.read_skipped(tmp, stats)
            stats.kept = sum(built.values())
            if not built.get("train"):
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
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def _prepare_local(
    tmp: Path,
    fastas: list[Path],
    clusters: str | Path | None,
    val_fraction: float,
    unknown_as_x: bool,
    skip_invalid: bool,
) -> tuple[BuildStats, dict[str, int], BuildPlan]:
    stats = BuildStats()
    db = tmp / ".registry.sqlite"
    registry = Registry(db)
    try:
        if clusters:
            registry.load_tsv(Path(clusters), skip_invalid, stats)
        registry.register(fastas, unknown_as_x, skip_invalid, stats)
        if clusters:
            registry.check_members(Path(clusters), skip_invalid, stats)
        registry.db.commit()
        counts = registry.split_counts(val_fraction)
    finally:
        registry.close()
    stats.kept = sum(counts.values())
    plan = BuildPlan(
        fastas=tuple(str(f) for f in fastas),
        clusters=str(clusters) if clusters else None,
        val_fraction=val_fraction,
        unknown_as_x=unknown_as_x,
        skip_invalid=skip_invalid,
        splits=tuple(s for s in source.SPLITS if counts[s]),
        db=str(db),
    )
    return stats, counts, plan
