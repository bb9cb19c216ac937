"""``esmjax embed``: bounded compilations, output layout, truncation, input errors and the mesh
fitted to the model."""

import logging

import numpy as np
import pytest
from flax import nnx

from esmjax.cli import main as cli
from esmjax.config import MeshConfig, esm2_from_shape
from esmjax.inference.embed import embed_records, make_batches, parse_layers
from esmjax.inference.engine import Engine, length_buckets
from esmjax.io import checkpoint
from esmjax.io.fasta import Record
from esmjax.models.esm2 import ESM2
from esmjax.parallel import sharding as shd


def test_buckets():
    assert length_buckets(100) == [16, 24, 32, 48, 64, 96, 128]
    recs = [Record(str(i), "", "A" * n) for i, n in enumerate([5, 10, 30, 31, 40, 44, 90])]
    shapes = {b.tokens.shape for b in make_batches(recs, 256, None, row_multiple=8)}
    # the 2 records of bucket 16 take 8 rows (the power of two above 2, rounded up to the 8
    # devices), not the bucket's 256 / 16 = 16
    assert shapes == {(8, 16), (8, 32), (8, 48), (8, 96)}
    many = [Record(str(i), "", "A" * 10) for i in range(21)]
    shapes = [b.tokens.shape for b in make_batches(many, 128, None)]
    assert shapes == [(8, 16), (8, 16), (8, 16)]  # full, full, then 5 records in a batch of 8


def test_compiles_once_per_bucket(ckpt, tmp_path):
    mesh = shd.make_mesh(MeshConfig(ici_fsdp=-1))
    rules = shd.resolve_rules("fsdp")
    model, _ = checkpoint.load_model(ckpt, mesh=mesh, rules=rules)
    emb = Engine(model, mesh, rules)
    # 12 records, lengths spread over 2 buckets (padded widths 32 and 48), several batches per
    # bucket.
    recs = [
        Record(f"r{i}", "", "M" * n)
        for i, n in enumerate([23, 24, 25, 28, 29, 30, 31, 35, 40, 42, 44, 46])
    ]
    n = embed_records(
        emb, recs, tmp_path, (0, 2), ["mean", "per_tok"], 8 * 32, None, progress=False
    )
    assert n == 12 and emb.traces == 2
    z = np.load(tmp_path / "r11.npz")
    assert z["repr_2"].shape == (46, 32) and z["mean_0"].shape == (32,)


def test_parse_layers():
    assert parse_layers("all", 3) == (0, 1, 2, 3)
    assert parse_layers("-1 0", 3) == (0, 3)
    assert parse_layers("-1,1", 6) == (1, 6)
    with pytest.raises(ValueError, match="out of range"):
        parse_layers("7", 6)


def test_cli_truncation_and_errors(ckpt, tmp_path, caplog):
    fa = tmp_path / "in.fa"
    fa.write_text(">long one\n" + "ACDEFGHIKL" * 5 + "\n>short\nMKT\n")
    out = tmp_path / "out"
    rc = cli(
        [
            "embed",
            "--checkpoint",
            str(ckpt),
            "--fasta",
            str(fa),
            "--out",
            str(out),
            "--include",
            "per_tok",
            "logits",
            "--truncation-seq-length",
            "20",
            "--no-progress",
        ]
    )
    assert rc == 0
    z = np.load(out / "long.npz")
    assert z["repr_2"].shape == (20, 32) and z["logits"].shape == (20, 33)
    assert any("truncated to 20" in r.message for r in caplog.records)
    bad = tmp_path / "bad.fa"
    bad.write_text(">ok\nACD\n>b\nAC#D\n")
    out2 = tmp_path / "out2"
    assert cli(["embed", "--checkpoint", str(ckpt), "--fasta", str(bad), "--out", str(out2)]) == 2
    assert not out2.exists()  # nothing written when the input is bad
    dup = tmp_path / "dup.fa"
    dup.write_text(">a|1\nACD\n>a_1\nACD\n")
    assert cli(["embed", "--checkpoint", str(ckpt), "--fasta", str(dup), "--out", str(out2)]) == 2
    assert (
        cli(["embed", "--checkpoint", str(tmp_path), "--fasta", str(fa), "--out", str(out2)]) == 2
    )


def test_mesh_fitted_to_the_model(tmp_path, caplog):
    """Width 36 on 8 devices: restoring onto fsdp=8 would replicate nearly every weight, which
    ``load_model`` refuses (unless ``allow_replicated``); ``esmjax embed`` chooses its own mesh, so
    it takes data=2,fsdp=4 instead and runs."""
    cfg = esm2_from_shape(1, 36, 3)
    ckpt = tmp_path / "ckpt"
    checkpoint.save_converted(ckpt, cfg, checkpoint.params_numpy(ESM2(cfg, rngs=nnx.Rngs(0))))
    eight = shd.make_mesh(MeshConfig(ici_fsdp=-1))
    with pytest.raises(shd.ShardingError, match="of size 36 is not divisible by mesh axis fsdp=8"):
        checkpoint.load_model(ckpt, mesh=eight, rules="fsdp")
    model, _ = checkpoint.load_model(ckpt, mesh=eight, rules="fsdp", allow_replicated=True)
    assert model.layers.fc2.bias[...].sharding.is_fully_replicated
    mesh = checkpoint.inference_mesh(ckpt, "fsdp")
    assert shd.mesh_sizes(mesh) == {"data": 2, "fsdp": 4, "tensor": 1}
    fasta = tmp_path / "x.fa"
    fasta.write_text(">a\nMKTAYIAK\n")
    argv = ["embed", "--checkpoint", str(ckpt), "--fasta", str(fasta), "--no-progress"]
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert cli([*argv, "--out", str(tmp_path / "out")]) == 0
    assert np.load(tmp_path / "out" / "a.npz")["mean_1"].shape == (36,)
    assert "mesh data=2,fsdp=4" in caplog.text and "replicated:" not in caplog.text
