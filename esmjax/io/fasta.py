"""A streaming, validating FASTA reader (plain or gzip).

Records may span many lines; lower case reads as upper case; one trailing ``*`` (a stop codon mark)
is dropped. Any other character outside the ESM alphabet is an error naming the file, line, record
id and 1-based residue position, unless ``unknown_as_x`` maps it to ``X``. Empty records, files that
are not FASTA (binary, HTML, no header) and truncated gzip files are errors too. With
``skip_invalid`` a bad record is skipped and counted instead. Memory stays bounded by the longest
record.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from esmjax.errors import InputError
from esmjax.io import paths
from esmjax.models.alphabet import RESIDUES

_ALLOWED = frozenset(RESIDUES)
_GZIP_MAGIC = b"\x1f\x8b"


@dataclass(frozen=True)
class Record:
    """One FASTA record: ``id`` is the header's first word, ``line`` the header's 1-based line
    number."""

    id: str
    description: str
    sequence: str
    line: int = 0


class FastaError(InputError):
    """Malformed FASTA input; the message names the file and line."""


@dataclass
class FastaStats:
    """Counts kept while reading with ``skip_invalid``."""

    records: int = 0
    residues: int = 0
    skipped: int = 0
    mapped_to_x: int = 0
    reasons: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str) -> None:
        self.skipped += 1
        self.reasons[reason] = self.reasons.get(reason, 0) + 1

    def summary(self) -> str:
        parts = [f"{self.records} records, {self.residues} residues"]
        if self.mapped_to_x:
            parts.append(f"{self.mapped_to_x} unknown characters read as X")
        if self.skipped:
            why = ", ".join(f"{n} {r}" for r, n in sorted(self.reasons.items()))
            parts.append(f"{self.skipped} records skipped ({why})")
        return "; ".join(parts)

    def merge(self, other: FastaStats) -> None:
        for f in dataclasses.fields(self):
            if f.name == "reasons":
                for r, n in other.reasons.items():
                    self.reasons[r] = self.reasons.get(r, 0) + n
            else:
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


class _RecordError(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def open_text(path: str | Path) -> io.TextIOBase:
    """Opens a plain or gzip file (local or a bucket URL) as text, refusing binary content early."""
    remote = paths.is_remote(path)
    p = path if remote else Path(path)

    def raw():  # a bucket object through epath (fsspec), a local file directly
        return paths.path(path).open("rb") if remote else open(p, "rb")

    def unzipped():
        return gzip.GzipFile(fileobj=raw(), mode="rb") if remote else gzip.open(p, "rb")

    with paths.remote_errors(path), raw() as f:
        head = f.read(4096)
    if head.startswith(_GZIP_MAGIC):
        try:
            with unzipped() as g:
                head = g.read(4096)
        except (EOFError, OSError, zlib.error) as e:
            raise FastaError(f"{p}: gzip stream is corrupt or truncated ({e})") from None
        opener = unzipped()
    else:
        opener = raw()
    if b"\x00" in head:
        opener.close()
        raise FastaError(f"{p}: binary content, not a FASTA file")
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 4:  # not merely a character cut at the 4 KiB boundary
            opener.close()
            raise FastaError(f"{p}: not UTF-8 text, not a FASTA file") from None
    return io.TextIOWrapper(opener, encoding="utf-8", errors="strict", newline=None)


def _check(
    path: Path,
    rec_id: str,
    line: int,
    parts: list[tuple[int, str]],
    unknown_as_x: bool,
    stats: FastaStats,
    allowed: frozenset[str] = _ALLOWED,
) -> str:
    seq = "".join(s for _, s in parts).upper()
    if seq.endswith("*"):
        seq = seq[:-1]
    if not seq:
        raise _RecordError("empty", f"{path}:{line}: record {rec_id!r} has no sequence")
    if set(seq) <= allowed:
        return seq
    if unknown_as_x:
        stats.mapped_to_x += sum(c not in allowed for c in seq)
        return "".join(c if c in allowed else "X" for c in seq)
    pos = next(i for i, c in enumerate(seq) if c not in allowed)
    start = 0
    for lineno, chunk in parts:  # noqa: B007 (lineno is used below: the line holding `pos`)
        if pos < start + len(chunk):
            break
        start += len(chunk)
    raise _RecordError(
        "invalid character",
        f"{path}:{lineno}: record {rec_id!r} has invalid character {seq[pos]!r} "
        f"at residue {pos + 1} "
        f"(column {pos - start + 1}); use --unknown-as-x to read unknown residues as X",
    )


def read_fasta(
    path: str | Path,
    *,
    unknown_as_x: bool = False,
    skip_invalid: bool = False,
    stats: FastaStats | None = None,
    extra_chars: str = "",
) -> Iterator[Record]:
    """Yields records from ``path``; raises ``FastaError`` (or skips and counts with
    ``skip_invalid``).

    ``extra_chars`` are accepted besides the alphabet (``esmjax fold`` allows ``:`` between
    multimer chains)."""
    allowed = _ALLOWED | frozenset(extra_chars)
    p = path if paths.is_remote(path) else Path(path)
    with paths.remote_errors(path):
        found = paths.path(path).exists()
    if not found:
        raise FastaError(f"{p}: no such file")
    stats = stats if stats is not None else FastaStats()
    header: tuple[str, str, int] | None = None
    parts: list[tuple[int, str]] = []
    seen_content = False

    def finish() -> Record | None:
        assert header is not None
        rec_id, desc, line = header
        try:
            if not rec_id:
                raise _RecordError("empty id", f"{p}:{line}: header has no id")
            seq = _check(p, rec_id, line, parts, unknown_as_x, stats, allowed)
        except _RecordError as e:
            if skip_invalid:
                stats.skip(e.reason)
                return None
            raise FastaError(str(e)) from None
        stats.records += 1
        stats.residues += len(seq)
        return Record(rec_id, desc, seq, line)

    with open_text(p) as f:
        lineno = 0
        try:
            for raw in f:
                lineno += 1
                line = raw.strip()
                if not line:
                    continue
                if line.startswith(">"):
                    if header is not None and (rec := finish()) is not None:
                        yield rec
                    desc = line[1:].strip()
                    header = (desc.split()[0] if desc else "", desc, lineno)
                    parts = []
                    seen_content = True
                    continue
                if header is None:
                    if line.startswith(";"):  # old-style FASTA comment
                        continue
                    what = (
                        "HTML"
                        if line.lower().startswith(("<!doctype", "<html", "<?xml", "<"))
                        else "text"
                    )
                    raise FastaError(
                        f"{p}:{lineno}: not a FASTA file ({what} before the first '>' header): "
                        f"{line[:60]!r}"
                    )
                parts.append((lineno, line))
        except (EOFError, zlib.error, gzip.BadGzipFile) as e:
            raise FastaError(
                f"{p}: gzip stream is corrupt or truncated after line {lineno} ({e})"
            ) from None
        except UnicodeDecodeError:
            raise FastaError(f"{p}:{lineno + 1}: not UTF-8 text, not a FASTA file") from None
    if header is not None and (rec := finish()) is not None:
        yield rec
    if not seen_content:
        raise FastaError(f"{p}: no FASTA records")


def sanitize_id(rec_id: str) -> str:
    """A filesystem-safe version of a record id (``sp|P62593|BLAT_ECOLX`` ->
    ``sp_P62593_BLAT_ECOLX``)."""
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in rec_id).strip("._")
    return safe[:200] or "record"


def check_unique_ids(records: list[Record], path: str | Path, suffix: str) -> None:
    """Raises ``FastaError`` when two records would write the same ``<sanitized id><suffix>``
    output file."""
    seen: dict[str, str] = {}
    for r in records:
        safe = sanitize_id(r.id)
        if safe in seen:
            raise FastaError(
                f"{path}:{r.line}: record id {r.id!r} collides with {seen[safe]!r} (output "
                f"{safe}{suffix})"
            )
        seen[safe] = r.id
