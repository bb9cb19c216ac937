"""The local back-end of ``esmjax data build`` (the default): one process, memory bounded by the
longest record plus SQLite's page cache.

Steps 1-2 of ``esmjax.data.builder`` run before TFDS, streaming:

1. The membership TSV goes into an on-disk SQLite table (``Registry.load_tsv``).
2. A validation pass reads every FASTA record, rejects duplicate ids and records the TSV does not
   place (``Registry.register``), then checks that every TSV member was found
   (``Registry.check_members``). The accepted records, with their file, line and cluster, stay in
   the SQLite file.

Step 3 (``LocalBuilder``) reads the FASTA files again and yields exactly the registered records
(the first occurrence of each id), each to the split of its cluster.
"""

from __future__ import annotations

import sqlite3
import sys
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import tensorflow_datasets as tfds
from tqdm import tqdm

from esmjax.data import source
from esmjax.data.builder import (
    BuildError,
    BuildPlan,
    BuildStats,
    EsmjaxProteinClusters,
    example,
    read_tsv,
)
from esmjax.io import paths
from esmjax.io.fasta import read_fasta

_BATCH = 4096
_DB = ".registry.sqlite"


def _source(f: str | Path) -> str | Path:
    return str(f) if paths.is_remote(f) else Path(f)


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
        with paths.remote_errors(path):
            found = paths.path(path).is_file()
        if not found:
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
        with tqdm(desc="reading clusters", unit=" rows", file=sys.stderr) as bar:
            for lineno, cluster, member in read_tsv(path, skip_invalid, stats):
                rows.append((member, cluster, lineno))
                if len(rows) == _BATCH:
                    self._insert("membership", rows, "line", lambda r: (r[2],), duplicate)
                    bar.update(len(rows))
                    rows = []
            if rows:
                self._insert("membership", rows, "line", lambda r: (r[2],), duplicate)
                bar.update(len(rows))
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


class LocalBuilder(EsmjaxProteinClusters, skip_registration=True):
    """The dataset, generated in this process from the FASTA files and the validation pass's
    registry."""

    name = source.TFDS_NAME

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
                    yield example(rec.id, cluster, rec.sequence)
        finally:
            registry.close()


class LocalBackend:
    """``esmjax.data.builder.Backend`` that validates in this process (an SQLite registry in the
    build folder) before TFDS writes the splits."""

    builder_class = LocalBuilder

    def prepare(self, plan: BuildPlan, stats: BuildStats) -> BuildPlan:
        """The validation pass; the splits to write are those that received records."""
        db = Path(plan.work_dir) / _DB
        registry = Registry(db)
        try:
            # a bucket URL stays a string (Path() would fold gs:// into gs:/); readers use paths
            clusters = _source(plan.clusters) if plan.clusters else None
            if clusters:
                registry.load_tsv(clusters, plan.skip_invalid, stats)
            registry.register(
                [_source(f) for f in plan.fastas], plan.unknown_as_x, plan.skip_invalid, stats
            )
            if clusters:
                registry.check_members(clusters, plan.skip_invalid, stats)
            registry.db.commit()
            counts = registry.split_counts(plan.val_fraction)
        finally:
            registry.close()
        return replace(plan, splits=tuple(s for s in source.SPLITS if counts[s]), db=str(db))

    def download_config(self) -> tfds.download.DownloadConfig:
        return tfds.download.DownloadConfig()

    def finish(self, plan: BuildPlan, stats: BuildStats) -> None:
        """The registry is scratch: removed."""
        Path(plan.db).unlink()
