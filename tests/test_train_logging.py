"""Weights & Biases logging (offline), the step-time breakdown in metrics.jsonl and a profiler
trace of a window of steps, from `esmjax train` end to end."""

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from test_train_loop import write_config

from esmjax.config import ConfigError, from_dict
from esmjax.config.train import MetricsConfig, ProfileConfig
from esmjax.train.metrics import BREAKDOWN, MetricsWriter, ThroughputWindow

ROOT = Path(__file__).resolve().parents[1]


def train(args: list[str], extra_env: dict) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="1", ESMJAX_LOG="WARNING")
    env.pop("XLA_FLAGS", None)
    env.update(extra_env)
    cmd = [sys.executable, "-m", "esmjax.cli", "train", "--no-progress", *args]
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)


def config(path: Path, dataset: Path, **sections) -> Path:
    """test_train_loop's tiny 4-step run plus ``sections`` (new top-level keys)."""
    write_config(path, dataset, num_steps=4)
    path.write_text(json.dumps({**json.loads(path.read_text()), **sections}))
    return path


def wandb_records(path: Path) -> list:
    """The protobuf records of an offline W&B run file: a LevelDB-style log (a 7-byte file
    header, then 32 KiB blocks of chunks with a 7-byte header: CRC, length, type), each record a
    ``wandb_internal_pb2.Record`` cut into FULL (1) or FIRST (2) .. MIDDLE (3) .. LAST (4)
    chunks."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, part, out = 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _crc, size, kind = struct.unpack("<IHB", data[pos : pos + 7])
        part += data[pos + 7 : pos + 7 + size]
        pos += 7 + size
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(part)
            out.append(record)
            part = b""
    return out


def history(records: list) -> list[dict]:
    return [
        {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]


def test_wandb_offline_run_resumes_under_one_id(tmp_path, dataset):
    wdir = tmp_path / "wandb"
    extra = {
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(wdir),
        "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
        "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
        "WANDB_SILENT": "true",
    }
    wandb = {"project": "esmjax-test", "name": "tiny"}
    cfg = config(tmp_path / "c.yaml", dataset, metrics={"wandb": wandb})
    work = tmp_path / "run"
    first = train(["--config", str(cfg), "--workdir", str(work), "--stop-after", "2"], extra)
    assert first.returncode == 0, first.stderr[-3000:]
    run_id = (work / "wandb_run_id").read_text().strip()
    second = train(["--workdir", str(work)], extra)  # resumed from the saved config
    assert second.returncode == 0, second.stderr[-3000:]
    assert (work / "wandb_run_id").read_text().strip() == run_id

    files = sorted(wdir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 2 and all(f.name == f"run-{run_id}.wandb" for f in files)
    logged = {}
    for f in files:
        records = wandb_records(f)
        (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        assert (run.run_id, run.project, run.display_name) == (run_id, "esmjax-test", "tiny")
        for row in history(records):
            logged.setdefault(row["step"], {}).update(row)
    jsonl = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    for line in jsonl:
        for key, value in line.items():
            if isinstance(value, (int, float)):
                assert logged[line["step"]][key] == pytest.approx(value), (line["step"], key)
    assert {line["step"] for line in jsonl if "loss" in line} == {1, 2, 3, 4}
    assert "eval_perplexity" in logged[4]


def test_profile_window_and_step_time_breakdown(tmp_path, dataset):
    profile = {"start_step": 2, "num_steps": 2}
    cfg = config(tmp_path / "c.yaml", dataset, profile=profile)
    work = tmp_path / "run"
    out = train(["--config", str(cfg), "--workdir", str(work)], {})
    assert out.returncode == 0, out.stderr[-3000:]
    traces = list((work / "profile").glob("plugins/profile/*/*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0
    assert list((work / "profile").glob("plugins/profile/*/*perfetto_trace.json.gz"))
    lines = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in lines if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2, 3, 4]
    for m in steps:
        parts = [m[f"{k}_seconds"] for k in BREAKDOWN]
        assert all(p >= 0 for p in parts)
        assert sum(parts) <= m["step_seconds"] * 1.001 + 1e-6  # parts of the step's wall time
        assert m["device_step_seconds"] > 0
    # checkpoint.every is 2: step 2's save comes after its log line, in the window of step 3
    waits = [m["checkpoint_wait_seconds"] for m in steps]
    assert waits[0] == waits[1] == waits[3] == 0 and waits[2] > 0
    # the profiler's start and its trace writing at step 3 (seconds on 2 loaded cores) are left
    # out of the step time; what is left besides the parts is Python between them
    assert steps[2]["step_seconds"] - sum(steps[2][f"{k}_seconds"] for k in BREAKDOWN) < 1.0


def test_breakdown_is_per_step_and_restarts_each_window():
    ticks = iter([0.0, 1.0, 1.5, 2.0, 4.0, 5.0, 5.0, 5.5, 6.0])
    w = ThroughputWindow(clock=ticks.__next__)  # starts at 0
    with w.timed("data_wait"):  # 1.0 .. 1.5
        w.add_step(64, 1.0)
    with w.timed("checkpoint_wait"):  # 2.0 .. 4.0
        w.add_step(64, 1.0)
    s = w.summary(num_devices=1, flops_per_token=None, peak_flops=None)  # at 5.0
    assert (s["data_wait_seconds"], s["checkpoint_wait_seconds"]) == (0.25, 1.0)
    assert (s["device_step_seconds"], s["step_seconds"]) == (0.0, 2.5)
    with w.timed("device_step"):  # 5.0 .. 5.5
        w.add_step(64, 1.0)
    s = w.summary(num_devices=1, flops_per_token=None, peak_flops=None)  # at 6.0
    assert [s[f"{k}_seconds"] for k in BREAKDOWN] == [0.0, 0.5, 0.0]


def test_bad_sections_are_one_line():
    with pytest.raises(ConfigError, match=r"processes: must be 0 or all, got '2'"):
        from_dict(ProfileConfig, {"processes": 2}, "profile")
    with pytest.raises(ConfigError, match=r"start_step: must be >= 1"):
        from_dict(ProfileConfig, {"start_step": 0}, "profile")
    with pytest.raises(ConfigError, match=r"metrics.wandb.name: must be empty without"):
        from_dict(MetricsConfig, {"wandb": {"name": "x"}}, "metrics")


def test_missing_wandb_package_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    wandb = from_dict(MetricsConfig, {"wandb": {"project": "p"}}).wandb
    with pytest.raises(ConfigError, match=r"pip install 'esmjax\[wandb\]'"):
        MetricsWriter(tmp_path, 0, enabled=False, wandb=wandb)
    assert not (tmp_path / "metrics.jsonl").exists()


# slow (20-30 s): fine-tuning drives the same harness and MetricsWriter as pretraining, whose W&B
# resume and profile window the default suite tests above
@pytest.mark.slow
def test_finetune_logs_to_wandb_and_profiles(tmp_path, files, monkeypatch):
    """Fine-tuning (in-process, test_finetune_inputs' LoRA run) takes the same two sections."""
    from test_finetune_inputs import CONFIG

    from esmjax.config import load_finetune_config
    from esmjax.train import finetune

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = dict(CONFIG, backbone=str(files / "bb"), num_steps=4, log_every=2, eval_every=4)
    cfg["data"] = dict(CONFIG["data"], csv=str(files / "scope.csv"))
    cfg["metrics"] = {"wandb": {"project": "esmjax-finetune"}}
    cfg["profile"] = {"start_step": 3, "num_steps": 5, "processes": "all"}  # past the end: cut
    (tmp_path / "c.yaml").write_text(json.dumps(cfg))
    work = tmp_path / "run"
    finetune.run(load_finetune_config(str(tmp_path / "c.yaml")), work, progress=False)
    assert list((work / "profile").glob("process0/plugins/profile/*/*.xplane.pb"))
    (run_file,) = (tmp_path / "wandb").glob("wandb/offline-run-*/run-*.wandb")
    assert run_file.name == f"run-{(work / 'wandb_run_id').read_text().strip()}.wandb"
    rows = history(wandb_records(run_file))
    assert [r["step"] for r in rows if "loss" in r] == [2, 4]
    assert any(k.startswith("valid_") for r in rows for k in r)
    lines = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert all(f"{k}_seconds" in m for m in lines if "loss" in m for k in BREAKDOWN)
