"""Accelerators to compile for without having one: TPU slices (libtpu's compile-only devices) and
NVIDIA GPUs (XLA's deviceless GPU compiler), named as users name them.

``esmjax plan --target`` hands the devices made here to the same ``jax.jit(...).lower().compile()``
that a run uses, so the compiled program is the accelerator's own: its memory figure, kernels and
collectives come from that compiler. Nothing here can give a speed.

Names:

- TPU: ``v5p-128`` (the Cloud name: TensorCores for v4 and v5p, which pair two cores per chip, so
  64 chips; chips for v5e and v6e) or a topology ``v5p:4x4x4`` (chips per axis). Multi-slice is
  ``--slices N`` on top (``jax.experimental.topologies``' ``num_slices``).
- GPU: ``h100`` (one host of 8), ``h100-64`` (64 GPUs, 8 per host) or ``h100:16x8`` (16 hosts of 8).
  The TPU compiler is libtpu (the ``tpu`` extra). The GPU compiler is the CUDA plugin with ptxas
  (the ``aot-gpu`` extra), run with ``JAX_PLATFORMS=cpu`` so that it never looks for a driver; on a
  machine without a GPU that plugin logs "Could not find cuda drivers" from every JAX process, so
  it belongs in a planning environment (or on ``PYTHONPATH`` for the plan only, as ``make test``
  does), not in a run's.

Memory per device is the HBM one device of that chip offers a program: the GPU specs' own figure,
the TPU chips' published HBM.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
from collections.abc import Iterator
from importlib import resources
from typing import Any

from esmjax.errors import InputError

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator kind.

    Attributes:
      name: what users call it (``v5p``, ``h100``).
      platform: ``tpu`` or ``gpu`` (JAX's platform names).
      hbm_gib: memory one device offers a program.
      per_host: devices per host (TPU VM or GPU node).
      cores_in_name: TensorCores per chip counted by the Cloud TPU name (v4-8 is 4 chips).
      dims: axes of the TPU topology (3 for v4/v5p tori, 2 for v5e/v6e); 0 for GPUs.
      spec: the GPU target description file in ``gpu_specs/``, with its overrides.
    """

    name: str
    platform: str
    hbm_gib: float
    per_host: int
    cores_in_name: int = 1
    dims: int = 0
    spec: str = ""
    spec_overrides: tuple[tuple[str, str], ...] = ()


# H200: the H100 die (SM 9.0, 132 SMs) with 141 GB of HBM3e at 4.8 TB/s; XLA's own h200 spec differs
# from h100_sxm only in these fields.
_H200 = (
    ("device_memory_size", "151397597184"),
    ("memory_bandwidth", "4800000000000"),
    ("name", '"NVIDIA H200"'),
    ("device_description_str", '"NVIDIA H200"'),
)

CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", "tpu", 32.0, per_host=4, cores_in_name=2, dims=3),
    "v5e": Chip("v5e", "tpu", 16.0, per_host=4, dims=2),
    "v5p": Chip("v5p", "tpu", 95.0, per_host=4, cores_in_name=2, dims=3),
    "v6e": Chip("v6e", "tpu", 32.0, per_host=4, dims=2),
    "h100": Chip("h100", "gpu", 84942979072 / GIB, per_host=8, spec="h100_sxm.txtpb"),
    "h200": Chip("h200", "gpu", 151397597184 / GIB, 8, spec="h100_sxm.txtpb", spec_overrides=_H200),
}


@dataclasses.dataclass(frozen=True)
class Target:
    """A whole job's accelerators: ``slices`` x ``hosts`` x ``per_host`` devices of ``chip``.

    For a TPU ``shape`` is one slice's chips per axis (``topology``: libtpu's name, ``v5p:4x4x4``);
    ``hosts`` is then what libtpu's compile-only devices report.
    """

    chip: Chip
    num_devices: int
    per_host: int
    slices: int = 1
    shape: tuple[int, ...] = ()

    @property
    def topology(self) -> str:
        return f"{self.chip.name}:{'x'.join(map(str, self.shape))}"

    @property
    def hosts(self) -> int:
        return self.num_devices // self.per_host

    @property
    def cloud_name(self) -> str:
        """The Cloud TPU name of one slice (``v5p-128``)."""
        return f"{self.chip.name}-{self.num_devices // self.slices * self.chip.cores_in_name}"

    @property
    def name(self) -> str:
        if self.chip.platform == "tpu":
            many = f" x {self.slices} slices" if self.slices > 1 else ""
            return f"TPU {self.topology}{many} ({self.num_devices} chips)"
        return f"{self.hosts} x {self.per_host} {self.chip.name.upper()}"


def _tpu_shape(chip: Chip, chips: int) -> tuple[int, ...]:
    """The slice shape Cloud TPU gives for a chip count: from one host (2x2[x1]), the last of the
    smallest axes doubles (v5p: 8 -> 2x2x2, 16 -> 2x2x4, 64 -> 4x4x4, 128 -> 4x4x8)."""
    if chips == 1:
        return (1,) * chip.dims
    shape = [2, 2] + [1] * (chip.dims - 2)
    if chips < 4 or chips & (chips - 1):
        raise InputError(
            f"--target: {chip.name} slices come in powers of two from 4 chips, got {chips}; "
            f"name a topology instead, e.g. {chip.name}:{'x'.join(map(str, shape))}"
        )
    while math.prod(shape) < chips:
        small = min(shape)
        i = max(j for j, s in enumerate(shape) if s == small)
        shape[i] *= 2
    return tuple(shape)


