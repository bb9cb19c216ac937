"""``ConfigError``, and the key prefix that lets a dataclass check name its full key
(``model.num_heads``)."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Iterator
from typing import Any

from esmjax.errors import InputError


class ConfigError(InputError):
    """A config file, override or field value that does not fit the dataclasses."""


# The key prefix of the dataclass ``from_dict`` is building (``model``, ``mesh``...), so that
# ``__post_init__`` checks name the full key, e.g. ``model.num_heads``.
_WHERE: contextvars.ContextVar[str] = contextvars.ContextVar("esmjax_config_where", default="")


@contextlib.contextmanager
def section(where: str) -> Iterator[None]:
    """The dataclass checks inside name their keys under ``where`` (``full_key``)."""
    token = _WHERE.set(where)
    try:
        yield
    finally:
        _WHERE.reset(token)


def full_key(name: str) -> str:
    """``name`` under the section being built: ``num_heads`` -> ``model.num_heads``."""
    where = _WHERE.get()
    return f"{where}.{name}" if where else name


def check(obj: Any, name: str, ok: bool, want: str) -> None:
    """Unless ``ok``, a ``ConfigError`` naming the key (``data.seq_len: must be >= 3, got 0``)."""
    if not ok:
        raise ConfigError(f"{full_key(name)}: must be {want}, got {getattr(obj, name)!r}")


def check_finite(obj: Any) -> None:
    """Every float field of the dataclass ``obj`` is a finite number (YAML reads ``.nan``)."""
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"{full_key(f.name)}: must be a finite number, got {v}")
