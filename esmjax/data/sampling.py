"""Cluster-weighted sampling as ESM-2 was trained (Lin et al. 2023, "Evolutionary-scale prediction
of atomic-level protein structure with a language model", Methods: UniRef50 clusters drawn
uniformly, then a random UniRef90 member).

Everything here is counter-based: draw ``d`` of the stream is a pure function of ``(seed, d)``,
computed in vectorised NumPy without any generator state, so a stream can be resumed, split across
processes or re-read at any point without replaying it.

* The stream is cut into epochs of ``T`` slots. Cluster ``c`` owns ``k_c = max(1, round(size_c **
  exponent))`` slots (``exponent`` 0: one slot per cluster, ESM-2's uniform rule; 1: one slot per
  sequence, size-proportional).
* Epoch ``e`` visits its slots in the order of a keyed pseudo-random permutation of ``[0, T)`` (a
  4-round Feistel network with cycle walking; Black & Rogaway 2002, "Ciphers with arbitrary finite
  domains"), keyed by ``(seed, e)``, so each cluster is drawn exactly ``k_c`` times per epoch and
  the order differs per epoch.
* The member is uniform within the cluster and a sequence longer than the crop is cut at a uniform
  window, both from a splitmix64 hash of ``(seed, d)`` (Steele, Lea & Flood 2014, "Fast splittable
  pseudorandom number generators").

Crops are ESM-2's (Lin et al. 2023, Methods: "We used BOS and EOS tokens to signal the beginning and
end of a real protein, to allow the model to separate a full-sized protein from a cropped one"): a
sequence of ``n`` residues is the token string ``BOS r_1 .. r_n EOS`` (``n + 2`` tokens); when that
exceeds the crop of ``C`` tokens, the crop is a window of exactly ``C`` consecutive tokens of it,
its first token uniform over the ``n + 3 - C`` possible ones. So only a window at the start keeps
BOS (BOS + ``C - 1`` residues), only one at the end keeps EOS (``C - 1`` residues + EOS), and a
middle window is ``C`` residues: the freed positions hold residues, and a crop fills a row by
itself. BOS/EOS mark the token string's ends, not the residues': the middle window that begins one
token after BOS (residues 1..C) has no BOS, as a crop of the tokenized sequence gives. A sequence of
``C - 1`` residues has exactly two windows, BOS + all residues and all residues + EOS.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15

# Stream tags: each independent use of the hash gets its own.
TAG_PERMUTE = 1
TAG_MEMBER = 2
TAG_CROP = 3
TAG_ROWS = 4
TAG_MASK = 5


def mix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser on a uint64 array (a bijection with good avalanche)."""
    x = np.asarray(x, np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def derive_key(*parts: int) -> int:
    """A 64-bit key from a tuple of integers (seed, tag, epoch, ...)."""
    h = 0x6A09E667F3BCC909
    for p in parts:
        h = int(mix64(np.array([(h + (int(p) & _MASK64) * _GOLDEN) & _MASK64], np.uint64))[0])
    return h


def hash_u64(key: int, counter: np.ndarray) -> np.ndarray:
    """splitmix64: the ``counter``-th output of the generator seeded with ``key`` (uint64 array)."""
    c = np.asarray(counter, np.uint64)
    with np.errstate(over="ignore"):
        return mix64(np.uint64(key) + c * np.uint64(_GOLDEN))


def uniform(key: int, counter: np.ndarray) -> np.ndarray:
    """Uniform floats in [0, 1) (53 bits), one per counter."""
    return (hash_u64(key, counter) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def permute(index: np.ndarray, n: int, key: int | np.ndarray) -> np.ndarray:
    """A keyed pseudo-random permutation of ``[0, n)`` applied to ``index`` (int array, values < n).

    Balanced 4-round Feistel network over ``2**bits >= n`` values; values that land outside ``[0,
    n)`` are encrypted again (cycle walking), which keeps the map a bijection on ``[0, n)``. At most
    4n values are in the domain, so the expected number of walks is below 4. ``key`` may be an array
    (one key per index: several permutations at once).
    """
    x = np.asarray(index, np.uint64)
    if n <= 1:
        return x.astype(np.int64)
    bits = max(2, (n - 1).bit_length())
    bits += bits & 1
    half = np.uint64(bits // 2)
    low = np.uint64((1 << (bits // 2)) - 1)
    keys = np.broadcast_to(np.asarray(key, np.uint64), x.shape)
    with np.errstate(over="ignore"):
        round_keys = np.stack(
            [mix64(keys + np.uint64((r + 1) * _GOLDEN & _MASK64)) for r in range(4)]
        )

    def encrypt(v: np.ndarray, rk: np.ndarray) -> np.ndarray:
        left, right = v >> half, v & low
        for k in rk:
            left, right = right, left ^ (mix64(right ^ k) & low)
        return (left << half) | right

    y = encrypt(x, round_keys)
    out = np.flatnonzero(y >= np.uint64(n))
    while len(out):
        y[out] = encrypt(y[out], round_keys[:, out])
        out = out[y[out] >= np.uint64(n)]
    return y.astype(np.int64)


@dataclass(frozen=True)
class Draws:
    """A run of draws: which record, where its crop starts, how many residues it keeps, whether
    it keeps the sequence's BOS and EOS, and its cluster."""

    cluster: np.ndarray  # int64
    record: np.ndarray  # int64
    start: np.ndarray  # int64, first residue kept
    kept: np.ndarray  # int64, residues kept
    bos: np.ndarray  # bool, the window starts at the first residue (BOS written before it)
    eos: np.ndarray  # bool, the window ends at the last residue (EOS written after it)

    def __len__(self) -> int:
        return len(self.record)

    @property
    def size(self) -> np.ndarray:
        """[I] int64 tokens of each item: residues plus its BOS and EOS when kept (<= the
        crop)."""
        return self.kept + self.bos + self.eos


class ClusterSampler:
    """Draw ``d`` -> (cluster, member record, crop window), deterministic from ``(seed, d)``.

    Args:
      offsets: [C + 1] int, cluster ``c`` owns records ``offsets[c] .. offsets[c + 1] - 1``.
      lengths: [N] int, residues per record.
      crop: the most tokens an item may have, BOS and EOS included (``seq_len``); at least 3.
      seed: stream seed.
      exponent: cluster weight ``size ** exponent`` (0 = uniform over clusters, as ESM-2).
    """

    def __init__(
        self,
        offsets: np.ndarray,
        lengths: np.ndarray,
        crop: int,
        seed: int,
        exponent: float = 0.0,
    ):
        if crop < 3:
            raise ValueError(
                f"the crop must hold at least 3 tokens (BOS, residue, EOS), got {crop}"
            )
        self.offsets = offsets
        self.lengths = lengths
        self.crop = int(crop)
        self.seed = int(seed)
        self.num_clusters = len(offsets) - 1
        if self.num_clusters < 1:
            raise ValueError("no clusters to sample from")
        if exponent == 0.0:
            self._slot_ends = None  # one slot per cluster: slot == cluster
            self.epoch_size = self.num_clusters
        else:
            sizes = np.diff(np.asarray(offsets, np.int64)).astype(np.float64)
            slots = np.maximum(1, np.rint(sizes**exponent)).astype(np.int64)
            self._slot_ends = np.cumsum(slots)
            self.epoch_size = int(self._slot_ends[-1])
        self._permute_key = derive_key(self.seed, TAG_PERMUTE)  # epoch e's key: hash_u64(this, e)
        self._member_key = derive_key(self.seed, TAG_MEMBER)
        self._crop_key = derive_key(self.seed, TAG_CROP)

    def clusters(self, first: int, count: int) -> np.ndarray:
        """[count] int64 cluster of draws ``first .. first + count - 1``."""
        d = np.arange(first, first + count, dtype=np.int64)
        epoch, pos = np.divmod(d, self.epoch_size)
        slot = permute(pos, self.epoch_size, hash_u64(self._permute_key, epoch))
        if self._slot_ends is None:
            return slot
        return np.searchsorted(self._slot_ends, slot, side="right").astype(np.int64)

    def draws(self, first: int, count: int) -> Draws:
        """Draws ``first .. first + count - 1``."""
        cluster = self.clusters(first, count)
        return self.members(cluster, np.arange(first, first + count, dtype=np.int64))

    def members(self, cluster: np.ndarray, counter: np.ndarray) -> Draws:
        """A uniform member of each ``cluster`` and its crop window, keyed by ``counter`` (the
        draw number)."""
        lo = np.asarray(self.offsets[cluster], np.int64)
        size = np.asarray(self.offsets[cluster + 1], np.int64) - lo
        u = uniform(self._member_key, counter)
        record = lo + np.minimum((u * size).astype(np.int64), size - 1)
        length = np.asarray(self.lengths[record], np.int64)
        # Windows over the token string BOS r_1 .. r_n EOS: token t is residue t - 1.
        total = length + 2
        width = np.minimum(total, self.crop)  # tokens kept
        room = total - width + 1  # possible first tokens (1 when the whole sequence fits)
        first = np.minimum((uniform(self._crop_key, counter) * room).astype(np.int64), room - 1)
        bos = first == 0
        eos = first + width == total
        start = np.maximum(first - 1, 0)
        kept = width - bos - eos
        return Draws(cluster=cluster, record=record, start=start, kept=kept, bos=bos, eos=eos)
