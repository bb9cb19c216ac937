"""Inference jobs at scale (issue 29): a job on 2 processes, one of them killed with -9 mid-way,
then finished by a rerun on 1 process, gives the outputs of a 1-process run record for record, with
nothing missing and nothing twice; into a local folder and into a ``gs://`` bucket (the GCS
emulator); for ``embed``, ``fold`` and per-sequence pseudo-perplexity."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from support.data_fixtures import cath_head
from test_train_loop import ESMJAX, ROOT, env
from test_train_multiprocess import descendant_with_env

from esmjax.inference import shards, units

pytestmark = pytest.mark.multiprocess


def markers(out: str) -> dict[int, dict]:
    if out.startswith("gs://"):  # gcsfs caches listings: a poll must list again
        from support.gcs_emulator import forget_clients

        forget_clients()
    return units.read_markers(out, units.done_units(out))


def shard_records(out: str) -> list[dict]:
    """Every record of every unit marked done, in unit order."""
    rows = []
    for _, m in sorted(markers(out).items()):
        for name in m["files"]:
            rows += shards.read_records(f"{out}/{name}")
    return rows


def run_job(args: list[str], e: dict, processes: int = 1, kill_after: int | None = None):
    """``esmjax ARGS`` as one process, or on ``processes`` processes by launch/local.sh (1 device
    each); ``kill_after``: process 1 gets SIGKILL once it has marked that many units done."""
    if processes == 1:
        r = subprocess.run([*ESMJAX, *args], env=e, cwd=ROOT, capture_output=True, text=True)
        return r.returncode, r.stdout + r.stderr
    out = args[args.index("--out") + 1]
    cmd = [str(ROOT / "launch" / "local.sh"), str(processes), "1", *ESMJAX, *args]
    proc = subprocess.Popen(
        cmd, env=e, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    killed = kill_after is None
    deadline = time.monotonic() + 300
    while not killed and proc.poll() is None and time.monotonic() < deadline:
        mine = [m for m in markers(out).values() if m["process"] == [1, processes]]
        if len(mine) >= kill_after:
            os.kill(descendant_with_env(proc.pid, "ESMJAX_PROCESS_ID", "1"), signal.SIGKILL)
            killed = True
        time.sleep(0.1)
    text = proc.communicate(timeout=300)[0]
    assert killed, f"process 1 ended before {kill_after} units:\n{text[-3000:]}"
    return proc.returncode, text


def killed_then_resumed(args: list[str], out: str, e: dict, kill_after: int = 2) -> list[dict]:
    """The job on 2 processes with process 1 killed, then rerun on 1 process: its records."""
    rc, text = run_job([*args, "--out", out], e, processes=2, kill_after=kill_after)
    assert rc == 128 + signal.SIGKILL, text[-3000:]  # local.sh: the killed process's status
    first = markers(out)
    assert [1, 2] in [m["process"] for m in first.values()], first
    rc, text = run_job([*args, "--out", out], e)
    assert rc == 0, text[-3000:]
    done = markers(out)
    for k, m in first.items():  # kept, not redone
        assert done[k] == m
    redone = {k for k, m in done.items() if m["process"] == [0, 1]}
    assert redone and not redone & set(first), (redone, set(first))
    total = units.read_json(f"{out}/{units.TOTAL_FILE}")
    assert total["units"] == len(done), total
    return shard_records(out)


def assert_same_records(got: list[dict], want: list[dict], atol: float) -> None:
    """Record for record (by job index): the same ids and columns, arrays within ``atol``."""
    indices = [r["index"] for r in got]
    assert len(indices) == len(set(indices)), "a record written twice"
    assert sorted(indices) == [r["index"] for r in want]
    by_index = {r["index"]: r for r in got}
    for w in want:
        g = by_index[w["index"]]
        assert g.keys() == w.keys()
        for k, v in w.items():
            if isinstance(v, np.ndarray):
                np.testing.assert_allclose(g[k], v, rtol=0, atol=atol, err_msg=f"{w['id']} {k}")
            elif isinstance(v, float):
                assert abs(g[k] - v) <= atol, (w["id"], k, g[k], v)
            else:
                assert g[k] == v, (w["id"], k)


@pytest.fixture(scope="module")
def cath_2000(tmp_path_factory) -> Path:
    return cath_head(tmp_path_factory.mktemp("jobs") / "cath.fa", 2000)


def embed_args(ckpt: Path, fasta: Path) -> list[str]:
    return [
        "embed",
        "--checkpoint",
        str(ckpt),
        "--fasta",
        str(fasta),
        "--include",
        "mean",
        "per_tok",
        "--unit-size",
        "100",
        "--truncation-seq-length",
        "200",
        "--no-progress",
    ]


@pytest.fixture(scope="module")
def embed_reference(ckpt, cath_2000, tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ref") / "embed"
    rc, text = run_job([*embed_args(ckpt, cath_2000), "--out", str(out)], env(1))
    assert rc == 0, text[-3000:]
    assert json.loads((out / "job.json").read_text())["format"] == "shards"  # auto: 2000 > 1000
    return shard_records(str(out))


def test_embed_killed_and_resumed_locally(ckpt, cath_2000, embed_reference, tmp_path):
    args = embed_args(ckpt, cath_2000)
    got = killed_then_resumed(args, str(tmp_path / "embed"), env(1))
    assert len(embed_reference) == 2000
    assert_same_records(got, embed_reference, atol=1e-6)


def test_embed_killed_and_resumed_in_a_bucket(ckpt, cath_2000, embed_reference, tmp_path):
    pytest.importorskip("gcsfs")
    pytest.importorskip("gcp_storage_emulator")
    from support.gcs_emulator import BUCKET, running

    with running(tmp_path / "staged") as emulator:
        out = f"gs://{BUCKET}/embed-job"
        got = killed_then_resumed(embed_args(ckpt, cath_2000), out, {**env(1), **emulator})
    assert_same_records(got, embed_reference, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# fold: a small random-weight ESMFold (tests/support/esmfold_reference.py) converted by the CLI
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def esmfold_job(tmp_path_factory, cath_2000):
    """(checkpoint, FASTA of 24 short CATH domains, the 1-process run's records). Their lengths
    share one bucket (48) and the units of 3 records one row count (4): one compilation per
    process."""
    from support.esmfold_reference import hf_model

    from esmjax.cli import main as cli
    from esmjax.io.fasta import read_fasta

    d = tmp_path_factory.mktemp("fold_job")
    hf_model("small", 0, round_inv_freq=False).save_pretrained(d / "hf")
    assert cli(["convert", str(d / "hf"), str(d / "ckpt")]) == 0
    short = [r for r in read_fasta(cath_2000) if 33 <= len(r.sequence) <= 48][:24]
    fasta = d / "short.fa"
    fasta.write_text("".join(f">{r.id}\n{r.sequence}\n" for r in short))
    ref = d / "ref"
    rc, text = run_job([*fold_args(d / "ckpt", fasta), "--out", str(ref)], env(1))
    assert rc == 0, text[-3000:]
    return d / "ckpt", fasta, shard_records(str(ref))


def fold_args(ckpt: Path, fasta: Path) -> list[str]:
    return [
        "fold",
        "--checkpoint",
        str(ckpt),
        "--fasta",
        str(fasta),
        "--format",
        "shards",
        "--unit-size",
        "3",
        "--num-recycles",
        "0",
        "--no-progress",
    ]


def test_fold_killed_and_resumed(esmfold_job, tmp_path):
    ckpt, fasta, want = esmfold_job
    assert len(want) == 24 and all(r["pdb"].startswith("REMARK") for r in want)
    assert want[0]["pae"].shape == (want[0]["length"],) * 2
    got = killed_then_resumed(fold_args(ckpt, fasta), str(tmp_path / "fold"), env(1))
    assert_same_records(got, want, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# evaluate pseudo-perplexity
# --------------------------------------------------------------------------------------------------
def pll_args(ckpt: Path, fasta: Path) -> list[str]:
    return [
        "evaluate",
        "pseudo-perplexity",
        "--checkpoint",
        str(ckpt),
        "--fasta",
        str(fasta),
        "--unit-size",
        "4",
        "--no-progress",
    ]


def test_pseudo_perplexity_killed_and_resumed(ckpt, cath_2000, tmp_path):
    """40 short CATH domains, units of 4: per record and for the set, as one process computes
    them."""
    from esmjax.io.fasta import read_fasta

    short = [r for r in read_fasta(cath_2000) if len(r.sequence) <= 40]
    fasta = tmp_path / "short.fa"
    fasta.write_text("".join(f">{r.id}\n{r.sequence}\n" for r in short[:40]))
    ref = tmp_path / "ref"
    rc, text = run_job([*pll_args(ckpt, fasta), "--out", str(ref)], env(1))
    assert rc == 0, text[-3000:]
    want = shard_records(str(ref))
    assert len(want) == 40
    out = tmp_path / "pll"
    got = killed_then_resumed(pll_args(ckpt, fasta), str(out), env(1))
    assert_same_records(got, want, atol=1e-6)
    summary = json.loads((out / "summary.json").read_text())
    assert summary == json.loads((ref / "summary.json").read_text())
    nll = sum(r["nll"] for r in want)
    assert summary["residues"] == sum(len(r.sequence) for r in short[:40])
    assert abs(summary["pseudo_perplexity"] - np.exp(nll / summary["residues"])) < 1e-9


# --------------------------------------------------------------------------------------------------
# The job folder: settings, invalid records, inspection, processes from the launchers' variables
# --------------------------------------------------------------------------------------------------
def test_worker_from_launchers():
    assert units.worker({}) == units.Worker(0, 1)
    local = {"ESMJAX_PROCESS_ID": "1", "ESMJAX_NUM_PROCESSES": "2"}
    assert units.worker(local) == units.Worker(1, 2)
    assert units.worker({"SLURM_PROCID": "5", "SLURM_NTASKS": "8"}) == units.Worker(5, 8)
    k8s = {"JOB_COMPLETION_INDEX": "3", "ESMJAX_NUM_PROCESSES": "8"}
    assert units.worker(k8s) == units.Worker(3, 8)
    k8s.update(JOBSET_JOB_INDEX="1", ESMJAX_PROCESSES_PER_JOB="4")
    assert units.worker(k8s) == units.Worker(7, 8)
    tpu = {"TPU_WORKER_ID": "2", "TPU_WORKER_HOSTNAMES": "h0,h1,h2,h3"}
    assert units.worker(tpu) == units.Worker(2, 4)
    assert units.worker(local, process_id=0) == units.Worker(0, 2)  # the command line first
    with pytest.raises(ValueError, match="give both"):
        units.worker({"ESMJAX_PROCESS_ID": "1"})
    with pytest.raises(ValueError, match="need 0 <= index < count"):
        units.worker({}, process_id=2, num_processes=2)
    assert [k for k in range(7) if units.Worker(1, 3).takes(k)] == [1, 4]


def test_units_cut_the_same_whatever_the_skips():
    from esmjax.io.fasta import FastaStats, Record

    stats = FastaStats()

    def records():
        for i in range(7):
            if i == 2:
                stats.skip("invalid character")
            yield Record(f"r{i}", "", "MKT")
        stats.skip("empty sequence")

    got = list(units.cut(records(), 3, stats))
    assert [(u.index, u.first, [r.id for r in u.records]) for u in got] == [
        (0, 0, ["r0", "r1", "r2"]),
        (1, 3, ["r3", "r4", "r5"]),
        (2, 6, ["r6"]),
    ]
    assert [u.skipped for u in got] == [{"invalid character": 1}, {}, {"empty sequence": 1}]


def test_job_folder_settings_skips_and_inspection(ckpt, tmp_path, capsys):
    """A rerun with other settings is refused; invalid records are skipped and reported per unit;
    ``inspect-outputs`` finds a missing and a damaged unit; ``--redo-bad`` and a rerun repair
    them."""
    from esmjax.cli import main as cli

    fasta = tmp_path / "in.fa"
    seqs = [">a\nMKTAYIAK\n", ">b\nMK#T\n", ">c\nGSHMKT\n", ">d\nMKV\n", ">e\nACDEFG\n"]
    fasta.write_text("".join(seqs))
    out = tmp_path / "out"
    base = ["embed", "--checkpoint", str(ckpt), "--fasta", str(fasta), "--out", str(out)]
    args = [*base, "--format", "shards", "--unit-size", "2", "--no-progress"]
    assert cli(args) == 2  # the invalid record, without --skip-invalid: one line
    assert "b" in capsys.readouterr().err and not (out / "done").exists()
    assert cli([*args, "--skip-invalid"]) == 0, capsys.readouterr().err
    done = markers(str(out))
    assert [done[k]["records"] for k in sorted(done)] == [2, 2]
    assert done[0]["skipped"] == {"invalid character": 1}
    assert cli([*args, "--skip-invalid", "--include", "bos"]) == 2
    assert "include: ['mean'] then, ['bos'] now" in capsys.readouterr().err
    assert cli(["inspect-outputs", str(out)]) == 0
    assert "units done: 2 of 2" in capsys.readouterr().out
    (out / units.marker_name(1)).unlink()  # as if killed before the marker
    (out / units.shard_name(0)).write_bytes(b"damaged")
    assert cli(["inspect-outputs", str(out), "--redo-bad"]) == 1
    report = capsys.readouterr().out
    assert "missing units (1): 1" in report and "bad unit 0: units/000000.parquet" in report
    assert cli([*args, "--skip-invalid"]) == 0
    assert cli(["inspect-outputs", str(out)]) == 0
    rows = shard_records(str(out))
    assert [r["id"] for r in rows] == ["a", "c", "d", "e"]
    assert [r["index"] for r in rows] == [0, 1, 2, 3]
    one = shards.read_record(out / units.shard_name(1), "e")  # its row group alone
    assert one.keys() == rows[3].keys() and one["index"] == 3
    np.testing.assert_array_equal(one["mean_2"], rows[3]["mean_2"])
    with pytest.raises(KeyError, match="no record 'a'"):
        shards.read_record(out / units.shard_name(1), "a")


def test_auto_format_small_input_writes_files(ckpt, tmp_path):
    from esmjax.cli import main as cli

    fasta = tmp_path / "in.fa"
    fasta.write_text(">a\nMKTAYIAK\n>b\nGSHMKT\n")
    out = tmp_path / "out"
    assert cli(["embed", "--checkpoint", str(ckpt), "--fasta", str(fasta), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.glob("*.npz")) == ["a.npz", "b.npz"]
    assert json.loads((out / "job.json").read_text())["format"] == "npz"


def test_slurm_launcher_runs_an_inference_job(ckpt, tmp_path):
    """``sbatch launch/slurm.sbatch --job embed ...`` (tests/launch_stubs' srun: 2 nodes, one task
    each): each task takes its units from SLURM_PROCID/SLURM_NTASKS, together every record once."""
    fasta = cath_head(tmp_path / "c.fa", 120)
    stubs = ROOT / "tests" / "launch_stubs"
    e = dict(
        env(1),
        PATH=f"{stubs}:{Path(sys.executable).parent}:{os.environ['PATH']}",
        SLURM_JOB_ID="31337",
        SLURM_JOB_NUM_NODES="2",
        SLURM_NTASKS_PER_NODE="1",
        SCONTROL_STUB_LOG=str(tmp_path / "scontrol.log"),
    )
    out = tmp_path / "out"
    job = ["embed", "--checkpoint", str(ckpt), "--fasta", str(fasta), "--out", str(out)]
    job += ["--format", "shards", "--unit-size", "20"]
    cmd = ["bash", str(ROOT / "launch" / "slurm.sbatch"), "--job", *job]
    r = subprocess.run(cmd, env=e, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    done = markers(str(out))
    assert sorted(done) == list(range(6))
    assert {k: m["process"] for k, m in done.items()} == {k: [k % 2, 2] for k in range(6)}
    rows = shard_records(str(out))
    assert [r["index"] for r in rows] == list(range(120))
    assert [r["id"] for r in rows] == [ln[1:] for ln in fasta.read_text().split("\n")[::2] if ln]
