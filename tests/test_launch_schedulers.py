"""The launchers and the process start-up under simulated schedulers (no JAX job is started here;
tests/test_multihost.py runs real multi-process jobs through them).

- SLURM: the environment slurmstepd gives each task, for 1 and 8 tasks per node, checked against
  JAX's own SLURM detection (``ClusterEnv.auto_detect_unset_distributed_params``) with and without
  the GPUs esmjax passes; ``launch/slurm.sbatch`` run by bash with ``srun``/``scontrol`` stubs
  (tests/launch_stubs) and a stand-in ``esmjax`` that exits with a chosen status.
- Cloud TPU VMs: a TPU chip on the PCI bus (a fake ``/sys`` tree) with none of the pod variables,
  which is what a plain TPU VM host looks like before JAX asks the metadata server.
- ``launch/tpu_pod.sh`` with a ``gcloud`` stub whose ssh exits with chosen statuses.
"""

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from esmjax.parallel import distributed
from esmjax.parallel.xla_flags import flags

ROOT = Path(__file__).resolve().parents[1]
STUBS = ROOT / "tests" / "launch_stubs"


def slurm_task_env(rank: int, nodes: int, per_node: int, gpus_visible: str | None) -> dict:
    node, local = divmod(rank, per_node)
    env = {
        "SLURM_JOB_ID": "123456",
        "SLURM_STEP_NODELIST": "gpu[001-016]",
        "SLURM_NTASKS": str(nodes * per_node),
        "SLURM_PROCID": str(rank),
        "SLURM_LOCALID": str(local),
        "SLURM_NODEID": str(node),
        "SLURM_TASKS_PER_NODE": f"{per_node}(x{nodes})",
        "SLURM_GPUS_ON_NODE": "8",
    }
    if gpus_visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpus_visible
    return env


def jax_detection(monkeypatch, env: dict, local_device_ids):
    """What jax.distributed.initialize would be given after JAX's own cluster detection."""
    from jax._src import clusters

    for k in list(os.environ):
        if k.startswith(("SLURM_", "CUDA_VISIBLE", "TPU_", "MEGASCALE", "JOB_COMPLETION")):
            monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return clusters.ClusterEnv.auto_detect_unset_distributed_params(
        None, None, None, local_device_ids, None, None
    )


def test_slurm_one_task_per_node_drives_all_eight_gpus(monkeypatch):
    env = slurm_task_env(9, nodes=16, per_node=1, gpus_visible="0,1,2,3,4,5,6,7")
    how, kwargs = distributed.start_args(env)
    assert how == "SLURM" and kwargs == {"local_device_ids": list(range(8))}
    coordinator, n, pid, local = jax_detection(monkeypatch, env, kwargs["local_device_ids"])
    assert (coordinator.split(":")[0], n, pid, list(local)) == ("gpu001", 16, 9, list(range(8)))
    # what JAX alone does with the same environment: GPU 0 of 8 (the bug this guards against)
    assert list(jax_detection(monkeypatch, env, None)[3]) == [0]


def test_slurm_eight_tasks_per_node_one_gpu_each(monkeypatch):
    # --gpus-per-task=1: SLURM binds one GPU to each task, which sees it as its only device
    for rank in (0, 5, 13):
        env = slurm_task_env(rank, nodes=2, per_node=8, gpus_visible=str(rank % 8))
        assert distributed.start_args(env)[1] == {"local_device_ids": [0]}
    # every task of the node sees all 8 GPUs: each takes the one of its local id
    env = slurm_task_env(13, nodes=2, per_node=8, gpus_visible="0,1,2,3,4,5,6,7")
    ids = distributed.start_args(env)[1]["local_device_ids"]
    assert ids == [5]
    assert list(jax_detection(monkeypatch, env, ids)[3]) == [5]


def test_slurm_tasks_per_node_forms():
    assert (
        distributed.slurm_tasks_on_node({"SLURM_TASKS_PER_NODE": "4(x2),2", "SLURM_NODEID": "2"})
        == 2
    )
    assert (
        distributed.slurm_tasks_on_node({"SLURM_TASKS_PER_NODE": "4(x2),2", "SLURM_NODEID": "1"})
        == 4
    )
    assert distributed.slurm_tasks_on_node({}) == 1
    env = slurm_task_env(0, nodes=1, per_node=3, gpus_visible="0,1,2,3,4,5,6,7")
    with pytest.raises(distributed.LaunchError, match="do not split evenly"):
        distributed.start_args(env)
    # a CPU-only job: SLURM gave no GPU, nothing to choose
    env = slurm_task_env(1, nodes=2, per_node=1, gpus_visible=None)
    del env["SLURM_GPUS_ON_NODE"]
    assert distributed.start_args(env) == ("SLURM", {"local_device_ids": None})


