"""Supervised fine-tuning of ESM-2 (``esmjax finetune``): a task head on any backbone, in full,
LoRA or frozen mode, on the pretraining machinery (mesh and rules, gradient accumulation,
asynchronous Orbax checkpoints with exact resume, SIGTERM within one step
(``esmjax/train/preemption.py``), ``metrics.jsonl``, TensorBoard, the progress bar). The workdir and
every input file may be a bucket URL (``esmjax.io.paths``).

The run, top to bottom: data (``esmjax.io.labeled``) -> targets -> model (``TaskModel``: backbone
+ head, LoRA attached) -> initial weights (the backbone from its checkpoint, head and adapters
fresh, B = 0) -> split into the trainable part (the train state: what the optimizer updates and
checkpoints store) and the frozen part (held on the mesh, never stored) -> (step, log, validate,
keep the best, save)* -> the best checkpoint scored on validation and test -> ``report.json``.

What is trainable: ``full`` every weight but the rotary buffers and the unused masked-LM and
contact heads; ``lora`` the ``nnx.LoRAParam`` adapters and the head; ``frozen`` the head alone.
A run's own checkpoints hold that part only (``W/checkpoints``; the best validation step under
``W/best``); the rest is re-read from the backbone on restore.

A regression head's output bias starts at the training targets' mean (the rest of the head at
HF's initialisation), so step 0 predicts the mean baseline instead of 0.

Losses: cross-entropy (single label), sigmoid BCE per label (multi-label), MSE (regression), per-
residue cross-entropy on scored positions; each summed over the whole step and divided by the
step's count, as pretraining's loss, so the update is independent of how the batch is split.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from esmjax.config import CheckpointConfig, FinetuneConfig, to_dict
from esmjax.evaluate import finetune_metrics as fm
from esmjax.inference.engine import Engine
from esmjax.inference.task import Setup, count, merge_trees, predict, split_tree
from esmjax.io import labeled, paths
from esmjax.io.checkpoint import pure_dict_shardings
from esmjax.io.lock import run_lease
from esmjax.parallel import platform as plat
from esmjax.parallel import sharding as shd
from esmjax.train import metrics as tm
from esmjax.train.checkpoints import TrainCheckpointer
from esmjax.train.finetune_data import Encoded, Targets, train_batch
from esmjax.train.optim import make_finetune_optimizer
from esmjax.train.preemption import StopSignal, flag_inputs, read_agreed, with_stop_flag
from esmjax.train.state import TrainState, shardings_for
from esmjax.train.step import guarded_update

log = logging.getLogger("esmjax.finetune")

Tree = dict[str, Any]


# --------------------------------------------------------------------------------------------------
# Loss and step
# --------------------------------------------------------------------------------------------------
def loss_sums(task: str, multi: bool, out: jax.Array, batch: dict) -> dict[str, jax.Array]:
    """Summed loss, the count it is averaged over, and summed correct predictions."""
    w = batch["weights"]
    y = batch["labels"]
    if task == "sequence_regression":
        per = jnp.square(out - y).sum(-1)
        return {
            "loss_sum": (per * w).sum(),
            "count": w.sum() * out.shape[-1],
            "correct": 0.0 * w.sum(),
        }
    if multi:
        per = optax.sigmoid_binary_cross_entropy(out, y)
        correct = ((out > 0) == (y > 0.5)).astype(jnp.float32).sum(-1)
        n = out.shape[-1]
        return {
            "loss_sum": (per.sum(-1) * w).sum(),
            "count": w.sum() * n,
            "correct": (correct * w).sum(),
        }
    labels = jnp.maximum(y, 0)  # residue IGNORE (-1) positions have weight 0
    ce = optax.softmax_cross_entropy_with_integer_labels(out, labels)
    correct = (jnp.argmax(out, -1) == labels).astype(jnp.float32)
    return {"loss_sum": (ce * w).sum(), "count": w.sum(), "correct": (correct * w).sum()}


def make_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    lrs: tuple[optax.Schedule, optax.Schedule],
    task: str,
    multi: bool,
    skip_nonfinite: bool = False,
) -> Callable:
    """``step(state, frozen, batch) -> (state, metrics)``; batch arrays are [A, R, ...]."""

    def sums(trainable: Tree, frozen: Tree, micro: dict) -> tuple[jax.Array, dict]:
        model = nnx.merge(graphdef, nnx.State(merge_trees(trainable, frozen)))
        s = loss_sums(task, multi, model(micro["tokens"]), micro)
        return s["loss_sum"], s

    grad_fn = jax.grad(sums, has_aux=True)

    def step(state: TrainState, frozen: Tree, batch: dict) -> tuple[TrainState, dict]:
        def accumulate(carry, micro):
            grads, totals = carry
            g, s = grad_fn(state.variables, frozen, micro)
            return (jax.tree.map(jnp.add, grads, g), {k: totals[k] + s[k] for k in totals}), None

        zeros = jax.tree.map(jnp.zeros_like, state.variables)
        init = {k: jnp.zeros((), jnp.float32) for k in ("loss_sum", "count", "correct")}
        (grads, totals), _ = jax.lax.scan(accumulate, (zeros, init), batch)
        n = jnp.maximum(totals["count"], 1.0)
        grads = jax.tree.map(lambda g: g / n, grads)
        loss = totals["loss_sum"] / n
        variables, opt_state = guarded_update(tx, grads, state, loss, skip_nonfinite)
        metrics = {
            "loss": loss,
            "grad_norm": optax.global_norm(grads),
            "lr": lrs[0](state.step),
            "head_lr": lrs[1](state.step),
        }
        if task != "sequence_regression":
            metrics["train_accuracy"] = totals["correct"] / n
        return TrainState(step=state.step + 1, variables=variables, opt_state=opt_state), metrics

    return step


# --------------------------------------------------------------------------------------------------
# Predictions (validation, test, ``esmjax predict``)
# --------------------------------------------------------------------------------------------------
def score(engine: Engine, data: Encoded, task: str, multi: bool) -> tuple[dict, np.ndarray]:
    """Metrics of ``data`` and the stacked outputs."""
    outs = predict(engine, data.tokens)
    if task == "residue_classification":
        y = np.concatenate(data.targets)
        o = np.concatenate(outs)
        keep = y >= 0
        return fm.residue(o[keep], y[keep]), o
    o = np.stack(outs)
    return fm.for_task(task, multi, o, data.stacked_targets()), o


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------
def _put(batch: dict, accum: int, sharding: NamedSharding) -> dict:
    out = {}
    for k, v in batch.items():
        v = v.reshape(accum, -1, *v.shape[1:])
        s = NamedSharding(sharding.mesh, P(None, sharding.spec[0], *([None] * (v.ndim - 2))))
        out[k] = jax.make_array_from_callback(v.shape, s, lambda idx, v=v: v[idx])
    return out


def run(
    cfg: FinetuneConfig,
    workdir: str | Path,
    *,
    progress: bool = True,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Fine-tunes (or resumes) ``cfg`` in ``workdir``; returns the final report."""
    workdir = paths.path(workdir)  # a local folder or a bucket URL (gs://)
    saved = workdir / "config.json"
    with paths.remote_errors(workdir):
        found = saved.exists()
    if found:  # a resumed run must be the same model and task
        old = json.loads(saved.read_text()).get("finetune", {})
        new = to_dict(cfg)
        keys = ("backbone", "task", "multi_label", "head", "mode", "lora")
        diff = [k for k in keys if old.get(k) != new[k]]
        if diff:
            raise labeled.LabeledDataError(
                f"{workdir} holds a fine-tuning run with other {', '.join(diff)}; "
                "use a new --workdir"
            )
    with run_lease(workdir):  # one run per workdir (esmjax.io.lock)
        return _finetune(cfg, workdir, progress, stop_after)


