"""Packed flash-attention kernels for accelerators, and the one function that picks the path.

Glossary: B batch, L tokens, H heads, D head_dim.

Every path computes ``softmax(q k^T + mask) v`` over packed rows: ``segment_ids`` [B, L] numbers
the sequences of a row 1, 2, ... and 0 is padding; a query attends only the keys of its own
segment (Dao et al. 2022, "FlashAttention", for the tiling; segment ids as in MaxText). ``q`` comes
pre-scaled by 1/sqrt(D).

Paths (``ESM2Config.attention``, ``model.attention`` in YAML):

- ``xla``: ``layers.dot_product_attention``, row-mapped XLA with a recomputing backward. The only
  path that returns attention weights; the CPU path.
- ``splash``: TPU splash attention (``jax.experimental.pallas.ops.tpu.splash_attention``) with
  ``SegmentIds``; the segment mask is evaluated per tile, never stored as [L, L].
- ``pallas_gpu``: the Pallas Triton flash attention (``jax.experimental.pallas.ops.gpu.attention``,
  ``mha`` with ``segment_ids``): forward, and a backward that recomputes the probabilities per tile.
- ``cudnn``: ``jax.nn.dot_product_attention(implementation="cudnn")`` fed the dense [B, 1, L, L]
  boolean mask, which cuDNN consumes as an O(L^2) bias.

``auto`` picks ``splash`` on a TPU, ``pallas_gpu`` on a GPU with 16-bit compute, else ``xla`` (so
a CPU run is bit-for-bit the XLA path). Any path asked to return attention weights is ``xla``.
The platform is the one the program is compiled for (the mesh's devices, ``compute_platform``),
not the machine's default backend: ``esmjax plan --target v5p-8`` on a CPU machine compiles the
Mosaic splash kernel, as a TPU run would. Interpret mode is used only when a kernel is named
explicitly on a platform it does not compile for (a CPU).

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

Verified here (jax 0.10.2, CPU): both kernels run with ``interpret=True`` (the Pallas interpreter
evaluates the kernel body with ordinary JAX ops, so Triton / Mosaic lowering is *not* exercised)
and match the reference at fp32 tolerance, forward and gradient. A kernel requested by name on a
backend it does not compile for runs in interpret mode (slow; for tests and debugging).

Padding: the kernels let a padding query (id 0) attend the padding keys (id 0), so no softmax row
is empty; their outputs at padding queries are then set to zero. The XLA path gives padding
queries uniform weights instead. Either way nothing reaches a real token, and the model's losses
and outputs ignore padding positions, so the paths agree wherever a token is real.

Shapes: the kernels need L to be a multiple of their tile, so rows are padded inside (with id 0)
to a multiple of 128 (of 32/64 for short rows on the GPU) and cropped back. Under a mesh they run
per shard (``parallel.sharding.map_shards``: rows over the batch axes, heads over ``tensor``).
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp

from esmjax.errors import InputError
from esmjax.parallel.sharding import ACT_BATCH, ACT_HEADS, compute_platform, map_shards

log = logging.getLogger("esmjax.attention")

KERNELS = ("xla", "splash", "cudnn", "pallas_gpu")
_SIXTEEN_BIT = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


@dataclasses.dataclass(frozen=True)
class AttentionPath:
    """The chosen kernel, whether it runs in Pallas interpret mode, and why it was chosen."""

    kernel: str
    interpret: bool
    reason: str


def cudnn_ok(backend: str, dtype: jnp.dtype, head_dim: int) -> bool:
    """cuDNN flash attention: NVIDIA GPUs, 16-bit inputs, head_dim a multiple of 8 up to 128."""
    return (
        backend == "gpu"
        and jnp.dtype(dtype) in _SIXTEEN_BIT
        and head_dim % 8 == 0
        and head_dim <= 128
    )


def choose_attention(
    requested: str,
    *,
    dtype: jnp.dtype,
    head_dim: int,
    need_weights: bool = False,
    backend: str | None = None,
) -> AttentionPath:
    """THE choice of attention path (see the module docstring); logged once per distinct choice.

    Args:
      requested: ``auto`` or one of ``KERNELS`` (``ESM2Config.attention``).
      dtype: the compute dtype of q, k, v.
      head_dim: D.
      need_weights: the caller needs the [B, H, L, L] weights (attention maps, contacts).
      backend: the platform the program is compiled for (``compute_platform``: the mesh's, so a
        plan for a TPU from a CPU machine picks the Mosaic kernel) unless given.
    """
    backend = backend or compute_platform()
    dtype = jnp.dtype(dtype)
    if need_weights:
        path = AttentionPath("xla", False, "attention weights requested (only xla returns them)")
    elif requested == "xla":
        path = AttentionPath("xla", False, "model.attention=xla")
    elif requested == "auto":
        if backend == "tpu":
            path = AttentionPath("splash", False, "auto: TPU backend")
        elif backend == "gpu" and dtype in _SIXTEEN_BIT and 16 <= head_dim <= 128:
            path = AttentionPath("pallas_gpu", False, f"auto: GPU backend, {dtype.name} compute")
        else:
            path = AttentionPath("xla", False, f"auto: {backend} backend, {dtype.name} compute")
    elif requested == "splash":
        path = AttentionPath("splash", backend != "tpu", "model.attention=splash")
    elif requested == "pallas_gpu":
        path = AttentionPath("pallas_gpu", backend != "gpu", "model.attention=pallas_gpu")
    elif requested == "cudnn":
        if not cudnn_ok(backend, dtype, head_dim):
            raise InputError(
                "model.attention=cudnn needs an NVIDIA GPU, bfloat16/float16 compute and head_dim "
                f"a multiple of 8 up to 128 (got backend {backend}, {dtype.name}, D={head_dim})"
            )
        path = AttentionPath("cudnn", False, "model.attention=cudnn")
    else:
        raise InputError(f"model.attention must be auto or one of {KERNELS}, got {requested!r}")
    _log_once(path)
    return path


@functools.cache
def _log_once(path: AttentionPath) -> None:
    mode = " (Pallas interpret mode)" if path.interpret else ""
    log.info("attention kernel: %s%s: %s", path.kernel, mode, path.reason)


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
    path: AttentionPath, q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array
) -> jax.Array:
    """Runs a kernel path (not ``xla`` / ``cudnn``, which take the dense mask) per mesh shard.

    q, k, v [B, L, H, D], segment_ids [B, L] -> [B, L, H, D].
    """
    fn = {"splash": splash_attention, "pallas_gpu": pallas_gpu_attention}[path.kernel]
    fn = functools.partial(fn, interpret=path.interpret)
    qkv_axes = (ACT_BATCH, None, ACT_HEADS, None)
    return map_shards(
        lambda q, k, v, s: fn(q, k, v, s),
        (q, k, v, segment_ids),
        (qkv_axes, qkv_axes, qkv_axes, (ACT_BATCH, None)),
    )
