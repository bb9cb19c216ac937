"""Multi-process jobs on this machine standing in for pods: processes on 127.0.0.1 with CPU
(gloo) collectives, each with its own CPU devices.

- A tensor axis across processes (a 15B ``fsdp_tp`` mesh on a TPU pod with 4 chips per host):
  the processes that hold the same batch rows load the same rows.
- A damaged shard that only one process reads: every process restores the same (older) step.
- The pod run of issue 26: 4 processes as 2 simulated SLURM nodes x 2 tasks (``launch/
  slurm.sbatch`` with tests/launch_stubs' ``srun``/``scontrol``; JAX's own SLURM detection reads
  the task environment), a hybrid mesh with the data axis across the nodes (dcn) and the tensor
  axis across the 2 tasks of a node, SIGTERM to every task, the job requeued by the launcher and
  run again; its losses equal a 1-process run's.

Each run is judged by what it wrote (metrics, checkpoints of every process, log lines of every
process), not only by exit codes.
"""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_train_loop import (
    ESMJAX,
    ROOT,
    checkpoint_steps,
    env,
    losses,
    train,
    wait_for_checkpoint,
    write_config,
)
from test_train_multiprocess import descendant_with_env

STUBS = ROOT / "tests" / "launch_stubs"
TENSOR_ACROSS = {"ici_fsdp": 1, "ici_tensor": 4, "rules": "fsdp_tp"}


def assert_close(got: dict, want: dict, steps) -> None:
    for s in steps:
        assert abs(got[s] - want[s]) < 1e-5, (s, got[s], want[s])


def every_process_saved(workdir: Path, step: int, processes: int) -> None:
    params = workdir / "checkpoints" / str(step) / "params"
    assert sorted(p.name for p in params.glob("ocdbt.process_*")) == [
        f"ocdbt.process_{i}" for i in range(processes)
    ]


def test_tensor_across_two_processes_trains_like_one(dataset, tmp_path):
    """2 processes x 2 devices, tensor=4: each tensor group spans both processes, which hold the
    same rows. (Before: 'Invalid host data' when the first batch was assembled.)"""
    cfg = write_config(tmp_path / "c.yaml", dataset, num_steps=4, mesh=TENSOR_ACROSS)
    one, two = tmp_path / "one", tmp_path / "two"
    train(["--config", str(cfg), "--workdir", str(one)], devices=4)
    r = train(["--config", str(cfg), "--workdir", str(two)], devices=2, processes=2, check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Traceback" not in r.stdout + r.stderr
    assert sorted(losses(two)) == [1, 2, 3, 4]
    assert_close(losses(two), losses(one), range(1, 5))
    every_process_saved(two, 4, 2)


def damage_process_files(workdir: Path, step: int, process: int) -> None:
    """Cuts every data file that ``process`` wrote for ``step``'s parameters to a third."""
    for f in (workdir / "checkpoints" / str(step) / "params" / f"ocdbt.process_{process}").rglob(
        "*"
    ):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])