def _finetune(
    cfg: FinetuneConfig, workdir: Path, progress: bool, stop_after: int | None
) -> dict[str, Any]:
    plat.log_startup(cfg.dtype)
    splits, skipped = labeled.load(cfg.data, cfg.task)
    targets = Targets(cfg, splits["train"])
    skip = cfg.data.skip_invalid
    data = {s: Encoded(splits[s], targets, skip, skipped) for s in labeled.SPLITS}
    if skipped:
        log.warning("skipped rows: %s", dict(skipped))
    log.info("examples: %s", {s: len(d) for s, d in data.items()})
    setup = Setup(cfg, targets.labels, targets.num_outputs)

    mesh = shd.make_mesh(cfg.mesh)
    rules = shd.resolve_rules(cfg.mesh.rules)
    row_axes = shd.batch_sharding(mesh, rules, 1)
    spec = row_axes.spec[0]
    names = () if spec is None else (spec,) if isinstance(spec, str) else spec
    batch_devices = int(np.prod([shd.mesh_sizes(mesh)[a] for a in names])) if names else 1
    per_device = cfg.data.rows_per_device or max(1, cfg.data.batch_size // batch_devices)
    micro = per_device * batch_devices
    if cfg.data.batch_size % micro:
        raise labeled.LabeledDataError(
            f"data.batch_size={cfg.data.batch_size} does not split into micro-batches of "
            f"{per_device} rows x {batch_devices} devices"
        )
    accum = cfg.data.batch_size // micro

    abstract_vars = setup.abstract.to_pure_dict()
    trainable_abs, frozen_abs = split_tree(abstract_vars, setup.trainable)
    all_shardings = pure_dict_shardings(setup.abstract, mesh, rules)
    train_sh, frozen_sh = split_tree(all_shardings, setup.trainable)
    tx, lr_b, lr_h = make_finetune_optimizer(cfg.optim, cfg.head_lr, cfg.num_steps, trainable_abs)
    shardings = shardings_for(train_sh, trainable_abs, tx, mesh)
    sizes = f"{count(trainable_abs) / 1e6:.3f}M trainable, {count(frozen_abs) / 1e6:.3f}M frozen"
    log.info("mode %s: %s parameters (checkpoints store the trainable part)", cfg.mode, sizes)
    if jax.process_index() == 0:
        print(
            f"fine-tuning ({cfg.task}, {cfg.mode}): {count(trainable_abs):,} trainable parameters "
            f"stored per checkpoint ({4 * count(trainable_abs) / 2**20:.2f} MiB float32), "
            f"{count(frozen_abs):,} frozen",
            flush=True,
        )

    ckptr = TrainCheckpointer(workdir, cfg.checkpoint)
    best_ckptr = TrainCheckpointer(workdir / "best", CheckpointConfig(keep=1, async_save=False))
    target = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32),
        variables=trainable_abs,
        opt_state=jax.eval_shape(tx.init, trainable_abs),
    )
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), target, shardings
    )
    with shd.use_mesh(mesh, rules):
        restored = ckptr.restore(target)
        if restored is None or cfg.mode != "full":
            init = setup.initial(mesh, rules, cfg.seed)
            trainable0, frozen = split_tree(init, setup.trainable)
        else:
            trainable0, frozen = None, {}
        if restored is None:
            if cfg.task == "sequence_regression":  # start at the training mean, not at 0
                head = trainable0["classifier"]["out_proj"]
                mean = data["train"].stacked_targets().mean(0)
                head["bias"] = jax.device_put(mean.astype(np.float32), head["bias"].sharding)
            state = jax.jit(
                lambda v: TrainState(jnp.zeros((), jnp.int32), v, tx.init(v)),
                out_shardings=shardings,
            )(trainable0)
            start, meta = 0, {}
        else:
            state, meta = restored
            start = int(meta["step"])
            log.info("resumed from step %d", start)
        if jax.process_index() == 0:
            with paths.remote_errors(workdir):
                workdir.mkdir(parents=True, exist_ok=True)
                (workdir / "config.json").write_text(json.dumps(setup.config_json(), indent=2))

        # step(state, frozen, batch, flags) -> (state, metrics, stop): the stop flag of every
        # process agreed inside the step (esmjax/train/preemption.py)
        step_fn = jax.jit(
            with_stop_flag(
                make_step(
                    setup.graphdef,
                    tx,
                    (lr_b, lr_h),
                    cfg.task,
                    cfg.multi_label,
                    skip_nonfinite=cfg.nonfinite == "skip",
                )
            ),
            out_shardings=(shardings, None, NamedSharding(mesh, P())),
            donate_argnums=0,
        )
        flags = flag_inputs(mesh)
        engine = Engine(
            nnx.merge(setup.graphdef, nnx.State(merge_trees(state.variables, frozen))), mesh, rules
        )

        def validate(variables: Tree, split: str) -> dict:
            if not len(data[split]):
                return {}
            engine.set_variables(merge_trees(variables, frozen))
            metrics, _ = score(engine, data[split], cfg.task, cfg.multi_label)
            return {f"{split}_{k}": v for k, v in metrics.items()}

        writer = tm.MetricsWriter(workdir, start, enabled=jax.process_index() == 0)
        key = f"valid_{cfg.metric}"
        lower_better = cfg.metric in ("rmse", "loss")
        best = meta.get("best", {"value": None, "step": 0, "since": 0})
        stopped_early = bool(meta.get("early_stopped", False))

        def check_validation(state: TrainState) -> None:
            """Validation of ``state``: the best step so far (saved under ``W/best``) and the
            early stop."""
            nonlocal best, stopped_early
            at = int(state.step)
            ev = validate(state.variables, "valid")
            if key in ev:
                value = ev[key]
                better = best["value"] is None or (
                    value < best["value"] if lower_better else value > best["value"]
                )
                if better and np.isfinite(value):
                    best = {"value": value, "step": at, "since": 0}
                    # already there when a killed run replays this step: the same weights
                    if best_ckptr.latest_step() != at:
                        best_ckptr.save(state, {"best": best})
                else:
                    best["since"] += 1
                ev["best_" + key] = best["value"]
                stopped_early = bool(cfg.patience and best["since"] >= cfg.patience)
            writer.write(at, ev)

        def next_batch(at: int) -> tuple[dict, int]:
            """Step ``at``'s batch (0-based: the order is a function of the step) on the mesh."""
            b = train_batch(data["train"], at, cfg.data.batch_size, cfg.data.seed)
            return _put(b, accum, row_axes), int(b["tokens"].size)

        if meta.get("pending_eval") and not stopped_early:
            # preempted at a validation step, which was skipped to save in time: it comes first
            check_validation(state)
        bar = tqdm(
            total=cfg.num_steps,
            initial=start,
            desc="finetune",
            unit="step",
            file=sys.stderr,
            disable=not progress or jax.process_index() != 0,
            dynamic_ncols=True,
        )
        step = start
        since, since_step, tokens_since = time.perf_counter(), start, 0
        signals = StopSignal()
        signals.step = step
        preempted = False
        try:
            if step < cfg.num_steps and not stopped_early:
                batch, batch_tokens = next_batch(step)
            while step < cfg.num_steps and not stopped_early:
                step += 1
                signals.step = step
                state, m, agreed = step_fn(state, frozen, batch, flags[signals.flag])
                agreed.copy_to_host_async()
                tokens_since += batch_tokens
                if step < cfg.num_steps:  # prepared while the step runs
                    batch, batch_tokens = next_batch(step)
                bar.update(1)
                # waits for this step; the same values on every process
                preempted = read_agreed(agreed, step, cfg.nonfinite, ckptr.latest_step)
                if step % cfg.log_every == 0 or step == cfg.num_steps:
                    m = {k: float(v) for k, v in jax.device_get(m).items()}
                    now = time.perf_counter()  # padding included; includes compilation at first
                    m["tokens_per_second"] = tokens_since / max(now - since, 1e-9)
                    m["step_seconds"] = (now - since) / max(step - since_step, 1)
                    since, since_step, tokens_since = now, step, 0
                    writer.write(step, m)
                    bar.set_postfix(loss=f"{m['loss']:.4f}")
                due = bool(cfg.eval_every) and (step % cfg.eval_every == 0 or step == cfg.num_steps)
                # On preemption the checkpoint comes first: the validation (which could outlast
                # the grace period) is marked pending and run by the resumed run.
                if due and not preempted:
                    check_validation(state)
                stop = preempted or stopped_early
                if stop_after is not None and step - start >= stop_after:
                    stop = True
                if step % cfg.checkpoint.every == 0 or step == cfg.num_steps or stop:
                    meta_out = {
                        "best": best,
                        "early_stopped": stopped_early,
                        "pending_eval": due and preempted,
                        "config": to_dict(cfg),
                    }
                    ckptr.save(state, meta_out)
                if stop and not stopped_early:
                    log.warning(
                        "stopping at step %d: checkpoint written; run again to resume", step
                    )
                    break
        finally:
            bar.close()
            signals.restore()
            ckptr.close()
        if stopped_early:
            log.info(
                "early stop at step %d: no better %s for %d evaluations", step, key, cfg.patience
            )
        if preempted or (step < cfg.num_steps and not stopped_early):
            writer.close()
            best_ckptr.close()
            return {"step": step, "preempted": preempted}

        # the final report: the best validation step (else the last) on validation and test
        final_vars, final_step = state.variables, step
        if best_ckptr.latest_step() is not None:
            restored_best = best_ckptr.restore(target)
            if restored_best is not None:
                final_vars, final_step = restored_best[0].variables, int(restored_best[1]["step"])
        best_ckptr.close()
        report: dict[str, Any] = {"task": cfg.task, "mode": cfg.mode, "checkpoint_step": final_step}
        for split in ("valid", "test"):
            report.update(validate(final_vars, split))
        train_targets = data["train"].stacked_targets()
        for split in ("valid", "test"):
            d = data[split]
            if not len(d):
                continue
            y = d.stacked_targets()
            if cfg.task == "residue_classification":
                y = y[y >= 0]
                tr = train_targets[train_targets >= 0]
                base = fm.baseline_outputs("seq", False, tr, len(y), targets.num_outputs)
                scores = fm.residue(base, y)
            else:
                base = fm.baseline_outputs(
                    cfg.task, cfg.multi_label, train_targets, len(y), targets.num_outputs
                )
                scores = fm.for_task(cfg.task, cfg.multi_label, base, y)
            report.update({f"baseline_{split}_{k}": v for k, v in scores.items()})
        report.update(
            examples={s: len(d) for s, d in data.items()},
            skipped=dict(skipped),
            trainable_parameters=count(trainable_abs),
            frozen_parameters=count(frozen_abs),
            labels=list(targets.labels),
        )
        writer.write(
            step, {k: v for k, v in report.items() if k.startswith(("test_", "baseline_test"))}
        )
        writer.close()
        if jax.process_index() == 0:
            clean = json.loads(json.dumps(report, default=float).replace("NaN", "null"))
            with paths.remote_errors(workdir):
                (workdir / "report.json").write_text(json.dumps(clean, indent=2))
            shown = [k for k in report if k.startswith("test_")]
            nan = float("nan")
            line = ", ".join(
                f"{k[5:]} {report[k]:.3f} (baseline {report.get('baseline_' + k, nan):.3f})"
                for k in shown
            )
            print(f"test (step {final_step}): {line or 'no test rows'}", flush=True)
        report["step"] = step
        return report
