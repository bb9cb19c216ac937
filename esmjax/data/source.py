"""Read side of a dataset: a split's records grouped by cluster, from a built folder (local or in a
bucket) or straight from a FASTA file.

A split exposes ``lengths`` [N] (residues per record) and ``offsets`` [C + 1] (cluster ``c`` owns
records ``offsets[c] .. offsets[c + 1] - 1``), both small integer arrays (memory-mapped for a built
folder), and reads records by index. A built folder (``esmjax data build``) holds the TFDS
ArrayRecord files, ``<split>.lengths.npy`` / ``<split>.offsets.npy``, the token file
``<split>.tokens.bin`` (every record's residue ids concatenated, ``esmjax.data.tokens``) and
``esmjax_dataset.json``. Records are read from the token file: memory-mapped from a local folder;
from a bucket folder (``gs://``, ``s3://``) by HTTP range requests for just the records this host
draws (``esmjax.io.ranges``), after the split's index files alone were downloaded to the stage root
(``_open_bucket_folder``). Cluster sampling draws every host's rows from the whole dataset, so no
partition of the files would spare a host any of them; reading by record does.

Record ids and cluster names (``describe``, ``esmjax data inspect --sample``) live in the
ArrayRecord files only, read through TFDS's NumPy-only data source (no TensorFlow); for a bucket
folder ``describe`` stages those files on first use (``esmjax.io.stage``: ArrayRecord 0.8.6 opens
local files only).

A FASTA file is read whole into memory, each record its own cluster; its ``train`` and
``validation`` splits follow the same hold-out rule as ``esmjax data build`` (``held_out``), and
``all`` is everything (for evaluating on a FASTA file).
"""

from __future__ import annotations

import abc
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from esmjax.data import tokens
from esmjax.errors import InputError
from esmjax.io import paths, stage
from esmjax.io.fasta import read_fasta
from esmjax.io.ranges import RangeFile
from esmjax.models.alphabet import encode

META_FILE = "esmjax_dataset.json"
FORMAT = "esmjax-protein-clusters"
FORMAT_VERSION = 1
TFDS_NAME = "esmjax_protein_clusters"
TFDS_VERSION = "1.0.0"
SPLITS = ("train", "validation")

log = logging.getLogger(__name__)


class DatasetError(InputError):
    """A dataset folder or FASTA that cannot serve as training or evaluation data."""


def hash64(text: str) -> int:
    """A stable 64-bit hash of a string (BLAKE2b), used for hold-out and record keys."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def held_out(cluster: str, fraction: float) -> bool:
    """Whether a cluster belongs to the validation split: a hash of its name, so the choice is
    deterministic and independent of input order and of how the input is split into files."""
    return hash64("esmjax-holdout\0" + cluster) < fraction * 2.0**64


def record_key(cluster: str, member: str) -> int:
    """The 128-bit TFDS key of a record. TFDS writes records in key order (``disable_shuffling``),
    which groups each cluster's members together and orders the clusters by hash."""
    return (hash64("c\0" + cluster) << 64) | hash64("m\0" + member)


def _digest(a: np.ndarray, dtype: type) -> bytes:
    h = hashlib.blake2b(digest_size=8)
    for lo in range(0, len(a), 1 << 24):  # chunked: the array may be memory-mapped and huge
        h.update(np.ascontiguousarray(a[lo : lo + (1 << 24)], dtype).tobytes())
    return h.digest()


def fingerprint(lengths: np.ndarray, offsets: np.ndarray) -> str:
    """A short hash of a split's index (``esmjax data build`` computes the same while streaming)."""
    a, b = _digest(lengths, np.int32), _digest(offsets, np.int64)
    return hashlib.blake2b(a + b, digest_size=8).hexdigest()


def is_dataset_dir(path: str | Path) -> bool:
    with paths.remote_errors(path):
        return (paths.path(path) / META_FILE).is_file()


def _parse_meta(text: str, where: str) -> dict[str, Any]:
    try:
        meta = json.loads(text)
    except ValueError as e:
        raise DatasetError(f"{where}: cannot read dataset metadata ({e})") from None
    if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        raise DatasetError(f"{where}: not an esmjax dataset of format version {FORMAT_VERSION}")
    return meta


