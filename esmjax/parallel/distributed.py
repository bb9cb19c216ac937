"""Multi-process start-up: which processes form the job, and which accelerators each one drives.

The process model is one process per host (a GPU node, a TPU VM), driving every accelerator of
its host; one process per GPU also works where a scheduler asks for it. What this module decides
(:func:`start_args`), by the first match:

1. Explicit ``--coordinator-address/--num-processes/--process-id``, or the ``ESMJAX_COORDINATOR``,
   ``ESMJAX_NUM_PROCESSES``, ``ESMJAX_PROCESS_ID`` variables (``launch/local.sh``, the Kubernetes
   JobSet). On Kubernetes the process id is ``JOBSET_JOB_INDEX * ESMJAX_PROCESSES_PER_JOB +
   JOB_COMPLETION_INDEX`` (a JobSet's replicated Jobs each number their pods from 0, so the
   completion index alone repeats across replicas). JAX's own cluster detection is turned off
   here, so that nothing it finds overrides what was given.
2. SLURM (``srun``, more than one task): JAX's detection gives the coordinator (the first node)
   and the process ids, but it gives each task the one GPU numbered ``SLURM_LOCALID``, which for
   the one-task-per-node launcher is GPU 0 of 8. The GPUs are passed explicitly instead
   (:func:`slurm_local_device_ids`): all that SLURM made visible to the task when it is alone on
   its node, its share of them otherwise.
3. A Cloud TPU VM (a TPU chip on the PCI bus, or the GKE / multi-slice variables):
   ``jax.distributed.initialize()`` without arguments, always, as MaxText does. JAX finds a plain
   TPU VM's workers through the metadata server and a GKE pod's through ``TPU_WORKER_HOSTNAMES``;
   a single-host VM becomes a job of one process. Without it a pod's hosts would run as unrelated
   single processes, and Orbax's multi-process checkpointing would fail.
4. Otherwise a single process: nothing is started.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax

from esmjax.errors import InputError

log = logging.getLogger(__name__)


class LaunchError(InputError):
    """A scheduler environment that does not describe a job esmjax can start."""


def _tpu_pod_env(env: Mapping[str, str]) -> bool:
    return bool(env.get("TPU_WORKER_HOSTNAMES") or env.get("MEGASCALE_COORDINATOR_ADDRESS"))


# TPU chips on the PCI bus: Google's vendor id and the TPU device ids (v3, v4, v5p, v5e, v6e, 7x),
# as JAX itself counts chips (jax._src.hardware_utils); other Google devices (gVNIC) do not count.
_GOOGLE_PCI_VENDOR = "0x1ae0"
_TPU_PCI_DEVICES = {"0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076"}


def tpu_vm_detected(env: Mapping[str, str] | None = None, sys_root: str | Path = "/") -> bool:
    """True on a Cloud TPU VM: the pod / GKE variables that ``initialize`` detects, or a TPU chip
    on the PCI bus (``<sys_root>/sys/bus/pci/devices/*/{vendor,device}``), which a single-host TPU
    VM has without any variable."""
    if _tpu_pod_env(os.environ if env is None else env):
        return True
    for vendor in Path(sys_root, "sys/bus/pci/devices").glob("*/vendor"):
        try:
            if vendor.read_text().strip() != _GOOGLE_PCI_VENDOR:
                continue
            if (vendor.parent / "device").read_text().strip() in _TPU_PCI_DEVICES:
                return True
        except OSError:
            continue
    return False


def slurm_tasks_on_node(env: Mapping[str, str]) -> int:
    """Tasks of this job step on this node: ``SLURM_TASKS_PER_NODE`` lists them per node in the
    compressed form ``8(x2),4`` (``SLURM_NODEID`` picks the entry); 1 when SLURM says nothing."""
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if not spec:
        return int(env.get("SLURM_NTASKS_PER_NODE", "1") or 1)
    counts: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if m is None:
            raise LaunchError(f"SLURM_TASKS_PER_NODE={spec!r}: not SLURM's 'N(xM),...' form")
        counts += [int(m[1])] * int(m[2] or 1)
    node = int(env.get("SLURM_NODEID", "0") or 0)
    return counts[min(node, len(counts) - 1)]


def slurm_local_device_ids(env: Mapping[str, str]) -> list[int] | None:
    """The GPUs (indices among those visible to the task) that this SLURM task drives; None
    when SLURM gave the task no GPU (a CPU job: nothing to choose).

    The task sees ``CUDA_VISIBLE_DEVICES`` (SLURM sets it for GPU jobs; ``SLURM_GPUS_ON_NODE``
    counts them otherwise). Alone on its node it takes them all; with one GPU it takes that
    one (``--gpus-per-task=1`` binds one GPU to each task); when the node's tasks all see the same
    GPUs they split them in ``SLURM_LOCALID`` order.
    """
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible not in (None, ""):
        n = len([d for d in visible.split(",") if d.strip()])
    elif env.get("SLURM_GPUS_ON_NODE"):
        n = int(env["SLURM_GPUS_ON_NODE"])
    else:
        return None
    if n == 0:
        return None
    tasks = slurm_tasks_on_node(env)
    local = int(env.get("SLURM_LOCALID", "0") or 0)
    if tasks == 1 or n == 1:
        return list(range(n))
    if n % tasks:
        raise LaunchError(
            f"SLURM runs {tasks} tasks on this node, which all see {n} GPUs: they do not split "
            "evenly; run one task per node (launch/slurm.sbatch) or one per GPU"
        )
    per = n // tasks
    return list(range(local * per, (local + 1) * per))


def kubernetes_process_id(env: Mapping[str, str]) -> int | None:
    """``JOBSET_JOB_INDEX * ESMJAX_PROCESSES_PER_JOB + JOB_COMPLETION_INDEX`` (None without an
    indexed Job): unique over a JobSet's replicas x parallelism."""
    index = _int(env.get("JOB_COMPLETION_INDEX"))
    if index is None:
        return None
    job = _int(env.get("JOBSET_JOB_INDEX")) or 0
    per_job = _int(env.get("ESMJAX_PROCESSES_PER_JOB"))
    if job and per_job is None:
        raise LaunchError(
            f"JOBSET_JOB_INDEX={job}: set ESMJAX_PROCESSES_PER_JOB to the Job's parallelism, "
            "so that the process ids of the JobSet's replicas do not collide"
        )
    if per_job is not None and not 0 <= index < per_job:
        raise LaunchError(
            f"JOB_COMPLETION_INDEX={index} is not below ESMJAX_PROCESSES_PER_JOB={per_job}"
        )
    return job * (per_job or 0) + index


def _slurm_job(env: Mapping[str, str]) -> bool:
    return (
        "SLURM_PROCID" in env
        and "SLURM_JOB_ID" in env
        and int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1")) or 1) > 1
    )


def start_args(
    env: Mapping[str, str],
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    on_tpu_vm: bool = False,
) -> tuple[str, dict[str, Any]] | None:
    """``(how, kwargs for jax.distributed.initialize)``, or None for a single process (see the
    module docstring for the order of the rules)."""
    coordinator = coordinator or env.get("ESMJAX_COORDINATOR") or None
    if num_processes is None:
        num_processes = _int(env.get("ESMJAX_NUM_PROCESSES"))
    if process_id is None:
        process_id = _int(env.get("ESMJAX_PROCESS_ID"))
    if coordinator and (num_processes or 1) > 1:
        if process_id is None:
            process_id = kubernetes_process_id(env)
        if process_id is None:
            raise LaunchError(
                f"coordinator {coordinator} for {num_processes} processes, but no process id: "
                "pass --process-id or set ESMJAX_PROCESS_ID"
            )
        if not 0 <= process_id < num_processes:
            raise LaunchError(f"process id {process_id} is not in [0, {num_processes})")
        kwargs = dict(
            coordinator_address=coordinator,
            num_processes=num_processes,
            process_id=process_id,
            cluster_detection_method="deactivate",
        )
        return "explicit", kwargs
    if _slurm_job(env):
        return "SLURM", {"local_device_ids": slurm_local_device_ids(env)}
    if on_tpu_vm:
        return "Cloud TPU", {}
    return None


def initialize(
    coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> None:
    """Joins the job this process belongs to (:func:`start_args`), then logs what it drives."""
    start = start_args(
        os.environ, coordinator, num_processes, process_id, on_tpu_vm=tpu_vm_detected()
    )
    if start is not None:
        how, kwargs = start
        log.info("starting jax.distributed (%s)", how)
        jax.distributed.initialize(**kwargs)
    log.info(
        "process %d of %d: %d local / %d global devices (%s)",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
        jax.local_devices()[0].device_kind,
    )


def _int(v: str | None) -> int | None:
    return int(v) if v not in (None, "") else None
