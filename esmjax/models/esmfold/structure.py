"""The structure module (Jumper et al. 2021, Suppl. Alg. 20), as OpenFold implements it and ESMFold
uses it.

Glossary: B batch, L residues, S single channels (c_s), Z pair channels, H heads, C scalar head
  channels,
P points, G rigid groups (8), A atoms (14).

The ``num_blocks`` iterations share one set of weights and run as one ``lax.scan``. Backbone frames
are carried as unit quaternions plus translations in nm (OpenFold's quaternion ``Rigid``) and turned
into rotation matrices where they are used; all geometry is float32. Rotations pass through
``stop_gradient`` between iterations (``stop_rot_gradient``), and every iteration's outputs are
stacked, as in the reference.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from esmjax.models import layers as nn
from esmjax.models.esmfold.config import StructureModuleConfig
from esmjax.models.esmfold.triangle import dense
from esmjax.models.geometry import all_atom
from esmjax.models.geometry.rigid import Rigid3, Rot3, Vec3, compose_quat_update, quat_identity


def _points(flat: jax.Array) -> Vec3:
    """OpenFold's point layout: the last axis is [x-block | y-block | z-block], each of H * P
    values."""
    x, y, z = jnp.split(flat, 3, axis=-1)
    return Vec3(x, y, z)


class InvariantPointAttention(nnx.Module):
    """Invariant point attention (Suppl. Alg. 22), with OpenFold's Linear biases.

    logits = sqrt(1/3C) q.k + sqrt(1/3) b_ij - 1/2 softplus(w_h) sqrt(1/(3 * 9P/2)) sum_p |T_i q_p -
    T_j k_p|^2 + inf (mask_ij - 1): the three terms are weighted so each has unit variance at
    initialisation.
    """

    def __init__(self, cfg: StructureModuleConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        h, c, pq, pv = cfg.num_heads, cfg.ipa_dim, cfg.num_qk_points, cfg.num_v_points
        s = cfg.single_dim
        self.linear_q = dense(s, h * c, rngs)
        self.linear_kv = dense(s, 2 * h * c, rngs)
        self.linear_q_points = dense(s, h * pq * 3, rngs)
        self.linear_kv_points = dense(s, h * (pq + pv) * 3, rngs)
        self.linear_b = dense(cfg.pair_dim, h, rngs)
        self.head_weights = nn.param(rngs, nn.zeros, (h,), (None,))
        self.linear_out = dense(h * (cfg.pair_dim + c + pv * 4), s, rngs)

    def __call__(self, s: jax.Array, z: jax.Array, frames: Rigid3, mask: jax.Array) -> jax.Array:
        """s [B, L, S], z [B, L, L, Z], frames [B, L] (nm), mask [B, L] -> update [B, L, S]."""
        cfg = self.cfg
        h, c, pq, pv = cfg.num_heads, cfg.ipa_dim, cfg.num_qk_points, cfg.num_v_points
        b, l, _ = s.shape
        q = self.linear_q(s).reshape(b, l, h, c)
        k, v = jnp.split(self.linear_kv(s).reshape(b, l, h, 2 * c), 2, axis=-1)  # [B, L, H, C]

        local = frames.map(lambda t: t[..., None])  # broadcast over points
        q_pts = local.apply(_points(self.linear_q_points(s))).map(lambda t: t.reshape(b, l, h, pq))
        kv_pts = local.apply(_points(self.linear_kv_points(s))).map(
            lambda t: t.reshape(b, l, h, pq + pv)
        )
        k_pts = kv_pts.map(lambda t: t[..., :pq])
        v_pts = kv_pts.map(lambda t: t[..., pq:])  # [B, L, H, Pv]

        a = jnp.einsum("bqhc,bkhc->bhqk", q, k) * math.sqrt(1.0 / (3 * c))
        a = a + math.sqrt(1.0 / 3) * jnp.moveaxis(self.linear_b(z), -1, 1)
        diff = q_pts.map(lambda t: t[:, :, None]) - k_pts.map(
            lambda t: t[:, None, :]
        )  # [B, Lq, Lk, H, Pq]
        d2 = diff.x**2 + diff.y**2 + diff.z**2
        w = jax.nn.softplus(self.head_weights[...]) * math.sqrt(1.0 / (3 * (pq * 9.0 / 2)))
        pt = jnp.sum(d2 * w[:, None], axis=-1) * -0.5  # [B, Lq, Lk, H]
        square_mask = cfg.inf * (mask[:, :, None] * mask[:, None, :] - 1.0)
        a = jax.nn.softmax(
            a + jnp.moveaxis(pt, -1, 1) + square_mask[:, None], axis=-1
        )  # [B, H, Lq, Lk]

        o = jnp.einsum("bhqk,bkhc->bqhc", a, v).reshape(b, l, h * c)
        o_pt = v_pts.map(
            lambda t: jnp.einsum("bhqk,bkhp->bqhp", a, t)
        )  # [B, L, H, Pv], global frame
        o_pt = frames.map(lambda t: t[..., None, None]).apply_inverse(o_pt)
        o_pt_norm = jnp.sqrt(o_pt.norm_sq() + cfg.epsilon).reshape(b, l, h * pv)
        o_pt = o_pt.map(lambda t: t.reshape(b, l, h * pv))
        o_pair = jnp.einsum("bhqk,bqkz->bqhz", a, z).reshape(b, l, -1)
        return self.linear_out(
            jnp.concatenate([o, o_pt.x, o_pt.y, o_pt.z, o_pt_norm, o_pair], axis=-1)
        )


class TransitionLayer(nnx.Module):
    """``s + linear_3(relu(linear_2(relu(linear_1(s)))))`` (Suppl. Alg. 20 lines 8-9)."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs):
        self.linear_1, self.linear_2, self.linear_3 = (dense(dim, dim, rngs) for _ in range(3))

    def __call__(self, s: jax.Array) -> jax.Array:
        return s + self.linear_3(jax.nn.relu(self.linear_2(jax.nn.relu(self.linear_1(s)))))


