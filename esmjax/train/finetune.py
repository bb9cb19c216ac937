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

import logging
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from esmjax.config import CheckpointConfig, FinetuneConfig, to_dict
from esmjax.evaluate import finetune_metrics as fm
from esmjax.evaluate import report as reports
from esmjax.inference.engine import Engine
from esmjax.inference.task import Setup, count, merge_trees, predict, split_tree
from esmjax.io import labeled, paths
from esmjax.io.checkpoint import pure_dict_shardings
from esmjax.io.lock import run_lease
from esmjax.models.alphabet import PAD
from esmjax.parallel import platform as plat
from esmjax.parallel import sharding as shd
from esmjax.train import harness
from esmjax.train import metrics as tm
from esmjax.train.batching import Batching, Placement
from esmjax.train.checkpoints import TrainCheckpointer
from esmjax.train.finetune_data import Encoded, Targets, train_batch
from esmjax.train.optim import make_finetune_optimizer
from esmjax.train.preemption import with_stop_flag
from esmjax.train.state import TrainState, abstract_state_of, shardings_for
from esmjax.train.step import make_step

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


def make_task_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    lrs: tuple[optax.Schedule, optax.Schedule],
    task: str,
    multi: bool,
    skip_nonfinite: bool = False,
):
    """``step(state, batch, frozen) -> (state, metrics)``; batch arrays are [A, R, ...]."""

    def sums(trainable: Tree, micro: dict, frozen: Tree) -> dict[str, jax.Array]:
        model = nnx.merge(graphdef, nnx.State(merge_trees(trainable, frozen)))
        return loss_sums(task, multi, model(micro["tokens"]), micro)

    def metrics(step: jax.Array, loss: jax.Array, totals: dict) -> dict[str, jax.Array]:
        out = {"loss": loss, "lr": lrs[0](step), "head_lr": lrs[1](step)}
        if task != "sequence_regression":
            out["train_accuracy"] = totals["correct"] / jnp.maximum(totals["count"], 1.0)
        return out

    return make_step(sums, tx, metrics, skip_nonfinite)


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
SAME_RUN = ("backbone", "task", "multi_label", "head", "mode", "lora")


