"""``esmjax plan``: ahead-of-time compilation of the full train step and the memory report."""

import subprocess
import sys
from pathlib import Path

import pytest

from esmjax.config import load_config
from esmjax.train.plan import format_plan, parse_mesh, plan

ROOT = Path(__file__).resolve().parents[1]


def test_tiny_plan_on_8_devices(tmp_path):
    cfg = load_config(
        ROOT / "configs" / "demo.yaml",
        [
            "model=tiny",
            "data.seq_len=64",
            "data.tokens_per_step=4096",
            "data.rows_per_device=2",
            "mesh.rules=fsdp_tp",
        ],
    )
    p = plan(cfg, parse_mesh("data=2,fsdp=2,tensor=2"), 80.0)
    assert (
        p["accumulation_steps"] == 4
        and p["micro_rows_global"] == 16
        and p["rows_per_batch_shard"] == 4
    )
    a, x = p["analytic_gb"], p["xla_gb"]
    assert 0 < a["params"] < 1e-3 and a["optimizer"] == pytest.approx(2 * a["params"], rel=0.05)
    assert x["arguments"] > 0 and x["temp"] > 0 and p["fits"]
    assert p["flops_per_step_analytic"] > 0
    assert "fits 80 GB devices: YES" in format_plan(p)


def test_3b_fits_8_devices():
    """The recorded 3B plan: 80 GB devices, 8 of them, at ~2M tokens per step."""
    cfg = load_config(ROOT / "configs" / "esm2_3b.yaml")
    p = plan(cfg, parse_mesh("data=1,fsdp=8,tensor=1"), 80.0)
    assert p["global_tokens_per_step"] == 2_097_152 and p["fits"], format_plan(p)


@pytest.mark.slow
@pytest.mark.parametrize(
    "config,mesh",
    [("esm2_15b", "data=1,fsdp=16,tensor=4"), ("esm2_650m", "data=1,fsdp=1,tensor=1")],
)
def test_recorded_plans_fit(config, mesh):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "esmjax.cli",
            "plan",
            "--config",
            f"configs/{config}.yaml",
            "--mesh",
            mesh,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0 and "fits 80 GB devices: YES" in r.stdout, r.stdout + r.stderr[-2000:]
