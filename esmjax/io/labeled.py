"""Labelled protein data for fine-tuning, in the formats people already have (FLIP's, Dallago et
al. 2021, "FLIP: Benchmark tasks in fitness landscape inference for proteins").

- **Sequence tasks**: a CSV with a header holding ``sequence`` and ``target`` and optionally ``set``
  (``train``/``test``) and ``validation`` (``True``/``False``: train rows held out for
  validation), FLIP's ``splits/<task>/*.csv``; or FLIP's FASTA of the same records,
  ``>ID TARGET=<value> SET=<train|test> VALIDATION=<True|False>`` + the sequence (a FASTA by its
  name, ``.fasta/.fa/.faa/.fas/.fna`` plain or gzip, or by a first line starting with ``>``). A
  target holding several values separated by ``;`` is a multi-label (class names) or
  multi-target (numbers) row.
- **Residue tasks**: a sequence FASTA (``>id`` + sequence), a label FASTA whose records carry one
  label character per residue and ``SET=train|test`` and ``VALIDATION=True|False`` in the header
  (FLIP's secondary-structure and conservation layout), and an optional mask FASTA of ``0``/``1``
  per residue (0: unresolved, not scored). Or one file: a CSV whose target is the label string
  (FLIP's bind splits) or a FASTA with the label string as ``TARGET=``.
- **Explicit files**: ``--train/--valid/--test`` CSVs or FASTAs (label FASTAs when
  ``data.fasta`` is set) take their split from the file instead of the columns.

A bad row (invalid residue, a label string whose length differs from the sequence's, a
non-numeric regression target, an empty target) is an ``InputError`` naming the file and line,
or, with ``skip_invalid``, is skipped and counted.

Every file may be a bucket URL (``gs://``, ``s3://``): it is streamed through ``esmjax.io.paths``
(plain or gzip, as a local file), its messages name the URL and line, and a failure of the store
is one ``InputError`` line.
"""

from __future__ import annotations

import csv
import hashlib
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from esmjax.config import FinetuneDataConfig
from esmjax.errors import InputError
from esmjax.io import paths
from esmjax.io.fasta import open_text
from esmjax.models.alphabet import TokenizeError, encode

SPLITS = ("train", "valid", "test")


class LabeledDataError(InputError):
    """A row of a labelled file that cannot be used."""


@dataclass
class Example:
    """One labelled sequence. ``target``: a tuple of class names or floats (sequence tasks) or a
    string of one label per residue; ``mask``: residue scoring mask (residue tasks) or None."""

    id: str
    sequence: str
    target: Any
    split: str
    where: str  # file:line, for messages
    mask: np.ndarray | None = None


class Rows:
    """Collects examples; a bad row is raised, or skipped and counted with ``skip_invalid``."""

    def __init__(self, skip_invalid: bool, max_length: int):
        self.skip_invalid = skip_invalid
        self.max_length = max_length
        self.examples: list[Example] = []
        self.skipped: Counter[str] = Counter()

    def bad(self, where: str, reason: str) -> None:
        if not self.skip_invalid:
            raise LabeledDataError(f"{where}: {reason} (--skip-invalid skips such rows)")
        self.skipped[reason.split(":")[0]] += 1

    def add(self, ex: Example) -> None:
        try:
            ids = encode(ex.sequence)
        except TokenizeError as e:
            return self.bad(ex.where, f"invalid residue: {e}")
        if len(ids) != len(ex.sequence):  # inline <...> tokens: not one token per character
            return self.bad(ex.where, "invalid residue: special tokens inside the sequence")
        if not ex.sequence:
            return self.bad(ex.where, "empty sequence")
        n = self.max_length
        if len(ex.sequence) > n:  # cropped as `esmjax embed` crops (first residues kept)
            ex.sequence = ex.sequence[:n]
            if isinstance(ex.target, str):
                ex.target = ex.target[:n]
            if ex.mask is not None:
                ex.mask = ex.mask[:n]
        self.examples.append(ex)


def _hash_valid(seq: str, fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha256(seq.encode()).digest()[:8], "little")
    return h / 2**64 < fraction