def test_single_slurm_task_starts_nothing():
    env = slurm_task_env(0, nodes=1, per_node=1, gpus_visible="0,1,2,3,4,5,6,7")
    env["SLURM_NTASKS"] = "1"
    assert distributed.start_args(env) is None


def _pci(root: Path, name: str, vendor: str, device: str) -> None:
    d = root / "sys/bus/pci/devices" / name
    d.mkdir(parents=True)
    (d / "vendor").write_text(vendor + "\n")
    (d / "device").write_text(device + "\n")


def test_plain_tpu_vm_starts_jax_distributed(tmp_path, monkeypatch):
    """A host of a Cloud TPU VM slice has a TPU chip and none of the GKE / multi-slice variables:
    esmjax must still call jax.distributed.initialize() (without arguments: JAX reads the hosts
    from the metadata server). The call is recorded instead of made: there is no metadata server
    here."""
    _pci(tmp_path, "0000:00:05.0", "0x1ae0", "0x0062")  # a TPU v5p chip
    for var in ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    for var in ("ESMJAX_COORDINATOR", "ESMJAX_NUM_PROCESSES", "ESMJAX_PROCESS_ID"):
        monkeypatch.delenv(var, raising=False)
    assert distributed.tpu_vm_detected({}, tmp_path)
    assert distributed.start_args({}, on_tpu_vm=True) == ("Cloud TPU", {})
    calls = []
    monkeypatch.setattr(distributed, "tpu_vm_detected", lambda: True)
    monkeypatch.setattr(distributed.jax.distributed, "initialize", lambda **kw: calls.append(kw))
    distributed.initialize()
    assert calls == [{}]
    # a machine without a TPU and without a scheduler starts nothing
    assert distributed.start_args({}, on_tpu_vm=False) is None


def test_explicit_start_wins_and_turns_off_detection():
    env = {"ESMJAX_COORDINATOR": "10.0.0.1:1234", "ESMJAX_NUM_PROCESSES": "4", "SLURM_PROCID": "3"}
    env |= {"ESMJAX_PROCESS_ID": "2", "SLURM_JOB_ID": "1", "SLURM_NTASKS": "8"}
    how, kwargs = distributed.start_args(env)
    assert how == "explicit"
    assert kwargs == dict(
        coordinator_address="10.0.0.1:1234",
        num_processes=4,
        process_id=2,
        cluster_detection_method="deactivate",
    )
    with pytest.raises(distributed.LaunchError, match="not in"):
        distributed.start_args({**env, "ESMJAX_PROCESS_ID": "4"})


# --------------------------------------------------------------------------------------------------
# launch/slurm.sbatch with srun / scontrol stubbed
# --------------------------------------------------------------------------------------------------
def fake_esmjax(bin_dir: Path) -> None:
    """An ``esmjax`` that records its arguments and XLA_FLAGS, then exits $FAKE_ESMJAX_RC; task 1
    ends half a second after task 0, as tasks that stop together do (with srun's
    --kill-on-bad-exit, task 1 would be killed and srun would report 137, not 75)."""
    bin_dir.mkdir(exist_ok=True)
    f = bin_dir / "esmjax"
    f.write_text(
        "#!/usr/bin/env bash\n"
        'echo "$SLURM_PROCID $* | $XLA_FLAGS" >> "$FAKE_ESMJAX_LOG"\n'
        'if [ "$SLURM_PROCID" = 1 ]; then sleep 0.5; fi\n'
        'exit "${FAKE_ESMJAX_RC:-0}"\n'
    )
    f.chmod(f.stat().st_mode | stat.S_IEXEC)


