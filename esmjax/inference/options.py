"""The typed options of ``esmjax embed`` and ``esmjax fold`` (frozen dataclasses), and how a command
line or a suite builds options: ``from_args`` (a parsed command line) and ``choice`` (a field whose
values the library defines; the command line offers them and a suite section checks them)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from esmjax.config import DTYPES, EXPORT_FORMATS

INCLUDE_CHOICES = ("per_tok", "mean", "bos", "logits", "contacts")  # what `esmjax embed` writes
# npz: one <id>.npz of arrays per record; fair-esm: one <label>.pt as fair-esm's esm-extract writes
EXPORT_TARGETS = (*EXPORT_FORMATS, "peft")  # what `esmjax export` writes
VARIANT_METHODS = ("masked-marginals", "wt-marginals", "pll")  # how ProteinGym variants score
EMBED_FORMATS = ("npz", "fair-esm")


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
class EmbedOptions:
    """What ``esmjax embed`` reads, where it writes, and what."""

    fasta: str
    out: str
    step: int | None = None  # the checkpoint's step (default: the latest)
    layers: str = "-1"  # layer indices (negatives from the end) or "all"
    include: tuple[str, ...] = ("mean",)  # of INCLUDE_CHOICES
    format: str = choice("npz", EMBED_FORMATS)
    dtype: str = choice("float32", DTYPES)
    max_tokens_per_batch: int = 4096
    truncation_seq_length: int = 1022  # residues kept per record (0 = all)
    unknown_as_x: bool = False
    progress: bool = True


@dataclass(frozen=True, kw_only=True)
class FoldOptions:
    """What ``esmjax fold`` folds, where it writes, and how."""

    fasta: str
    out: str
    num_recycles: int | None = None  # extra trunk passes (default: the model's max_recycles)
    chunk_size: int | None = None  # row chunk of the triangle attentions
    max_tokens_per_batch: int = 1024
    dtype: str = choice("float32", DTYPES)  # the language model's (the trunk is float32)
    mmcif: bool = False
    max_length: int = 4096
    unknown_as_x: bool = False
    progress: bool = True
