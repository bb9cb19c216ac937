"""Training on 2 processes (``launch/local.sh`` on 127.0.0.1, CPU collectives): killed with -9
and resumed on one process, and SIGTERM to one of the two processes. Split from test_train_loop.py
(whose helpers these use) so that the two longest tests of the suite run on another pytest-xdist
worker than the rest of the training-loop tests."""

import os
import signal
import subprocess
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from test_train_loop import (
    ESMJAX,
    ROOT,
    SIGNAL_AT,
    STOPPED_AT,
    checkpoint_steps,
    env,
    logged_step,
    losses,
    start_two_processes,
    train,
    wait_for_checkpoint,
    write_config,
)

from esmjax.io import checkpoint


def every_process_wrote(workdir: Path, step: int, out: str, processes: int = 2) -> None:
    """Besides launch/local.sh's status (tests/test_launch_local.py): each process wrote its part
    of step ``step``'s checkpoint (Orbax's OCDBT writes a folder per process), and none printed a
    traceback, so that a process that crashed cannot pass."""
    params = workdir / "checkpoints" / str(step) / "params"
    wrote = sorted(p.name for p in params.glob("ocdbt.process_*"))
    assert wrote == [f"ocdbt.process_{i}" for i in range(processes)], (wrote, out[-3000:])
    assert "Traceback" not in out, out[-3000:]


# slow (50-100 s): the default suite runs the same sequence against a bucket (2 processes killed
# with -9, resumed on one, losses equal within 1e-5: tests/test_buckets.py::test_bucket_end_to_end)
@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_killed_then_resumed_on_one(dataset, tmp_path):
    """2 processes x 2 devices train and checkpoint; killed (-9, whole process group) mid-run, the
    run resumes as 1 process x 4 devices and its losses match the uninterrupted 2-process run."""
    cfg = write_config(tmp_path / "c.yaml", dataset, num_steps=12, data={"tokens_per_step": 8192})
    full = tmp_path / "full"
    r = train(["--config", str(cfg), "--workdir", str(full)], devices=2, processes=2, check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    every_process_wrote(full, 12, r.stdout + r.stderr)
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


# slow (60-120 s): the default suite stops a 4-process pod by signal and resumes it exactly
# (tests/test_multihost.py::test_pod_run_preempted_requeued_and_resumed_matches_one_process), and
# agrees a stop across 2 processes (tests/test_faults_train.py, the non-finite loss)
@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_sigterm_to_one(dataset, tmp_path):
    """2 processes, log_every larger than the run; SIGTERM to ONE of them at a random step (seeded:
    which process, and when, in units of the measured step time). Both save the same step, within
    one step of where the signal found the signalled process, and exit 75; the resumed run ends
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
    proc = start_two_processes(cfg, cut)
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
    # local.sh: 75 when both processes stopped with the checkpoint (EXIT_PREEMPTED), none failed
    assert proc.returncode == 75, out[-3000:]
    reached = logged_step(out, SIGNAL_AT, target)
    stopped = logged_step(out, STOPPED_AT, target)
    assert seen <= reached <= stopped <= reached + 1 < num_steps, (seen, reached, stopped)
    assert logged_step(out, STOPPED_AT, 1 - target) == stopped  # the other process agreed
    assert checkpoint_steps(cut)[-1] == stopped
    every_process_wrote(cut, stopped, out)

    r = train(["--workdir", str(cut)], processes=2, check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    every_process_wrote(cut, num_steps, r.stdout + r.stderr)
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
