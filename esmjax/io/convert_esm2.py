"""ESM-2 weights between fair-esm / HuggingFace state dicts and esmjax parameters.

esmjax parameter names follow fair-esm, so the mapping is one table (``_TABLE``) plus three
structural rules: layer ``i`` is stacked into the leading ``layers`` axis, torch ``[out, in]``
Linear weights are transposed, and q/k/v/out projections are reshaped to ``[E, H, D]`` / ``[H, D,
E]``. Every transform is exactly invertible, so fair-esm -> esmjax -> fair-esm is bit-identical.
HuggingFace ``EsmForMaskedLM`` names are a second column of the table (HF facts: ``convert_esm.py``;
HF 5.x keeps one model-level rotary ``inv_freq``).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from esmjax.config import ESM2_PRESETS, ESM2Config, esm2_from_shape
from esmjax.errors import InputError

# (our path, fair-esm key, HF key, kind). "{i}" marks per-layer entries, stacked on axis 0 in
# esmjax.
_TABLE: list[tuple[str, str, str, str]] = [
    (
        "embed_tokens.embedding",
        "embed_tokens.weight",
        "esm.embeddings.word_embeddings.weight",
        "copy",
    ),
    (
        "layers.self_attn.q_proj.kernel",
        "layers.{i}.self_attn.q_proj.weight",
        "esm.encoder.layer.{i}.attention.self.query.weight",
        "qkv",
    ),
    (
        "layers.self_attn.q_proj.bias",
        "layers.{i}.self_attn.q_proj.bias",
        "esm.encoder.layer.{i}.attention.self.query.bias",
        "heads",
    ),
    (
        "layers.self_attn.k_proj.kernel",
        "layers.{i}.self_attn.k_proj.weight",
        "esm.encoder.layer.{i}.attention.self.key.weight",
        "qkv",
    ),
    (
        "layers.self_attn.k_proj.bias",
        "layers.{i}.self_attn.k_proj.bias",
        "esm.encoder.layer.{i}.attention.self.key.bias",
        "heads",
    ),
    (
        "layers.self_attn.v_proj.kernel",
        "layers.{i}.self_attn.v_proj.weight",
        "esm.encoder.layer.{i}.attention.self.value.weight",
        "qkv",
    ),
    (
        "layers.self_attn.v_proj.bias",
        "layers.{i}.self_attn.v_proj.bias",
        "esm.encoder.layer.{i}.attention.self.value.bias",
        "heads",
    ),
    (
        "layers.self_attn.out_proj.kernel",
        "layers.{i}.self_attn.out_proj.weight",
        "esm.encoder.layer.{i}.attention.output.dense.weight",
        "out",
    ),
    (
        "layers.self_attn.out_proj.bias",
        "layers.{i}.self_attn.out_proj.bias",
        "esm.encoder.layer.{i}.attention.output.dense.bias",
        "copy",
    ),
    (
        "layers.self_attn.rot_emb.inv_freq",
        "layers.{i}.self_attn.rot_emb.inv_freq",
        "esm.rotary_embeddings.inv_freq",
        "copy",
    ),
    (
        "layers.self_attn_layer_norm.scale",
        "layers.{i}.self_attn_layer_norm.weight",
        "esm.encoder.layer.{i}.attention.LayerNorm.weight",
        "copy",
    ),
    (
        "layers.self_attn_layer_norm.bias",
        "layers.{i}.self_attn_layer_norm.bias",
        "esm.encoder.layer.{i}.attention.LayerNorm.bias",
        "copy",
    ),
    (
        "layers.fc1.kernel",
        "layers.{i}.fc1.weight",
        "esm.encoder.layer.{i}.intermediate.dense.weight",
        "linear",
    ),
    (
        "layers.fc1.bias",
        "layers.{i}.fc1.bias",
        "esm.encoder.layer.{i}.intermediate.dense.bias",
        "copy",
    ),
    (
        "layers.fc2.kernel",
        "layers.{i}.fc2.weight",
        "esm.encoder.layer.{i}.output.dense.weight",
        "linear",
    ),
    ("layers.fc2.bias", "layers.{i}.fc2.bias", "esm.encoder.layer.{i}.output.dense.bias", "copy"),
    (
        "layers.final_layer_norm.scale",
        "layers.{i}.final_layer_norm.weight",
        "esm.encoder.layer.{i}.LayerNorm.weight",
        "copy",
    ),
    (
        "layers.final_layer_norm.bias",
        "layers.{i}.final_layer_norm.bias",
        "esm.encoder.layer.{i}.LayerNorm.bias",
        "copy",
    ),
    (
        "emb_layer_norm_after.scale",
        "emb_layer_norm_after.weight",
        "esm.encoder.emb_layer_norm_after.weight",
        "copy",
    ),
    (
        "emb_layer_norm_after.bias",
        "emb_layer_norm_after.bias",
        "esm.encoder.emb_layer_norm_after.bias",
        "copy",
    ),
    ("lm_head.dense.kernel", "lm_head.dense.weight", "lm_head.dense.weight", "linear"),
    ("lm_head.dense.bias", "lm_head.dense.bias", "lm_head.dense.bias", "copy"),
    ("lm_head.layer_norm.scale", "lm_head.layer_norm.weight", "lm_head.layer_norm.weight", "copy"),
    ("lm_head.layer_norm.bias", "lm_head.layer_norm.bias", "lm_head.layer_norm.bias", "copy"),
    ("lm_head.bias", "lm_head.bias", "lm_head.bias", "copy"),
    (
        "contact_head.regression.kernel",
        "contact_head.regression.weight",
        "esm.contact_head.regression.weight",
        "linear",
    ),
    (
        "contact_head.regression.bias",
        "contact_head.regression.bias",
        "esm.contact_head.regression.bias",
        "copy",
    ),
]
_TIED = {"fair-esm": "lm_head.weight", "hf": "lm_head.decoder.weight"}
_CONTACT_KEYS = ("contact_head.regression.kernel", "contact_head.regression.bias")
# fair-esm .pt files keep the fairseq prefixes; fair-esm strips them with this regex
# (pretrained.upgrade_state_dict).
_FAIRSEQ_PREFIX = re.compile(r"^(encoder\.sentence_encoder\.|encoder\.)")


class ConversionError(InputError):
    """A state dict that does not fit the expected layout or shapes."""


def _to_ours(kind: str, w: np.ndarray, cfg: ESM2Config) -> np.ndarray:
    h, d = cfg.num_heads, cfg.head_dim
    if kind == "copy":
        return w
    if kind == "linear":
        return w.T
    if kind == "qkv":  # [H*D, E] -> [E, H, D]
        return w.T.reshape(w.shape[1], h, d)
    if kind == "heads":  # [H*D] -> [H, D]
        return w.reshape(h, d)
    if kind == "out":  # [E, H*D] -> [H, D, E]
        return w.T.reshape(h, d, w.shape[0])
    raise AssertionError(kind)


def _from_ours(kind: str, w: np.ndarray) -> np.ndarray:
    if kind == "copy":
        return w
    if kind == "linear":
        return w.T
    if kind == "qkv":  # [E, H, D] -> [H*D, E]
        return w.reshape(w.shape[0], -1).T
    if kind == "heads":
        return w.reshape(-1)
    if kind == "out":  # [H, D, E] -> [E, H*D]
        return w.reshape(-1, w.shape[-1]).T
    raise AssertionError(kind)


def _set(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
    tree[keys[-1]] = value


def _get(tree: dict[str, Any], dotted: str) -> Any:
    for k in dotted.split("."):
        tree = tree[k]
    return tree


def _expected_shape(path: str, cfg: ESM2Config) -> tuple[int, ...]:
    e, h, d, f, v, n = (
        cfg.embed_dim,
        cfg.num_heads,
        cfg.head_dim,
        cfg.mlp_dim,
        cfg.vocab_size,
        cfg.num_layers,
    )
    leaf = path.removeprefix("layers.")
    table = {
        "embed_tokens.embedding": (v, e),
        "self_attn.q_proj.kernel": (e, h, d),
        "self_attn.k_proj.kernel": (e, h, d),
        "self_attn.v_proj.kernel": (e, h, d),
        "self_attn.q_proj.bias": (h, d),
        "self_attn.k_proj.bias": (h, d),
        "self_attn.v_proj.bias": (h, d),
        "self_attn.out_proj.kernel": (h, d, e),
        "self_attn.out_proj.bias": (e,),
        "self_attn.rot_emb.inv_freq": (d // 2,),
        "fc1.kernel": (e, f),
        "fc1.bias": (f,),
        "fc2.kernel": (f, e),
        "fc2.bias": (e,),
        "lm_head.dense.kernel": (e, e),
        "lm_head.bias": (v,),
        "contact_head.regression.kernel": (n * h, 1),
        "contact_head.regression.bias": (1,),
    }
    shape = table.get(leaf, (e,))
    return (n, *shape) if path.startswith("layers.") else shape


def state_dict_to_params(
    sd: dict[str, np.ndarray], cfg: ESM2Config, source: str
) -> tuple[dict[str, Any], list[str]]:
    """fair-esm (``source="fair-esm"``) or HF (``"hf"``) state dict -> esmjax param tree.

    Returns the tree and a list of warnings (e.g. missing contact regression). Missing or misshapen
    weights are a ``ConversionError``; so are keys that belong to no known parameter.
    """
    col = 1 if source == "fair-esm" else 2
    if source == "fair-esm":
        sd = {_FAIRSEQ_PREFIX.sub("", k): v for k, v in sd.items()}
    else:
        sd = {k.removeprefix("model."): v for k, v in sd.items()}
        sd = {(k if k.startswith(("esm.", "lm_head.")) else "esm." + k): v for k, v in sd.items()}
        # transformers writes LayerNorm parameters under their legacy names gamma/beta.
        sd = {
            re.sub(
                r"(?i)(layer_?norm[^.]*)\.gamma$",
                r"\1.weight",
                re.sub(r"(?i)(layer_?norm[^.]*)\.beta$", r"\1.bias", k),
            ): v
            for k, v in sd.items()
        }
    used: set[str] = set()
    params: dict[str, Any] = {}
    warnings: list[str] = []
    for row in _TABLE:
        ours, theirs, kind = row[0], row[col], row[3]
        if ours in _CONTACT_KEYS and theirs not in sd:
            n = cfg.num_layers * cfg.num_heads
            params_value = (
                np.zeros((n, 1), np.float32)
                if ours.endswith("kernel")
                else np.zeros((1,), np.float32)
            )
            _set(params, ours, params_value)
            warnings.append(
                f"no {theirs}: contact predictions will not be meaningful until a regression is "
                "fitted"
            )
            continue
        if "{i}" in theirs:
            layers = []
            for i in range(cfg.num_layers):
                key = theirs.format(i=i)
                if key not in sd and source == "hf" and "inv_freq" in key:
                    key = "esm.rotary_embeddings.inv_freq"
                    if key not in sd:
                        key = f"esm.encoder.layer.{i}.attention.self.rotary_embeddings.inv_freq"
                if key not in sd:
                    raise ConversionError(
                        f"missing weight {key!r} for a {cfg.num_layers}-layer model"
                    )
                used.add(key)
                layers.append(_to_ours(kind, np.asarray(sd[key]), cfg))
            value = np.stack(layers)
        else:
            key = theirs
            if key not in sd and source == "hf" and "inv_freq" in key:
                key = "esm.encoder.layer.0.attention.self.rotary_embeddings.inv_freq"
            if key not in sd and source == "hf" and "inv_freq" in key:
                # transformers >= 5 does not save the buffer; recompute it in float32 from
                # rope_theta.
                d = cfg.head_dim
                inv = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float32) / d))
                _set(params, ours, np.stack([inv.astype(np.float32)] * cfg.num_layers))
                warnings.append(
                    "no stored rotary inv_freq: computed from rope_theta in float32 (released "
                    "ESM-2 weights carry an fp16-rounded copy)"
                )
                continue
            if key not in sd:
                raise ConversionError(f"missing weight {theirs!r}")
            used.add(key)
            if "inv_freq" in key:  # one shared buffer (HF 5.x): give every layer the stored copy
                value = np.stack([np.asarray(sd[key])] * cfg.num_layers)
                _set(params, ours, value)
                continue
            value = _to_ours(kind, np.asarray(sd[key]), cfg)
        expected = _expected_shape(ours, cfg)
        if value.shape != expected:
            raise ConversionError(
                f"{theirs}: shape {value.shape} after conversion, expected {expected}"
            )
        _set(params, ours, value)
    tied = _TIED[source]
    if tied in sd:
        used.add(tied)
        if not np.array_equal(sd[tied], _get(params, "embed_tokens.embedding")):
            raise ConversionError(f"{tied} differs from the token embedding; ESM-2 ties them")
    ignorable = re.compile(r"(rotary_embeddings\.inv_freq|position_ids|position_embeddings)")
    extra = [k for k in sd if k not in used and not ignorable.search(k)]
    if extra:
        raise ConversionError(f"unexpected weights (not an ESM-2 masked LM?): {sorted(extra)[:8]}")
    return params, warnings


def params_to_state_dict(
    params: dict[str, Any], cfg: ESM2Config, target: str
) -> dict[str, np.ndarray]:
    """esmjax param tree -> fair-esm (unprefixed module keys) or HF ``EsmForMaskedLM`` state
    dict."""
    col = 1 if target == "fair-esm" else 2
    sd: dict[str, np.ndarray] = {}
    for row in _TABLE:
        ours, theirs, kind = row[0], row[col], row[3]
        value = np.asarray(_get(params, ours))
        if "{i}" in theirs:
            for i in range(cfg.num_layers):
                sd[theirs.format(i=i)] = np.ascontiguousarray(_from_ours(kind, value[i]))
        elif "inv_freq" in ours:  # HF: one shared buffer
            sd[theirs] = np.ascontiguousarray(value[0])
        else:
            sd[theirs] = np.ascontiguousarray(_from_ours(kind, value))
    sd[_TIED[target]] = sd[_TABLE[0][col]]
    return sd


# --------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------
def config_from_fairesm(cfg_obj: Any, sd: dict[str, np.ndarray], name_hint: str = "") -> ESM2Config:
    """The model config from a fair-esm checkpoint's ``cfg["model"]`` (Namespace or dict), else the
    preset table, else the state dict's shapes."""
    get = (lambda k: getattr(cfg_obj, k, None)) if not isinstance(cfg_obj, dict) else cfg_obj.get
    layers, dim, heads = (
        get("encoder_layers"),
        get("encoder_embed_dim"),
        get("encoder_attention_heads"),
    )
    token_dropout = get("token_dropout")
    if layers and dim and heads:
        return esm2_from_shape(
            int(layers), int(dim), int(heads), token_dropout=bool(token_dropout in (None, True))
        )
    for name, preset in ESM2_PRESETS.items():
        if name and name in name_hint:
            return preset
    raise ConversionError(
        "the checkpoint has no model config and its file name matches no known preset"
    )


