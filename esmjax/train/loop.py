"""The training loop, top to bottom: mesh -> state -> restore -> (step, log, evaluate, save)* ->
final evaluation.

A run started again in the same workdir resumes from its latest complete checkpoint: parameters,
optimizer state, step and data-iterator state, so the loss trajectory continues exactly. SIGTERM or
SIGINT (preemption) saves the current step and exits cleanly within one step, on every process
(``esmjax/train/preemption.py``).

Each iteration dispatches step n, takes the data-iterator position after its batch, prepares the
batch of step n + 1 while step n runs, then reads step n's agreed stop flag (a scalar already on
its way to the host): the host waits for each step, and the device idles only while the next,
already prepared, step is dispatched. Metrics are fetched only every ``log_every`` steps.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

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
from esmjax.parallel.rows import RowShare, assemble, row_share
from esmjax.train import metrics as tm
from esmjax.train.batching import Batching
from esmjax.train.checkpoints import TrainCheckpointer
from esmjax.train.optim import learning_rate, make_optimizer
from esmjax.train.preemption import (
    StopSignal,
    flag_inputs,
    flag_sharding,
    read_agreed,
    with_stop_flag,
)
from esmjax.train.state import abstract_state, create_state, model_graphdef, state_shardings
from esmjax.train.step import make_train_step

log = logging.getLogger("esmjax.train")


def _global_batch(
    local: dict[str, np.ndarray], accum: int, sharding: jax.sharding.NamedSharding, share: RowShare
) -> dict:
    """This loader's rows [r, S] -> global arrays [A, R, S] sharded over the batch axes."""
    return {
        k: assemble(v.reshape(accum, -1, v.shape[-1]), sharding, share, dim=1)
        for k, v in local.items()
    }


def _check_workdir_config(workdir: Path, cfg: TrainConfig) -> None:
    path = workdir / "config.json"
    with paths.remote_errors(workdir):
        found = path.exists()
    if found:
        old = json.loads(path.read_text())
        if old.get("model") != to_dict(cfg)["model"]:
            raise InputError(
                f"{workdir} holds a run of another model ({old.get('model')}); use a new "
                "--workdir to start afresh"
            )


