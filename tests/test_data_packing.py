"""Packing: best-fit decreasing, row assembly, efficiency on real lengths, and no attention
across segments."""

import jax
import numpy as np
import pytest
from data_fixtures import built
from flax import nnx

from esmjax.config import DataConfig, esm2_preset
from esmjax.data.packing import assemble, best_fit_decreasing
from esmjax.data.pipeline import train_batches
from esmjax.models.alphabet import BOS, EOS, PAD
from esmjax.models.esm2 import ESM2


def test_best_fit_decreasing_respects_capacity_and_segments():
    rng = np.random.default_rng(0)
    sizes = rng.integers(3, 200, 3000)
    bins, n = best_fit_decreasing(sizes, 256, max_segments=4)
    assert bins.min() == 0 and bins.max() == n - 1
    assert np.bincount(bins, weights=sizes, minlength=n).max() <= 256
    assert np.bincount(bins, minlength=n).max() <= 4
    again, _ = best_fit_decreasing(sizes, 256, max_segments=4)
    assert (again == bins).all()
    # Within 1% of the lower bound on the number of rows when many items share a row.
    _, n = best_fit_decreasing(sizes, 1024, max_segments=64)
    assert n <= np.ceil(sizes.sum() / 1024) * 1.01 + 1
    with pytest.raises(ValueError):
        best_fit_decreasing(np.array([257]), 256, 4)


def test_assemble_writes_segments_positions_and_padding():
    pieces = [np.array([5, 6, 7]), np.array([8]), np.array([9, 10])]
    out = assemble(2, 10, np.array([0, 0, 1]), np.array([0, 5, 0]), pieces)
    assert out["tokens"][0].tolist() == [BOS, 5, 6, 7, EOS, BOS, 8, EOS, PAD, PAD]
    assert out["segment_ids"][0].tolist() == [1, 1, 1, 1, 1, 2, 2, 2, 0, 0]
    assert out["positions"][0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 0, 0]
    assert out["tokens"][1].tolist() == [BOS, 9, 10, EOS] + [PAD] * 6
    assert out["segment_ids"][1].tolist() == [1, 1, 1, 1] + [0] * 6
    assert all(v.dtype == np.int32 for v in out.values())


@pytest.mark.parametrize("which,seq_len", [("cath", 1024), ("scope", 1024), ("cath", 256)])
def test_packing_efficiency_on_real_lengths(tmp_path_factory, which, seq_len):
    """>= 95% non-pad at ESM-2's 1,024 crop on CATH S20 and SCOPe ASTRAL 40 lengths (and the
    demo's 256)."""
    cfg = DataConfig(train=str(built(tmp_path_factory, which)), seq_len=seq_len)
    with train_batches(cfg, rows=64) as it:
        for _ in range(12):
            next(it)
        eff = it.packing_efficiency
    print(f"packing efficiency {which} seq_len={seq_len}: {eff:.4f}")
    assert eff >= 0.95


def test_packed_rows_never_attend_across_segments(cath_dir):
    """Each packed segment's logits equal those of the same sequence run alone (attention, rotary
    positions and the per-segment token-dropout scale all stay inside the segment)."""
    cfg = DataConfig(train=str(cath_dir), seq_len=256, max_segments=8)
    with train_batches(cfg, rows=16) as it:
        full = next(it)
    multi = np.flatnonzero(full["segment_ids"].max(axis=1) >= 2)[
        :2
    ]  # rows holding several sequences
    batch = {k: v[multi] for k, v in full.items()}
    assert len(multi) == 2
    model = nnx.jit(lambda: ESM2(esm2_preset("tiny"), rngs=nnx.Rngs(0)))()
    logits = nnx.jit(lambda m, t, s, p: m(t, s, p)["logits"])
    # The same sequences one per row (padded), through the same compiled function.
    segs = [(r, s) for r in range(2) for s in range(1, int(batch["segment_ids"][r].max()) + 1)]
    n = max(len(segs), 2)
    alone_tokens = np.full((n, cfg.seq_len), PAD, np.int32)
    for i, (r, s) in enumerate(segs):
        cols = np.flatnonzero(batch["segment_ids"][r] == s)
        alone_tokens[i, : len(cols)] = batch["tokens"][r, cols]
    alone_seg = (alone_tokens != PAD).astype(np.int32)
    alone_pos = np.broadcast_to(np.arange(cfg.seq_len, dtype=np.int32), alone_tokens.shape)
    alone = logits(model, alone_tokens, alone_seg, alone_pos)

    def pad_rows(x, fill):
        return np.concatenate([x, np.full((n - 2, x.shape[1]), fill, x.dtype)])

    packed = logits(
        model,
        pad_rows(batch["tokens"], PAD),
        pad_rows(batch["segment_ids"], 0),
        pad_rows(batch["positions"], 0),
    )
    for i, (r, s) in enumerate(segs):
        cols = np.flatnonzero(batch["segment_ids"][r] == s)
        np.testing.assert_allclose(
            np.asarray(packed[r, cols]), np.asarray(alone[i, : len(cols)]), rtol=1e-4, atol=1e-4
        )
    assert len(segs) >= 4
    assert jax.device_count() == 8
