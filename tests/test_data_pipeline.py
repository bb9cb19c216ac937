"""The batch contract the trainer relies on: shapes, invariants, masking, resume, process
sharding, evaluation."""

import json

import numpy as np
import pytest
from support.data_fixtures import CATH_FASTA

from esmjax.config import DataConfig
from esmjax.data.masking import maskable
from esmjax.data.pipeline import BATCH_KEYS, eval_batches, train_batches
from esmjax.data.source import DatasetError, held_out, open_split
from esmjax.io.fasta import read_fasta
from esmjax.models.alphabet import BOS, EOS, MASK, PAD, decode


@pytest.fixture(scope="session")
def cath_seqs():
    return {rec.sequence: rec.id for rec in read_fasta(CATH_FASTA)}


def take(it, n):
    with it:
        return [next(it) for _ in range(n)]


def same(a, b):
    return all(np.array_equal(a[k], b[k]) for k in BATCH_KEYS)


@pytest.mark.parametrize("seq_len", [1024, 256])
def test_batch_contract_and_row_invariants(cath_dir, cath_seqs, seq_len):
    cfg = DataConfig(train=str(cath_dir), seq_len=seq_len, max_segments=16)
    [b] = take(train_batches(cfg, rows=24), 1)
    assert set(b) == set(BATCH_KEYS)
    for k, dt in [("tokens", np.int32), ("targets", np.int32), ("loss_mask", np.bool_)]:
        assert b[k].shape == (24, seq_len) and b[k].dtype == dt
    assert b["segment_ids"].dtype == np.int32 and b["positions"].dtype == np.int32
    long_seqs = [s for s in cath_seqs if len(s) > seq_len - 2]
    crops = 0
    for r in range(24):
        seg, pos, tgt = b["segment_ids"][r], b["positions"][r], b["targets"][r]
        k = seg.max()
        assert 1 <= k <= 16
        used = np.flatnonzero(seg)
        assert used.tolist() == list(range(len(used)))  # segments first, padding after
        assert (tgt[len(used) :] == PAD).all() and (pos[len(used) :] == 0).all()
        assert (np.diff(seg[: len(used)]) >= 0).all() and set(seg[: len(used)]) == set(
            range(1, k + 1)
        )
        for s in range(1, k + 1):
            cols = np.flatnonzero(seg == s)
            assert pos[cols].tolist() == list(range(len(cols)))  # positions restart per segment
            has_bos, has_eos = tgt[cols[0]] == BOS, tgt[cols[-1]] == EOS
            body = tgt[cols[int(has_bos) : len(cols) - int(has_eos)]]
            assert BOS not in body and EOS not in body
            residues = decode(body)
            if has_bos and has_eos and residues in cath_seqs:
                continue  # a whole CATH sequence
            # Or a seq_len-token window of a longer one, alone in its row, BOS only at its start
            # and EOS only at its end.
            assert len(cols) == seq_len and k == 1
            (full,) = [x for x in long_seqs if residues in x]
            assert not has_bos or full.index(residues) == 0
            assert not has_eos or full.endswith(residues)
            assert len(residues) == seq_len - has_bos - has_eos
            crops += 1
    assert crops >= 1 or seq_len == 1024  # 5 of 14,942 CATH sequences are longer than 1,022


def test_masking_rate_and_80_10_10_split(cath_dir):
    cfg = DataConfig(train=str(cath_dir), seq_len=512)
    batches = take(train_batches(cfg, rows=32), 6)
    tok = np.concatenate([b["tokens"] for b in batches])
    tgt = np.concatenate([b["targets"] for b in batches])
    sel = np.concatenate([b["loss_mask"] for b in batches])
    assert not sel[~maskable(tgt)].any()  # never BOS, EOS or padding
    assert (tok[~sel] == tgt[~sel]).all()  # unselected positions are untouched
    rate = sel.sum() / maskable(tgt).sum()
    assert abs(rate - 0.15) < 0.005
    as_mask = (tok[sel] == MASK).mean()
    kept = (
        tok[sel] == tgt[sel]
    ).mean()  # 10% kept + 10% random that happened to draw the same residue
    assert abs(as_mask - 0.8) < 0.01 and abs(kept - 0.1 - 0.1 / 20) < 0.01
    random = tok[sel][(tok[sel] != MASK) & (tok[sel] != tgt[sel])]
    assert abs(len(random) / sel.sum() - 0.095) < 0.01 and maskable(random).all()


