"""Frozen dataclasses from YAML/JSON trees (``from_dict``: unknown keys rejected, leaf types
coerced, a model preset name expanded), ``--set`` paths, and back (``to_dict``, ``config_hash``)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from typing import Any

import yaml

from esmjax.config.base import ConfigError, section
from esmjax.config.model import ESM2Config, esm2_preset


# --------------------------------------------------------------------------------------------------
# Loading and dumping
# --------------------------------------------------------------------------------------------------
def config_file(path: Any) -> Any:
    """A config file the user named, local or in a bucket (``gs://``, ``s3://``): an
    ``etils.epath.Path`` (the path layer esmjax.io.paths builds on; its ``str`` is the path as
    given), checked to exist. A missing file, bucket or client is one ``ConfigError`` line."""
    from etils import epath

    try:
        p = epath.Path(str(path))
        found = p.is_file()
    except Exception as e:  # noqa: BLE001 - a missing fsspec client, auth or HTTP errors
        raise ConfigError(f"config file {path}: cannot be read ({type(e).__name__}: {e})") from None
    if not found:
        raise ConfigError(f"config file {path} does not exist")
    return p


def read_config_text(p: Any) -> str:
    """The text of a file from ``config_file``; a store failure is one ``ConfigError`` line."""
    try:
        return p.read_text()
    except Exception as e:  # noqa: BLE001 - as above
        raise ConfigError(f"config file {p}: cannot be read ({type(e).__name__}: {e})") from None


def read_yaml_mapping(path: Any) -> dict[str, Any]:
    """The mapping at the top of the YAML config file ``path`` (``config_file``); a missing file,
    bad YAML or another top level is one ``ConfigError`` line that starts with the file."""
    p = config_file(path)
    try:
        tree = yaml.safe_load(read_config_text(p)) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{p}: top level must be a mapping")
    return tree


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return _freeze(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected a boolean, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
        if f != int(f):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(f)
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        return str(value)
    if tp is tuple:
        return tuple(value) if isinstance(value, (list, tuple)) else (value,)
    return value


def _freeze(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Builds dataclass ``cls`` from a nested dict, rejecting unknown keys.

    For ``TrainConfig`` (and anything with an ``ESM2Config`` field) the model may be given as a
    preset name string, or as a mapping with a ``preset`` key plus overrides.
    """
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if cls is ESM2Config and "preset" in data:
        try:
            base = dataclasses.asdict(esm2_preset(data["preset"]))
        except ConfigError as e:
            raise ConfigError(f"{where}.preset: {e}" if where else f"preset: {e}") from None
        base.update({k: v for k, v in data.items() if k != "preset"})
        return from_dict(cls, base, where)
    if unknown:
        raise ConfigError(
            f"{where or cls.__name__}: unknown key(s) {sorted(unknown)}; allowed: {sorted(names)}"
        )
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        tp = hints[f.name]
        value = data[f.name]
        key = f"{where}.{f.name}" if where else f.name
        if tp is ESM2Config and isinstance(value, str):
            try:
                value = esm2_preset(value)
            except ConfigError as e:
                raise ConfigError(f"{key}: {e}") from None
        kwargs[f.name] = _coerce(tp, value, key)
    try:
        with section(where):
            return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where or cls.__name__}: {e}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def split_override(item: str) -> tuple[str, str]:
    """A ``--set key.path=value`` item as its key path and raw value."""
    if "=" not in item:
        raise ConfigError(f"--set expects key=value, got {item!r}")
    key, raw = item.split("=", 1)
    return key.strip(), raw.strip()


def set_path(tree: dict[str, Any], dotted: str, raw: str) -> None:
    """Sets ``tree[a][b]... = raw`` read as YAML for the key path ``a.b...``, making sections."""
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {k} is not a section")
    try:
        node[keys[-1]] = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        raise ConfigError(f"--set {dotted}: cannot read the value {raw!r}") from None


def saved_config(workdir: Any) -> Any:
    """``<workdir>/config.json``, the config of a run resumed without ``--config`` (the workdir
    may be a bucket URL, hence an ``etils.epath.Path``); a new workdir has none."""
    from etils import epath

    saved = epath.Path(str(workdir)) / "config.json"
    if not saved.exists():
        raise ConfigError("--config is required for a new workdir")
    return saved


def config_hash(cfg: Any) -> str:
    """A short stable hash of a config, recorded in reports."""
    return hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True).encode()).hexdigest()[:12]
