"""The accelerator kernels of attention: the packed flash-attention kernels, which read segment
ids, and cuDNN's, which reads the dense mask.

Glossary: B batch, L tokens, H heads, D head_dim.

- ``splash_attention``: TPU splash attention (``jax.experimental.pallas.ops.tpu.splash_attention``)
  with ``SegmentIds``; the segment mask is evaluated per tile, never stored as [L, L].
- ``pallas_gpu_attention``: the Pallas Triton flash attention
  (``jax.experimental.pallas.ops.gpu.attention``, ``mha`` with ``segment_ids``): forward, and a
  backward that recomputes the probabilities per tile.
- ``cudnn_attention``: ``jax.nn.dot_product_attention(implementation="cudnn")`` fed the dense
  [B, 1, L, L] boolean mask, which cuDNN consumes as an O(L^2) bias.

Why not the Hopper kernel that ships in the same jax (``pallas.ops.gpu.attention_mgpu``): it has
no segment ids (only a causal flag), and packed rows need them; the Triton kernel takes them and
compiles for sm_90 (``tests/test_aot_gpu.py``).

Why ``pallas_gpu`` and not cuDNN's packed (THD offsets) layout on the GPU: the Pallas kernel is
one Python function that also runs in Pallas interpret mode, so its segment handling, forward and
backward are checked on a CPU against the reference attention (``tests/test_attention_kernels.py``:
1 to 8 segments per row, padding, fully padded rows, and a packed row equal to its sequences run
alone). cuDNN's packed layout runs only inside the cuDNN library on an NVIDIA GPU: nothing about it
can be checked without one. ``cudnn`` stays as an option (dense mask); ``tools/device_check.sh``
compares all GPU paths with the reference on the device.

In interpret mode (``interpret=True``) the Pallas interpreter evaluates a kernel body with
ordinary JAX ops, so Triton / Mosaic lowering is *not* exercised; both kernels match the reference
there at fp32 tolerance, forward and gradient. A kernel requested by name on a backend it does not
compile for runs in interpret mode (slow; for tests and debugging).

Padding: the kernels let a padding query (id 0) attend the padding keys (id 0), so no softmax row
is empty; their outputs at padding queries are then set to zero. The XLA path gives padding
queries uniform weights instead. Either way nothing reaches a real token, and the model's losses
and outputs ignore padding positions, so the paths agree wherever a token is real.

Shapes: the kernels need L to be a multiple of their tile, so rows are padded inside (with id 0)
to a multiple of 128 (of 32/64 for short rows on the GPU) and cropped back. Under a mesh they run
per shard (``parallel.sharding.map_shards``: rows over the batch axes, heads over ``tensor``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from esmjax.config.mesh import ACT_BATCH, ACT_HEADS
from esmjax.parallel.sharding import map_shards


def _pad_len(x: jax.Array, length: int) -> jax.Array:
    """Right-pads axis 1 to ``length`` with zeros."""
    pad = [(0, 0)] * x.ndim
    pad[1] = (0, length - x.shape[1])
    return jnp.pad(x, pad)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def splash_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, *, interpret: bool = False
) -> jax.Array:
    """TPU splash attention over packed rows.

    Args:
      q, k, v: [B, L, H, D] (q pre-scaled).
      segment_ids: [B, L] int, 0 = padding.
      interpret: run the Pallas kernel in interpret mode (any backend).
    Returns:
      [B, L, H, D] in q's dtype; zero at padding queries.
    """
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    b, length, h, d = q.shape
    lp = _round_up(length, 128)
    block = next(s for s in (512, 256, 128) if lp % s == 0)
    sizes = sa.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    mask = sa.MultiHeadMask([sa.FullMask((lp, lp)) for _ in range(h)])
    kernel = sa.make_splash_mha_single_device(mask, block_sizes=sizes, interpret=interpret)

    def row(q, k, v, seg):  # [H, Lp, D] x3, [Lp]
        return kernel(q, k, v, sa.SegmentIds(q=seg, kv=seg))

    seg = _pad_len(segment_ids.astype(jnp.int32), lp)
    qh, kh, vh = (jnp.swapaxes(_pad_len(x, lp), 1, 2) for x in (q, k, v))  # [B, H, Lp, D]
    out = jnp.swapaxes(jax.vmap(row)(qh, kh, vh, seg), 1, 2)[:, :length]  # [B, L, H, D]
    return jnp.where((segment_ids > 0)[..., None, None], out, 0).astype(q.dtype)


def pallas_gpu_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, *, interpret: bool = False
) -> jax.Array:
    """Pallas (Triton) flash attention over packed rows; same contract as ``splash_attention``."""
    from jax.experimental.pallas.ops.gpu import attention as pga

    length = q.shape[1]
    block = 128 if length > 64 else max(32, 1 << (length - 1).bit_length())
    lp = _round_up(length, block)
    sizes = pga.BlockSizes(
        block_q=block,
        block_k=block,
        block_q_dkv=32,
        block_kv_dkv=32,
        block_q_dq=32,
        block_kv_dq=32,
    )
    seg = _pad_len(segment_ids.astype(jnp.int32), lp)
    out = pga.mha(
        *(_pad_len(x, lp) for x in (q, k, v)),
        seg,
        sm_scale=1.0,
        block_sizes=sizes,
        interpret=interpret,
    )[:, :length]
    return jnp.where((segment_ids > 0)[..., None, None], out, 0).astype(q.dtype)


def packed_attention(
    kernel: str,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array,
    *,
    interpret: bool = False,
) -> jax.Array:
    """Runs a packed kernel (``splash`` or ``pallas_gpu``) per mesh shard.

    q, k, v [B, L, H, D], segment_ids [B, L] -> [B, L, H, D].
    """
    fn = {"splash": splash_attention, "pallas_gpu": pallas_gpu_attention}[kernel]
    fn = functools.partial(fn, interpret=interpret)
    qkv_axes = (ACT_BATCH, None, ACT_HEADS, None)
    return map_shards(
        lambda q, k, v, s: fn(q, k, v, s),
        (q, k, v, segment_ids),
        (qkv_axes, qkv_axes, qkv_axes, (ACT_BATCH, None)),
    )


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """cuDNN flash attention (an NVIDIA GPU, 16-bit inputs) from the dense mask: q, k, v [B, L, H,
    D] (q pre-scaled), mask [B, 1, L, L] boolean -> [B, L, H, D]."""
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=1.0, implementation="cudnn")
