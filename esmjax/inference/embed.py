"""``esmjax embed``: representations, logits and contacts for every record of a FASTA file (fair-esm
``esm-extract``'s counterpart).

Records are sorted by length, padded to a small fixed set of length buckets and grouped into batches
of a fixed row count per bucket, so the jitted forward compiles at most once per bucket. Each
record's arrays are written to ``<id>.npz`` with BOS and EOS removed.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from esmjax.errors import InputError
from esmjax.io import checkpoint
from esmjax.io.fasta import Record, check_unique_ids, read_fasta, sanitize_id
from esmjax.models.alphabet import PAD, batch_encode
from esmjax.models.esm2 import ESM2
from esmjax.parallel import sharding as shd

log = logging.getLogger("esmjax.inference.embed")

INCLUDE_CHOICES = ("per_tok", "mean", "logits", "contacts")


def length_buckets(max_len: int) -> list[int]:
    """Padded token lengths 16, 32, 48, 64, 96, 128, 192, 256, 384, ... (powers of two and 1.5x),
    up to max_len."""
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


@dataclass(frozen=True)
class Batch:
    records: list[Record]
    tokens: np.ndarray  # [R, T]; rows past len(records) are all padding


def make_batches(
    records: Sequence[Record], max_tokens: int, truncation: int | None, row_multiple: int = 1
) -> Iterator[Batch]:
    """Groups length-sorted records into fixed-shape batches: one row count per length bucket."""
    if not records:
        return
    lengths = [min(len(r.sequence), truncation or len(r.sequence)) + 2 for r in records]
    buckets = length_buckets(max(lengths))
    order = sorted(range(len(records)), key=lambda i: lengths[i])
    groups: dict[int, list[int]] = {}
    for i in order:
        groups.setdefault(bucket_for(lengths[i], buckets), []).append(i)
    for width, idx in groups.items():
        rows = max(row_multiple, (max_tokens // width) // row_multiple * row_multiple)
        for start in range(0, len(idx), rows):
            chunk = [records[i] for i in idx[start : start + rows]]
            tokens = batch_encode([r.sequence for r in chunk], truncation, pad_to=width)
            full = np.full((rows, width), PAD, np.int32)
            full[: len(chunk)] = tokens
            yield Batch(chunk, full)


class Embedder:
    """A restored model and one jitted forward per padded shape."""

    def __init__(self, model: ESM2, mesh: jax.sharding.Mesh, rules: shd.Rules):
        self.cfg = model.cfg
        self.mesh, self.rules = mesh, rules
        self.graphdef, self.state = nnx.split(model)
        self.traces = 0  # how many times the forward was traced (compilations), for tests and logs

        def forward(state, tokens, repr_layers, contacts, logits):
            self.traces += 1
            m = nnx.merge(self.graphdef, state)
            out = m(tokens, repr_layers=repr_layers, return_contacts=contacts, return_logits=logits)
            out["representations"] = {
                k: v.astype(jnp.float32) for k, v in out["representations"].items()
            }
            out.pop("attentions", None)
            return out

        self._forward = jax.jit(forward, static_argnums=(2, 3, 4))

    def __call__(
        self, tokens: np.ndarray, repr_layers: tuple[int, ...], contacts: bool, logits: bool
    ) -> dict:
        with shd.use_mesh(self.mesh, self.rules):
            x = jax.device_put(tokens, shd.batch_sharding(self.mesh, self.rules, 2))
            out = self._forward(self.state, x, repr_layers, contacts, logits)
        return jax.device_get(out)


def parse_layers(spec: str, num_layers: int) -> tuple[int, ...]:
    """``all`` or comma/space separated indices (negatives count from the end) -> sorted
    non-negative indices."""
    if spec.strip() == "all":
        return tuple(range(num_layers + 1))
    out = set()
    for tok in spec.replace(",", " ").split():
        try:
            i = int(tok)
        except ValueError:
            raise InputError(f"--layers: {tok!r} is not an integer") from None
        if not -(num_layers + 1) <= i <= num_layers:
            raise InputError(
                f"--layers: {i} out of range for a model with {num_layers} layers (0..{num_layers})"
            )
        out.add(i % (num_layers + 1))
    return tuple(sorted(out))


def load_records(path: str, unknown_as_x: bool) -> list[Record]:
    """Reads and validates the whole FASTA before any output is written."""
    records = list(read_fasta(path, unknown_as_x=unknown_as_x))
    check_unique_ids(records, path, ".npz")
    return records


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


def embed_records(
    embedder: Embedder,
    records: Sequence[Record],
    out_dir: Path,
    layers: tuple[int, ...],
    include: Sequence[str],
    max_tokens: int,
    truncation: int | None,
    progress: bool = True,
) -> int:
    include = set(include)
    want_repr = bool(include & {"per_tok", "mean"})
    repr_layers = layers if want_repr else ()
    n_dev = embedder.mesh.devices.size
    out_dir.mkdir(parents=True, exist_ok=True)
    for r in records:
        if truncation is not None and len(r.sequence) > truncation:
            log.warning("%s: %d residues truncated to %d", r.id, len(r.sequence), truncation)
    bar = tqdm(total=len(records), desc="embed", unit="seq", file=sys.stderr, disable=not progress)
    done = 0
    for batch in make_batches(records, max_tokens, truncation, row_multiple=n_dev):
        out = embedder(batch.tokens, repr_layers, "contacts" in include, "logits" in include)
        for row, rec in enumerate(batch.records):
            n = min(len(rec.sequence), truncation or len(rec.sequence))
            arrays: dict[str, np.ndarray] = {}
            for layer in repr_layers:
                h = out["representations"][layer][row, 1 : n + 1]
                if "per_tok" in include:
                    arrays[f"repr_{layer}"] = h
                if "mean" in include:
                    arrays[f"mean_{layer}"] = h.mean(0)
            if "logits" in include:
                arrays["logits"] = out["logits"][row, 1 : n + 1]
            if "contacts" in include:
                arrays["contacts"] = out["contacts"][row, :n, :n]
            write_npz(out_dir / f"{sanitize_id(rec.id)}.npz", arrays)
            done += 1
        bar.update(len(batch.records))
    bar.close()
    return done


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint", required=True, help="esmjax checkpoint folder or training workdir"
    )
    p.add_argument("--fasta", required=True, help="input FASTA (plain or gzip)")
    p.add_argument("--out", required=True, help="output folder for <id>.npz files")
    p.add_argument("--step", type=int, default=None, help="training step (default: latest)")
    p.add_argument(
        "--layers",
        default="-1",
        help="layer indices (negatives from the end) or 'all' [default: -1]",
    )
    p.add_argument(
        "--include", nargs="+", default=["mean"], choices=INCLUDE_CHOICES, help="what to write"
    )
    p.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype"
    )
    p.add_argument("--max-tokens-per-batch", type=int, default=4096, help="padded tokens per batch")
    p.add_argument(
        "--truncation-seq-length", type=int, default=1022, help="residues kept per record (0 = all)"
    )
    p.add_argument(
        "--unknown-as-x", action="store_true", help="read characters outside the alphabet as X"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    records = load_records(args.fasta, args.unknown_as_x)
    rules = shd.resolve_rules("fsdp")
    mesh = checkpoint.inference_mesh(args.checkpoint, rules)
    model, step = checkpoint.load_model(
        args.checkpoint,
        step=args.step,
        mesh=mesh,
        rules=rules,
        dtype=args.dtype,
    )
    layers = parse_layers(args.layers, model.cfg.num_layers)
    embedder = Embedder(model, mesh, rules)
    truncation = args.truncation_seq_length or None
    n = embed_records(
        embedder,
        records,
        Path(args.out),
        layers,
        args.include,
        args.max_tokens_per_batch,
        truncation,
        progress=not args.no_progress,
    )
    log.info(
        "wrote %d records to %s (checkpoint step %d, %d compilations)",
        n,
        args.out,
        step,
        embedder.traces,
    )
    return 0
