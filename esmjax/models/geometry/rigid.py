"""Struct-of-arrays 3D geometry in float32: ``Vec3``, ``Rot3``, ``Rigid3`` pytrees and quaternion
helpers.

Each object holds one array per component (``Vec3(x, y, z)``, ``Rot3(xx, ..., zz)``) of any common
broadcastable shape, as AlphaFold's ``r3.py`` / ``geometry`` package does: rotations and point maps
are written out as elementwise products and sums, so they never become low-precision matmuls on an
accelerator's matrix unit, and every operation broadcasts like plain arrays (``frames[..., None]``
applied to ``points[..., P]``).

Quaternions are ``[..., 4]`` arrays ``(w, x, y, z)``; OpenFold's structure module (ESMFold's) keeps
its backbone rotations as quaternions and converts them to matrices on use, which
``Rot3.from_quaternion`` mirrors.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp


def _pytree(cls):
    names = [f.name for f in dataclasses.fields(cls)]
    return jax.tree_util.register_dataclass(cls, data_fields=names, meta_fields=[])


@_pytree
@dataclasses.dataclass(frozen=True)
class Vec3:
    """A 3-vector field: three arrays of one shape."""

    x: jax.Array
    y: jax.Array
    z: jax.Array

    @classmethod
    def from_array(cls, a: jax.Array) -> Vec3:
        """``[..., 3]`` -> Vec3 of shape ``[...]``."""
        return cls(a[..., 0], a[..., 1], a[..., 2])

    def to_array(self) -> jax.Array:
        return jnp.stack([self.x, self.y, self.z], axis=-1)

    @classmethod
    def zeros(cls, shape: tuple[int, ...]) -> Vec3:
        z = jnp.zeros(shape, jnp.float32)
        return cls(z, z, z)

    def map(self, fn: Callable[[jax.Array], jax.Array]) -> Vec3:
        return Vec3(fn(self.x), fn(self.y), fn(self.z))

    def __add__(self, o: Vec3) -> Vec3:
        return Vec3(self.x + o.x, self.y + o.y, self.z + o.z)

    def __sub__(self, o: Vec3) -> Vec3:
        return Vec3(self.x - o.x, self.y - o.y, self.z - o.z)

    def __mul__(self, s: jax.Array | float) -> Vec3:
        return Vec3(self.x * s, self.y * s, self.z * s)

    __rmul__ = __mul__

    def dot(self, o: Vec3) -> jax.Array:
        return self.x * o.x + self.y * o.y + self.z * o.z

    def cross(self, o: Vec3) -> Vec3:
        return Vec3(
            self.y * o.z - self.z * o.y, self.z * o.x - self.x * o.z, self.x * o.y - self.y * o.x
        )

    def norm_sq(self) -> jax.Array:
        return self.x * self.x + self.y * self.y + self.z * self.z


@_pytree
@dataclasses.dataclass(frozen=True)
class Rot3:
    """A 3x3 rotation field; ``xy`` is row x, column y."""

    xx: jax.Array
    xy: jax.Array
    xz: jax.Array
    yx: jax.Array
    yy: jax.Array
    yz: jax.Array
    zx: jax.Array
    zy: jax.Array
    zz: jax.Array

    @classmethod
    def from_array(cls, m: jax.Array) -> Rot3:
        """``[..., 3, 3]`` -> Rot3."""
        return cls(*(m[..., i, j] for i in range(3) for j in range(3)))

    def to_array(self) -> jax.Array:
        rows = [
            jnp.stack(r, axis=-1)
            for r in (
                (self.xx, self.xy, self.xz),
                (self.yx, self.yy, self.yz),
                (self.zx, self.zy, self.zz),
            )
        ]
        return jnp.stack(rows, axis=-2)

    @classmethod
    def from_quaternion(cls, q: jax.Array) -> Rot3:
        """Rotation of quaternion ``q`` ``[..., 4]`` = (w, x, y, z), assumed unit (OpenFold
        ``quat_to_rot``)."""
        a, b, c, d = q[..., 0], q[..., 1], q[..., 2], q[..., 3]
        return cls(
            a * a + b * b - c * c - d * d,
            2 * (b * c - a * d),
            2 * (b * d + a * c),
            2 * (b * c + a * d),
            a * a - b * b + c * c - d * d,
            2 * (c * d - a * b),
            2 * (b * d - a * c),
            2 * (c * d + a * b),
            a * a - b * b - c * c + d * d,
        )

    def apply(self, v: Vec3) -> Vec3:
        return Vec3(
            self.xx * v.x + self.xy * v.y + self.xz * v.z,
            self.yx * v.x + self.yy * v.y + self.yz * v.z,
            self.zx * v.x + self.zy * v.y + self.zz * v.z,
        )

    def apply_inverse(self, v: Vec3) -> Vec3:
        return self.inverse().apply(v)

    def inverse(self) -> Rot3:
        return Rot3(self.xx, self.yx, self.zx, self.xy, self.yy, self.zy, self.xz, self.yz, self.zz)

    def __matmul__(self, o: Rot3) -> Rot3:
        c0 = self.apply(Vec3(o.xx, o.yx, o.zx))
        c1 = self.apply(Vec3(o.xy, o.yy, o.zy))
        c2 = self.apply(Vec3(o.xz, o.yz, o.zz))
        return Rot3(c0.x, c1.x, c2.x, c0.y, c1.y, c2.y, c0.z, c1.z, c2.z)

    def map(self, fn: Callable[[jax.Array], jax.Array]) -> Rot3:
        return Rot3(*(fn(getattr(self, f.name)) for f in dataclasses.fields(self)))


@_pytree
@dataclasses.dataclass(frozen=True)
class Rigid3:
    """A rigid transform ``x -> rot x + trans`` (a residue or side-chain frame)."""

    rot: Rot3
    trans: Vec3

    @classmethod
    def from_tensor_4x4(cls, m: jax.Array) -> Rigid3:
        return cls(Rot3.from_array(m[..., :3, :3]), Vec3.from_array(m[..., :3, 3]))

    def to_tensor_4x4(self) -> jax.Array:
        top = jnp.concatenate(
            [self.rot.to_array(), self.trans.to_array()[..., None]], axis=-1
        )  # [..., 3, 4]
        bottom = jnp.broadcast_to(
            jnp.array([0.0, 0.0, 0.0, 1.0], top.dtype), top.shape[:-2] + (1, 4)
        )
        return jnp.concatenate([top, bottom], axis=-2)

    def apply(self, v: Vec3) -> Vec3:
        return self.rot.apply(v) + self.trans

    def apply_inverse(self, v: Vec3) -> Vec3:
        return self.rot.apply_inverse(v - self.trans)

    def __matmul__(self, o: Rigid3) -> Rigid3:
        """Composition: ``(self @ o)(x) = self(o(x))``."""
        return Rigid3(self.rot @ o.rot, self.rot.apply(o.trans) + self.trans)

    def map(self, fn: Callable[[jax.Array], jax.Array]) -> Rigid3:
        return Rigid3(self.rot.map(fn), self.trans.map(fn))


# --------------------------------------------------------------------------------------------------
# Quaternions (w, x, y, z)
# --------------------------------------------------------------------------------------------------
def quat_identity(shape: tuple[int, ...]) -> jax.Array:
    return jnp.zeros(shape + (4,), jnp.float32).at[..., 0].set(1.0)


def quat_multiply_by_vec(q: jax.Array, v: jax.Array) -> jax.Array:
    """Hamilton product ``q * (0, v)`` for ``q`` [..., 4], ``v`` [..., 3]."""
    a, b, c, d = q[..., 0], q[..., 1], q[..., 2], q[..., 3]
    x, y, z = v[..., 0], v[..., 1], v[..., 2]
    return jnp.stack(
        [
            -b * x - c * y - d * z,
            a * x + c * z - d * y,
            a * y - b * z + d * x,
            a * z + b * y - c * x,
        ],
        -1,
    )


def compose_quat_update(q: jax.Array, t: Vec3, update: jax.Array) -> tuple[jax.Array, Vec3]:
    """AF2 Suppl. Alg. 23 lines 2-3: compose frames (q, t) with the update ``(b, c, d, t')`` [...,
    6].

    The update rotation is the non-unit quaternion (1, b, c, d): ``q' = normalise(q + q * (0, b, c,
    d))``; the translation ``t'`` is rotated by the *old* rotation (OpenFold
    ``Rigid.compose_q_update_vec``).
    """
    new_q = q + quat_multiply_by_vec(q, update[..., :3])
    new_q = new_q / jnp.sqrt(jnp.sum(new_q * new_q, axis=-1, keepdims=True))
    new_t = t + Rot3.from_quaternion(q).apply(Vec3.from_array(update[..., 3:]))
    return new_q, new_t
