"""What JAX runs on, said once at start-up, and two set-ups that are almost always mistakes:
bf16 compute on a CPU backend, and an accelerator that the environment promises but JAX does not
see, which is what a CPU-only ``jaxlib`` gives on a GPU node or TPU VM (install ``esmjax[cuda12]``,
``esmjax[cuda13]`` or ``esmjax[tpu]``; README "Install on a GPU cluster / a TPU VM").

A GPU is expected when SLURM allocated one (``SLURM_JOB_GPUS``, ``SLURM_STEP_GPUS``), when
``CUDA_VISIBLE_DEVICES`` names one, or when an NVIDIA device node exists (``/dev/nvidia0``,
``/dev/nvidiactl``: the same nodes JAX checks); a TPU on a Cloud TPU VM
(``esmjax.parallel.distributed.tpu_vm_detected``). ``JAX_PLATFORMS`` without that accelerator (e.g.
``JAX_PLATFORMS=cpu``, as ``launch/local.sh`` and the tests set) is a deliberate choice and silences
the warning.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax

from esmjax.parallel.distributed import tpu_vm_detected

log = logging.getLogger("esmjax.platform")

_GPU_VARIABLES = ("SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "CUDA_VISIBLE_DEVICES")
_NVIDIA_DEVICE_NODES = ("dev/nvidia0", "dev/nvidiactl")


def expected_accelerator(
    env: Mapping[str, str] | None = None, sys_root: str | Path = "/"
) -> tuple[str, str] | None:
    """``(platform, evidence)`` of the accelerator this host should have, e.g. ``("gpu",
    "SLURM_JOB_GPUS=0,1")`` or ``("tpu", "a Cloud TPU VM")``; None when nothing says so."""
    env = os.environ if env is None else env
    for var in _GPU_VARIABLES:
        value = env.get(var, "").strip()
        if value and value not in ("-1", "NoDevFiles"):
            return "gpu", f"{var}={value}"
    for node in _NVIDIA_DEVICE_NODES:
        if Path(sys_root, node).exists():
            return "gpu", f"/{node} exists"
    if tpu_vm_detected(env, sys_root):
        return "tpu", "a Cloud TPU VM"
    return None


def startup_report(
    local_devices: Sequence[Any],
    num_devices: int,
    num_processes: int,
    compute_dtype: str,
    env: Mapping[str, str] | None = None,
    sys_root: str | Path = "/",
) -> tuple[str, list[str]]:
    """The start-up line (platform, device kind, device counts) and the warnings for these
    devices; ``local_devices`` are ``jax.Device``-like (``platform``, ``device_kind``)."""
    env = os.environ if env is None else env
    platform = local_devices[0].platform
    kinds = ", ".join(sorted({d.device_kind for d in local_devices}))
    line = (
        f"JAX {jax.__version__} on {platform}: {len(local_devices)} local device(s) of kind "
        f"{kinds!r}, {num_devices} in all over {num_processes} process(es)"
    )
    warnings: list[str] = []
    if platform == "cpu" and compute_dtype == "bfloat16":
        warnings.append(
            "model.dtype=bfloat16 on a CPU backend: XLA:CPU has no fast bf16 matmuls on most "
            "CPUs, so this is slower than float32 and only rehearses an accelerator config; set "
            "model.dtype=float32 to train on CPU"
        )
    expected = expected_accelerator(env, sys_root)
    requested = env.get("JAX_PLATFORMS", "").strip()
    if platform == "cpu" and expected is not None:
        want, evidence = expected
        names = {"gpu": ("cuda", "gpu"), "tpu": ("tpu",)}[want]
        if not requested or any(n in requested for n in names):
            install = (
                "pip install 'esmjax[cuda12]' (or 'esmjax[cuda13]' for a CUDA 13 driver)"
                if want == "gpu"
                else "pip install 'esmjax[tpu]'"
            )
            warnings.append(
                f"{evidence}, so a {want.upper()} is expected, but JAX sees only CPU devices: this "
                f"environment has a CPU-only jaxlib or a broken {want.upper()} plugin. Run "
                f"{install} (README: Install on a GPU cluster / a TPU VM), or set "
                "JAX_PLATFORMS=cpu to train on CPU on purpose"
            )
    return line, warnings


def log_startup(compute_dtype: str) -> list[str]:
    """Logs the start-up line and warnings for the devices JAX sees; returns the warnings."""
    line, warnings = startup_report(
        jax.local_devices(), jax.device_count(), jax.process_count(), compute_dtype
    )
    log.info(line)
    for w in warnings:
        log.warning(w)
    return warnings


def use_compilation_cache(setting: str, workdir: Any) -> str | None:
    """Points JAX's persistent compilation cache at ``setting`` (``TrainConfig.compile_cache``:
    ``auto``, ``off`` or a folder/URL) before the run compiles anything; returns the folder in use
    and logs how many programs it already holds (0 on a first start)."""
    if setting == "off":
        return None
    if setting == "auto":
        default = f"{str(workdir).rstrip('/')}/compile_cache"
        folder = os.environ.get("JAX_COMPILATION_CACHE_DIR") or default
    else:
        folder = setting
    from jax.experimental.compilation_cache import compilation_cache as cc

    if jax.config.jax_compilation_cache_dir != folder:
        cc.reset_cache()  # a cache opened earlier in this process would keep its old folder
        jax.config.update("jax_compilation_cache_dir", folder)
    log.info("compilation cache %s: %d compiled programs", folder, cached_programs(folder))
    return folder


def cached_programs(folder: str) -> int:
    """Programs in a JAX compilation cache folder (local or a bucket)."""
    from etils import epath

    root = epath.Path(folder)
    try:
        return sum(1 for p in root.iterdir() if p.name.endswith("-cache"))
    except (FileNotFoundError, NotADirectoryError):
        return 0
