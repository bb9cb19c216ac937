"""Multi-process start-up: ``jax.distributed.initialize`` from flags, or detected from the cluster
environment.

Explicit ``--coordinator-address/--num-processes/--process-id`` (or the ``ESMJAX_COORDINATOR``,
``ESMJAX_NUM_PROCESSES``, ``ESMJAX_PROCESS_ID`` variables that ``launch/local.sh`` sets; a
Kubernetes indexed Job's ``JOB_COMPLETION_INDEX`` serves as the process id) win. Otherwise JAX's own
detection handles SLURM (``srun``), Cloud TPU pods and Kubernetes JobSets / indexed Jobs; a plain
single process starts nothing.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import jax

log = logging.getLogger(__name__)


def _cluster_detected() -> str | None:
    env: Mapping[str, str] = os.environ
    if (
        int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1")) or 1) > 1
        and "SLURM_PROCID" in env
    ):
        return "SLURM"
    if _tpu_pod_env(env):
        return "Cloud TPU"
    if env.get("JOB_COMPLETION_INDEX") is not None and env.get("KUBERNETES_SERVICE_HOST"):
        return "Kubernetes"
    return None


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


def initialize(
    coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> None:
    env = os.environ
    coordinator = coordinator or env.get("ESMJAX_COORDINATOR")
    num_processes = (
        num_processes if num_processes is not None else _int(env.get("ESMJAX_NUM_PROCESSES"))
    )
    process_id = process_id if process_id is not None else _int(env.get("ESMJAX_PROCESS_ID"))
    if process_id is None and coordinator:  # Kubernetes indexed Jobs number their pods
        process_id = _int(env.get("JOB_COMPLETION_INDEX"))
    if coordinator and (num_processes or 1) > 1:
        jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)
    elif (cluster := _cluster_detected()) is not None:
        log.info("detected a %s environment; initialising jax.distributed from it", cluster)
        jax.distributed.initialize()
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