def fairesm_namespace(cfg: ESM2Config) -> argparse.Namespace:
    """The ``cfg["model"]`` fair-esm's ``_load_model_and_alphabet_core_v2`` reads."""
    return argparse.Namespace(
        arch="roberta_large",
        encoder_layers=cfg.num_layers,
        encoder_embed_dim=cfg.embed_dim,
        encoder_ffn_embed_dim=cfg.mlp_dim,
        encoder_attention_heads=cfg.num_heads,
        token_dropout=cfg.token_dropout,
        max_positions=1024,
    )


def config_from_hf(hf: dict[str, Any]) -> ESM2Config:
    if hf.get("model_type", "esm") != "esm" or hf.get("is_folding_model"):
        raise ConversionError("config.json is not an ESM-2 masked LM (EsmForMaskedLM)")
    if hf.get("position_embedding_type", "rotary") != "rotary" or hf.get("emb_layer_norm_before"):
        raise ConversionError("config.json describes ESM-1 (absolute positions), not ESM-2")
    return ESM2Config(
        num_layers=int(hf["num_hidden_layers"]),
        embed_dim=int(hf["hidden_size"]),
        num_heads=int(hf["num_attention_heads"]),
        mlp_dim=int(hf["intermediate_size"]),
        vocab_size=int(hf.get("vocab_size") or 33),
        token_dropout=bool(hf.get("token_dropout", True)),
        rope_theta=float(hf.get("rope_theta", 10000.0)),
        layer_norm_eps=float(hf.get("layer_norm_eps", 1e-5)),
    )


