"""The ESM-2 model config and its presets (the ESM-2 model zoo, Lin et al. 2023), and the
logical axis names and sharding rules that ``esmjax.parallel.sharding`` applies to a mesh."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from esmjax.config.base import ConfigError, _key


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
