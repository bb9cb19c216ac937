"""Fine-tuning's preemption and its inputs in a bucket.

- SIGTERM: a real signal (``os.kill`` of this process, in the main thread, so the run's own
  handler takes it) sent while step 3 runs, with ``log_every`` larger than the run. The run saves
  step 4 and returns within one step of the signal; step 4 is a validation step, so its validation
  is left pending in the checkpoint, and the resumed run reaches the uninterrupted run's metrics
  and report exactly. In-process rather than a subprocess: three CLI start-ups would take most of a
  minute on 2 loaded cores, and the signal's timing is deterministic here (it is sent from the
  batch preparation of step 4, which runs while step 3 computes).
- Buckets, against the GCS emulator (tests/support/gcs_emulator.py, one server for the module): a
  fine-tuning run whose workdir, CSV and backbone (the local run's backbone as a fair-esm ``.pt``)
  are all in the bucket ends with the local run's metrics and report; ``predict`` reads its FASTA
  from the bucket and writes its CSV there, byte for byte the local output; ``evaluate variants
  --dms`` reads a bucket scan; a bad row of a bucket CSV is one line naming the URL and line (the
  one CLI subprocess); backbones (an esmjax folder, a ``.pt``), residue-task FASTAs, structures
  and a ProteinGym folder are read from the bucket as from disk. The bucket run's checkpoints go
  through TensorStore to the emulator, a Python server: most of that test's time.

The five fine-tuning runs of the module compile the same programs: the first run compiles (about
15-30 s on 2 loaded cores), the others load the executables from the test run's persistent
compilation cache (tests/conftest.py; 2-4 s each).
"""

import contextlib
import io
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from test_train_loop import env

from esmjax.cli import main as cli
from esmjax.config import load_finetune_config
from esmjax.io.fasta import read_fasta
from esmjax.train import finetune
from esmjax.train.metrics import TIMING_FIELDS

CONFIG = {
    "mode": "lora",
    "lora": {"rank": 2, "alpha": 4, "targets": ["q", "v"]},
    "data": {"max_length": 30, "batch_size": 16},
    "optim": {"peak_lr": 3e-3, "warmup_steps": 2},
    "num_steps": 8,
    "log_every": 1000,  # larger than the run: only the last step logs the loss
    "eval_every": 4,
    "checkpoint": {"every": 1000},
}


def _config(tmp_path, files):
    cfg = dict(CONFIG, backbone=str(files / "bb"))
    cfg["data"] = dict(CONFIG["data"], csv=str(files / "scope.csv"))
    p = tmp_path / "c.yaml"
    p.write_text(json.dumps(cfg))
    return p


def _lines(text: str) -> dict:
    """metrics.jsonl without the timing fields: (step, kind) -> the line."""
    out = {}
    for line in text.splitlines():
        m = json.loads(line)
        for k in TIMING_FIELDS:
            m.pop(k, None)
        out[(m["step"], "loss" in m, any(k.startswith("valid_") for k in m))] = m
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory, files):
    """The uninterrupted local run: its workdir, config file, report and metrics."""
    d = tmp_path_factory.mktemp("reference")
    c = _config(d, files)
    w = d / "w"
    with contextlib.redirect_stdout(io.StringIO()):
        finetune.run(load_finetune_config(str(c), []), w, progress=False)
    report = json.loads((w / "report.json").read_text())
    return w, c, report, _lines((w / "metrics.jsonl").read_text())


