"""The input of an inference job: FASTA files (local or bucket URLs, plain or gzip) or datasets
built by ``esmjax data build``, read in the order given as one stream of records, validated as they
are read, and cut into work units (``esmjax.inference.units.cut``).

A dataset is named by its folder (every split: ``train``, then ``validation``) or ``FOLDER:SPLIT``
(one split). Its records come in the dataset's record order, ``DATASET_BLOCK`` at a time: the
residues from the token file (memory-mapped, or range requests from a bucket), ids and cluster
names from the ArrayRecord files. A record's description is ``<id> cluster=<cluster>``; its
``line`` is its 1-based index in the split, which messages name as ``FOLDER:SPLIT:INDEX``.

An invalid record ends the job with one line naming its file and line, unless ``--skip-invalid``:
then it is counted by reason, and each unit's marker reports those read with it. A command's own
checks (``fold``'s empty chains and ``--max-length``) follow the same rule. Per-record output files
need unique names: a repeated id (or esm-extract label) is refused the same way, as it is read.

``--format auto`` writes per-record files for an input of at most ``AUTO_SHARDS_ABOVE`` records and
shards above: the stream's head is read to decide (the whole input when it is small, so that its
records are all checked before the model loads, as before units existed).
"""

from __future__ import annotations

import contextlib
import itertools
import sys
from collections.abc import Callable, Iterator, Sequence

from tqdm import tqdm

from esmjax.io.fasta import FastaError, FastaStats, Record, read_fasta, sanitize_id

AUTO_SHARDS_ABOVE = 1000  # records: more than this and `--format auto` writes shards
DATASET_BLOCK = 4096  # records of a built dataset read per request (ids and residues)

# (path, record) -> None when the record is usable, else (reason, message)
Check = Callable[[str, Record], "tuple[str, str] | None"]


class InputStream:
    """The records of ``inputs``, read once per pass (each process reads the whole stream)."""

    def __init__(
        self,
        inputs: Sequence[str],
        unknown_as_x: bool = False,
        skip_invalid: bool = False,
        extra_chars: str = "",
        check: Check | None = None,
    ):
        self.inputs = tuple(inputs)
        self.unknown_as_x, self.skip_invalid = unknown_as_x, skip_invalid
        self.extra_chars, self.check = extra_chars, check
        self.stats = FastaStats()
        self.names: str | None = None  # "npz" / "pdb" / "fair-esm": per-record file names to check
        self._head: list[tuple[str, Record]] = []  # (its file, record)
        self._rest: Iterator[tuple[str, Record]] = self._read()
        self.complete = False  # the head is the whole input

    def _read(self) -> Iterator[tuple[str, Record]]:
        for path in self.inputs:
            dataset = built_dataset(path)
            records = (
                dataset_records(*dataset, self.stats)
                if dataset is not None
                else read_fasta(
                    path,
                    unknown_as_x=self.unknown_as_x,
                    skip_invalid=self.skip_invalid,
                    stats=self.stats,
                    extra_chars=self.extra_chars,
                )
            )
            for rec in records:
                bad = self.check(path, rec) if self.check is not None else None
                if bad is None:
                    yield path, rec
                elif self.skip_invalid:
                    self.stats.records -= 1
                    self.stats.residues -= len(rec.sequence)
                    self.stats.skip(bad[0])
                else:
                    raise FastaError(bad[1])

    def peek(self, n: int) -> list[Record]:
        """The first ``n`` records (fewer: the whole input, ``complete``)."""
        more = list(itertools.islice(self._rest, max(0, n - len(self._head))))
        self._head += more
        self.complete = len(self._head) < n
        return [rec for _, rec in self._head[:n]]

    def resolve_format(self, requested: str, files: str) -> str:
        """``requested``, or for ``auto``: ``files`` (the per-record format) for a small input,
        ``shards`` above ``AUTO_SHARDS_ABOVE`` records."""
        if requested != "auto":
            return requested
        return files if len(self.peek(AUTO_SHARDS_ABOVE + 1)) <= AUTO_SHARDS_ABOVE else "shards"

    def check_names(self, fmt: str) -> None:
        """Per-record files named by id (``.npz``, ``.pdb``) or label (``fair-esm``): refused as
        read when two records would write one file; a small input is checked whole now."""
        self.names = fmt
        if len(self.peek(AUTO_SHARDS_ABOVE + 1)) <= AUTO_SHARDS_ABOVE:
            for _ in self._named(iter(self._head)):
                pass

    def _named(self, records: Iterator[tuple[str, Record]]) -> Iterator[Record]:
        seen: dict[str, tuple[int, str]] = {}
        for path, rec in records:
            if self.names == "fair-esm":
                name = rec.description
                if any(part in ("", ".", "..") for part in name.split("/")):
                    where = f"{path}:{rec.line}"
                    raise FastaError(f"{where}: header {name!r} is not a usable file name")
                if name in seen:
                    raise FastaError(
                        f"{path}:{rec.line}: header {name!r} repeats line {seen[name][0]} "
                        f"(output {name}.pt)"
                    )
            else:
                name = sanitize_id(rec.id)
                if name in seen:
                    raise FastaError(
                        f"{path}:{rec.line}: record id {rec.id!r} collides with {seen[name][1]!r} "
                        f"(output {name}.{self.names}); make the ids unique or use --format shards"
                    )
            seen[name] = (rec.line, rec.id)
            yield rec

    def records(self) -> Iterator[Record]:
        """Every record, once (the head read so far, then the rest)."""
        stream = itertools.chain(self._head, self._rest)
        if self.names:
            return self._named(stream)
        return (rec for _, rec in stream)

    def units(self, unit_size: int):
        from esmjax.inference import units

        return units.cut(self.records(), unit_size, self.stats if self.skip_invalid else None)

    @contextlib.contextmanager
    def progress(self, desc: str, enabled: bool):
        """A records bar on stderr (its total known when the input was read whole)."""
        total = len(self._head) if self.complete else None
        bar = tqdm(total=total, desc=desc, unit="seq", file=sys.stderr, disable=not enabled)
        try:
            yield bar
        finally:
            bar.close()


def built_dataset(path: str) -> tuple[str, tuple[str, ...]] | None:
    """``(folder, splits)`` when ``path`` names a dataset built by ``esmjax data build`` (its
    folder, or ``FOLDER:SPLIT``), else None (a FASTA file)."""
    from esmjax.data import source

    folder, _, split = path.rpartition(":")
    if folder and split in source.SPLITS and source.is_dataset_dir(folder):
        return folder, (split,)
    if source.is_dataset_dir(path):
        return path, source.SPLITS
    return None


def dataset_records(folder: str, splits: Sequence[str], stats: FastaStats) -> Iterator[Record]:
    """The records of ``splits`` of a built dataset, in record order (residues checked at the
    build: only counted here)."""
    import numpy as np

    from esmjax.data import source
    from esmjax.models.alphabet import decode

    for name in splits:
        split = source.open_split(folder, name)
        for start in range(0, split.num_records, DATASET_BLOCK):
            block = np.arange(start, min(start + DATASET_BLOCK, split.num_records))
            for i, (ids, (rec_id, cluster)) in enumerate(
                zip(split.read(block), split.describe(block))
            ):
                seq = decode(ids)
                stats.records += 1
                stats.residues += len(seq)
                yield Record(rec_id, f"{rec_id} cluster={cluster}", seq, start + i + 1)
