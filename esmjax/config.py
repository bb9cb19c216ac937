"""Typed, frozen configuration for every esmjax job, and the YAML loader.

Every config is a frozen, keyword-only dataclass. YAML files under ``configs/`` hold only what
differs from the defaults; ``load_config`` builds the dataclasses from them, rejects unknown keys,
coerces leaf types and applies ``--set a.b=c`` overrides. Model sizes are data (``ESM2_PRESETS``),
as in the ESM-2 model zoo (Lin et al. 2023).
"""

from __future__ import annotations

import contextvars
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


class ConfigError(InputError):
    """A config file, override or field value that does not fit the dataclasses."""


# The key prefix of the dataclass ``from_dict`` is building (``model``, ``mesh``...), so that
# ``__post_init__`` checks name the full key, e.g. ``model.num_heads``.
_WHERE: contextvars.ContextVar[str] = contextvars.ContextVar("esmjax_config_where", default="")


def _key(name: str) -> str:
    where = _WHERE.get()
    return f"{where}.{name}" if where else name


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
      attention: the attention kernel (``esmjax.models.attention_kernels.choose_attention``):
        ``auto`` (splash on TPU, the Pallas flash kernel on a GPU with 16-bit compute, else XLA),
        ``xla``, ``splash``, ``cudnn`` or ``pallas_gpu``. A Pallas kernel forced on a backend it
        does not compile for runs in interpret mode (slow).
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
    attention: str = "auto"

    def __post_init__(self) -> None:
        for name in ("num_layers", "embed_dim", "num_heads", "mlp_dim", "vocab_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{_key(name)}: must be positive, got {getattr(self, name)}")
        if self.embed_dim % self.num_heads:
            raise ConfigError(
                f"{_key('num_heads')}: {self.num_heads} does not divide {_key('embed_dim')} "
                f"{self.embed_dim}"
            )
        if (self.embed_dim // self.num_heads) % 2:
            raise ConfigError(
                f"{_key('num_heads')}: head_dim {_key('embed_dim')} / {_key('num_heads')} = "
                f"{self.embed_dim // self.num_heads} must be even for rotary embeddings"
            )
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ConfigError(
                    f"{_key(name)}: must be one of {', '.join(DTYPES)}, got {getattr(self, name)!r}"
                )
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(
                f"{_key('remat')}: must be one of {', '.join(REMAT_POLICIES)}, got {self.remat!r}"
            )
        if self.attention not in ATTENTION_PATHS:
            raise ConfigError(
                f"{_key('attention')}: must be one of {', '.join(ATTENTION_PATHS)}, "
                f"got {self.attention!r}"
            )

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
DTYPES = ("float32", "bfloat16")
ATTENTION_PATHS = ("auto", "xla", "splash", "cudnn", "pallas_gpu")


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
        raise ConfigError(
            f"unknown ESM-2 preset {name!r}; known: {', '.join(ESM2_PRESETS)}"
        ) from None


def esm2_from_shape(num_layers: int, embed_dim: int, num_heads: int, **kw: Any) -> ESM2Config:
    """An ESM2Config for an arbitrary shape (fair-esm stores only these three numbers)."""
    return ESM2Config(
        num_layers=num_layers, embed_dim=embed_dim, num_heads=num_heads, mlp_dim=4 * embed_dim, **kw
    )


# --------------------------------------------------------------------------------------------------
# Sharding rules (data; ``esmjax.parallel.sharding`` applies them to a mesh)
# --------------------------------------------------------------------------------------------------
MESH_AXES = ("data", "fsdp", "tensor")

# Weight axes.
VOCAB = "vocab"
EMBED = "embed"
MLP = "mlp"
HEADS = "heads"
HEAD_DIM = "head_dim"
LAYERS = "layers"
NORM = "norm"
# Activation axes.
ACT_BATCH = "act_batch"
ACT_LEN = "act_len"
ACT_EMBED = "act_embed"
ACT_HEADS = "act_heads"
ACT_MLP = "act_mlp"
LOGICAL_AXES = (
    VOCAB,
    EMBED,
    MLP,
    HEADS,
    HEAD_DIM,
    LAYERS,
    NORM,
    ACT_BATCH,
    ACT_LEN,
    ACT_EMBED,
    ACT_HEADS,
    ACT_MLP,
)

Rules = tuple[tuple[str, tuple[str, ...]], ...]

RULE_PRESETS: dict[str, Rules] = {
    # Pure data parallelism: parameters replicated, the batch split over every mesh axis.
    "dp": ((ACT_BATCH, ("data", "fsdp", "tensor")),),
    # ZeRO-3 style: weights split on their embed axis over `fsdp`, batch over data x fsdp.
    "fsdp": (
        (EMBED, ("fsdp",)),
        (MLP, ("fsdp",)),
        (ACT_BATCH, ("data", "fsdp")),
    ),
    # FSDP plus Megatron tensor parallelism over heads and the MLP width.
    "fsdp_tp": (
        (EMBED, ("fsdp",)),
        (HEADS, ("tensor",)),
        (MLP, ("tensor",)),
        (ACT_BATCH, ("data", "fsdp")),
        (ACT_HEADS, ("tensor",)),
        (ACT_MLP, ("tensor",)),
    ),
}


def resolve_rules(rules: Any, key: str = "mesh.rules") -> Rules:
    """A preset name or an explicit ``[[logical, [mesh axes]], ...]`` list, as a tuple of pairs.

    Anything else (an unknown preset, an unknown logical or mesh axis name, a malformed pair) is a
    ``ConfigError`` naming ``key``: a misspelt rule would otherwise silently shard nothing.
    """
    if isinstance(rules, str):
        try:
            return RULE_PRESETS[rules]
        except KeyError:
            raise ConfigError(
                f"{key}: unknown sharding rules {rules!r}; presets: {', '.join(RULE_PRESETS)}, "
                "or a list of [logical_axis, [mesh_axes]] pairs"
            ) from None
    if not isinstance(rules, (list, tuple)):
        raise ConfigError(
            f"{key}: expected a preset name or a list of [logical_axis, [mesh_axes]] pairs, "
            f"got {rules!r}"
        )
    out = []
    for item in rules:
        if not isinstance(item, (list, tuple)) or len(item) != 2:
            raise ConfigError(f"{key}: a sharding rule is [logical_axis, mesh_axes], got {item!r}")
        name, axes = item
        if name not in LOGICAL_AXES:
            raise ConfigError(
                f"{key}: unknown logical axis {name!r}; logical axes: {', '.join(LOGICAL_AXES)}"
            )
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        bad = [a for a in axes if a not in MESH_AXES]
        if bad:
            raise ConfigError(
                f"{key}: rule {name!r} names unknown mesh axes {bad}; mesh axes are "
                f"{', '.join(MESH_AXES)}"
            )
        out.append((str(name), axes))
    return tuple(out)


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class MeshConfig:
    """Device mesh ``(data, fsdp, tensor)`` and the logical-axis rules that map onto it.

    ``ici_*`` sizes are within a host or slice, ``dcn_*`` across hosts or slices (MaxText's split).
    One of the ``ici_*`` sizes may be -1, meaning the devices left over. ``rules`` names a preset in
    ``RULE_PRESETS`` (``dp``, ``fsdp``, ``fsdp_tp``) or is an explicit list of
    ``[logical_axis, [mesh_axis, ...]]`` pairs; it is checked when the config is built.

    A dimension that a rule maps onto mesh axes which do not divide it stays replicated over them.
    Every command resolves parameter shardings through ``sharding.tree_shardings``, which lists such
    parameters at start-up and refuses to run when they hold more than 5% of the parameter bytes
    per device (e.g. 15B on fsdp=12: 5,120 is not divisible by 12, so every layer kernel would be
    replicated). ``allow_replicated: true`` runs anyway, with a warning.
    """

    ici_data: int = 1
    ici_fsdp: int = -1
    ici_tensor: int = 1
    dcn_data: int = 1
    dcn_fsdp: int = 1
    dcn_tensor: int = 1
    rules: Any = "fsdp"
    allow_replicated: bool = False

    def __post_init__(self) -> None:
        for name in ("ici_data", "ici_fsdp", "ici_tensor"):
            if getattr(self, name) < 1 and getattr(self, name) != -1:
                raise ConfigError(
                    f"{_key(name)}: must be a positive size or -1 (the devices left over), got "
                    f"{getattr(self, name)}"
                )
        for name in ("dcn_data", "dcn_fsdp", "dcn_tensor"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{_key(name)}: must be positive, got {getattr(self, name)}")
        ici = (self.ici_data, self.ici_fsdp, self.ici_tensor)
        if ici.count(-1) > 1:
            raise ConfigError(f"{_key('ici_*')}: at most one mesh size may be -1, got {ici}")
        resolve_rules(self.rules, _key("rules"))


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
    # continued pretraining: the weights a new run starts from (a fair-esm .pt, an HF folder, an
    # esmjax checkpoint or training workdir) and its step (-1: the latest). The optimizer and the
    # schedule start fresh; a run that has its own checkpoints resumes them and ignores this.
    init_from: str = ""
    init_step: int = -1


# --------------------------------------------------------------------------------------------------
# Fine-tuning
# --------------------------------------------------------------------------------------------------
TASKS = ("sequence_classification", "sequence_regression", "residue_classification")
FINETUNE_MODES = ("full", "lora", "frozen")
LORA_TARGETS = ("q", "k", "v", "out", "fc1", "fc2")


@dataclass(frozen=True, kw_only=True)
class LoraConfig:
    """LoRA (Hu et al. 2021, "LoRA: Low-rank adaptation of large language models"): each target
    linear map ``W x`` becomes ``W x + (alpha / rank) B A x`` with ``B`` starting at zero.
    ``targets``: any of q, k, v, out (attention projections), fc1, fc2 (feed-forward)."""

    rank: int = 8
    alpha: float = 16.0
    targets: tuple = ("q", "k", "v", "out")

    def __post_init__(self) -> None:
        bad = [t for t in self.targets if t not in LORA_TARGETS]
        if bad or not self.targets:
            raise ConfigError(f"lora.targets: {bad or '[]'}; each one of {LORA_TARGETS}")
        if self.rank < 1:
            raise ConfigError(f"lora.rank must be >= 1, got {self.rank}")


@dataclass(frozen=True, kw_only=True)
class FinetuneDataConfig:
    """Labelled data for ``esmjax finetune`` (formats in ``esmjax.io.labeled``).

    Attributes:
      csv: FLIP's sequence-task CSV: ``sequence,target[,set][,validation]`` (``set`` train/test,
        ``validation`` True/False marks train rows held out for validation).
      fasta / labels / mask: FLIP's residue-task layout: sequences, a label FASTA (one character
        per residue, ``SET=``/``VALIDATION=`` in the header) and an optional 0/1 mask FASTA.
      train / valid / test: explicit files instead (a CSV, or for residue tasks a label FASTA with
        the sequence FASTA in ``fasta``); they override the ``set``/``validation`` columns.
      valid_fraction: when nothing marks validation rows, this fraction of train (hash of the
        sequence) is held out.
      max_length: residues kept per sequence (longer ones are cropped, as ``esmjax embed``).
      batch_size: sequences per optimizer step (global); rows_per_device splits it into
        micro-batches (0: all at once), gradient accumulation covers the rest.
      skip_invalid: skip and count bad rows instead of stopping at the first.
    """

    csv: str = ""
    fasta: str = ""
    labels: str = ""
    mask: str = ""
    train: str = ""
    valid: str = ""
    test: str = ""
    valid_fraction: float = 0.1
    max_length: int = 1022
    batch_size: int = 16
    rows_per_device: int = 0
    skip_invalid: bool = False
    seed: int = 0


@dataclass(frozen=True, kw_only=True)
class FinetuneConfig:
    """The root of ``esmjax finetune --config C``.

    Attributes:
      backbone: what ``esmjax train --init-from`` accepts (fair-esm .pt, HF folder, esmjax
        checkpoint or workdir); backbone_step its step (-1: latest).
      task: sequence_classification | sequence_regression | residue_classification.
      multi_label: sequence classification with several labels per sequence (sigmoid, BCE).
      labels: class names in order (default: sorted classes of the training data).
      head: ``bos`` (HF ``EsmClassificationHead``: BOS token, dense, tanh, out_proj) or ``mean``
        (the same layers on the mean over residues); residue tasks use a linear layer per token.
      mode: full (every weight), lora (adapters + head) or frozen (head only).
      head_lr: peak learning rate of the head (0: ``optim.peak_lr``, the backbone's).
      best_metric: validation metric that picks the best checkpoint (default: mcc for single-label
        classification, macro_f1 for multi-label, spearman for regression, accuracy for residue
        tasks); patience: evaluations without improvement before stopping (0: never stop early).
    """

    backbone: str = ""
    backbone_step: int = -1
    task: str = "sequence_classification"
    multi_label: bool = False
    labels: tuple = ()
    head: str = "bos"
    mode: str = "full"
    lora: LoraConfig = field(default_factory=LoraConfig)
    dtype: str = "float32"
    remat: str = "none"
    mesh: MeshConfig = field(default_factory=MeshConfig)
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(peak_lr=1e-4, warmup_steps=50, weight_decay=0.01)
    )
    head_lr: float = 0.0
    checkpoint: CheckpointConfig = field(default_factory=lambda: CheckpointConfig(every=500))
    num_steps: int = 1000
    log_every: int = 10
    eval_every: int = 100
    best_metric: str = ""
    patience: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ConfigError(f"task {self.task!r}: one of {', '.join(TASKS)}")
        if self.mode not in FINETUNE_MODES:
            raise ConfigError(f"mode {self.mode!r}: one of {', '.join(FINETUNE_MODES)}")
        if self.head not in ("bos", "mean"):
            raise ConfigError(f"head {self.head!r}: bos or mean")
        if self.multi_label and self.task != "sequence_classification":
            raise ConfigError("multi_label applies to sequence_classification only")

    @property
    def metric(self) -> str:
        if self.best_metric:
            return self.best_metric
        if self.task == "sequence_regression":
            return "spearman"
        if self.task == "residue_classification":
            return "accuracy"
        # MCC: a constant (majority-class) predictor scores 0 however skewed the classes are
        return "macro_f1" if self.multi_label else "mcc"


def load_finetune_config(path: str | Path | None, overrides: list[str] | tuple = ()) -> Any:
    """Reads a YAML fine-tuning config (``configs/finetune/*.yaml``) plus ``--set`` overrides."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file {p} does not exist")
        tree = yaml.safe_load(p.read_text()) or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"{p}: top level must be a mapping")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        _set_path(tree, key.strip(), raw.strip())
    cfg = from_dict(FinetuneConfig, tree)
    if not cfg.backbone:
        raise ConfigError("backbone: the config names no backbone checkpoint")
    return cfg


def load_finetune_run_config(path: str | Path | None, overrides: list[str], workdir: Path) -> Any:
    """The config for ``esmjax finetune``: the file plus overrides, or, resuming without
    ``--config``, the workdir's saved one."""
    if path is None:
        saved = Path(workdir) / "config.json"
        if not saved.exists():
            raise ConfigError("--config is required for a new workdir")
        if overrides:
            raise ConfigError("--set needs --config")
        return from_dict(FinetuneConfig, json.loads(saved.read_text())["finetune"])
    return load_finetune_config(path, overrides)


# --------------------------------------------------------------------------------------------------
# Loading and dumping
# --------------------------------------------------------------------------------------------------
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
    token = _WHERE.set(where)
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where or cls.__name__}: {e}") from None
    finally:
        _WHERE.reset(token)