def _write_workdir_config(workdir: Path, cfg: TrainConfig) -> None:
    """Written once the run has started (data opened, state created or restored), so bad input
    leaves nothing."""
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        # replaced whole (a renamed temporary sibling): a full disk keeps the old one readable
        paths.write_text(workdir / "config.json", json.dumps(to_dict(cfg), indent=2))


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
      a scheduler's
    time slot; the next invocation resumes.
    """
    workdir = paths.path(workdir)  # a local folder or a bucket URL (gs://, s3://)
    _check_workdir_config(workdir, cfg)
    with run_lease(workdir):  # one run per workdir (esmjax.io.lock)
        return _train(cfg, workdir, progress, stop_after)


def _train(cfg: TrainConfig, workdir: Path, progress: bool, stop_after: int | None) -> dict:
    plat.log_startup(cfg.model.dtype)
    plat.use_compilation_cache(cfg.compile_cache, workdir)
    peak = tm.device_peak_flops(cfg.accelerator)  # per device, for MFU; None when unknown
    mesh = shd.make_mesh(cfg.mesh)
    rules = shd.resolve_rules(cfg.mesh.rules)
    graphdef = model_graphdef(cfg.model)
    abstract_vars = abstract_model(cfg.model)[1].to_pure_dict()
    tx = make_optimizer(cfg.optim, cfg.num_steps, abstract_vars)
    lr = learning_rate(cfg.optim, cfg.num_steps)
    # Before anything else uses the mesh: refuses one that would leave the model replicated.
    shardings = state_shardings(
        cfg.model, tx, mesh, rules, allow_replicated=cfg.mesh.allow_replicated
    )
    row_spec = shd.batch_sharding(mesh, rules, 2).spec
    batch_sharding = jax.sharding.NamedSharding(mesh, P(None, *row_spec))
    share = row_share(batch_sharding, dim=1)  # processes holding the same rows load the same rows
    batching = Batching(cfg, mesh.size, share.count)
    log.info("mesh %s; %s", dict(zip(mesh.axis_names, mesh.devices.shape)), batching)
    data = train_batches(
        cfg.data, rows=batching.process_rows, process_index=share.index, process_count=share.count
    )
    ckptr = TrainCheckpointer(workdir, cfg.checkpoint)
    with shd.use_mesh(mesh, rules):
        restored = ckptr.restore(abstract_state(cfg.model, tx, shardings))
        if restored is None:
            init = None
            if cfg.init_from:  # continued pretraining: weights from SRC, a fresh optimizer
                step_ = None if cfg.init_step < 0 else cfg.init_step
                init, what = load_source_params(cfg.init_from, cfg.model, mesh, rules, step_)
                log.info("initialised from %s", what)
            state = create_state(cfg.model, tx, shardings, cfg.seed, variables=init)
            start = 0
            log.info("initialised %.2fM parameters", cfg.model.num_params() / 1e6)
        else:
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

        _write_workdir_config(workdir, cfg)
        train_step = jax.jit(
            with_stop_flag(make_train_step(graphdef, tx, lr, cfg.nonfinite == "skip")),
            in_shardings=(shardings, batch_sharding, flag_sharding(mesh)),
            out_shardings=(shardings, None, jax.sharding.NamedSharding(mesh, P())),
            donate_argnums=0,
        )
        flags = flag_inputs(mesh)
        engine = Engine(nnx.merge(graphdef, nnx.State(state.variables)), mesh, rules)

        writer = tm.MetricsWriter(workdir, start, enabled=jax.process_index() == 0)
        flops_per_token = tm.train_flops_per_token(cfg.model, cfg.data.seq_len)
        tokens_per_step = batching.global_rows * batching.seq_len
        bar = tqdm(
            total=cfg.num_steps,
            initial=start,
            desc="train",
            unit="step",
            file=sys.stderr,
            disable=not progress or jax.process_index() != 0,
            dynamic_ncols=True,
        )
        last: dict[str, Any] = {}
        window = tm.ThroughputWindow()  # steps and time since the last log line, eval excluded
        step = start
        signals = StopSignal()
        signals.step = step
        preempted = False

        def next_batch() -> tuple[dict, float]:
            local = next(data)
            nonpad = float((local["segment_ids"] > 0).mean())
            return _global_batch(local, batching.accum, batch_sharding, share), nonpad

        try:
            if step < cfg.num_steps:
                batch, nonpad = next_batch()
            while step < cfg.num_steps:
                step += 1
                signals.step = step
                state, m, agreed = train_step(state, batch, flags[signals.flag])
                agreed.copy_to_host_async()
                data_state = data.get_state()  # the position after this step's batch
                window.add_step(nonpad)
                if step < cfg.num_steps:  # prepared while the step runs
                    batch, nonpad = next_batch()
                bar.update(1)
                # waits for this step; the same values on every process
                preempted = read_agreed(agreed, step, cfg.nonfinite, ckptr.latest_step)
                if step % cfg.log_every == 0 or step == cfg.num_steps:
                    m = {k: float(v) for k, v in jax.device_get(m).items()}
                    m.update(
                        window.summary(
                            tokens_per_step=tokens_per_step,
                            num_devices=mesh.size,
                            flops_per_token=flops_per_token,
                            peak_flops=peak,
                        )
                    )
                    writer.write(step, m)
                    bar.set_postfix(
                        loss=f"{m['loss']:.3f}", ppl=f"{m['perplexity']:.2f}", lr=f"{m['lr']:.1e}"
                    )
                    last = m
                stop = preempted or (stop_after is not None and step - start >= stop_after)
                if step % cfg.checkpoint.every == 0 or step == cfg.num_steps or stop:
                    ckptr.save(
                        state,
                        {
                            "data": data_state,
                            "config_hash": config_hash(cfg),
                            "config": to_dict(cfg),
                        },
                    )
                # On preemption the checkpoint comes first and evaluation is skipped: it could
                # outlast the grace period.
                if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.num_steps:
                    if not preempted:
                        with window.excluded():
                            ev = evaluate(cfg, engine, state.variables, batching.micro_rows)
                            writer.write(step, ev)
                if stop:
                    log.warning(
                        "stopping at step %d: checkpoint written; run again to resume", step
                    )
                    break
        finally:
            bar.close()
            signals.restore()
            ckptr.close()
        final: dict[str, Any] = dict(last)
        if step >= cfg.num_steps and not preempted:  # preempted: the next run evaluates
            ev = evaluate(cfg, engine, state.variables, batching.micro_rows)
            writer.write(step, ev)
            final.update(ev)
            if ev and jax.process_index() == 0:
                below = 100 * (1 - ev["eval_perplexity"] / ev["eval_unigram_perplexity"])
                versus = f"{below:.1f}% below" if below >= 0 else f"{-below:.1f}% above"
                print(
                    f"held-out masked-LM perplexity {ev['eval_perplexity']:.2f} vs amino-acid "
                    f"unigram baseline {ev['eval_unigram_perplexity']:.2f} ({versus}), "
                    f"{ev['eval_masked_tokens']} masked tokens",
                    flush=True,
                )
        writer.close()
        final["step"] = step
        final["preempted"] = preempted  # the command exits EXIT_PREEMPTED: run again to resume
        return final
