"""Zero-shot variant-effect prediction by masked marginals (Meier et al. 2021, "Language models
enable zero-shot prediction of the effects of mutations on protein function", NeurIPS; fair-esm
``examples/variant-prediction``).

The score of a variant is ``sum over its mutated positions i of log p(mut_i | x_masked_i) - log
p(wt_i | x_masked_i)``, where ``x_masked_i`` is the wild-type sequence with position i masked: one
forward pass per distinct mutated position, batched. Agreement with measured fitness is the Spearman
rank correlation.

Two input layouts:

- FASTA with the fitness in the header, as fair-esm's ``P62593.fasta`` (TEM-1 beta-lactamase):
  ``>index|<name>_<mutant>|<fitness>`` followed by the full mutated sequence. The wild type is
  ``--wt-sequence`` or, when absent, recovered from the records: each record with its mutations
  reverted gives a candidate, and the most common candidate is the wild type. Every record must then
  match it.
- CSV with a header, a mutant column and a score column (``mutant,score`` by default) plus a
  wild-type sequence.

Mutants are ``A42G`` (wild-type residue, position, mutant residue), multi-mutants joined by ``:``
(``A42G:V50L``). Positions count from ``offset`` (default 1: the first residue is 1). Mutations to a
stop codon (``*``) cannot be scored by a protein language model and are skipped (counted in the
report).

The scan (and a ``--wt-sequence`` FASTA) may be a bucket URL (``gs://``, ``s3://``), read through
``esmjax.io.paths``; messages name the URL and line as they name a local file.
"""

from __future__ import annotations

import csv
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from esmjax.errors import InputError
from esmjax.inference.engine import Engine, MaskedQuery, bucketed, masked_logprobs
from esmjax.io import paths
from esmjax.io.fasta import read_fasta
from esmjax.models.alphabet import TOKEN_TO_ID, TokenizeError, encode

_MUTATION = re.compile(r"^([A-Z])(-?\d+)([A-Z*])$")


class DMSError(InputError):
    """A deep-mutational-scan file that does not parse or does not fit its wild-type sequence."""


@dataclass(frozen=True)
class Mutation:
    wt: str
    position: int  # 0-based index into the wild-type sequence
    mt: str


@dataclass(frozen=True)
class Variant:
    name: str
    mutations: tuple[Mutation, ...]
    fitness: float
    line: int


@dataclass
class DMS:
    """A parsed scan: the wild type, the scorable variants and what was left out."""

    path: str
    wild_type: str
    wild_type_source: str  # "given" or "derived"
    variants: list[Variant]
    skipped: dict[str, int] = field(default_factory=dict)


def parse_mutant(text: str, offset: int, where: str) -> tuple[Mutation, ...]:
    """``A42G`` or ``A42G:V50L`` -> mutations with 0-based positions."""
    muts = []
    for part in text.strip().split(":"):
        m = _MUTATION.match(part.strip())
        if not m:
            raise DMSError(
                f"{where}: cannot read mutant {text!r} (expected e.g. A42G or A42G:V50L)"
            )
        muts.append(Mutation(m.group(1), int(m.group(2)) - offset, m.group(3)))
    positions = [m.position for m in muts]
    if len(set(positions)) != len(positions):
        raise DMSError(f"{where}: mutant {text!r} names a position twice")
    return tuple(muts)


def check_against(wt: str, variant: Variant, where: str, offset: int) -> None:
    """Raises if a mutation's position or wild-type residue does not fit ``wt``."""
    for m in variant.mutations:
        if not 0 <= m.position < len(wt):
            raise DMSError(
                f"{where}: mutant {variant.name}: position {m.position + offset} is outside the "
                f"wild-type sequence ({offset}..{len(wt) + offset - 1})"
            )
        if wt[m.position] != m.wt:
            raise DMSError(
                f"{where}: mutant {variant.name}: wild-type residue {m.wt} does not match "
                f"{wt[m.position]} at position {m.position + offset} of the wild-type sequence"
            )