def hf_config(cfg: ESM2Config) -> dict[str, Any]:
    from esmjax.models.alphabet import TOKENS

    return {
        "architectures": ["EsmForMaskedLM"],
        "model_type": "esm",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.embed_dim,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "intermediate_size": cfg.mlp_dim,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "max_position_embeddings": 1026,
        "position_embedding_type": "rotary",
        "rope_theta": cfg.rope_theta,
        "layer_norm_eps": cfg.layer_norm_eps,
        "emb_layer_norm_before": False,
        "token_dropout": cfg.token_dropout,
        "mask_token_id": 32,
        "pad_token_id": 1,
        "eos_token_id": 2,
        "initializer_range": 0.02,
        "tie_word_embeddings": True,
        "is_folding_model": False,
        "vocab_list": list(TOKENS),
        "torch_dtype": "float32",
    }


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------
def read_fairesm(path: str | Path) -> tuple[ESM2Config, dict[str, Any], list[str]]:
    """A fair-esm ``.pt`` (plus a co-located ``*-contact-regression.pt`` when present) ->
    (config, params, warnings)."""
    from esmjax.io.torch_pt import load_pt

    p = Path(path)
    data = load_pt(p)
    if not isinstance(data, dict) or "model" not in data:
        raise ConversionError(f"{p}: not a fair-esm checkpoint (no 'model' state dict)")
    sd = dict(data["model"])
    regression = p.with_name(p.stem + "-contact-regression.pt")
    notes = []
    if regression.exists():
        reg = load_pt(regression)
        sd.update(reg.get("model", reg) if isinstance(reg, dict) else {})
        notes.append(f"merged contact regression from {regression.name}")
    cfg_obj = (
        (data.get("cfg") or {}).get("model")
        if isinstance(data.get("cfg"), dict)
        else data.get("args")
    )
    cfg = config_from_fairesm(cfg_obj or {}, sd, p.name)
    params, warnings = state_dict_to_params(sd, cfg, "fair-esm")
    return cfg, params, notes + warnings