def _bad(text: str) -> InputError:
    names = ", ".join(CHIPS)
    return InputError(
        f"--target: {text!r} is not a target; use a Cloud TPU name (v5p-128, v6e-64), a TPU "
        f"topology (v5p:4x4x4), or a GPU (h100, h100-64, h200:16x8); chips: {names}"
    )


def parse_target(text: str, slices: int = 1) -> Target:
    """``v5p-128``, ``v5p:4x4x4``, ``h100``, ``h100-64`` or ``h100:16x8`` -> a ``Target``."""
    m = re.fullmatch(r"([a-z0-9]+?)(?:-(\d+)|:(\d+(?:x\d+)*))?", text.strip().lower())
    if not m or m.group(1) not in CHIPS:
        raise _bad(text)
    chip, count, shape_text = CHIPS[m.group(1)], m.group(2), m.group(3)
    if slices < 1:
        raise InputError(f"--slices must be at least 1, got {slices}")
    if chip.platform == "gpu":
        if slices != 1:
            raise InputError("--slices is for TPU targets; name GPU hosts as h100:HOSTSxGPUS")
        if shape_text:
            dims = [int(x) for x in shape_text.split("x")]
            if len(dims) != 2 or min(dims) < 1:
                raise _bad(text)
            hosts, per_host = dims
        else:
            n = int(count) if count else chip.per_host
            per_host = min(n, chip.per_host)
            if n < 1 or n % per_host:
                raise InputError(f"--target: {n} GPUs do not fill hosts of {chip.per_host}")
            hosts = n // per_host
        return Target(chip, hosts * per_host, per_host)
    if shape_text:
        shape = tuple(int(x) for x in shape_text.split("x"))
        if len(shape) != chip.dims or min(shape) < 1:
            raise InputError(f"--target: a {chip.name} topology has {chip.dims} axes, got {text}")
    else:
        cores = int(count) if count else chip.per_host * chip.cores_in_name
        if cores % chip.cores_in_name:
            raise InputError(f"--target: {chip.name}-N counts {chip.cores_in_name} per chip")
        shape = _tpu_shape(chip, cores // chip.cores_in_name)
    chips = math.prod(shape)
    return Target(chip, chips * slices, min(chip.per_host, chips), slices, shape)


def gpu_target_config(chip: Chip) -> str:
    """The ``GpuTargetConfigProto`` text XLA compiles against, with the chip's overrides."""
    text = resources.files("esmjax.parallel").joinpath("gpu_specs", chip.spec).read_text()
    for field, value in chip.spec_overrides:
        text, n = re.subn(rf"(?m)^(\s*{field}:\s*).*$", rf"\g<1>{value}", text)
        if not n:
            raise RuntimeError(f"gpu spec {chip.spec} has no field {field}")
    return text


def compile_only_devices(target: Target) -> list[Any]:
    """The target's devices, for compiling only (no accelerator is needed or used)."""
    from jax.experimental import topologies

    try:
        if target.chip.platform == "tpu":
            with _libtpu_env(target):
                topo = topologies.get_topology_desc(
                    platform="tpu", topology_name=target.topology, **_tpu_kwargs(target)
                )
        else:
            topo = topologies.get_topology_desc(
                platform="cuda",
                target_config=gpu_target_config(target.chip),
                topology=f"1x{target.hosts}x{target.per_host}",
            )
    except (ImportError, RuntimeError, NotImplementedError, ValueError) as e:
        raise InputError(_missing_compiler(target, e)) from None
    devices = list(topo.devices)
    if len(devices) != target.num_devices:
        raise InputError(
            f"--target: the {target.chip.platform.upper()} compiler made {len(devices)} devices "
            f"for {target.name}, expected {target.num_devices}"
        )
    return devices


@contextlib.contextmanager
def _libtpu_env(target: Target) -> Iterator[None]:
    """While libtpu starts: compile-only devices never open a chip, so skip its
    one-process-per-host lock (two plans, or two test workers, at once), and name the slice so
    that it does not probe for one. Restored after: ``TPU_WORKER_HOSTNAMES`` would tell esmjax's
    own start-up that it runs on a pod."""
    values = {
        "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
        "TPU_ACCELERATOR_TYPE": target.cloud_name,
        "TPU_WORKER_HOSTNAMES": "localhost",
    }
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update({k: v for k, v in values.items() if saved[k] is None})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)


def _tpu_kwargs(target: Target) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"num_slices": target.slices} if target.slices > 1 else {}
    if target.chip.cores_in_name == 2:
        kwargs["chip_config_name"] = "megacore"
    shape = target.shape
    if math.prod(shape) < target.chip.per_host:  # one chip, or a part of one host
        kwargs["chips_per_host_bounds"] = shape + (1,) * (3 - len(shape))
    return kwargs


def _missing_compiler(target: Target, e: Exception) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if target.chip.platform == "tpu":
        need = "libtpu: pip install 'esmjax[tpu]'"
    else:
        need = (
            "the CUDA plugin and ptxas: pip install 'esmjax[aot-gpu]' in a planning environment "
            '(README "Plans by the accelerators\' compilers")'
        )
    return f"--target {target.name}: cannot start its compiler ({first[:200]}); it needs {need}"
