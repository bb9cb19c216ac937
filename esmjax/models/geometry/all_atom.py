"""From backbone frames and torsion angles to atom coordinates (Jumper et al. 2021, Suppl. Alg. 24,
"computeAllAtomCoordinates").

Glossary: B batch, L residues, A atoms (14 or 37), G rigid groups (8).

``torsion_angles_to_frames`` builds the 8 rigid-group frames of every residue (backbone, pre-omega,
phi, psi, chi1..chi4) from the backbone frame and 7 (sin, cos) torsions; ``frames_to_atom14`` places
each residue's atoms at their literature positions in their group's frame; ``atom14_to_atom37``
scatters the compact layout into the PDB atom order. All in float32, following OpenFold's
``utils/feats.py`` operation for operation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from esmjax.models.geometry import residue_constants as rc
from esmjax.models.geometry.rigid import Rigid3, Rot3, Vec3


def _lookup(table, aatype: jax.Array) -> jax.Array:
    return jnp.take(jnp.asarray(table), aatype, axis=0)


def torsion_angles_to_frames(backbone: Rigid3, angles: jax.Array, aatype: jax.Array) -> Rigid3:
    """Rigid-group frames in the global frame (Suppl. Alg. 24 lines 1-10).

    Args:
      backbone: backbone-to-global frames, shape [B, L] (translations in Angstrom).
      angles: [B, L, 7, 2] unit (sin, cos) of omega, phi, psi, chi1..chi4.
      aatype: [B, L] AF2 residue types (0..20).
    Returns:
      Rigid3 of shape [B, L, 8].
    """
    default = Rigid3.from_tensor_4x4(_lookup(rc.RESTYPE_DEFAULT_FRAMES, aatype))  # [B, L, G]
    # The backbone group gets the identity rotation (sin 0, cos 1).
    bb = jnp.broadcast_to(jnp.array([0.0, 1.0], angles.dtype), angles.shape[:-2] + (1, 2))
    alpha = jnp.concatenate([bb, angles], axis=-2)  # [B, L, G, 2]
    sin, cos = alpha[..., 0], alpha[..., 1]
    one, zero = jnp.ones_like(sin), jnp.zeros_like(sin)
    # Rotation about x by the torsion: [[1, 0, 0], [0, cos, -sin], [0, sin, cos]] (AF2 code, not the
    # supplement).
    rot_x = Rot3(one, zero, zero, zero, cos, -sin, zero, sin, cos)
    frames = Rigid3(default.rot @ rot_x, default.trans)  # group -> parent, [B, L, G]

    def group(g: int) -> Rigid3:
        return frames.map(lambda a: a[..., g])

    chi1 = group(4)
    chi2 = chi1 @ group(5)
    chi3 = chi2 @ group(6)
    chi4 = chi3 @ group(7)
    first = frames.map(lambda a: a[..., :5])
    to_bb = jax.tree.map(
        lambda f, c2, c3, c4: jnp.concatenate(
            [f, c2[..., None], c3[..., None], c4[..., None]], axis=-1
        ),
        first,
        chi2,
        chi3,
        chi4,
    )
    return backbone.map(lambda a: a[..., None]) @ to_bb


def frames_to_atom14(frames: Rigid3, aatype: jax.Array) -> jax.Array:
    """Atom14 coordinates [B, L, 14, 3] from group frames [B, L, 8] (Suppl. Alg. 24 line 11);
    absent atoms are 0."""
    group = _lookup(rc.RESTYPE_ATOM14_TO_GROUP, aatype)  # [B, L, 14]
    # One gather of all 12 frame components at once (12 separate gathers compile much slower on
    # XLA:CPU).
    leaves, treedef = jax.tree.flatten(frames)
    picked = jnp.take_along_axis(
        jnp.stack(leaves, axis=-1), group[..., None], axis=-2
    )  # [B, L, 14, 12]
    atom_frames = jax.tree.unflatten(treedef, list(jnp.moveaxis(picked, -1, 0)))
    lit = Vec3.from_array(_lookup(rc.RESTYPE_ATOM14_POSITIONS, aatype))
    mask = _lookup(rc.RESTYPE_ATOM14_MASK, aatype)[..., None]
    return atom_frames.apply(lit).to_array() * mask


def atom14_mask(aatype: jax.Array, mask: jax.Array) -> jax.Array:
    """[B, L, 14] 1 where the residue has that atom and is not padding."""
    return _lookup(rc.RESTYPE_ATOM14_MASK, aatype) * mask[..., None]


def atom37_mask(aatype: jax.Array, mask: jax.Array) -> jax.Array:
    """[B, L, 37] 1 where the residue has that atom and is not padding (OpenFold
    ``atom37_atom_exists``)."""
    return _lookup(rc.RESTYPE_ATOM37_MASK, aatype) * mask[..., None]


def atom14_to_atom37(atom14: jax.Array, aatype: jax.Array, mask: jax.Array) -> jax.Array:
    """[B, L, 14, 3] -> [B, L, 37, 3], zero where an atom is absent or the residue is padding."""
    index = _lookup(rc.RESTYPE_ATOM37_TO_ATOM14, aatype)  # [B, L, 37]
    atom37 = jnp.take_along_axis(atom14, index[..., None], axis=-2)
    return atom37 * atom37_mask(aatype, mask)[..., None]