def read_hf_state_dict(folder: Path) -> dict[str, np.ndarray]:
    """All tensors of a HuggingFace folder: ``*.safetensors`` shards, else ``pytorch_model.bin``
    (read safely)."""
    sd: dict[str, np.ndarray] = {}
    shards = sorted(folder.glob("*.safetensors"))
    if shards:
        from safetensors.numpy import load_file

        for shard in shards:
            sd.update(load_file(str(shard)))
    elif (folder / "pytorch_model.bin").exists():
        from esmjax.io.torch_pt import load_pt

        sd = dict(load_pt(folder / "pytorch_model.bin"))
    else:
        raise ConversionError(f"{folder}: no *.safetensors or pytorch_model.bin")
    return sd


def read_hf(folder: str | Path) -> tuple[ESM2Config, dict[str, Any], list[str]]:
    """A HuggingFace model folder (``config.json`` + ``model.safetensors`` or
    ``pytorch_model.bin``)."""
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise ConversionError(f"{folder}: no config.json")
    cfg = config_from_hf(json.loads(cfg_path.read_text()))
    params, warnings = state_dict_to_params(read_hf_state_dict(folder), cfg, "hf")
    return cfg, params, warnings


def read_any(src: str | Path) -> tuple[ESM2Config, dict[str, Any], list[str]]:
    p = Path(src)
    if p.is_dir():
        return read_hf(p)
    if p.suffix in (".pt", ".pth", ".bin"):
        return read_fairesm(p)
    raise ConversionError(f"{p}: expected a fair-esm .pt file or a HuggingFace model folder")


