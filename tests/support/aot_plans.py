"""Runs ``esmjax plan --target`` in a subprocess: each compiler starts in a process of its own (the
test process has its 8 CPU devices up already), the GPU one with the CUDA plugin that ``make test``
installs aside (``.venv/aot-gpu``) on its ``PYTHONPATH``."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
AOT_GPU = ROOT / ".venv" / "aot-gpu"


def gpu_env() -> dict:
    """The environment of a GPU plan; outside CI a missing GPU compiler skips (in CI it fails)."""
    if not (AOT_GPU / "jax_plugins").is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"{AOT_GPU} is missing: make test installs the GPU compiler there")
        pytest.skip(f"no GPU compiler in {AOT_GPU} (make test installs it)")
    return {**os.environ, "PYTHONPATH": str(AOT_GPU)}


def plan(tmp_path: Path, *args: str, env: dict | None = None) -> tuple[dict, str]:
    """``esmjax plan ARGS --json``: the plan and the printed report; fails on any non-zero exit."""
    out = tmp_path / "plan.json"
    r = subprocess.run(
        [sys.executable, "-m", "esmjax.cli", "plan", *args, "--json", str(out)],
        cwd=ROOT,
        env=env or dict(os.environ),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout + r.stderr[-4000:]
    assert "Traceback" not in r.stderr
    return json.loads(out.read_text()), r.stdout


def weights_gathered_in_bf16(p: dict) -> None:
    """A bf16 run gathers its weights in bf16: the f32 all-gathers (LayerNorm scales and biases)
    move under 5% of the bytes."""
    by = {(c["op"], c["dtype"]): c["bytes"] for c in p["collectives"]}
    bf16, f32 = by.get(("all-gather", "bf16"), 0), by.get(("all-gather", "f32"), 0)
    assert bf16 > 0 and f32 < 0.05 * bf16, p["collectives"]
