"""Packing: best-fit decreasing, row assembly, ESM-2 crops (BOS/EOS only at a protein's real
ends), efficiency on real lengths, and no attention across segments."""

from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from support.data_fixtures import CATH_FASTA, built

from esmjax.config import DataConfig, esm2_preset
from esmjax.data.packing import assemble, best_fit_decreasing
from esmjax.data.pipeline import eval_batches, train_batches
from esmjax.io.fasta import read_fasta
from esmjax.models.alphabet import BOS, EOS, MASK, PAD, decode
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
    ends = np.ones(3, bool)
    out = assemble(2, 10, np.array([0, 0, 1]), np.array([0, 5, 0]), pieces, ends, ends)
    assert out["tokens"][0].tolist() == [BOS, 5, 6, 7, EOS, BOS, 8, EOS, PAD, PAD]
    assert out["segment_ids"][0].tolist() == [1, 1, 1, 1, 1, 2, 2, 2, 0, 0]
    assert out["positions"][0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 0, 0]
    assert out["tokens"][1].tolist() == [BOS, 9, 10, EOS] + [PAD] * 6
    assert out["segment_ids"][1].tolist() == [1, 1, 1, 1] + [0] * 6
    assert all(v.dtype == np.int32 for v in out.values())


def test_assemble_writes_bos_and_eos_only_where_a_crop_keeps_them():
    """Start window (BOS, no EOS), middle window (neither), end window (EOS, no BOS), whole
    sequence (both) in one row; positions restart at 0 on every segment, BOS or not."""
    pieces = [np.array([5, 6]), np.array([7, 8]), np.array([9]), np.array([10])]
    bos = np.array([True, False, False, True])
    eos = np.array([False, False, True, True])
    out = assemble(1, 12, np.zeros(4, np.int64), np.array([0, 3, 5, 7]), pieces, bos, eos)
    assert out["tokens"][0].tolist() == [BOS, 5, 6, 7, 8, 9, EOS, BOS, 10, EOS, PAD, PAD]
    assert out["segment_ids"][0].tolist() == [1, 1, 1, 2, 2, 3, 3, 4, 4, 4, 0, 0]
    assert out["positions"][0].tolist() == [0, 1, 2, 0, 1, 0, 1, 0, 1, 2, 0, 0]


def _crop_fasta(path: Path, seq_len: int) -> tuple[Path, dict[str, str]]:
    """Real CATH sequences: three cut longer than ``seq_len - 2`` residues (``seq_len - 1``: start
    and end windows only; ``seq_len``; ``seq_len + 6``) and ten that fit whole (one exactly)."""
    records = [r for r in read_fasta(CATH_FASTA) if len(r.sequence) >= seq_len + 6]
    long_lengths = [seq_len - 1, seq_len, seq_len + 6]
    short_lengths = [seq_len - 2, 3, 10, 17, 25, 31, 40, 44, 52, 60]
    seqs = {
        f"r{i}": rec.sequence[:n]
        for i, (rec, n) in enumerate(zip(records, long_lengths + short_lengths))
    }
    path.write_text("".join(f">{k}\n{v}\n" for k, v in seqs.items()))
    return path, seqs


def _check_crops(batches, seqs: dict[str, str], seq_len: int) -> set[tuple[str, int]]:
    """Checks every segment of ``batches`` against its source sequence; returns the (sequence,
    first token) windows seen for the sequences longer than the crop."""
    by_residues = {}
    windows = set()
    for b in batches:
        for r in range(len(b["targets"])):
            seg, pos, tgt = b["segment_ids"][r], b["positions"][r], b["targets"][r]
            for s in range(1, int(seg.max()) + 1):
                cols = np.flatnonzero(seg == s)
                toks = tgt[cols]
                assert pos[cols].tolist() == list(range(len(cols)))  # restart at 0, BOS or not
                has_bos, has_eos = toks[0] == BOS, toks[-1] == EOS
                body = toks[int(has_bos) : len(toks) - int(has_eos)]
                assert BOS not in body and EOS not in body and PAD not in body
                residues = decode(body)
                if has_bos and has_eos and residues in seqs.values():  # a whole sequence
                    assert len(seqs[_name(seqs, residues, by_residues)]) <= seq_len - 2
                    continue
                # A crop: the one segment of its row, filling it.
                assert len(cols) == seq_len and seg.max() == 1 and (seg > 0).all()
                (name,) = [k for k, v in seqs.items() if len(v) > seq_len - 2 and residues in v]
                full = seqs[name]
                i = full.index(residues)
                first = 0 if has_bos else i + 1  # first token of the window in BOS seq EOS
                assert has_bos == (first == 0) and has_eos == (first + seq_len == len(full) + 2)
                assert len(residues) == seq_len - has_bos - has_eos
                windows.add((name, first))
    return windows