def write_fairesm(params: dict[str, Any], cfg: ESM2Config, path: str | Path) -> None:
    """Writes a fair-esm ``.pt`` laid out as the released ones, config an ``argparse.Namespace``:
    fair-esm's loader reads ``cfg.encoder_layers`` by attribute, so a plain dict would not load,
    and torch >= 2.6 loads a Namespace only when allowed, as for the released files::

        with torch.serialization.safe_globals([argparse.Namespace]):
            model, alphabet = esm.pretrained.load_model_and_alphabet_local(path)
    """
    from esmjax.io.torch_pt import save_pt

    sd = params_to_state_dict(params, cfg, "fair-esm")
    prefixed = {
        ("encoder." if k.startswith("lm_head") else "encoder.sentence_encoder.") + k: v
        for k, v in sd.items()
        if not k.startswith("contact_head")
    }
    save_pt({"cfg": {"model": fairesm_namespace(cfg)}, "model": prefixed}, path)
    p = Path(path)
    reg = {k: v for k, v in sd.items() if k.startswith("contact_head")}
    save_pt({"model": reg}, p.with_name(p.stem + "-contact-regression.pt"))


def write_hf(params: dict[str, Any], cfg: ESM2Config, folder: str | Path) -> None:
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = params_to_state_dict(params, cfg, "hf")
    sd.pop(_TIED["hf"])  # tied: safetensors stores shared tensors once
    save_file(
        {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in sd.items()},
        str(folder / "model.safetensors"),
        metadata={"format": "pt"},
    )
    write_hf_tokenizer(folder)
    (folder / "config.json").write_text(json.dumps(hf_config(cfg), indent=2))


# What the facebook/esm2_* repos hold: EsmTokenizer reads vocab.txt (one token a line, in id order)
HF_SPECIAL_TOKENS = {
    "cls_token": "<cls>",
    "eos_token": "<eos>",
    "mask_token": "<mask>",
    "pad_token": "<pad>",
    "unk_token": "<unk>",
}


def write_hf_tokenizer(folder: str | Path) -> None:
    """``vocab.txt``, ``tokenizer_config.json`` and ``special_tokens_map.json``, so that
    ``AutoTokenizer.from_pretrained(folder)`` gives ``EsmTokenizer`` with esmjax's ids."""
    from esmjax.models.alphabet import TOKENS

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(TOKENS) + "\n")
    # ESM-2's training crops: 1022 residues + BOS/EOS (longer input runs, HF only warns)
    config = {"tokenizer_class": "EsmTokenizer", "model_max_length": 1024, **HF_SPECIAL_TOKENS}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps(HF_SPECIAL_TOKENS, indent=2))
