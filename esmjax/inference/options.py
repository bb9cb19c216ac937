"""The typed options of ``esmjax embed``, ``fold`` and ``predict`` (frozen dataclasses), and how a
command line or a suite builds options: ``from_args`` (a parsed command line) and ``choice`` (a
field whose values the library defines; the command line offers them and a suite section checks
them)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from esmjax.config import DTYPES, EXPORT_FORMATS
from esmjax.errors import InputError

INCLUDE_CHOICES = ("per_tok", "mean", "bos", "logits", "contacts")  # what `esmjax embed` writes
# npz: one <id>.npz of arrays per record; fair-esm: one <label>.pt as fair-esm's esm-extract writes
EXPORT_TARGETS = (*EXPORT_FORMATS, "peft")  # what `esmjax export` writes
VARIANT_METHODS = ("masked-marginals", "wt-marginals", "pll")  # how ProteinGym variants score
# auto: npz for at most inputs.AUTO_SHARDS_ABOVE records, shards above; shards: one Parquet file per
# work unit (esmjax.inference.shards)
EMBED_FORMATS = ("auto", "shards", "npz", "fair-esm")
FOLD_FORMATS = ("auto", "shards", "files")  # files: <id>.pdb + <id>.json per record


@dataclass(frozen=True, kw_only=True)
class JobOptions:
    """How an inference job reads its input and shares it (``esmjax.inference.units``)."""

    fasta: str | tuple[str, ...]  # one FASTA or several, read in order
    out: str
    unit_size: int = 1000  # records per work unit (one shard)
    skip_invalid: bool = False  # count and skip invalid records instead of stopping
    process_id: int | None = None  # default: the launcher's variables (units.worker)
    num_processes: int | None = None
    unknown_as_x: bool = False
    progress: bool = True

    def __post_init__(self):
        if self.unit_size < 1:
            raise InputError(f"--unit-size must be positive, got {self.unit_size}")

    @property
    def inputs(self) -> tuple[str, ...]:
        return (self.fasta,) if isinstance(self.fasta, str) else tuple(self.fasta)


def choice(default: str, choices: Iterable[str]) -> Any:
    """A field whose values are ``choices``."""
    return dataclasses.field(default=default, metadata={"choices": tuple(choices)})


def from_args(cls: type, args: Any, **given: Any) -> Any:
    """``cls`` from a parsed command line: each field from the argument of its name (a list as a
    tuple), ``given`` over them."""
    fields = [f.name for f in dataclasses.fields(cls) if hasattr(args, f.name)]
    values = {k: getattr(args, k) for k in fields}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return cls(**{**values, **given})


@dataclass(frozen=True, kw_only=True)
class EmbedOptions(JobOptions):
    """What ``esmjax embed`` reads, where it writes, and what."""

    step: int | None = None  # the checkpoint's step (default: the latest)
    layers: str = "-1"  # layer indices (negatives from the end) or "all"
    include: tuple[str, ...] = ("mean",)  # of INCLUDE_CHOICES
    format: str = choice("auto", EMBED_FORMATS)
    dtype: str = choice("float32", DTYPES)
    max_tokens_per_batch: int = 4096
    truncation_seq_length: int = 1022  # residues kept per record (0 = all)


@dataclass(frozen=True, kw_only=True)
class FoldOptions(JobOptions):
    """What ``esmjax fold`` folds, where it writes, and how."""

    unit_size: int = 100  # a fold is slow: smaller units lose less to a preemption
    format: str = choice("auto", FOLD_FORMATS)
    num_recycles: int | None = None  # extra trunk passes (default: the model's max_recycles)
    chunk_size: int | None = None  # row chunk of the triangle attentions
    max_tokens_per_batch: int = 1024
    dtype: str = choice("float32", DTYPES)  # the language model's (the trunk is float32)
    mmcif: bool = False
    max_length: int = 4096


# auto: one file for an --out ending in a PREDICT_FILE_SUFFIXES suffix, a job folder otherwise
PREDICT_FORMATS = ("auto", "shards")
PREDICT_FILE_SUFFIXES = (".csv", ".jsonl")


@dataclass(frozen=True, kw_only=True)
class PredictOptions(JobOptions):
    """What ``esmjax predict`` predicts and where it writes."""

    step: int | None = None  # the run's step (default: its best)
    format: str = choice("auto", PREDICT_FORMATS)
    max_tokens_per_batch: int = 8192
    # predict computes in the run's dtype (it has no --dtype): set from the run for job.json
    dtype: str | None = None

    @property
    def writes_file(self) -> bool:
        """One ``.csv``/``.jsonl`` file (not a job of work units)."""
        return self.format == "auto" and str(self.out).endswith(PREDICT_FILE_SUFFIXES)


def add_job_arguments(p: Any, unit_size: int, what: str | None) -> None:
    """The options every inference job takes (``esmjax.inference.units``); ``what`` names the
    per-record files of the per-record format (None: shards only)."""
    p.add_argument(
        "--fasta",
        required=True,
        nargs="+",
        help="input FASTA files (plain or gzip) or datasets built by `esmjax data build` (FOLDER: "
        "every split; FOLDER:train or FOLDER:validation), read in order",
    )
    p.add_argument(
        "--out",
        required=True,
        help="output folder or bucket URL: "
        + (f"{what} per record, or units/<unit>.parquet (--format shards)" if what else "")
        + (" " if what else "units/<unit>.parquet")
        + ", with job.json and done/<unit>.json; rerun the same command to resume",
    )
    p.add_argument(
        "--unit-size",
        type=int,
        default=unit_size,
        help=f"records per work unit (one shard; what a rerun redoes) [default: {unit_size}]",
    )
    p.add_argument(
        "--skip-invalid",
        action="store_true",
        help="skip invalid records (counted per unit in done/<unit>.json) instead of stopping",
    )
    p.add_argument(
        "--process-id",
        type=int,
        default=None,
        help="this process's index in a multi-process job (default: from the launcher)",
    )
    p.add_argument(
        "--num-processes", type=int, default=None, help="processes in the job (default: launcher)"
    )
    p.add_argument(
        "--unknown-as-x", action="store_true", help="read characters outside the alphabet as X"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_job(job: Any) -> int:
    """A command's exit status for the inference job ``job()``: 75 when a signal stopped it (the
    units written stay; the launchers run it again to resume), else 0."""
    import logging

    from esmjax.inference.units import EXIT_PREEMPTED, Preempted

    try:
        job()
    except Preempted:
        logging.getLogger("esmjax.inference").warning(
            "stopped by a signal: the units written are kept; run the same command to resume"
        )
        return EXIT_PREEMPTED
    return 0
