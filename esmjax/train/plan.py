"""``esmjax plan``: compile a run's program ahead of time and report what the compiler says of it.

With ``--target`` (``v5p-128``, ``h100-64``, ...; ``esmjax.parallel.targets``) the program is
compiled by that accelerator's own compiler on this machine, with no accelerator: libtpu for TPUs,
XLA's deviceless GPU compiler for NVIDIA GPUs. The report is the compiler's: memory per device
(arguments, temporaries; ``fits`` is that total against the chip's HBM), FLOPs, the attention
kernel present in the compiled program, and the collectives of one step
(``esmjax.parallel.compiled``). Compiled programs give no speed; the one time figure printed, FLOPs
over the chips' peak, is labelled an estimate.

Without a target the program is compiled by XLA:CPU on host devices standing in for the
accelerators. That program is not an accelerator's (CPU-only attention and matmul code, bf16
upcast), so its memory is shown for reference only and ``fits`` follows the analytic estimate.

Jobs: ``train`` (the whole train step, accumulation and remat as the run), ``embed`` (ESM-2
representations of ``--rows`` x ``--length`` residues, the ``embed`` pass) and ``fold`` (one ESMFold
pass on one device: what ``esmjax fold`` holds with one local device; with more it splits the stem
over them, ``esmjax.inference.fold.fold_engine``, and holds less).

    esmjax plan --config configs/esm2_15b.yaml --target v5p-128
    esmjax plan --config configs/esm2_15b.yaml --target h100:16x8 --mesh data=1,fsdp=32,tensor=4
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from typing import Any

from esmjax.errors import InputError

GB = 1024**3


def parse_mesh(text: str) -> dict[str, int]:
    """``data=1,fsdp=16,tensor=4`` -> sizes (an axis left out is 1)."""
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
    (``esmjax.models.attention`` recomputes them in the backward), so they count once, in the
    transient peak.
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


@dataclasses.dataclass(frozen=True)
class Where:
    """The devices a program is compiled for, their memory, and which compiler that is."""

    devices: list
    memory_gb: float
    compiler: str
    target: Any = None  # esmjax.parallel.targets.Target, or None for host CPU devices

    @property
    def granules(self) -> int:
        """Groups joined by the slow network: TPU slices, or GPU hosts."""
        if self.target is None:
            return 1
        return self.target.slices if self.target.chip.platform == "tpu" else self.target.hosts


def where(target: Any, num_devices: int, device_memory_gb: float) -> Where:
    """Compile-only devices of ``target`` (a ``Target``), or ``num_devices`` host CPU devices."""
    import jax

    if target is not None:
        from esmjax.parallel.targets import compile_only_devices

        devices = compile_only_devices(target)
        compiler = (
            "TPU compiler (libtpu)"
            if target.chip.platform == "tpu"
            else "XLA:GPU, deviceless (sm_90, no autotuning)"
        )
        return Where(devices, target.chip.hbm_gib, compiler, target)
    if jax.device_count() < num_devices:
        raise InputError(
            f"--mesh: the mesh needs {num_devices} devices but only {jax.device_count()} are "
            "present"
        )
    return Where(jax.devices()[:num_devices], device_memory_gb, "XLA:CPU (host devices)")


def _compile(jitted: Any, args: tuple, mesh: Any, rules: Any) -> tuple[Any, float]:
    from esmjax.parallel import sharding as shd

    t0 = time.perf_counter()
    with shd.use_mesh(mesh, rules):
        compiled = jitted.trace(*args).lower().compile()
    return compiled, round(time.perf_counter() - t0, 1)


def _report(compiled: Any, seconds: float, at: Where) -> dict[str, Any]:
    """The compiler's side of a plan: memory, FLOPs, kernels, collectives."""
    from esmjax.parallel import compiled as cp

    s = cp.summary(compiled)
    mem = {k: v / GB for k, v in s.pop("memory_bytes").items()}
    return {
        "compiler": at.compiler,
        "target": at.target.name if at.target else None,
        "devices": len(at.devices),
        "device_kind": at.devices[0].device_kind,
        "compile_seconds": seconds,
        "compiled_gb": mem,
        **s,
        "device_memory_gb": at.memory_gb,
    }


