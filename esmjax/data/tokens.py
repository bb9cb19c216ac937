"""A split's token file, ``<split>.tokens.bin``: the residue ids (one uint8 each) of every record,
concatenated in record order, with nothing else in it.

``esmjax data build`` writes it in its index pass (``builder.write_index``), next to the ArrayRecord
files that hold the same ids inside ``tf.train.Example`` protos. It exists so that a record can be
read without a record reader: record ``i`` is bytes ``[cum[i], cum[i + 1])`` with ``cum = [0,
cumsum(lengths)]``, so a local file is memory-mapped and sliced, and a file in a bucket is read with
HTTP range requests (``esmjax.io.ranges``) for the records a host draws, instead of every host
copying the whole dataset (ArrayRecord 0.8.6 opens local files only). The dataset's metadata records
the file's size per split (``tokens_bytes``), which readers check.

``cum`` is not stored: 8 bytes per record in every data process (UniRef90 has over 100M records)
would be too much to hold, so ``TokenIndex`` keeps the prefix sum at every ``STRIDE``-th record
(8 / ``STRIDE`` bytes per record) and, per lookup, reads the ``STRIDE`` lengths of each block that
holds a requested record from the (memory-mapped) lengths array, a small cost next to reading the
records.
"""

from __future__ import annotations

import numpy as np

SUFFIX = ".tokens.bin"
STRIDE = 64  # records per stored prefix sum
_CHUNK = STRIDE * 65536  # lengths summed per pass while building the index (bounded memory)


def file_name(split: str) -> str:
    return f"{split}{SUFFIX}"


class TokenIndex:
    """Record -> byte range of the token file, from the split's lengths.

    Args:
      lengths: [N] residues per record (may be memory-mapped; read once here, in chunks).
    """

    def __init__(self, lengths: np.ndarray):
        self.lengths = lengths
        n = len(lengths)
        sums = []
        for lo in range(0, n, _CHUNK):
            chunk = np.asarray(lengths[lo : lo + _CHUNK], np.int64)
            sums.append(np.add.reduceat(chunk, np.arange(0, len(chunk), STRIDE)))
        blocks = np.concatenate(sums) if sums else np.zeros(0, np.int64)
        # base[b] = residues of records 0 .. b * STRIDE - 1; base[-1] = all residues
        self.base = np.concatenate([[0], np.cumsum(blocks)]).astype(np.int64)

    @property
    def total(self) -> int:
        """Bytes of the token file (all residues of the split)."""
        return int(self.base[-1])

    def ranges(self, records: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """[I] int64 first and one-past-last byte of each record."""
        records = np.asarray(records, np.int64)
        block, within = np.divmod(records, STRIDE)
        # the lengths of every block that holds a record, and their running sums within the block
        blocks, which = np.unique(block, return_inverse=True)
        idx = blocks[:, None] * STRIDE + np.arange(STRIDE)
        n = len(self.lengths)
        vals = np.asarray(self.lengths[np.minimum(idx, n - 1).ravel()], np.int64)
        vals = np.where(idx < n, vals.reshape(idx.shape), 0)
        before = np.cumsum(vals, axis=1) - vals  # residues of the block's earlier records
        start = self.base[block] + before[which.ravel(), within]
        return start, start + vals[which.ravel(), within]
