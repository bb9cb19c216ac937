"""Pretraining, top to bottom: mesh -> state -> restore -> the harness's steps (step, log,
evaluate, save; ``esmjax.train.harness``) -> final evaluation.

A run started again in the same workdir resumes from its latest complete checkpoint: parameters,
optimizer state, step and data-iterator state, so the loss trajectory continues exactly. SIGTERM or
SIGINT (preemption) saves the current step and exits cleanly within one step, on every process.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from esmjax.config import TrainConfig, config_hash, to_dict
from esmjax.data.pipeline import eval_batches, train_batches
from esmjax.errors import InputError
from esmjax.evaluate.perplexity import NoMaskedTokens, masked_lm
from esmjax.inference.engine import Engine
from esmjax.io import paths
from esmjax.io.convert import load_source_params
from esmjax.io.lock import run_lease
from esmjax.models.esm2 import abstract_model
from esmjax.parallel import platform as plat
from esmjax.parallel import sharding as shd
from esmjax.train import harness
from esmjax.train import metrics as tm
from esmjax.train.batching import Batching, Placement
from esmjax.train.checkpoints import TrainCheckpointer
from esmjax.train.optim import learning_rate, make_optimizer
from esmjax.train.preemption import flag_sharding, with_stop_flag
from esmjax.train.state import abstract_state, create_state, model_graphdef, state_shardings
from esmjax.train.step import make_train_step

log = logging.getLogger("esmjax.train")


def evaluate(cfg: TrainConfig, engine: Engine, variables: Any, micro_rows: int) -> dict:
    """Held-out masked-LM loss on fixed masks and its unigram baseline, by the one implementation
    that ``esmjax evaluate perplexity`` runs (``esmjax.evaluate.perplexity.masked_lm``)."""
    engine.set_variables(variables)
    batches = eval_batches(
        cfg.data,
        rows=micro_rows // engine.share.count,
        process_index=engine.share.index,
        process_count=engine.share.count,
    )
    try:
        ml = masked_lm(engine, batches, local=True)
    except NoMaskedTokens:
        return {}
    return {
        "eval_loss": ml["loss"],
        "eval_perplexity": ml["perplexity"],
        "eval_masked_accuracy": ml["masked_accuracy"],
        "eval_unigram_perplexity": ml["unigram_perplexity"],
        "eval_masked_tokens": ml["masked_tokens"],
    }


def run(
    cfg: TrainConfig, workdir: str | Path, *, progress: bool = True, stop_after: int | None = None
) -> dict[str, Any]:
    """Trains (or resumes) ``cfg`` in ``workdir``; returns the final metrics.

    ``stop_after``: leave (with a checkpoint) after this many steps of this invocation, e.g. to fit
    a scheduler's time slot; the next invocation resumes.
    """
    workdir = paths.path(workdir)  # a local folder or a bucket URL (gs://, s3://)
    old = harness.saved_config(workdir)
    if old is not None and old.get("model") != to_dict(cfg)["model"]:
        raise InputError(
            f"{workdir} holds a run of another model ({old.get('model')}); use a new "
            "--workdir to start afresh"
        )
    with run_lease(workdir):  # one run per workdir (esmjax.io.lock)
        return _train(cfg, workdir, progress, stop_after)


def _start(cfg: TrainConfig, ckptr: TrainCheckpointer, tx, shardings, mesh, rules, data):
    """``(state, start)``: the latest checkpoint (with the data position), else a new state
    (``init_from``'s weights where given)."""
    restored = ckptr.restore(abstract_state(cfg.model, tx, shardings))
    if restored is not None:
        state, meta = restored
        start = int(meta["step"])
        data.set_state(meta["data"])
        log.info("resumed from step %d", start)
        if start >= cfg.num_steps:
            log.info(
                "the run is complete (%d of %d steps); evaluating the final checkpoint",
                start,
                cfg.num_steps,
            )
        return state, start
    init = None
    if cfg.init_from:  # continued pretraining: weights from SRC, a fresh optimizer
        step = None if cfg.init_step < 0 else cfg.init_step
        init, what = load_source_params(cfg.init_from, cfg.model, mesh, rules, step)
        log.info("initialised from %s", what)
    state = create_state(cfg.model, tx, shardings, cfg.seed, variables=init)
    log.info("initialised %.2fM parameters", cfg.model.num_params() / 1e6)
    return state, 0


def _train(cfg: TrainConfig, workdir: Path, progress: bool, stop_after: int | None) -> dict:
    plat.log_startup(cfg.model.dtype)
    plat.use_compilation_cache(cfg.compile_cache, workdir)
    peak = tm.device_peak_flops(cfg.accelerator)  # per device, for MFU; None when unknown
    mesh = shd.make_mesh(cfg.mesh)
    rules = shd.resolve_rules(cfg.mesh.rules)
    graphdef = model_graphdef(cfg.model)
    tx = make_optimizer(cfg.optim, cfg.num_steps, abstract_model(cfg.model)[1].to_pure_dict())
    # Before anything else uses the mesh: refuses one that would leave the model replicated.
    shardings = state_shardings(
        cfg.model, tx, mesh, rules, allow_replicated=cfg.mesh.allow_replicated
    )
    place = Placement(mesh, rules)  # processes holding the same rows load the same rows
    batching = Batching.pretraining(cfg, mesh.size, place.share.count)
    log.info("mesh %s; %s", dict(zip(mesh.axis_names, mesh.devices.shape)), batching)
    data = train_batches(
        cfg.data,
        rows=batching.process_rows,
        process_index=place.share.index,
        process_count=place.share.count,
    )
    ckptr = TrainCheckpointer(workdir, cfg.checkpoint)
    with shd.use_mesh(mesh, rules):
        state, start = _start(cfg, ckptr, tx, shardings, mesh, rules, data)
        harness.write_config(workdir, to_dict(cfg))
        step_fn = jax.jit(
            with_stop_flag(
                make_train_step(
                    graphdef, tx, learning_rate(cfg.optim, cfg.num_steps), cfg.nonfinite == "skip"
                )
            ),
            in_shardings=(shardings, place.sharding, flag_sharding(mesh)),
            out_shardings=(shardings, None, NamedSharding(mesh, P())),
            donate_argnums=0,
        )
        engine = Engine(nnx.merge(graphdef, nnx.State(state.variables)), mesh, rules)
        writer = tm.MetricsWriter(
            workdir, start, jax.process_index() == 0, cfg.metrics.wandb, to_dict(cfg)
        )

        def batch(_: int) -> tuple[dict, int, float]:
            local = next(data)
            nonpad = float((local["segment_ids"] > 0).mean())
            return place.put(local, batching.accum), batching.global_rows * cfg.data.seq_len, nonpad

        def evaluate_at(state_: Any, step: int) -> None:
            writer.write(step, evaluate(cfg, engine, state_.variables, batching.micro_rows))

        meta = {"config_hash": config_hash(cfg), "config": to_dict(cfg)}
        drive = harness.Drive(
            step=step_fn,
            batch=batch,
            position=data.get_state,
            evaluate=evaluate_at,
            # the last step's evaluation is the final one, after the loop
            eval_due=lambda s: (
                bool(cfg.eval_every) and s % cfg.eval_every == 0 and s < cfg.num_steps
            ),
            meta=lambda step, position, pending: {"data": position, **meta},
            flops_per_token=tm.train_flops_per_token(cfg.model, cfg.data.seq_len),
            peak_flops=peak,
            postfix=lambda m: {
                "loss": f"{m['loss']:.3f}",
                "ppl": f"{m['perplexity']:.2f}",
                "lr": f"{m['lr']:.1e}",
            },
        )
        when = (cfg.num_steps, cfg.log_every, cfg.checkpoint.every, cfg.nonfinite, stop_after)
        out = harness.run_steps(
            drive,
            state,
            start,
            harness.Schedule(*when, "train", progress, cfg.profile, workdir / "profile"),
            mesh,
            ckptr,
            writer,
        )
        final: dict[str, Any] = dict(out.last)
        if out.step >= cfg.num_steps and not out.preempted:  # preempted: the next run evaluates
            ev = evaluate(cfg, engine, out.state.variables, batching.micro_rows)
            writer.write(out.step, ev)
            final.update(ev)
            _print_final(ev)
        writer.close()
    final["step"] = out.step
    final["preempted"] = out.preempted  # the command exits EXIT_PREEMPTED: run again to resume
    return final


def _print_final(ev: dict) -> None:
    if ev and jax.process_index() == 0:
        below = 100 * (1 - ev["eval_perplexity"] / ev["eval_unigram_perplexity"])
        versus = f"{below:.1f}% below" if below >= 0 else f"{-below:.1f}% above"
        print(
            f"held-out masked-LM perplexity {ev['eval_perplexity']:.2f} vs amino-acid "
            f"unigram baseline {ev['eval_unigram_perplexity']:.2f} ({versus}), "
            f"{ev['eval_masked_tokens']} masked tokens",
            flush=True,
        )
