"""ESMFold (Lin et al. 2023, "Evolutionary-scale prediction of atomic-level protein structure with a
language model", Science 379:1123): the ESM-2 stem's hidden states, combined and projected, feed the
folding trunk, whose structure module places atoms; heads give the distogram, pLDDT, pTM and PAE.

Glossary: B batch, L residues, T = L + 2 LM tokens, E LM width, N LM layers, S single, Z pair
  channels.

Inputs are AF2 residue types (``A R N D ... V`` = 0..19, X = 20), a residue mask and residue
indices, as in fair-esm's ``ESMFold.forward``. Parameter names follow fair-esm's state dict: ``esm``
(the ``ESM2`` module, its own fair-esm names), ``esm_s_combine``, ``esm_s_mlp.{0,1,3}``,
``embedding``, ``trunk.*``, ``distogram_head``, ``ptm_head``, ``lm_head``, ``lddt_head.{0,1,2,3}``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from esmjax.models import alphabet as tokenizer
from esmjax.models import layers as nn
from esmjax.models.esm2 import ESM2
from esmjax.models.esmfold import heads
from esmjax.models.esmfold.config import ESMFoldConfig
from esmjax.models.esmfold.triangle import dense
from esmjax.models.esmfold.trunk import FoldingTrunk
from esmjax.models.geometry import all_atom
from esmjax.models.geometry import residue_constants as rc

# fair-esm ``ESMFold._af2_to_esm``: index 0 (padding) -> <pad>, then AF2 order A R N ... V X -> ESM
# token ids.
AF2_TO_ESM = np.array(
    [tokenizer.PAD] + [tokenizer.TOKEN_TO_ID[r] for r in rc.RESTYPES_WITH_X], np.int32
)  # = [1, 5, 10, 17, 13, 23, 16, 9, 6, 21, 12, 4, 15, 20, 18, 14, 8, 11, 22, 19, 7, 24]
NUM_AA_EMBED = rc.NUM_RESTYPES + 3  # padding (shared with Alanine, see below), 20 types, X, mask


def lm_tokens(aatype: jax.Array, mask: jax.Array) -> jax.Array:
    """ESM-2 input [B, L + 2]: BOS, the residues, EOS written at the first padding slot, padding
    after.

    As fair-esm: ``af2_to_esm[(aa + 1) * mask]``, then BOS prepended and one padding column
    appended, so the longest row's EOS lands in that extra column.
    """
    esmaa = jnp.take(jnp.asarray(AF2_TO_ESM), jnp.where(mask > 0, aatype + 1, 0))
    b = aatype.shape[0]
    toks = jnp.concatenate(
        [
            jnp.full((b, 1), tokenizer.BOS, esmaa.dtype),
            esmaa,
            jnp.full((b, 1), tokenizer.PAD, esmaa.dtype),
        ],
        1,
    )
    first_pad = jnp.sum(toks != tokenizer.PAD, axis=1)
    return toks.at[jnp.arange(b), first_pad].set(tokenizer.EOS)


class ESMFold(nnx.Module):
    """ESM-2 stem + folding trunk + heads."""

    def __init__(self, cfg: ESMFoldConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        e, n = cfg.esm.embed_dim, cfg.esm.num_layers
        s, z = cfg.trunk.single_dim, cfg.trunk.pair_dim
        self.esm = ESM2(cfg.esm, rngs=rngs)
        self.esm_s_combine = nn.param(rngs, nn.zeros, (n + 1,), (None,))
        self.esm_s_mlp = nnx.List(
            [nn.LayerNorm(e, rngs=rngs), dense(e, s, rngs), None, dense(s, s, rngs)]
        )
        # Alanine (AF2 index 0) shares row 0 with padding: fair-esm's quirk, kept so weights load as
        # stored.
        self.embedding = nn.Embed(NUM_AA_EMBED, s, (None, None), rngs=rngs)
        self.trunk = FoldingTrunk(cfg.trunk, rngs=rngs)
        self.distogram_head = dense(z, heads.DISTOGRAM_BINS, rngs)
        self.ptm_head = dense(z, heads.DISTOGRAM_BINS, rngs)
        self.lm_head = dense(s, NUM_AA_EMBED, rngs)
        self.lddt_head = heads.lddt_head(
            cfg.trunk.structure_module.single_dim, cfg.lddt_head_hid_dim, rngs=rngs
        )

    def language_features(self, aatype: jax.Array, mask: jax.Array) -> jax.Array:
        """[B, L, N + 1, E] float32: every ESM-2 hidden state (embedding .. final LayerNorm) of
        each residue."""
        n = self.cfg.esm.num_layers
        out = self.esm(
            lm_tokens(aatype, mask), repr_layers=tuple(range(n + 1)), return_logits=False
        )
        reps = jnp.stack([out["representations"][i] for i in range(n + 1)], axis=2)
        return jax.lax.stop_gradient(reps[:, 1:-1].astype(jnp.float32))  # the LM is frozen

    def __call__(
        self,
        aatype: jax.Array,
        mask: jax.Array,
        residx: jax.Array,
        *,
        num_recycles: int | None = None,
        chunk_size: int | None = None,
    ) -> dict[str, jax.Array]:
        """Folds a batch.

        Args:
          aatype: [B, L] int AF2 residue types; mask: [B, L] (1 residue, 0 padding); residx: [B, L]
            int.
          num_recycles: extra trunk passes; ``None`` runs ``trunk.max_recycles`` passes in all
            (fair-esm: 4), ``k`` runs ``k + 1``.
          chunk_size: row chunk of the triangle attentions (memory only).
        Returns:
          the structure-module stacks (see ``StructureModule``), ``s_s``, ``s_z``,
          ``distogram_logits`` [B, L, L, 64], ``lm_logits`` [B, L, 23], ``lddt_head`` [N, B, L, 37,
          50], ``plddt`` [B, L, 37] (0..100), ``ptm_logits`` [B, L, L, 64], ``ptm`` [B],
          ``predicted_aligned_error`` [B, L, L] (Angstrom), ``atom37`` [B, L, 37, 3],
          ``atom37_exists`` [B, L, 37], ``atom14_exists`` [B, L, 14].
        """
        if num_recycles is not None and num_recycles < 0:
            raise ValueError(f"num_recycles must be >= 0, got {num_recycles}")
        num_passes = self.cfg.trunk.max_recycles if num_recycles is None else num_recycles + 1
        mask = mask.astype(jnp.float32)
        aatype = aatype.astype(jnp.int32)

        feats = self.language_features(aatype, mask)  # [B, L, N + 1, E]
        esm_s = jnp.einsum("n,blne->ble", jax.nn.softmax(self.esm_s_combine[...]), feats)
        s0 = self.esm_s_mlp[3](jax.nn.relu(self.esm_s_mlp[1](self.esm_s_mlp[0](esm_s))))
        s0 = s0 + self.embedding(aatype)
        b, l = aatype.shape
        z0 = jnp.zeros((b, l, l, self.cfg.trunk.pair_dim), jnp.float32)

        out = self.trunk(s0, z0, aatype, residx, mask, num_passes, chunk_size)
        disto = self.distogram_head(out["s_z"])
        out["distogram_logits"] = (disto + jnp.swapaxes(disto, 1, 2)) / 2
        out["lm_logits"] = self.lm_head(out["s_s"])
        out["lddt_head"] = heads.apply_lddt_head(self.lddt_head, out["states"])
        out["plddt"] = heads.plddt(out["lddt_head"][-1])
        out["ptm_logits"] = self.ptm_head(out["s_z"])
        out["ptm"] = heads.predicted_tm(out["ptm_logits"], mask)
        out["predicted_aligned_error"] = heads.predicted_aligned_error(out["ptm_logits"])
        out["atom37"] = all_atom.atom14_to_atom37(out["positions"][-1], aatype, mask)
        out["atom37_exists"] = all_atom.atom37_mask(aatype, mask)
        out["atom14_exists"] = all_atom.atom14_mask(aatype, mask)
        return out


def abstract_model(cfg: ESMFoldConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """Shapes, dtypes and logical axes of an ESMFold, without allocating it."""
    return nnx.split(nnx.eval_shape(lambda: ESMFold(cfg, rngs=nnx.Rngs(0))))