def to_dict(cfg: Any) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def _set_path(tree: dict[str, Any], dotted: str, raw: str) -> None:
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


# The fields that make two ESM-2 configs the same network (the rest say how it is computed).
ARCHITECTURE_FIELDS = (
    "num_layers",
    "embed_dim",
    "num_heads",
    "mlp_dim",
    "vocab_size",
    "token_dropout",
    "layer_norm_eps",
)


def check_same_architecture(named: ESM2Config, source: ESM2Config, source_name: str) -> None:
    """A one-line ``ConfigError`` when the config names another network than ``source`` holds."""
    diff = [
        f"{f} {getattr(named, f)} vs {getattr(source, f)}"
        for f in ARCHITECTURE_FIELDS
        if getattr(named, f) != getattr(source, f)
    ]
    if diff:
        raise ConfigError(
            f"model: the config names another model than init_from {source_name} holds "
            f"({', '.join(diff)}); drop the model section to take it from the source"
        )


def load_config(
    path: str | Path | None,
    overrides: list[str] | tuple[str, ...] = (),
    source_model: Any = None,
) -> TrainConfig:
    """Reads a YAML training config and applies ``key.path=value`` overrides.

    Every problem is a one-line ``ConfigError`` that starts with the file and names the key, e.g.
    ``configs/x.yaml: model.num_heads: 7 does not divide model.embed_dim 320``.

    With ``init_from`` set, the model comes from that source (``source_model(src) -> ESM2Config``,
    supplied by the caller since reading checkpoints is a layer above): a config without a model
    section takes the source's, and one that names a different network is an error. Compute
    fields (``dtype``, ``remat``) may still be set.
    """
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {' '.join(str(e).split())}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{p}: top level must be a mapping")
    if isinstance(tree.get("model"), str):
        tree["model"] = {"preset": tree["model"]}
    model_overrides = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        if key.strip().startswith("model."):
            model_overrides.append((key.strip(), raw.strip()))
            continue
        _set_path(tree, key.strip(), raw.strip())
    src = tree.get("init_from") or ""
    source_cfg = source_model(str(src)) if src and source_model is not None else None
    named = "model" in tree
    if not named and source_cfg is not None:
        tree["model"] = to_dict(source_cfg)
    for key, raw in model_overrides:
        if "model" not in tree:
            raise ConfigError("--set model.*: the config names no model")
        _set_path(tree, key, raw)
    if "model" not in tree:
        raise ConfigError("the config must name a model (a preset name or a mapping)")
    try:
        cfg = from_dict(TrainConfig, tree)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path is not None else str(e)) from None
    if named and source_cfg is not None:
        check_same_architecture(cfg.model, source_cfg, str(src))
    return cfg


def config_hash(cfg: Any) -> str:
    """A short stable hash of a config, recorded in reports."""
    return hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True).encode()).hexdigest()[:12]


def load_run_config(
    path: str | Path | None, overrides: list[str], workdir: str | Path, source_model: Any = None
) -> TrainConfig:
    """The config for ``esmjax train``: the file plus overrides, or the workdir's saved config
    when resuming."""
    if path is None:
        from etils import epath  # the workdir may be a bucket URL (esmjax.io.paths)

        saved = epath.Path(str(workdir)) / "config.json"
        if not saved.exists():
            raise ConfigError("--config is required for a new workdir")
        tree = json.loads(saved.read_text())
        try:
            cfg = from_dict(TrainConfig, tree)
        except ConfigError as e:
            raise ConfigError(f"{saved}: {e}") from None
        if overrides:
            raise ConfigError("--set needs --config")
        return cfg
    return load_config(path, overrides, source_model)