def _meta_text(folder: str | Path) -> str:
    p = (paths.path(folder) if paths.is_remote(folder) else Path(folder)) / META_FILE
    try:
        with paths.remote_errors(folder):
            return p.read_text()
    except OSError as e:
        raise DatasetError(f"{p}: cannot read dataset metadata ({e})") from None


def read_meta(folder: str | Path) -> dict[str, Any]:
    return _parse_meta(_meta_text(folder), f"{folder}/{META_FILE}")


class Split(abc.ABC):
    """Records of one split grouped by cluster. Subclasses implement ``_read`` and ``_describe``.

    Attributes:
      name: the split (``train``, ``validation`` or ``all``).
      lengths: [N] int32 residues per record.
      offsets: [C + 1] int64 cluster boundaries.
      fingerprint: a short hash of the split's index, stored in iterator states.
    """

    name: str
    lengths: np.ndarray
    offsets: np.ndarray
    fingerprint: str

    @property
    def num_records(self) -> int:
        return len(self.lengths)

    @property
    def num_clusters(self) -> int:
        return len(self.offsets) - 1

    def read(self, records: np.ndarray) -> list[np.ndarray]:
        """Residue ids (uint8) of each record index."""
        records = np.asarray(records, np.int64)
        return self._read(records) if len(records) else []

    def describe(self, records: np.ndarray) -> list[tuple[str, str]]:
        """(record id, cluster name) of each record index."""
        records = np.asarray(records, np.int64)
        return self._describe(records) if len(records) else []

    @abc.abstractmethod
    def _read(self, records: np.ndarray) -> list[np.ndarray]:
        """Residue ids of the given (non-empty) record indices."""

    @abc.abstractmethod
    def _describe(self, records: np.ndarray) -> list[tuple[str, str]]:
        """(record id, cluster name) of the given (non-empty) record indices."""


