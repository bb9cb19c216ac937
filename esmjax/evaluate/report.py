"""Evaluation reports: one JSON file per command (what was evaluated, and the numbers) and a printed
table.

Every report records the checkpoint folder, the step restored, the config hash
(``esmjax.config.config_hash`` of the run's TrainConfig for a training workdir, of the ESM2Config
for converted weights), the device and process count, the esmjax version and the time, so numbers
from different runs can be told apart.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import jax

from esmjax.config import ESM2Config, TrainConfig, config_hash, from_dict
from esmjax.errors import InputError
from esmjax.io import checkpoint, paths


def checkpoint_info(ckpt: checkpoint.Checkpoint, step: int) -> dict[str, Any]:
    """Provenance of a restored checkpoint for the report header."""
    raw = ckpt.config
    train_keys = {f.name for f in dataclasses.fields(TrainConfig)}
    if set(raw) & (train_keys - {"model"}):  # a training workdir stores its whole TrainConfig
        kind, digest = (
            "train",
            config_hash(from_dict(TrainConfig, {k: v for k, v in raw.items() if k in train_keys})),
        )
    else:
        kind, digest = "model", config_hash(from_dict(ESM2Config, raw["model"], "model"))
    info = {
        "checkpoint": str(paths.path(ckpt.path)),  # absolute, or the bucket URL
        "step": int(step),
        "config_hash": digest,
        "config_kind": kind,
        "model": raw["model"],
    }
    for key in ("source", "contact_regression"):  # written by `evaluate contacts --fit`
        if key in raw:
            info[key] = raw[key]
    return info


def _version() -> str:
    try:
        return metadata.version("esmjax")
    except metadata.PackageNotFoundError:
        return "unknown"


def build(
    command: str, info: dict[str, Any], results: dict[str, Any], **settings: Any
) -> dict[str, Any]:
    return {
        "command": f"evaluate {command}",
        **info,
        "settings": settings,
        "results": results,
        "devices": jax.device_count(),
        "processes": jax.process_count(),
        "esmjax_version": _version(),
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def clean(x: Any) -> Any:
    """NaN/inf as null (strict JSON), numpy scalars as Python numbers."""
    if isinstance(x, dict):
        return {str(k): clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [clean(v) for v in x]
    if hasattr(x, "item") and not isinstance(x, (str, bytes)):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def write(report: dict[str, Any], path: str | Path) -> Path:
    """Writes the report atomically (process 0 only in multi-process runs); into a bucket
    (``gs://``, ``s3://``) through epath, where an object appears whole or not at all."""
    if paths.is_remote(path):
        if jax.process_index() == 0:
            with paths.remote_errors(path):
                paths.path(path).write_text(json.dumps(clean(report), indent=2) + "\n")
        return paths.path(path)
    path = Path(path)
    if jax.process_index() != 0:
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(clean(report), indent=2) + "\n")
        os.replace(tmp, path)
    except OSError as e:
        raise InputError(f"cannot write the report {path}: {e.strerror or e}") from None
    return path


def default_out_dir(checkpoint_path: str | Path, step: int) -> Path:
    """``<checkpoint>/eval/step_<N>``: reports sit next to the checkpoint they describe."""
    if paths.is_remote(checkpoint_path):
        return paths.path(checkpoint_path) / "eval" / f"step_{step}"
    return Path(checkpoint_path) / "eval" / f"step_{step}"


def fmt(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 3) -> str:
    """A plain aligned text table (numbers right-aligned)."""
    cells = [[fmt(c, digits) for c in r] for r in rows]
    widths = [
        max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)
    ]
    numeric = [
        all(isinstance(r[i], (int, float)) or r[i] is None for r in rows)
        for i in range(len(headers))
    ]

    def line(values: Sequence[str]) -> str:
        return "  ".join(
            v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)
        ).rstrip()

    out = [line(headers), line(["-" * w for w in widths])]
    out += [line(r) for r in cells]
    return "\n".join(out)


def header(info: dict[str, Any]) -> str:
    return f"checkpoint {info['checkpoint']}  step {info['step']}  config {info['config_hash']}"
