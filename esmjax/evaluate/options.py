"""The typed options of each ``esmjax evaluate`` job: built from the command line by
``esmjax.commands.evaluate`` (``esmjax.inference.options.from_args``) and from a suite section
(``from_section``) by ``evaluate all``.

A field's ``choices`` (its metadata) are the constants that define them in the library; a suite
section is checked in the command line's words (``unrecognized arguments: --bogus 1``, ``the
following arguments are required: --dms``), so a section reads as the subcommand's options.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from esmjax.config import DTYPES, RULE_PRESETS
from esmjax.errors import InputError
from esmjax.inference.options import VARIANT_METHODS, choice
from esmjax.io.checkpoint import Checkpoint
from esmjax.io.structures import SEQUENCE_MODES


@dataclass(frozen=True, kw_only=True)
class Options:
    """What every evaluation restores and where it reports."""

    checkpoint: Checkpoint  # its requested_step: the step to restore (default: latest complete)
    out: str | None = None
    plot: bool = False
    dtype: str = choice("float32", DTYPES)
    rules: str = choice("fsdp", RULE_PRESETS)
    progress: bool = True
    # The command's distributed start-up, run by ``jobs.restore`` once the evaluation has checked
    # its inputs: a bad input is then the only line printed, even where starting takes minutes.
    start: Callable[[], None] | None = None


# What a suite section may set of the evaluation-wide options (the rest come from `evaluate all`).
SECTION_SETTINGS = ("plot", "dtype", "rules")


@dataclass(frozen=True, kw_only=True)
class PerplexityOptions:
    data: str | None = None  # dataset folder (validation split) or FASTA; None: the run's held-out
    rows: int = 32  # global packed rows per batch (rounded up to the devices)
    seq_len: int | None = None
    eval_tokens: int | None = None
    pseudo: bool = False  # also pseudo-perplexity (FASTA data only)
    max_sequences: int = 0
    max_tokens_per_batch: int = 8192


@dataclass(frozen=True, kw_only=True)
class ContactsOptions:
    structures: tuple[str, ...]
    fit: tuple[str, ...] | None = None  # fit the contact regression on these first
    save: str | None = None  # where a fitted head's checkpoint goes
    fit_c: float | None = None
    sequence: str = choice("seqres", SEQUENCE_MODES)


@dataclass(frozen=True, kw_only=True)
class ProteinGymOptions:
    folder: str  # ProteinGym substitutions folder (per-assay CSVs)
    reference: str | None = None  # DMS_substitutions.csv [default: <folder>/DMS_substitutions.csv]
    assays: tuple[str, ...] | None = None
    method: str = choice("masked-marginals", VARIANT_METHODS)
    window: int = 1022
    skip_invalid: bool = False
    max_tokens_per_batch: int = 8192


@dataclass(frozen=True, kw_only=True)
class VariantsOptions:
    dms: str
    wt_sequence: str | None = None
    offset: int = 1
    mutant_column: str = "mutant"
    score_column: str = "score"
    sample: int = 0
    max_tokens_per_batch: int = 8192


@dataclass(frozen=True, kw_only=True)
class StructuresOptions:
    out: str
    predicted: tuple[str, ...] | None = None
    reference: tuple[str, ...] | None = None
    pairs: str | None = None  # TSV 'predicted<TAB>reference' per line instead of matching
    plot: bool = False
    progress: bool = True


JOBS: dict[str, type] = {
    "perplexity": PerplexityOptions,
    "contacts": ContactsOptions,
    "variants": VariantsOptions,
    "proteingym": ProteinGymOptions,
    "structures": StructuresOptions,
}


# --------------------------------------------------------------------------------------------------
# A suite section -> options
# --------------------------------------------------------------------------------------------------
def flag(key: str) -> str:
    """A section key as the command line's option (``max_tokens_per_batch`` ->
    ``--max-tokens-per-batch``)."""
    return "--" + key.replace("_", "-")


def flags(options: dict[str, Any]) -> list[str]:
    """Section options as the command line writes them (``--key value``, lists expanded, flags)."""
    argv = []
    for key, value in options.items():
        if value is True:
            argv.append(flag(key))
        elif value is False or value is None:
            continue
        elif isinstance(value, list):
            argv += [flag(key), *(str(v) for v in value)]
        else:
            argv += [flag(key), str(value)]
    return argv


@dataclass(frozen=True)
class Key:
    """A key a suite section may hold: a field's type, its choices, whether it must be given."""

    type: Any
    choices: tuple[str, ...] = ()
    required: bool = False


def keys(cls: type, names: typing.Iterable[str] | None = None, *, required: bool = True) -> dict:
    """``{name: Key}`` of the fields of the options class ``cls`` (``names``: only these);
    ``required=False``: none of them must be given."""
    hints = typing.get_type_hints(cls)
    return {
        f.name: Key(
            hints[f.name],
            f.metadata.get("choices", ()),
            required and f.default is dataclasses.MISSING,
        )
        for f in dataclasses.fields(cls)
        if names is None or f.name in names
    }


def from_section(section: dict[str, Any], where: str, known: dict[str, Key]) -> dict[str, Any]:
    """The values a suite section gives the ``known`` keys, each converted to its type and checked
    against its choices; an unknown key, a missing required one or a bad value is one line
    starting with ``where``. A ``None`` or ``False`` value is left out, as an option not given."""
    given = {k: v for k, v in section.items() if v is not None and v is not False}
    try:  # in argparse's order: the values, then what is missing, then what is unknown
        values = {k: _value(k, known[k], v) for k, v in given.items() if k in known}
    except InputError as e:
        raise InputError(f"{where}: {e}") from None
    missing = [flag(k) for k, key in known.items() if key.required and k not in given]
    if missing:
        raise InputError(f"{where}: the following arguments are required: {', '.join(missing)}")
    unknown = flags({k: v for k, v in section.items() if k not in known})
    if unknown:
        raise InputError(f"{where}: unrecognized arguments: {' '.join(unknown)}")
    return values


def _value(name: str, key: Key, value: Any) -> Any:
    """One section value as the key's type (argparse's words for a bad one)."""
    opt = flag(name)
    tp = key.type
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    if tp is bool:
        if value is not True:
            raise InputError(f"argument {opt}: a flag takes true or false, not {value!r}")
        return True
    if typing.get_origin(tp) is tuple:
        items = value if isinstance(value, list) else [value]
        if not items:
            raise InputError(f"argument {opt}: expected at least one argument")
        return tuple(str(v) for v in items)
    if value is True or isinstance(value, (list, dict)):
        raise InputError(f"argument {opt}: expected one argument")
    text = str(value)
    if tp in (int, float):
        try:
            return tp(text)
        except ValueError:
            raise InputError(f"argument {opt}: invalid {tp.__name__} value: {text!r}") from None
    if key.choices and text not in key.choices:
        listed = ", ".join(repr(c) for c in key.choices)
        raise InputError(f"argument {opt}: invalid choice: {text!r} (choose from {listed})")
    return text