class Transition(nnx.Module):
    def __init__(self, cfg: StructureModuleConfig, *, rngs: nnx.Rngs):
        self.layers = nnx.List(
            [TransitionLayer(cfg.single_dim, rngs=rngs) for _ in range(cfg.num_transition_layers)]
        )
        self.layer_norm = nn.LayerNorm(cfg.single_dim, rngs=rngs)

    def __call__(self, s: jax.Array) -> jax.Array:
        for layer in self.layers:
            s = layer(s)
        return self.layer_norm(s)


class BackboneUpdate(nnx.Module):
    """Per-residue update: quaternion (1, b, c, d) and translation (Suppl. Alg. 23 line 1)."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs):
        self.linear = dense(dim, 6, rngs)

    def __call__(self, s: jax.Array) -> jax.Array:
        return self.linear(s)


class AngleResnetBlock(nnx.Module):
    def __init__(self, dim: int, *, rngs: nnx.Rngs):
        self.linear_1, self.linear_2 = dense(dim, dim, rngs), dense(dim, dim, rngs)

    def __call__(self, a: jax.Array) -> jax.Array:
        return a + self.linear_2(jax.nn.relu(self.linear_1(jax.nn.relu(a))))


class AngleResnet(nnx.Module):
    """Torsion angles from the single state (Suppl. Alg. 20 lines 11-14; the input ReLUs follow
    the AF2 code)."""

    def __init__(self, cfg: StructureModuleConfig, *, rngs: nnx.Rngs):
        self.eps = cfg.epsilon
        self.linear_in = dense(cfg.single_dim, cfg.resnet_dim, rngs)
        self.linear_initial = dense(cfg.single_dim, cfg.resnet_dim, rngs)
        self.layers = nnx.List(
            [AngleResnetBlock(cfg.resnet_dim, rngs=rngs) for _ in range(cfg.num_resnet_blocks)]
        )
        self.linear_out = dense(cfg.resnet_dim, cfg.num_angles * 2, rngs)

    def __call__(self, s: jax.Array, s_initial: jax.Array) -> tuple[jax.Array, jax.Array]:
        """-> (unnormalized, normalized) angles [B, L, 7, 2] as (sin, cos)."""
        a = self.linear_in(jax.nn.relu(s)) + self.linear_initial(jax.nn.relu(s_initial))
        for layer in self.layers:
            a = layer(a)
        a = self.linear_out(jax.nn.relu(a))
        a = a.reshape(a.shape[:-1] + (-1, 2))
        norm = jnp.sqrt(jnp.maximum(jnp.sum(a * a, axis=-1, keepdims=True), self.eps))
        return a, a / norm


class StructureModule(nnx.Module):
    """Suppl. Alg. 20 with shared weights across ``num_blocks`` iterations (OpenFold
    ``StructureModule``)."""

    def __init__(self, cfg: StructureModuleConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        s = cfg.single_dim
        self.layer_norm_s = nn.LayerNorm(s, rngs=rngs)
        self.layer_norm_z = nn.LayerNorm(cfg.pair_dim, rngs=rngs)
        self.linear_in = dense(s, s, rngs)
        self.ipa = InvariantPointAttention(cfg, rngs=rngs)
        self.layer_norm_ipa = nn.LayerNorm(s, rngs=rngs)
        self.transition = Transition(cfg, rngs=rngs)
        self.bb_update = BackboneUpdate(s, rngs=rngs)
        self.angle_resnet = AngleResnet(cfg, rngs=rngs)

    def __call__(
        self, single: jax.Array, pair: jax.Array, aatype: jax.Array, mask: jax.Array
    ) -> dict:
        """Folds one batch.

        Args:
          single: [B, L, S]; pair: [B, L, L, Z]; aatype: [B, L] AF2 types; mask: [B, L] float.
        Returns:
          per-iteration stacks (leading axis ``num_blocks``): ``frames`` [.., B, L, 7] (quaternion,
          translation in Angstrom), ``sidechain_frames`` [.., B, L, 8, 4, 4],
          ``unnormalized_angles`` / ``angles`` [.., B, L, 7, 2], ``positions`` [.., B, L, 14, 3]
          (Angstrom), ``states`` [.., B, L, S]; and ``single`` [B, L, S].
        """
        cfg = self.cfg
        s_initial = self.layer_norm_s(single)
        z = self.layer_norm_z(pair)
        s = self.linear_in(s_initial)
        quat = quat_identity(s.shape[:-1])
        trans = Vec3.zeros(s.shape[:-1])
        scale = cfg.trans_scale_factor

        def step(carry, _):
            s, quat, trans = carry
            frames = Rigid3(Rot3.from_quaternion(quat), trans)
            s = self.layer_norm_ipa(s + self.ipa(s, z, frames, mask))
            s = self.transition(s)
            quat, trans = compose_quat_update(quat, trans, self.bb_update(s))
            backbone = Rigid3(Rot3.from_quaternion(quat), trans * scale)  # Angstrom
            unnormalized, angles = self.angle_resnet(s, s_initial)
            groups = all_atom.torsion_angles_to_frames(backbone, angles, aatype)
            out = {
                "frames": jnp.concatenate([quat, (trans * scale).to_array()], axis=-1),
                "sidechain_frames": groups.to_tensor_4x4(),
                "unnormalized_angles": unnormalized,
                "angles": angles,
                "positions": all_atom.frames_to_atom14(groups, aatype),
                "states": s,
            }
            return (s, jax.lax.stop_gradient(quat), trans), out

        (s, _, _), outputs = jax.lax.scan(step, (s, quat, trans), None, length=cfg.num_blocks)
        return {**outputs, "single": s}