def _bool(text: str) -> bool | None:
    t = text.strip().lower()
    return True if t in ("true", "1", "yes") else False if t in ("false", "0", "no", "") else None


def _parse_target(raw: str, kind: str) -> Any:
    """A target cell or ``TARGET=`` value: for residue tasks the label string (one character per
    residue), otherwise a tuple of ``;``-separated class names or (regression) floats."""
    if kind == "residue":
        labels = "".join(raw.split())
        if not labels:
            raise ValueError("empty target")
        return labels
    parts = [p.strip() for p in raw.split(";") if p.strip()]
    if not parts:
        raise ValueError("empty target")
    if kind == "value":
        try:
            vals = tuple(float(p) for p in parts)
        except ValueError:
            raise ValueError(f"non-numeric target: {raw!r}") from None
        if not all(np.isfinite(vals)):
            raise ValueError(f"non-numeric target: {raw!r}")
        return vals
    return tuple(parts)


def _split_of(set_: str | None, validation: str) -> str:
    """train/valid/test of FLIP's set and validation (None: no set given, a training row)."""
    s = "train" if set_ is None else set_.strip().lower()
    if s not in ("train", "test"):
        raise ValueError(f"unknown set: {s!r} (train or test)")
    valid = _bool(validation)
    if valid is None:
        raise ValueError("unknown validation value (True or False)")
    return "valid" if s == "train" and valid else s


def _add(rows: Rows, ex: Example) -> None:
    """``rows.add`` after the residue-task check that labels and residues pair up one to one."""
    if isinstance(ex.target, str) and len(ex.target) != len(ex.sequence):
        n, m = len(ex.target), len(ex.sequence)
        return rows.bad(ex.where, f"length mismatch: {n} labels for {m} residues")
    rows.add(ex)


def _existing(path: str | Path) -> Any:
    """``path`` as given (``paths.given``), checked to exist."""
    p = paths.given(path)
    if not p.exists():
        raise LabeledDataError(f"{p}: no such file")
    return p


_FASTA_NAMES = (".fasta", ".fa", ".faa", ".fas", ".fna")


def _is_fasta(p: Any) -> bool:
    """A FASTA by its name (plain or .gz), a CSV by ``.csv``, else by its first non-blank line."""
    name = str(p).lower().removesuffix(".gz")
    if name.endswith(_FASTA_NAMES) or name.endswith(".csv"):
        return not name.endswith(".csv")
    with open_text(str(p)) as f:
        return next((line.lstrip().startswith(">") for line in f if line.strip()), False)


def read_table(path: str | Path, rows: Rows, kind: str, split: str | None) -> None:
    """A file holding sequences and targets: FLIP's CSV or its FASTA with ``TARGET=`` headers.
    ``kind``: class, value or residue; ``split`` forces every row's split (``--train`` etc.)."""
    with paths.remote_errors(path):
        p = _existing(path)
        if _is_fasta(p):
            _read_target_fasta(p, rows, kind, split)
        else:
            _read_csv(p, rows, kind, split)


def _read_csv(p: Any, rows: Rows, kind: str, split: str | None) -> None:
    with open_text(str(p)) as f:
        reader = csv.DictReader(f)
        cols = {c.strip().lower(): c for c in reader.fieldnames or []}
        for need in ("sequence", "target"):
            if need not in cols:
                raise LabeledDataError(f"{p}: no '{need}' column (header: {reader.fieldnames})")
        for line, row in enumerate(reader, start=2):
            where = f"{p}:{line}"
            try:
                target = _parse_target(row[cols["target"]] or "", kind)
                # an empty cell of a set column is refused as the FASTAs' missing SET=
                # (_read_target_fasta): it would move a test row into training unnoticed
                given = (row.get(cols["set"]) or "") if "set" in cols else None
                valid = row.get(cols.get("validation", ""), "") or ""
                s = split or _split_of(given, valid)
            except ValueError as e:
                rows.bad(where, str(e))
                continue
            seq = "".join((row[cols["sequence"]] or "").split())
            _add(rows, Example(f"row{line}", seq, target, s, where))


