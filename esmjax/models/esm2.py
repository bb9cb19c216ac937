"""ESM-2 protein language model (Lin et al. 2023, "Evolutionary-scale prediction of atomic-level
protein structure with a language model", Science 379:1123), numerically matching fair-esm
``esm.model.esm2.ESM2``.

Glossary: B batch, L tokens, E embed, H heads, D head_dim, F mlp, V vocab (33), N layers.

Module and parameter names follow fair-esm's state dict (``embed_tokens``,
``layers.self_attn.q_proj``, ``fc1``, ``final_layer_norm``, ``emb_layer_norm_after``, ``lm_head``,
``contact_head.regression``) so that checkpoint conversion is a name table plus layer stacking. The
N layers are one stacked module run by ``lax.scan``: one compiled layer body whatever the depth.

Packed rows: ``segment_ids`` [B, L] numbers the sequences in a row 1, 2, ... (0 = padding).
Attention never crosses segments, rotary positions restart per segment, and the token-dropout
rescaling uses each segment's own mask ratio, so a packed row computes exactly what its sequences
compute alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from esmjax.config import ESM2Config
from esmjax.config import mesh as ax
from esmjax.models import attention
from esmjax.models import layers as nn
from esmjax.models.alphabet import EOS, MASK, PAD
from esmjax.parallel.sharding import constrain

# fair-esm: mask_ratio_train = 0.15 * 0.8, the masked fraction ESM-2 was trained with.
MASK_RATIO_TRAIN = 0.15 * 0.8


class RotaryEmbedding(nnx.Module):
    """Holds ``inv_freq`` as a checkpointed buffer: ESM-2 was trained with an fp16-rounded copy (HF
    ``convert_esm.py``), so recomputing it would shift every rotary phase."""

    def __init__(self, head_dim: int, theta: float):
        self.inv_freq = nn.Buffer(
            nn.rope_inv_freq(head_dim, theta), out_sharding=(None,), eager_sharding=False
        )


class Rows(NamedTuple):
    """What every layer's attention reads of the batch: the mask [B, 1, L, L] and segment ids
    [B, L] of its packed rows, the path (``choose_attention``) and whether to return weights."""

    mask: jax.Array
    segment_ids: jax.Array
    path: attention.AttentionPath
    need_weights: bool


class MultiheadAttention(nnx.Module):
    """Bidirectional self-attention with rotary positions (fair-esm ``MultiheadAttention``)."""

    def __init__(self, cfg: ESM2Config, *, rngs: nnx.Rngs):
        e, h, d = cfg.embed_dim, cfg.num_heads, cfg.head_dim
        kw = dict(rngs=rngs, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        self.q_proj = nn.Dense(e, (h, d), (ax.EMBED, ax.HEADS, ax.HEAD_DIM), **kw)
        self.k_proj = nn.Dense(e, (h, d), (ax.EMBED, ax.HEADS, ax.HEAD_DIM), **kw)
        self.v_proj = nn.Dense(e, (h, d), (ax.EMBED, ax.HEADS, ax.HEAD_DIM), **kw)
        self.out_proj = nn.Dense((h, d), e, (ax.HEADS, ax.HEAD_DIM, ax.EMBED), **kw)
        self.rot_emb = RotaryEmbedding(d, cfg.rope_theta)
        self.scaling = attention.scale_for(d)

    def __call__(
        self, x: jax.Array, rope: tuple[jax.Array, jax.Array], rows: Rows
    ) -> tuple[jax.Array, jax.Array | None]:
        """x [B, L, E], rope (cos, sin [B, L, 1, D] from ``rotary_tables`` of this layer's
        ``rot_emb.inv_freq``) -> ([B, L, E], weights [B, H, L, L] float32 or None)."""
        # fair-esm scales q before the rotation (equivalent, since the rotation is linear).
        q = self.q_proj(x) * jnp.asarray(self.scaling, x.dtype)  # [B, L, H, D]
        q = nn.apply_rotary(q, rope)
        k = nn.apply_rotary(self.k_proj(x), rope)
        v = self.v_proj(x)
        q = constrain(q, (ax.ACT_BATCH, ax.ACT_LEN, ax.ACT_HEADS, None))
        out, weights = attention.attend(
            rows.path, q, k, v, rows.mask, rows.segment_ids, need_weights=rows.need_weights
        )
        return self.out_proj(out), weights


class TransformerLayer(nnx.Module):
    """Pre-LayerNorm transformer layer: ``x + attn(LN(x))`` then ``x + fc2(gelu(fc1(LN(x))))``."""

    def __init__(self, cfg: ESM2Config, *, rngs: nnx.Rngs):
        e, f = cfg.embed_dim, cfg.mlp_dim
        kw = dict(rngs=rngs, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        self.self_attn = MultiheadAttention(cfg, rngs=rngs)
        self.self_attn_layer_norm = nn.LayerNorm(e, eps=cfg.layer_norm_eps, rngs=rngs)
        self.fc1 = nn.Dense(e, f, (ax.EMBED, ax.MLP), **kw)
        self.fc2 = nn.Dense(f, e, (ax.MLP, ax.EMBED), **kw)
        self.final_layer_norm = nn.LayerNorm(e, eps=cfg.layer_norm_eps, rngs=rngs)

    def __call__(
        self, x: jax.Array, rope: tuple[jax.Array, jax.Array], rows: Rows
    ) -> tuple[jax.Array, jax.Array | None]:
        h, weights = self.self_attn(self.self_attn_layer_norm(x), rope, rows)
        x = x + h
        h = self.fc1(self.final_layer_norm(x))  # [B, L, F]
        h = constrain(h, (ax.ACT_BATCH, ax.ACT_LEN, ax.ACT_MLP))
        x = x + self.fc2(h, gelu_input=True)  # fc2(gelu(h))
        return constrain(x, (ax.ACT_BATCH, ax.ACT_LEN, ax.ACT_EMBED)), weights


class RobertaLMHead(nnx.Module):
    """``dense -> gelu -> layer_norm -> x @ embed_tokens^T + bias`` (output weights tied to the
    embedding)."""

    def __init__(self, cfg: ESM2Config, *, rngs: nnx.Rngs):
        e = cfg.embed_dim
        self.dense = nn.Dense(e, e, (ax.EMBED, None), rngs=rngs, dtype=jnp.dtype(cfg.dtype))
        self.layer_norm = nn.LayerNorm(e, eps=cfg.layer_norm_eps, rngs=rngs)
        self.bias = nn.param(rngs, nn.zeros, (cfg.vocab_size,), (ax.VOCAB,))

    def __call__(self, x: jax.Array, embed: nn.Embed) -> jax.Array:
        """x [B, L, E] -> float32 logits [B, L, V]."""
        h = self.layer_norm(nn.gelu(self.dense(x)))
        return embed.attend(h.astype(jnp.float32)) + self.bias[...]


class ContactPredictionHead(nnx.Module):
    """Logistic regression over symmetrised, APC-corrected attention maps (Rao et al. 2021,
    "Transformer protein language models are unsupervised structure learners"; fair-esm
    ``ContactPredictionHead``)."""

    def __init__(self, cfg: ESM2Config, *, rngs: nnx.Rngs):
        self.regression = nn.Dense(cfg.num_layers * cfg.num_heads, 1, (None, None), rngs=rngs)

    def features(self, tokens: jax.Array, attentions: jax.Array) -> jax.Array:
        """tokens [B, L], attentions [B, N, H, L, L] (padding zeroed) -> features [B, L-2, L-2,
        N*H]."""
        not_eos = (tokens != EOS).astype(attentions.dtype)
        attentions = attentions * (
            not_eos[:, None, None, :, None] * not_eos[:, None, None, None, :]
        )
        attentions = attentions[
            ..., 1:-1, 1:-1
        ]  # drop BOS and the last column (EOS of the longest row)
        b, n, h, t, _ = attentions.shape
        x = attentions.reshape(b, n * h, t, t)
        x = x + jnp.swapaxes(x, -1, -2)  # symmetrize
        a1 = x.sum(-1, keepdims=True)
        a2 = x.sum(-2, keepdims=True)
        a12 = x.sum((-1, -2), keepdims=True)
        x = x - a1 * a2 / a12  # average product correction
        return jnp.moveaxis(x, 1, -1)

    def __call__(self, tokens: jax.Array, attentions: jax.Array) -> jax.Array:
        """-> contact probabilities [B, L-2, L-2]."""
        return jax.nn.sigmoid(self.regression(self.features(tokens, attentions))[..., 0])


def _layer_stack(cfg: ESM2Config, rngs: nnx.Rngs) -> TransformerLayer:
    """N layers as one module whose parameters have a leading ``layers`` axis."""

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: ax.LAYERS})
    def make(rngs: nnx.Rngs) -> TransformerLayer:
        return TransformerLayer(cfg, rngs=rngs)

    return make(rngs)


_REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def segments_from_tokens(tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Unpacked rows: one segment per row (id 1), padding id 0, positions 0..L-1 as fair-esm."""
    segment_ids = (tokens != PAD).astype(jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    return segment_ids, positions


def token_dropout_scale(tokens: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """[B, L] factor ``0.88 / (1 - n_mask / n_tokens)`` of each token's segment.

    ``n_tokens`` counts every token of the segment: BOS and EOS where the segment has them, and only
    residues for a cropped middle window, which is what fair-esm's ``(~padding_mask).sum(-1)``
    counts on that segment run alone. As in fair-esm, the 0.88 applies even when a sequence has no
    masks.
    """
    num_seg = segment_ids.shape[1] + 1

    def per_row(seg: jax.Array, is_mask: jax.Array) -> jax.Array:
        n_tok = jax.ops.segment_sum(jnp.ones_like(seg, jnp.float32), seg, num_seg)
        n_mask = jax.ops.segment_sum(is_mask.astype(jnp.float32), seg, num_seg)
        ratio = n_mask / jnp.maximum(n_tok, 1.0)
        return (1.0 - MASK_RATIO_TRAIN) / (1.0 - ratio)[seg]

    return jax.vmap(per_row)(segment_ids, tokens == MASK)


class ESM2(nnx.Module):
    """The ESM-2 masked language model with its contact head."""

    def __init__(self, cfg: ESM2Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed_tokens = nn.Embed(cfg.vocab_size, cfg.embed_dim, (ax.VOCAB, ax.EMBED), rngs=rngs)
        self.layers = _layer_stack(cfg, rngs)
        self.emb_layer_norm_after = nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps, rngs=rngs)
        self.lm_head = RobertaLMHead(cfg, rngs=rngs)
        self.contact_head = ContactPredictionHead(cfg, rngs=rngs)

    def __call__(
        self,
        tokens: jax.Array,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        *,
        repr_layers: Sequence[int] = (),
        need_head_weights: bool = False,
        return_contacts: bool = False,
        return_logits: bool = True,
    ) -> dict[str, jax.Array | dict[int, jax.Array]]:
        """Runs the model.

        Args:
          tokens: [B, L] int token ids (BOS ... EOS, right-padded with PAD; a packed segment
            cropped from a longer protein lacks BOS and/or EOS, see ``esmjax.data.sampling``).
          segment_ids: [B, L] int, 1.. per packed sequence, 0 for padding. Default: one sequence per
            row.
          positions: [B, L] int rotary positions, restarting at 0 per segment. Default: 0..L-1.
          repr_layers: which hidden states to return; 0 is the embedding, N the final
            (post-LayerNorm) output.
          need_head_weights: also return attention maps [B, N, H, L, L] (float32, padding zeroed).
          return_contacts: also return contact probabilities [B, L-2, L-2] (unpacked rows only).
          return_logits: compute the LM head.
        Returns:
          dict with ``logits`` [B, L, V] float32, ``representations`` {layer: [B, L, E]}, and
          optionally ``attentions`` and ``contacts``.
        """
        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype)
        if segment_ids is None:
            segment_ids, default_pos = segments_from_tokens(tokens)
            positions = default_pos if positions is None else positions
        elif positions is None:
            raise ValueError("packed rows (segment_ids) need their per-segment positions")
        need_head_weights = need_head_weights or return_contacts
        repr_layers = sorted({r % (cfg.num_layers + 1) if r < 0 else r for r in repr_layers})
        if any(r > cfg.num_layers for r in repr_layers):
            raise ValueError(f"repr_layers {repr_layers} out of range for {cfg.num_layers} layers")

        x = self.embed_tokens(tokens)  # [B, L, E] float32
        if cfg.token_dropout:
            x = jnp.where((tokens == MASK)[..., None], 0.0, x)
            x = x * token_dropout_scale(tokens, segment_ids)[..., None]
        x = x * (segment_ids > 0)[..., None].astype(x.dtype)
        x = constrain(x.astype(dtype), (ax.ACT_BATCH, ax.ACT_LEN, ax.ACT_EMBED))
        representations: dict[int, jax.Array] = {}
        if 0 in repr_layers:
            representations[0] = x

        path = attention.choose_attention(
            cfg.attention, dtype=dtype, head_dim=cfg.head_dim, need_weights=need_head_weights
        )
        rows = Rows(attention.attention_mask(segment_ids), segment_ids, path, need_head_weights)
        collect_hidden = any(0 < r < cfg.num_layers for r in repr_layers)
        # Every layer's rotary cos/sin, computed once: [N, B, L, 1, D] each.
        inv_freq = self.layers.self_attn.rot_emb.inv_freq[...].astype(jnp.float32)  # [N, D/2]
        rope = nn.rotary_tables(positions, inv_freq)
        graphdef, stacked = nnx.split(self.layers)

        def body(h: jax.Array, xs) -> tuple[jax.Array, tuple]:
            layer_state, layer_rope = xs
            layer = nnx.merge(graphdef, layer_state)
            h, weights = layer(h, layer_rope, rows)
            return h, (h if collect_hidden else None, weights)

        if cfg.remat != "none":
            # ``dots`` saves matmul outputs only, so an attention kernel's forward (a custom VJP
            # around a pallas_call) runs again in the backward: its outputs would cost far more
            # memory per chip than the few FLOPs they spare.
            body = jax.checkpoint(body, policy=_REMAT[cfg.remat], prevent_cse=False)
        x, (hidden, weights) = jax.lax.scan(body, x, (stacked, rope))

        for r in repr_layers:
            if 0 < r < cfg.num_layers:
                representations[r] = hidden[r - 1]
        x = self.emb_layer_norm_after(x)
        if cfg.num_layers in repr_layers:
            representations[cfg.num_layers] = x

        out: dict = {"representations": representations}
        if return_logits:
            out["logits"] = self.lm_head(x, self.embed_tokens)
        if need_head_weights:
            keep = (segment_ids > 0).astype(jnp.float32)
            attentions = jnp.moveaxis(weights, 0, 1)  # [B, N, H, L, L]
            attentions = attentions * (keep[:, None, None, :, None] * keep[:, None, None, None, :])
            out["attentions"] = attentions
            if return_contacts:
                out["contacts"] = self.contact_head(tokens, attentions)
        return out


def abstract_model(cfg: ESM2Config) -> tuple[nnx.GraphDef, nnx.State]:
    """Shapes, dtypes and logical axes of an ESM2, without allocating it."""
    return nnx.split(nnx.eval_shape(lambda: ESM2(cfg, rngs=nnx.Rngs(0))))
