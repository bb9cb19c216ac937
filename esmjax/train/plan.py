"""``esmjax plan``: compile the full train step ahead of time for a config and mesh, and report
memory per device.

The step is lowered and compiled on N host CPU devices standing in for the accelerators (no
accelerator is needed), with the same shardings, accumulation and remat policy as the real run.
XLA's memory analysis of that executable is reported next to an analytic estimate: the two differ
because XLA:CPU fuses differently from the GPU and TPU compilers, so the analytic column is the one
to trust for activations, XLA's for parameters and optimizer state (it sees the exact shardings).
FLOPs per step come from the analytic count (``esmjax.train.metrics``) and from XLA's cost analysis.

    esmjax plan --config configs/esm2_15b.yaml --mesh data=1,fsdp=16,tensor=4
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from typing import Any

from esmjax.errors import InputError

GB = 1024**3


def parse_mesh(text: str) -> dict[str, int]:
    sizes = {"data": 1, "fsdp": 1, "tensor": 1}
    for item in text.split(","):
        if "=" not in item:
            raise InputError(f"--mesh: expected axis=size, got {item!r}")
        k, v = item.split("=", 1)
        if k.strip() not in sizes:
            raise InputError(f"--mesh: unknown axis {k!r}; axes are data, fsdp, tensor")
        try:
            sizes[k.strip()] = int(v)
        except ValueError:
            raise InputError(f"--mesh: {k.strip()}={v!r} is not a whole number") from None
        if sizes[k.strip()] < 1:
            raise InputError(f"--mesh: {k.strip()} must be at least 1, got {v}")
    return sizes


def _bytes_per_device(tree: Any) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs with shardings."""
    import jax
    import numpy as np

    total = 0
    for leaf in jax.tree.leaves(tree):
        shard = leaf.sharding.shard_shape(leaf.shape)
        total += int(np.prod(shard)) * np.dtype(leaf.dtype).itemsize
    return total


