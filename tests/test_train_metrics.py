"""MFU peak table (exact device kinds) and the windowed throughput meter (fake clock, no timing)."""

import logging
from types import SimpleNamespace

import pytest

from esmjax.config import ConfigError
from esmjax.train import metrics as tm

# Every device kind the table must know, as JAX reports it, with its dense bf16 peak in TFLOP/s.
KINDS = {
    "NVIDIA H100 80GB HBM3": 989.4,
    "NVIDIA H100 PCIe": 756,
    "NVIDIA H100 NVL": 835,
    "NVIDIA H200": 989.4,
    "NVIDIA H200 NVL": 835,
    "NVIDIA B200": 2250,
    "NVIDIA A100-SXM4-40GB": 312,
    "NVIDIA A100-SXM4-80GB": 312,
    "NVIDIA A100-PCIE-40GB": 312,
    "NVIDIA A100 80GB PCIe": 312,
    "NVIDIA L40S": 362,
    "NVIDIA L40": 181,
    "NVIDIA L4": 121,
    "TPU v4": 275,
    "TPU v5 lite": 197,
    "TPU v5": 459,
    "TPU v5p": 459,
    "TPU v6 lite": 918,
}


def _device(kind: str, platform: str = "gpu"):
    return SimpleNamespace(platform=platform, device_kind=kind)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_listed_kind(kind):
    platform = "tpu" if kind.startswith("TPU") else "gpu"
    assert tm.device_peak_flops(device=_device(kind, platform)) == pytest.approx(KINDS[kind] * 1e12)
    assert tm.device_peak_flops(kind) == pytest.approx(KINDS[kind] * 1e12)  # config override


def test_l4_is_not_l40s_or_l40():
    # A substring match took "l4" for both; they differ 3x and 1.5x.
    assert tm.peak_flops_of_kind("NVIDIA L40S") == 362e12
    assert tm.peak_flops_of_kind("NVIDIA L40") == 181e12
    assert tm.peak_flops_of_kind("NVIDIA L4") == 121e12
    # Case and outer spaces do not matter; a prefix or an extension of a kind is not that kind.
    assert tm.peak_flops_of_kind(" nvidia l4 ") == 121e12
    assert tm.peak_flops_of_kind("NVIDIA L4 Ti") is None
    assert tm.peak_flops_of_kind("NVIDIA H100") is None
    assert tm.peak_flops_of_kind("TPU v5 lite pod") is None


def test_unknown_kind_gives_none_and_one_warning(caplog):
    dev = _device("NVIDIA GeForce RTX 9999 (test)")
    with caplog.at_level(logging.WARNING, logger="esmjax.train.metrics"):
        assert tm.device_peak_flops(device=dev) is None
        assert tm.device_peak_flops(device=dev) is None
    warnings = [r for r in caplog.records if "RTX 9999" in r.getMessage()]
    assert len(warnings) == 1 and "mfu is logged as null" in warnings[0].getMessage()
    w = tm.ThroughputWindow(clock=iter([0.0, 1.0]).__next__)
    w.add_step(100, 1.0)
    s = w.summary(num_devices=1, flops_per_token=1.0, peak_flops=None)
    assert s["mfu"] is None and s["tokens_per_second"] == 100


def test_unknown_accelerator_in_config_is_an_input_error():
    with pytest.raises(ConfigError, match="accelerator='h100'"):
        tm.device_peak_flops("h100")


def test_cpu_device_uses_the_per_core_estimate():
    assert tm.device_peak_flops(device=_device("cpu", "cpu")) > 0


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_window_counts_steps_and_time_since_the_last_log_line_without_evaluation():
    clock = FakeClock()
    w = tm.ThroughputWindow(clock=clock)
    kw = dict(num_devices=4, flops_per_token=2e9, peak_flops=1e12)
    for nonpad in (1.0, 0.5, 0.75):  # 3 steps in 6 s
        clock.t += 2.0
        w.add_step(1000, nonpad)
    s = w.summary(**kw)
    assert s["tokens_per_second"] == pytest.approx(3000 / 6)
    assert s["tokens_per_second_per_device"] == pytest.approx(3000 / 6 / 4)
    assert s["step_seconds"] == pytest.approx(2.0)
    assert s["nonpad_fraction"] == pytest.approx(0.75)  # mean of the window, not the last batch
    assert s["tflops_per_device"] == pytest.approx(2e9 * 500 / 4 / 1e12)
    assert s["mfu"] == pytest.approx(2e9 * 500 / 4 / 1e12)

    # Next window: 2 steps of 1 s around a 50 s evaluation; the evaluation does not count, and
    # neither do the steps or time of the previous window.
    clock.t += 1.0
    w.add_step(1000, 0.2)
    with w.excluded():
        clock.t += 50.0
    clock.t += 1.0
    w.add_step(1000, 0.4)
    s = w.summary(**kw)
    assert s["tokens_per_second"] == pytest.approx(2000 / 2)
    assert s["step_seconds"] == pytest.approx(1.0)
    assert s["nonpad_fraction"] == pytest.approx(0.3)


def test_window_excludes_time_even_when_evaluation_fails():
    clock = FakeClock()
    w = tm.ThroughputWindow(clock=clock)
    w.add_step(8, 1.0)
    clock.t += 4.0
    with pytest.raises(RuntimeError), w.excluded():
        clock.t += 10.0
        raise RuntimeError("eval failed")
    s = w.summary(num_devices=1, flops_per_token=1.0, peak_flops=None)
    assert s["tokens_per_second"] == pytest.approx(2.0)


def test_window_without_flops_gives_throughput_and_no_flops():
    """Fine-tuning's windows: steps of different token counts, no FLOPs model."""
    clock = FakeClock()
    w = tm.ThroughputWindow(clock=clock)
    for tokens in (300, 500):
        clock.t += 1.0
        w.add_step(tokens, 1.0)
    s = w.summary(num_devices=2, flops_per_token=None, peak_flops=1e12)
    assert s["tokens_per_second"] == pytest.approx(400)
    assert s["tflops_per_device"] is None and s["mfu"] is None
