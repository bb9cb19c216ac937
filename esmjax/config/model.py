"""The ESM-2 model config and its presets (the ESM-2 model zoo, Lin et al. 2023)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from esmjax.config.base import ConfigError, check, full_key


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
      attention: the attention kernel (``esmjax.models.attention.choose_attention``):
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
            check(self, name, getattr(self, name) >= 1, "positive")
        heads, embed = full_key("num_heads"), full_key("embed_dim")
        if self.embed_dim % self.num_heads:
            raise ConfigError(f"{heads}: {self.num_heads} does not divide {embed} {self.embed_dim}")
        if (self.embed_dim // self.num_heads) % 2:
            raise ConfigError(
                f"{heads}: head_dim {embed} / {heads} = {self.embed_dim // self.num_heads} must be "
                "even for rotary embeddings"
            )
        for name in ("dtype", "param_dtype"):
            check(self, name, getattr(self, name) in DTYPES, f"one of {', '.join(DTYPES)}")
        check(self, "remat", self.remat in REMAT_POLICIES, f"one of {', '.join(REMAT_POLICIES)}")
        check(
            self,
            "attention",
            self.attention in ATTENTION_PATHS,
            f"one of {', '.join(ATTENTION_PATHS)}",
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


REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
DTYPES = ("float32", "bfloat16")
ATTENTION_PATHS = ("auto", "xla", "splash", "cudnn", "pallas_gpu")
EXPORT_FORMATS = ("fair-esm", "hf", "esmfold")  # what an esmjax checkpoint converts to


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