def activation_estimate(cfg, rows: int, seq_len: int, tensor: int) -> int:
    """Bytes of activations kept for the backward pass on one device, plus the transient peak of one
    layer.

    ``rows`` are the packed rows of one micro-batch that this device's (data x fsdp) shard
    processes. Attention never keeps its [rows, H, S, S] weights between passes
    (``esmjax.models.layers`` recomputes them in the backward), so they count once, in the transient
    peak.
    """
    m = cfg.model
    c = 2 if m.dtype == "bfloat16" else 4
    b, s, e, f, h, n = (
        rows,
        seq_len,
        m.embed_dim,
        m.mlp_dim // tensor,
        max(m.num_heads // tensor, 1),
        m.num_layers,
    )
    hd = h * m.head_dim
    weights_out = (
        3 * b * s * hd + b * s * e + b * s * f + b * s * e
    ) * c  # q k v, out_proj, fc1, fc2 outputs
    everything = (
        weights_out + (b * s * hd + 4 * b * s * e + b * s * f) * c
    )  # + attention out, LNs, residual, gelu
    per_layer = {"none": everything, "dots": weights_out, "dots_no_batch": weights_out, "full": 0}
    carried = n * (
        b * s * e * c + per_layer[m.remat]
    )  # layer inputs (scan carry) + what the policy keeps
    attention_peak = (
        3 * b * h * s * s * 4
    )  # fp32 weights, their gradient and the score gradient of one layer
    recompute_peak = (everything if m.remat != "none" else 0) + attention_peak
    logits = 3 * b * s * m.vocab_size * 4
    return carried + recompute_peak + logits


def plan(cfg, sizes: dict[str, int], device_memory_gb: float) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from esmjax.models.esm2 import abstract_model
    from esmjax.parallel import sharding as shd
    from esmjax.train import metrics as tm
    from esmjax.train.batching import Batching
    from esmjax.train.optim import learning_rate, make_optimizer
    from esmjax.train.state import abstract_state, model_graphdef, state_shardings
    from esmjax.train.step import make_train_step

    n_dev = math.prod(sizes.values())
    if jax.device_count() < n_dev:
        raise InputError(
            f"--mesh: the mesh needs {n_dev} devices but only {jax.device_count()} are present"
        )
    mesh_cfg = dataclasses.replace(
        cfg.mesh,
        ici_data=sizes["data"],
        ici_fsdp=sizes["fsdp"],
        ici_tensor=sizes["tensor"],
        dcn_data=1,
        dcn_fsdp=1,
        dcn_tensor=1,
    )
    mesh = shd.make_mesh(mesh_cfg, jax.devices()[:n_dev])
    rules = shd.resolve_rules(cfg.mesh.rules)
    tx = make_optimizer(cfg.optim, cfg.num_steps, abstract_model(cfg.model)[1].to_pure_dict())
    # First: a mesh that cannot shard the model is the more basic problem than the batch split.
    shardings = state_shardings(
        cfg.model, tx, mesh, rules, allow_replicated=cfg.mesh.allow_replicated
    )
    batching = Batching(cfg, n_dev, 1)
    target = abstract_state(cfg.model, tx, shardings)
    row_spec = shd.batch_sharding(mesh, rules, 2).spec
    bs = NamedSharding(mesh, P(None, *row_spec))
    shape = (batching.accum, batching.micro_rows, batching.seq_len)
    batch = {
        k: jax.ShapeDtypeStruct(shape, jnp.bool_ if k == "loss_mask" else jnp.int32, sharding=bs)
        for k in ("tokens", "targets", "loss_mask", "segment_ids", "positions")
    }
    step = jax.jit(
        make_train_step(model_graphdef(cfg.model), tx, learning_rate(cfg.optim, cfg.num_steps)),
        in_shardings=(shardings, bs),
        out_shardings=(shardings, None),
        donate_argnums=0,
    )
    t0 = time.perf_counter()
    with shd.use_mesh(mesh, rules):
        compiled = step.lower(target, batch).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    batch_shards = math.prod(sizes[a] for a in dict(rules).get(shd.ACT_BATCH, ()) if a in sizes)
    batch_shards = batch_shards if batching.micro_rows % max(batch_shards, 1) == 0 else 1
    rows_per_shard = batching.micro_rows // max(batch_shards, 1)
    params_b = _bytes_per_device(target.variables)
    opt_b = _bytes_per_device(target.opt_state)
    grads_b = params_b  # fp32 gradients (and their accumulator) live in the step
    act_b = activation_estimate(cfg, rows_per_shard, batching.seq_len, sizes["tensor"])
    analytic_total = params_b + opt_b + 2 * grads_b + act_b
    xla_total = (
        mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        - mem.alias_size_in_bytes
        + mem.temp_size_in_bytes
    )
    tokens = batching.global_rows * batching.seq_len
    flops = tm.train_flops_per_token(cfg.model, batching.seq_len) * tokens
    return {
        "model": cfg.model.__class__.__name__,
        "params": cfg.model.num_params(),
        "mesh": sizes,
        "rules": cfg.mesh.rules if isinstance(cfg.mesh.rules, str) else "custom",
        "remat": cfg.model.remat,
        "dtype": cfg.model.dtype,
        "global_tokens_per_step": tokens,
        "micro_rows_global": batching.micro_rows,
        "rows_per_batch_shard": rows_per_shard,
        "accumulation_steps": batching.accum,
        "compile_seconds": round(compile_s, 1),
        "analytic_gb": {
            "params": params_b / GB,
            "optimizer": opt_b / GB,
            "gradients": 2 * grads_b / GB,
            "activations": act_b / GB,
            "total": analytic_total / GB,
        },
        "xla_gb": {
            "arguments": mem.argument_size_in_bytes / GB,
            "outputs": mem.output_size_in_bytes / GB,
            "aliased": mem.alias_size_in_bytes / GB,
            "temp": mem.temp_size_in_bytes / GB,
            "total": xla_total / GB,
        },
        "flops_per_step_analytic": flops,
        "flops_per_step_per_device_xla": float(cost.get("flops", float("nan"))) if cost else None,
        "device_memory_gb": device_memory_gb,
        "fits": max(analytic_total, xla_total) / GB <= device_memory_gb,
    }


def format_plan(p: dict[str, Any]) -> str:
    a, x = p["analytic_gb"], p["xla_gb"]
    lines = [
        f"ESM-2 {p['params'] / 1e9:.2f}B params | mesh {p['mesh']} rules {p['rules']} | remat "
        f"{p['remat']} | {p['dtype']}",
        f"batch: {p['global_tokens_per_step']:,} tokens/step = {p['accumulation_steps']} "
        f"accumulation step(s) x {p['micro_rows_global']} rows ({p['rows_per_batch_shard']} per "
        "batch shard)",
        "memory per device (GB)      analytic      XLA (CPU-compiled)",
        f"  parameters                {a['params']:8.2f}      arguments {x['arguments']:8.2f}",
        f"  optimizer state           {a['optimizer']:8.2f}      outputs   {x['outputs']:8.2f} "
        f"(aliased {x['aliased']:.2f})",
        f"  gradients (+accumulator)  {a['gradients']:8.2f}      temp      {x['temp']:8.2f}",
        f"  activations               {a['activations']:8.2f}",
        f"  total                     {a['total']:8.2f}      total     {x['total']:8.2f}",
        f"FLOPs/step: {p['flops_per_step_analytic']:.3e} analytic (all devices); XLA cost "
        f"analysis per device {p['flops_per_step_per_device_xla']:.3e} (counts each loop body "
        "once)",
        f"fits {p['device_memory_gb']:.0f} GB devices: {'YES' if p['fits'] else 'NO'} (compiled "
        f"in {p['compile_seconds']} s)",
    ]
    return "\n".join(lines)


def plan_run(
    config: str,
    overrides: list[str],
    mesh: str,
    devices: int | None = None,
    device_memory_gb: float = 80.0,
    json_out: str | None = None,
) -> dict[str, Any]:
    """``esmjax plan``: compiles the train step of ``config`` for ``mesh`` (e.g.
    ``data=1,fsdp=16,tensor=4``) on that many host CPU devices, prints the plan and returns it.

    The CPU devices are created here, before JAX's backend starts; inside a process whose backend
    is already up (tests) the plan runs on the devices it has.
    """
    import jax

    sizes = parse_mesh(mesh)
    n = devices or math.prod(sizes.values())
    try:
        jax.config.update("jax_num_cpu_devices", n)
        jax.config.update("jax_platforms", "cpu")
    except RuntimeError:
        print(
            f"JAX is already initialised; planning on its {jax.device_count()} devices",
            file=sys.stderr,
        )
    from esmjax.config import load_config

    result = plan(load_config(config, overrides), sizes, device_memory_gb)
    print(format_plan(result))
    if json_out:
        with open(json_out, "w") as f:
            json.dump(result, f, indent=2)
    return result