# slow (about 2 min): the pod-run test below keeps 2-process restores in the default run
@pytest.mark.slow
def test_damaged_shard_on_one_process_every_process_restores_the_same_step(
    dataset,
    tmp_path,
):
    """fsdp over 2 processes x 2 devices: process 1's part of step 4 is damaged, process 0's is
    not. Both take step 2 (process 0 alone would have taken 4: the runs would have diverged), the
    unreadable step is moved aside, and the resumed run's losses equal an uninterrupted run's."""
    mesh = {"ici_fsdp": 4, "rules": "fsdp"}
    short = write_config(tmp_path / "a.yaml", dataset, num_steps=4, mesh=mesh)
    full = write_config(tmp_path / "b.yaml", dataset, num_steps=6, mesh=mesh)
    ref, w = tmp_path / "ref", tmp_path / "w"
    train(["--config", str(full), "--workdir", str(ref)], devices=4)
    train(["--config", str(short), "--workdir", str(w)], devices=2, processes=2)
    every_process_saved(w, 4, 2)
    damage_process_files(w, 4, 1)
    e = dict(env(2), ESMJAX_LOG="INFO")
    cmd = [str(ROOT / "launch" / "local.sh"), "2", "2", *ESMJAX, "train", "--no-progress"]
    r = subprocess.run(
        [*cmd, "--config", str(full), "--workdir", str(w)],
        env=e,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert re.search(r"^\[p1\] .*checkpoint step 4 is unreadable here", out, re.M), out[-3000:]
    assert re.search(r"^\[p0\] .*checkpoint step 4 is unreadable on another process", out, re.M)
    for p in (0, 1):
        assert re.search(rf"^\[p{p}\] .*resumed from step 2$", out, re.M), out[-3000:]
    assert checkpoint_steps(w) == [2, 4, 6]  # step 4 written anew by the resumed run
    assert (w / "checkpoints" / "4.unreadable" / "params").is_dir()  # the damaged one, kept
    assert_close(losses(w), losses(ref), range(1, 7))


def slurm_env(tmp_path: Path, restart: int) -> dict:
    e = env(2)  # JAX_NUM_CPU_DEVICES=2 per task
    e.update(
        ESMJAX_LOG="INFO",
        PATH=f"{STUBS}:{Path(sys.executable).parent}:{os.environ['PATH']}",
        SLURM_JOB_ID="31337",
        SLURM_JOB_NUM_NODES="2",
        SLURM_NTASKS_PER_NODE="2",
        SLURM_RESTART_COUNT=str(restart),
        SCONTROL_STUB_LOG=str(tmp_path / "scontrol.log"),
    )
    return e


def test_pod_run_preempted_requeued_and_resumed_matches_one_process(dataset, tmp_path):
    """The done-when run of issue 26 (see the module docstring)."""
    num_steps = 10
    mesh = {**TENSOR_ACROSS, "dcn_data": 2}  # data across the 2 nodes, tensor across 2 tasks
    cfg = write_config(tmp_path / "c.yaml", dataset, num_steps=num_steps, mesh=mesh)
    ref = tmp_path / "ref"
    train(["--config", str(cfg), "--workdir", str(ref)], devices=8)

    w = tmp_path / "w"
    sbatch = ["bash", str(ROOT / "launch" / "slurm.sbatch"), str(cfg), str(w)]
    proc = subprocess.Popen(
        sbatch,
        env=slurm_env(tmp_path, 0),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        wait_for_checkpoint(w, proc, 2)
        for rank in range(4):  # as slurmstepd delivers --signal=TERM@300 to every task
            os.kill(descendant_with_env(proc.pid, "SLURM_PROCID", str(rank)), signal.SIGTERM)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out[-3000:]
    assert (tmp_path / "scontrol.log").read_text() == "requeue 31337\n", out[-3000:]
    for rank in range(4):  # JAX's SLURM detection joined the 4 tasks into one job
        assert f"process {rank} of 4: 2 local / 8 global devices" in out, out[-3000:]
    assert "mesh {'data': 2, 'fsdp': 1, 'tensor': 4}" in out
    stopped = {int(s) for s in re.findall(r"stopping at step (\d+): checkpoint written", out)}
    assert len(stopped) == 1 and stopped.pop() < num_steps, out[-3000:]
    assert len(re.findall(r"stopping at step \d+: checkpoint written", out)) == 4
    step = checkpoint_steps(w)[-1]
    every_process_saved(w, step, 4)

    r = subprocess.run(
        sbatch, env=slurm_env(tmp_path, 1), cwd=ROOT, capture_output=True, text=True, timeout=600
    )  # the requeued job
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert (tmp_path / "scontrol.log").read_text() == "requeue 31337\n"  # finished: no requeue
    assert len(re.findall(rf"resumed from step {step}$", out, re.M)) == 4, out[-3000:]
    assert "Traceback" not in out
    every_process_saved(w, num_steps, 4)
    got, want = losses(w), losses(ref)
    assert sorted(got) == sorted(want) == list(range(1, num_steps + 1))
    assert_close(got, want, range(1, num_steps + 1))
    config = json.loads((w / "config.json").read_text())
    assert config["mesh"]["dcn_data"] == 2
