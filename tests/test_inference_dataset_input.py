"""A dataset built by ``esmjax data build`` as the input of an inference job (issue 29): its
folder (every split) or ``FOLDER:SPLIT`` gives the records the FASTA it was built from holds,
and a job over it writes what the same job over that FASTA writes."""

import numpy as np

from esmjax.cli import main as cli
from esmjax.data.source import held_out
from esmjax.inference import shards, units
from esmjax.inference.inputs import InputStream
from esmjax.io.fasta import read_fasta


def test_dataset_records_are_the_fasta_records(dataset):
    fasta = {r.id: r.sequence for r in read_fasta(dataset.parent / "small.fa")}
    whole = list(InputStream([str(dataset)]).records())
    assert len(whole) == len(fasta) == 800
    assert {r.id: r.sequence for r in whole} == fasta
    assert all(r.description.startswith(f"{r.id} cluster=") for r in whole)
    held = list(InputStream([f"{dataset}:validation"]).records())
    assert {r.id for r in held} == {i for i in fasta if held_out(i, 0.05)} != set()
    assert [r.line for r in held] == list(range(1, len(held) + 1))  # index in the split
    # the folder reads train, then validation
    assert [r.id for r in whole[-len(held) :]] == [r.id for r in held]


def test_embed_job_over_a_dataset_split(dataset, ckpt, tmp_path):
    held = list(InputStream([f"{dataset}:validation"]).records())
    fa = tmp_path / "held.fa"
    fa.write_text("".join(f">{r.id}\n{r.sequence}\n" for r in held))
    common = ["--checkpoint", str(ckpt), "--format", "shards", "--unit-size", "16"]
    for src, out in ((f"{dataset}:validation", "from_ds"), (str(fa), "from_fa")):
        argv = ["embed", *common, "--fasta", src, "--out", str(tmp_path / out), "--no-progress"]
        assert cli(argv) == 0
    rows = {}
    for out in ("from_ds", "from_fa"):
        folder = tmp_path / out
        done = units.read_markers(str(folder), units.done_units(str(folder)))
        rows[out] = [
            r for m in done.values() for f in m["files"] for r in shards.read_records(folder / f)
        ]
    assert [r["id"] for r in rows["from_ds"]] == [r.id for r in held]
    for a, b in zip(rows["from_ds"], rows["from_fa"]):
        assert a["id"] == b["id"] and a["index"] == b["index"]
        np.testing.assert_array_equal(a["mean_2"], b["mean_2"])  # the last layer
