"""``s3://`` paths (datasets built, inspected and streamed; FASTA inputs) against moto's S3 API
server on 127.0.0.1, in process: s3fs (behind ``etils.epath``) reaches it through
``AWS_ENDPOINT_URL_S3`` and dummy ``AWS_*`` credentials. Checkpoints cannot be stored in ``s3://``
with this Orbax (README "Object storage")."""

import io

import numpy as np
import pytest
from support.data_fixtures import cath_head

from esmjax.cli import main as cli
from esmjax.data.source import open_split

BUCKET = "esmjax-s3"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    pytest.importorskip("s3fs")
    server = pytest.importorskip("moto.server")
    moto = server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    host, port = moto.get_host_and_port()
    env = {
        "AWS_ENDPOINT_URL_S3": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "ESMJAX_STAGE_DIR": str(tmp_path_factory.mktemp("staged")),
    }
    mp = pytest.MonkeyPatch()
    for k, v in env.items():
        mp.setenv(k, v)
    import s3fs
    from etils.epath import backend

    s3fs.S3FileSystem.clear_instance_cache()
    backend.fsspec_backend._get_filesystem.cache_clear()
    s3fs.S3FileSystem(skip_instance_cache=True).mkdir(BUCKET)
    try:
        yield env
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        backend.fsspec_backend._get_filesystem.cache_clear()
        mp.undo()
        moto.stop()


def test_s3_data_build_inspect_and_embed(s3, ckpt, tmp_path, shared_data, capsys):
    """``data build --out s3://``, ``data inspect s3://`` (staged), ``embed --fasta s3:// --out
    s3://``, and an unknown bucket as one line."""
    import s3fs

    fasta = tmp_path / "small.fa"
    cath_head(fasta, 100)
    fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
    fs.put_file(str(fasta), f"{BUCKET}/in/small.fa")

    ds = f"s3://{BUCKET}/ds"
    assert cli(["data", "build", "--fasta", f"s3://{BUCKET}/in/small.fa", "--out", ds]) == 0
    assert fs.exists(f"{BUCKET}/ds/esmjax_dataset.json")
    capsys.readouterr()
    assert cli(["data", "inspect", ds]) == 0
    assert "100" in capsys.readouterr().out

    # streamed by range requests; the ArrayRecord files (staged for describe) hold the same tokens
    split = open_split(ds, "train")
    assert split.remote == ds
    idx = np.arange(split.num_records)
    for a, b in zip(split.read(idx[::-1]), split.read_array_record(idx[::-1])):
        np.testing.assert_array_equal(a, b)
    assert split.token_file().requests >= 1

    fs.pipe_file(f"{BUCKET}/q.fa", b">q1\nMKTAYIAKQR\n")
    args = ["embed", "--checkpoint", str(ckpt), "--no-progress"]
    assert cli([*args, "--fasta", f"s3://{BUCKET}/q.fa", "--out", f"s3://{BUCKET}/emb"]) == 0
    got = np.load(io.BytesIO(fs.cat_file(f"{BUCKET}/emb/q1.npz")))
    assert got["mean_2"].shape == (32,)

    capsys.readouterr()
    assert cli(["data", "inspect", "s3://no-such-bucket-esmjax/ds"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "s3://no-such-bucket-esmjax/ds" in err, err
