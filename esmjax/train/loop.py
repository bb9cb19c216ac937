"""The training loop, top to bottom: mesh -> state -> restore -> (step, log, evaluate, save)* ->
final evaluation.

A run started again in the same workdir resumes from its latest complete checkpoint: parameters,
optimizer state, step and data-iterator state, so the loss trajectory continues exactly. SIGTERM
(preemption) saves at the next step boundary and exits cleanly.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from tqdm import tqdm

from esmjax.config import TrainConfig, config_hash, to_dict
from esmjax.data.pipeline import eval_batches, train_batches
from esmjax.errors import InputError
from esmjax.evaluate.perplexity import NoMaskedTokens, masked_lm
from esmjax.inference.engine import Engine
from esmjax.io import paths
from esmjax.models.esm2 import abstract_model
from esmjax.parallel import platform as plat
from esmjax.parallel import sharding as shd
from esmjax.train import metrics as tm
from esmjax.train.batching import Batching
from esmjax.train.checkpoints import TrainCheckpointer
from esmjax.train.optim import learning_rate, make_optimizer
from esmjax.train.state import abstract_state, create_state, model_graphdef, state_shardings
from esmjax.train.step import make_train_step

log = logging.getLogger("esmjax.train")


def _global_batch(
    local: dict[str, np.ndarray], accum: int, sharding: jax.sharding.NamedSharding
) -> dict:
    """Process-local rows [r, S] -> global arrays [A, R, S] sharded over the batch axes."""
    out = {}
    for k, v in local.items():
        v = v.reshape(accum, -1, v.shape[-1])
        global_shape = (accum, v.shape[1] * jax.process_count(), v.shape[2])
        out[k] = jax.make_array_from_process_local_data(sharding, v, global_shape)
    return out


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
        (workdir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))


class _Preemption:
    """Records SIGTERM; all processes agree at a sync point before acting on it."""

    def __init__(self) -> None:
        self.flag = False
        self._old = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        log.warning("SIGTERM received: saving a checkpoint at the next step boundary")
        self.flag = True

    def agreed(self) -> bool:
        if jax.process_count() == 1:
            return self.flag
        return bool(np.any(multihost_utils.process_allgather(np.array([self.flag]))))

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self._old)


def evaluate(cfg: TrainConfig, engine: Engine, variables: Any, micro_rows: int) -> dict:
    """Held-out masked-LM loss on fixed masks and its unigram baseline, by the one implementation
    that ``esmjax evaluate perplexity`` runs (``esmjax.evaluate.perplexity.masked_lm``)."""
    engine.set_variables(variables)
    batches = eval_batches(
        cfg.data,
        rows=micro_rows // jax.process_count(),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
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
    plat.log_startup(cfg.model.dtype)
    peak = tm.device_peak_flops(cfg.accelerator)  # per device, for MFU; None when unknown
    mesh = shd.make_mesh(cfg.mesh)
    rules = shd.resolve_rules(cfg.mesh.rules)
    batching = Batching(cfg, mesh.size, jax.process_count())
    log.info("mesh %s; %s", dict(zip(mesh.axis_names, mesh.devices.shape)), batching)

    graphdef = model_graphdef(cfg.model)
    abstract_vars = abstract_model(cfg.model)[1].to_pure_dict()
    tx = make_optimizer(cfg.optim, cfg.num_steps, abstract_vars)
    lr = learning_rate(cfg.optim, cfg.num_steps)
    shardings = state_shardings(cfg.model, tx, mesh, rules)
    data = train_batches(
        cfg.data,
        rows=batching.process_rows,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    ckptr = TrainCheckpointer(workdir, cfg.checkpoint)
    with shd.use_mesh(mesh, rules):
        restored = ckptr.restore(abstract_state(cfg.model, tx, shardings))
        if restored is None:
            state = create_state(cfg.model, tx, shardings, cfg.seed)
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

        row_spec = shd.batch_sharding(mesh, rules, 2).spec
        _write_workdir_config(workdir, cfg)
        batch_sharding = jax.sharding.NamedSharding(
            mesh, jax.sharding.PartitionSpec(None, *row_spec)
        )
        train_step = jax.jit(
            make_train_step(graphdef, tx, lr),
            in_shardings=(shardings, batch_sharding),
            out_shardings=(shardings, None),
            donate_argnums=0,
        )
        engine = Engine(nnx.merge(graphdef, nnx.State(state.variables)), mesh, rules)

        writer = tm.MetricsWriter(workdir, start, enabled=jax.process_index() == 0)
        flops_per_token = tm.train_flops_per_token(cfg.model, cfg.data.seq_len)
        tokens_per_step = batching.global_rows * batching.seq_len
        preemption = _Preemption()
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
        try:
            while step < cfg.num_steps:
                local = next(data)
                state, m = train_step(state, _global_batch(local, batching.accum, batch_sharding))
                step += 1
                window.add_step(float((local["segment_ids"] > 0).mean()))
                bar.update(1)
                boundary = step % cfg.log_every == 0 or step == cfg.num_steps
                if boundary:
                    m = {k: float(v) for k, v in jax.device_get(m).items()}  # waits for the step
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
                if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.num_steps:
                    jax.block_until_ready(m)  # the steps before belong to the training window
                    with window.excluded():
                        ev = evaluate(cfg, engine, state.variables, batching.micro_rows)
                        writer.write(step, ev)
                stop = boundary and preemption.agreed()
                if stop_after is not None and step - start >= stop_after:
                    stop = True
                if step % cfg.checkpoint.every == 0 or step == cfg.num_steps or stop:
                    ckptr.save(
                        state,
                        {
                            "data": data.get_state(),
                            "config_hash": config_hash(cfg),
                            "config": to_dict(cfg),
                        },
                    )
                if stop:
                    log.warning(
                        "stopping at step %d: checkpoint written; run again to resume", step
                    )
                    break
        finally:
            bar.close()
            preemption.restore()
            ckptr.close()
        final: dict[str, Any] = dict(last)
        if step >= cfg.num_steps:
            ev = evaluate(cfg, engine, state.variables, batching.micro_rows)
            writer.write(step, ev)
            final.update(ev)
            if ev and jax.process_index() == 0:
                below = 100 * (1 - ev["eval_perplexity"] / ev["eval_unigram_perplexity"])
                print(
                    f"held-out masked-LM perplexity {ev['eval_perplexity']:.2f} vs amino-acid "
                    f"unigram baseline {ev['eval_unigram_perplexity']:.2f} ({below:.1f}% below), "
                    f"{ev['eval_masked_tokens']} masked tokens",
                    flush=True,
                )
        writer.close()
        final["step"] = step
        return final
