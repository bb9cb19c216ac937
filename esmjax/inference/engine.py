"""The one inference engine: a restored model on a device mesh, length buckets, jitted forwards.

``esmjax embed``, ``fold`` and ``evaluate`` (and fine-tuning predictions) all run through
``Engine``. It splits the model once into a graph and a state placed on the mesh; ``forward`` turns
a function of ``(model, *arrays)`` into a jitted pass over *global* batches (rows split over the
``act_batch`` axes, parameters sharded by the rules) whose small results are replicated on every
device, so each process reads the same numbers whatever the device and process count. ``traces``
counts compilations: with the length buckets below a pass compiles once per bucket.

Two ways in: ``put_global`` for batches every process builds identically (embedding, folding,
pseudo-perplexity, variant and contact scoring), ``put_local`` for batches a data pipeline shards by
process (masked-LM perplexity).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from esmjax.models.alphabet import MASK, PAD, encode_with_specials
from esmjax.models.esm2 import ESM2
from esmjax.parallel import sharding as shd
from esmjax.parallel.rows import assemble, row_share


# --------------------------------------------------------------------------------------------------
# Length buckets
# --------------------------------------------------------------------------------------------------
def length_buckets(max_len: int) -> list[int]:
    """Padded token lengths 16, 24, 32, 48, 64, 96, 128, ... (powers of two and 1.5x), up to
    ``max_len``."""
    out, b = [], 16
    while True:
        for v in (b, b * 3 // 2):
            out.append(v)
            if v >= max_len:
                return sorted(set(out))
        b *= 2


def bucket_for(length: int, buckets: Sequence[int]) -> int:
    for b in buckets:
        if b >= length:
            return b
    raise ValueError(f"length {length} exceeds the largest bucket {buckets[-1]}")


def length_bucket(length: int) -> int:
    """The padded width for ``length`` tokens: 16, 24, 32, 48, 64, 96, ..."""
    return bucket_for(length, length_buckets(length))


def bucketed(
    lengths: Sequence[int], max_tokens: int, row_multiple: int = 1, fit_rows: bool = False
) -> Iterator[tuple[int, int, list[int]]]:
    """Groups items by padded length: yields ``(width, rows, indices)`` chunks, shortest first.

    Every chunk of one bucket has the same ``rows`` (about ``max_tokens / width``, a multiple of
    ``row_multiple``), so a jitted pass compiles once per bucket; the last chunk's extra rows are
    padding. ``fit_rows`` gives a bucket's last chunk the power of two of rows at or above its item
    count instead (a multiple of ``row_multiple``): at most one padded row in two where a unit of
    work leaves a few records in a bucket, for at most log2(rows) more compilations per bucket
    (the row counts are the same in every unit).
    """
    if not lengths:
        return
    buckets = length_buckets(max(lengths))
    groups: dict[int, list[int]] = {}
    for i in sorted(range(len(lengths)), key=lambda i: (lengths[i], i)):
        groups.setdefault(bucket_for(lengths[i], buckets), []).append(i)
    for width, idx in groups.items():
        rows = max(row_multiple, (max_tokens // width) // row_multiple * row_multiple)
        for start in range(0, len(idx), rows):
            chunk = idx[start : start + rows]
            if fit_rows and len(chunk) < rows:
                fitted = -(-(1 << (len(chunk) - 1).bit_length()) // row_multiple) * row_multiple
                yield width, min(rows, fitted), chunk
            else:
                yield width, rows, chunk


# --------------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------------
class Engine:
    """A model on a mesh and its jitted passes.

    Args:
      model: any NNX model (ESM2, ESMFold); ESM-2 passes below need an ESM2.
      mesh: the device mesh; ``None`` runs on one device (ESMFold's replicated trunk).
      rules: logical-axis rules (a preset name or a rule table).
    """

    def __init__(
        self, model: nnx.Module, mesh: jax.sharding.Mesh | None = None, rules: Any = "fsdp"
    ):
        self.cfg = model.cfg
        self.mesh = mesh if mesh is not None else shd.single_device_mesh()
        self.rules = shd.resolve_rules(rules)
        self.graphdef, self.state = nnx.split(model)
        self.traces = 0  # compilations of every pass, for tests and logs
        spec = self._batch_spec(2)[0]
        names = () if spec is None else (spec,) if isinstance(spec, str) else spec
        sizes = shd.mesh_sizes(self.mesh)
        self.row_multiple = int(np.prod([sizes[a] for a in names])) if names else 1
        # The rows this process loads for ``put_local`` (esmjax.parallel.rows).
        self.share = row_share(shd.batch_sharding(self.mesh, self.rules, 2))
        self._passes: dict[str, Callable] = {}

    @property
    def model(self) -> nnx.Module:
        """The model with the engine's current state (e.g. after ``set_contact_regression``)."""
        return nnx.merge(self.graphdef, self.state)

    def set_variables(self, variables: Any) -> None:
        """Points the engine at new parameter values of the same structure and shardings (e.g. a
        training run's current state): the passes run on them without recompiling."""
        nnx.replace_by_pure_dict(self.state, variables)

    # -- placement
    def _batch_spec(self, ndim: int) -> P:
        return shd.batch_sharding(self.mesh, self.rules, ndim).spec

    def put_global(self, x: np.ndarray) -> jax.Array:
        """A host array that every process holds in full -> a global array, rows split over the
        batch axes."""
        sharding = shd.batch_sharding(self.mesh, self.rules, x.ndim)
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    def put_local(self, x: np.ndarray) -> jax.Array:
        """This process's loader rows (``self.share``: block ``share.index`` of ``share.count``)
        -> the global array."""
        sharding = shd.batch_sharding(self.mesh, self.rules, x.ndim)
        return assemble(x, sharding, self.share)

    def pad_rows(self, x: np.ndarray, fill: int) -> np.ndarray:
        """Pads the leading axis up to a multiple of the batch axes' size."""
        extra = -len(x) % self.row_multiple
        if not extra:
            return x
        return np.concatenate([x, np.full((extra, *x.shape[1:]), fill, x.dtype)])

    # -- passes
    def forward(self, fn: Callable, static_argnums: Sequence[int] = ()) -> Callable:
        """``fn(model, *args)`` -> a host callable ``call(*args, local=False)``.

        Array arguments (NumPy) are placed as global batches (``local=True``: this process's rows);
        arguments at ``static_argnums`` (counted in ``args``) are compile-time constants. Results
        come back as host NumPy trees, replicated on every process.
        """
        statics = tuple(static_argnums)
        jitted = self._jit(fn, statics)

        def call(*args, local: bool = False):
            put = self.put_local if local else self.put_global
            placed = [a if i in statics else put(np.asarray(a)) for i, a in enumerate(args)]
            with shd.use_mesh(self.mesh, self.rules):
                out = jitted(self.state, *placed)
            return jax.device_get(out)

        return call

    def _jit(self, fn: Callable, statics: tuple[int, ...]) -> Callable:
        def body(state, *args):
            self.traces += 1
            return fn(nnx.merge(self.graphdef, state), *args)

        replicated = NamedSharding(self.mesh, P())
        return jax.jit(body, static_argnums=tuple(i + 1 for i in statics), out_shardings=replicated)

    def compile(self, fn: Callable, args: Sequence[Any], static_argnums: Sequence[int] = ()) -> Any:
        """The compiled executable of the pass ``forward(fn)`` runs, for ``args`` given as shapes
        (``jax.ShapeDtypeStruct``; statics as values), without running it: what ``esmjax plan
        --job embed|fold`` reads memory and kernels from. The engine's state may be abstract too
        (a model merged from shapes with shardings)."""
        statics = tuple(static_argnums)
        placed = [
            a if i in statics else jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=self._place(a))
            for i, a in enumerate(args)
        ]
        with shd.use_mesh(self.mesh, self.rules):
            return self._jit(fn, statics).trace(self.state, *placed).lower().compile()

    def _place(self, a: Any) -> NamedSharding:
        return shd.batch_sharding(self.mesh, self.rules, len(a.shape))

    def cached_forward(
        self, name: str, fn: Callable, static_argnums: Sequence[int] = ()
    ) -> Callable:
        """``forward`` built once per engine under ``name`` (compiled once per input shape)."""
        if name not in self._passes:
            self._passes[name] = self.forward(fn, static_argnums)
        return self._passes[name]

    # -- ESM-2 passes
    def embed(
        self, tokens: np.ndarray, repr_layers: tuple[int, ...], contacts: bool, logits: bool
    ) -> dict:
        """Representations (float32) of ``repr_layers``, logits and contacts of a [R, T] batch."""
        return self.cached_forward("embed", embed_pass, static_argnums=(1, 2, 3))(
            tokens, repr_layers, contacts, logits
        )

    def embed_packed(
        self,
        tokens: np.ndarray,
        segment_ids: np.ndarray,
        positions: np.ndarray,
        repr_layers: tuple[int, ...],
        logits: bool,
    ) -> dict:
        """``embed`` of packed rows (``esmjax.inference.packed``): no contacts."""
        return self.cached_forward("embed_packed", embed_packed_pass, static_argnums=(3, 4))(
            tokens, segment_ids, positions, repr_layers, logits
        )

    def mlm_rows(self, batch: dict[str, np.ndarray], local: bool = True) -> tuple[np.ndarray, ...]:
        """Per-row (nll_sum float32, count, correct) of a masked batch; ``local``: rows are this
        process's share."""
        keys = ("tokens", "targets", "loss_mask", "segment_ids", "positions")
        args = [np.asarray(batch[k]).astype(np.int32) for k in keys]
        return tuple(
            np.asarray(o) for o in self.cached_forward("mlm", _mlm_rows)(*args, local=local)
        )

    def logprobs(self, tokens: np.ndarray) -> np.ndarray:
        """[R, T, V] log-probabilities at every position of a [R, T] batch (rows a multiple of
        ``row_multiple``)."""
        return np.asarray(self.cached_forward("logprobs_all", _logprobs_all)(tokens))

    def logprobs_at(self, tokens: np.ndarray, at: np.ndarray) -> np.ndarray:
        """[R, V] log-probabilities at one position per row (rows identical on every process)."""
        r = len(tokens)
        tokens, at = self.pad_rows(tokens, PAD), self.pad_rows(at, 0)
        return np.asarray(self.cached_forward("logprobs", _logprobs_at)(tokens, at))[:r]

    def contacts(self, tokens: np.ndarray) -> np.ndarray:
        """[R, T-2, T-2] contact probabilities from the model's contact head."""
        r = len(tokens)
        return np.asarray(
            self.cached_forward("contacts", _contact_maps)(self.pad_rows(tokens, PAD))
        )[:r]

    def contact_features(self, tokens: np.ndarray) -> np.ndarray:
        """[R, T-2, T-2, N*H] the contact head's symmetrised, APC-corrected attention features."""
        r = len(tokens)
        feats = self.cached_forward("features", _contact_features)(self.pad_rows(tokens, PAD))
        return np.asarray(feats)[:r]

    def set_contact_regression(self, kernel: np.ndarray, bias: np.ndarray) -> None:
        """Replaces the contact head's logistic regression ([N*H, 1] kernel, [1] bias)."""
        reg = self.state["contact_head"]["regression"]
        for name, value in (("kernel", kernel), ("bias", bias)):
            old = reg[name][...]
            reg[name].value = jax.device_put(
                np.asarray(value, old.dtype).reshape(old.shape), old.sharding
            )


