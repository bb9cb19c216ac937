"""The real TPU compiler (libtpu, compile-only devices of a 4-chip v5p slice) compiles esmjax's
programs on this CPU machine: the Mosaic splash kernel must be in the compiled train step (not
Pallas interpret mode, not XLA attention), the memory must fit a v5p chip, and the launchers'
async-collective flags must reach the compiler."""

import pytest
from support.aot_plans import plan, weights_gathered_in_bf16


def _train(tmp_path, config, *extra):
    p, text = plan(tmp_path, "--config", f"configs/{config}.yaml", "--target", "v5p-8", *extra)
    assert p["compiler"] == "TPU compiler (libtpu)" and p["device_kind"] == "TPU v5"
    assert p["devices"] == 4 and p["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    # splash forward, and its dq and dkv backward kernels: Mosaic custom calls.
    assert p["kernels"].get("splash", 0) >= 3, p["kernels"]
    mem = p["compiled_gb"]
    assert 0 < mem["total"] < 95 and p["fits"], mem
    assert "attention kernel in the compiled program: splash" in text
    assert "fits 95.0 GiB devices: YES (compiled total" in text
    return p


def test_demo_train_step_compiles_for_v5p(tmp_path):
    p = _train(tmp_path, "demo", "--set", "model.remat=dots")
    assert p["flops_per_device"] > 0  # libtpu's cost analysis
    # `dots` saves matmul outputs only: the kernel's forward runs again in the backward.
    assert p["kernel_forwards_in_backward"] >= 1
    assert any(c["op"] == "all-gather" for c in p["collectives"])


@pytest.mark.slow  # about 45 s; the demo model's v5p compile runs by default
def test_8m_train_step_compiles_for_v5p(tmp_path):
    p = _train(tmp_path, "esm2_8m")
    assert p["dtype"] == "bfloat16" and p["accumulation_steps"] == 16
    weights_gathered_in_bf16(p)
    gathers = [c for c in p["collectives"] if c["op"] == "all-gather" and c["dtype"] == "bf16"]
    # LIBTPU_INIT_ARGS (esmjax.parallel.xla_flags) made the layer scan's gathers asynchronous.
    assert gathers[0]["async_count"] > 0, gathers  # 0 of 1,168 without the flags


def test_esmfold_compiles_for_one_v5p_chip(tmp_path):
    p, text = plan(tmp_path, "--job", "fold", "--target", "v5p-8", "--length", "64")
    assert p["model"] == "ESMFold" and p["mesh"] == {"data": 1, "fsdp": 1, "tensor": 1}
    # The 3B stem's weights (float32, as `esmjax fold` holds them) are most of the memory.
    assert 11 < p["compiled_gb"]["arguments"] < 14 and p["fits"], p["compiled_gb"]
    assert p["kernels"].get("splash", 0) >= 1 and p["collectives"] == []
