"""The XLA attention path: softmax attention from a dense boolean mask, written for XLA:CPU.

Glossary: B batch, L query tokens, M key tokens, H heads, D head_dim.

It is the path of a CPU, of every call that returns the attention weights, and of
``model.attention=xla`` on an accelerator. Training never stores the [B, H, L, M] weights: the
backward recomputes them row by row, as flash attention does (Dao et al. 2022). On a CPU the rows
run in chunks whose scores fit in cache (``_rows_per_chunk``), and rows longer than
``CPU_FUSED_MAX_KEYS`` run their queries in blocks (``_query_blocks``).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from esmjax.parallel.sharding import compute_platform


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
    CPU, as many as keep their float32 [H, L, M] scores within 1 MiB, so that the scores stay in
    cache (all rows at once, XLA splits the work into operations that pass [B, H, L, M] arrays
    through memory). Accelerators take the whole batch at once. (The forward of rows up to
    ``CPU_FUSED_MAX_KEYS`` tokens is one fused operation for the whole batch: ``_attention``.)"""
    batch, heads, length = q.shape[:3]
    if compute_platform() != "cpu":
        return batch
    return max(1, min(batch, (1 << 20) // (4 * heads * length * k.shape[2])))


def _map_rows(fn: Callable, *xs: jax.Array):
    return jax.lax.map(lambda a: fn(*a), xs, batch_size=_rows_per_chunk(xs[0], xs[1]))


# XLA:CPU fuses one attention (``softmax_attention``) into one kernel that slows sharply past this
# many keys, here and in ESMFold's triangle attention (``triangle.cpu_row_chunk``).
CPU_FUSED_MAX_KEYS = 256

# So on a CPU, beyond that many tokens, each row's queries run in blocks of 64 against all of its
# keys, one block after another (forward: ``lax.map``; backward: a ``scan`` that sums the blocks'
# dk and dv), each block inside the fused kernel's fast range.
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
    ``softmax_attention``, which XLA:CPU runs as one fused kernel spread over all cores (a row at a
    time would run on one core). Longer rows go row by row, in query blocks."""
    if _query_blocks(q.shape[2]) is None:
        return softmax_attention(q, k, v, bias)
    return _map_rows(_row_out_blocked, q, k, v, bias)


def softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array) -> jax.Array:
    """``softmax(q k^T + bias) v`` with an additive bias: q [..., L, D], k and v [..., M, D], bias
    broadcastable to [..., L, M] -> [..., L, D] in v's dtype, the softmax in float32.

    As in flash attention (Dao et al. 2022, Alg. 1) the softmax is normalised after the product
    with ``v``: the [..., L, D] output is divided by the softmax denominators, not the [..., L, M]
    weights, a pass over the weights less, so that XLA:CPU fuses the whole of it into one kernel.
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
    materialised."""

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
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *, return_weights: bool = True
) -> tuple[jax.Array, jax.Array | None]:
    """Softmax attention with the softmax in float32 (fair-esm ``utils_softmax(dtype=float32)``).

    ``q`` is expected pre-scaled. A query with no allowed key (a padding row) gets uniform weights
    instead of NaN. Training (no weights returned) never stores the [B, H, L, M] weights: the
    backward pass recomputes them row by row (on a CPU, beyond 256 tokens, in blocks of queries:
    ``_query_blocks``).

    Args:
      q, k, v: [B, L, H, D] (k, v: [B, M, H, D]).
      mask: [B, 1, L, M] boolean (packed segments and padding).
      return_weights: also return the float32 weights [B, H, L, M] (for attention maps and
        contacts).
    Returns:
      out [B, L, H, D] in q's dtype, and the weights or None.
    """
    qh, kh, vh = (_heads_major(x) for x in (q, k, v))
    if return_weights:
        out, weights = _map_rows(_row_attention, qh, kh, vh, _bias(mask))
        return _heads_major(out), weights
    return _heads_major(_attention(qh, kh, vh, _bias(mask))), None