def _name(seqs, residues, cache):
    if not cache:
        cache.update({v: k for k, v in seqs.items()})
    return cache[residues]


def test_packer_crops_as_esm2_start_middle_and_end_windows(tmp_path):
    """The training rows of one block of draws: every window of each sequence longer than the
    crop comes up with BOS only at the start and EOS only at the end, filling its row; whole
    sequences are ``BOS seq EOS`` as before."""
    seq_len = 64
    fasta, seqs = _crop_fasta(tmp_path / "crops.fa", seq_len)
    cfg = DataConfig(train=str(fasta), seq_len=seq_len, val_fraction=0.0, max_segments=8)
    with train_batches(cfg, rows=128) as it:
        block_rows = it.stream.block(0)[1].num_rows
        batches = [next(it) for _ in range(-(-block_rows // 128))]
    windows = _check_crops(batches, seqs, seq_len)
    # Sequences of 63, 64 and 70 residues have 66 - 64 + 1 = 2, 3 and 9 windows.
    long_names = sorted({n for n, _ in windows})
    assert long_names == ["r0", "r1", "r2"]
    for name in long_names:
        n = len(seqs[name])
        assert {f for k, f in windows if k == name} == set(range(n + 2 - seq_len + 1)), name
    # Short sequences all appear whole.
    whole = {
        decode(b["targets"][r, b["segment_ids"][r] == s][1:-1])
        for b in batches
        for r in range(len(b["targets"]))
        for s in range(1, int(b["segment_ids"][r].max()) + 1)
    }
    assert {v for v in seqs.values() if len(v) <= seq_len - 2} <= whole


def test_eval_batches_crop_the_same_way(tmp_path):
    """Evaluation: each record once, fixed windows, the same crop rule, identical when repeated."""
    seq_len = 64
    fasta, seqs = _crop_fasta(tmp_path / "crops.fa", seq_len)
    cfg = DataConfig(train=str(fasta), eval=str(fasta), seq_len=seq_len, eval_tokens=0)
    a = list(eval_batches(cfg, rows=4))
    b = list(eval_batches(cfg, rows=4))
    assert all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x) and len(a) == len(b)
    windows = _check_crops(a, seqs, seq_len)
    assert sorted(n for n, _ in windows) == ["r0", "r1", "r2"]  # one window each
    segments = sum(int(x["segment_ids"].max(axis=1).sum()) for x in a)
    assert segments == len(seqs)
    nonpad = sum(int((x["segment_ids"] > 0).sum()) for x in a)
    assert nonpad == sum(min(len(v) + 2, seq_len) for v in seqs.values())


def test_cropped_segment_matches_fair_esm_on_the_crop_alone(tmp_path):
    """A middle window (no BOS, no EOS, masked) through esmjax with the pipeline's segment ids and
    positions gives fair-esm ``ESM2``'s logits for that token row alone: positions start at 0 and
    token dropout counts the window's own tokens."""
    import torch
    from support.reference import fair_esm_model, rel_err, to_esmjax

    from esmjax.config import esm2_from_shape

    seq_len = 64
    fasta, _ = _crop_fasta(tmp_path / "crops.fa", seq_len)
    cfg = DataConfig(train=str(fasta), seq_len=seq_len, val_fraction=0.0, max_segments=8)
    with train_batches(cfg, rows=64) as it:
        batch = next(it)
    t = batch["targets"]
    middle = np.flatnonzero((t[:, 0] != BOS) & (t[:, -1] != EOS) & (batch["loss_mask"].any(1)))
    r = int(middle[0])
    assert (batch["segment_ids"][r] == 1).all() and (batch["tokens"][r] == MASK).any()
    ref = fair_esm_model(2, 32, 4, seed=5)
    model = to_esmjax(ref.state_dict(), esm2_from_shape(2, 32, 4), "fair-esm")
    rows = {k: batch[k][r : r + 1] for k in ("tokens", "segment_ids", "positions")}
    ours = model(rows["tokens"], rows["segment_ids"], rows["positions"])["logits"]
    with torch.no_grad():
        theirs = ref(torch.from_numpy(rows["tokens"]).long())["logits"].numpy()
    assert rel_err(np.asarray(ours), theirs) < 1e-5


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
