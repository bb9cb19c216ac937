"""Masked-LM loss, the train step (with gradient accumulation): pure functions,
jitted once.

The loss of a step is the cross-entropy summed over every selected position of every micro-batch,
divided by the number of selected positions of the whole step, so the update does not depend on how
the global batch is split over devices, processes or accumulation steps.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from esmjax.train.optim import trainable
from esmjax.train.state import TrainState

Batch = dict[
    str, jax.Array
]  # tokens, targets, loss_mask, segment_ids, positions: [R, S] (or [A, R, S])


def _freeze_buffers(variables: dict[str, Any]) -> dict[str, Any]:
    return jax.tree_util.tree_map_with_path(
        lambda p, x: jax.lax.stop_gradient(x) if trainable(p, x) == "frozen" else x, variables
    )


def mlm_sums(
    graphdef: nnx.GraphDef, variables: dict[str, Any], batch: Batch
) -> dict[str, jax.Array]:
    """Summed cross-entropy, correct predictions and the count over the selected positions of one
    micro-batch."""
    model = nnx.merge(graphdef, nnx.State(_freeze_buffers(variables)))
    logits = model(batch["tokens"], batch["segment_ids"], batch["positions"])[
        "logits"
    ]  # [R, S, V] float32
    weights = batch["loss_mask"].astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    correct = (jnp.argmax(logits, -1) == batch["targets"]).astype(jnp.float32)
    return {
        "loss_sum": (ce * weights).sum(),
        "correct": (correct * weights).sum(),
        "count": weights.sum(),
    }


NONFINITE = ("stop", "skip")


def guarded_update(
    tx: optax.GradientTransformation, grads: Any, state: TrainState, loss: jax.Array, skip: bool
) -> tuple[Any, Any]:
    """``(variables, opt_state)`` after the update of ``grads``. With ``skip``, a step whose loss
    or gradients are not finite leaves both as they were (the ``nonfinite: skip`` of the configs,
    levanter's and MaxText's skipping of bad steps); otherwise the loop stops before saving such a
    step (``esmjax.train.preemption``: the flag the loop reads every step)."""
    updates, opt_state = tx.update(grads, state.opt_state, state.variables)
    variables = optax.apply_updates(state.variables, updates)
    if skip:
        finite = jnp.isfinite(loss) & jnp.isfinite(optax.global_norm(grads))
        keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
        variables = jax.tree.map(keep, variables, state.variables)
        opt_state = jax.tree.map(keep, opt_state, state.opt_state)
    return variables, opt_state


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    lr: optax.Schedule,
    skip_nonfinite: bool = False,
) -> Callable:
    """``train_step(state, batch) -> (state, metrics)`` where batch arrays are [A, R, S] (A
    accumulation steps)."""

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        def loss_fn(variables, micro):
            sums = mlm_sums(graphdef, variables, micro)
            return sums["loss_sum"], sums

        grad_fn = jax.grad(loss_fn, has_aux=True)
        zeros = jax.tree.map(jnp.zeros_like, state.variables)

        def accumulate(carry, micro):
            grads, totals = carry
            g, sums = grad_fn(state.variables, micro)
            grads = jax.tree.map(jnp.add, grads, g)
            totals = {k: totals[k] + sums[k] for k in totals}
            return (grads, totals), None

        init_totals = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}
        init_totals = {k: jnp.zeros((), jnp.float32) for k in init_totals}
        (grads, totals), _ = jax.lax.scan(accumulate, (zeros, init_totals), batch)
        count = jnp.maximum(totals["count"], 1.0)
        grads = jax.tree.map(lambda g: g / count, grads)
        loss = totals["loss_sum"] / count
        variables, opt_state = guarded_update(tx, grads, state, loss, skip_nonfinite)
        metrics = {
            "loss": loss,
            "perplexity": jnp.exp(loss),
            "masked_accuracy": totals["correct"] / count,
            "grad_norm": optax.global_norm(grads),
            "lr": lr(state.step),
            "masked_tokens": totals["count"],
        }
        return TrainState(step=state.step + 1, variables=variables, opt_state=opt_state), metrics

    return train_step