def test_sigterm_saves_within_one_step_and_resumes_exactly(
    tmp_path,
    files,
    reference,
    monkeypatch,
    caplog,
):
    _, c, want_report, want_lines = reference
    cfg = load_finetune_config(str(c), [])
    w = tmp_path / "w"
    original = finetune.train_batch
    sent = []

    def batch_then_signal(data, step, *args):
        if step == 3 and not sent:  # step 3 (1-based) was just dispatched and is running
            sent.append(step)
            os.kill(os.getpid(), signal.SIGTERM)
        return original(data, step, *args)

    monkeypatch.setattr(finetune, "train_batch", batch_then_signal)
    before = signal.getsignal(signal.SIGTERM)
    with contextlib.redirect_stdout(io.StringIO()), caplog.at_level("WARNING"):
        out = finetune.run(cfg, w, progress=False)
    assert signal.getsignal(signal.SIGTERM) is before  # the run's handler is gone
    text = caplog.text
    reached = int(text.split("SIGTERM received at step ")[1].split(":")[0])
    stopped = int(text.split("stopping at step ")[1].split(":")[0])
    assert reached <= stopped <= reached + 1, text
    assert (reached, stopped, out) == (3, 4, {"step": 4, "preempted": True})  # deterministic here
    steps = sorted(int(p.name) for p in (w / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [4]
    assert not (w / "report.json").exists()
    # step 4's validation was skipped to save in time (pending in the checkpoint): no line at all
    assert not (w / "metrics.jsonl").exists()

    monkeypatch.setattr(finetune, "train_batch", original)
    with contextlib.redirect_stdout(io.StringIO()):
        finetune.run(cfg, w, progress=False)
    assert json.loads((w / "report.json").read_text()) == want_report
    assert _lines((w / "metrics.jsonl").read_text()) == want_lines
    assert {(4, False, True), (8, False, True), (8, True, False)} <= set(want_lines)


# --------------------------------------------------------------------------------------------------
# Inputs (and a workdir) in a bucket
# --------------------------------------------------------------------------------------------------
def _bucket(name: str) -> str:
    from support.gcs_emulator import BUCKET

    return f"gs://{BUCKET}/finetune_inputs/{name}"


@pytest.fixture(scope="module")
def pt_backbone(tmp_path_factory, files):
    """The test backbone as a fair-esm ``.pt`` (and its contact-regression file), locally."""
    from esmjax.io import checkpoint, convert_esm2

    model, _ = checkpoint.load_model(files / "bb")
    pt = tmp_path_factory.mktemp("pt") / "esm2_tiny.pt"
    convert_esm2.write_fairesm(checkpoint.params_numpy(model), model.cfg, pt)
    return pt


def _upload_pt(pt, url_folder: str) -> str:
    from esmjax.io import paths

    for f in pt.parent.iterdir():
        paths.upload(f, f"{url_folder}/{f.name}")
    return f"{url_folder}/{pt.name}"


def _read(url: str) -> bytes:
    """An object read by a client with no cache."""
    import gcsfs

    fs = gcsfs.GCSFileSystem(skip_instance_cache=True, use_listings_cache=False)
    return fs.cat_file(url.removeprefix("gs://"))


def test_finetune_and_predict_with_bucket_paths(
    gcs,
    files,
    reference,
    pt_backbone,
    tmp_path,
    capsys,
    monkeypatch,
):
    import functools

    from esmjax.inference import task
    from esmjax.io import paths

    _, c, want_report, want_lines = reference
    csv_url, w = _bucket("scope.csv"), _bucket("run")
    paths.upload(files / "scope.csv", csv_url)
    bb_url = _upload_pt(pt_backbone, _bucket("run_backbone"))
    args = ["finetune", "--config", str(c), "--workdir", w, "--no-progress"]
    assert cli([*args, "--set", f"data.csv={csv_url}", "--set", f"backbone={bb_url}"]) == 0
    assert json.loads(_read(f"{w}/report.json")) == want_report
    assert _lines(_read(f"{w}/metrics.jsonl").decode()) == want_lines
    assert json.loads(_read(f"{w}/config.json"))["finetune"]["data"]["csv"] == csv_url

    # predict: FASTA from and CSV to the bucket, the bytes of the local FASTA -> local CSV (the
    # model is restored once for both)
    monkeypatch.setattr(task, "load_finetuned", functools.cache(task.load_finetuned))
    fasta = tmp_path / "q.fa"
    recs = list(read_fasta(files / "res.fa"))[:5]
    fasta.write_text("".join(f">{r.id}\n{r.sequence}\n" for r in recs))
    paths.upload(fasta, _bucket("q.fa"))
    capsys.readouterr()
    pred = ["predict", "--checkpoint", w]
    assert cli([*pred, "--fasta", _bucket("q.fa"), "--out", _bucket("preds/p.csv")]) == 0
    assert f"wrote {_bucket('preds/p.csv')}: 5 records" in capsys.readouterr().err
    assert cli([*pred, "--fasta", str(fasta), "--out", str(tmp_path / "p.csv")]) == 0
    local = (tmp_path / "p.csv").read_bytes()
    assert _read(_bucket("preds/p.csv")) == local
    assert local.startswith(b"id,prediction,prob_") and local.count(b"\r\n") == 6


def test_evaluate_variants_reads_the_scan_from_a_bucket(gcs, files, tmp_path):
    from esmjax.io import paths

    wt = "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ"
    rows = ["mutant,score", "K2A,0.1", "T3G,-0.4", "A4W,0.8", "Y5F,0.3", "I6L:A7G,-1.2"]
    scan = tmp_path / "dms.csv"
    scan.write_text("\n".join(rows) + "\n")
    paths.upload(scan, _bucket("dms.csv"))
    base = ["evaluate", "variants", "--checkpoint", str(files / "bb"), "--wt-sequence", wt]
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli([*base, "--dms", _bucket("dms.csv"), "--out", str(tmp_path / "r")]) == 0
        assert cli([*base, "--dms", str(scan), "--out", str(tmp_path / "l")]) == 0
    got = (tmp_path / "r" / "variants_scores.csv").read_bytes()
    assert got == (tmp_path / "l" / "variants_scores.csv").read_bytes()
    assert got.count(b"\n") == 6
    assert json.loads((tmp_path / "r" / "variants.json").read_text())["settings"]["dms"] == (
        _bucket("dms.csv")
    )


def test_bad_row_of_a_bucket_csv_names_the_url_and_line(gcs, files, tmp_path):
    """The CLI as a user runs it: one line naming the object and the line, exit 2."""
    from esmjax.io import paths

    bad = tmp_path / "bad.csv"
    bad.write_text("sequence,target\nMKTAYIAK,1.5\nMKTAYIAK,abc\n")
    paths.upload(bad, _bucket("bad.csv"))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"backbone": str(files / "bb"), "task": "sequence_regression"}))
    r = subprocess.run(
        [sys.executable, "-m", "esmjax.cli", "finetune", "--config", str(cfg)]
        + ["--workdir", str(tmp_path / "w"), "--set", f"data.csv={_bucket('bad.csv')}"],
        env={**env(1), **gcs},
        capture_output=True,
        text=True,
        timeout=300,
    )
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1, r.stderr[-3000:]
    assert f"{_bucket('bad.csv')}:3: non-numeric target" in err[0], err


