"""Cluster-weighted sampling: exact per-epoch cluster uniformity, uniform members, crops, and the
SCOPe check."""

import io
import json
from collections import Counter
from contextlib import redirect_stdout

import numpy as np
import pytest
from scipy import stats

from esmjax import cli
from esmjax.data.sampling import ClusterSampler, derive_key, permute, uniform
from esmjax.data.source import open_split


def _offsets(sizes):
    return np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 100, 1000, 4097])
def test_permute_is_a_bijection(n):
    p = permute(np.arange(n), n, derive_key(1, 2))
    assert sorted(p.tolist()) == list(range(n))
    if n >= 100:
        q = permute(np.arange(n), n, derive_key(1, 3))
        assert (p != q).mean() > 0.9
        assert abs(np.corrcoef(np.arange(n), p)[0, 1]) < 0.2


def test_uniform_hash_moments():
    u = uniform(derive_key(7), np.arange(200_000))
    assert u.min() >= 0 and u.max() < 1
    assert abs(u.mean() - 0.5) < 0.005 and abs(u.var() - 1 / 12) < 0.002


def test_each_epoch_draws_every_cluster_once_in_a_new_order():
    sizes = np.array([1, 500, 3, 50, 1, 1, 20, 7] * 25)
    lengths = np.full(sizes.sum(), 100)
    s = ClusterSampler(_offsets(sizes), lengths, 1024, seed=3)
    c = s.clusters(0, 3 * len(sizes)).reshape(3, -1)
    for epoch in c:
        assert sorted(epoch.tolist()) == list(range(len(sizes)))
    assert (c[0] != c[1]).mean() > 0.9 and (c[1] != c[2]).mean() > 0.9
    # Same seed, same stream; any window of the stream equals the whole stream's slice.
    again = ClusterSampler(_offsets(sizes), lengths, 1024, seed=3)
    assert (again.draws(0, 600).record == s.draws(0, 600).record).all()
    assert (again.draws(123, 50).record == s.draws(0, 600).record[123:173]).all()
    other = ClusterSampler(_offsets(sizes), lengths, 1024, seed=4)
    assert (other.clusters(0, 200) != c[0]).mean() > 0.9


def test_members_uniform_within_clusters():
    sizes = np.array([1, 10, 100, 3, 7])
    s = ClusterSampler(_offsets(sizes), np.full(sizes.sum(), 50), 1024, seed=0)
    d = s.draws(0, 50_000)
    offs = _offsets(sizes)
    for c in (1, 2, 4):
        members = d.record[d.cluster == c] - offs[c]
        assert len(members) == 10_000
        counts = np.bincount(members, minlength=sizes[c])
        assert stats.chisquare(counts).pvalue > 1e-3


def test_exponent_one_is_size_proportional_and_half_is_between():
    sizes = np.array([1, 4, 16, 64])
    lengths = np.full(sizes.sum(), 50)
    s1 = ClusterSampler(_offsets(sizes), lengths, 1024, seed=0, exponent=1.0)
    assert s1.epoch_size == sizes.sum()
    assert np.bincount(s1.clusters(0, s1.epoch_size), minlength=4).tolist() == sizes.tolist()
    s_half = ClusterSampler(_offsets(sizes), lengths, 1024, seed=0, exponent=0.5)
    assert np.bincount(s_half.clusters(0, s_half.epoch_size), minlength=4).tolist() == [1, 2, 4, 8]


