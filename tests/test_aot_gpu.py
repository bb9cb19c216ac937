"""XLA's deviceless GPU compiler (sm_90, 8 compile-only H100s) compiles esmjax's train step on
this CPU machine: the Pallas Triton attention kernel must be in the compiled program (not
interpret mode, not XLA attention) and the memory must fit an H100."""

from support.aot_plans import gpu_env, plan, weights_gathered_in_bf16


def _train(tmp_path, config, *extra):
    p, text = plan(
        tmp_path, "--config", f"configs/{config}.yaml", "--target", "h100", *extra, env=gpu_env()
    )
    assert p["compiler"].startswith("XLA:GPU") and p["device_kind"] == "NVIDIA H100 80GB HBM3"
    assert p["devices"] == 8 and p["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    assert p["kernels"].get("pallas_gpu", 0) >= 3, p["kernels"]  # forward, dq, dkv
    assert 0 < p["compiled_gb"]["total"] < 79 and p["fits"], p["compiled_gb"]
    assert "attention kernel in the compiled program: pallas_gpu" in text
    # The latency-hiding scheduler's collectives are all asynchronous.
    assert all(c["async_count"] == c["count"] for c in p["collectives"]), p["collectives"]
    return p


def test_demo_train_step_compiles_for_h100(tmp_path):
    # auto takes the Pallas kernel for 16-bit compute; the demo recipe computes in float32.
    p = _train(tmp_path, "demo", "--set", "model.dtype=bfloat16", "--set", "model.remat=dots")
    # `dots` saves matmul outputs only: the kernel's forward runs again in the backward (saving
    # its outputs costs more memory than it spares: esm2.ESM2.__call__).
    assert p["kernel_forwards_in_backward"] >= 1


def test_8m_train_step_compiles_for_h100(tmp_path):
    p = _train(tmp_path, "esm2_8m")
    weights_gathered_in_bf16(p)
