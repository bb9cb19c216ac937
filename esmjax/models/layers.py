"""Shared primitives: parameters with logical axes, Dense, LayerNorm, Embed, the exact GELU,
rotary embedding (attention is ``esmjax.models.attention``).

Glossary: B batch, L tokens, E embed, H heads, D head_dim, F mlp, V vocab.

Parameters are created with ``param``: an ``nnx.Param`` whose ``out_sharding`` metadata holds
logical axis names (see ``esmjax.parallel.sharding``) and whose eager sharding is off, so a model
can be built abstractly, on one device, or inside a jitted init with explicit output shardings.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from esmjax.parallel.sharding import compute_platform

Init = Callable[[jax.Array, tuple[int, ...], jnp.dtype], jax.Array]


class Buffer(nnx.Variable):
    """A non-trainable array that checkpoints carry (fair-esm ``register_buffer``), e.g. rotary
    ``inv_freq``."""


def param(
    rngs: nnx.Rngs, init: Init, shape: Sequence[int], axes: Sequence[str | None], dtype=jnp.float32
) -> nnx.Param:
    shape = tuple(shape)
    if len(axes) != len(shape):
        raise ValueError(f"axes {axes} do not match shape {shape}")
    return nnx.Param(
        init(rngs.params(), shape, dtype), out_sharding=tuple(axes), eager_sharding=False
    )


def normal(stddev: float = 0.02) -> Init:
    """Normal(0, 0.02) for matrices and embeddings, as HF ``EsmPreTrainedModel._init_weights``."""
    return jax.nn.initializers.normal(stddev)


DEFAULT_INIT = normal()


zeros: Init = jax.nn.initializers.zeros
ones: Init = jax.nn.initializers.ones


def _tuple(x: int | Sequence[int]) -> tuple[int, ...]:
    return (x,) if isinstance(x, int) else tuple(x)


def _dot(x: jax.Array, w: jax.Array, n_in: int) -> jax.Array:
    lhs = tuple(range(x.ndim - n_in, x.ndim))
    return jax.lax.dot_general(x, w, ((lhs, tuple(range(n_in))), ((), ())))


def matmul(x: jax.Array, w: jax.Array, n_in: int, gelu_input: bool = False) -> jax.Array:
    """Contracts the trailing ``n_in`` axes of ``x`` [..., *in] (or of ``gelu(x)`` with
    ``gelu_input``) with the leading ones of ``w`` [*in, *out] -> [..., *out]: one
    ``dot_general``.

    On a CPU the backward is written out (``_cpu_matmul``). The GELU is recomputed from its input,
    once, for both its value (the weight gradient's operand) and its derivative, so the layer scan
    stores one [B, L, F] array per layer, not the GELU's output and intermediates. At widths of 256
    and more the weight gradient is computed from a transposed copy of one operand, because
    contracted over the token axis as autodiff writes it, it misses XLA:CPU's fast matmul kernels.
    The forward is the same everywhere.
    """
    if compute_platform() != "cpu":
        return _dot(gelu(x) if gelu_input else x, w, n_in)
    k, n = math.prod(w.shape[:n_in]), math.prod(w.shape[n_in:])
    return _cpu_matmul(x, w, n_in, gelu_input, min(k, n) >= _CPU_MIN_WIDTH)


# Below this width the transposed copy costs more than the fast matmul kernels save.
_CPU_MIN_WIDTH = 256


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _cpu_matmul(
    x: jax.Array, w: jax.Array, n_in: int, gelu_input: bool, transposed_copy: bool
) -> jax.Array:
    return _dot(gelu(x) if gelu_input else x, w, n_in)


def _cpu_matmul_fwd(x, w, n_in, gelu_input, transposed_copy):
    return _cpu_matmul(x, w, n_in, gelu_input, transposed_copy), (x, w)


def _cpu_matmul_bwd(n_in, gelu_input, transposed_copy, res, dy):
    x, w = res
    k = math.prod(w.shape[:n_in])
    x2, w2 = x.reshape(-1, k), w.reshape(k, -1)  # [T, K], [K, N]
    a2, da_dx = _gelu_and_slope(x2) if gelu_input else (x2, None)
    dy2 = dy.reshape(a2.shape[0], -1)  # [T, N]
    da = jax.lax.dot_general(dy2, w2, (((1,), (1,)), ((), ())))  # [T, K]
    # The weight gradient contracts the token axis T. With ``transposed_copy`` one operand is
    # transposed first (a copy) so that both have T contiguous: for fc2 the narrow output gradient,
    # and the result, since a transposed copy of gelu(x) would recompute the GELU in that order.
    if not transposed_copy:
        dw = jax.lax.dot_general(a2, dy2, (((0,), (0,)), ((), ())))
    elif gelu_input:
        dw = _copy_transposed(_copy_transposed(dy2) @ a2)
    else:
        dw = _copy_transposed(a2) @ dy2
    if gelu_input:
        da = da.astype(x.dtype) * da_dx
    return da.reshape(x.shape).astype(x.dtype), dw.reshape(w.shape).astype(w.dtype)


def _copy_transposed(a: jax.Array) -> jax.Array:
    """``a.T`` materialised: the barrier keeps XLA from folding the transpose back into the next
    matmul."""
    return jax.lax.optimization_barrier(a.T)


_cpu_matmul.defvjp(_cpu_matmul_fwd, _cpu_matmul_bwd)


class Dense(nnx.Module):
    """A linear map whose kernel is ``[*in_shape, *out_shape]`` (``DenseGeneral``).

    Contracting the trailing ``len(in_shape)`` axes of the input lets q/k/v live as ``[E, H, D]``
    and the output projection as ``[H, D, E]``, so head-parallel sharding is a rule on the ``heads``
    axis.
    """

    def __init__(
        self,
        in_shape: int | Sequence[int],
        out_shape: int | Sequence[int],
        axes: Sequence[str | None],
        *,
        rngs: nnx.Rngs,
        use_bias: bool = True,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        kernel_init: Init = DEFAULT_INIT,
    ):
        self.in_shape = _tuple(in_shape)
        self.out_shape = _tuple(out_shape)
        self.dtype = dtype
        self.kernel = param(rngs, kernel_init, self.in_shape + self.out_shape, axes, param_dtype)
        out_axes = tuple(axes)[len(self.in_shape) :]
        self.bias = param(rngs, zeros, self.out_shape, out_axes, param_dtype) if use_bias else None

    def __call__(self, x: jax.Array, gelu_input: bool = False) -> jax.Array:
        """``x [..., *in] -> [..., *out]``; with ``gelu_input`` the exact GELU is applied to ``x``
        first (``fc2`` of a transformer layer; see ``matmul``)."""
        n_in = len(self.in_shape)
        y = matmul(x.astype(self.dtype), self.kernel[...].astype(self.dtype), n_in, gelu_input)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        lora = getattr(self, "lora", None)
        if (
            lora is not None
        ):  # W x + (alpha / r) B A x, attached by ``esmjax.models.heads.add_lora``
            a = gelu(x) if gelu_input else x
            flat = a.reshape(*a.shape[: a.ndim - n_in], -1).astype(self.dtype)
            y = y + (lora(flat) * self.lora_scale).reshape(y.shape).astype(y.dtype)
        return y


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis, computed in float32 and returned in the input dtype (eps
    1e-5 for ESM)."""

    def __init__(
        self, dim: int, *, eps: float = 1e-5, rngs: nnx.Rngs, param_dtype: jnp.dtype = jnp.float32
    ):
        self.eps = eps
        self.scale = param(rngs, ones, (dim,), ("norm",), param_dtype)
        self.bias = param(rngs, zeros, (dim,), ("norm",), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        mean = xf.mean(-1, keepdims=True)
        var = jnp.square(xf - mean).mean(-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...] + self.bias[...]
        return y.astype(x.dtype)


class Embed(nnx.Module):
    """Token embedding ``[V, E]``; ``attend`` is the tied output projection."""

    def __init__(
        self, num: int, dim: int, axes: Sequence[str], *, rngs: nnx.Rngs, param_dtype=jnp.float32
    ):
        self.embedding = param(rngs, normal(), (num, dim), axes, param_dtype)

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0)

    def attend(self, x: jax.Array) -> jax.Array:
        return jnp.einsum("...e,ve->...v", x, self.embedding[...].astype(x.dtype))


def map_positions(fn: Callable[[jax.Array], jax.Array], x: jax.Array) -> jax.Array:
    """``fn(x)`` for a ``fn`` that transforms each position's last-axis vector on its own (a
    LayerNorm, dense layers, activations): [..., C] -> [..., C'].

    On a CPU the positions go through ``fn`` ``_POSITION_BLOCK`` rows at a time (``lax.map``), so
    that a block's hidden activations (ESMFold's pair transition: [L * L, 4Z] in all) stay in cache
    instead of making a round trip through memory. Accelerators, and arrays of at most one block,
    take ``fn(x)`` whole."""
    rows = math.prod(x.shape[:-1])
    if compute_platform() != "cpu" or rows <= _POSITION_BLOCK:
        return fn(x)
    out = jax.lax.map(fn, x.reshape(rows, x.shape[-1]), batch_size=_POSITION_BLOCK)
    return out.reshape(*x.shape[:-1], out.shape[-1])


# [1024, 4Z] float32 hidden activations of ESMFold's pair transition: 2 MiB (Z = 128).
_POSITION_BLOCK = 1024


@jax.custom_vjp
def gelu(x: jax.Array) -> jax.Array:
    """The exact GELU, ``x * 0.5 * (1 + erf(x / sqrt 2))`` (Hendrycks and Gimpel 2016), in the erf
    form fair-esm (``esm.modules.gelu``) and PyTorch's ``F.gelu`` compute.

    Its backward evaluates ``erf`` once, for ``Phi(x) + x phi(x)``, because ``jax.nn.gelu`` (the
    erfc form) expands on XLA:CPU into a branchy rational approximation with ``exp`` and divisions
    that autodiff evaluates in several fusions per layer.
    """
    return x * _normal_cdf(x)


def _normal_cdf(x: jax.Array) -> jax.Array:
    """``Phi(x) = 0.5 (1 + erf(x / sqrt 2))``."""
    return 0.5 * (1.0 + jax.lax.erf(x * np.sqrt(0.5).astype(x.dtype)))


def _gelu_and_slope(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(gelu(x), gelu'(x))`` from one ``erf``: ``x Phi(x)`` and ``Phi(x) + x phi(x)``."""
    cdf = _normal_cdf(x)
    pdf = jnp.exp(-0.5 * x * x) * np.float32(1 / math.sqrt(2 * math.pi)).astype(x.dtype)
    return x * cdf, cdf + x * pdf


def _gelu_fwd(x):
    return gelu(x), x


def _gelu_bwd(x, g):
    return (g * _gelu_and_slope(x)[1],)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


def rope_inv_freq(head_dim: int, theta: float = 10000.0) -> jax.Array:
    """``1 / theta ** (arange(0, D, 2) / D)``; only an initialiser, since checkpoints carry their
    own values."""
    return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def rotary_tables(positions: jax.Array, inv_freq: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The cosines and signed sines of the rotary angles, for ``apply_rotary``.

    Computed once per forward pass for all layers (``ESM2`` passes them to the layer scan), because
    built inside a layer, XLA:CPU fuses the sine and cosine into each consumer of the [B, L, H, D]
    rotated q and k, so that every head recomputes them.

    Args:
      positions: [B, L] integer positions (restarting per packed segment).
      inv_freq: [..., D/2] float32 (the layers' stacked buffers: [N, D/2]).
    Returns:
      cos and sin, each [..., B, L, 1, D] float32. ``sin`` carries the signs of "rotate half":
      negative on the first half of D.
    """
    inv = inv_freq[..., None, None, :]  # [..., 1, 1, D/2]
    freqs = positions.astype(jnp.float32)[..., None] * inv  # [..., B, L, D/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[..., None, :]  # [..., B, L, 1, D]
    half = inv_freq.shape[-1]
    sign = jnp.concatenate([-jnp.ones(half, jnp.float32), jnp.ones(half, jnp.float32)])
    return jnp.cos(emb), jnp.sin(emb) * sign


def apply_rotary(x: jax.Array, rope: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Rotary position embedding in the GPT-NeoX "rotate half" form used by ESM-2 (Su et al. 2021):
    ``x cos + rotate_half(x) sin`` with ``rotate_half(x) = [-x2, x1]``. Here the minus sits in the
    signed sines of ``rotary_tables``, so the rotation is a roll by D/2 (the same products: a sign
    flip is exact).

    Args:
      x: [B, L, H, D].
      rope: ``rotary_tables`` for one layer: cos and signed sin, each [B, L, 1, D].
    """
    cos, sin = rope
    x32 = x.astype(jnp.float32)
    return (x32 * cos + jnp.roll(x32, x.shape[-1] // 2, axis=-1) * sin).astype(x.dtype)
