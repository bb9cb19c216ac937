"""Training faults (issue 28): damaged and foreign checkpoint steps, a non-finite loss, and two
runs in one workdir. Each run is a subprocess under a timeout, judged by what it wrote."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from test_train_loop import (
    checkpoint_steps,
    losses,
    start_two_processes,
    train,
    wait_for_checkpoint,
    write_config,
)

from esmjax.io import checkpoint
from esmjax.io.lock import LOCK_FILE, WorkdirBusy, workdir_lease


def test_damaged_missing_and_foreign_steps_are_moved_aside(dataset, tmp_path):
    """Step 4 truncated, a step 5 missing its optimizer state and a step 6 copied in from another
    model: the resumed run falls back to step 2 with one short warning per step (not
    TensorStore's 60-line spec), moves the three aside (nothing deleted), and trains on, saving
    steps 4 and 6 anew (a save over the damaged step used to hang until the checkpoint timeout).
    That the resumed losses equal an uninterrupted run's is
    tests/test_train_loop.py::test_kill_and_resume_matches_uninterrupted."""
    full = write_config(tmp_path / "full.yaml", dataset, num_steps=6)
    short = write_config(tmp_path / "short.yaml", dataset, num_steps=4)
    other = write_config(tmp_path / "other.yaml", dataset, num_steps=2, model={"preset": "tiny_h3"})
    w, foreign = tmp_path / "w", tmp_path / "foreign"
    train(["--config", str(short), "--workdir", str(w)])
    train(["--config", str(other), "--workdir", str(foreign)])
    d = w / "checkpoints" / "4" / "params" / "ocdbt.process_0" / "d"
    largest = max(d.iterdir(), key=lambda f: f.stat().st_size)
    largest.write_bytes(largest.read_bytes()[: largest.stat().st_size // 3])
    shutil.copytree(foreign / "checkpoints" / "2", w / "checkpoints" / "6")
    shutil.copytree(w / "checkpoints" / "2", w / "checkpoints" / "5")  # a step missing files:
    shutil.rmtree(w / "checkpoints" / "5" / "opt_state")

    r = train(["--config", str(full), "--workdir", str(w)], check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    err = r.stderr
    assert "Traceback" not in err and "'driver'" not in err, err[-3000:]
    for step in (6, 5, 4):
        assert re.search(
            rf"checkpoint step {step} is unreadable here \(\w+: .{{0,310}}\)$", err, re.M
        )
        assert f"checkpoint step {step} could not be read; moved it aside to" in err
    assert checkpoint_steps(w) == [2, 4, 6]
    for step in (4, 5, 6):
        assert (w / "checkpoints" / f"{step}.unreadable").is_dir()
    assert sorted(losses(w)) == list(range(1, 7))


def nan_config(tmp_path: Path, dataset: Path, **over) -> Path:
    """A learning rate of 1e12: step 1's update blows the weights up, step 2's loss is NaN."""
    return write_config(
        tmp_path / "nan.yaml",
        dataset,
        num_steps=6,
        optim={"peak_lr": 1e12, "warmup_steps": 1},
        checkpoint={"every": 1, "keep": 10},
        **over,
    )


def test_non_finite_loss_stops_two_processes_before_saving(dataset, tmp_path):
    w = tmp_path / "w"
    r = train(
        ["--config", str(nan_config(tmp_path, dataset)), "--workdir", str(w)],
        devices=1,
        processes=2,
        check=False,
    )
    out = r.stdout + r.stderr
    assert r.returncode == 2, out[-3000:]
    for p in (0, 1):  # both processes stop at the same step, with the same line
        lines = re.findall(rf"^\[p{p}\] esmjax train: error: (.*)$", out, re.M)
        assert lines == [
            "step 2: the loss is not finite; stopped before saving it (the last checkpoint, "
            "step 1, is untouched); lower optim.peak_lr, or set nonfinite: skip to skip such steps"
        ], out[-3000:]
    assert "Traceback" not in out
    assert checkpoint_steps(w) == [1]
    model, step = checkpoint.load_model(w)
    assert step == 1
    import jax
    import numpy as np
    from flax import nnx

    for x in jax.tree.leaves(nnx.state(model)):
        assert np.isfinite(np.asarray(x)).all()


def test_non_finite_loss_skipped(dataset, tmp_path):
    """``nonfinite: skip``: every NaN step leaves the weights as they were; the run ends (exit 0)
    with finite checkpoints and one warning line per skipped step."""
    w = tmp_path / "w"
    cfg = nan_config(tmp_path, dataset, nonfinite="skip")
    r = train(["--config", str(cfg), "--workdir", str(w)], check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    skipped = re.findall(r"step (\d+): the loss is not finite; its update was skipped", r.stderr)
    assert skipped and int(skipped[0]) == 2, r.stderr[-3000:]
    assert checkpoint_steps(w)[-1] == 6
    a, _ = checkpoint.load_model(w, step=1)
    b, _ = checkpoint.load_model(w, step=6)
    import jax
    import numpy as np
    from flax import nnx

    if len(skipped) == 5:  # every step after the first skipped: the weights are step 1's
        for x, y in zip(jax.tree.leaves(nnx.state(a)), jax.tree.leaves(nnx.state(b))):
            assert np.array_equal(np.asarray(x), np.asarray(y))
    for x in jax.tree.leaves(nnx.state(b)):
        assert np.isfinite(np.asarray(x)).all()


# --------------------------------------------------------------------------------------------------
# One run per workdir
# --------------------------------------------------------------------------------------------------
def test_second_run_in_a_busy_workdir_stops_with_one_line(dataset, tmp_path):
    """Run A (2 processes) trains; run B into the same workdir stops at once with one line naming
    A; A goes on unharmed (every step logged once), and after A the lease is gone."""
    cfg = write_config(
        tmp_path / "c.yaml", dataset, num_steps=10_000, log_every=1, checkpoint={"every": 2}
    )
    w = tmp_path / "w"
    a = start_two_processes(cfg, w)
    try:
        wait_for_checkpoint(w, a, 2)
        holder = json.loads((w / LOCK_FILE).read_text())
        b = train(["--config", str(cfg), "--workdir", str(w)], check=False)
        lines = [ln for ln in b.stderr.splitlines() if ln.startswith("esmjax train: error:")]
        assert b.returncode == 2 and len(lines) == 1, b.stderr[-3000:]
        assert f"is in use by a run on {holder['host']} (pid {holder['pid']})" in lines[0]
        assert "Traceback" not in b.stderr
        os.killpg(a.pid, signal.SIGTERM)
        out, _ = a.communicate(timeout=120)
    finally:
        if a.poll() is None:
            os.killpg(a.pid, signal.SIGKILL)
    assert a.returncode == 75, out[-3000:]
    steps = [json.loads(ln)["step"] for ln in (w / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1)), steps  # each step once: B wrote nothing
    assert not (w / LOCK_FILE).exists()


def test_stale_leases_are_taken_over(tmp_path, monkeypatch):
    """A lease whose holder ended on this host is taken at once; one from another host that is no
    longer renewed is taken after ESMJAX_LOCK_LEASE; one renewed meanwhile is refused."""
    monkeypatch.setenv("ESMJAX_LOCK_RENEW", "0.2")
    monkeypatch.setenv("ESMJAX_LOCK_LEASE", "1.5")
    lock = tmp_path / LOCK_FILE
    p = subprocess.Popen(["true"])  # a pid of this host that has ended
    p.wait()
    here = socket.gethostname()
    lock.write_text(json.dumps({"owner": "x", "host": here, "pid": p.pid, "renewed": time.time()}))
    with workdir_lease(tmp_path):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()

    lock.write_text(json.dumps({"owner": "y", "host": "gone", "pid": 1, "renewed": time.time()}))
    t = time.monotonic()
    with workdir_lease(tmp_path):
        assert 1.0 < time.monotonic() - t < 10
    lock.write_text(
        json.dumps({"owner": "z", "host": here, "pid": os.getpid(), "renewed": time.time()})
    )
    with pytest.raises(WorkdirBusy, match=f"in use by a run on {here}"):
        with workdir_lease(tmp_path):
            pass
    assert json.loads(lock.read_text())["owner"] == "z"  # a refused run leaves the lease alone