class FolderSplit(Split):
    """A split of a folder made by ``esmjax data build``.

    Args:
      folder: the local dataset folder, or (streaming) the local folder holding copies of the
        bucket folder's ``esmjax_dataset.json`` and the split's index files.
      split: ``train`` or ``validation``.
      remote: the dataset's bucket URL when its token file is read from there by range requests.
      check: compare the token file's size with the metadata (skipped when a data worker
        unpickles the split: the parent process checked).
    """

    def __init__(
        self, folder: str | Path, split: str, *, remote: str | None = None, check: bool = True
    ):
        self.folder = Path(folder)
        self.name = split
        self.remote = remote
        meta = read_meta(self.folder)
        info = meta["splits"].get(split)
        where = remote or self.folder
        if info is None or info["records"] == 0:
            raise DatasetError(f"{where}: the dataset has no {split} records")
        self.lengths = np.load(self.folder / f"{split}.lengths.npy", mmap_mode="r")
        self.offsets = np.load(self.folder / f"{split}.offsets.npy", mmap_mode="r")
        self.fingerprint = info["fingerprint"]
        self.tokens_bytes = _tokens_bytes(info, where, split)
        self._source = None
        self._index: tokens.TokenIndex | None = None
        self._data: np.ndarray | None = None  # the local token file, memory-mapped
        self._remote: RangeFile | None = None
        if check:
            file = self.token_file()
            size = file.size() if isinstance(file, RangeFile) else file.stat().st_size
            if size != self.tokens_bytes:
                raise DatasetError(
                    f"{file.url if isinstance(file, RangeFile) else file}: {size} bytes, the "
                    f"dataset's metadata says {self.tokens_bytes} (an incomplete copy?)"
                )

    def __getstate__(self) -> dict[str, Any]:
        return {"folder": self.folder, "name": self.name, "remote": self.remote}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["folder"], state["name"], remote=state.get("remote"), check=False)

    def token_file(self) -> Path | RangeFile:
        """The token file: a local path, or a ``RangeFile`` on the bucket object (made once; it
        counts the requests and bytes this process sent)."""
        if self.remote is None:
            file = self.folder / tokens.file_name(self.name)
            if not file.is_file():
                raise DatasetError(f"{file}: missing (an incomplete copy of the dataset?)")
            return file
        if self._remote is None:
            self._remote = RangeFile(str(paths.path(self.remote) / tokens.file_name(self.name)))
        return self._remote

    @property
    def source(self) -> Any:
        """TFDS's data source over the split's ArrayRecord files (staged first for a bucket
        folder: ArrayRecord reads local files only)."""
        if self._source is None:
            import tensorflow_datasets as tfds

            if self.remote is None:
                tfds_dir = self.folder / TFDS_NAME / TFDS_VERSION
            else:
                tfds_dir = stage.stage(str(paths.path(self.remote) / TFDS_NAME / TFDS_VERSION))
            builder = tfds.builder_from_directory(str(tfds_dir))
            self._source = builder.as_data_source(split=self.name)
        return self._source

    def _read(self, records: np.ndarray) -> list[np.ndarray]:
        if self._index is None:
            self._index = tokens.TokenIndex(self.lengths)
        starts, ends = self._index.ranges(records)
        file = self.token_file()
        if isinstance(file, RangeFile):
            return [np.frombuffer(b, np.uint8) for b in file.read(starts, ends)]
        if self._data is None:
            self._data = np.asarray(np.memmap(file, np.uint8, mode="r"))
        return [self._data[a:z] for a, z in zip(starts.tolist(), ends.tolist())]

    def read_array_record(self, records: np.ndarray) -> list[np.ndarray]:
        """Residue ids of records read from the ArrayRecord files, which hold the same ids as the
        token file (what the token file is checked against).

        The raw ArrayRecord bytes are parsed straight into the token bytes, without TFDS's generic
        decoding: each record is a tf.train.Example whose "tokens" feature holds the raw uint8 ids
        (Encoding.BYTES)."""
        from tensorflow_datasets.proto import tf_example_pb2

        parse = tf_example_pb2.Example.FromString
        raw = self.source.data_source.__getitems__(np.asarray(records, np.int64).tolist())
        return [
            np.frombuffer(parse(r).features.feature["tokens"].bytes_list.value[0], np.uint8)
            for r in raw
        ]

    def _describe(self, records: np.ndarray) -> list[tuple[str, str]]:
        return [
            (r["id"].decode(), r["cluster"].decode())
            for r in self.source.__getitems__(records.tolist())
        ]


class FastaSplit(Split):
    """A FASTA file held in memory, each record its own cluster (for small sets and evaluation
    files)."""

    def __init__(self, path: str | Path, split: str, val_fraction: float = 0.0):
        self.path = path if paths.is_remote(path) else Path(path)
        self.name = split
        self.ids: list[str] = []
        self.seqs: list[np.ndarray] = []
        for rec in read_fasta(self.path):
            if split != "all" and held_out(rec.id, val_fraction) != (split == "validation"):
                continue
            self.ids.append(rec.id)
            self.seqs.append(encode(rec.sequence).astype(np.uint8))
        if not self.ids:
            raise DatasetError(
                f"{self.path}: no records in the {split} split (val_fraction={val_fraction}); "
                "every record is its own cluster and a hash of its id decides whether it is held "
                "out"
            )
        self.lengths = np.fromiter((len(s) for s in self.seqs), np.int32, len(self.seqs))
        self.offsets = np.arange(len(self.ids) + 1, dtype=np.int64)
        self.fingerprint = fingerprint(self.lengths, self.offsets)

    def _read(self, records: np.ndarray) -> list[np.ndarray]:
        return [self.seqs[i] for i in records.tolist()]

    def _describe(self, records: np.ndarray) -> list[tuple[str, str]]:
        return [(self.ids[i], self.ids[i]) for i in records.tolist()]


