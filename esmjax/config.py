"""Typed, frozen configuration for every esmjax job, and the YAML loader.

Every config is a frozen, keyword-only dataclass. YAML files under ``configs/`` hold only what
differs from the defaults; ``load_config`` builds the dataclasses from them, rejects unknown keys,
coerces leaf types and applies ``--set a.b=c`` overrides. Model sizes are data (``ESM2_PRESETS``),
as in the ESM-2 model zoo (Lin et al. 2023).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from esmjax.errors import InputError


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class ESM2Config:
    """ESM-2 architecture (fair-esm ``esm.model.esm2.ESM2``) and how it is computed.

    Attributes:
      num_layers: transformer layers (fair-esm ``num_layers`` / ``encoder_layers``).
      embed_dim: model width E.
      num_heads: attention heads H; head_dim D = E / H.
      mlp_dim: feed-forward width F (4E in every published model).
      vocab_size: 33, the ESM-1b alphabet.
      token_dropout: ESM-2 rescales embeddings by 0.88 / (1 - observed mask ratio); True for all
        checkpoints.
      rope_theta: rotary base used only to initialise ``inv_freq`` (loaded checkpoints carry their
        own).
      layer_norm_eps: 1e-5, as fair-esm (PyTorch default).
      dtype: compute dtype, ``float32`` or ``bfloat16``; parameters stay ``param_dtype``.
      param_dtype: parameter storage dtype.
      remat: rematerialisation of each layer in training: ``none``, ``full``, ``dots`` (save matmul
        outputs) or ``dots_no_batch`` (save weight matmuls, recompute attention).
    """

    num_layers: int
    embed_dim: int
    num_heads: int
    mlp_dim: int
    vocab_size: int = 33
    token_dropout: bool = True
    rope_theta: float = 10000.0
    layer_norm_eps: float = 1e-5
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"

    def __post_init__(self) -> None:
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}"
            )
        if (self.embed_dim // self.num_heads) % 2:
            raise ValueError("head_dim must be even for rotary embeddings")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {REMAT_POLICIES}, got {self.remat!r}")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    def num_params(self) -> int:
        """Parameters counted as fair-esm counts them (tied embedding once, contact regression
        included)."""
        e, f, n, v = self.embed_dim, self.mlp_dim, self.num_layers, self.vocab_size
        layer = 4 * (e * e + e) + 2 * (2 * e) + (e * f + f) + (f * e + e)
        head = (e * e + e) + 2 * e + v
        return v * e + n * layer + 2 * e + head + (n * self.num_heads + 1)

    def num_nonembedding_params(self) -> int:
        return self.num_params() - self.vocab_size * self.embed_dim


REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")


def _esm2(num_layers: int, embed_dim: int, num_heads: int) -> ESM2Config:
    return ESM2Config(
        num_layers=num_layers, embed_dim=embed_dim, num_heads=num_heads, mlp_dim=4 * embed_dim
    )


# The public ESM-2 checkpoints (fair-esm README model table; heads from the HF configs) and small
# test shapes.
ESM2_PRESETS: dict[str, ESM2Config] = {
    "esm2_t6_8M_UR50D": _esm2(6, 320, 20),
    "esm2_t12_35M_UR50D": _esm2(12, 480, 20),
    "esm2_t30_150M_UR50D": _esm2(30, 640, 20),
    "esm2_t33_650M_UR50D": _esm2(33, 1280, 20),
    "esm2_t36_3B_UR50D": _esm2(36, 2560, 40),
    "esm2_t48_15B_UR50D": _esm2(48, 5120, 40),
    # Test and demo shapes. `tiny_h3` has a head count that is not a power of two.
    "tiny": _esm2(2, 32, 4),
    "tiny_h3": _esm2(3, 48, 3),
    "tiny_h5": _esm2(2, 40, 5),
    "demo": _esm2(4, 128, 4),
}


def esm2_preset(name: str) -> ESM2Config:
    try:
        return ESM2_PRESETS[name]
    except KeyError:
        raise ValueError(
            f"unknown ESM-2 preset {name!r}; known: {', '.join(ESM2_PRESETS)}"
        ) from None


def esm2_from_shape(num_layers: int, embed_dim: int, num_heads: int, **kw: Any) -> ESM2Config:
    """An ESM2Config for an arbitrary shape (fair-esm stores only these three numbers)."""
    return ESM2Config(
        num_layers=num_layers, embed_dim=embed_dim, num_heads=num_heads, mlp_dim=4 * embed_dim, **kw
    )


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class MeshConfig:
    """Device mesh ``(data, fsdp, tensor)`` and the logical-axis rules that map onto it.

    ``ici_*`` sizes are within a host or slice, ``dcn_*`` across hosts or slices (MaxText's split).
    One of the ``ici_*`` sizes may be -1, meaning the devices left over. ``rules`` names a preset in
    ``sharding.RULE_PRESETS`` (``dp``, ``fsdp``, ``fsdp_tp``) or is an explicit list of
    ``[logical_axis, [mesh_axis, ...]]`` pairs.
    """

    ici_data: int = 1
    ici_fsdp: int = -1
    ici_tensor: int = 1
    dcn_data: int = 1
    dcn_fsdp: int = 1
    dcn_tensor: int = 1
    rules: Any = "fsdp"


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Input pipeline (see ``esmjax.data``).

    Attributes:
      train: a dataset folder built by ``esmjax data build`` or a FASTA file.
      eval: held-out data; empty means the dataset folder's validation split.
      seq_len: tokens per packed row, BOS and EOS included (ESM-2 crops at 1,024): a longer
        protein is cut to a window of ``seq_len`` tokens of ``BOS seq EOS``, keeping BOS/EOS only
        where the window reaches its real start/end.
      tokens_per_step: global tokens per optimizer step (ESM-2: about 2M = 2,048 x 1,024).
      rows_per_device: packed rows each device processes per micro-step; accumulation covers the
        rest.
      mask_prob / mask_token_prob / random_token_prob: BERT masking (15%, of which 80% <mask>, 10%
      random).
      cluster_exponent: 0 draws clusters uniformly (ESM-2), 1 draws sequences uniformly.
      max_segments: at most this many sequences packed into one row.
      seed: sampling seed (the masking seed derives from it and each row's place in the packed
        stream).
      num_workers: background worker processes (0 = in-process threads only).
      prefetch: batches prefetched ahead of the step.
      eval_tokens: held-out tokens evaluated at each evaluation (0 or less: the whole held-out
        split).
      val_fraction: for a FASTA ``train``, the fraction of records held out for evaluation (each
        record is its own cluster; the same hash rule as ``esmjax data build --val-fraction``).
    """

    train: str = ""
    eval: str = ""
    seq_len: int = 1024
    tokens_per_step: int = 2_097_152
    rows_per_device: int = 0
    mask_prob: float = 0.15
    mask_token_prob: float = 0.8
    random_token_prob: float = 0.1
    cluster_exponent: float = 0.0
    max_segments: int = 64
    seed: int = 0
    num_workers: int = 0
    prefetch: int = 2
    eval_tokens: int = 65_536
    val_fraction: float = 0.005


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """AdamW with linear warm-up and linear decay to ``final_lr_ratio`` of peak (ESM-2 recipe, Lin
    et al. 2023).

    The decay runs over ``decay_fraction`` of ``TrainConfig.num_steps`` and then holds.
    """

    peak_lr: float = 4e-4
    warmup_steps: int = 2000
    decay_fraction: float = 0.9
    final_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.98
    eps: float = 1e-8
    weight_decay: float = 0.01
    grad_clip: float = 1.0


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    """Orbax checkpointing: save every ``every`` steps, keep the last ``keep`` and every
    ``keep_every``-th."""

    every: int = 1000
    keep: int = 3
    keep_every: int = 0
    async_save: bool = True


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """The root of a training run (``esmjax train --config C``)."""

    model: ESM2Config
    mesh: MeshConfig = field(default_factory=MeshConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    num_steps: int = 500_000
    log_every: int = 10
    eval_every: int = 1000
    seed: int = 0
    # a device kind of esmjax.train.metrics.PEAK_BF16_FLOPS (the MFU peak); empty = the local device
    accelerator: str = ""


# --------------------------------------------------------------------------------------------------
# Loading and dumping
# --------------------------------------------------------------------------------------------------
class ConfigError(InputError):
    """A config file or override that does not fit the dataclasses."""


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
        base = dataclasses.asdict(esm2_preset(data["preset"]))
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
        if tp is ESM2Config and isinstance(value, str):
            value = esm2_preset(value)
        kwargs[f.name] = _coerce(tp, value, f"{where}.{f.name}" if where else f.name)
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where or cls.__name__}: {e}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def _set_path(tree: dict[str, Any], dotted: str, raw: str) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {k} is not a section")
    node[keys[-1]] = yaml.safe_load(raw) if raw != "" else ""


def load_config(
    path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()
) -> TrainConfig:
    """Reads a YAML training config and applies ``key.path=value`` overrides."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file {p} does not exist")
        tree = yaml.safe_load(p.read_text()) or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"{p}: top level must be a mapping")
    if isinstance(tree.get("model"), str):
        tree["model"] = {"preset": tree["model"]}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        if key.startswith("model.") and "model" not in tree:
            raise ConfigError("--set model.*: the config names no model")
        _set_path(tree, key.strip(), raw.strip())
    if "model" not in tree:
        raise ConfigError("the config must name a model (a preset name or a mapping)")
    return from_dict(TrainConfig, tree)


def config_hash(cfg: Any) -> str:
    """A short stable hash of a config, recorded in reports."""
    return hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True).encode()).hexdigest()[:12]


def load_run_config(
    path: str | Path | None, overrides: list[str], workdir: str | Path
) -> TrainConfig:
    """The config for ``esmjax train``: the file plus overrides, or the workdir's saved config
    when resuming."""
    if path is None:
        from etils import epath  # the workdir may be a bucket URL (esmjax.io.paths)

        saved = epath.Path(str(workdir)) / "config.json"
        if not saved.exists():
            raise ConfigError("--config is required for a new workdir")
        tree = json.loads(saved.read_text())
        cfg = from_dict(TrainConfig, tree)
        if overrides:
            raise ConfigError("--set needs --config")
        return cfg
    return load_config(path, overrides)