def train_program(cfg: Any, sizes: dict[str, int], at: Where) -> tuple[Any, tuple, Any, dict]:
    """The jitted train step of ``cfg`` on a mesh of ``sizes`` over ``at``'s devices, its abstract
    arguments, the mesh rules, and the analytic memory figures."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from esmjax.models.esm2 import abstract_model
    from esmjax.parallel import sharding as shd
    from esmjax.train.batching import Batching
    from esmjax.train.optim import learning_rate, make_optimizer
    from esmjax.train.state import abstract_state, model_graphdef, state_shardings
    from esmjax.train.step import make_train_step

    n_dev = math.prod(sizes.values())
    mesh = shd.target_mesh(sizes, at.devices, at.granules)
    rules = shd.resolve_rules(cfg.mesh.rules)
    tx = make_optimizer(cfg.optim, cfg.num_steps, abstract_model(cfg.model)[1].to_pure_dict())
    # First: a mesh that cannot shard the model is the more basic problem than the batch split.
    shardings = state_shardings(
        cfg.model, tx, mesh, rules, allow_replicated=cfg.mesh.allow_replicated
    )
    batching = Batching.pretraining(cfg, n_dev, 1)
    target = abstract_state(cfg.model, tx, shardings)
    bs = NamedSharding(mesh, P(None, *shd.batch_sharding(mesh, rules, 2).spec))
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
    batch_shards = math.prod(sizes[a] for a in dict(rules).get(shd.ACT_BATCH, ()) if a in sizes)
    batch_shards = batch_shards if batching.micro_rows % max(batch_shards, 1) == 0 else 1
    rows_per_shard = batching.micro_rows // max(batch_shards, 1)
    params_b = _bytes_per_device(target.variables)
    opt_b = _bytes_per_device(target.opt_state)
    act_b = activation_estimate(cfg, rows_per_shard, batching.seq_len, sizes["tensor"])
    # fp32 gradients and their accumulator live in the step: twice the parameters.
    analytic = {"params": params_b, "optimizer": opt_b, "gradients": 2 * params_b}
    analytic |= {"activations": act_b, "total": sum(analytic.values()) + act_b}
    info = {
        "global_tokens_per_step": batching.global_rows * batching.seq_len,
        "micro_rows_global": batching.micro_rows,
        "rows_per_batch_shard": rows_per_shard,
        "accumulation_steps": batching.accum,
        "analytic_gb": {k: v / GB for k, v in analytic.items()},
    }
    return step, (target, batch), (mesh, rules), info


def plan(
    cfg: Any,
    sizes: dict[str, int] | None,
    device_memory_gb: float = 80.0,
    target: Any = None,
) -> dict[str, Any]:
    """Compiles ``cfg``'s train step for ``target`` (host CPU devices when None) on a mesh of
    ``sizes`` (default: the config's mesh over the target's devices) and returns the plan."""
    from esmjax.parallel import sharding as shd
    from esmjax.train import metrics as tm

    n = math.prod(sizes.values()) if sizes else None
    at = where(target, n or 0, device_memory_gb)
    if sizes is None:
        mesh_cfg = dataclasses.replace(cfg.mesh, dcn_data=1, dcn_fsdp=1, dcn_tensor=1)
        sizes = dict(zip(shd.MESH_AXES, shd.mesh_shape(mesh_cfg, len(at.devices))))
    step, args, (mesh, rules), info = train_program(cfg, sizes, at)
    compiled, seconds = _compile(step, args, mesh, rules)
    report = _report(compiled, seconds, at)
    flops = tm.train_flops_per_token(cfg.model, cfg.data.seq_len) * info["global_tokens_per_step"]
    on_accelerator = target is not None
    total = report["compiled_gb"]["total"] if on_accelerator else info["analytic_gb"]["total"]
    peak = tm.peak_flops_of_kind(report["device_kind"]) if on_accelerator else None
    return {
        "job": "train",
        "model": f"ESM-2 {size_label(cfg.model.num_params())}",
        "params": cfg.model.num_params(),
        "mesh": sizes,
        "rules": cfg.mesh.rules if isinstance(cfg.mesh.rules, str) else "custom",
        "remat": cfg.model.remat,
        "dtype": cfg.model.dtype,
        "attention": cfg.model.attention,
        **info,
        **report,
        "flops_per_step_analytic": flops,
        "step_seconds_at_peak_estimate": flops / (peak * len(at.devices)) if peak else None,
        "fits": total <= at.memory_gb,
    }


def plan_inference(
    job: str,
    model_cfg: Any,
    rows: int,
    length: int,
    target: Any = None,
    device_memory_gb: float = 80.0,
) -> dict[str, Any]:
    """Compiles one ``embed`` pass of the ESM-2 ``model_cfg`` (over all of the target's devices,
    the mesh ``embed`` itself would choose) or one ``fold`` pass of the ESMFold ``model_cfg`` (on
    one device, as ``esmjax fold`` runs with one local device) for ``rows`` x ``length``
    residues."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from esmjax.inference.engine import Engine, embed_pass
    from esmjax.inference.fold import fold_pass
    from esmjax.io.checkpoint import restore_target
    from esmjax.models import esm2
    from esmjax.models.esmfold.model import abstract_model as esmfold_abstract
    from esmjax.parallel import sharding as shd

    at = where(target, 1, device_memory_gb)
    if job == "fold":
        graphdef, state = esmfold_abstract(model_cfg)
        devices, rules = at.devices[:1], shd.resolve_rules("dp")
        mesh = shd.target_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices)
    else:
        graphdef, state = esm2.abstract_model(model_cfg)
        rules = shd.resolve_rules("fsdp")
        mesh = shd.fit_mesh(state, rules, at.devices)
    placed = restore_target(state, mesh, rules)
    nnx.replace_by_pure_dict(state, placed)
    engine = Engine(nnx.merge(graphdef, state), mesh, rules)
    rows = max(rows, engine.row_multiple) if job == "embed" else rows
    if job == "fold":
        shapes = [jax.ShapeDtypeStruct((rows, length), d) for d in (jnp.int32, jnp.float32)]
        args = (shapes[0], shapes[1], shapes[0], None, None)
        fn, statics, params = fold_pass, (3, 4), model_cfg.esm.num_params()
    else:
        tokens = jax.ShapeDtypeStruct((rows, length + 2), jnp.int32)  # + <cls>, <eos>
        args = (tokens, (model_cfg.num_layers,), False, False)
        fn, statics, params = embed_pass, (1, 2, 3), model_cfg.num_params()
    t0 = time.perf_counter()
    compiled = engine.compile(fn, args, statics)
    report = _report(compiled, round(time.perf_counter() - t0, 1), at)
    return {
        "job": job,
        "model": "ESMFold" if job == "fold" else f"ESM-2 {size_label(params)}",
        "params": params,
        "mesh": shd.mesh_sizes(mesh),
        "rows": rows,
        "length": length,
        **report,
        "fits": report["compiled_gb"]["total"] <= at.memory_gb,
    }