def apply_mutations(seq: str, muts: Sequence[Mutation], attr: str = "mt") -> str:
    """``seq`` with each mutation's ``attr`` residue (``mt``: the mutant, ``wt``: the wild type)
    at its position; positions outside ``seq`` are left out."""
    chars = list(seq)
    for m in muts:
        if 0 <= m.position < len(chars):
            chars[m.position] = getattr(m, attr)
    return "".join(chars)


def read_wt_sequence(arg: str) -> str:
    """``--wt-sequence``: a sequence, or a FASTA file whose first record is the wild type.

    A file of that name wins (as before); a string the file system cannot take as a name is no
    file: a real protein is longer than a file name may be (255 bytes; TEM-1 has 286 residues),
    and asking for it raises ENAMETOOLONG (or ValueError for a NUL) instead of answering False."""
    p = paths.given(arg)
    try:
        with paths.remote_errors(arg):
            is_file = p.is_file()
    except InputError:  # a bucket's failure (remote_errors)
        raise
    except (OSError, ValueError):
        is_file = False
    if is_file:
        for rec in read_fasta(arg if paths.is_remote(arg) else p):
            return rec.sequence.upper()
        raise DMSError(f"{arg}: no FASTA record for the wild-type sequence")
    seq = "".join(arg.split()).upper()
    try:
        encode(seq)
    except TokenizeError as e:
        raise DMSError(f"--wt-sequence: {e} (neither a file nor a protein sequence)") from None
    return seq


