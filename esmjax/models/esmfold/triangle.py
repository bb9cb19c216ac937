"""Pair-representation updates of the ESMFold trunk: triangle multiplication, triangle attention,
and the sequence <-> pair couplings (Jumper et al. 2021, Suppl. Alg. 11-14; Lin et al. 2023,
"folding trunk").

Glossary: B batch, L residues (I, J, K index them), S single channels, Z pair channels, H heads, D
  head width.

Every Linear keeps the torch layout's meaning with a ``[in, out]`` kernel, and parameter names are
those of OpenFold / fair-esm (``linear_a_p``, ``layer_norm_in``, ``mha.linear_q``, ...), so weight
conversion is a name table. Masked positions enter exactly as in the reference: ``mask *
sigmoid(gate) * proj`` in the multiplicative update, and an additive ``inf * (mask - 1)`` bias in
triangle attention.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from esmjax.models import layers as nn
from esmjax.models.attention.xla import CPU_FUSED_MAX_KEYS, softmax_attention
from esmjax.parallel.sharding import compute_platform


def dense(in_dim: int, out_dim: int, rngs: nnx.Rngs, use_bias: bool = True) -> nn.Dense:
    """A float32 Linear with a ``[in, out]`` kernel (no sharding axes: the trunk runs
    replicated)."""
    return nn.Dense(in_dim, out_dim, (None, None), rngs=rngs, use_bias=use_bias)


class TriangleMultiplication(nnx.Module):
    """Triangle multiplicative update, "outgoing" (Suppl. Alg. 11) or "incoming" (Alg. 12) edges.

    Outgoing: ``p_ij = sum_k a_ik b_jk``; incoming: ``p_ij = sum_k a_ki b_kj``.
    """

    def __init__(self, dim: int, *, outgoing: bool, rngs: nnx.Rngs):
        self.outgoing = outgoing
        for name in (
            "linear_a_p",
            "linear_a_g",
            "linear_b_p",
            "linear_b_g",
            "linear_g",
            "linear_z",
        ):
            setattr(self, name, dense(dim, dim, rngs))
        self.layer_norm_in = nn.LayerNorm(dim, rngs=rngs)
        self.layer_norm_out = nn.LayerNorm(dim, rngs=rngs)

    def __call__(self, z: jax.Array, mask: jax.Array) -> jax.Array:
        """z [B, L, L, Z], mask [B, L, L] -> update [B, L, L, Z].

        The product runs channel-major, as a batch of Z matrix products over [Z, B, X, Y] arrays
        (outgoing edges contract their last axis, incoming edges their leading one). The four
        gated projections are one matrix product whose left operand is the transposed [4Z, Z]
        kernel, so they come out channel-major and the gating runs in that layout, with no
        transpose of ``a`` or ``b``; the product is transposed back once. Channels-last, as the
        reference writes it, XLA:CPU fuses transposes into the gating, which makes the two updates a
        large share of a CPU fold.
        """
        z = self.layer_norm_in(z)
        lins = (self.linear_a_p, self.linear_a_g, self.linear_b_p, self.linear_b_g)
        kernel_t = jnp.concatenate([lin.kernel[...] for lin in lins], axis=1).T  # [4Z, Z]
        bias = jnp.concatenate([lin.bias[...] for lin in lins])[:, None, None, None]
        proj = jax.lax.dot_general(kernel_t, z, (((1,), (3,)), ((), ()))) + bias  # [4Z, B, X, Y]
        a_p, a_g, b_p, b_g = jnp.split(proj, 4)
        m = mask[None]  # [1, B, X, Y]
        a = m * jax.nn.sigmoid(a_g) * a_p  # [Z, B, I, K] (incoming: [Z, B, K, I])
        b = m * jax.nn.sigmoid(b_g) * b_p  # [Z, B, J, K] (incoming: [Z, B, K, J])
        if self.outgoing:
            p = jnp.einsum("cbik,cbjk->cbij", a, b)
        else:
            p = jnp.einsum("cbki,cbkj->cbij", a, b)
        p = jnp.transpose(p, (1, 2, 3, 0))  # [B, I, J, Z]
        return self.linear_z(self.layer_norm_out(p)) * jax.nn.sigmoid(self.linear_g(z))


class GatedAttention(nnx.Module):
    """OpenFold ``Attention`` with gating (AF2 Suppl. Alg. 13/14 inner attention): per-head q/k/v
    without bias, ``q / sqrt(D)``, additive biases, sigmoid gate from the query input, output
    Linear with bias."""

    def __init__(self, dim: int, head_width: int, num_heads: int, *, rngs: nnx.Rngs):
        self.num_heads, self.head_width = num_heads, head_width
        hd = head_width * num_heads
        self.linear_q = dense(dim, hd, rngs, use_bias=False)
        self.linear_k = dense(dim, hd, rngs, use_bias=False)
        self.linear_v = dense(dim, hd, rngs, use_bias=False)
        self.linear_o = dense(hd, dim, rngs)
        self.linear_g = dense(dim, hd, rngs)

    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
        """x [..., J, C] (rows of the pair map), bias broadcastable to [..., H, J, K] -> [..., J,
        C].

        On a CPU the layout decides the speed, so q, k, v are made heads-major ([..., H, J, D]) for
        ``softmax_attention``, which normalises the softmax after the product with v (XLA:CPU runs
        it fast only with both).
        """
        h, d = self.num_heads, self.head_width

        def heads_major(t: jax.Array) -> jax.Array:  # [..., J, H * D] -> [..., H, J, D]
            return jnp.swapaxes(t.reshape(t.shape[:-1] + (h, d)), -2, -3)

        q = heads_major(self.linear_q(x) / jnp.sqrt(jnp.float32(d)))
        k, v = heads_major(self.linear_k(x)), heads_major(self.linear_v(x))
        o = softmax_attention(q, k, v, bias)  # [..., H, J, D]
        g = jax.nn.sigmoid(self.linear_g(x))
        o = jnp.swapaxes(o, -2, -3) * g.reshape(g.shape[:-1] + (h, d))  # [..., J, H, D]
        return self.linear_o(o.reshape(o.shape[:-2] + (-1,)))


# XLA:CPU runs a triangle attention call as one fused kernel that slows sharply past
# ``CPU_FUSED_MAX_KEYS`` keys; beyond that, row chunks whose [chunk, H, L, L] scores fit in 8 MiB
# stay fast, while up to it the whole map is faster than any chunking.
_CPU_CHUNK_BYTES = 8 << 20


def cpu_row_chunk(batch: int, length: int, heads: int, chunk_size: int | None) -> int | None:
    """The row chunk a triangle attention over ``length`` x ``length`` uses: ``chunk_size`` (a
    memory cap) or, on a CPU beyond 256 keys, the smaller of it and the 8 MiB chunk above."""
    if compute_platform() != "cpu" or length <= CPU_FUSED_MAX_KEYS:
        return chunk_size
    fast = max(1, _CPU_CHUNK_BYTES // (4 * batch * heads * length * length))
    return fast if chunk_size is None else min(chunk_size, fast)


class TriangleAttention(nnx.Module):
    """Triangle self-attention around the starting node (Suppl. Alg. 13) or the ending node (Alg.
    14, the same computation on the transposed pair map).

    ``chunk_size`` splits the rows (the batch-like axis of the axial attention) into groups of that
    many, run one after another with ``lax.map``: the [H, L, L] logits then exist for ``chunk_size``
    rows at a time instead of all L, the same memory saving as OpenFold's ``chunk_layer``; results
    are identical. On a CPU, beyond 256 residues, rows are chunked for speed too
    (``cpu_row_chunk``).
    """

    def __init__(
        self,
        dim: int,
        head_width: int,
        num_heads: int,
        *,
        starting: bool,
        rngs: nnx.Rngs,
        inf: float = 1e9,
    ):
        self.starting, self.inf = starting, inf
        self.layer_norm = nn.LayerNorm(dim, rngs=rngs)
        self.linear = dense(dim, num_heads, rngs, use_bias=False)
        self.mha = GatedAttention(dim, head_width, num_heads, rngs=rngs)

    def __call__(self, z: jax.Array, mask: jax.Array, chunk_size: int | None = None) -> jax.Array:
        """z [B, L, L, Z], mask [B, L, L] -> update [B, L, L, Z]."""
        if not self.starting:
            z, mask = jnp.swapaxes(z, 1, 2), jnp.swapaxes(mask, 1, 2)
        x = self.layer_norm(z)
        tri_bias = jnp.moveaxis(self.linear(x), -1, 1)  # [B, H, J, K], shared by every row I
        mask_bias = self.inf * (mask - 1.0)  # [B, I, K]

        def row(args: tuple[jax.Array, jax.Array]) -> jax.Array:
            xr, mr = args  # one row I: [B, J, Z], [B, K]
            return self.mha(xr, mr[:, None, None, :] + tri_bias)

        xs = (jnp.moveaxis(x, 1, 0), jnp.moveaxis(mask_bias, 1, 0))
        chunk_size = cpu_row_chunk(x.shape[0], x.shape[2], self.mha.num_heads, chunk_size)
        # lax.map with batch_size vmaps ``row`` over chunk_size rows at a time (the last chunk may
        # be shorter).
        out = (
            jax.vmap(row)(xs) if chunk_size is None else jax.lax.map(row, xs, batch_size=chunk_size)
        )
        out = jnp.moveaxis(out, 0, 1)  # [B, I, J, Z]
        return jnp.swapaxes(out, 1, 2) if not self.starting else out


class SequenceToPair(nnx.Module):
    """Outer product and difference of projected single states (fair-esm ``SequenceToPair``):
    ``z_ij = o_proj([q_j * k_i, q_j - k_i])``."""

    def __init__(self, single_dim: int, inner_dim: int, pair_dim: int, *, rngs: nnx.Rngs):
        self.layernorm = nn.LayerNorm(single_dim, rngs=rngs)
        self.proj = dense(single_dim, 2 * inner_dim, rngs)
        self.o_proj = dense(2 * inner_dim, pair_dim, rngs)

    def __call__(self, s: jax.Array) -> jax.Array:
        """s [B, L, S] -> [B, L, L, Z]."""
        q, k = jnp.split(self.proj(self.layernorm(s)), 2, axis=-1)
        q, k = q[:, None, :, :], k[:, :, None, :]
        return self.o_proj(jnp.concatenate([q * k, q - k], axis=-1))


class PairToSequence(nnx.Module):
    """Per-head attention bias for the sequence attention from the pair state (fair-esm
    ``PairToSequence``)."""

    def __init__(self, pair_dim: int, num_heads: int, *, rngs: nnx.Rngs):
        self.layernorm = nn.LayerNorm(pair_dim, rngs=rngs)
        self.linear = dense(pair_dim, num_heads, rngs, use_bias=False)

    def __call__(self, z: jax.Array) -> jax.Array:
        """z [B, L, L, Z] -> bias [B, L, L, H]."""
        return self.linear(self.layernorm(z))
