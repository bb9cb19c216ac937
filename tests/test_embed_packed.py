"""Packed embedding batches (``esmjax.inference.packed``): every record once, rows no wider than
their bucket, less padding than one record per row, and the outputs of the unpacked rows."""

import numpy as np
import pytest
from support.data_fixtures import cath_head

from esmjax.inference.embed import make_batches
from esmjax.inference.engine import Engine, bucketed, length_buckets
from esmjax.inference.packed import pack_rows, packed_batches
from esmjax.io import checkpoint
from esmjax.io.fasta import read_fasta


def test_rows_hold_every_record_once_within_their_bucket():
    rng = np.random.default_rng(0)
    lengths = [int(x) for x in rng.integers(5, 600, 500)]
    rows = pack_rows(lengths)
    placed = sorted(i for _, idx in rows for i in idx)
    assert placed == list(range(len(lengths)))
    buckets = length_buckets(max(lengths))
    for width, idx in rows:
        assert sum(lengths[i] for i in idx) <= width
        first = lengths[idx[0]]  # the row's opener sets its width: its own bucket
        assert width == min(b for b in buckets if b >= first)
        assert lengths[idx[0]] == max(lengths[i] for i in idx)
    packed = sum(w * r for w, r, _ in bucketed([w for w, _ in rows], 4096, 1, True))
    unpacked = sum(w * r for w, r, _ in bucketed(lengths, 4096, 1, True))
    assert packed < 0.9 * unpacked


@pytest.mark.parametrize("truncation", [None, 200])
def test_packed_outputs_are_the_unpacked_ones(ckpt, tmp_path, truncation):
    model, _ = checkpoint.load_model(ckpt)
    engine = Engine(model)
    records = list(read_fasta(cath_head(tmp_path / "c.fa", 60)))
    layers = tuple(range(model.cfg.num_layers + 1))
    want = {}
    for b in make_batches(records, 2048, truncation):
        out = engine.embed(b.tokens, layers, False, True)
        for row, rec in enumerate(b.records):
            n = min(len(rec.sequence), truncation or len(rec.sequence))
            want[rec.id] = [out["representations"][k][row, : n + 2] for k in layers]
            want[rec.id].append(out["logits"][row, : n + 2])
    seen, rows_with_several = [], 0
    for b in packed_batches(records, 2048, truncation):
        out = engine.embed_packed(b.tokens, b.segment_ids, b.positions, layers, True)
        rows_with_several += len({p.row for p in b.placed}) < len(b.placed)
        for p in b.placed:
            span = slice(p.start, p.start + p.n + 2)
            got = [out["representations"][k][p.row, span] for k in layers]
            got.append(out["logits"][p.row, span])
            for g, w in zip(got, want[p.record.id]):
                np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
            seen.append(p.record.id)
    assert sorted(seen) == sorted(want) and rows_with_several > 0
