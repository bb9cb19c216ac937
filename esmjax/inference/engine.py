"""A restored ESM2 on a device mesh and the jitted forward passes that evaluation needs.

Every pass puts a *global* batch on the mesh (rows split over the ``act_batch`` axes, parameters
sharded by the rules) and returns small per-row results replicated on every device, so each process
reads the same numbers whatever the device and process count. Host-side sums then run in float64 in
row order.

Two ways in: ``put_global`` for batches every process builds identically (pseudo-perplexity, variant
and contact scoring), ``put_local`` for batches a data pipeline shards by process (masked-LM
perplexity).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from esmjax.inference.embed import bucket_for, length_buckets
from esmjax.models.alphabet import MASK, PAD, encode_with_specials
from esmjax.models.esm2 import ESM2
from esmjax.parallel import sharding as shd


def length_bucket(length: int) -> int:
    """The padded width for ``length`` tokens: 16, 24, 32, 48, 64, 96, ... (``esmjax embed``'s
    buckets)."""
    return bucket_for(length, length_buckets(length))


class Engine:
    """Jitted evaluation passes of one model on one mesh."""

    def __init__(self, model: ESM2, mesh: jax.sharding.Mesh, rules: shd.Rules | str = "fsdp"):
        self.cfg = model.cfg
        self.mesh = mesh
        self.rules = shd.resolve_rules(rules)
        self.graphdef, self.state = nnx.split(model)
        batch_axes = self._batch_spec(2)[0]
        names = (
            ()
            if batch_axes is None
            else (batch_axes,)
            if isinstance(batch_axes, str)
            else batch_axes
        )
        sizes = shd.mesh_sizes(mesh)
        self.row_multiple = int(np.prod([sizes[a] for a in names])) if names else 1
        replicated = NamedSharding(mesh, P())
        self._mlm = jax.jit(self._mlm_rows, out_shardings=replicated)
        self._logprobs = jax.jit(self._logprobs_at, out_shardings=replicated)
        self._contacts = jax.jit(self._contact_maps, out_shardings=replicated)
        self._features = jax.jit(self._contact_features, out_shardings=replicated)

    # -- placement
    # ----------------------------------------------------------------------------------------------
    def _batch_spec(self, ndim: int) -> P:
        return shd.batch_sharding(self.mesh, self.rules, ndim).spec

    def put_global(self, x: np.ndarray) -> jax.Array:
        """A host array that every process holds in full -> a global array, rows split over the
        batch axes."""
        sharding = shd.batch_sharding(self.mesh, self.rules, x.ndim)
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    def put_local(self, x: np.ndarray) -> jax.Array:
        """This process's rows -> the global array (rows of process 0 first, then process 1,
        ...)."""
        sharding = shd.batch_sharding(self.mesh, self.rules, x.ndim)
        return jax.make_array_from_process_local_data(sharding, x)

    def pad_rows(self, x: np.ndarray, fill: int) -> np.ndarray:
        """Pads the leading axis up to a multiple of the batch axes' size."""
        extra = -len(x) % self.row_multiple
        if not extra:
            return x
        return np.concatenate([x, np.full((extra, *x.shape[1:]), fill, x.dtype)])

    # -- jitted bodies
    # -------------------------------------------------------------------------------------------
    def _model(self, state) -> ESM2:
        return nnx.merge(self.graphdef, state)

    def _mlm_rows(self, state, tokens, targets, loss_mask, segment_ids, positions):
        """Per row: summed NLL, masked-token count and correct argmax predictions over
        ``loss_mask``."""
        out = self._model(state)(tokens, segment_ids, positions)
        logp = jax.nn.log_softmax(out["logits"], axis=-1)  # [B, L, V]
        nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]  # [B, L]
        correct = jnp.argmax(out["logits"], axis=-1) == targets
        m = loss_mask.astype(bool)
        return (
            jnp.where(m, nll, 0.0).sum(-1),
            m.sum(-1).astype(jnp.int32),
            (m & correct).sum(-1).astype(jnp.int32),
        )

    def _logprobs_at(self, state, tokens, at):
        """[B, V] log-probabilities at position ``at[b]`` of each row."""
        logits = self._model(state)(tokens)["logits"]  # [B, L, V]
        row = jnp.take_along_axis(logits, at[:, None, None], axis=1)[:, 0]  # [B, V]
        return jax.nn.log_softmax(row, axis=-1)

    def _contact_maps(self, state, tokens):
        return self._model(state)(tokens, return_contacts=True, return_logits=False)["contacts"]

    def _contact_features(self, state, tokens):
        model = self._model(state)
        out = model(tokens, need_head_weights=True, return_logits=False)
        return model.contact_head.features(tokens, out["attentions"])

    # -- host entry points
    # ---------------------------------------------------------------------------------------
    def mlm_rows(self, batch: dict[str, np.ndarray], local: bool = True) -> tuple[np.ndarray, ...]:
        """Per-row (nll_sum float32, count, correct) of a masked batch; ``local``: rows are this
        process's share."""
        put = self.put_local if local else self.put_global
        keys = ("tokens", "targets", "loss_mask", "segment_ids", "positions")
        args = [put(np.asarray(batch[k]).astype(np.int32)) for k in keys]
        with shd.use_mesh(self.mesh, self.rules):
            out = self._mlm(self.state, *args)
        return tuple(np.asarray(jax.device_get(o)) for o in out)

    def logprobs_at(self, tokens: np.ndarray, at: np.ndarray) -> np.ndarray:
        """[R, V] log-probabilities at one position per row (rows identical on every process)."""
        r = len(tokens)
        tokens, at = self.pad_rows(tokens, PAD), self.pad_rows(at, 0)
        with shd.use_mesh(self.mesh, self.rules):
            out = self._logprobs(self.state, self.put_global(tokens), self.put_global(at))
        return np.asarray(jax.device_get(out))[:r]

    def contacts(self, tokens: np.ndarray) -> np.ndarray:
        """[R, T-2, T-2] contact probabilities from the model's contact head."""
        r = len(tokens)
        with shd.use_mesh(self.mesh, self.rules):
            out = self._contacts(self.state, self.put_global(self.pad_rows(tokens, PAD)))
        return np.asarray(jax.device_get(out))[:r]

    def contact_features(self, tokens: np.ndarray) -> np.ndarray:
        """[R, T-2, T-2, N*H] the contact head's symmetrised, APC-corrected attention features."""
        r = len(tokens)
        with shd.use_mesh(self.mesh, self.rules):
            out = self._features(self.state, self.put_global(self.pad_rows(tokens, PAD)))
        return np.asarray(jax.device_get(out))[:r]

    def set_contact_regression(self, kernel: np.ndarray, bias: np.ndarray) -> None:
        """Replaces the contact head's logistic regression ([N*H, 1] kernel, [1] bias)."""
        reg = self.state["contact_head"]["regression"]
        for name, value in (("kernel", kernel), ("bias", bias)):
            old = reg[name][...]
            reg[name].value = jax.device_put(
                np.asarray(value, old.dtype).reshape(old.shape), old.sharding
            )