def test_same_seed_same_stream_other_seed_other_stream(cath_dir):
    cfg = DataConfig(train=str(cath_dir), seq_len=256)
    a, b = take(train_batches(cfg, rows=8), 2), take(train_batches(cfg, rows=8), 2)
    c = take(train_batches(DataConfig(train=str(cath_dir), seq_len=256, seed=1), rows=8), 1)
    assert same(a[0], b[0]) and same(a[1], b[1]) and not same(a[0], c[0])
    assert not same(a[0], a[1])


def test_state_restores_the_identical_continuation(cath_dir):
    cfg = DataConfig(train=str(cath_dir), seq_len=256, prefetch=3)
    with train_batches(cfg, rows=16) as it:
        for _ in range(3):
            next(it)
        state = json.loads(json.dumps(it.get_state()))  # what the checkpoint stores
        expected = [next(it) for _ in range(4)]
    assert len(json.dumps(state)) < 400
    resumed = train_batches(cfg, rows=16)
    resumed.set_state(state)
    got = take(resumed, 4)
    assert all(same(x, y) for x, y in zip(expected, got))
    # A state from another stream is refused.
    other = train_batches(DataConfig(train=str(cath_dir), seq_len=256, seed=9), rows=16)
    with pytest.raises(DatasetError, match="seed"):
        other.set_state(state)
    other.close()
    # So is one saved before ESM-2 crops (state version 1): its stream was cropped otherwise.
    old = train_batches(cfg, rows=16)
    with pytest.raises(DatasetError, match="version 1"):
        old.set_state({**state, "version": 1})
    old.close()


