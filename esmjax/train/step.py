"""The train steps: one gradient accumulation and one guarded update, which pretraining's masked-LM
step (``make_train_step``) and fine-tuning's task step (``esmjax.train.finetune``) both build on.

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

# pretraining: tokens, targets, loss_mask, segment_ids, positions: [R, S] (or [A, R, S])
Batch = dict[str, jax.Array]


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


def accumulate(
    sums: Callable[[Any, dict], dict[str, jax.Array]], variables: Any, batch: dict
) -> tuple[Any, dict[str, jax.Array], jax.Array]:
    """The gradients of a step over its micro-batches (``batch`` arrays are [A, R, ...], scanned
    over A), divided by the step's count: ``(grads, totals, loss)``. ``sums(variables, micro)``
    gives a micro-batch's ``loss_sum``, its ``count`` and any other sums, all added up in
    ``totals``. Pretraining and fine-tuning both take their gradients here."""

    def loss_sum(v: Any, micro: dict) -> tuple[jax.Array, dict]:
        s = sums(v, micro)
        return s["loss_sum"], s

    grad_fn = jax.grad(loss_sum, has_aux=True)
    names = jax.eval_shape(sums, variables, jax.tree.map(lambda x: x[0], batch))

    def body(carry, micro):
        grads, totals = carry
        g, s = grad_fn(variables, micro)
        return (jax.tree.map(jnp.add, grads, g), {k: totals[k] + s[k] for k in totals}), None

    zeros = jax.tree.map(jnp.zeros_like, variables)
    init = {k: jnp.zeros((), jnp.float32) for k in names}
    (grads, totals), _ = jax.lax.scan(body, (zeros, init), batch)
    count = jnp.maximum(totals["count"], 1.0)
    return jax.tree.map(lambda g: g / count, grads), totals, totals["loss_sum"] / count


def make_step(
    sums: Callable[..., dict[str, jax.Array]],
    tx: optax.GradientTransformation,
    metrics: Callable[[jax.Array, jax.Array, dict[str, jax.Array]], dict[str, jax.Array]],
    skip_nonfinite: bool = False,
) -> Callable:
    """``step(state, batch, *context) -> (state, metrics)``: the gradients of
    ``sums(variables, micro, *context)`` accumulated over the micro-batches, one optimizer update
    (:func:`guarded_update`), and ``metrics(step, loss, totals)`` with the gradient norm."""

    def step(state: TrainState, batch: Batch, *context: Any) -> tuple[TrainState, dict]:
        grads, totals, loss = accumulate(
            lambda v, micro: sums(v, micro, *context), state.variables, batch
        )
        variables, opt_state = guarded_update(tx, grads, state, loss, skip_nonfinite)
        out = metrics(state.step, loss, totals)
        out["grad_norm"] = optax.global_norm(grads)
        return TrainState(step=state.step + 1, variables=variables, opt_state=opt_state), out

    return step


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    lr: optax.Schedule,
    skip_nonfinite: bool = False,
) -> Callable:
    """Pretraining's ``train_step(state, batch) -> (state, metrics)``, batch arrays [A, R, S] (A
    accumulation steps)."""

    def metrics(step: jax.Array, loss: jax.Array, totals: dict) -> dict[str, jax.Array]:
        count = jnp.maximum(totals["count"], 1.0)
        return {
            "loss": loss,
            "perplexity": jnp.exp(loss),
            "masked_accuracy": totals["correct"] / count,
            "lr": lr(step),
            "masked_tokens": totals["count"],
        }

    return make_step(lambda v, micro: mlm_sums(graphdef, v, micro), tx, metrics, skip_nonfinite)
