"""Start-up report: platform line, bf16-on-CPU warning, accelerator expected but JAX sees CPU."""

from types import SimpleNamespace

import pytest

from esmjax.parallel import distributed
from esmjax.parallel.platform import expected_accelerator, startup_report

CPU = [SimpleNamespace(platform="cpu", device_kind="cpu")] * 2
GPU = [SimpleNamespace(platform="gpu", device_kind="NVIDIA H100 80GB HBM3")] * 8


def report(devices, dtype="float32", env=None, sys_root=None):
    return startup_report(devices, len(devices) * 2, 2, dtype, env or {}, sys_root)


def test_line_names_platform_kind_and_counts(tmp_path):
    line, warnings = report(GPU, env={"CUDA_VISIBLE_DEVICES": "0,1"}, sys_root=tmp_path)
    assert "on gpu" in line and "'NVIDIA H100 80GB HBM3'" in line
    assert "8 local device(s)" in line and "16 in all over 2 process(es)" in line
    assert warnings == []


def test_plain_cpu_host_is_quiet(tmp_path):
    assert report(CPU, sys_root=tmp_path)[1] == []


def test_bf16_on_cpu_warns(tmp_path):
    (w,) = report(CPU, "bfloat16", sys_root=tmp_path)[1]
    assert "model.dtype=bfloat16 on a CPU backend" in w
    assert report(GPU, "bfloat16", sys_root=tmp_path)[1] == []


@pytest.mark.parametrize(
    "var,value",
    [("SLURM_JOB_GPUS", "0,1,2,3"), ("SLURM_STEP_GPUS", "0"), ("CUDA_VISIBLE_DEVICES", "0,1")],
)
def test_gpu_expected_but_only_cpu(tmp_path, var, value):
    (w,) = report(CPU, env={var: value}, sys_root=tmp_path)[1]
    assert f"{var}={value}" in w and "JAX sees only CPU devices" in w and "esmjax[cuda12]" in w
    # Asking for CPU on purpose is not a mistake.
    assert report(CPU, env={var: value, "JAX_PLATFORMS": "cpu"}, sys_root=tmp_path)[1] == []
    assert len(report(CPU, env={var: value, "JAX_PLATFORMS": "cuda,cpu"}, sys_root=tmp_path)[1])


@pytest.mark.parametrize("value", ["", "-1", "NoDevFiles"])
def test_no_gpu_allocated(tmp_path, value):
    assert expected_accelerator({"CUDA_VISIBLE_DEVICES": value}, tmp_path) is None


def test_nvidia_device_node(tmp_path):
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev" / "nvidiactl").touch()
    assert expected_accelerator({}, tmp_path) == ("gpu", "/dev/nvidiactl exists")


def _pci(root, name, vendor, device):
    d = root / "sys/bus/pci/devices" / name
    d.mkdir(parents=True)
    (d / "vendor").write_text(vendor + "\n")
    (d / "device").write_text(device + "\n")


def test_tpu_vm_by_pci_chip(tmp_path):
    _pci(tmp_path, "0000:00:04.0", "0x1ae0", "0x0042")  # gVNIC: a Google NIC, not a TPU
    assert not distributed.tpu_vm_detected({}, tmp_path)
    assert expected_accelerator({}, tmp_path) is None
    _pci(tmp_path, "0000:00:05.0", "0x1ae0", "0x0063")  # TPU v5e
    assert distributed.tpu_vm_detected({}, tmp_path)
    (w,) = report(CPU, sys_root=tmp_path)[1]
    assert "a Cloud TPU VM" in w and "esmjax[tpu]" in w


def test_tpu_pod_variables(tmp_path):
    env = {"TPU_WORKER_HOSTNAMES": "t0,t1"}
    assert expected_accelerator(env, tmp_path) == ("tpu", "a Cloud TPU VM")
    tpu = [SimpleNamespace(platform="tpu", device_kind="TPU v5 lite")] * 4
    assert report(tpu, env=env, sys_root=tmp_path)[1] == []


def test_tpu_pod_variables_start_jax_distributed():
    # GKE / multi-slice variables alone make a TPU VM (start_args' Cloud TPU rule); a plain TPU VM
    # (chip on the PCI bus only) is in tests/test_launch_schedulers.py.
    env = {"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.2:8080"}
    assert distributed.tpu_vm_detected(env, "/nonexistent")
    assert (
        distributed.start_args(env, on_tpu_vm=distributed.tpu_vm_detected(env, "/nonexistent"))[0]
        == "Cloud TPU"
    )
