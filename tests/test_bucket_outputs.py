"""Outputs written to a bucket and inputs read from one, in process, against the GCS emulator
(tests/support/gcs_emulator.py): ``embed --out``, ``export`` (hf, fair-esm), ``convert`` input and
``plot``. Each result is read back from the bucket with a fresh gcsfs client and compared with the
same command's local output. ``fold --out`` is tested in tests/test_esmfold_fold.py, a fine-tuning
run's exports (hf, peft, fair-esm) in tests/test_finetune.py: both reuse their module's model."""

import io
import json

import numpy as np
import pytest
from flax import nnx
from support.gcs_emulator import BUCKET

from esmjax.cli import main as cli
from esmjax.io import checkpoint


def bucket_files(url: str) -> dict[str, bytes]:
    """Every object under ``url`` (relative name -> bytes), read by a client with no cache."""
    import gcsfs

    fs = gcsfs.GCSFileSystem(skip_instance_cache=True, use_listings_cache=False)
    root = url.removeprefix("gs://").rstrip("/") + "/"
    return {n.removeprefix(root): fs.cat_file(n) for n in fs.find(root)}


def local_files(folder) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


def test_embed_export_convert_plot_round_trip(gcs, ckpt, tmp_path, capsys):
    from etils import epath

    base = f"gs://{BUCKET}/outputs"
    fasta = tmp_path / "q.fa"
    fasta.write_text(">q1\nMKTAYIAKQR\n>q2 second\nGSHMLEDPVKAC\n")
    epath.Path(f"{base}/q.fa").write_text(fasta.read_text())

    # embed: --fasta and --out in the bucket, the same arrays as a local run
    args = ["embed", "--checkpoint", str(ckpt), "--include", "mean", "per_tok", "--no-progress"]
    assert cli([*args, "--fasta", f"{base}/q.fa", "--out", f"{base}/emb"]) == 0
    assert cli([*args, "--fasta", str(fasta), "--out", str(tmp_path / "emb")]) == 0
    got = bucket_files(f"{base}/emb")
    job = sorted(n for n in got if not n.endswith(".npz"))  # the job folder (inference.units)
    assert job == ["done/000000.json", "job.json", "total.json"], job
    got = {n: data for n, data in got.items() if n.endswith(".npz")}
    assert sorted(got) == ["q1.npz", "q2.npz"]
    for name, data in got.items():
        remote, local = np.load(io.BytesIO(data)), np.load(tmp_path / "emb" / name)
        assert sorted(remote.files) == sorted(local.files) == ["mean_2", "repr_2"]
        for k in local.files:
            np.testing.assert_array_equal(remote[k], local[k])

    # export --to hf and fair-esm: byte for byte the local export (fair-esm's sibling file too)
    assert cli(["export", str(ckpt), "--to", "hf", f"{base}/hf"]) == 0
    assert cli(["export", str(ckpt), "--to", "hf", str(tmp_path / "hf")]) == 0
    assert bucket_files(f"{base}/hf") == local_files(tmp_path / "hf")
    assert json.loads(bucket_files(f"{base}/hf")["config.json"])["num_hidden_layers"] == 2
    pt = f"{base}/pt/esm2_tiny.pt"
    assert cli(["export", str(ckpt), "--to", "fair-esm", pt]) == 0
    assert sorted(bucket_files(f"{base}/pt")) == ["esm2_tiny-contact-regression.pt", "esm2_tiny.pt"]
    capsys.readouterr()
    assert cli(["export", str(ckpt), "--to", "hf", f"{base}/hf"]) == 2  # no overwrite
    err = capsys.readouterr().err.strip()
    assert err == f"esmjax export: error: {base}/hf exists; refusing to overwrite", err

    # convert reads the exported .pt from the bucket: the same weights as the checkpoint
    assert cli(["convert", pt, str(tmp_path / "back")]) == 0
    want, _ = checkpoint.load_model(ckpt)
    back, _ = checkpoint.load_model(tmp_path / "back")
    for a, b in zip(
        nnx.state(want, nnx.Param).flat_state(), nnx.state(back, nnx.Param).flat_state()
    ):
        np.testing.assert_array_equal(np.asarray(a[1].value), np.asarray(b[1].value))

    # plot: the workdir's metrics in the bucket, the figure written next to them
    rows = [{"step": s, "loss": 3.0 - 0.1 * s, "perplexity": 20.0 - s} for s in range(1, 6)]
    epath.Path(f"{base}/run/metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli(["plot", f"{base}/run"]) == 0
    assert f"wrote {base}/run/plots/training.png" in capsys.readouterr().out
    png = bucket_files(f"{base}/run/plots")["training.png"]
    assert png.startswith(b"\x89PNG")


def test_bucket_output_errors_are_one_line(gcs, ckpt, tmp_path, capsys):
    """An unknown bucket for an output or an input: one line naming the URL, exit 2."""
    fasta = tmp_path / "q.fa"
    fasta.write_text(">q1\nMKTAYIAKQR\n")
    for args, url in [
        (["export", str(ckpt), "--to", "hf", "gs://no-such-bucket-esmjax/hf"], None),
        (
            ["embed", "--checkpoint", str(ckpt), "--fasta", str(fasta)],
            "gs://no-such-bucket-esmjax/e",
        ),
        (["convert", f"gs://{BUCKET}/nothing/esm2.pt", str(tmp_path / "c")], None),
        (["plot", f"gs://{BUCKET}/no-run"], None),
    ]:
        argv = args + (["--out", url] if url else [])
        assert cli(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        named = url or next(a for a in args if a.startswith("gs://"))
        assert "\n" not in err and named in err, err


def test_config_and_suite_files_in_a_bucket(gcs):
    """``--config`` (training and fine-tuning) and ``evaluate all --suite`` files read from a
    bucket as from disk; a suite's relative paths resolve next to it, in the bucket."""
    from etils import epath

    from esmjax.config import ConfigError, load_config, load_finetune_config
    from esmjax.evaluate.suite import read_suite

    base = f"gs://{BUCKET}/configs"
    epath.Path(f"{base}/t.yaml").write_text("model: tiny\ndata: {seq_len: 64}\nnum_steps: 3\n")
    cfg = load_config(f"{base}/t.yaml", ["optim.peak_lr=0.002"])
    assert cfg.num_steps == 3 and cfg.data.seq_len == 64 and cfg.optim.peak_lr == 0.002
    epath.Path(f"{base}/f.yaml").write_text("backbone: gs://b/bb\ntask: sequence_regression\n")
    assert load_finetune_config(f"{base}/f.yaml").backbone == "gs://b/bb"
    with pytest.raises(ConfigError, match=f"config file {base}/missing.yaml does not exist"):
        load_config(f"{base}/missing.yaml")
    epath.Path(f"{base}/s.yaml").write_text(
        "perplexity: {data: held_out.fa}\nvariants: {dms: gs://other/dms.csv}\n"
    )
    suite = read_suite(f"{base}/s.yaml")
    assert suite["perplexity"]["data"] == f"{base}/held_out.fa"
    assert suite["variants"]["dms"] == "gs://other/dms.csv"
