"""A dataset in a bucket is streamed, not copied: against the GCS emulator
(tests/support/gcs_emulator.py), in process. The training and evaluation batches equal those of the
same folder on local disk, the stage root holds only the split's index files (no token or
ArrayRecord file), a pickled split (what a data worker process receives) reads the same records,
and a dataset built before token files existed is refused in one line."""

import json
import pickle
import shutil

import numpy as np
import pytest
from support.gcs_emulator import BUCKET, running

from esmjax.config import DataConfig
from esmjax.data.pipeline import BATCH_KEYS, eval_batches, train_batches
from esmjax.data.source import META_FILE, open_split
from esmjax.errors import InputError
from esmjax.io import paths
from esmjax.io.stage import staged_path


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    pytest.importorskip("gcsfs")
    pytest.importorskip("gcp_storage_emulator")
    stage = tmp_path_factory.mktemp("staged")
    with running(stage) as env:
        yield stage, env


def batches(cfg, n, **kw):
    with train_batches(cfg, rows=8, process_index=1, process_count=2, **kw) as it:
        return [next(it) for _ in range(n)], it.split


def assert_same(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        for k in BATCH_KEYS:
            np.testing.assert_array_equal(a[k], b[k])


def test_bucket_dataset_streams_the_same_batches(gcs, cath_dir):
    stage, _ = gcs
    url = f"gs://{BUCKET}/stream/cath"
    paths.upload(cath_dir, url, last=META_FILE)
    local = DataConfig(train=str(cath_dir), seq_len=128, max_segments=8)
    remote = DataConfig(train=url, seq_len=128, max_segments=8)
    want, _ = batches(local, 3)
    got, split = batches(remote, 3)
    assert_same(got, want)
    reader = split.token_file()
    assert split.remote == url and 0 < reader.requests
    assert reader.bytes_read < split.tokens_bytes // 4  # its rows only, not the dataset

    # the stage root: the train split's index files and the metadata, nothing else
    index = staged_path(url, "index")
    files = sorted(p.relative_to(stage).as_posix() for p in stage.rglob("*") if p.is_file())
    names = [META_FILE, "train.lengths.npy", "train.offsets.npy"]
    assert files == sorted(f"{index.name}/{n}" for n in names)

    # what a spawned data worker gets: the split pickled, its client made anew from the URL
    clone = pickle.loads(pickle.dumps(split))
    records = np.random.default_rng(0).integers(0, split.num_records, 300)
    want_records = open_split(cath_dir, "train").read(records)
    for a, b in zip(clone.read(records), want_records):
        np.testing.assert_array_equal(a, b)

    # evaluation (data.eval a bucket folder: its validation split)
    ev = [
        DataConfig(train=c.train, eval=c.train, seq_len=128, eval_tokens=4096)
        for c in (local, remote)
    ]
    with eval_batches(ev[0], rows=8) as a, eval_batches(ev[1], rows=8) as b:
        assert_same(list(b), list(a))

    # a token file missing from the bucket: one line naming it
    gone = f"gs://{BUCKET}/stream/gone"
    paths.upload(cath_dir, gone, last=META_FILE)
    paths.path(f"{gone}/train.tokens.bin").unlink()
    with pytest.raises(InputError, match=f"{gone}/train.tokens.bin: no such bucket or object"):
        open_split(gone, "train")


def test_worker_process_streams(gcs, cath_dir):
    """A spawned worker makes its own client (the emulator's address comes from the inherited
    environment) and yields the local folder's batches."""
    url = f"gs://{BUCKET}/stream/cath"
    if not paths.path(url).joinpath(META_FILE).exists():
        paths.upload(cath_dir, url, last=META_FILE)
    want, _ = batches(DataConfig(train=str(cath_dir), seq_len=128, max_segments=8), 2)
    got, _ = batches(DataConfig(train=url, seq_len=128, max_segments=8, num_workers=1), 2)
    assert_same(got, want)


def test_dataset_without_token_files_is_refused(gcs, cath_dir, tmp_path):
    """A folder built before token files existed: one line that says to rebuild it, local or in a
    bucket, before anything is staged."""
    old = tmp_path / "old"
    shutil.copytree(cath_dir, old)
    meta = json.loads((old / META_FILE).read_text())
    for split, info in meta["splits"].items():
        info.pop("tokens_bytes")
        (old / f"{split}.tokens.bin").unlink()
    (old / META_FILE).write_text(json.dumps(meta))
    url = f"gs://{BUCKET}/stream/old"
    paths.upload(old, url, last=META_FILE)
    for where in (str(old), url):
        with pytest.raises(InputError, match=r"train\.tokens\.bin .*rebuild it with `esmjax data"):
            open_split(where, "train")
    assert not staged_path(url).exists() and not staged_path(url, "index").exists()