@dataclass(frozen=True)
class MaskedQuery:
    """Mask residue ``position`` (0-based, residue index) of ``sequences[seq]`` and read its
    log-probabilities."""

    seq: int
    position: int


def masked_logprobs(
    engine: Engine,
    sequences: Sequence[str],
    queries: Sequence[MaskedQuery],
    max_tokens: int = 8192,
    progress=None,
) -> np.ndarray:
    """[Q, V] log p(token | sequence with that one position masked), batched by padded length.

    This is the masked-marginal primitive of pseudo-perplexity (Salazar et al. 2020) and of
    zero-shot variant scoring (Meier et al. 2021). Rows of one batch share a padded width; the row
    count is a multiple of the batch axes' size and about ``max_tokens / width``.
    """
    encoded = [encode_with_specials(s) for s in sequences]
    out = np.zeros((len(queries), engine.cfg.vocab_size), np.float32)
    groups: dict[int, list[int]] = {}
    for qi in sorted(range(len(queries)), key=lambda i: (len(encoded[queries[i].seq]), i)):
        groups.setdefault(length_bucket(len(encoded[queries[qi].seq])), []).append(qi)
    for width, idx in groups.items():
        rows = max(
            engine.row_multiple, (max_tokens // width) // engine.row_multiple * engine.row_multiple
        )
        for start in range(0, len(idx), rows):
            chunk = idx[start : start + rows]
            tokens = np.full(
                (rows, width), PAD, np.int32
            )  # fixed shape per bucket: one compilation
            at = np.zeros(rows, np.int32)
            for r, qi in enumerate(chunk):
                q = queries[qi]
                enc = encoded[q.seq]
                tokens[r, : len(enc)] = enc
                tokens[r, q.position + 1] = MASK  # +1: BOS
                at[r] = q.position + 1
            out[chunk] = engine.logprobs_at(tokens, at)[: len(chunk)]
            if progress is not None:
                progress.update(len(chunk))
    return out
