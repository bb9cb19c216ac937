"""The training loop end to end: multi-process runs, resume on another process count, kill -9,
damaged checkpoints, SIGTERM, and loss falling on the bundled data."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from esmjax.cli import main as cli
from esmjax.data.build import build_dataset
from esmjax.io import checkpoint
from esmjax.train.preemption import EXIT_PREEMPTED, StopSignal

ROOT = Path(__file__).resolve().parents[1]
ESMJAX = [sys.executable, "-m", "esmjax.cli"]


def write_config(path: Path, dataset: Path, **over) -> Path:
    cfg = {
        "model": {"preset": "tiny"},
        "mesh": {"ici_fsdp": -1},
        "data": {
            "train": str(dataset),
            "seq_len": 64,
            "tokens_per_step": 2048,
            "eval_tokens": 2048,
        },
        "optim": {"peak_lr": 1e-3, "warmup_steps": 2},
        "num_steps": 6,
        "log_every": 1,
        "eval_every": 0,
        "checkpoint": {"every": 2, "keep": 10},
    }
    for k, v in over.items():
        cfg[k] = {**cfg[k], **v} if isinstance(v, dict) else v
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


def env(devices: int) -> dict:
    e = dict(
        os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices), ESMJAX_LOG="WARNING"
    )
    e.pop("XLA_FLAGS", None)
    return e


def losses(workdir: Path) -> dict[int, float]:
    out = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        if "loss" in m:
            out[m["step"]] = m["loss"]
    return out


def train(args, devices=1, processes=1, check=True, **kw):
    cmd = ESMJAX + ["train", "--no-progress", *args]
    if processes > 1:
        cmd = [str(ROOT / "launch" / "local.sh"), str(processes), str(devices), *cmd]
    return subprocess.run(
        cmd,
        env=env(devices),
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=check,
        timeout=600,
        **kw,
    )


def start_two_processes(cfg: Path, workdir: Path) -> subprocess.Popen:
    """``esmjax train`` as 2 processes x 1 device (``launch/local.sh``) in a session of its own
    (so the test can signal the whole group), output piped."""
    cmd = [str(ROOT / "launch" / "local.sh"), "2", "1", *ESMJAX, "train", "--no-progress"]
    return subprocess.Popen(
        [*cmd, "--config", str(cfg), "--workdir", str(workdir)],
        env=env(1),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def wait_for_checkpoint(workdir: Path, proc: subprocess.Popen, at_least: int) -> int:
    ckdir = workdir / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline:
        steps = [int(p.name) for p in ckdir.iterdir() if p.name.isdigit()] if ckdir.exists() else []
        if steps and max(steps) >= at_least:
            return max(steps)
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    raise TimeoutError("no checkpoint appeared")


def test_kill_and_resume_matches_uninterrupted(dataset, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", dataset, num_steps=14, data={"tokens_per_step": 8192})
    ref_dir, kill_dir = tmp_path / "ref", tmp_path / "kill"
    train(["--config", str(cfg), "--workdir", str(ref_dir)])
    proc = subprocess.Popen(
        ESMJAX + ["train", "--no-progress", "--config", str(cfg), "--workdir", str(kill_dir)],
        env=env(1),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ckdir = kill_dir / "checkpoints"
    wait_for_checkpoint(kill_dir, proc, 6)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    committed = max(int(p.name) for p in ckdir.iterdir() if p.name.isdigit())
    assert 6 <= committed < 14
    r = train(["--config", str(cfg), "--workdir", str(kill_dir)], check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = losses(ref_dir), losses(kill_dir)
    assert sorted(b) == list(range(1, 15))
    np.testing.assert_allclose(
        [b[s] for s in range(1, 15)], [a[s] for s in range(1, 15)], rtol=0, atol=1e-6
    )


def test_damaged_latest_checkpoint_falls_back(dataset, tmp_path, caplog):
    cfg = write_config(tmp_path / "c.yaml", dataset, num_steps=4)
    w = tmp_path / "w"
    assert cli(["train", "--no-progress", "--config", str(cfg), "--workdir", str(w)]) == 0
    params = w / "checkpoints" / "4" / "params"
    for f in params.rglob("*"):
        if f.is_file() and f.stat().st_size > 1000:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
    model, step = checkpoint.load_model(w)
    assert step == 2
    assert any("step 4 is unreadable" in r.message for r in caplog.records)
    with pytest.raises(checkpoint.CheckpointError, match="no step 3"):
        checkpoint.load_model(w, step=3)


def checkpoint_steps(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def logged_step(out: str, pattern: str, process: int | None = None) -> int:
    """The step in the first log line matching ``pattern`` (of process ``process``'s lines, as
    launch/local.sh prefixes them)."""
    prefix = r"^.*" if process is None else rf"^\[p{process}\] .*"
    found = re.search(prefix + pattern, out, re.M)
    assert found, out[-3000:]
    return int(found.group(1))


SIGNAL_AT = r"SIG(?:TERM|INT) received at step (\d+)"
STOPPED_AT = r"stopping at step (\d+): checkpoint written"


def test_sigterm_saves_within_one_step_and_exits(dataset, tmp_path):
    """SIGTERM between logging steps: the run saves the step it reached (or the next) and exits 75
    (EXIT_PREEMPTED: not finished, start again). log_every is larger than the run, so a check on
    logging steps only would never stop it."""
    cfg = write_config(
        tmp_path / "c.yaml",
        dataset,
        num_steps=10_000,
        log_every=100_000,
        checkpoint={"every": 3, "keep": 10_000},
    )
    w = tmp_path / "w"
    proc = subprocess.Popen(
        ESMJAX + ["train", "--no-progress", "--config", str(cfg), "--workdir", str(w)],
        env=env(1),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen = wait_for_checkpoint(w, proc, 3)
    time.sleep(np.random.default_rng(5).uniform(0, 0.5))  # at a step between two saves
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED == 75, out[-3000:]
    reached, stopped = logged_step(out, SIGNAL_AT), logged_step(out, STOPPED_AT)
    assert seen <= reached <= stopped <= reached + 1, (seen, reached, stopped)
    assert checkpoint_steps(w)[-1] == stopped
    assert "Traceback" not in out, out[-3000:]


def test_sigint_twice_aborts():
    """SIGINT sets the same flag as SIGTERM (the loop treats both alike); a second SIGINT aborts
    at once with KeyboardInterrupt. The previous handlers come back afterwards."""
    before = signal.getsignal(signal.SIGINT)
    stop = StopSignal()
    try:
        stop.step = 7
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.flag
        os.kill(os.getpid(), signal.SIGTERM)  # again, but not SIGINT: logged, nothing else
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGINT) is before


def test_loss_falls_on_bundled_data(tmp_path, capsys):
    """A shortened demo run (configs/demo.yaml, fewer and smaller steps) on the bundled CATH
    sample."""
    ds = tmp_path / "ds"
    build_dataset([ROOT / "data" / "cath_s20.fa.gz"], ds, val_fraction=0.02)
    w = tmp_path / "demo"
    over = [
        "--set",
        f"data.train={ds}",
        "--set",
        "num_steps=30",
        "--set",
        "data.tokens_per_step=2048",
        "--set",
        "data.seq_len=128",
        "--set",
        "optim.warmup_steps=5",
        "--set",
        "eval_every=0",
        "--set",
        "log_every=1",
        "--set",
        "data.eval_tokens=8192",
    ]
    demo = ["--config", str(ROOT / "configs" / "demo.yaml"), "--workdir", str(w), *over]
    assert cli(["train", "--no-progress", *demo]) == 0
    curve = losses(w)
    first, last = (
        np.mean([curve[s] for s in range(1, 4)]),
        np.mean([curve[s] for s in range(28, 31)]),
    )
    assert last < first - 0.2, (first, last)
    assert "held-out masked-LM perplexity" in capsys.readouterr().out


def test_training_eval_is_evaluate_perplexity(dataset, tmp_path):
    """Training's held-out evaluation and ``esmjax evaluate perplexity`` are one computation: at the
    final checkpoint of a run they report the same perplexity, to the last digit (same devices,
    rules and rows per batch)."""
    cfg = write_config(tmp_path / "c.yaml", dataset, num_steps=2, log_every=1)
    w = tmp_path / "w"
    assert cli(["train", "--no-progress", "--config", str(cfg), "--workdir", str(w)]) == 0
    rows = [json.loads(x) for x in (w / "metrics.jsonl").read_text().splitlines()]
    at_train = [r for r in rows if "eval_perplexity" in r][-1]
    assert at_train["step"] == 2
    # 2048 tokens per step / 64 per row = 32 rows, the micro-batch training evaluates with.
    ev = ["evaluate", "perplexity", "--checkpoint", str(w), "--rows", "32"]
    assert cli([*ev, "--no-progress", "--out", str(tmp_path / "ev")]) == 0
    report = json.loads((tmp_path / "ev" / "perplexity.json").read_text())
    ml = report["results"]["masked_lm"]
    assert ml["masked_tokens"] == at_train["eval_masked_tokens"]
    assert ml["perplexity"] == at_train["eval_perplexity"]
    assert ml["unigram_perplexity"] == at_train["eval_unigram_perplexity"]


def test_restart_finds_the_compilation_cache(dataset, tmp_path):
    """``compile_cache: auto`` (no JAX_COMPILATION_CACHE_DIR set): the first start fills
    <workdir>/compile_cache; a restart (here: resuming to more steps) reports the programs it finds
    there and compiles nothing new into it."""
    cfg = write_config(tmp_path / "c.yaml", dataset, num_steps=1)
    w = tmp_path / "w"
    e = {**env(1), "ESMJAX_LOG": "INFO"}
    e.pop("JAX_COMPILATION_CACHE_DIR", None)
    base = ESMJAX + ["train", "--no-progress", "--config", str(cfg), "--workdir", str(w)]
    first = subprocess.run(base, env=e, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert f"compilation cache {w}/compile_cache: 0 compiled programs" in first.stderr

    def programs():
        return sorted(p.name for p in (w / "compile_cache").iterdir() if p.name.endswith("-cache"))

    cached = programs()
    assert any(n.startswith("jit_step-") for n in cached), cached  # the train step
    again = subprocess.run(
        [*base, "--set", "num_steps=2"],
        env=e,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    found = [ln for ln in again.stderr.splitlines() if "compilation cache" in ln]
    assert found and f": {len(cached)} compiled programs" in found[0], found
    assert programs() == cached
    assert losses(w).keys() == {1, 2}
