"""Task heads for fine-tuning ESM-2, with HuggingFace's parameter layout, and LoRA adapters.

Glossary: B batch, L tokens, E embed, C classes (or regression targets), N layers, R LoRA rank.

- ``ClassificationHead``: HF ``EsmClassificationHead`` (``EsmForSequenceClassification``): the
  BOS token's final representation, ``dense`` (E -> E), tanh, ``out_proj`` (E -> C). The ``mean``
  pooling variant feeds the same layers the mean over residues (BOS, EOS and padding excluded);
  it has no HF counterpart.
- Residue tasks: HF ``EsmForTokenClassification``'s ``classifier``, one linear layer per token.
- ``add_lora``: Flax NNX's own ``nnx.LoRA`` (Hu et al. 2021) on the stacked q/k/v/out/fc1/fc2
  maps of every layer, ``W x + (alpha / r) B A x``; ``B`` starts at zero so the model is exactly the
  backbone at step 0. Adapters are ``nnx.LoRAParam`` variables named ``lora.lora_a`` [N, in, R]
  and ``lora.lora_b`` [N, R, out] under each target (PEFT's ``lora_A``/``lora_B`` transposed).

HF applies dropout in its heads; ESM-2's HF configs set it to 0, so none is applied here.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from esmjax.config import ESM2Config
from esmjax.config.mesh import EMBED, LAYERS
from esmjax.models import layers as nn
from esmjax.models.alphabet import BOS, EOS, PAD
from esmjax.models.esm2 import ESM2

# config name -> the Dense inside each (stacked) layer, and its flat (in, out) sizes
LORA_MODULES = {
    "q": ("self_attn", "q_proj"),
    "k": ("self_attn", "k_proj"),
    "v": ("self_attn", "v_proj"),
    "out": ("self_attn", "out_proj"),
    "fc1": ("fc1",),
    "fc2": ("fc2",),
}


def lora_sizes(cfg: ESM2Config, target: str) -> tuple[int, int]:
    e, f = cfg.embed_dim, cfg.mlp_dim
    return {"fc1": (e, f), "fc2": (f, e)}.get(target, (e, e))


def residue_mask(tokens: jax.Array) -> jax.Array:
    """[B, L] True at residues (not BOS, EOS or padding)."""
    return (tokens != BOS) & (tokens != EOS) & (tokens != PAD)


class ClassificationHead(nnx.Module):
    """HF ``EsmClassificationHead``: ``out_proj(tanh(dense(x)))`` of the BOS token (or the residue
    mean)."""

    def __init__(self, embed_dim: int, num_outputs: int, pooling: str, *, rngs: nnx.Rngs):
        self.pooling = pooling
        self.dense = nn.Dense(embed_dim, embed_dim, (EMBED, None), rngs=rngs)
        self.out_proj = nn.Dense(embed_dim, num_outputs, (EMBED, None), rngs=rngs)

    def __call__(self, h: jax.Array, tokens: jax.Array) -> jax.Array:
        """h [B, L, E] float32, tokens [B, L] -> [B, C]."""
        if self.pooling == "bos":
            x = h[:, 0]
        else:
            w = residue_mask(tokens).astype(h.dtype)[..., None]
            x = (h * w).sum(1) / jnp.maximum(w.sum(1), 1.0)
        return self.out_proj(jnp.tanh(self.dense(x)))


class TaskModel(nnx.Module):
    """An ESM-2 backbone (``esm``) and a task head (``classifier``), as HF's
    ``EsmForSequenceClassification`` / ``EsmForTokenClassification``.

    Args:
      cfg: the backbone's config.
      per_residue: a label per token (linear ``classifier``) instead of one per sequence.
      num_outputs: classes or regression targets C.
      pooling: ``bos`` or ``mean`` (sequence tasks).
      lora: ``(rank, alpha, targets)`` to attach adapters, or None.
    """

    def __init__(
        self,
        cfg: ESM2Config,
        *,
        per_residue: bool,
        num_outputs: int,
        pooling: str = "bos",
        lora: tuple[int, float, Sequence[str]] | None = None,
        rngs: nnx.Rngs,
    ):
        self.cfg = cfg
        self.per_residue = per_residue
        self.esm = ESM2(cfg, rngs=rngs)
        if lora is not None:
            add_lora(self.esm, *lora, rngs=rngs)
        if per_residue:
            self.classifier = nn.Dense(cfg.embed_dim, num_outputs, (EMBED, None), rngs=rngs)
        else:
            self.classifier = ClassificationHead(cfg.embed_dim, num_outputs, pooling, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """tokens [B, L] (BOS seq EOS PAD...) -> float32 logits [B, C] or [B, L, C]."""
        n = self.cfg.num_layers
        h = self.esm(tokens, repr_layers=(n,), return_logits=False)["representations"][n]
        h = h.astype(jnp.float32)
        if self.per_residue:
            return self.classifier(h)
        return self.classifier(h, tokens)


def _stacked_lora(num_layers: int, d_in: int, rank: int, d_out: int, rngs: nnx.Rngs) -> nnx.LoRA:
    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: LAYERS})
    def make(rngs: nnx.Rngs) -> nnx.LoRA:
        meta = {"out_sharding": (None, None), "eager_sharding": False}
        return nnx.LoRA(d_in, rank, d_out, rngs=rngs, a_metadata=meta, b_metadata=meta)

    return make(rngs)


def add_lora(esm: ESM2, rank: int, alpha: float, targets: Sequence[str], *, rngs: nnx.Rngs) -> None:
    """Attaches an ``nnx.LoRA`` (stacked over the N layers) to each target Dense of ``esm``."""
    for target in targets:
        d_in, d_out = lora_sizes(esm.cfg, target)
        module = esm.layers
        for name in LORA_MODULES[target]:
            module = getattr(module, name)
        module.lora = _stacked_lora(esm.cfg.num_layers, d_in, rank, d_out, rngs)
        module.lora_scale = alpha / rank


def abstract_task_model(**kw) -> tuple[nnx.GraphDef, nnx.State]:
    """Shapes, dtypes and logical axes of a ``TaskModel`` (``TaskModel``'s arguments but rngs)."""
    return nnx.split(nnx.eval_shape(lambda: TaskModel(**kw, rngs=nnx.Rngs(0))))


def merge_lora(variables: dict, scale: float) -> dict:
    """A ``TaskModel``'s variables (pure dict) with every adapter folded into its kernel,
    ``W + (alpha / r) A B`` reshaped to the kernel's ``[N, *in, *out]``, and the adapters removed:
    the ``TaskModel`` without LoRA then computes the same function. ``scale``: alpha / rank."""
    out = _copy(variables)
    layers = out["esm"]["layers"]
    for names in LORA_MODULES.values():
        parent = layers
        for name in names[:-1]:
            parent = parent.get(name, {})
        dense = parent.get(names[-1])
        if dense is None or "lora" not in dense:
            continue
        lora = dense.pop("lora")
        a, b = lora["lora_a"], lora["lora_b"]  # [N, in, R], [N, R, out]
        kernel = dense["kernel"]
        delta = jnp.einsum("nir,nro->nio", jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
        dense["kernel"] = (
            jnp.asarray(kernel, jnp.float32) + scale * delta.reshape(kernel.shape)
        ).astype(kernel.dtype)
    return out


def _copy(tree: dict) -> dict:
    return {k: _copy(v) if isinstance(v, dict) else v for k, v in tree.items()}