def size_label(params: int) -> str:
    return f"{params / 1e9:.2f}B" if params >= 1e9 else f"{params / 1e6:.1f}M"


def _fmt_collectives(p: dict[str, Any]) -> list[str]:
    rows = p.get("collectives") or []
    if not rows:
        return ["collectives per step: none"]
    lines = ["collectives per step (count, GiB of full arrays moved, async):"]
    for r in rows:
        lines.append(
            f"  {r['op']:<18} {r['dtype']:<5} {r['count']:>7,}  {r['bytes'] / GB:10.2f} GiB  "
            f"async {r['async_count']}/{r['count']}"
        )
    if p.get("collectives_unknown_trip_count"):
        lines.append("  (a loop of unknown trip count counted once)")
    return lines


def _fmt_kernels(p: dict[str, Any]) -> str:
    found = p.get("kernels") or {}
    if not found:
        return "attention kernel in the compiled program: none (XLA attention)"
    return "attention kernel in the compiled program: " + ", ".join(
        f"{k} ({n} custom calls)" for k, n in found.items()
    )


def format_plan(p: dict[str, Any]) -> str:
    c = p["compiled_gb"]
    head = f"{p['model']} | {p['job']} | mesh {p['mesh']}"
    if p["job"] == "train":
        head += (
            f" rules {p['rules']} | remat {p['remat']} | {p['dtype']} | attention {p['attention']}"
        )
    lines = [head, f"compiled by {p['compiler']} for {p['target'] or ''} {p['device_kind']}"]
    accelerator = p["target"] is not None
    if p["job"] == "train":
        a = p["analytic_gb"]
        lines += [
            f"batch: {p['global_tokens_per_step']:,} tokens/step = {p['accumulation_steps']} "
            f"accumulation step(s) x {p['micro_rows_global']} rows ({p['rows_per_batch_shard']} "
            "per batch shard)",
            "memory per device (GiB)     analytic      compiled"
            + ("" if accelerator else " (XLA:CPU: not an accelerator's figure)"),
            f"  parameters                {a['params']:8.2f}      arguments {c['arguments']:8.2f}",
            f"  optimizer state           {a['optimizer']:8.2f}      outputs   {c['outputs']:8.2f} "
            f"(aliased {c['aliased']:.2f})",
            f"  gradients (+accumulator)  {a['gradients']:8.2f}      temp      {c['temp']:8.2f}",
            f"  activations               {a['activations']:8.2f}",
            f"  total                     {a['total']:8.2f}      total     {c['total']:8.2f}",
            f"FLOPs/step: {p['flops_per_step_analytic']:.3e} analytic (all devices)",
        ]
        if p.get("step_seconds_at_peak_estimate"):
            lines.append(
                f"  estimate, not a measurement: {p['step_seconds_at_peak_estimate']:.2f} s/step "
                "at 100% of the chips' bf16 peak"
            )
    else:
        lines.append(
            f"{p['rows']} rows x {p['length']} residues: compiled memory per device "
            f"{c['total']:.2f} GiB (arguments {c['arguments']:.2f}, temp {c['temp']:.2f})"
        )
    if p.get("flops_per_device") is not None:
        lines.append(f"compiler's cost analysis: {p['flops_per_device']:.3e} FLOPs per device "
                     "(each loop body once)")  # fmt: skip
    lines += [_fmt_kernels(p), *_fmt_collectives(p)]
    basis = "compiled" if accelerator or p["job"] != "train" else "analytic"
    lines.append(
        f"fits {p['device_memory_gb']:.1f} GiB devices: {'YES' if p['fits'] else 'NO'} ({basis} "
        f"total; compiled in {p['compile_seconds']} s)"
    )
    return "\n".join(lines)


