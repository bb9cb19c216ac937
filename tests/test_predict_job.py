"""``esmjax predict`` as a job of work units (``esmjax.inference.predictions``): a folder ``--out``
shared by two processes (run one after the other), then a rerun that finds every unit done, gives
the predictions of the one-file ``.csv`` record for record, invalid records skipped and counted in
the same way; without ``--skip-invalid`` an invalid record is one line before the model loads. A
residue task's shard rows are its ``.jsonl`` rows plus per-residue probabilities (one row builder,
``task.prediction_rows``), checked without a model."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from support.data_fixtures import cath_head
from test_finetune import finetune_run

from esmjax.cli import main as cli
from esmjax.inference import shards, units
from esmjax.io.fasta import Record, read_fasta

MAX_LENGTH = 30  # most CATH domains are longer: the crop and its warning are exercised
BAD = ">bad one\nMK#T\n"  # an invalid character


@pytest.fixture(scope="module")
def cls_run(tmp_path_factory, files) -> Path:
    """A frozen-backbone SCOPe-class run of one step: the smallest fine-tuning workdir."""
    one_step = {"num_steps": 1, "eval_every": 1, "log_every": 1, "checkpoint": {"every": 1}}
    data = {"csv": str(files / "scope.csv"), "max_length": MAX_LENGTH, "batch_size": 8}
    d = tmp_path_factory.mktemp("predict_job")
    return finetune_run(d, files, "cls", {"mode": "frozen", **one_step, "data": data})[0]


@pytest.fixture(scope="module")
def queries(tmp_path_factory) -> Path:
    """40 CATH domains with an invalid entry among them (the 21st, header on line 41)."""
    d = tmp_path_factory.mktemp("queries")
    lines = cath_head(d / "head.fa", 40).read_text().splitlines(keepends=True)
    path = d / "q.fa"
    path.write_text("".join(lines[:40]) + BAD + "".join(lines[40:]))
    return path


def markers(out: Path) -> dict[int, dict]:
    return units.read_markers(out, units.done_units(out))


def test_predict_job_on_two_processes_equals_the_csv(cls_run, queries, tmp_path, capsys):
    base = ["predict", "--checkpoint", str(cls_run), "--fasta", str(queries), "--skip-invalid"]
    assert cli([*base, "--out", str(tmp_path / "p.csv")]) == 0
    assert "40 records, 1 invalid skipped" in capsys.readouterr().err
    want = list(csv.DictReader(open(tmp_path / "p.csv", newline="")))
    out = tmp_path / "job"
    job = [*base, "--out", str(out), "--unit-size", "8", "--no-progress"]
    for i in ("0", "1"):
        assert cli([*job, "--process-id", i, "--num-processes", "2"]) == 0, capsys.readouterr()
    done = markers(out)
    assert {k: m["process"] for k, m in done.items()} == {k: [k % 2, 2] for k in range(5)}
    # the whole (small) input was read before the model loaded: unit 0 reports its skips
    assert done[0]["skipped"] == {"invalid character": 1} and done[0]["records"] == 8
    assert sum(m["cropped"] for m in done.values()) == sum(
        len(r.sequence) > MAX_LENGTH for r in read_fasta(queries, skip_invalid=True)
    )
    assert cli(job) == 0  # the rerun: every unit done, nothing written again
    assert markers(out) == done
    assert cli(["inspect-outputs", str(out)]) == 0
    assert "units done: 5 of 5" in capsys.readouterr().out
    rows = [r for k in sorted(done) for r in shards.read_records(out / units.shard_name(k))]
    assert [r["index"] for r in rows] == list(range(40))  # every record once, in input order
    assert [r["id"] for r in rows] == [w["id"] for w in want]
    for r, w in zip(rows, want):
        assert r["prediction"] == w["prediction"] and r["length"] <= MAX_LENGTH
        for name in (k for k in w if k.startswith("prob_")):
            assert abs(r[name] - float(w[name])) <= 1e-6, (w["id"], name)
    assert json.loads((out / units.JOB_FILE).read_text())["max_length"] == MAX_LENGTH


def test_predict_job_invalid_record_is_one_line(cls_run, queries, tmp_path, capsys):
    out = tmp_path / "job"
    args = ["predict", "--checkpoint", str(cls_run), "--fasta", str(queries), "--out", str(out)]
    assert cli(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "q.fa:42: record 'bad' has invalid character" in err[0], err
    assert not out.exists()  # refused before the model loads: no job folder
    # a file is written by one process: two are refused
    one_file = [*args[:-1], str(tmp_path / "p.csv"), "--num-processes", "2", "--process-id", "0"]
    assert cli(one_file) == 2
    assert "one file, written by one process" in capsys.readouterr().err


class _FakeEngine:
    """An engine whose "model" gives position i of a batch W tokens wide the logits
    (W/2 - i, i - W/2): label C before the middle, H after; no compilation."""

    row_multiple = 1

    def cached_forward(self, name, fn):
        def forward(batch):
            pos = np.broadcast_to(np.arange(batch.shape[1], dtype=np.float32), batch.shape)
            return np.stack([batch.shape[1] / 2 - pos, pos - batch.shape[1] / 2], -1)

        return forward


def test_residue_shard_rows_are_the_jsonl_rows(files, tmp_path):
    from esmjax.config import FinetuneConfig, from_dict
    from esmjax.inference import task
    from esmjax.inference.predictions import predict_unit

    cfg = {"backbone": str(files / "bb"), "task": "residue_classification"}
    cfg["data"] = {"fasta": "x.fa", "labels": "y.fa", "max_length": 6}
    setup = task.Setup(from_dict(FinetuneConfig, cfg, "finetune"), ("C", "H"), 2)
    recs = [Record("a", "first", "MKTAYIAK"), Record("b", "", "GSH")]
    result = predict_unit(_FakeEngine(), setup, units.Unit(3, 24, recs), 64)
    assert result.extra == {"cropped": 1}
    ((name, data),) = result.files.items()
    path = tmp_path / "shard.parquet"
    path.write_bytes(data)
    rows = shards.read_records(path)
    tokens, _ = task.cropped_tokens(setup, recs)
    outputs = task.predict(_FakeEngine(), tokens)
    lines = [json.loads(x) for x in task.prediction_text(setup, recs, outputs).splitlines()]
    assert name == units.shard_name(3) and len(rows) == len(lines) == 2
    for r, line, rec, o in zip(rows, lines, recs, outputs):
        probs = r.pop("probabilities")
        assert {k: r[k] for k in line} == line
        assert (r["description"], r["length"]) == (rec.description, min(len(rec.sequence), 6))
        assert probs.shape == (r["length"], 2) and len(line["prediction"]) == r["length"]
        np.testing.assert_allclose(probs, task.probabilities(o, False), atol=1e-7)
    assert [r["index"] for r in rows] == [24, 25] and rows[0]["truncated_at"] == 6