@pytest.mark.parametrize("count", [2, 4])
def test_processes_get_disjoint_parts_of_the_same_global_batch(cath_dir, count):
    cfg = DataConfig(train=str(cath_dir), seq_len=256)
    whole = take(train_batches(cfg, rows=16), 3)
    parts = [
        take(train_batches(cfg, rows=16 // count, process_index=p, process_count=count), 3)
        for p in range(count)
    ]
    for g in range(3):
        for k in BATCH_KEYS:
            assert np.array_equal(
                whole[g][k], np.concatenate([parts[p][g][k] for p in range(count)])
            )


def test_processes_together_cover_every_cluster_evenly(tmp_path):
    """The first block of 4,096 draws holds every one of 300 clusters 13 or 14 times (4,096 = 13 x
    300 + 196), and two processes' rows together hold exactly that block: nothing lost, nothing
    duplicated."""
    records = list(read_fasta(CATH_FASTA))[:300]
    fasta = tmp_path / "train.fa"
    fasta.write_text("".join(f">{r.id}\n{r.sequence}\n" for r in records))
    assert (
        len({r.sequence for r in records}) == 300 and max(len(r.sequence) for r in records) <= 1022
    )
    cfg = DataConfig(train=str(fasta), seq_len=1024, val_fraction=0.0)
    its = [train_batches(cfg, rows=8, process_index=p, process_count=2) for p in range(2)]
    block_rows = its[0].stream.block(0)[1].num_rows
    seen = []
    for g in range(-(-block_rows // 16)):
        for p, it in enumerate(its):
            b = next(it)
            for r in range(8):
                if g * 16 + p * 8 + r >= block_rows:  # past block 0
                    continue
                for s in range(1, b["segment_ids"][r].max() + 1):
                    seen.append(decode(b["targets"][r, b["segment_ids"][r] == s][1:-1]))
    for it in its:
        it.close()
    assert len(seen) == 4096
    counts = [seen.count(r.sequence) for r in records]
    assert sorted(set(counts)) == [13, 14] and counts.count(14) == 196


def test_resume_on_another_process_count_is_exact(cath_dir):
    cfg = DataConfig(train=str(cath_dir), seq_len=256)
    with train_batches(cfg, rows=16) as one:
        next(one), next(one)
        state = one.get_state()
        expected = [next(one) for _ in range(2)]
    parts = []
    for p in range(4):
        it = train_batches(cfg, rows=4, process_index=p, process_count=4)
        it.set_state(state)
        parts.append(take(it, 2))
    for g in range(2):
        for k in BATCH_KEYS:
            assert np.array_equal(
                expected[g][k], np.concatenate([parts[p][g][k] for p in range(4)])
            )


def test_worker_processes_give_the_same_batches(cath_dir):
    cfg = DataConfig(train=str(cath_dir), seq_len=256)
    threads = take(train_batches(cfg, rows=8), 3)
    workers = take(
        train_batches(DataConfig(train=str(cath_dir), seq_len=256, num_workers=2), rows=8), 3
    )
    assert all(same(x, y) for x, y in zip(threads, workers))


def test_held_out_clusters_never_reach_training(scope_dir):
    train, val = open_split(scope_dir, "train"), open_split(scope_dir, "validation")
    t = train.describe(np.arange(train.num_records))
    v = val.describe(np.arange(val.num_records))
    t_clusters, v_clusters = {c for _, c in t}, {c for _, c in v}
    assert v_clusters and not (t_clusters & v_clusters)
    assert not ({i for i, _ in t} & {i for i, _ in v})
    assert all(held_out(c, 0.05) for c in v_clusters) and not any(
        held_out(c, 0.05) for c in t_clusters
    )
    assert abs(len(v_clusters) / (len(v_clusters) + len(t_clusters)) - 0.05) < 0.01
    # Records of one cluster are contiguous and each cluster appears once.
    assert len(t_clusters) == train.num_clusters and len(v_clusters) == val.num_clusters


def test_eval_batches_are_fixed_finite_and_process_count_invariant(cath_dir):
    cfg = DataConfig(train=str(cath_dir), seq_len=256, eval_tokens=20_000)
    a = list(eval_batches(cfg, rows=8))
    b = list(
        eval_batches(
            DataConfig(train=str(cath_dir), seq_len=256, eval_tokens=20_000, seed=7), rows=8
        )
    )
    assert len(a) == len(b) and all(
        same(x, y) for x, y in zip(a, b)
    )  # independent of the training seed
    nonpad = sum(int((x["segment_ids"] > 0).sum()) for x in a)
    assert 20_000 <= nonpad < 20_000 + 1024
    halves = [list(eval_batches(cfg, rows=4, process_index=p, process_count=2)) for p in range(2)]
    assert len(halves[0]) == len(halves[1]) == len(a)
    for g in range(len(a)):
        for k in BATCH_KEYS:
            assert np.array_equal(a[g][k], np.concatenate([halves[0][g][k], halves[1][g][k]]))
    # Only the last batch may hold empty (all-padding) rows.
    assert all((x["segment_ids"].max(axis=1) > 0).all() for x in a[:-1])


def test_eval_on_a_fasta_file_covers_every_record_once(tmp_path, cath_dir):
    fasta = tmp_path / "eval.fa"
    records = list(read_fasta(CATH_FASTA))[:300]
    fasta.write_text("".join(f">{r.id}\n{r.sequence}\n" for r in records))
    cfg = DataConfig(train=str(cath_dir), eval=str(fasta), seq_len=1024, eval_tokens=0)
    batches = list(eval_batches(cfg, rows=16))
    segments = sum(int(x["segment_ids"].max(axis=1).sum()) for x in batches)
    nonpad = sum(int((x["segment_ids"] > 0).sum()) for x in batches)
    assert segments == 300
    # Whole sequences take their residues + 2 tokens, longer ones a window of 1,024 tokens.
    assert nonpad == sum(min(len(r.sequence) + 2, 1024) for r in records)


def test_a_fasta_file_can_be_the_training_set(tmp_path):
    cfg = DataConfig(train=str(CATH_FASTA), seq_len=512, val_fraction=0.05)
    train = open_split(cfg.train, "train", val_fraction=0.05)
    val = open_split(cfg.train, "validation", val_fraction=0.05)
    assert train.num_records + val.num_records == 14942 and 500 < val.num_records < 1000
    assert not (set(train.ids) & set(val.ids))
    [b] = take(train_batches(cfg, rows=8), 1)
    assert b["tokens"].shape == (8, 512)
    assert len(list(eval_batches(cfg, rows=8))) >= 1