def run_sbatch(tmp_path: Path, rc: int, extra_env: dict | None = None):
    fake_esmjax(tmp_path / "bin")
    env = dict(
        os.environ,
        PATH=f"{tmp_path / 'bin'}:{STUBS}:{Path(sys.executable).parent}:{os.environ['PATH']}",
        SLURM_JOB_ID="777",
        SLURM_JOB_NUM_NODES="2",
        SLURM_NTASKS_PER_NODE="1",
        SCONTROL_STUB_LOG=str(tmp_path / "scontrol.log"),
        SRUN_STUB_LOG=str(tmp_path / "srun.log"),
        FAKE_ESMJAX_LOG=str(tmp_path / "esmjax.log"),
        FAKE_ESMJAX_RC=str(rc),
        XLA_FLAGS="--xla_mine=1",
        **(extra_env or {}),
    )
    cmd = ["bash", str(ROOT / "launch" / "slurm.sbatch"), "cfg.yaml", "runs/x", "--set", "a=b"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    scontrol = (
        (tmp_path / "scontrol.log").read_text() if (tmp_path / "scontrol.log").exists() else ""
    )
    return r, scontrol


def test_sbatch_requeues_a_preempted_run(tmp_path):
    r, scontrol = run_sbatch(tmp_path, 75)
    assert r.returncode == 0, r.stderr
    assert scontrol == "requeue 777\n"
    assert "requeueing job 777" in r.stderr
    lines = sorted((tmp_path / "esmjax.log").read_text().splitlines())
    assert [ln.split()[0] for ln in lines] == ["0", "1"]  # one task per node, both ran
    args, xla = lines[0].split(" | ")
    assert args == "0 train --config cfg.yaml --workdir runs/x --no-progress --set a=b"
    assert xla.startswith(flags("gpu")[1]) and xla.endswith("--xla_mine=1")  # yours come last
    assert (tmp_path / "srun.log").read_text().startswith("2 esmjax train")


@pytest.mark.parametrize("rc", [0, 1, 2])
def test_sbatch_does_not_requeue_a_finished_or_failed_run(tmp_path, rc):
    r, scontrol = run_sbatch(tmp_path, rc)
    assert r.returncode == rc, r.stderr
    assert scontrol == ""


# --------------------------------------------------------------------------------------------------
# launch/tpu_pod.sh with gcloud stubbed
# --------------------------------------------------------------------------------------------------
def fake_gcloud(bin_dir: Path) -> None:
    """``gcloud``: ``ssh`` records its --command and exits with the next status of
    $GCLOUD_SSH_RCS (space-separated, one per call); ``describe`` prints the next state of
    $GCLOUD_STATES (the last one repeats)."""
    bin_dir.mkdir(exist_ok=True)
    f = bin_dir / "gcloud"
    f.write_text(
        "#!/usr/bin/env bash\n"
        "log=$GCLOUD_LOG; kind=other\n"
        'for a in "$@"; do case $a in ssh) kind=ssh;; describe) kind=describe;; esac; done\n'
        "if [ $kind = ssh ]; then\n"
        '  printf "%s" "${@: -1}" > "$log.command"\n'
        '  n=$(grep -c ^ssh "$log" 2>/dev/null); set -- $GCLOUD_SSH_RCS\n'
        '  shift "$n"; echo ssh >> "$log"; exit "${1:-0}"\n'
        "fi\n"
        "if [ $kind = describe ]; then\n"
        '  n=$(grep -c ^describe "$log" 2>/dev/null); echo describe >> "$log"\n'
        '  set -- $GCLOUD_STATES; last=${!#}; shift "$n" 2>/dev/null || true\n'
        '  echo "${1:-$last}"; exit 0\n'
        "fi\n"
    )
    f.chmod(f.stat().st_mode | stat.S_IEXEC)


def run_tpu_pod(tmp_path: Path, ssh_rcs: str, states: str = "READY"):
    fake_gcloud(tmp_path / "bin")
    env = dict(
        os.environ,
        PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}",
        TPU_NAME="esm-v5p-16",
        ZONE="us-east5-a",
        GCLOUD_LOG=str(tmp_path / "gcloud.log"),
        GCLOUD_SSH_RCS=ssh_rcs,
        GCLOUD_STATES=states,
        ESMJAX_POLL_SECONDS="0",
    )
    cmd = ["bash", str(ROOT / "launch" / "tpu_pod.sh"), "c.yaml", "gs://b/run"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    log = (tmp_path / "gcloud.log").read_text().split()
    return r, log


def test_tpu_pod_restarts_a_preempted_run(tmp_path):
    r, log = run_tpu_pod(tmp_path, "75 75 0")
    assert r.returncode == 0, r.stderr
    assert log == ["ssh", "ssh", "ssh"]
    assert "restart 2: resuming" in r.stderr
    remote = (tmp_path / "gcloud.log.command").read_text()  # what every host runs
    assert "pip install -q -e '.[tpu,gcs]'" in remote
    assert 'LIBTPU_INIT_ARGS="$(.venv/bin/python -m esmjax.parallel.xla_flags tpu) ' in remote
    assert "esmjax train --config c.yaml --workdir gs://b/run --no-progress" in remote


def test_tpu_pod_waits_for_lost_hosts_then_restarts(tmp_path):
    r, log = run_tpu_pod(tmp_path, "255 0", states="PREEMPTED PREEMPTED READY")
    assert r.returncode == 0, r.stderr
    assert log == ["ssh", "describe", "describe", "describe", "ssh"]


def test_tpu_pod_stops_on_an_error(tmp_path):
    r, log = run_tpu_pod(tmp_path, "2 0")
    assert r.returncode == 2
    assert log == ["ssh", "describe"]
