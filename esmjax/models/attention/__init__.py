"""Attention over packed rows: ``choose_attention`` picks the path, ``attend`` runs it.

Glossary: B batch, L tokens, H heads, D head_dim.

Every path computes ``softmax(q k^T + mask) v`` over packed rows: ``segment_ids`` [B, L] numbers
the sequences of a row 1, 2, ... and 0 is padding; a query attends only the keys of its own
segment (Dao et al. 2022, "FlashAttention", for the tiling; segment ids as in MaxText). ``q`` comes
pre-scaled by ``scale_for(D)``.

Paths (``ESM2Config.attention``, ``model.attention`` in YAML):

- ``xla``: ``xla.dot_product_attention``, row-mapped XLA with a recomputing backward. The only
  path that returns attention weights; the CPU path.
- ``splash``: TPU splash attention with segment ids (``kernels.splash_attention``).
- ``pallas_gpu``: the Pallas Triton flash attention with segment ids
  (``kernels.pallas_gpu_attention``).
- ``cudnn``: cuDNN flash attention fed the dense [B, 1, L, L] mask (``kernels.cudnn_attention``).

``auto`` picks ``splash`` on a TPU, ``pallas_gpu`` on a GPU with 16-bit compute, else ``xla`` (so
a CPU run is bit-for-bit the XLA path). Any path asked to return attention weights is ``xla``.
The platform is the one the program is compiled for (the mesh's devices, ``compute_platform``),
not the machine's default backend: ``esmjax plan --target v5p-8`` on a CPU machine compiles the
Mosaic splash kernel, as a TPU run would. Interpret mode is used only when a kernel is named
explicitly on a platform it does not compile for (a CPU).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math

import jax
import jax.numpy as jnp

from esmjax.config.model import ATTENTION_PATHS
from esmjax.errors import InputError
from esmjax.models.attention import kernels, xla
from esmjax.models.attention.xla import attention_mask
from esmjax.parallel.sharding import compute_platform

__all__ = [
    "KERNELS",
    "AttentionPath",
    "attend",
    "attention_mask",
    "choose_attention",
    "cudnn_ok",
    "scale_for",
]

log = logging.getLogger("esmjax.attention")

KERNELS = tuple(p for p in ATTENTION_PATHS if p != "auto")
_SIXTEEN_BIT = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


@dataclasses.dataclass(frozen=True)
class AttentionPath:
    """The chosen kernel, whether it runs in Pallas interpret mode, and why it was chosen."""

    kernel: str
    interpret: bool
    reason: str


def scale_for(head_dim: int) -> float:
    """The query scale ``1 / sqrt(D)``."""
    return 1.0 / math.sqrt(head_dim)


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


def attend(
    path: AttentionPath,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array,
    segment_ids: jax.Array,
    *,
    need_weights: bool = False,
) -> tuple[jax.Array, jax.Array | None]:
    """Attention along ``path``: the packed kernels read ``segment_ids``, the XLA and cuDNN paths
    the dense ``mask``.

    Args:
      q, k, v: [B, L, H, D], q pre-scaled.
      mask: [B, 1, L, L] boolean, ``attention_mask(segment_ids)``.
      segment_ids: [B, L] int, 0 = padding.
      need_weights: also return the float32 weights [B, H, L, L] (the ``xla`` path only).
    Returns:
      out [B, L, H, D] in q's dtype, and the weights or None.
    """
    if path.kernel == "xla":
        return xla.dot_product_attention(q, k, v, mask, return_weights=need_weights)
    if path.kernel == "cudnn":
        return kernels.cudnn_attention(q, k, v, mask), None
    return kernels.packed_attention(
        path.kernel, q, k, v, segment_ids, interpret=path.interpret
    ), None