def test_backbones_from_a_bucket(gcs, files, pt_backbone):
    """``backbone``/``--init-from`` in the bucket: an esmjax folder is recognised and its config
    read in place; a fair-esm ``.pt`` is downloaded (with its contact-regression sibling) and
    gives the local file's weights."""
    import jax

    from esmjax.io import paths
    from esmjax.io.convert import is_esmjax_folder, load_source_params, source_model_config
    from esmjax.parallel import sharding as shd

    paths.upload(files / "bb", _bucket("bb"), last="config.json")
    url = _upload_pt(pt_backbone, _bucket("pt"))
    cfg = source_model_config(pt_backbone)
    assert is_esmjax_folder(_bucket("bb")) and not is_esmjax_folder(url)
    assert source_model_config(_bucket("bb")) == source_model_config(url) == cfg
    mesh, rules = shd.single_device_mesh(), shd.resolve_rules("fsdp")
    got, what = load_source_params(url, cfg, mesh, rules)
    want, _ = load_source_params(pt_backbone, cfg, mesh, rules)
    assert what == f"{url} (fair-esm)"
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_residue_task_structure_and_proteingym_files_from_a_bucket(
    gcs,
    files,
    shared_data,
    tmp_path,
):
    """The other file inputs, read without a model: a FLIP residue task (sequence, gzip label and
    mask FASTAs), a structure (``FILE`` and ``FILE:CHAIN``, a bucket folder listed) and a ProteinGym
    reference with its assay read as the local files are; a bad label row names the URL and line."""
    import gzip

    from esmjax.config import FinetuneDataConfig
    from esmjax.evaluate import proteingym as pg
    from esmjax.evaluate.structure_scores import _structure_files, load_chain
    from esmjax.io import labeled, paths
    from esmjax.io.structures import read_chain

    labels_gz = tmp_path / "res_labels.fa.gz"
    labels_gz.write_bytes(gzip.compress((files / "res_labels.fa").read_bytes()))
    local = {"fasta": files / "res.fa", "labels": labels_gz, "mask": files / "res_mask.fa"}
    remote = {}
    for k, p in local.items():
        remote[k] = _bucket(f"res/{p.name}")
        paths.upload(p, remote[k])

    def load(where):
        cfg = FinetuneDataConfig(**{k: str(v) for k, v in where.items()})
        splits, _ = labeled.load(cfg, "residue_classification")
        return {
            s: [(e.id, e.sequence, e.target, e.mask.tolist(), e.where) for e in ex]
            for s, ex in splits.items()
        }

    got, want = load(remote), load(local)
    assert got["train"][0][4].startswith(f"{remote['labels']}:")
    drop = lambda t: {s: [e[:4] for e in ex] for s, ex in t.items()}  # noqa: E731
    assert drop(got) == drop(want) and len(got["train"]) > 50
    paths.write_text(_bucket("res/bad.fa"), ">x SET=train VALIDATION=False\nHHC\n")
    paths.write_text(_bucket("res/s.fa"), ">x\nMKTA\n")
    bad = FinetuneDataConfig(fasta=_bucket("res/s.fa"), labels=_bucket("res/bad.fa"))
    with pytest.raises(labeled.LabeledDataError, match="length mismatch") as e:
        labeled.load(bad, "residue_classification")
    assert str(e.value).startswith(f"{_bucket('res/bad.fa')}:1: ")

    pdb = shared_data / "structures" / "biotite" / "1aki.pdb"
    paths.upload(pdb, _bucket("pdb/1aki.pdb"))
    for suffix in ("", ":A"):
        a, b = read_chain(_bucket("pdb/1aki.pdb") + suffix), read_chain(str(pdb) + suffix)
        assert (a.path, a.chain, a.sequence) == (_bucket("pdb/1aki.pdb"), b.chain, b.sequence)
        np.testing.assert_array_equal(a.coords, b.coords)
    assert _structure_files(_bucket("pdb")) == [_bucket("pdb/1aki.pdb")]
    assert load_chain(_bucket("pdb/1aki.pdb")).sequence == load_chain(str(pdb)).sequence

    wt = "MKTAYIAKQRQISFVKSHFSRQ"
    (tmp_path / "pg").mkdir()
    (tmp_path / "pg" / "A.csv").write_text("mutant,DMS_score\nK2A,0.5\nT3G:A4W,-1\n")
    (tmp_path / "pg" / "DMS_substitutions.csv").write_text(
        f"DMS_id,DMS_filename,target_seq,coarse_selection_type\nA,A.csv,{wt},Activity\n"
    )
    paths.upload(tmp_path / "pg", _bucket("pg"))
    (info,) = pg.read_reference(_bucket("pg/DMS_substitutions.csv"), _bucket("pg"))
    (here,) = pg.read_reference(tmp_path / "pg" / "DMS_substitutions.csv", tmp_path / "pg")
    assert str(info.path) == _bucket("pg/A.csv")
    assert pg.read_assay(info).variants == pg.read_assay(here).variants
    assert pg.cache_key(info, {}) == pg.cache_key(here, {})
