"""ESMFold weights: fair-esm ``esmfold_3B_v1.pt`` (+ the ESM-2 it loads separately), HuggingFace
``EsmForProteinFolding`` folders, and assembling an ESMFold from an esmjax ESM-2 plus a folding
head.

The folding part's esmjax parameter paths are fair-esm's state-dict keys (HF uses the same non-LM
keys), so the mapping is three rules, applied from our side so that every parameter is accounted
for:

* ``<path>.kernel`` <- ``<path>.weight`` transposed (torch Linear is ``[out, in]``); ``.scale``
  (LayerNorm) and ``.embedding`` (Embedding) <- ``.weight``; anything else (``bias``,
  ``head_weights``, ``esm_s_combine``) as is;
* ``trunk.blocks.<leaf>`` <- ``trunk.blocks.{i}.<leaf>`` stacked on a leading axis;
* ``esm.*`` (the stem) goes through ``esmjax.io.convert_esm2``'s ESM-2 table.

Files are read with ``esmjax.io.torch_pt.load_pt`` / safetensors: no code from a checkpoint ever
runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from esmjax.config import ESM2_PRESETS, ESM2Config, esm2_from_shape
from esmjax.errors import InputError
from esmjax.io import checkpoint, paths
from esmjax.io import convert_esm2 as convert
from esmjax.models.esmfold.config import ESMFoldConfig, StructureModuleConfig, TrunkConfig, from_hf
from esmjax.models.esmfold.model import AF2_TO_ESM
from esmjax.models.esmfold.model import abstract_model as esmfold_abstract_model

log = logging.getLogger("esmjax.io.convert_esm2")
ConversionError = convert.ConversionError


# --------------------------------------------------------------------------------------------------
# State dict <-> parameter tree
# --------------------------------------------------------------------------------------------------
def _flatten(tree: dict, prefix: tuple = ()) -> dict[tuple, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def _unflatten(flat: dict[tuple, Any]) -> dict:
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return tree


def torch_key(path: tuple) -> tuple[str, bool]:
    """Our parameter path -> (torch key, transpose?). ``trunk.blocks`` keys keep a ``{i}``
    placeholder."""
    *base, leaf = (str(k) for k in path)
    if base[:2] == ["trunk", "blocks"]:
        base.insert(2, "{i}")
    if leaf in ("kernel", "scale", "embedding"):
        return ".".join(base + ["weight"]), leaf == "kernel"
    return ".".join(base + [leaf]), False


def state_dict_to_params(sd: dict[str, np.ndarray], expected: dict, num_blocks: int) -> dict:
    """Torch state dict (no ``esm.*`` keys) -> parameter tree shaped like ``expected`` (a pure dict
    of arrays or ShapeDtypeStructs). Missing, misshapen or unknown weights are a
    ``ConversionError``."""
    used, flat = set(), {}
    for path, ref in _flatten(expected).items():
        key, transpose = torch_key(path)
        keys = [key.format(i=i) for i in range(num_blocks)] if "{i}" in key else [key]
        arrays = []
        for k in keys:
            if k not in sd:
                raise ConversionError(f"missing weight {k!r}")
            used.add(k)
            a = np.asarray(sd[k], np.float32)
            arrays.append(a.T if transpose else a)
        value = np.stack(arrays) if "{i}" in key else arrays[0]
        if value.shape != tuple(ref.shape):
            raise ConversionError(
                f"{key.replace('{i}', '*')}: shape {value.shape}, the config expects {ref.shape}"
            )
        flat[path] = value
    if "af2_to_esm" in sd:
        used.add("af2_to_esm")
        if not np.array_equal(np.asarray(sd["af2_to_esm"]), AF2_TO_ESM):
            raise ConversionError(
                "af2_to_esm differs from the ESM alphabet's; the model was built with another vocab"
            )
    extra = sorted(k for k in sd if k not in used)
    if extra:
        raise ConversionError(
            f"unexpected weights (not ESMFold, or another configuration?): {extra[:8]}"
        )
    return _unflatten(flat)


# --------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------
def _shape(sd: dict, key: str) -> tuple[int, ...]:
    if key not in sd:
        raise ConversionError(f"missing weight {key!r}: not an ESMFold state dict")
    return tuple(np.shape(sd[key]))


def config_from_state_dict(
    sd: dict, esm: ESM2Config, known: dict[str, Any] | None = None
) -> ESMFoldConfig:
    """Every width and count the weights determine, read from their shapes; the rest
    (structure-module iterations, recycles, scale factors) from ``known`` (fair-esm / OpenFold
    names) or the published defaults."""
    known = dict(known or {})
    trunk_k = dict(known.get("trunk") or {})
    sm_k = dict(trunk_k.get("structure_module") or {})
    b0 = "trunk.blocks.0."
    num_blocks = len({k.split(".")[2] for k in sd if k.startswith("trunk.blocks.")})
    s, z = _shape(sd, b0 + "layernorm_1.weight")[0], _shape(sd, b0 + "mlp_pair.mlp.0.weight")[0]
    seq_heads = _shape(sd, b0 + "pair_to_sequence.linear.weight")[0]
    pair_heads = _shape(sd, b0 + "tri_att_start.linear.weight")[0]
    p = "trunk.structure_module."
    h = _shape(sd, p + "ipa.head_weights")[0]
    pq = _shape(sd, p + "ipa.linear_q_points.weight")[0] // (3 * h)
    sm = StructureModuleConfig(
        single_dim=_shape(sd, p + "linear_in.weight")[0],
        pair_dim=_shape(sd, p + "layer_norm_z.weight")[0],
        ipa_dim=_shape(sd, p + "ipa.linear_q.weight")[0] // h,
        resnet_dim=_shape(sd, p + "angle_resnet.linear_in.weight")[0],
        num_heads=h,
        num_qk_points=pq,
        num_v_points=_shape(sd, p + "ipa.linear_kv_points.weight")[0] // (3 * h) - pq,
        num_blocks=int(sm_k.get("no_blocks", 8)),
        num_transition_layers=len({k for k in sd if k.startswith(p + "transition.layers.")}) // 6,
        num_resnet_blocks=len({k for k in sd if k.startswith(p + "angle_resnet.layers.")}) // 4,
        num_angles=_shape(sd, p + "angle_resnet.linear_out.weight")[0] // 2,
        trans_scale_factor=float(sm_k.get("trans_scale_factor", 10.0)),
        epsilon=float(sm_k.get("epsilon", 1e-8)),
        inf=float(sm_k.get("inf", 1e5)),
    )
    relpos_rows = _shape(sd, "trunk.pairwise_positional_embedding.embedding.weight")[0]
    trunk = TrunkConfig(
        num_blocks=num_blocks,
        single_dim=s,
        pair_dim=z,
        single_head_width=s // seq_heads,
        pair_head_width=z // pair_heads,
        position_bins=(relpos_rows - 2) // 2,
        max_recycles=int(trunk_k.get("max_recycles", 4)),
        structure_module=sm,
    )
    return ESMFoldConfig(
        esm=esm, trunk=trunk, lddt_head_hid_dim=_shape(sd, "lddt_head.1.weight")[0]
    )


def _plain(obj: Any) -> Any:
    """A fair-esm ``cfg`` (dict, argparse.Namespace, or an OmegaConf tree read as inert
    stand-ins) -> dict."""
    if isinstance(obj, argparse.Namespace):
        obj = vars(obj)
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    state = getattr(obj, "state", None)
    if isinstance(
        state, dict
    ):  # an OmegaConf node: DictConfig keeps "_content", value nodes "_val"
        if "_content" in state:
            return _plain(state["_content"])
        if "_val" in state:
            return _plain(state["_val"])
    return obj


# --------------------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------------------
def is_esmfold_source(src: str | Path) -> bool:
    """An HF folder with ``is_folding_model``, an esmjax ESMFold folder, or a .pt whose pickle names
    ``trunk.`` weights (checked by scanning the pickle bytes, without loading tensors)."""
    p = Path(src)
    if p.is_dir():
        cfg = p / "config.json"
        if not cfg.exists():
            return False
        raw = json.loads(cfg.read_text())
        return bool(raw.get("is_folding_model")) or checkpoint.ESMFOLD_SECTION in raw
    if p.suffix in (".pt", ".pth", ".bin") and zipfile.is_zipfile(p):
        with zipfile.ZipFile(p) as zf:
            pkl = [n for n in zf.namelist() if n.endswith("data.pkl")]
            return bool(pkl) and b"trunk.blocks." in zf.read(pkl[0])
    return False


def _split_esm(sd: dict[str, np.ndarray]) -> tuple[dict, dict]:
    esm = {k[len("esm.") :]: v for k, v in sd.items() if k.startswith("esm.")}
    return esm, {k: v for k, v in sd.items() if not k.startswith("esm.")}


def _esm_config_from_hf(hf: dict[str, Any]) -> ESM2Config:
    return convert.config_from_hf({**hf, "is_folding_model": False})


def _stem_from_hf(esm_sd: dict[str, np.ndarray], cfg: ESM2Config) -> dict:
    """HF ``EsmModel`` keys (``embeddings...``, ``encoder...``) -> ESM2 params. ESMFold has no
    masked-LM head for the stem; it is stored as zeros (ESMFold never uses it)."""
    e, v = cfg.embed_dim, cfg.vocab_size
    sd = {"esm." + k: val for k, val in esm_sd.items()}
    zeros = {
        "lm_head.dense.weight": (e, e),
        "lm_head.dense.bias": (e,),
        "lm_head.layer_norm.weight": (e,),
        "lm_head.layer_norm.bias": (e,),
        "lm_head.bias": (v,),
    }
    sd.update({k: np.zeros(s, np.float32) for k, s in zeros.items()})
    params, warnings = convert.state_dict_to_params(sd, cfg, "hf")
    for w in warnings:
        log.warning("%s", w)
    return params


def read_hf(folder: str | Path) -> tuple[ESMFoldConfig, dict]:
    """An HF ``EsmForProteinFolding`` folder (config.json + safetensors shards or
    pytorch_model.bin)."""
    folder = Path(folder)
    hf = json.loads((folder / "config.json").read_text())
    if not hf.get("is_folding_model"):
        raise ConversionError(f"{folder}/config.json is not an EsmForProteinFolding config")
    if (hf.get("esmfold_config") or {}).get("use_esm_attn_map"):
        raise ConversionError(
            "use_esm_attn_map=True models are not supported (no public model uses it)"
        )
    cfg = config_from_hf(hf)
    return cfg, params_from_hf(convert.read_hf_state_dict(folder), cfg)


def config_from_hf(hf: dict[str, Any]) -> ESMFoldConfig:
    """The config of an HF ``EsmForProteinFolding`` (its ``config.json``)."""
    return from_hf(_esm_config_from_hf(hf), hf.get("esmfold_config") or {})


def params_from_hf(sd: dict[str, np.ndarray], cfg: ESMFoldConfig) -> dict:
    """An HF ``EsmForProteinFolding`` state dict -> the params of an ESMFold of ``cfg``, its ESM-2
    stem included."""
    esm_sd, fold_sd = _split_esm(sd)
    params = _fold_params(fold_sd, cfg)
    params["esm"] = _stem_from_hf(esm_sd, cfg.esm)
    return params


def _fold_params(fold_sd: dict, cfg: ESMFoldConfig) -> dict:
    _, state = esmfold_abstract_model(cfg)
    expected = state.to_pure_dict()
    expected.pop("esm")
    return state_dict_to_params(fold_sd, expected, cfg.trunk.num_blocks)


def read_stem(src: str | Path) -> tuple[ESM2Config, dict]:
    """The ESM-2 an ESMFold .pt needs: a fair-esm .pt, an HF ESM-2 folder, or an esmjax ESM-2
    checkpoint; a bucket URL is downloaded to a temporary folder first."""
    if paths.is_remote(src):
        with paths.local_input(src) as local:
            return read_stem(local)
    p = Path(src)
    if not p.exists():
        raise InputError(f"{p}: no such file or folder")
    if (
        p.is_dir()
        and (p / "config.json").exists()
        and "model" in json.loads((p / "config.json").read_text())
    ):
        model, _ = checkpoint.load_model(p)
        return model.cfg, checkpoint.params_numpy(model)
    cfg, params, notes = convert.read_any(p)
    for n in notes:
        log.warning("%s", n)
    return cfg, params


def read_fairesm(path: str | Path, esm: str | Path | None = None) -> tuple[ESMFoldConfig, dict]:
    """A fair-esm ESMFold ``.pt`` (``{"cfg": {"model": cfg}, "model": state_dict}``). Its ``esm.*``
    weights are used when present; fair-esm's own files leave them out and load the LM
    separately, which ``esm`` names."""
    from esmjax.io.torch_pt import load_pt

    p = Path(path)
    data = load_pt(
        p, opaque_modules=("omegaconf", "typing", "builtins", "__builtin__", "enum", "collections")
    )
    if not isinstance(data, dict) or "model" not in data:
        raise ConversionError(f"{p}: not a fair-esm checkpoint (no 'model' state dict)")
    esm_sd, fold_sd = _split_esm(dict(data["model"]))
    known = _plain(
        (data.get("cfg") or {}).get("model") if isinstance(data.get("cfg"), dict) else None
    )
    if esm is not None:
        esm_cfg, esm_params = read_stem(esm)
        if esm_sd:
            log.warning("%s holds its own language model; using %s instead, as asked", p.name, esm)
    elif esm_sd:
        # fair-esm stores no head count; a stem of a known shape (the ESM-2 presets) gives it.
        n = len({k.split(".")[1] for k in esm_sd if k.startswith("layers.")})
        e = np.shape(esm_sd["embed_tokens.weight"])[1]
        preset = next(
            (c for c in ESM2_PRESETS.values() if (c.num_layers, c.embed_dim) == (n, e)), None
        )
        if preset is None:
            raise ConversionError(
                f"{p}: its language model (N={n}, E={e}) is no ESM-2 preset; pass --esm"
            )
        esm_cfg = esm2_from_shape(n, e, preset.num_heads)
        esm_params, warnings = convert.state_dict_to_params(esm_sd, esm_cfg, "fair-esm")
        for w in warnings:
            log.warning("%s", w)
    else:
        raise ConversionError(
            f"{p} holds no language-model weights (fair-esm loads ESM-2 separately): pass --esm "
            "with the ESM-2 checkpoint (e.g. esm2_t36_3B_UR50D.pt for esm_type "
            f"{(known or {}).get('esm_type', 'esm2_3B')!r})"
        )
    cfg = config_from_state_dict(fold_sd, esm_cfg, known if isinstance(known, dict) else None)
    check_fit(cfg, esm_cfg, str(esm or p))
    params = _fold_params(fold_sd, cfg)
    params["esm"] = esm_params
    return cfg, params


def check_fit(cfg: ESMFoldConfig, esm: ESM2Config, where: str) -> None:
    """The folding head reads N + 1 hidden states of width E; a stem of another shape cannot feed
    it."""
    if (cfg.esm.num_layers, cfg.esm.embed_dim) != (esm.num_layers, esm.embed_dim):
        raise ConversionError(
            f"the folding head expects an ESM-2 with {cfg.esm.num_layers} layers of width "
            f"{cfg.esm.embed_dim} (esm_s_combine has {cfg.esm.num_layers + 1} weights, "
            f"esm_s_mlp.0 takes {cfg.esm.embed_dim} features), but {where} has {esm.num_layers} "
            f"layers of width {esm.embed_dim}"
        )


def read_any(src: str | Path, esm: str | Path | None = None) -> tuple[ESMFoldConfig, dict]:
    p = Path(src)
    if p.is_dir():
        if esm is not None:
            raise InputError(
                "--esm applies to fair-esm .pt files; an HF folder carries its language model"
            )
        return read_hf(p)
    return read_fairesm(p, esm)


# --------------------------------------------------------------------------------------------------
# CLI branches (called from esmjax.commands.convert)
# --------------------------------------------------------------------------------------------------


def convert_source(
    src: str | Path, out: str | Path, esm: str | Path | None = None, name: str | None = None
) -> str:
    """An ESMFold source (fair-esm ``.pt`` + ``esm``, or an HF folder) -> an esmjax checkpoint;
    returns a one-line summary. ``name``: the source as the user gave it (a bucket URL that
    ``src`` is a local copy of)."""
    cfg, params = read_any(src, esm)
    with paths.write_errors(out):  # a full disk: one line (save_converted leaves no partial folder)
        checkpoint.save_converted(out, cfg, params, extra={"source": name or str(src)})
    t = cfg.trunk
    return (
        f"wrote {out}: ESMFold with a {cfg.esm.num_layers}-layer ESM-2 (width "
        f"{cfg.esm.embed_dim}), {t.num_blocks} trunk blocks (S={t.single_dim}, Z={t.pair_dim}), "
        f"{t.structure_module.num_blocks} structure-module iterations"
    )


def assemble(
    esm2_checkpoint: str | Path,
    out: str | Path,
    folding_head: str | Path | None,
    step: int | None = None,
) -> str:
    """The ESM-2 of an esmjax checkpoint (e.g. one you trained) under the folding head of an
    ESMFold (esmjax folder, fair-esm .pt or HF folder), written as an ESMFold checkpoint."""
    if not folding_head:
        raise InputError(
            "--to esmfold needs --folding-head (an ESMFold checkpoint whose trunk and heads to use)"
        )
    model, step = checkpoint.load_model(esm2_checkpoint, step=step)
    esm_params = checkpoint.params_numpy(model)
    if checkpoint.is_esmfold(folding_head):
        fold_model, _ = checkpoint.load_esmfold(folding_head)
        head_cfg, head_params = fold_model.cfg, checkpoint.params_numpy(fold_model)
    else:
        with paths.local_input(folding_head) as head:
            if not head.exists():
                raise InputError(f"{folding_head}: no such file or folder")
            stem = None if head.is_dir() else esm2_checkpoint
            head_cfg, head_params = read_any(head, esm=stem)
    check_fit(head_cfg, model.cfg, str(esm2_checkpoint))
    cfg = ESMFoldConfig(
        esm=model.cfg, trunk=head_cfg.trunk, lddt_head_hid_dim=head_cfg.lddt_head_hid_dim
    )
    params = {**head_params, "esm": esm_params}
    source = f"{esm2_checkpoint} (step {step}) + {folding_head}"
    with paths.write_errors(out):  # a full disk: one line (save_converted leaves no partial folder)
        checkpoint.save_converted(out, cfg, params, extra={"source": source})
    return f"wrote {out}: ESMFold with the ESM-2 of {esm2_checkpoint} (step {step})"
