"""AdamW and the ESM-2 learning-rate schedule (Lin et al. 2023, supplement A.1.2).

Warm-up is linear from 0 to the peak over ``warmup_steps``; the rate then decays linearly to
``final_lr_ratio * peak`` at ``decay_fraction`` of the run and holds there. Gradients are clipped by
global norm. Weight decay applies to matrices and embeddings only, not to biases or LayerNorm
parameters (the usual BERT/ESM practice); non-trainable buffers (rotary ``inv_freq``) are never
updated.

Every parameter fair-esm trains is trained, the attention key bias ``k_proj.bias`` included. Without
rotary embeddings a key bias would add the same ``q_i . b_k`` to every score of query ``i`` and the
softmax would cancel it; ESM-2 adds the bias *before* the rotation (RoFormer, Su et al. 2021), so
the score of query ``i`` and key ``j`` gains ``q_i . R(j - i) b_k``, which depends on the key
position: the bias has a true, non-zero gradient (``tests/test_grad_parity.py`` checks it against
PyTorch autograd through fair-esm).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import optax

from esmjax.config import OptimConfig


def learning_rate(cfg: OptimConfig, num_steps: int) -> optax.Schedule:
    warmup = max(cfg.warmup_steps, 1)
    decay_end = max(int(cfg.decay_fraction * num_steps), warmup + 1)
    # The first step already uses peak/warmup (not 0), so no step is wasted.
    return optax.join_schedules(
        [
            optax.linear_schedule(cfg.peak_lr / warmup, cfg.peak_lr, warmup - 1),
            optax.linear_schedule(
                cfg.peak_lr, cfg.peak_lr * cfg.final_lr_ratio, decay_end - warmup
            ),
        ],
        boundaries=[warmup - 1],
    )


def trainable(path: tuple, leaf: Any) -> str:
    """Label of a variable by its path in the model's pure dict: ``frozen`` (the rotary
    ``inv_freq`` buffers only), ``decay`` (matrices and embeddings) or ``no_decay`` (biases,
    LayerNorm scales and shifts)."""
    names = [getattr(k, "key", getattr(k, "name", "")) for k in path]
    if names[-1] == "inv_freq":
        return "frozen"
    if names[-1] in ("kernel", "embedding"):
        return "decay"
    return "no_decay"


def make_optimizer(
    cfg: OptimConfig, num_steps: int, variables: Any
) -> optax.GradientTransformation:
    """The optimizer for a model's variables pure dict (structure only is read from
    ``variables``)."""
    labels = jax.tree_util.tree_map_with_path(trainable, variables)
    schedule = learning_rate(cfg, num_steps)

    def adamw(weight_decay: float) -> optax.GradientTransformation:
        return optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=weight_decay)

    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip > 0 else optax.identity(),
        optax.multi_transform(
            {
                "decay": adamw(cfg.weight_decay),
                "no_decay": adamw(0.0),
                "frozen": optax.set_to_zero(),
            },
            labels,
        ),
    )


def finetune_label(path: tuple, leaf: Any) -> str:
    """Label of a fine-tuning model's variable: ``frozen`` (rotary buffers, and the masked-LM and
    contact heads, which no task uses), else ``head_`` or ``backbone_`` + decay / no_decay."""
    names = [getattr(k, "key", getattr(k, "name", "")) for k in path]
    kind = trainable(path, leaf)
    if kind == "frozen" or (names[0] == "esm" and names[1] in ("lm_head", "contact_head")):
        return "frozen"
    return f"{'head' if names[0] == 'classifier' else 'backbone'}_{kind}"


def make_finetune_optimizer(
    cfg: OptimConfig, head_lr: float, num_steps: int, variables: Any
) -> tuple[optax.GradientTransformation, optax.Schedule, optax.Schedule]:
    """AdamW with the ESM-2 schedule shape and differential learning rates: the backbone peaks at
    ``cfg.peak_lr``, the head at ``head_lr`` (0: the same). Returns (tx, backbone lr, head lr)."""
    labels = jax.tree_util.tree_map_with_path(finetune_label, variables)
    backbone = learning_rate(cfg, num_steps)
    head_cfg = dataclasses.replace(cfg, peak_lr=head_lr or cfg.peak_lr)
    head = learning_rate(head_cfg, num_steps)

    def adamw(schedule: optax.Schedule, wd: float) -> optax.GradientTransformation:
        return optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=wd)

    tx = optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip > 0 else optax.identity(),
        optax.multi_transform(
            {
                "backbone_decay": adamw(backbone, cfg.weight_decay),
                "backbone_no_decay": adamw(backbone, 0.0),
                "head_decay": adamw(head, cfg.weight_decay),
                "head_no_decay": adamw(head, 0.0),
                "frozen": optax.set_to_zero(),
            },
            labels,
        ),
    )
    return tx, backbone, head