def plan_run(
    config: str | None,
    overrides: list[str],
    mesh: str | None = None,
    devices: int | None = None,
    device_memory_gb: float = 80.0,
    json_out: str | None = None,
    target: str | None = None,
    slices: int = 1,
    job: str = "train",
    model: str | None = None,
    rows: int = 1,
    length: int | None = None,
) -> dict[str, Any]:
    """``esmjax plan``: everything is checked before a compiler starts; then the program of ``job``
    is compiled for ``target`` (or on host CPU devices: ``mesh``'s size, or ``devices``) and the
    plan printed and returned."""
    import jax

    from esmjax.parallel.targets import parse_target

    tgt = parse_target(target, slices) if target else None
    if tgt is not None:
        from esmjax.parallel import xla_flags

        xla_flags.apply(tgt.chip.platform)  # the launchers' flags: compile what they run
    sizes = parse_mesh(mesh) if mesh else None
    if job == "train" and not config:
        raise InputError("--job train needs --config")
    if tgt is None and job == "train" and sizes is None:
        raise InputError("--mesh is needed without --target (host CPU devices stand in)")
    if tgt and sizes and math.prod(sizes.values()) != tgt.num_devices:
        raise InputError(
            f"--mesh {mesh} has {math.prod(sizes.values())} devices; {tgt.name} has "
            f"{tgt.num_devices}"
        )
    if json_out and (
        os.path.isdir(json_out) or not os.path.isdir(os.path.dirname(json_out) or ".")
    ):
        raise InputError(f"--json {json_out}: not a file in an existing folder")
    cfg, model_cfg = _configs(config, overrides, job, model)
    n = devices or (math.prod(sizes.values()) if sizes else 1)
    try:
        # The GPU compiler must not look for a driver; the TPU one runs without a TPU either way.
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:
        print(
            f"JAX is already initialised; planning on its {jax.device_count()} devices",
            file=sys.stderr,
        )
    if job == "train":
        result = plan(cfg, sizes, device_memory_gb, tgt)
    else:
        length = length or (384 if job == "fold" else 1022)
        result = plan_inference(job, model_cfg, rows, length, tgt, device_memory_gb)
    print(format_plan(result))
    if json_out:
        with open(json_out, "w") as f:
            json.dump(result, f, indent=2)
    return result


def _configs(config: str | None, overrides: list[str], job: str, model: str | None) -> tuple:
    """The training config (train), or the model of an inference job: ``--model`` (an ESM-2
    preset, or ``esmfold_v1``) or the config's model; a fold on an ESM-2 config folds with
    ESMFold's trunk on that stem."""
    import dataclasses as dc

    from esmjax.config import load_config
    from esmjax.config.model import esm2_preset
    from esmjax.models.esmfold.config import ESMFOLD_PRESETS

    cfg = load_config(config, overrides) if config else None
    if job == "train":
        return cfg, None
    if model in ESMFOLD_PRESETS:
        if job != "fold":
            raise InputError(f"--model {model} is an ESMFold; --job embed takes an ESM-2 preset")
        return cfg, ESMFOLD_PRESETS[model]
    stem = esm2_preset(model) if model else cfg.model if cfg else None
    if job == "fold":
        return cfg, (ESMFOLD_PRESETS["esmfold_v1"] if stem is None else dc.replace(
            ESMFOLD_PRESETS["esmfold_v1"], esm=stem))  # fmt: skip
    if stem is None:
        raise InputError("--job embed needs --config or --model (an ESM-2 preset)")
    return cfg, stem
