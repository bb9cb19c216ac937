"""Gradient parity with PyTorch autograd through fair-esm ``ESM2``: the masked-LM gradient of every
parameter (biases, LayerNorms, embedding, LM head, contact head) within 1e-5 of that parameter's
own gradient scale, float32, random weights everywhere.

The esmjax side differentiates ``esmjax.train.step.mlm_sums``, the function the train step
differentiates (summed cross-entropy, then divided by the number of selected positions, as the
train step does); the torch side is ``F.cross_entropy`` (mean) on fair-esm's logits at the selected
positions. Gradients map onto fair-esm names through the conversion table
(``params_to_state_dict``), which handles the stacked ``layers`` axis and the kernel transposes.
"""

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
from flax import nnx
from support.reference import fair_esm_model, to_esmjax

from esmjax.config import esm2_from_shape
from esmjax.data.masking import mask_tokens
from esmjax.io.convert_esm2 import params_to_state_dict
from esmjax.models import alphabet as tok
from esmjax.models.esm2 import segments_from_tokens
from esmjax.train.step import mlm_sums

TOL = 1e-5
SHAPE = (2, 32, 4)  # layers, embed, heads
SEQS = [
    "MKTVRQERLKSIVRILERSKEPVSGAQLAEELSVSRQVIVQDIAYLRSLGYNIVATPRGYVLAGG",
    "KALTAEISQPAAWGHLLCDNMFYR",
    "MKTVACDEFGHIK",
]


def _batch(seed: int = 11) -> dict[str, np.ndarray]:
    """Three sequences of different lengths (so two rows are padded), corrupted by the project's
    MLM masking at a high rate so that every row has ``<mask>`` tokens (token dropout's rescale
    differs per row) and some random replacements."""
    toks = tok.batch_encode(SEQS)  # [B, L]
    b = mask_tokens(toks, np.random.default_rng(seed), mask_prob=0.4)
    seg, pos = segments_from_tokens(jnp.asarray(b["tokens"]))
    return {**b, "segment_ids": np.asarray(seg), "positions": np.asarray(pos)}


def _torch_grads(ref: torch.nn.Module, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    ref.zero_grad(set_to_none=True)
    logits = ref(torch.from_numpy(batch["tokens"]).long())["logits"]  # [B, L, V]
    sel = torch.from_numpy(batch["loss_mask"])
    loss = F.cross_entropy(logits[sel], torch.from_numpy(batch["targets"]).long()[sel])
    loss.backward()
    # Tied output weights: named_parameters lists the embedding once, with both contributions.
    return {
        name: (np.zeros(tuple(p.shape), np.float32) if p.grad is None else p.grad.numpy())
        for name, p in ref.named_parameters()
    }


def _jax_grads(model, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    graphdef, state = nnx.split(model)
    variables = state.to_pure_dict()
    jbatch = {k: jnp.asarray(v) for k, v in batch.items()}

    def loss_sum(v):
        sums = mlm_sums(graphdef, v, jbatch)
        return sums["loss_sum"], sums["count"]

    grads, count = jax.jit(jax.grad(loss_sum, has_aux=True))(variables)
    return jax.tree.map(lambda g: np.asarray(g / count), grads)  # the train step's normalisation


def test_every_parameter_gradient_matches_fair_esm():
    n, e, h = SHAPE
    torch.manual_seed(0)
    ref = fair_esm_model(n, e, h, seed=5).float()
    assert ref.token_dropout
    cfg = esm2_from_shape(n, e, h)
    model = to_esmjax(ref.state_dict(), cfg, "fair-esm")
    batch = _batch()
    # The batch really exercises padding, several lengths and the token-dropout rescale.
    lengths = (batch["tokens"] != tok.PAD).sum(1)
    assert len(set(lengths.tolist())) == len(SEQS)
    n_mask = ((batch["tokens"] == tok.MASK) & batch["loss_mask"]).sum(1)
    assert (n_mask > 0).all() and len(set((n_mask / lengths).tolist())) > 1
    assert (batch["loss_mask"] & (batch["tokens"] != tok.MASK)).any()

    g_torch = _torch_grads(ref, batch)
    g_ours = params_to_state_dict(_jax_grads(model, batch), cfg, "fair-esm")

    # Every trained fair-esm parameter is compared, and nothing else is left over.
    assert set(g_torch) <= set(g_ours), sorted(set(g_torch) - set(g_ours))
    extra = set(g_ours) - set(g_torch)
    assert extra == {"lm_head.weight"} | {
        f"layers.{i}.self_attn.rot_emb.inv_freq" for i in range(n)
    }, sorted(extra)
    for i in range(n):  # a frozen buffer: no gradient reaches it
        assert not g_ours[f"layers.{i}.self_attn.rot_emb.inv_freq"].any()

    failures = []
    for name, gt in sorted(g_torch.items()):
        go = g_ours[name]
        assert go.shape == gt.shape, (name, go.shape, gt.shape)
        scale = float(np.abs(gt).max())
        err = float(np.abs(go.astype(np.float64) - gt.astype(np.float64)).max())
        if err > TOL * scale:
            failures.append(f"{name}: max |diff| {err:.3g} > {TOL} x {scale:.3g}")
    assert not failures, "\n".join(failures)

    # Under rotary embeddings the key bias has a real gradient (it is not cancelled by softmax).
    for i in range(n):
        assert np.abs(g_torch[f"layers.{i}.self_attn.k_proj.bias"]).max() > 1e-3
        assert np.abs(g_ours[f"layers.{i}.self_attn.k_proj.bias"]).max() > 1e-3
    # The contact head is not part of the masked-LM loss: exactly zero on both sides.
    for name in ("contact_head.regression.weight", "contact_head.regression.bias"):
        assert not g_torch[name].any() and not g_ours[name].any()
    # Every other parameter does receive a gradient (the comparison above is not vacuous).
    for name, gt in g_torch.items():
        if not name.startswith("contact_head"):
            assert np.abs(gt).max() > 0, name