# -- ESM-2 pass bodies: (model, *arrays) -> small results
def embed_pass(model: ESM2, tokens, repr_layers, contacts, logits):
    out = model(tokens, repr_layers=repr_layers, return_contacts=contacts, return_logits=logits)
    return _float_outputs(out)


def embed_packed_pass(model: ESM2, tokens, segment_ids, positions, repr_layers, logits):
    out = model(tokens, segment_ids, positions, repr_layers=repr_layers, return_logits=logits)
    return _float_outputs(out)


def _float_outputs(out: dict) -> dict:
    out["representations"] = {k: v.astype(jnp.float32) for k, v in out["representations"].items()}
    out.pop("attentions", None)
    return out


def _mlm_rows(model: ESM2, tokens, targets, loss_mask, segment_ids, positions):
    """Per row: summed NLL, masked-token count and correct argmax predictions over ``loss_mask``."""
    out = model(tokens, segment_ids, positions)
    logp = jax.nn.log_softmax(out["logits"], axis=-1)  # [B, L, V]
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]  # [B, L]
    correct = jnp.argmax(out["logits"], axis=-1) == targets
    m = loss_mask.astype(bool)
    return (
        jnp.where(m, nll, 0.0).sum(-1),
        m.sum(-1).astype(jnp.int32),
        (m & correct).sum(-1).astype(jnp.int32),
    )


def _logprobs_all(model: ESM2, tokens):
    return jax.nn.log_softmax(model(tokens)["logits"], axis=-1)  # [B, L, V]


def _logprobs_at(model: ESM2, tokens, at):
    """[B, V] log-probabilities at position ``at[b]`` of each row."""
    logits = model(tokens)["logits"]  # [B, L, V]
    row = jnp.take_along_axis(logits, at[:, None, None], axis=1)[:, 0]  # [B, V]
    return jax.nn.log_softmax(row, axis=-1)


def _contact_maps(model: ESM2, tokens):
    return model(tokens, return_contacts=True, return_logits=False)["contacts"]


def _contact_features(model: ESM2, tokens):
    out = model(tokens, need_head_weights=True, return_logits=False)
    return model.contact_head.features(tokens, out["attentions"])


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
    lengths = [len(encoded[q.seq]) for q in queries]
    for width, rows, chunk in bucketed(lengths, max_tokens, engine.row_multiple, fit_rows=True):
        tokens = np.full((rows, width), PAD, np.int32)  # fixed shape per bucket: one compilation
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
