"""ESMFold checkpoint folders: the layout of ``esmjax.io.checkpoint`` with one more config section.

::

    DIR/config.json                {"model": {<ESM2Config of the stem>}, "esmfold": {"trunk": {...},
                                    "lddt_head_hid_dim": 128}, "source": ...}
    DIR/checkpoints/0/params       every ESMFold parameter (Orbax), ``esm.*`` holding the stem

The ``model`` section alone describes the language model, so tools that read ESM-2 configs still
can.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from esmjax.config import to_dict
from esmjax.io import checkpoint as ckpt
from esmjax.models.esmfold.config import ESMFoldConfig, from_json, to_json
from esmjax.models.esmfold.model import ESMFold
from esmjax.parallel import sharding as shd

SECTION = "esmfold"


def is_esmfold_folder(path: str | Path) -> bool:
    p = Path(path) / ckpt.CONFIG_FILE
    return p.exists() and SECTION in json.loads(p.read_text())


def read_config(path: str | Path) -> ESMFoldConfig:
    raw = ckpt.read_config(path)
    if SECTION not in raw:
        raise ckpt.CheckpointError(
            f"{path}: an ESM-2 checkpoint, not ESMFold (config.json has no '{SECTION}')"
        )
    return from_json(raw["model"], raw[SECTION])


def abstract_model(cfg: ESMFoldConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """Shapes, dtypes and logical axes of an ESMFold, without allocating it."""
    return nnx.split(nnx.eval_shape(lambda: ESMFold(cfg, rngs=nnx.Rngs(0))))


def load(
    path: str | Path, *, dtype: str | None = None, step: int | None = None
) -> tuple[ESMFold, int]:
    """Restores the ESMFold in ``path`` onto one device; ``dtype`` sets the language model's
    compute dtype."""
    cfg = read_config(path)
    if dtype is not None:
        cfg = cfg.with_esm_dtype(dtype)
    graphdef, state = abstract_model(cfg)
    return ckpt.restore_params(
        path, graphdef, state, step, shd.single_device_mesh(), shd.resolve_rules("dp")
    )


def save(
    path: str | Path,
    cfg: ESMFoldConfig,
    params: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> None:
    """Writes converted weights as step 0, atomically (a failure leaves no partial folder)."""
    config = {"model": to_dict(cfg.esm), SECTION: to_json(cfg), **(extra or {})}
    ckpt.write_params(path, config, params, abstract_model(cfg)[1])


def params_numpy(model: ESMFold) -> dict[str, Any]:
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), nnx.state(model).to_pure_dict())
