"""Shared primitives: parameters with logical axes, Dense, LayerNorm, Embed, rotary embedding,
attention.

Glossary: B batch, L query tokens, M key tokens, E embed, H heads, D head_dim, F mlp, V vocab.

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
    and more the weight gradient is computed from a transposed copy of one operand: contracted over
    the token axis as autodiff writes it, it misses XLA:CPU's fast matmul kernels and took 2-6x
    longer (BENCHMARKS.md, "CPU training profile"). The forward is the same everywhere.
    """
    if compute_platform() != "cpu":
        return _dot(gelu(x) if gelu_input else x, w, n_in)
    k, n = math.prod(w.shape[:n_in]), math.prod(w.shape[n_in:])
    return _cpu_matmul(x, w, n_in, gelu_input, min(k, n) >= _CPU_MIN_WIDTH)


# Below this width the transposed copy costs more than it saves: the 0.8M demo model (width 128)
# trained 6% slower with it, the 8M (320) and 35M (480) shapes faster (BENCHMARKS.md).
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
    # and the result (a transposed copy of gelu(x) recomputed the GELU in transposed order, which
    # cost 8-14% of an 8M or 35M step; BENCHMARKS.md, "CPU training profile").
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
    that a block's hidden activations stay in cache instead of making a round trip through memory:
    ESMFold's pair transition over 256 x 256 positions (a [65536, 4Z] hidden array) ran 1.6-1.7x
    faster alone at Z = 128 (194-207 -> 121 ms) and took 0.41 s instead of 1.39 s of a CPU fold
    (BENCHMARKS.md, "Third pass"). Accelerators, and arrays of at most one block, take ``fn(x)``
    whole."""
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

    Its backward evaluates ``erf`` once, for ``Phi(x) + x phi(x)``. ``jax.nn.gelu`` (the erfc
    form) expands on XLA:CPU into a branchy rational approximation with ``exp`` and divisions,
    which autodiff then evaluated in five fusions per layer (the erfc was 7-10% of a demo-model
    train step; BENCHMARKS.md, "CPU training profile").
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

    Computed once per forward pass for all layers (``ESM2`` passes them to the layer scan): built
    inside a layer, XLA:CPU fused the sine and cosine into each consumer of the [B, L, H, D]
    rotated q and k, so every head recomputed them (8M training step, one core: four such fusions
    at 3.8 ms per layer, 0.8 ms from stored tables; BENCHMARKS.md, "Fifth pass").

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


def attention_mask(segment_ids: jax.Array) -> jax.Array:
    """[B, 1, L, L] boolean: query i may attend key j when both are in the same non-padding
    segment (id > 0)."""
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (same & (segment_ids[:, None, :] > 0))[:, None]


# Additive score bias of a masked key. exp(-1e30 - max) underflows to exactly 0, as a masked score
# set to float32's minimum does; a query with no allowed key (padding) gets -1e30 + s == -1e30 for
# every key (|s| is far below the spacing of float32 near 1e30), hence uniform weights, not NaN.
_MASKED = -1e30


def _bias(mask: jax.Array) -> jax.Array:
    """[B, 1, L, M] boolean -> float32 additive bias (0 or -1e30), computed once per call."""
    return jnp.where(mask, 0.0, _MASKED).astype(jnp.float32)


def _heads_major(x: jax.Array) -> jax.Array:
    return jnp.swapaxes(x, 1, 2)  # [B, L, H, D] <-> [B, H, L, D]


def _row_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """One batch row, heads-major -> (out [H, L, D], weights [H, L, M]). Differentiated by
    autodiff here (the path that returns weights), so masked scores are replaced, not offset: no
    gradient reaches them, even in a row with no allowed key."""
    scores = jnp.einsum("hld,hmd->hlm", q, k, preferred_element_type=jnp.float32)
    weights = jax.nn.softmax(jnp.where(bias == 0.0, scores, _MASKED), axis=-1)
    return jnp.einsum("hlm,hmd->hld", weights.astype(v.dtype), v), weights


def _rows_per_chunk(q: jax.Array, k: jax.Array) -> int:
    """Batch rows per attention iteration of the backward, the weights path and long rows. On a
    CPU, as many as keep their float32 [H, L, M] scores within 1 MiB (one row of the 8M or 35M
    shapes at 256 tokens, four of the demo model's 128-token rows), so the scores stay in cache
    (the backward over all rows at once was 1.6x slower at the 8M shape: XLA splits it into
    several operations that pass [B, H, L, M] arrays through memory; four demo rows per iteration
    2-4% faster than one). Accelerators take the whole batch at once. (The forward of training and
    inference is one fused operation for the whole batch up to 256 tokens: ``_attention``.)"""
    batch, heads, length = q.shape[:3]
    if compute_platform() != "cpu":
        return batch
    return max(1, min(batch, (1 << 20) // (4 * heads * length * k.shape[2])))


def _map_rows(fn: Callable, *xs: jax.Array):
    return jax.lax.map(lambda a: fn(*a), xs, batch_size=_rows_per_chunk(xs[0], xs[1]))


# XLA:CPU (jaxlib 0.10.2) fuses one attention (``softmax_attention``) into one YNNPACK kernel that
# slows sharply past this many keys, here and in ESMFold's triangle attention
# (``triangle.cpu_row_chunk``).
CPU_FUSED_MAX_KEYS = 256

# So on a CPU, beyond 256 tokens, each row's queries run in blocks of 64 against all of its keys,
# one block after another (forward: ``lax.map``; backward: a ``scan`` that sums the blocks' dk and
# dv). Forward+backward, 20 heads of 24 (35M): 2 rows of 1,024 tokens 506 ms whole, 246-258 ms in
# blocks of 64 (128: 284-299, 256: 306-376); 4 rows of 512 229-283 -> 194-207 ms; of 384 130 -> 88
# ms; but 8 rows of 256 (20 heads of 16) 63-76 ms whole against 76-82 in blocks (BENCHMARKS.md,
# "Fourth pass").
_CPU_QUERY_BLOCK = 64


def _query_blocks(length: int) -> int | None:
    """Query blocks per row, or None for the row whole (accelerators; up to 256 tokens)."""
    if compute_platform() != "cpu" or length <= CPU_FUSED_MAX_KEYS:
        return None
    return -(-length // _CPU_QUERY_BLOCK)


def _split_queries(x: jax.Array, axis: int, blocks: int) -> jax.Array:
    """The query axis padded with zeros to whole blocks, blocks leading: [..., L, ...] -> [nb,
    ..., blk, ...]. A padded query gets bias 0 (finite, sliced off) and, in the backward, a zero
    output gradient and ``live`` 0, so it adds nothing to dk and dv."""
    pad = blocks * _CPU_QUERY_BLOCK - x.shape[axis]
    x = jnp.pad(x, [(0, pad if a == axis else 0) for a in range(x.ndim)])
    x = x.reshape(x.shape[:axis] + (blocks, _CPU_QUERY_BLOCK) + x.shape[axis + 1 :])
    return jnp.moveaxis(x, axis, 0)


def _join_queries(x: jax.Array, axis: int, length: int) -> jax.Array:
    """Inverse of ``_split_queries``: [nb, ..., blk, ...] -> [..., L, ...]."""
    x = jnp.moveaxis(x, 0, axis)
    x = x.reshape(x.shape[:axis] + (-1,) + x.shape[axis + 2 :])
    return jax.lax.slice_in_dim(x, 0, length, axis=axis)


def _row_out_blocked(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array) -> jax.Array:
    """One row, its queries in blocks: q [H, L, D], k and v [H, M, D], bias [1, L, M]."""
    blocks = _query_blocks(q.shape[1])
    xs = (_split_queries(q, 1, blocks), _split_queries(bias, 1, blocks))
    out = jax.lax.map(lambda a: softmax_attention(a[0], k, v, a[1]), xs)
    return _join_queries(out, 1, q.shape[1])


@jax.custom_vjp
def _attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array) -> jax.Array:
    """Heads-major q, k, v [B, H, L, D] and bias [B, 1, L, M] -> out [B, H, L, D].

    Up to ``CPU_FUSED_MAX_KEYS`` tokens (and on accelerators) the whole batch is one
    ``softmax_attention``: XLA:CPU runs it as one fused kernel spread over all cores, where one
    row at a time ran on one core (8M shape, 8 rows x 256 tokens, 2 threads: 12.6 -> 8.6 ms;
    BENCHMARKS.md, "Fifth pass"). Longer rows go row by row, in query blocks."""
    if _query_blocks(q.shape[2]) is None:
        return softmax_attention(q, k, v, bias)
    return _map_rows(_row_out_blocked, q, k, v, bias)


def softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array) -> jax.Array:
    """``softmax(q k^T + bias) v`` with an additive bias: q [..., L, D], k and v [..., M, D], bias
    broadcastable to [..., L, M] -> [..., L, D] in v's dtype, the softmax in float32.

    As in flash attention (Dao et al. 2022, Alg. 1) the softmax is normalised after the product
    with ``v``: the [..., L, D] output is divided by the softmax denominators, not the [..., L, M]
    weights, a pass over the weights less, and XLA:CPU fuses the whole of it into one kernel (the
    35M-shape attention forward 19.6 -> 14.3 ms on 2 CPU threads, "Third pass"; ESMFold's triangle
    attention about 100 -> 37 ms per call with heads-major inputs, "Fourth pass", BENCHMARKS.md).
    ESM-2's training forward (its backward is ``_attention_bwd``, so the mask can be a bias) and
    ESMFold's ``GatedAttention`` both use it."""
    scores = jnp.einsum("...ld,...md->...lm", q, k, preferred_element_type=jnp.float32) + bias
    e = jnp.exp(scores - jax.lax.stop_gradient(scores.max(-1, keepdims=True)))
    out = jnp.einsum("...lm,...md->...ld", e.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return (out / e.sum(-1)[..., None]).astype(v.dtype)


def _attention_fwd(q, k, v, bias):
    out = _attention(q, k, v, bias)
    return out, (q, k, v, bias, out)


def _attention_bwd(res, d_out):
    """Recomputes the weights row by row (as flash attention does) instead of storing [B, H, L,
    M], in the transposed [H, M, L] layout: there every matmul of the backward contracts the last
    axis of its left operand, which XLA:CPU's fast kernels want, so no [H, L, M] transpose is
    materialised (two of them cost a quarter of the attention backward). Recomputing the weights
    from a stored max and denominator instead (one pass, no reductions) was about 10% slower
    (8M shape, forward+backward 57 against 51 ms on 2 CPU threads; not traced further)."""

    def row(q, k, v, bias_t, live, out, do):  # [H, L, D] (k, v: [H, M, D]); bias_t [1, M, L]
        f32 = jnp.float32
        q, k, v, out, do = (x.astype(f32) for x in (q, k, v, out, do))
        s_t = jnp.einsum("hmd,hld->hml", k, q) + bias_t  # scores, transposed
        # The softmax over keys (axis 1 here), as jax.nn.softmax computes it.
        e = jnp.exp(s_t - jax.lax.stop_gradient(s_t.max(1, keepdims=True)))
        p_t = e / e.sum(1, keepdims=True)  # [H, M, L]
        dv = jnp.einsum("hml,hld->hmd", p_t, do)
        dp_t = jnp.einsum("hmd,hld->hml", v, do)
        delta = jnp.sum(do * out, -1)[:, None, :]  # [H, 1, L]
        # A query with no allowed key (padding) has uniform weights whose scores were masked out:
        # no gradient reaches them, as through ``where(mask, scores, min)`` (live [1, 1, L]: 0).
        ds_t = p_t * (dp_t - delta) * live
        dk = jnp.einsum("hml,hld->hmd", ds_t, q)
        k_t = jax.lax.optimization_barrier(jnp.swapaxes(k, 1, 2))  # [H, D, M], small
        dq = jnp.swapaxes(jnp.einsum("hdm,hml->hdl", k_t, ds_t), 1, 2)
        return dq, dk, dv

    def row_blocked(q, k, v, bias_t, live, out, do):
        blocks = _query_blocks(q.shape[1])
        if blocks is None:
            return row(q, k, v, bias_t, live, out, do)
        split = (1, 2, 2, 1, 1)  # the query axis of q, bias_t, live, out, do
        xs = tuple(_split_queries(x, a, blocks) for x, a in zip((q, bias_t, live, out, do), split))

        def step(acc, blk):
            dq, dk, dv = row(blk[0], k, v, *blk[1:])
            return (acc[0] + dk, acc[1] + dv), dq

        zeros = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
        (dk, dv), dq = jax.lax.scan(step, zeros, xs)
        return _join_queries(dq, 1, q.shape[1]), dk, dv

    q, k, v, bias, out = res
    bias_t = jnp.swapaxes(bias, 2, 3)  # [B, 1, M, L]
    live = jnp.any(bias_t == 0.0, axis=2, keepdims=True).astype(jnp.float32)  # [B, 1, 1, L]
    dq, dk, dv = _map_rows(row_blocked, q, k, v, bias_t, live, out, d_out)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


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
    backward pass recomputes them row by row (on a CPU, beyond 256 tokens, in blocks of
    queries: ``_query_blocks``). With ``cudnn`` (an NVIDIA GPU, 16-bit inputs) the
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
        qh, kh, vh = (_heads_major(x) for x in (q, k, v))
        out, weights = _map_rows(_row_attention, qh, kh, vh, _bias(mask))
        return _heads_major(out), weights
    if cudnn:
        return jax.nn.dot_product_attention(
            q, k, v, mask=mask, scale=1.0, implementation="cudnn"
        ), None
    out = _attention(*(_heads_major(x) for x in (q, k, v)), _bias(mask))
    return _heads_major(out), None


def scale_for(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