def open_split(path: str | Path, split: str, *, val_fraction: float = 0.0) -> Split:
    """A split of a dataset folder or FASTA file.

    Args:
      path: a folder made by ``esmjax data build`` or a FASTA file (plain or gzip).
      split: ``train`` or ``validation``; for a FASTA file also ``all``.
      val_fraction: for a FASTA file, the fraction of records (as clusters) held out of ``train``.
    """
    check_path(path)
    if paths.is_remote(path):
        url = str(path)
        with paths.remote_errors(url):
            is_folder = (paths.path(url) / META_FILE).exists()
            is_file = not is_folder and paths.path(url).is_file()
        if is_folder:
            if split not in SPLITS:
                raise DatasetError(f"{url}: a dataset folder has splits {SPLITS}, not {split!r}")
            return _open_bucket_folder(url, split)
        if not is_file:
            raise DatasetError(f"{url}: no dataset folder ({META_FILE}) or FASTA file there")
        return FastaSplit(url, split, val_fraction)
    p = Path(path)
    if p.is_dir():
        if split not in SPLITS:
            raise DatasetError(f"{p}: a dataset folder has splits {SPLITS}, not {split!r}")
        return FolderSplit(p, split)
    return FastaSplit(p, split, val_fraction)


def check_path(path: str | Path) -> None:
    """What ``open_split`` checks of a path before reading it: one is named and, for a local path,
    it is a FASTA file or a folder made by ``esmjax data build``. Cheap, so ``esmjax train`` runs it
    before the distributed start-up; a bucket URL is left to ``open_split`` (no request here)."""
    if not str(path):
        raise DatasetError("no dataset given (data.train / data.eval is empty)")
    if paths.is_remote(path):
        return
    p = Path(path)
    if p.is_dir() and not is_dataset_dir(p):
        raise DatasetError(
            f"{p}: not a dataset folder (no {META_FILE}); make one with `esmjax data build`"
        )
    if not p.exists():
        raise DatasetError(f"{p}: no such file or folder")


def _tokens_bytes(info: dict[str, Any], where: str | Path, split: str) -> int:
    """The size of the split's token file that the metadata records; a folder without one (built
    before token files existed) is refused with the command that rebuilds it."""
    if "tokens_bytes" not in info:
        raise DatasetError(
            f"{where}: no {tokens.file_name(split)} (built by an earlier esmjax); rebuild it with "
            "`esmjax data build`"
        )
    return info["tokens_bytes"]


def _index_matches(folder: Path, split: str, fp: str) -> bool:
    try:
        lengths = np.load(folder / f"{split}.lengths.npy", mmap_mode="r")
        offsets = np.load(folder / f"{split}.offsets.npy", mmap_mode="r")
    except (OSError, ValueError):
        return False
    return fingerprint(lengths, offsets) == fp


def _open_bucket_folder(url: str, split: str) -> FolderSplit:
    """A split of the dataset folder at the bucket URL ``url``, streamed.

    Downloads ``esmjax_dataset.json`` (every time: it names the current build) and, unless the
    stage root already holds them with the fingerprint that metadata records, the split's
    ``lengths``/``offsets`` arrays (4 bytes per record and 8 per cluster) into
    ``stage.staged_path(url, "index")``, each file written whole or not at all; records are then
    read by range requests.
    """
    text = _meta_text(url)
    info = _parse_meta(text, f"{url}/{META_FILE}")["splits"].get(split)
    if not info or not info["records"]:
        raise DatasetError(f"{url}: the dataset has no {split} records")
    _tokens_bytes(info, url, split)
    index = stage.staged_path(url, "index")
    if not _index_matches(index, split, info["fingerprint"]):
        for name in (f"{split}.lengths.npy", f"{split}.offsets.npy"):
            stage.download(str(paths.path(url) / name), index / name)
        if not _index_matches(index, split, info["fingerprint"]):
            raise DatasetError(
                f"{url}: the {split} index files do not match {META_FILE} (a dataset being "
                "replaced?)"
            )
    stage.keep(index / META_FILE, text.encode())
    opened = FolderSplit(index, split, remote=url)
    log.info(
        "streaming %s (%s split, %.1f MB of records) by range requests; its index is in %s",
        url,
        split,
        opened.tokens_bytes / 1e6,
        index,
    )
    return opened
