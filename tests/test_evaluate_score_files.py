"""The per-variant score files of ``evaluate variants`` and ``evaluate proteingym`` hold every
score in full: read back, they are the in-memory scores exactly, and the metrics recomputed from
them are the report's. ``evaluate proteingym`` checks every assay's rows before it restores the
checkpoint or scores anything."""

import csv
import json
import shutil

import numpy as np
from test_evaluate_proteingym import pg_folder, pg_run, tem1  # noqa: F401  (fixtures)
from test_evaluate_variants import dms_path, slice_file  # noqa: F401  (fixtures)

from esmjax.cli import main as cli
from esmjax.evaluate import fitness_metrics as fm
from esmjax.evaluate import jobs as ev_jobs
from esmjax.evaluate import proteingym as pg
from esmjax.evaluate import variants as vr


def _recording(monkeypatch, module, name):
    """Wraps ``module.name`` so that each call's result is kept (in call order)."""
    kept = []
    inner = getattr(module, name)

    def wrapped(*args, **kwargs):
        kept.append(np.asarray(inner(*args, **kwargs)))
        return kept[-1]

    monkeypatch.setattr(module, name, wrapped)
    return kept


def test_proteingym_score_files_round_trip(ckpt, pg_folder, tmp_path, monkeypatch):  # noqa: F811
    kept = _recording(monkeypatch, pg, "score_assay")
    out = tmp_path / "rep"
    assert pg_run(ckpt, pg_folder, out, "--window", "100") == 0
    per = json.loads((out / "proteingym.json").read_text())["results"]["per_assay"]
    assert [r["dms_id"] for r in per] == ["BLAT_ECOLX_Synthetic", "SHORT_Synthetic"]
    for row, scores in zip(per, kept):
        path = out / "proteingym_assays" / f"{row['dms_id']}_scores.csv"
        rows = list(csv.DictReader(open(path)))
        got = np.array([float(r["score"]) for r in rows])
        assert np.array_equal(got, scores)  # exactly: 6 decimals failed this
        true = np.array([float(r["DMS_score"]) for r in rows])
        b = np.array([int(r["DMS_score_bin"]) for r in rows])
        want = fm.assay_metrics(true, b, got)
        assert {m: row["metrics"][m] for m in fm.METRICS} == {m: want[m] for m in fm.METRICS}


def test_variants_score_file_round_trips(ckpt, slice_file, tmp_path, monkeypatch):  # noqa: F811
    kept = _recording(monkeypatch, vr, "masked_marginal_scores")
    out = tmp_path / "rep"
    args = ["evaluate", "variants", "--checkpoint", str(ckpt), "--dms", str(slice_file)]
    assert cli([*args, "--out", str(out), "--no-progress"]) == 0
    res = json.loads((out / "variants.json").read_text())["results"]
    rows = list(csv.DictReader(open(out / "variants_scores.csv")))
    got = np.array([float(r["score"]) for r in rows])
    assert len(kept) == 1 and np.array_equal(got, kept[0])
    fitness = [v.fitness for v in vr.read_dms(slice_file).variants]
    assert [float(r["fitness"]) for r in rows] == fitness
    assert vr.spearman(got, fitness) == res["spearman"]


def test_proteingym_checks_every_assay_before_the_restore(
    ckpt,  # noqa: F811
    pg_folder,  # noqa: F811
    tmp_path,
    monkeypatch,
    capsys,
):
    """A bad row in the second assay of the reference: one line naming its file and row, before
    the checkpoint is restored or the first assay scored (nothing written to the report folder)."""

    def no_restore(opts):
        raise AssertionError("the checkpoint was restored before the assays were checked")

    monkeypatch.setattr(ev_jobs, "restore", no_restore)
    d = tmp_path / "pg"
    shutil.copytree(pg_folder, d)
    lines = (d / "SHORT_Synthetic.csv").read_text().splitlines()
    name = lines[2].split(",")[0]
    wrong = ("W" if name[0] != "W" else "A") + name[1:]
    lines[2] = lines[2].replace(name, wrong, 1)
    (d / "SHORT_Synthetic.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "o"
    assert pg_run(ckpt, d, out) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"SHORT_Synthetic.csv:3: mutant {wrong}: wild-type residue" in err[0]
    assert not out.exists()
    # a later assay without its score column: the same, one line before the restore
    (d / "SHORT_Synthetic.csv").write_text("mutant,score\nM1A,0.5\n")
    assert pg_run(ckpt, d, out) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "SHORT_Synthetic.csv:1: header" in err[0] and "DMS_score" in err[0]
    assert not out.exists()