def _unmarked(records: list, split: str | None) -> str | None:
    """Why a record without ``SET=`` is refused, or None when that is fine: a file that marks
    splits must mark every record, else an unmarked test record moves into training unnoticed.
    A file without any ``SET=`` is one training set, as a CSV without a set column."""
    unmarked = sum("SET" not in attrs for _, attrs, _, _ in records)
    if split is not None or unmarked == len(records):
        return None
    return (
        f"unknown set: no SET= in the header ({unmarked} of {len(records)} records have none; "
        "the others say train or test)"
    )


def _read_target_fasta(p: Any, rows: Rows, kind: str, split: str | None) -> None:
    # FLIP's FASTA splits (as on data.bioembeddings.com/public/FLIP/fasta, the layout biotrainer's
    # docs/data_standardization.md defines; checked 2026-12 against J-SNACKKB/FLIP splits/*/README
    # and sacdallago/biotrainer): sequence tasks are one file, '>ID TARGET=<value>
    # SET=<train|test> VALIDATION=<True|False>' and the sequence on the following lines; the same
    # header with a label string as TARGET is a residue task held in one file. FLIP's residue
    # splits proper (secondary structure, conservation) are a sequences.fasta plus a label FASTA
    # '>ID SET=.. VALIDATION=..' + labels: read_residue_fasta.
    records = _read_fasta_lines(p)
    refuse = _unmarked(records, split)
    for rec_id, attrs, seq, n in records:
        where = f"{p}:{n}"
        try:
            if "TARGET" not in attrs:
                raise ValueError(
                    "no TARGET= in the header: FLIP's FASTA headers read '>ID TARGET=<value> "
                    "SET=<train|test> VALIDATION=<True|False>'"
                )
            if refuse and "SET" not in attrs:
                raise ValueError(refuse)
            target = _parse_target(attrs["TARGET"], kind)
            s = split or _split_of(attrs.get("SET"), attrs.get("VALIDATION", ""))
        except ValueError as e:
            rows.bad(where, str(e))
            continue
        _add(rows, Example(rec_id, seq, target, s, where))


_ATTR = re.compile(r"(\w+)=(\S+)")


def read_fasta_lines(path: str | Path) -> list[tuple[str, dict[str, str], str, int]]:
    """A FASTA of any characters: (id, header attributes KEY=VALUE, text, header line)."""
    with paths.remote_errors(path):
        return _read_fasta_lines(_existing(path))


def _read_fasta_lines(p: Any) -> list[tuple[str, dict[str, str], str, int]]:
    out: list[tuple[str, dict[str, str], str, int]] = []
    head: tuple[str, dict[str, str], int] | None = None
    chunks: list[str] = []
    with open_text(str(p)) as f:
        for n, line in enumerate(f, start=1):
            line = line.strip()
            if line.startswith(">"):
                if head is not None:
                    out.append((head[0], head[1], "".join(chunks), head[2]))
                words = line[1:].split()
                if not words:
                    raise LabeledDataError(f"{p}:{n}: header without an id")
                head, chunks = (words[0], dict(_ATTR.findall(line)), n), []
            elif line:
                if head is None:
                    raise LabeledDataError(f"{p}:{n}: text before the first '>' header")
                chunks.append(line)
    if head is not None:
        out.append((head[0], head[1], "".join(chunks), head[2]))
    return out