def run(
    cfg: FinetuneConfig,
    workdir: str | Path,
    *,
    progress: bool = True,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Fine-tunes (or resumes) ``cfg`` in ``workdir``; returns the final report."""
    workdir = paths.path(workdir)  # a local folder or a bucket URL (gs://)
    old = harness.saved_config(workdir)
    if old is not None:  # a resumed run must be the same model and task
        old, new = old.get("finetune", {}), to_dict(cfg)
        diff = [k for k in SAME_RUN if old.get(k) != new[k]]
        if diff:
            raise labeled.LabeledDataError(
                f"{workdir} holds a fine-tuning run with other {', '.join(diff)}; "
                "use a new --workdir"
            )
    with run_lease(workdir):  # one run per workdir (esmjax.io.lock)
        return _finetune(cfg, workdir, progress, stop_after)


class Validation:
    """Scores of the validation and test splits; on validation, the best step so far (saved
    under ``W/best``) and the early stop."""

    def __init__(self, cfg, data, engine, frozen, writer, best_ckptr, meta):
        self.cfg, self.data, self.engine, self.frozen = cfg, data, engine, frozen
        self.writer, self.best_ckptr = writer, best_ckptr
        self.key = f"valid_{cfg.metric}"
        self.lower_better = cfg.metric in ("rmse", "loss")
        self.best = meta.get("best", {"value": None, "step": 0, "since": 0})
        self.stopped_early = bool(meta.get("early_stopped", False))

    def scores(self, variables: Tree, split: str) -> dict:
        if not len(self.data[split]):
            return {}
        self.engine.set_variables(merge_trees(variables, self.frozen))
        metrics, _ = score(self.engine, self.data[split], self.cfg.task, self.cfg.multi_label)
        return {f"{split}_{k}": v for k, v in metrics.items()}

    def check(self, state: TrainState, at: int) -> None:
        ev = self.scores(state.variables, "valid")
        if self.key in ev:
            value, best = ev[self.key], self.best
            better = best["value"] is None or (
                value < best["value"] if self.lower_better else value > best["value"]
            )
            if better and np.isfinite(value):
                self.best = {"value": value, "step": at, "since": 0}
                # already there when a killed run replays this step: the same weights
                if self.best_ckptr.latest_step() != at:
                    self.best_ckptr.save(state, {"best": self.best})
            else:
                best["since"] += 1
            ev["best_" + self.key] = self.best["value"]
            self.stopped_early = bool(self.cfg.patience and self.best["since"] >= self.cfg.patience)
        self.writer.write(at, ev)

    def meta(self, pending: bool) -> dict:
        return {
            "best": self.best,
            "early_stopped": self.stopped_early,
            "pending_eval": pending,
            "config": to_dict(self.cfg),
        }


def _data(cfg: FinetuneConfig) -> tuple[dict[str, Encoded], Targets, dict]:
    splits, skipped = labeled.load(cfg.data, cfg.task)
    targets = Targets(cfg, splits["train"])
    data = {s: Encoded(splits[s], targets, cfg.data.skip_invalid, skipped) for s in labeled.SPLITS}
    if skipped:
        log.warning("skipped rows: %s", dict(skipped))
    log.info("examples: %s", {s: len(d) for s, d in data.items()})
    return data, targets, skipped


def _announce(cfg: FinetuneConfig, trainable_abs: Tree, frozen_abs: Tree) -> None:
    sizes = f"{count(trainable_abs) / 1e6:.3f}M trainable, {count(frozen_abs) / 1e6:.3f}M frozen"
    log.info("mode %s: %s parameters (checkpoints store the trainable part)", cfg.mode, sizes)
    if jax.process_index() == 0:
        print(
            f"fine-tuning ({cfg.task}, {cfg.mode}): {count(trainable_abs):,} trainable parameters "
            f"stored per checkpoint ({4 * count(trainable_abs) / 2**20:.2f} MiB float32), "
            f"{count(frozen_abs):,} frozen",
            flush=True,
        )


def _start(cfg, ckptr, target, setup, tx, shardings, train, mesh, rules):
    """``(state, frozen, start, meta)``: the latest checkpoint, else a new state (the backbone
    from its checkpoint, head and adapters fresh). The frozen part is re-read from the backbone."""
    restored = ckptr.restore(target)
    trainable0, frozen = None, {}
    if restored is None or cfg.mode != "full":
        trainable0, frozen = split_tree(setup.initial(mesh, rules, cfg.seed), setup.trainable)
    if restored is not None:
        state, meta = restored
        log.info("resumed from step %d", int(meta["step"]))
        return state, frozen, int(meta["step"]), meta
    if cfg.task == "sequence_regression":  # start at the training mean, not at 0
        head = trainable0["classifier"]["out_proj"]
        mean = train.stacked_targets().mean(0)
        head["bias"] = jax.device_put(mean.astype(np.float32), head["bias"].sharding)
    state = jax.jit(
        lambda v: TrainState(jnp.zeros((), jnp.int32), v, tx.init(v)), out_shardings=shardings
    )(trainable0)
    return state, frozen, 0, {}


def _finetune(
    cfg: FinetuneConfig, workdir: Path, progress: bool, stop_after: int | None
) -> dict[str, Any]:
    plat.log_startup(cfg.dtype)
    data, targets, skipped = _data(cfg)
    setup = Setup(cfg, targets.labels, targets.num_outputs)
    mesh = shd.make_mesh(cfg.mesh)
    rules = shd.resolve_rules(cfg.mesh.rules)
    place = Placement(mesh, rules)
    rows = (cfg.data.batch_size, cfg.data.rows_per_device)
    batching = Batching(*rows, place.devices, place.share.count, "data.batch_size")
    trainable_abs, frozen_abs = split_tree(setup.abstract.to_pure_dict(), setup.trainable)
    train_sh, _ = split_tree(pure_dict_shardings(setup.abstract, mesh, rules), setup.trainable)
    tx, lr_b, lr_h = make_finetune_optimizer(cfg.optim, cfg.head_lr, cfg.num_steps, trainable_abs)
    shardings = shardings_for(train_sh, trainable_abs, tx, mesh)
    _announce(cfg, trainable_abs, frozen_abs)
    ckptr = TrainCheckpointer(workdir, cfg.checkpoint)
    best_ckptr = TrainCheckpointer(workdir / "best", CheckpointConfig(keep=1, async_save=False))
    target = abstract_state_of(trainable_abs, tx, shardings)
    with shd.use_mesh(mesh, rules):
        state, frozen, start, meta = _start(
            cfg, ckptr, target, setup, tx, shardings, data["train"], mesh, rules
        )
        harness.write_config(workdir, setup.config_json())
        task_step = make_task_step(
            setup.graphdef, tx, (lr_b, lr_h), cfg.task, cfg.multi_label, cfg.nonfinite == "skip"
        )
        # the stop flag of every process agreed inside the step (esmjax.train.preemption)
        step_fn = jax.jit(
            with_stop_flag(task_step),
            out_shardings=(shardings, None, NamedSharding(mesh, P())),
            donate_argnums=0,
        )
        engine = Engine(
            nnx.merge(setup.graphdef, nnx.State(merge_trees(state.variables, frozen))), mesh, rules
        )
        writer = tm.MetricsWriter(
            workdir, start, jax.process_index() == 0, cfg.metrics.wandb, to_dict(cfg)
        )
        valid = Validation(cfg, data, engine, frozen, writer, best_ckptr, meta)
        if meta.get("pending_eval") and not valid.stopped_early:
            # preempted at a validation step, which was skipped to save in time: it comes first
            valid.check(state, start)

        def batch(at: int) -> tuple[dict, int, float]:
            """Step ``at``'s batch (0-based: the order is a function of the step) on the mesh."""
            b = train_batch(data["train"], at, cfg.data.batch_size, cfg.data.seed)
            tokens = b["tokens"]
            return place.put_whole(b, batching.accum), tokens.size, float((tokens != PAD).mean())

        n = cfg.num_steps
        drive = harness.Drive(
            step=lambda st, b, flags: step_fn(st, b, frozen, flags),
            batch=batch,
            evaluate=valid.check,
            eval_due=lambda s: bool(cfg.eval_every) and (s % cfg.eval_every == 0 or s == n),
            meta=lambda step, position, pending: valid.meta(pending),
            postfix=lambda m: {"loss": f"{m['loss']:.4f}"},
            stopped=lambda: valid.stopped_early,
        )
        when = (n, cfg.log_every, cfg.checkpoint.every, cfg.nonfinite, stop_after, "finetune")
        out = harness.run_steps(
            drive,
            state,
            start,
            harness.Schedule(*when, progress, cfg.profile, workdir / "profile"),
            mesh,
            ckptr,
            writer,
        )
        if valid.stopped_early:
            log.info(
                "early stop at step %d: no better %s for %d evaluations",
                out.step,
                valid.key,
                cfg.patience,
            )
        if out.preempted or (out.step < n and not valid.stopped_early):
            writer.close()
            best_ckptr.close()
            return {"step": out.step, "preempted": out.preempted}
        report = _final_report(cfg, workdir, out, valid, target, data, targets)
        report.update(
            skipped=dict(skipped),
            trainable_parameters=count(trainable_abs),
            frozen_parameters=count(frozen_abs),
        )
        _write_report(workdir, report)
        report["step"] = out.step
        return report


def _final_report(cfg, workdir, out, valid: Validation, target, data, targets) -> dict[str, Any]:
    """The best validation step (else the last) scored on validation and test, beside the
    baselines that predict from the training targets alone."""
    log.info(  # restoring and two passes can take a while, with nothing else printed meanwhile
        "scoring the best step on valid and test (%d and %d records) ...",
        len(data["valid"]),
        len(data["test"]),
    )
    final_vars, final_step = out.state.variables, out.step
    if valid.best_ckptr.latest_step() is not None:
        restored_best = valid.best_ckptr.restore(target)
        if restored_best is not None:
            final_vars, final_step = restored_best[0].variables, int(restored_best[1]["step"])
    valid.best_ckptr.close()
    report: dict[str, Any] = {"task": cfg.task, "mode": cfg.mode, "checkpoint_step": final_step}
    for split in ("valid", "test"):
        report.update(valid.scores(final_vars, split))
    train_targets = data["train"].stacked_targets()
    for split in ("valid", "test"):
        if not len(data[split]):
            continue
        y = data[split].stacked_targets()
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
        labels=list(targets.labels),
    )
    shown = {k: v for k, v in report.items() if k.startswith(("test_", "baseline_test"))}
    valid.writer.write(out.step, shown)
    valid.writer.close()
    return report


def _write_report(workdir: Path, report: dict[str, Any]) -> None:
    """``report.json`` (NaN as null) and the test line."""
    reports.write(report, workdir / "report.json")
    if jax.process_index() == 0:
        shown = [k for k in report if k.startswith("test_")]
        nan = float("nan")
        line = ", ".join(
            f"{k[5:]} {report[k]:.3f} (baseline {report.get('baseline_' + k, nan):.3f})"
            for k in shown
        )
        print(f"test (step {report['checkpoint_step']}): {line or 'no test rows'}", flush=True)
