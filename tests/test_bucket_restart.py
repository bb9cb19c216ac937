"""The object store goes away mid-run (the bad case of issue 12): the GCS emulator, persisting to a
folder, is stopped while ``esmjax train`` writes its workdir to the bucket. The run ends with one
error line (exit 2, no traceback) instead of waiting out TensorStore's retries; the server is then
restarted on the same folder, and ``esmjax train`` resumes from the last complete checkpoint,
removing the step that was being written (never restoring it)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.data_fixtures import cath_head
from support.gcs_emulator import BUCKET, committed_steps, emulator_env, free_port, start_emulator

ROOT = Path(__file__).resolve().parents[1]


def step_folders(url: str) -> list[str]:
    import gcsfs

    fs = gcsfs.GCSFileSystem(skip_instance_cache=True, use_listings_cache=False)
    root = url.removeprefix("gs://") + "/checkpoints/"
    return sorted({n.removeprefix(root).split("/")[0] for n in fs.find(root)})


# slow: 111 s on one loaded core (measured): two training starts, and the failing run takes 40-80 s
# to give up (gcsfs retries a metrics upload for about a minute; the checkpoint wait is 10 s here).
@pytest.mark.slow
def test_server_stopped_mid_run_then_resume(tmp_path, shared_data, monkeypatch):
    pytest.importorskip("gcsfs")
    pytest.importorskip("gcp_storage_emulator")
    from esmjax.data.build import build_dataset

    fasta = tmp_path / "small.fa"
    cath_head(fasta, 300)
    build_dataset([fasta], tmp_path / "ds", val_fraction=0.05)
    cfg = {
        "model": {"preset": "tiny"},
        "mesh": {"ici_fsdp": -1},
        "data": {"train": str(tmp_path / "ds"), "seq_len": 64, "tokens_per_step": 4096},
        "optim": {"peak_lr": 1e-3, "warmup_steps": 2},
        "num_steps": 60,
        "log_every": 1,
        "eval_every": 0,
        "checkpoint": {"every": 2, "keep": 100},
    }
    (tmp_path / "c.json").write_text(json.dumps(cfg))

    port, store = free_port(), tmp_path / "store"
    server = start_emulator(port, data_dir=store)
    gcs = emulator_env(f"http://127.0.0.1:{port}")
    for k, v in gcs.items():
        monkeypatch.setenv(k, v)
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="2", ESMJAX_LOG="WARNING")
    env.update(ESMJAX_CHECKPOINT_OCDBT="0", ESMJAX_CHECKPOINT_TIMEOUT="10")
    env.pop("XLA_FLAGS", None)
    url = f"gs://{BUCKET}/runs/stopped"
    train = [sys.executable, "-m", "esmjax.cli", "train", "--no-progress", "--workdir", url]
    try:
        proc = subprocess.Popen(
            [*train, "--config", str(tmp_path / "c.json")],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.time() + 300
        while not committed_steps(url):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.time() < deadline, "no checkpoint appeared in the bucket"
            time.sleep(0.2)
        server.terminate()  # the store goes away while the run writes its next steps
        server.wait(timeout=30)
        t0 = time.time()
        _, err = proc.communicate(timeout=400)
        waited = time.time() - t0
        errors = [line for line in err.splitlines() if "error" in line.lower()]
        assert proc.returncode == 2, err[-3000:]
        assert "Traceback" not in err and len(errors) == 1, err[-3000:]
        assert errors[0].startswith(f"esmjax train: error: {url}"), errors

        server = start_emulator(port, data_dir=store)  # the same objects again
        done = committed_steps(url)
        last = max(done)
        assert last < cfg["num_steps"], done
        r = subprocess.run(
            [*train, "--stop-after", "2"],
            env={**env, "ESMJAX_LOG": "INFO"},
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=400,
        )
        assert r.returncode == 0, r.stderr[-3000:]
        assert f"resumed from step {last}" in r.stderr, r.stderr[-3000:]
        # every step folder left is complete: the one cut off was removed, not restored
        assert [int(s) for s in step_folders(url)] == committed_steps(url)
        assert max(committed_steps(url)) == last + 2
        import gcsfs

        fs = gcsfs.GCSFileSystem(skip_instance_cache=True, use_listings_cache=False)
        text = fs.cat_file(f"{url.removeprefix('gs://')}/metrics.jsonl").decode()
        steps = [json.loads(line)["step"] for line in text.splitlines() if "loss" in line]
        assert steps == list(range(1, last + 3)), steps
        print(f"store stopped: the run ended {waited:.0f} s later; resumed from step {last}")
    finally:
        server.terminate()
        server.wait(timeout=30)
        if proc.poll() is None:
            proc.kill()