def read_residue_fasta(
    fasta: str | Path, labels: str | Path, mask: str | Path | None, rows: Rows, split: str | None
) -> None:
    """FLIP's residue-task layout of three files (secondary structure, conservation splits:
    ``sequences.fasta``, the label FASTA ``>ID SET=.. VALIDATION=..`` + one label per residue, a
    0/1 mask FASTA); the label FASTA decides which records are used."""
    seqs = {i: s for i, _, s, _ in read_fasta_lines(fasta)}
    masks = {i: (s, n) for i, _, s, n in read_fasta_lines(mask)} if mask else {}
    records = read_fasta_lines(labels)
    # refused like any bad row (skipped and counted with skip_invalid), not warned: a run on
    # leaked data is not worth its compute
    refuse = _unmarked(records, split)
    for rec_id, attrs, lab, n in records:
        where = f"{labels}:{n}"
        if rec_id not in seqs:
            rows.bad(where, f"unknown id: {rec_id!r} is not in {fasta}")
            continue
        seq = seqs[rec_id]
        if len(lab) != len(seq):
            rows.bad(where, f"length mismatch: {len(lab)} labels for {len(seq)} residues")
            continue
        m = None
        if mask:
            if rec_id not in masks:
                rows.bad(where, f"unknown id: {rec_id!r} is not in {mask}")
                continue
            text, mn = masks[rec_id]
            if len(text) != len(seq) or set(text) - {"0", "1"}:
                rows.bad(f"{mask}:{mn}", "length mismatch or a mask character other than 0/1")
                continue
            m = np.frombuffer(text.encode(), np.uint8) == ord("1")
        s = split
        if refuse and "SET" not in attrs:
            rows.bad(where, refuse)
            continue
        if s is None:
            s = attrs.get("SET", "train").lower()
            if s not in ("train", "test"):
                rows.bad(where, f"unknown set: SET={s} (train or test)")
                continue
            valid = _bool(attrs.get("VALIDATION", "False"))
            if valid is None:
                rows.bad(where, "unknown validation value: VALIDATION= True or False")
                continue
            if s == "train" and valid:
                s = "valid"
        rows.add(Example(rec_id, seq, lab, s, where, m))


def _paired(cfg: FinetuneDataConfig, task: str) -> bool:
    """Whether the labels come as FLIP's residue label FASTA beside ``data.fasta`` (data.labels,
    or data.train/valid/test with data.fasta) rather than in one CSV/FASTA with the sequences."""
    explicit = any(getattr(cfg, s) for s in SPLITS)
    return task == "residue_classification" and bool(cfg.labels or (explicit and cfg.fasta))


def _sources(cfg: FinetuneDataConfig, task: str) -> list[tuple[str | None, str]]:
    """(forced split or None, file) of each labelled file the config names (it must name one)."""
    explicit = [(s, getattr(cfg, s)) for s in SPLITS if getattr(cfg, s)]
    paired = _paired(cfg, task)
    if paired and not cfg.fasta:
        raise LabeledDataError("data.fasta: residue label FASTAs need the sequence FASTA")
    if cfg.mask and task == "residue_classification" and not paired:
        raise LabeledDataError("data.mask: a mask goes with data.fasta and data.labels")
    sources = explicit or [(None, cfg.labels if paired else cfg.csv)]
    if not sources[0][1]:
        raise LabeledDataError(
            "data: name data.labels (residue tasks) or data.csv, or data.train/valid/test"
        )
    return sources


def check(cfg: FinetuneDataConfig, task: str) -> None:
    """What ``load`` checks before reading a row: the data section names its files and the local
    ones exist. Cheap, so ``esmjax finetune`` runs it before the distributed start-up; a bucket URL
    is left to ``load`` (no request here)."""
    files = [path for _, path in _sources(cfg, task)]
    if _paired(cfg, task):
        files += [cfg.fasta, cfg.mask]
    for path in files:
        if path and not paths.is_remote(path):
            _existing(path)


def load(cfg: FinetuneDataConfig, task: str) -> tuple[dict[str, list[Example]], Counter]:
    """The train/valid/test examples of a fine-tuning config and the skipped-row counts."""
    rows = Rows(cfg.skip_invalid, cfg.max_length)
    kind = {"residue_classification": "residue", "sequence_regression": "value"}.get(task, "class")
    for split, path in _sources(cfg, task):
        if _paired(cfg, task):
            read_residue_fasta(cfg.fasta, path, cfg.mask or None, rows, split)
        else:
            read_table(path, rows, kind, split)
    out: dict[str, list[Example]] = {s: [] for s in SPLITS}
    for ex in rows.examples:
        out[ex.split].append(ex)
    if not out["valid"] and cfg.valid_fraction > 0:  # nothing marked: hold out a hashed share
        keep = []
        for ex in out["train"]:
            (out["valid"] if _hash_valid(ex.sequence, cfg.valid_fraction) else keep).append(ex)
        out["train"] = keep
    if not out["train"]:
        raise LabeledDataError("data: no training rows")
    return out, rows.skipped
