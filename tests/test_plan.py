"""``esmjax plan``: ahead-of-time compilation of the full train step and the memory report."""

import subprocess
import sys
from pathlib import Path

import pytest

from esmjax.config import load_config
from esmjax.parallel.sharding import ShardingError
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
    a, x = p["analytic_gb"], p["compiled_gb"]
    assert 0 < a["params"] < 1e-3 and a["optimizer"] == pytest.approx(2 * a["params"], rel=0.05)
    assert x["arguments"] > 0 and x["temp"] > 0 and p["fits"]
    assert p["flops_per_step_analytic"] > 0
    # Without a target the compiled figure is XLA:CPU's, said so, and the verdict is analytic.
    text = format_plan(p)
    assert p["compiler"] == "XLA:CPU (host devices)" and p["target"] is None
    assert "(XLA:CPU: not an accelerator's figure)" in text
    assert "fits 80.0 GiB devices: YES (analytic total" in text
    # The 2-way data x 2-way fsdp x 2-way tensor step moves data: its collectives are listed.
    assert {c["op"] for c in p["collectives"]} >= {"all-gather", "all-reduce"}


def test_3b_fits_8_devices():
    """The recorded 3B plan: 80 GB devices, 8 of them, at ~2M tokens per step."""
    cfg = load_config(ROOT / "configs" / "esm2_3b.yaml")
    p = plan(cfg, parse_mesh("data=1,fsdp=8,tensor=1"), 80.0)
    assert p["global_tokens_per_step"] == 2_097_152 and p["fits"], format_plan(p)


def test_15b_on_48_devices_is_refused():
    """fsdp=12 does not divide the 15B width 5,120: every layer kernel would be replicated (~14 GiB
    of fp32 weights per device, ~56 GiB with gradients and Adam, against ~4 GiB on 64 devices).
    ``plan`` stops before compiling, with one line and exit code 2."""
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "esmjax.cli",
            "plan",
            "--config",
            "configs/esm2_15b.yaml",
            "--mesh",
            "data=1,fsdp=12,tensor=4",
            "--devices",
            "48",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2, r.stdout + r.stderr[-3000:]
    assert "Traceback" not in r.stderr and r.stdout == ""
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("esmjax plan: error: mesh data=1,fsdp=12,tensor=4 leaves "), last
    assert (
        "the largest is layers.fc1.kernel [48x5120x20480], whose dim 1 (embed) of size 5120 is "
        "not divisible by mesh axis fsdp=12" in last
    )
    assert "data=1,fsdp=10,tensor=4 (40 devices); data=1,fsdp=16,tensor=4 (64 devices)" in last
    assert "mesh.allow_replicated=true" in last
    # Every replicated parameter is listed before, with its bytes per device.
    assert (
        "replicated: layers.fc1.kernel 48x5120x20480 P(None, None, 'tensor'), 4.69 GiB" in r.stderr
    )


def test_plan_allow_replicated():
    """A width (36) that fsdp=8 does not divide: refused, then planned with
    ``mesh.allow_replicated=true``."""
    over = [
        "model.preset=tiny",
        "model.embed_dim=36",
        "model.num_heads=3",
        "model.mlp_dim=144",
        "model.num_layers=1",
        "data.seq_len=64",
        "data.tokens_per_step=512",
        "data.rows_per_device=1",
    ]
    cfg = load_config(ROOT / "configs" / "demo.yaml", over)
    with pytest.raises(ShardingError, match="not divisible by mesh axis fsdp=8"):
        plan(cfg, parse_mesh("data=1,fsdp=8,tensor=1"), 80.0)
    cfg = load_config(ROOT / "configs" / "demo.yaml", [*over, "mesh.allow_replicated=true"])
    p = plan(cfg, parse_mesh("data=1,fsdp=8,tensor=1"), 80.0)
    assert p["fits"] and p["analytic_gb"]["params"] > 0


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
    assert r.returncode == 0 and "fits 80.0 GiB devices: YES" in r.stdout, (
        r.stdout + r.stderr[-2000:]
    )
