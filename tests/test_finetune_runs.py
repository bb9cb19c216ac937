"""Fine-tuning runs against each other: 8 devices (fsdp) against 1, and a run stopped and resumed
against one that was not (both in lora mode on a small SCOPe-class CSV)."""

import json
import subprocess
import sys

import numpy as np
import pytest
from test_train_loop import env

ESMJAX = [sys.executable, "-m", "esmjax.cli"]


def _config(tmp_path, files, **over):
    cfg = {
        "backbone": str(files / "bb"),
        "mode": "lora",
        "lora": {"rank": 2, "alpha": 4, "targets": ["q", "v", "fc1"]},
        "data": {"csv": str(files / "scope.csv"), "max_length": 30, "batch_size": 16},
        "optim": {"peak_lr": 3e-3, "warmup_steps": 2},
        "num_steps": 6,
        "log_every": 1,
        "eval_every": 3,
        "checkpoint": {"every": 3},
        **over,
    }
    p = tmp_path / "c.yaml"
    p.write_text(json.dumps(cfg))
    return p


def _losses(w):
    out = {}
    for line in (w / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        if "loss" in m:
            out[m["step"]] = m["loss"]
    return out


def _finetune(args, devices):
    cmd = [*ESMJAX, "finetune", "--no-progress", *args]
    subprocess.run(cmd, env=env(devices), check=True, capture_output=True, text=True)


# slow (about 100 s): test_train_step's sharded step test keeps sharded equality in the default run
@pytest.mark.slow
def test_sharded_run_equals_one_device(tmp_path, files):
    """fsdp over this session's 8 host devices (in process) against one device (a subprocess):
    the same losses within 1e-5 at every step, and the same test accuracy."""
    from esmjax.cli import main as cli

    c = _config(tmp_path, files, mesh={"ici_fsdp": -1, "rules": "fsdp"})
    _finetune(["--config", str(c), "--workdir", str(tmp_path / "one")], 1)
    eight = ["finetune", "--config", str(c), "--workdir", str(tmp_path / "eight"), "--no-progress"]
    assert cli(eight) == 0
    one, eight = _losses(tmp_path / "one"), _losses(tmp_path / "eight")
    assert sorted(one) == list(range(1, 7))
    np.testing.assert_allclose([eight[s] for s in one], list(one.values()), rtol=1e-5)
    r1 = json.loads((tmp_path / "one" / "report.json").read_text())
    r8 = json.loads((tmp_path / "eight" / "report.json").read_text())
    assert r1["test_accuracy"] == r8["test_accuracy"]


# Covered in the default suite by tests/test_finetune_inputs.py (a run stopped by SIGTERM, resumed,
# equal to the uninterrupted run): this one stops with --stop-after.
@pytest.mark.slow  # three runs in-process, 30-60 s on 2 shared cores
def test_stopped_and_resumed_run_equals_uninterrupted(tmp_path, files):
    from esmjax.cli import main as cli

    c = _config(tmp_path, files)
    assert (
        cli(["finetune", "--config", str(c), "--workdir", str(tmp_path / "a"), "--no-progress"])
        == 0
    )
    b = ["finetune", "--config", str(c), "--workdir", str(tmp_path / "b"), "--no-progress"]
    assert cli([*b, "--stop-after", "2"]) == 0  # checkpoint at step 2, resumed from there
    assert not (tmp_path / "b" / "report.json").exists()
    assert cli(b) == 0
    a, bl = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert sorted(bl) == sorted(a) == list(range(1, 7))
    np.testing.assert_allclose([bl[s] for s in a], list(a.values()), rtol=1e-6)
