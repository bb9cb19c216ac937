"""Conversions in and out of esmjax checkpoints: the one entry point for ``esmjax convert`` and
``esmjax export``, dispatching on the source kind (ESM-2: ``convert_esm2``; ESMFold:
``convert_esmfold``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
import numpy as np

from esmjax.config import EXPORT_FORMATS, ESM2Config, check_same_architecture
from esmjax.errors import InputError
from esmjax.io import checkpoint, convert_esm2, convert_esmfold, hub, paths
from esmjax.models.esm2 import abstract_model
from esmjax.parallel import sharding as shd

log = logging.getLogger("esmjax.io.convert")


def convert(src: str | Path, out: str | Path, esm: str | Path | None = None) -> str:
    """fair-esm ``.pt`` / HF folder (ESM-2 or ESMFold) -> an esmjax checkpoint folder; returns a
    one-line summary. ``esm`` is the ESM-2 that a fair-esm ESMFold ``.pt`` folds with. ``src`` and
    ``esm`` may be bucket URLs: they are downloaded to a temporary folder first
    (``paths.local_input``); ``out`` may be one too (``checkpoint.save_converted``). A fair-esm
    name or HF hub id (``src``, ``esm``) is downloaded into its cache first (``hub.source``)."""
    if esm is not None and hub.is_name(esm):
        esm = hub.source(str(esm))
    if hub.is_name(src):
        return _convert(hub.source(str(src)), str(src), out, esm)
    with paths.local_input(src, siblings=_fairesm_siblings(src)) as local:
        if not local.exists():
            raise InputError(f"{src}: no such file or folder")
        return _convert(local, str(src), out, esm)


def checkpoint_folder(spec: str) -> str:
    """``--checkpoint``'s value as a folder: a path or bucket URL as given; a released model's name
    (``hub.is_name``) is downloaded and converted into the model cache on first use."""
    if not hub.is_name(spec):
        return spec
    folder = hub.cached_checkpoint(spec)
    if not (folder / checkpoint.CONFIG_FILE).exists():  # save_converted writes it last
        with hub.exclusive(folder.with_name(folder.name + ".lock")):
            if not (folder / checkpoint.CONFIG_FILE).exists():
                log.info("%s", convert(spec, folder))
    return str(folder)


def named_source(src: str | Path) -> str | Path:
    """What ``train --init-from`` / ``finetune``'s ``backbone`` read for a released model's name
    (``hub.is_name``): its esmjax conversion where ``esmjax convert NAME`` made one, else the
    downloaded fair-esm ``.pt`` or HF snapshot, read as it is. Not converted here: a training run
    reads its source before and after ``jax.distributed``'s start-up, and a conversion saves with
    Orbax, which would start JAX's backend first. Anything else is returned as given."""
    if not hub.is_name(src):
        return src
    converted = hub.cached_checkpoint(str(src))
    if (converted / checkpoint.CONFIG_FILE).exists():
        return converted
    return hub.source(str(src))


def _convert(src: Path, name: str, out: str | Path, esm: str | Path | None) -> str:
    if convert_esmfold.is_esmfold_source(src):
        return convert_esmfold.convert_source(src, out, esm, name=name)
    if esm is not None:
        raise InputError("--esm applies to ESMFold checkpoints only")
    if (
        src.is_dir()
        and (src / checkpoint.CONFIG_FILE).exists()
        and not (src / "model.safetensors").exists()
        and (src / checkpoint.STEPS_DIR).is_dir()
    ):
        # every command reads an esmjax folder as it is; export turns one into other formats
        raise InputError(
            f"{name} is already an esmjax checkpoint or run; convert reads fair-esm .pt files and "
            "HF folders (esmjax export writes those)"
        )
    cfg, params, notes = convert_esm2.read_any(src)
    for n in notes:
        log.warning("%s", n)
    with paths.write_errors(out):  # a full disk: one line (save_converted leaves no partial folder)
        checkpoint.save_converted(out, cfg, params, extra={"source": name})
    return (
        f"wrote {out}: ESM-2 with {cfg.num_layers} layers, width {cfg.embed_dim}, "
        f"{cfg.num_heads} heads ({cfg.num_params() / 1e6:.2f}M parameters)"
    )


