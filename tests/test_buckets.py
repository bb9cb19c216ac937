"""Bucket paths (``gs://``) end to end against a real GCS API server on 127.0.0.1.

The server is ``gcp-storage-emulator`` (in memory; tests/support/gcs_emulator.py), started by a
fixture and stopped after. gcsfs (behind ``etils.epath``) finds it through
``STORAGE_EMULATOR_HOST``; TensorStore, Orbax's array writer, through ``TENSORSTORE_GCS_HTTP_URL``,
with ``GOOGLE_AUTH_TOKEN_FOR_TESTING`` as its token (the emulator checks none). The commands run in
process, but for the 2-process training run (killed with SIGKILL) and a Python without gcsfs.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.data_fixtures import cath_head
from support.gcs_emulator import (
    BUCKET,
    NoBackoff,
    committed_steps,
    emulator_env,
    forget_clients,
    free_port,
)

ROOT = Path(__file__).resolve().parents[1]
ESMJAX = [sys.executable, "-m", "esmjax.cli"]


def losses(text: str) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in map(json.loads, text.splitlines()) if "loss" in m}


@pytest.fixture(scope="module")
def fasta(tmp_path_factory, shared_data):
    path = tmp_path_factory.mktemp("bucket_fasta") / "small.fa"
    return cath_head(path, 600)


def write_config(path: Path, train: str) -> Path:
    cfg = {
        "model": {"preset": "tiny"},
        "mesh": {"ici_fsdp": -1},
        "data": {"train": train, "seq_len": 64, "tokens_per_step": 4096, "eval_tokens": 2048},
        "optim": {"peak_lr": 1e-3, "warmup_steps": 2},
        "num_steps": 8,
        "log_every": 1,
        "eval_every": 0,
        "checkpoint": {"every": 4, "keep": 10},  # each save to the emulator takes seconds
    }
    path.write_text(json.dumps(cfg))
    return path


# slow (70-80 s): the default suite covers its parts on their own: a bucket dataset's batches
# (test_bucket_stream), a run writing to a bucket that stops and resumes there
# (test_bucket_restart), kill -9 and resume of a 2-process run (test_train_loop,
# test_multihost), and the readers of a bucket checkpoint (test_bucket_outputs)
@pytest.mark.slow
@pytest.mark.multiprocess
def test_bucket_end_to_end(gcs, fasta, tmp_path, capsys):
    """data build -> 2-process training in the bucket, kill -9 after a checkpoint, resume on one
    process (the losses equal an uninterrupted run within 1e-5), then evaluate, embed and export
    reading the bucket checkpoint.

    Only the 2-process run is a subprocess (``launch/local.sh``, killed with SIGKILL): the build,
    the uninterrupted reference run, the resume and the readers run in this process, with the 8
    host devices of the test session (the stream and the checkpoints do not depend on the device
    or process count), so the test pays for one CLI start-up instead of eight; the test run's
    persistent compilation cache (tests/conftest.py) lets the resume load the reference run's
    executables."""
    from etils import epath

    from esmjax.cli import main as cli

    ds, run_url = f"gs://{BUCKET}/ds", f"gs://{BUCKET}/runs/a"
    assert cli(["data", "build", "--fasta", str(fasta), "--out", ds, "--val-fraction", "0.05"]) == 0
    assert (epath.Path(ds) / "esmjax_dataset.json").exists()
    assert cli(["data", "inspect", ds]) == 0
    assert "train" in capsys.readouterr().out

    cfg = write_config(tmp_path / "c.yaml", ds)
    ref = tmp_path / "ref"  # uninterrupted, local workdir, the same bucket dataset
    assert cli(["train", "--no-progress", "--config", str(cfg), "--workdir", str(ref)]) == 0
    want = losses((ref / "metrics.jsonl").read_text())
    assert sorted(want) == list(range(1, 9))

    cmd = [str(ROOT / "launch" / "local.sh"), "2", "2", *ESMJAX, "train", "--no-progress"]
    cmd += ["--config", str(cfg), "--workdir", run_url]
    env = dict(os.environ, JAX_PLATFORMS="cpu", ESMJAX_LOG="WARNING")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.Popen(
        cmd,
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 300
    while not [s for s in committed_steps(run_url) if s >= 4]:
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline, "no checkpoint appeared in the bucket"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = committed_steps(run_url)
    assert max(done) == 4, done
    assert (epath.Path(run_url) / "config.json").exists()

    forget_clients()  # fsspec caches listings: see the killed run's objects
    assert cli(["train", "--no-progress", "--workdir", run_url]) == 0  # 1 process resumes
    got = losses((epath.Path(run_url) / "metrics.jsonl").read_text())
    assert sorted(got) == list(range(1, 9))
    for step in range(1, 9):
        assert abs(got[step] - want[step]) < 1e-5, (step, got[step], want[step])
    assert committed_steps(run_url)[-1] == 8
    assert any((epath.Path(run_url) / "tensorboard").iterdir())

    out = tmp_path / "ppl"
    assert cli(["evaluate", "perplexity", "--checkpoint", run_url, "--out", str(out)]) == 0
    report = json.loads((out / "perplexity.json").read_text())
    assert report["step"] == 8

    query = f"gs://{BUCKET}/query.fa"
    epath.Path(query).write_text(">q1\nMKTAYIAKQR\n>q2\nGSHMLEDPVK\n")
    emb = tmp_path / "emb"
    assert cli(["embed", "--checkpoint", run_url, "--fasta", query, "--out", str(emb)]) == 0
    assert sorted(p.name for p in emb.glob("*.npz")) == ["q1.npz", "q2.npz"]
    job = json.loads((emb / "job.json").read_text())  # the job's settings (inference.units)
    assert job["checkpoint"] == run_url and job["step"] == 8 and job["format"] == "npz"

    hf = tmp_path / "hf"
    assert cli(["export", run_url, "--to", "hf", str(hf)]) == 0
    assert (hf / "model.safetensors").is_file()


def test_missing_bucket_object_and_server(gcs, capsys, monkeypatch):
    """An unknown bucket, a URL with no object and an unreachable server: one line each, exit 2
    (in process: the command's return code and its stderr)."""
    from esmjax.cli import main as cli

    def fails(args: list[str], text: str) -> None:
        assert cli(args) == 2
        err = capsys.readouterr().err
        assert text in err and "Traceback" not in err, err

    fails(["data", "inspect", "gs://no-such-bucket-esmjax/ds"], "gs://no-such-bucket-esmjax/ds")
    fails(
        ["evaluate", "perplexity", "--checkpoint", f"gs://{BUCKET}/nothing"],
        "not an esmjax checkpoint folder",
    )
    for k, v in emulator_env(f"http://127.0.0.1:{free_port()}").items():
        monkeypatch.setenv(k, v)
    # gcsfs retries a refused connection 6 times with 0.5 to 16 s of back-off (about 33 s, as a
    # user would wait); the test keeps the retries and drops the waits
    import gcsfs.retry

    monkeypatch.setattr(gcsfs.retry, "asyncio", NoBackoff())
    forget_clients()  # the cached clients know the live server
    try:
        fails(["data", "inspect", f"gs://{BUCKET}/ds"], f"gs://{BUCKET}/ds")
    finally:
        monkeypatch.undo()
        forget_clients()


def test_missing_client_names_the_extra(tmp_path):
    """Without gcsfs, a gs:// path says which extra to install."""
    code = (
        "import sys; sys.modules['gcsfs'] = None\n"
        "from esmjax.io import paths\n"
        "try:\n    paths.path('gs://b/x')\n"
        "except Exception as e:\n    print(type(e).__name__, e)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert "InputError" in r.stdout and "esmjax[gcs]" in r.stdout, r.stdout + r.stderr


def test_s3_checkpoints_are_refused_in_one_line():
    """Orbax 0.12.8 builds no TensorStore spec for s3:// (it normalises the URL to ``s3:/b/x`` and
    refuses it as not absolute), so an s3:// checkpoint folder is an InputError, not a traceback."""
    pytest.importorskip("s3fs")
    from esmjax.errors import InputError
    from esmjax.io import checkpoint

    with pytest.raises(InputError, match="s3://bucket/run: Orbax .* cannot store checkpoints"):
        checkpoint.manager("s3://bucket/run", read_only=False)
