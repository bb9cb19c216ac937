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

import jax
import numpy as np
import pytest
from flax import nnx

from esmjax.data.build import build_dataset
from esmjax.io import checkpoint
from esmjax.io.fasta import read_fasta
from esmjax.train.preemption import StopSignal

ROOT = Path(__file__).resolve().parents[1]
ESMJAX = [sys.executable, "-m", "esmjax.cli"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, shared_data):
    d = tmp_path_factory.mktemp("train_data")
    fa = d / "small.fa"
    with open(fa, "w") as f:
        for i, r in enumerate(
            read_fasta(shared_data / "cath_s20" / "cath-dataset-nonredundant-S20-v4_3_0.fa")
        ):
            if i == 800:
                break
            f.write(f">{r.id}\n{r.sequence}\n")
    build_dataset([fa], d / "ds", val_fraction=0.05)
    return d / "ds"


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


@pytest.mark.multiprocess
def test_two_processes_killed_then_resumed_on_one(dataset, tmp_path):
    """2 processes x 2 devices train and checkpoint; killed (-9, whole process group) mid-run, the
    run resumes as 1 process x 4 devices and its losses match the uninterrupted 2-process run."""
    cfg = write_config(tmp_path / "c.yaml", dataset, num_steps=12, data={"tokens_per_step": 8192})
    full = tmp_path / "full"
    r = train(["--config", str(cfg), "--workdir", str(full)], devices=2, processes=2, check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ref = losses(full)
    assert sorted(ref) == list(range(1, 13))
    assert (
        sorted(int(p.name) for p in (full / "checkpoints").iterdir() if p.name.isdigit())[-1] == 12
    )

    killed = tmp_path / "killed"
    cmd = [
        str(ROOT / "launch" / "local.sh"),
        "2",
        "2",
        *ESMJAX,
        "train",
        "--no-progress",
        "--config",
        str(cfg),
        "--workdir",
        str(killed),
    ]
    proc = subprocess.Popen(
        cmd,
        env=env(2),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    wait_for_checkpoint(killed, proc, 4)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(0.5)
    committed = max(int(p.name) for p in (killed / "checkpoints").iterdir() if p.name.isdigit())
    assert 4 <= committed < 12
    r = train(
        ["--workdir", str(killed)], devices=4, check=False
    )  # the saved config, another process count
    assert r.returncode == 0, r.stderr[-3000:]
    resumed = losses(killed)
    assert sorted(resumed) == list(range(1, 13))
    for step in range(1, 13):
        assert abs(resumed[step] - ref[step]) < 1e-5, (step, resumed[step], ref[step])


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
    train(["--config", str(cfg), "--workdir", str(w)])
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
    """SIGTERM between logging steps: the run saves the step it reached (or the next) and exits 0.
    log_every is larger than the run, so a check on logging steps only would never stop it."""
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
    assert proc.returncode == 0, out[-3000:]
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


def descendant_with_env(root: int, key: str, value: str) -> int:
    """The pid of the process under ``root`` whose environment has ``key=value`` and that runs
    Python (launch/local.sh's subshells and sed share the environment)."""
    want = f"{key}={value}".encode()
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    todo, found = [root], []
    while todo:
        pid = todo.pop()
        for c in children.get(pid, []):
            todo.append(c)
            try:
                environ = (Path("/proc") / str(c) / "environ").read_bytes().split(b"\0")
                exe = os.readlink(f"/proc/{c}/exe")
            except OSError:
                continue
            if want in environ and "python" in Path(exe).name:
                found.append(c)
    assert len(found) == 1, found
    return found[0]


@pytest.mark.multiprocess
def test_two_processes_sigterm_to_one(dataset, tmp_path):
    """2 processes, log_every larger than the run; SIGTERM to ONE of them at a random step (seeded:
    which process, and when, in units of the measured step time). Both save the same step, within
    one step of where the signal found the signalled process, and exit 0; the resumed run ends
    with the parameters and final loss of an uninterrupted run."""
    rng = np.random.default_rng(11)
    target, delay_steps = int(rng.integers(2)), float(rng.uniform(0.0, 3.0))
    num_steps = 40
    cfg = write_config(
        tmp_path / "c.yaml",
        dataset,
        num_steps=num_steps,
        log_every=1000,
        checkpoint={"every": 2, "keep": 1000},
    )
    full = tmp_path / "full"  # the reference on one process with the same 2 devices (faster)
    r = train(["--config", str(cfg), "--workdir", str(full)], devices=2, check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    cut = tmp_path / "cut"
    cmd = [str(ROOT / "launch" / "local.sh"), "2", "1", *ESMJAX, "train", "--no-progress"]
    proc = subprocess.Popen(
        [*cmd, "--config", str(cfg), "--workdir", str(cut)],
        env=env(1),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        first = wait_for_checkpoint(cut, proc, 2)
        t = time.time()
        seen = wait_for_checkpoint(cut, proc, first + 2)
        step_seconds = (time.time() - t) / (seen - first)
        time.sleep(delay_steps * step_seconds)  # a random point of the next few steps
        os.kill(descendant_with_env(proc.pid, "ESMJAX_PROCESS_ID", str(target)), signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out[-3000:]  # local.sh: 0 only when both processes exit 0
    reached = logged_step(out, SIGNAL_AT, target)
    stopped = logged_step(out, STOPPED_AT, target)
    assert seen <= reached <= stopped <= reached + 1 < num_steps, (seen, reached, stopped)
    assert logged_step(out, STOPPED_AT, 1 - target) == stopped  # the other process agreed
    assert checkpoint_steps(cut)[-1] == stopped

    r = train(["--workdir", str(cut)], processes=2, check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert sorted(losses(cut)) == sorted(losses(full)) == [num_steps]
    # the tolerance of the other multi-process resume test (another process count than the cut run)
    assert abs(losses(cut)[num_steps] - losses(full)[num_steps]) < 1e-5
    a, _ = checkpoint.load_model(full)
    b, _ = checkpoint.load_model(cut)
    for (path, x), (_, y) in zip(
        jax.tree_util.tree_leaves_with_path(nnx.state(a)),
        jax.tree_util.tree_leaves_with_path(nnx.state(b)),
    ):
        np.testing.assert_allclose(
            np.asarray(y), np.asarray(x), rtol=0, atol=1e-5, err_msg=str(path)
        )


def test_loss_falls_on_bundled_data(tmp_path):
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
    r = train(
        ["--config", str(ROOT / "configs" / "demo.yaml"), "--workdir", str(w), *over], check=False
    )
    assert r.returncode == 0, r.stderr[-3000:]
    curve = losses(w)
    first, last = (
        np.mean([curve[s] for s in range(1, 4)]),
        np.mean([curve[s] for s in range(28, 31)]),
    )
    assert last < first - 0.2, (first, last)
    assert "held-out masked-LM perplexity" in r.stdout


def test_training_eval_is_evaluate_perplexity(dataset, tmp_path):
    """Training's held-out evaluation and ``esmjax evaluate perplexity`` are one computation: at the
    final checkpoint of a run they report the same perplexity, to the last digit (same devices,
    rules and rows per batch)."""
    cfg = write_config(tmp_path / "c.yaml", dataset, num_steps=2, log_every=1)
    w = tmp_path / "w"
    train(["--config", str(cfg), "--workdir", str(w)])
    rows = [json.loads(x) for x in (w / "metrics.jsonl").read_text().splitlines()]
    at_train = [r for r in rows if "eval_perplexity" in r][-1]
    assert at_train["step"] == 2
    # 2048 tokens per step / 64 per row = 32 rows, the micro-batch training evaluates with.
    cmd = ESMJAX + ["evaluate", "perplexity", "--checkpoint", str(w), "--rows", "32"]
    cmd += ["--no-progress", "--out", str(tmp_path / "ev")]
    subprocess.run(cmd, env=env(1), cwd=ROOT, check=True, capture_output=True, timeout=600)
    report = json.loads((tmp_path / "ev" / "perplexity.json").read_text())
    ml = report["results"]["masked_lm"]
    assert ml["masked_tokens"] == at_train["eval_masked_tokens"]
    assert ml["perplexity"] == at_train["eval_perplexity"]
    assert ml["unigram_perplexity"] == at_train["eval_unigram_perplexity"]
