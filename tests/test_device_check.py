"""tools/device_check.sh dry-run on the CPU at tiny shapes, so that the one-shot device check
never rots; and its bookkeeping (a failing or skipped step is recorded, the exit status says so)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import device_check  # noqa: E402


def dry_run(tmp_path, *only):
    out = tmp_path / "check.json"
    argv = ["bash", str(ROOT / "tools" / "device_check.sh"), "--dry-run", "--out", str(out)]
    for step in only:
        argv += ["--only", step]
    env = {**os.environ, "PYTHON": sys.executable, "DEVICE_WHEELS": str(tmp_path / "none")}
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    for key in ("date", "cpu", "avx512", "backend", "device_kind", "jax", "torch", "command"):
        assert key in report["meta"], key
    assert report["meta"]["dry_run"] is True
    return report["steps"]


def check_kernels(entry):
    assert entry["status"] == "ok", entry
    res = entry["result"]
    for name in ("splash", "pallas_gpu"):
        assert res[name]["ok"] and res[name]["interpret"], res[name]
        errs = res[name]["rel_err"]
        assert set(errs) == {"out", "dq", "dk", "dv", "packed_vs_alone"}
        assert max(errs.values()) < device_check.BF16_TOL["out"]


def check_train(entry, remat):
    assert entry["status"] == "ok", entry
    res = entry["result"]
    assert res["dtype"] == "bfloat16" and res["remat"] == remat
    assert res["esmjax_tokens_per_s"] > 0 and res["esmjax_mfu"] > 0


@pytest.mark.slow  # about 1 min; the other device_check tests run by default
def test_dry_run_kernels_and_train(tmp_path):
    steps = dry_run(tmp_path, "kernels", "train_3b")
    assert list(steps) == ["kernels", "train_3b"]
    check_kernels(steps["kernels"])
    check_train(steps["train_3b"], "full")


@pytest.mark.slow
def test_dry_run_all_steps(tmp_path):
    steps = dry_run(tmp_path)
    assert list(steps) == list(device_check.STEPS)
    check_kernels(steps["kernels"])
    check_train(steps["train_650m"], "none")
    check_train(steps["train_3b"], "full")
    fold = steps["fold"]
    assert fold["status"] == "ok", fold
    (row,) = fold["result"]["rows"]
    assert row["length"] == 16 and row["esmjax_s"] > 0 and row["hf_s"] > 0
    assert row["max_dca"] < 1e-2  # same random weights on both sides


def test_failed_and_skipped_steps_are_recorded(tmp_path, monkeypatch):
    fail = [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"]
    ok = [sys.executable, "-c", "import json, sys; json.dump({'x': 1}, open(sys.argv[1], 'w'))"]
    monkeypatch.setattr(
        device_check,
        "bench_commands",
        lambda dry_run, out_dir: {"train_650m": (fail, {}, 60), "fold": (ok, {}, 60)},
    )
    out = tmp_path / "c.json"
    rc = device_check.main(["--only", "train_650m", "--only", "fold", "--out", str(out)])
    steps = json.loads(out.read_text())["steps"]
    assert rc == 1
    assert steps["train_650m"]["status"] == "failed" and "boom" in steps["train_650m"]["error"]
    assert steps["fold"] == {**steps["fold"], "status": "ok", "result": {"x": 1}}

    rc = device_check.main(["--only", "fold", "--out", str(out), "--budget-s", "0"])
    assert rc == 1 and json.loads(out.read_text())["steps"]["fold"]["status"] == "skipped"
