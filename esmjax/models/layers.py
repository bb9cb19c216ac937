"""Shared primitives: parameters with logical axes, Dense, LayerNorm, Embed, rotary embedding,
attention.

Glossary: B batch, L query tokens, M key tokens, E embed, H heads, D head_dim, F mlp, V vocab.

Parameters are created with ``param``: an ``nnx.Param`` whose ``out_sharding`` metadata holds
logical axis names (see ``esmjax.parallel.sharding``) and whose eager sharding is off, so a model
can be built abstractly, on one device, or inside a jitted init with explicit output shardings.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

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

    def __call__(self, x: jax.Array) -> jax.Array:
        n_in = len(self.in_shape)
        lhs = tuple(range(x.ndim - n_in, x.ndim))
        y = jax.lax.dot_general(
            x.astype(self.dtype),
            self.kernel[...].astype(self.dtype),
            ((lhs, tuple(range(n_in))), ((), ())),
        )
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        lora = getattr(self, "lora", None)
        if (
            lora is not None
        ):  # W x + (alpha / r) B A x, attached by ``esmjax.models.heads.add_lora``
            flat = x.reshape(*x.shape[: x.ndim - n_in], -1).astype(self.dtype)
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


def gelu(x: jax.Array) -> jax.Array:
    """The exact erf GELU, ``x * 0.5 * (1 + erf(x / sqrt 2))`` (fair-esm ``esm.modules.gelu``)."""
    return jax.nn.gelu(x, approximate=False)


def rope_inv_freq(head_dim: int, theta: float = 10000.0) -> jax.Array:
    """``1 / theta ** (arange(0, D, 2) / D)``; only an initialiser, since checkpoints carry their
    own values."""
    return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def apply_rotary(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotary position embedding in the GPT-NeoX "rotate half" form used by ESM-2 (Su et al. 2021).

    Args:
      x: [B, L, H, D].
      positions: [B, L] integer positions (restarting per packed segment).
      inv_freq: [D/2] float32.
    """
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, L, D/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # [B, L, 1, D]
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)


def attention_mask(segment_ids: jax.Array) -> jax.Array:
    """[B, 1, L, L] boolean: query i may attend key j when both are in the same non-padding
    segment (id > 0)."""
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (same & (segment_ids[:, None, :] > 0))[:, None]


_NEG = float(jnp.finfo(jnp.float32).min)


def _row_probs(q: jax.Array, k: jax.Array, mask: jax.Array) -> jax.Array:
    """q [L, H, D], k [M, H, D], mask [1, L, M] -> float32 softmax weights [H, L, M]."""
    scores = jnp.einsum("lhd,mhd->hlm", q, k, preferred_element_type=jnp.float32)
    return jax.nn.softmax(jnp.where(mask, scores, _NEG), axis=-1)


def _row_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """One batch row -> (out [L, H, D], weights [H, L, M]). Heads-major inside: XLA:CPU runs
    these faster."""
    qh, kh, vh = (jnp.swapaxes(x, 0, 1) for x in (q, k, v))  # [H, L, D]
    scores = jnp.einsum("hld,hmd->hlm", qh, kh, preferred_element_type=jnp.float32)
    weights = jax.nn.softmax(jnp.where(mask, scores, _NEG), axis=-1)
    out = jnp.einsum("hlm,hmd->hld", weights.astype(v.dtype), vh)
    return jnp.swapaxes(out, 0, 1), weights


def _rows_per_chunk(batch: int) -> int:
    # On a CPU one row at a time keeps the [H, L, M] scores in cache (3-5x faster than one batched
    # op there);
    # accelerators take the whole batch at once.
    return 1 if jax.default_backend() == "cpu" else batch


@jax.custom_vjp
def _attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    return jax.lax.map(
        lambda a: _row_attention(*a)[0], (q, k, v, mask), batch_size=_rows_per_chunk(q.shape[0])
    )


def _attention_fwd(q, k, v, mask):
    out = _attention(q, k, v, mask)
    return out, (q, k, v, mask, out)


def _attention_bwd(res, d_out):
    """Recomputes the weights row by row (as flash attention does) instead of storing [B, H, L,
    M]."""
    q, k, v, mask, out = res

    def row(a):
        q, k, v, mask, out, do = a
        p = _row_probs(q, k, mask)  # [H, L, M]
        do32 = do.astype(jnp.float32)
        dv = jnp.einsum("hlm,lhd->mhd", p, do32)
        dp = jnp.einsum("lhd,mhd->hlm", do32, v.astype(jnp.float32))
        delta = jnp.einsum("lhd,lhd->hl", do32, out.astype(jnp.float32))[..., None]
        ds = p * (dp - delta)
        dq = jnp.einsum("hlm,mhd->lhd", ds, k.astype(jnp.float32))
        dk = jnp.einsum("hlm,lhd->mhd", ds, q.astype(jnp.float32))
        return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)

    dq, dk, dv = jax.lax.map(
        row, (q, k, v, mask, out, d_out), batch_size=_rows_per_chunk(q.shape[0])
    )
    return dq, dk, dv, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array,
    *,
    return_weights: bool = True,
    cudnn: bool = False,
) -> tuple[jax.Array, jax.Array | None]:
    """Softmax attention with the softmax in float32 (fair-esm ``utils_softmax(dtype=float32)``).

    ``q`` is expected pre-scaled. A query with no allowed key (a padding row) gets uniform weights
    instead of NaN. Training (no weights returned) never stores the [B, H, L, M] weights: the
    backward pass recomputes them row by row. With ``cudnn`` (an NVIDIA GPU, 16-bit inputs) the
    cuDNN flash-attention kernel computes the same function from the dense mask. The packed
    kernels that take segment ids instead are in ``attention_kernels``; ``choose_attention``
    there picks the path.

    Args:
      q, k, v: [B, L, H, D] (k, v: [B, M, H, D]).
      mask: [B, 1, L, M] boolean (packed segments and padding).
      return_weights: also return the float32 weights [B, H, L, M] (for attention maps and
        contacts).
      cudnn: run ``jax.nn.dot_product_attention(implementation="cudnn")`` (no weights).
    Returns:
      out [B, L, H, D] in q's dtype, and the weights or None.
    """
    if return_weights:
        return jax.lax.map(
            lambda a: _row_attention(*a), (q, k, v, mask), batch_size=_rows_per_chunk(q.shape[0])
        )
    if cudnn:
        return jax.nn.dot_product_attention(
            q, k, v, mask=mask, scale=1.0, implementation="cudnn"
        ), None
    return _attention(q, k, v, mask), None


def scale_for(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
