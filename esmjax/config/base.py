"""``ConfigError``, and the key prefix that lets a dataclass check name its full key
(``model.num_heads``)."""

from __future__ import annotations

import contextvars

from esmjax.errors import InputError


class ConfigError(InputError):
    """A config file, override or field value that does not fit the dataclasses."""


# The key prefix of the dataclass ``from_dict`` is building (``model``, ``mesh``...), so that
# ``__post_init__`` checks name the full key, e.g. ``model.num_heads``.
_WHERE: contextvars.ContextVar[str] = contextvars.ContextVar("esmjax_config_where", default="")


def _key(name: str) -> str:
    where = _WHERE.get()
    return f"{where}.{name}" if where else name