def test_crop_windows_are_uniform_token_windows_with_bos_eos_only_at_the_ends():
    """ESM-2 crops: a window of 1,024 tokens of ``BOS seq EOS``, its first token uniform over the
    5,002 - 1,024 + 1 possible ones; BOS only at the start, EOS only at the end."""
    lengths = np.array([5000] * 1 + [30])
    s = ClusterSampler(_offsets([1, 1]), lengths, 1024, seed=0)
    d = s.members(np.zeros(20_000, np.int64), np.arange(20_000))
    assert (d.size == 1024).all() and d.start.min() >= 0 and (d.start + d.kept).max() <= 5000
    first = np.where(d.bos, 0, d.start + 1)  # first token of the window in BOS r_1 .. r_n EOS
    room = 5002 - 1024 + 1
    assert first.min() == 0 and first.max() == room - 1  # both end windows come up
    assert ((first + 1024 == 5002) == d.eos).all() and ((first == 0) == d.bos).all()
    assert (d.kept == 1024 - d.bos - d.eos).all() and not (d.bos & d.eos).any()
    hist = np.bincount(first * 10 // room, minlength=10)
    assert stats.chisquare(hist).pvalue > 1e-3
    short = s.members(np.ones(100, np.int64), np.arange(100))
    assert (short.start == 0).all() and (short.kept == 30).all()
    assert short.bos.all() and short.eos.all() and (short.size == 32).all()


@pytest.mark.parametrize("n", [5, 6, 7, 10])
def test_every_crop_window_is_drawn_with_its_exact_layout(n):
    """With a 7-token crop, every one of the n + 3 - 7 windows of ``BOS r_1 .. r_n EOS`` comes up,
    each exactly as that token string's slice; n = 5 fits whole, n = 6 has only the start and end
    windows."""
    s = ClusterSampler(_offsets([1]), np.array([n]), 7, seed=2)
    d = s.members(np.zeros(2000, np.int64), np.arange(2000))
    string = ["BOS"] + [f"r{i}" for i in range(n)] + ["EOS"]
    seen = set()
    for start, kept, bos, eos in zip(*(x.tolist() for x in (d.start, d.kept, d.bos, d.eos))):
        window = ["BOS"] * bos + [f"r{i}" for i in range(start, start + kept)] + ["EOS"] * eos
        assert len(window) == min(n + 2, 7)
        first = string.index(window[0])
        assert string[first : first + len(window)] == window
        seen.add(first)
    assert seen == set(range(max(n + 2 - 7, 0) + 1))
    with pytest.raises(ValueError, match="at least 3"):
        ClusterSampler(_offsets([1]), np.array([n]), 2, seed=2)


def test_inspect_sample_is_cluster_uniform_on_skewed_scope_families(scope_dir):
    """The issue's acceptance check: SCOPe families (1 to 156 members) drawn uniformly, members
    uniformly."""
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert (
            cli.main(["data", "inspect", str(scope_dir), "--sample", "20000", "--seed", "5"]) == 0
        )
    lines = buf.getvalue().splitlines()
    assert any(line.startswith("# train length histogram") for line in lines)
    rows = [json.loads(line) for line in lines if not line.startswith("#")]
    assert len(rows) == 20_000 and set(rows[0]) == {"id", "cluster", "length"}
    split = open_split(scope_dir, "train")
    sizes = np.diff(np.asarray(split.offsets))
    assert sizes.max() >= 100 and (sizes == 1).sum() > 1000  # really skewed
    per_cluster = Counter(r["cluster"] for r in rows)
    counts = np.array(list(per_cluster.values()) + [0] * (split.num_clusters - len(per_cluster)))
    assert stats.chisquare(counts).pvalue > 1e-3
    # A size-proportional draw would be rejected outright by the same test.
    prop = np.random.default_rng(0).choice(split.num_clusters, 20_000, p=sizes / sizes.sum())
    assert stats.chisquare(np.bincount(prop, minlength=split.num_clusters)).pvalue < 1e-10


def test_members_uniform_within_scope_families(scope_dir):
    """Pooled chi-square over every multi-member family, from 300 epochs of draws."""
    split = open_split(scope_dir, "train")
    offsets = np.asarray(split.offsets)
    sizes = np.diff(offsets)
    s = ClusterSampler(offsets, np.asarray(split.lengths), 1024, seed=11)
    d = s.draws(0, 300 * split.num_clusters)
    member = d.record - offsets[d.cluster]
    assert (member >= 0).all() and (member < sizes[d.cluster]).all()
    # Draws per record = draws per (cluster, member), since a cluster's members are consecutive
    # records.
    per_record = np.bincount(d.record, minlength=split.num_records)
    n_c = np.bincount(d.cluster, minlength=split.num_clusters)
    assert (n_c == 300).all()
    expected = np.repeat(n_c / sizes, sizes)
    multi = np.repeat(sizes >= 2, sizes)
    chi2 = (((per_record - expected) ** 2) / expected)[multi].sum()
    dof = int((sizes[sizes >= 2] - 1).sum())
    assert stats.chi2.sf(chi2, dof) > 1e-3