def export(
    ckpt: str | Path,
    out: str | Path,
    to: str,
    step: int | None = None,
    folding_head: str | Path | None = None,
) -> str:
    """An esmjax checkpoint (or a training workdir's step) -> fair-esm ``.pt``, an HF folder, or
    an ESMFold checkpoint with ``folding_head``'s trunk; returns a one-line summary.

    ``out`` may be a bucket URL: the files are written to a temporary folder and uploaded
    (``paths.local_output``), one object each, an HF folder's ``config.json`` last; an ESMFold
    export is written by ``checkpoint.save_converted``, ``config.json`` last as well."""
    if to not in EXPORT_FORMATS:
        raise InputError(f"--to {to!r}: one of {', '.join(EXPORT_FORMATS)}")
    check_export_target(out, to)
    if to == "esmfold":
        return convert_esmfold.assemble(ckpt, out, folding_head, step)
    name = paths.path(out).name
    model, step = checkpoint.load_model(ckpt, step=step)
    params = checkpoint.params_numpy(model)
    with paths.local_output(out, last="config.json") as local:
        if to == "fair-esm":
            if not name.startswith("esm2"):
                log.warning(
                    "fair-esm loads a local file as ESM-2 only when its name starts with 'esm2'"
                )
            local.parent.mkdir(parents=True, exist_ok=True)
            convert_esm2.write_fairesm(params, model.cfg, local)
        else:
            convert_esm2.write_hf(params, model.cfg, local)
    return f"wrote {out} from step {step}"


def check_export_target(out: str | Path, to: str) -> None:
    """An export goes to a new place, a fair-esm one to a ``.pt`` file."""
    if paths.nonempty(out):
        raise InputError(f"{out} exists; refusing to overwrite")
    if to == "fair-esm" and not paths.path(out).name.endswith(".pt"):
        raise InputError("a fair-esm export is a .pt file; name it e.g. esm2_t6_8M_mine.pt")


# --------------------------------------------------------------------------------------------------
# Weights a run starts from (``esmjax train --init-from``, ``esmjax finetune`` backbones)
# --------------------------------------------------------------------------------------------------
def is_esmjax_folder(src: str | Path) -> bool:
    """An esmjax checkpoint or training workdir (``config.json`` with a ``model`` section and
    ``checkpoints/``), as opposed to an HF folder (whose ``config.json`` says ``model_type``).
    ``src`` may be a bucket URL."""
    p = paths.given(src)
    with paths.remote_errors(src):
        return p.is_dir() and (p / checkpoint.STEPS_DIR).is_dir() and (p / "config.json").exists()


def _existing_source(src: str | Path) -> None:
    with paths.remote_errors(src):
        found = paths.given(src).exists()
    if not found:
        raise InputError(f"{src}: no such checkpoint file or folder")


def _fairesm_siblings(src: str | Path) -> list[str]:
    """The file next to a fair-esm ``.pt`` that ``read_fairesm`` merges (its contact head)."""
    return [paths.path(src).name.removesuffix(".pt") + "-contact-regression.pt"]


def source_model_config(src: str | Path) -> ESM2Config:
    """The ESM-2 config of a fair-esm ``.pt``, an HF folder, an esmjax checkpoint or workdir; a
    bucket URL is read in place (esmjax) or downloaded to a temporary folder first (``.pt``, HF);
    a released model's name through ``named_source``."""
    src = named_source(src)
    _existing_source(src)
    if is_esmjax_folder(src):
        return checkpoint.open(src).model_config
    with paths.local_input(src, siblings=_fairesm_siblings(src)) as local:
        return convert_esm2.read_any(local)[0]


def load_source_params(
    src: str | Path,
    cfg: ESM2Config,
    mesh: jax.sharding.Mesh,
    rules: shd.Rules,
    step: int | None = None,
) -> tuple[dict[str, Any], str]:
    """The ESM-2 variables (pure dict, sharded onto ``mesh`` by ``rules``) of ``src`` for a model
    of config ``cfg`` (whose architecture must be the source's), and a one-line description.

    A fair-esm ``.pt`` or HF folder is read on the host (no code from the file runs; from a bucket,
    downloaded to a temporary folder first) and placed; an esmjax checkpoint or workdir is restored
    by Orbax straight into the shardings (its latest complete step, or ``step``), from a bucket
    too. A released model's name is read through ``named_source``."""
    src = named_source(src)
    _existing_source(src)
    graphdef, abstract = abstract_model(cfg)
    if is_esmjax_folder(src):
        check_same_architecture(cfg, checkpoint.open(src).model_config, str(src))
        model, got = checkpoint.restore_params(src, graphdef, abstract, step, mesh, rules)
        return checkpoint.nnx_pure_dict(model), f"{src} (esmjax, step {got})"
    with paths.local_input(src, siblings=_fairesm_siblings(src)) as local:
        src_cfg, params, notes = convert_esm2.read_any(local)
        kind = "HF" if local.is_dir() else "fair-esm"
    check_same_architecture(cfg, src_cfg, str(src))
    if step is not None:
        raise InputError(f"init_step applies to esmjax checkpoints only, not {src}")
    for n in notes:
        log.warning("%s", n)
    reference = abstract.to_pure_dict()
    shardings = checkpoint.pure_dict_shardings(abstract, mesh, rules)
    params = jax.tree.map(
        lambda a, ref, s: jax.device_put(np.asarray(a, ref.dtype), s), params, reference, shardings
    )
    return params, f"{src} ({kind})"
