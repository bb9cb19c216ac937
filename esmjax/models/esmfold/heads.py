"""ESMFold output heads and confidence metrics (fair-esm ``esmfold.py``; OpenFold
``utils/loss.py``).

Glossary: B batch, L residues, Z pair channels, N structure-module iterations, A atoms (37).

* distogram: ``Linear(Z, 64)`` on the trunk pair state, symmetrised.
* pTM / PAE: ``Linear(Z, 64)`` logits over aligned-error bins of 0.5 Angstrom up to 31 (+ one
  overflow bin). pTM is computed per sequence over its own residues (fair-esm; HF computes one value
  over the padded batch).
* pLDDT: ``LayerNorm -> Linear -> Linear -> Linear`` (no activations between them, as in the
  reference) on every iteration's state, 50 bins per atom37 slot; pLDDT is the expected bin centre
  of the last iteration, x100.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from esmjax.models import layers as nn
from esmjax.models.esmfold.triangle import dense

DISTOGRAM_BINS = 64
LDDT_BINS = 50
PAE_MAX_BIN = 31.0


def lddt_head(single_dim: int, hidden: int, *, rngs: nnx.Rngs) -> nnx.List:
    """Keys ``lddt_head.{0,1,2,3}``: LayerNorm and three Linears with no nonlinearity in between."""
    return nnx.List(
        [
            nn.LayerNorm(single_dim, rngs=rngs),
            dense(single_dim, hidden, rngs),
            dense(hidden, hidden, rngs),
            dense(hidden, 37 * LDDT_BINS, rngs),
        ]
    )


def apply_lddt_head(layers: nnx.List, states: jax.Array) -> jax.Array:
    """states [N, B, L, S] -> logits [N, B, L, 37, 50]."""
    x = states
    for layer in layers:
        x = layer(x)
    return x.reshape(x.shape[:-1] + (37, LDDT_BINS))


def plddt(logits: jax.Array) -> jax.Array:
    """Expected lDDT on 0..100 from [..., 50] logits (bin centres (i + 0.5) / 50, fair-esm
    ``categorical_lddt``)."""
    edges = jnp.linspace(0.0, 1.0, LDDT_BINS + 1, dtype=jnp.float32)
    centres = (edges[:-1] + edges[1:]) / 2
    return 100.0 * (jax.nn.softmax(logits, axis=-1) @ centres)


def _aligned_error_bin_centres() -> jax.Array:
    """0.25, 0.75, ..., 31.25 and the overflow bin 31.75 (OpenFold ``_calculate_bin_centers``)."""
    bounds = jnp.linspace(0.0, PAE_MAX_BIN, DISTOGRAM_BINS - 1, dtype=jnp.float32)
    step = bounds[1] - bounds[0]
    centres = bounds + step / 2
    return jnp.concatenate([centres, centres[-1:] + step])


def predicted_aligned_error(logits: jax.Array) -> jax.Array:
    """Expected aligned error in Angstrom [..., L, L] from pTM-head logits [..., L, L, 64]."""
    return jnp.sum(jax.nn.softmax(logits, axis=-1) * _aligned_error_bin_centres(), axis=-1)


def max_predicted_aligned_error() -> float:
    """The largest value PAE can take (the overflow bin's centre, 31.75 Angstrom)."""
    return float(_aligned_error_bin_centres()[-1])


def predicted_tm(logits: jax.Array, mask: jax.Array, eps: float = 1e-8) -> jax.Array:
    """pTM of each sequence over its own residues (AF2 Suppl. 1.9.7, OpenFold ``compute_tm``).

    Args:
      logits: [B, L, L, 64]; mask: [B, L] float, 1 on residues (its sum is each sequence's length
        N).
    Returns:
      [B]: ``max_i sum_j p(i, j) f(e_ij) / N`` with ``f(e) = 1 / (1 + (e / d0)^2)``,
      ``d0 = 1.24 (max(N, 19) - 15)^(1/3) - 1.8``.
    """
    n = jnp.sum(mask, axis=-1)  # [B]
    d0 = 1.24 * (jnp.maximum(n, 19.0) - 15.0) ** (1.0 / 3) - 1.8
    centres = _aligned_error_bin_centres()
    tm_per_bin = 1.0 / (1.0 + centres**2 / d0[:, None] ** 2)  # [B, 64]
    term = jnp.sum(
        jax.nn.softmax(logits, axis=-1) * tm_per_bin[:, None, None, :], axis=-1
    )  # [B, L, L]
    weights = mask / (eps + n[:, None])
    per_alignment = jnp.sum(term * weights[:, None, :], axis=-1)  # [B, L]
    return jnp.max(jnp.where(mask > 0, per_alignment, -jnp.inf), axis=-1).clip(min=0.0)