def _fitness(text: str, where: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise DMSError(f"{where}: fitness {text!r} is not a number") from None


def read_dms_fasta(path: str | Path, wt: str | None = None, offset: int = 1) -> DMS:
    """The ``>index|<name>_<mutant>|<fitness>`` FASTA layout (fair-esm ``P62593.fasta``)."""
    path = str(path)
    records = []  # (line, name, mutations, fitness, sequence)
    skipped: Counter[str] = Counter()
    for rec in read_fasta(path):
        where = f"{path}:{rec.line}"
        fields = rec.id.split("|")
        if len(fields) < 3:
            raise DMSError(f"{where}: header {rec.id!r} is not index|name_mutant|fitness")
        name = fields[1].rsplit("_", 1)[-1]
        fitness = _fitness(fields[2], where)
        muts = parse_mutant(name, offset, where)
        if any(m.mt == "*" for m in muts):
            skipped["stop codon"] += 1
            continue
        if math.isnan(fitness):
            skipped["no fitness"] += 1
            continue
        records.append((rec.line, name, muts, fitness, rec.sequence.upper()))
    if not records:
        raise DMSError(f"{path}: no scorable variant records")
    source = "given"
    if wt is None:
        source = "derived"
        wt = Counter(
            apply_mutations(seq, muts, "wt") for _, _, muts, _, seq in records
        ).most_common(1)[0][0]
    variants = []
    for line, name, muts, fitness, seq in records:
        where = f"{path}:{line}"
        v = Variant(name, muts, fitness, line)
        check_against(wt, v, where, offset)
        if seq != apply_mutations(wt, muts, "mt"):
            diff = [
                i + offset
                for i, (a, b) in enumerate(zip(seq, apply_mutations(wt, muts, "mt")))
                if a != b
            ]
            raise DMSError(
                f"{where}: mutant {name}: the record's sequence is not the wild type with {name} "
                f"applied (length {len(seq)} vs {len(wt)}; differs at {diff[:5]})"
            )
        variants.append(v)
    return DMS(path, wt, source, variants, dict(skipped))


def read_dms_csv(
    path: str | Path,
    wt: str,
    offset: int = 1,
    mutant_column: str = "mutant",
    score_column: str = "score",
) -> DMS:
    """A CSV with a header naming ``mutant_column`` and ``score_column``; ``wt`` is required."""
    path = str(path)
    skipped: Counter[str] = Counter()
    variants = []
    try:
        variants = _dms_rows(path, wt, offset, mutant_column, score_column, skipped)
    except UnicodeDecodeError as e:  # a binary file given by mistake
        raise DMSError(
            f"{path}: not a text file, expected a CSV (byte {e.start} is not UTF-8)"
        ) from None
    if not variants:
        raise DMSError(f"{path}: no scorable variant rows")
    return DMS(path, wt, "given", variants, dict(skipped))


def _dms_rows(
    path: str, wt: str, offset: int, mutant_column: str, score_column: str, skipped: Counter
) -> list:
    variants = []
    with paths.remote_errors(path), paths.open_read(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in (mutant_column, score_column) if c not in (reader.fieldnames or [])]
        if missing:
            raise DMSError(f"{path}:1: header {reader.fieldnames} lacks column(s) {missing}")
        for row in reader:
            line = reader.line_num
            where = f"{path}:{line}"
            name = (row[mutant_column] or "").strip()
            raw = (row[score_column] or "").strip()
            if not name:
                raise DMSError(f"{where}: empty mutant")
            muts = parse_mutant(name, offset, where)
            if any(m.mt == "*" for m in muts):
                skipped["stop codon"] += 1
                continue
            if raw == "" or raw.lower() == "nan":
                skipped["no fitness"] += 1
                continue
            v = Variant(name, muts, _fitness(raw, where), line)
            check_against(wt, v, where, offset)
            variants.append(v)
    return variants


def read_dms(
    path: str | Path,
    wt: str | None = None,
    offset: int = 1,
    mutant_column: str = "mutant",
    score_column: str = "score",
) -> DMS:
    """Reads either layout; a file whose first non-blank character is ``>`` is the FASTA layout."""
    p = paths.given(path)
    with paths.remote_errors(path):
        if not p.is_file():
            raise DMSError(f"{path}: no such file")
        with p.open("rb") as f:
            head = f.read(4096).lstrip()
    if paths.is_remote(path):
        p = str(p)  # the readers take the URL itself
    if head.startswith(b">"):
        return read_dms_fasta(p, wt, offset)
    if wt is None:
        raise DMSError(f"{path}: a CSV scan needs --wt-sequence")
    return read_dms_csv(p, wt, offset, mutant_column, score_column)


def masked_marginal_scores(
    engine: Engine, wt: str, variants: Sequence[Variant], max_tokens: int = 8192, progress=None
) -> np.ndarray:
    """[V] masked-marginal score of each variant (Meier et al. 2021, eq. 1), uncropped."""
    return marginal_scores(engine, wt, variants, True, None, max_tokens, progress)


def optimal_window(position: int, length: int, window: int) -> tuple[int, int]:
    """ProteinGym's ``get_optimal_window``: [start, end) of a ``window`` crop around
    ``position``."""
    half = window // 2
    if length <= window:
        return 0, length
    if position < half:
        return 0, window
    if position >= length - half:
        return length - window, length
    return max(0, position - half), min(length, position + half)


def _position_logprobs(
    engine: Engine,
    wt: str,
    positions: Sequence[int],
    window: int | None,
    masked: bool,
    max_tokens: int,
    progress=None,
) -> dict[int, np.ndarray]:
    """{position: [V] log-probabilities} at each position of the wild type (masked or not);
    ``window=None``: the whole wild type, uncropped."""
    sequences, queries = windowed_queries([wt], [positions], window)
    if masked:
        logp = masked_logprobs(engine, sequences, queries, max_tokens, progress)
    else:
        logp = _unmasked_logprobs(engine, sequences, queries)
    return dict(zip(positions, logp))


def windowed_queries(
    sequences: Sequence[str], positions: Sequence[Sequence[int]], window: int | None
) -> tuple[list[str], list[MaskedQuery]]:
    """The crops to run and one query per ``positions[s]`` of each ``sequences[s]``, in that
    order: with ``window``, each position in its ``optimal_window`` crop (ProteinGym, ESM-1v);
    ``None``, the whole sequence. Crops are shared by the positions that fall in the same one
    (one character per residue: FASTA records)."""
    crops: dict[tuple[int, int, int], int] = {}
    queries = []
    for s, (seq, wanted) in enumerate(zip(sequences, positions)):
        for p in wanted:
            start, end = optimal_window(p, len(seq), window) if window else (0, len(seq))
            queries.append(MaskedQuery(crops.setdefault((s, start, end), len(crops)), p - start))
    return [sequences[s][a:b] for (s, a, b) in crops], queries


@dataclass
class MaskedScan:
    """Every residue of each sequence masked in turn: per sequence its [L, V] log-probabilities
    (row i: residue i masked), and the tokens of the batches that ran (for a job's figures)."""

    logprobs: list[np.ndarray]
    tokens: int
    padded_tokens: int


def masked_scan(
    engine: Engine,
    sequences: Sequence[str],
    window: int | None = None,
    max_tokens: int = 8192,
    progress=None,
) -> MaskedScan:
    """One forward pass per residue of every sequence, batched across sequences: what
    pseudo-perplexity reads the wild-type column of and masked marginals every amino acid's."""
    lengths = [len(encode(seq)) for seq in sequences]
    crops, queries = windowed_queries(sequences, [range(n) for n in lengths], window)
    logp = masked_logprobs(engine, crops, queries, max_tokens, progress)
    # the padded batches masked_logprobs ran: one row per query, of its crop's width
    crop_widths = [len(encode(c)) + 2 for c in crops]  # +2: BOS, EOS
    widths = [crop_widths[q.seq] for q in queries]
    buckets = bucketed(widths, max_tokens, engine.row_multiple, fit_rows=True)
    padded = sum(width * rows for width, rows, _ in buckets)
    per_seq = np.split(logp, np.cumsum(lengths)[:-1]) if lengths else []
    return MaskedScan(per_seq, sum(widths), padded)


def full_logprobs(engine: Engine, tokens: np.ndarray) -> np.ndarray:
    """[R, T, V] log-probabilities at every position of unmasked rows (one forward pass)."""
    from esmjax.models.alphabet import PAD

    r = len(tokens)
    return np.asarray(engine.logprobs(engine.pad_rows(tokens, PAD)))[:r]


def _unmasked_logprobs(
    engine: Engine, sequences: Sequence[str], queries: Sequence[MaskedQuery]
) -> np.ndarray:
    """[Q, V] log-probabilities at query positions of unmasked sequences: one pass per crop."""
    from esmjax.models.alphabet import encode_with_specials

    out = np.zeros((len(queries), engine.cfg.vocab_size), np.float32)
    for s, seq in enumerate(sequences):
        logp = full_logprobs(engine, np.asarray([encode_with_specials(seq)], np.int32))[0]
        for i, q in enumerate(queries):
            if q.seq == s:
                out[i] = logp[q.position + 1]  # +1: BOS
    return out


def marginal_scores(
    engine: Engine,
    wt: str,
    variants: Sequence[Variant],
    masked: bool = True,
    window: int | None = None,
    max_tokens: int = 8192,
    progress=None,
) -> np.ndarray:
    """[V] masked-marginal (``masked``; Meier et al. 2021, eq. 1) or wild-type-marginal log-odds
    of each variant; with ``window`` each position is scored in a ``window``-residue crop
    (ESM-1v / ProteinGym)."""
    positions = sorted({m.position for v in variants for m in v.mutations})
    logp = _position_logprobs(engine, wt, positions, window, masked, max_tokens, progress)
    scores = np.zeros(len(variants), np.float64)
    for k, v in enumerate(variants):
        for m in v.mutations:
            lp = logp[m.position]
            scores[k] += float(lp[TOKEN_TO_ID[m.mt]]) - float(lp[TOKEN_TO_ID[m.wt]])
    return scores


def exact(x: float) -> str:
    """``x`` as the shortest text that reads back as the same float64 (``repr``; a float32 is
    widened exactly first). The per-variant score files are written with it: 6 decimals tied
    distinct scores (6,987 -> 6,982 distinct values on one ProteinGym assay), so ProteinGym's own
    scripts run on the file ranked them otherwise and disagreed with esmjax's figures."""
    return repr(float(x))


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (ties get average ranks); NaN when either side is constant."""
    from scipy.stats import spearmanr

    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(x) < 2 or np.all(x == x[0]) or np.all(y == y[0]):
        return float("nan")
    return float(spearmanr(x, y).statistic)
