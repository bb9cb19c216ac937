"""The token file's record index (``esmjax.data.tokens``) and the coalesced range reads that stream
it from a bucket (``esmjax.io.ranges``; here on a local file through fsspec's local filesystem)."""

import pickle

import numpy as np
import pytest

from esmjax.data.tokens import STRIDE, TokenIndex
from esmjax.io.ranges import RangeFile, coalesce


@pytest.mark.parametrize("n", [1, STRIDE - 1, STRIDE, STRIDE + 1, 10 * STRIDE + 7])
def test_index_ranges_are_the_prefix_sums(n):
    rng = np.random.default_rng(n)
    lengths = rng.integers(1, 900, n).astype(np.int32)
    cum = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    index = TokenIndex(lengths)
    assert index.total == cum[-1]
    records = np.concatenate([rng.integers(0, n, 500), [0, n - 1]])
    starts, ends = index.ranges(records)
    np.testing.assert_array_equal(starts, cum[records])
    np.testing.assert_array_equal(ends, cum[records + 1])


def test_coalesce_merges_near_ranges_and_maps_each_range():
    rng = np.random.default_rng(0)
    for _ in range(100):
        k = int(rng.integers(1, 40))
        starts = rng.integers(0, 20000, k)
        ends = starts + rng.integers(0, 400, k)
        gap = int(rng.integers(0, 600))
        ms, me, owner = coalesce(starts, ends, gap)
        # each range lies inside the merged range that owns it
        assert (ms[owner] <= starts).all() and (me[owner] >= ends).all()
        assert (ms[1:] > me[:-1] + gap).all()  # merged ranges are sorted and further apart than gap
    ms, me, owner = coalesce([10, 0, 5, 100], [20, 5, 8, 110], gap=0)
    assert ms.tolist() == [0, 10, 100] and me.tolist() == [8, 20, 110]
    assert owner.tolist() == [1, 0, 0, 2]


def test_range_file_reads_exact_bytes_in_few_requests(tmp_path):
    data = np.random.default_rng(1).integers(0, 256, 50_000).astype(np.uint8).tobytes()
    path = tmp_path / "t.bin"
    path.write_bytes(data)
    reader = RangeFile(str(path), gap=100)
    starts = np.array([40_000, 10, 60, 60, 300, 1_000, 49_990, 7])
    ends = np.array([40_010, 50, 90, 90, 300, 1_200, 50_000, 7])
    got = reader.read(starts, ends)
    assert [bytes(g) for g in got] == [data[a:z] for a, z in zip(starts, ends)]
    # [10, 90) (three ranges), [1000, 1200), [40000, 40010), [49990, 50000); empty ranges: none
    assert reader.requests == 4
    clone = pickle.loads(pickle.dumps(reader))  # what a data worker receives: no client, no counts
    assert clone.requests == 0 and bytes(clone.read([5], [9])[0]) == data[5:9]
