"""``esmjax predict`` reproduces the run's own test figures: a fine-tuning run with a small
``data.max_length`` (every sequence cropped), then ``predict`` on its test rows; the metrics
recomputed from predict's output equal report.json's, bit for bit. Residue predictions of cropped
sequences carry ``truncated_at`` and one warning line counts them."""

import csv
import json
import logging
import shutil

import numpy as np
import pytest
from test_finetune import finetune_run

from esmjax.cli import main as cli
from esmjax.evaluate import finetune_metrics as fm
from esmjax.io.fasta import read_fasta

MAX_LENGTH = 128  # TEM-1 is 286 residues
RES_LENGTH = 40  # the residue task's sequences are up to 60


def _predict(w, records, tmp_path, suffix):
    fa = tmp_path / "q.fa"
    fa.write_text("".join(f">{i}\n{s}\n" for i, s in records))
    out = tmp_path / f"p{suffix}"
    assert cli(["predict", "--checkpoint", str(w), "--fasta", str(fa), "--out", str(out)]) == 0
    return out


def _two_line_records(path):
    lines = path.read_text().splitlines()
    return [(h[1:].split()[0], s) for h, s in zip(lines[::2], lines[1::2])]


def _cropped_warnings(caplog):
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and "data.max_length" in r.getMessage()
    ]


@pytest.fixture(scope="module")
def tem1_spread(tmp_path_factory, shared_data):
    """Every 40th variant of the TEM-1 scan (sorted by fitness, so the whole range): test rows at
    positions divisible by 5, validation at 1 mod 5."""
    rows = []
    records = list(read_fasta(shared_data / "esm_examples" / "P62593.fasta"))
    for r in records[::40]:
        pos = int("".join(ch for ch in r.id.split("_")[1] if ch.isdigit()))
        split = "test" if pos % 5 == 0 else "train"
        rows.append((r.sequence, r.id.split("|")[-1], split, str(pos % 5 == 1)))
    path = tmp_path_factory.mktemp("tem1") / "tem1_spread.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sequence", "target", "set", "validation"])
        w.writerows(rows)
    return path


def test_predict_reproduces_the_runs_regression_test_figures(
    tmp_path,
    files,
    tem1_spread,
    caplog,
    capsys,
):
    """TEM-1 (286 residues) cropped to 128: test mutations past the crop score the same crop.
    Predicting whole sequences (the old fixed 1,022 crop) ranks them otherwise, and predict's
    Spearman differed from the report's."""
    w, rep, _ = finetune_run(
        tmp_path,
        files,
        "reg",
        {
            "mode": "frozen",
            "task": "sequence_regression",
            "data": {"csv": str(tem1_spread), "max_length": MAX_LENGTH, "batch_size": 8},
        },
    )
    test = [r for r in csv.DictReader(open(tem1_spread)) if r["set"] == "test"]
    assert rep["examples"]["test"] == len(test) > 10
    caplog.clear()
    out = _predict(w, [(f"t{k}", r["sequence"]) for k, r in enumerate(test)], tmp_path, ".csv")
    rows = list(csv.DictReader(open(out)))
    assert [r["id"] for r in rows] == [f"t{k}" for k in range(len(test))]
    # the text holds the float32 output exactly (no rounding that could tie or reorder scores)
    pred = np.array([[float(r["prediction_0"])] for r in rows])
    assert np.array_equal(pred.astype(np.float32).astype(np.float64), pred)
    y = np.array([[float(r["target"])] for r in test], np.float32)
    got = fm.regression(pred.astype(np.float32), y)
    for m in ("spearman", "pearson", "rmse"):
        assert got[m] == rep[f"test_{m}"], (m, got[m], rep[f"test_{m}"])
    warned = _cropped_warnings(caplog)
    assert len(warned) == 1 and f"{len(test)} of {len(test)} sequences" in warned[0], warned
    # A run whose validation metric was never finite keeps no best step (W/best/checkpoints is
    # empty) and reports its last step: predict reads that one instead of failing.
    empty = tmp_path / "nobest"
    shutil.copytree(w, empty)
    shutil.rmtree(empty / "best" / "checkpoints")
    (empty / "best" / "checkpoints").mkdir()
    capsys.readouterr()
    _predict(empty, [("t0", test[0]["sequence"])], tmp_path, "2.csv")
    assert "(step 8)" in capsys.readouterr().err


def test_predict_residue_task_marks_truncation(tmp_path, files, caplog):
    """The residue task cropped to 40: predict's labels of the test rows give the report's
    accuracy and macro-F1; rows longer than the crop carry ``truncated_at: 40``, shorter ones
    ``null``, and one warning line counts the cropped ones."""
    w, rep, _ = finetune_run(
        tmp_path,
        files,
        "res",
        {
            "mode": "frozen",
            "task": "residue_classification",
            "optim": {"peak_lr": 2e-2, "warmup_steps": 2},
            "data": {
                "fasta": str(files / "res.fa"),
                "labels": str(files / "res_labels.fa"),
                "mask": str(files / "res_mask.fa"),
                "max_length": RES_LENGTH,
                "batch_size": 16,
            },
        },
    )
    seqs = {r.id: r.sequence for r in read_fasta(files / "res.fa")}
    test = [r for r in read_fasta(files / "res_labels.fa") if "SET=test" in r.description]
    masks = dict(_two_line_records(files / "res_mask.fa"))
    caplog.clear()
    short = seqs[test[0].id][:25]  # besides the test rows: one within the crop
    records = [(r.id, seqs[r.id]) for r in test] + [("short", short)]
    out = _predict(w, records, tmp_path, ".jsonl")
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert (
        rows[-1]
        == {
            "id": "short",
            "sequence": short,
            "prediction": rows[-1]["prediction"],
            "truncated_at": None,
        }
        and len(rows[-1]["prediction"]) == 25
    )
    longer = sum(len(s) > RES_LENGTH for _, s in records)
    assert longer == len(test)
    labels = rep["labels"]
    y, p = [], []
    for row, r in zip(rows, test):
        n = len(seqs[r.id])
        assert row["id"] == r.id and row["sequence"] == seqs[r.id]
        assert row["truncated_at"] == (RES_LENGTH if n > RES_LENGTH else None)
        assert len(row["prediction"]) == min(n, RES_LENGTH)
        for j, c in enumerate(row["prediction"]):
            if masks[r.id][j] == "1":
                y.append(labels.index(r.sequence[j]))
                p.append(labels.index(c))
    y, p = np.array(y), np.array(p)
    assert float(np.mean(p == y)) == rep["test_accuracy"]
    assert fm.macro_f1(y, p, len(labels)) == rep["test_macro_f1"]
    warned = _cropped_warnings(caplog)
    assert len(warned) == 1 and f"{longer} of {len(records)} sequences" in warned[0], warned
    assert "truncated_at" in warned[0]


def test_predict_full_precision_text():
    """Each value's text reads back as the same float (repr), not a 6-digit rounding."""
    from esmjax.inference.task import _number

    for v in (np.float32(0.1), np.float32(1 / 3), np.float64(-1.2345678901234567e-7), 2.0):
        assert float(_number(v)) == float(v)
