"""The ESMFold folding trunk (Lin et al. 2023; fair-esm
``esm/esmfold/v1/{trunk,tri_self_attn_block}.py``).

Glossary: B batch, L residues, S single channels, Z pair channels, H heads, D head width, N blocks.

``N`` ``TriangularSelfAttentionBlock``s are one stacked module (leading ``blocks`` axis) run by
``lax.scan``: one compiled block body whatever the depth. ``FoldingTrunk.__call__`` is the recycling
  loop: a ``lax.fori_loop``
whose carry is the previous pass's trunk states and structure, passed back through ``stop_gradient``
so that, as in the reference (every pass but the last under ``torch.no_grad``), only the last pass
carries gradients. On the first pass the recycled states are zeros, and the recycling LayerNorms
turn them into their bias vectors, not zeros; the recycled distogram bins are 0 (``recycle_disto``
row 0, used as stored).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from esmjax.models import layers as nn
from esmjax.models.esmfold.config import TrunkConfig
from esmjax.models.esmfold.structure import StructureModule
from esmjax.models.esmfold.triangle import (
    PairToSequence,
    SequenceToPair,
    TriangleAttention,
    TriangleMultiplication,
    dense,
)
from esmjax.models.geometry.rigid import Vec3

# Recycled distogram: squared-distance boundaries linspace(3.375, 21.375, 14)^2 on the virtual
# C-beta (15 bins).
RECYCLE_BINS = 15
RECYCLE_MIN, RECYCLE_MAX = 3.375, 21.375


class ResidueMLP(nnx.Module):
    """``x + Linear(ReLU(Linear(LayerNorm(x))))`` with a 4x hidden width (fair-esm ``ResidueMLP``,
    keys ``mlp.{0,1,3}``; index 2 is the parameter-free ReLU)."""

    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs):
        self.mlp = nnx.List(
            [nn.LayerNorm(dim, rngs=rngs), dense(dim, hidden, rngs), None, dense(hidden, dim, rngs)]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        def residue(x):  # [..., C] -> [..., C]
            return x + self.mlp[3](jax.nn.relu(self.mlp[1](self.mlp[0](x))))

        return nn.map_positions(residue, x)


class SequenceAttention(nnx.Module):
    """Gated self-attention over residues with a pair bias (fair-esm ``misc.Attention``, gated).

    ``proj`` maps to 3E channels read as ``[H, 3D]`` per head and split on the last axis, so q, k
    and v are interleaved per head, not stacked as [Q | K | V]; converting the torch weight needs no
    reordering because this module reads it the same way.
    """

    def __init__(self, dim: int, num_heads: int, head_width: int, *, rngs: nnx.Rngs):
        self.num_heads, self.head_width = num_heads, head_width
        self.proj = dense(dim, 3 * dim, rngs, use_bias=False)
        self.o_proj = dense(dim, dim, rngs)
        self.g_proj = dense(dim, dim, rngs)

    def __call__(self, x: jax.Array, mask: jax.Array, bias: jax.Array) -> jax.Array:
        """x [B, L, S], mask [B, L], bias [B, L, L, H] -> [B, L, S]."""
        b, l, _ = x.shape
        t = self.proj(x).reshape(b, l, self.num_heads, 3 * self.head_width)
        q, k, v = jnp.split(t, 3, axis=-1)  # [B, L, H, D] each
        q = q * self.head_width**-0.5
        a = jnp.einsum("bqhd,bkhd->bhqk", q, k) + jnp.moveaxis(bias, -1, 1)
        # A finite "minus infinity": the same softmax as -inf for any row with a valid key, and no
        # NaN for the
        # all-padding rows that fill up a fixed-size batch.
        a = jnp.where(mask[:, None, None, :] > 0, a, jnp.finfo(a.dtype).min)
        y = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(a, axis=-1), v).reshape(b, l, -1)
        return self.o_proj(jax.nn.sigmoid(self.g_proj(x)) * y)


class TriangularSelfAttentionBlock(nnx.Module):
    """One trunk block (fair-esm ``TriangularSelfAttentionBlock``), in the reference's exact order:

    sequence attention with pair bias, sequence MLP, sequence->pair, triangle multiplication
    outgoing then incoming, triangle attention starting then ending node, pair MLP. (Dropout is 0 in
    the released model.)
    """

    def __init__(self, cfg: TrunkConfig, *, rngs: nnx.Rngs):
        s, z = cfg.single_dim, cfg.pair_dim
        self.layernorm_1 = nn.LayerNorm(s, rngs=rngs)
        self.sequence_to_pair = SequenceToPair(s, z // 2, z, rngs=rngs)
        self.pair_to_sequence = PairToSequence(z, cfg.single_heads, rngs=rngs)
        self.seq_attention = SequenceAttention(
            s, cfg.single_heads, cfg.single_head_width, rngs=rngs
        )
        self.tri_mul_out = TriangleMultiplication(z, outgoing=True, rngs=rngs)
        self.tri_mul_in = TriangleMultiplication(z, outgoing=False, rngs=rngs)
        self.tri_att_start = TriangleAttention(
            z, cfg.pair_head_width, cfg.pair_heads, starting=True, rngs=rngs
        )
        self.tri_att_end = TriangleAttention(
            z, cfg.pair_head_width, cfg.pair_heads, starting=False, rngs=rngs
        )
        self.mlp_seq = ResidueMLP(s, 4 * s, rngs=rngs)
        self.mlp_pair = ResidueMLP(z, 4 * z, rngs=rngs)

    def __call__(
        self, s: jax.Array, z: jax.Array, mask: jax.Array, chunk_size: int | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """s [B, L, S], z [B, L, L, Z], mask [B, L] float -> (s, z)."""
        bias = self.pair_to_sequence(z)
        s = s + self.seq_attention(self.layernorm_1(s), mask, bias)
        s = self.mlp_seq(s)
        z = z + self.sequence_to_pair(s)
        tri_mask = mask[:, :, None] * mask[:, None, :]
        z = z + self.tri_mul_out(z, tri_mask)
        z = z + self.tri_mul_in(z, tri_mask)
        z = z + self.tri_att_start(z, tri_mask, chunk_size)
        z = z + self.tri_att_end(z, tri_mask, chunk_size)
        return s, self.mlp_pair(z)


class RelativePosition(nnx.Module):
    """Relative position embedding: ``clip(residx_j - residx_i, -bins, bins) + bins + 1``; index 0
    is reserved for pairs where either residue is padding (fair-esm ``RelativePosition``)."""

    def __init__(self, bins: int, pair_dim: int, *, rngs: nnx.Rngs):
        self.bins = bins
        self.embedding = nn.Embed(2 * bins + 2, pair_dim, (None, None), rngs=rngs)

    def __call__(self, residx: jax.Array, mask: jax.Array) -> jax.Array:
        """residx [B, L] int, mask [B, L] -> [B, L, L, Z]."""
        diff = (
            jnp.clip(residx[:, None, :] - residx[:, :, None], -self.bins, self.bins) + self.bins + 1
        )
        diff = jnp.where((mask[:, None, :] * mask[:, :, None]) > 0, diff, 0)
        return self.embedding(diff)


def recycle_bins(atom14: jax.Array) -> jax.Array:
    """Distogram bins [B, L, L] of the virtual C-beta placed from N, CA, C (atom14 slots 0..2)
    [B, L, 14, 3]."""
    n, ca, c = (Vec3.from_array(atom14[..., i, :]) for i in range(3))
    b, c = ca - n, c - ca
    a = b.cross(c)
    cb = a * -0.58273431 + b * 0.56802827 - c * 0.54067466 + ca
    d2 = (
        cb.map(lambda t: t[..., None, :]) - cb.map(lambda t: t[..., :, None])
    ).norm_sq()  # [B, L, L]
    bounds = jnp.linspace(RECYCLE_MIN, RECYCLE_MAX, RECYCLE_BINS - 1, dtype=jnp.float32) ** 2
    return jnp.sum(d2[..., None] > bounds, axis=-1)


def _block_stack(cfg: TrunkConfig, rngs: nnx.Rngs) -> TriangularSelfAttentionBlock:
    @nnx.split_rngs(splits=cfg.num_blocks)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "blocks"})
    def make(rngs: nnx.Rngs) -> TriangularSelfAttentionBlock:
        return TriangularSelfAttentionBlock(cfg, rngs=rngs)

    return make(rngs)


class FoldingTrunk(nnx.Module):
    """Blocks, recycling and the structure module (fair-esm ``FoldingTrunk``)."""

    def __init__(self, cfg: TrunkConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        s, z = cfg.single_dim, cfg.pair_dim
        self.pairwise_positional_embedding = RelativePosition(cfg.position_bins, z, rngs=rngs)
        self.blocks = _block_stack(cfg, rngs)
        self.recycle_s_norm = nn.LayerNorm(s, rngs=rngs)
        self.recycle_z_norm = nn.LayerNorm(z, rngs=rngs)
        self.recycle_disto = nn.Embed(RECYCLE_BINS, z, (None, None), rngs=rngs)
        self.structure_module = StructureModule(cfg.structure_module, rngs=rngs)
        self.trunk2sm_s = dense(s, cfg.structure_module.single_dim, rngs)
        self.trunk2sm_z = dense(z, cfg.structure_module.pair_dim, rngs)

    def run_blocks(
        self, s: jax.Array, z: jax.Array, mask: jax.Array, chunk_size: int | None = None
    ):
        """All N blocks, scanned: s [B, L, S], z [B, L, L, Z] -> (s, z)."""
        graphdef, stacked = nnx.split(self.blocks)

        def body(carry, block_state):
            block = nnx.merge(graphdef, block_state)
            return block(*carry, mask, chunk_size), None

        (s, z), _ = jax.lax.scan(body, (s, z), stacked)
        return s, z

    def __call__(
        self,
        s0: jax.Array,
        z0: jax.Array,
        aatype: jax.Array,
        residx: jax.Array,
        mask: jax.Array,
        num_passes: int,
        chunk_size: int | None = None,
    ) -> dict[str, jax.Array]:
        """Runs ``num_passes`` trunk + structure-module passes.

        Args:
          s0: [B, L, S] single features; z0: [B, L, L, Z] pair features.
          aatype: [B, L] AF2 residue types; residx: [B, L] residue indices; mask: [B, L] float, 1 =
            residue.
          num_passes: total passes (fair-esm: ``num_recycles + 1``; ``max_recycles`` when None).
          chunk_size: row chunk of the triangle attentions (memory only; identical results).
        Returns:
          the last pass's structure-module outputs plus ``s_s`` [B, L, S] and ``s_z`` [B, L, L, Z].
        """
        relpos = self.pairwise_positional_embedding(residx, mask)  # the same every pass

        def one_pass(prev_s, prev_z, bins):
            rs = self.recycle_s_norm(jax.lax.stop_gradient(prev_s))
            rz = self.recycle_z_norm(jax.lax.stop_gradient(prev_z))
            rz = rz + self.recycle_disto(jax.lax.stop_gradient(bins))
            s, z = self.run_blocks(s0 + rs, z0 + rz + relpos, mask, chunk_size)
            structure = self.structure_module(self.trunk2sm_s(s), self.trunk2sm_z(z), aatype, mask)
            return s, z, structure

        def body(_, carry):
            s, z, bins, _ = carry
            s, z, structure = one_pass(s, z, bins)
            return s, z, recycle_bins(structure["positions"][-1]), structure

        zeros_s, zeros_z = jnp.zeros_like(s0), jnp.zeros_like(z0)
        bins0 = jnp.zeros(z0.shape[:-1], jnp.int32)
        shapes = jax.eval_shape(lambda: one_pass(zeros_s, zeros_z, bins0)[2])
        structure0 = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
        s, z, _, structure = jax.lax.fori_loop(
            0, num_passes, body, (zeros_s, zeros_z, bins0, structure0)
        )
        return {**structure, "s_s": s, "s_z": z}
