"""Random-weight reference models (fair-esm ESM2, HF EsmForMaskedLM) and converted esmjax twins."""

from __future__ import annotations

import numpy as np
import torch
from flax import nnx

from esmjax.config import ESM2Config, esm2_from_shape
from esmjax.io.convert_esm2 import state_dict_to_params
from esmjax.models.esm2 import ESM2


def randomize(module: torch.nn.Module, seed: int) -> None:
    """Random weights everywhere: matrices, biases and LayerNorm scales/shifts (not just
    matrices)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            scale = 1.0 / max(1.0, p.shape[-1] ** 0.5) if p.ndim > 1 else 0.2
            noise = torch.randn(p.shape, generator=g) * scale
            if ("layer_norm" in name.lower() or "LayerNorm" in name) and name.endswith("weight"):
                noise = 1.0 + noise
            p.copy_(noise)
        # ESM-2's stored inv_freq is fp16-rounded; mimic that so a recomputed one would not pass.
        for name, b in module.named_buffers():
            if name.endswith("inv_freq"):
                b.copy_(b.half().float())


def fair_esm_model(num_layers: int, embed_dim: int, heads: int, seed: int = 0):
    import esm

    torch.manual_seed(seed)
    alphabet = esm.data.Alphabet.from_architecture("ESM-1b")
    m = esm.model.esm2.ESM2(
        num_layers=num_layers, embed_dim=embed_dim, attention_heads=heads, alphabet=alphabet
    )
    randomize(m, seed)
    return m.eval()


def hf_esm_config(num_layers: int, embed_dim: int, heads: int, **extra):
    """The HF ``EsmConfig`` of an ESM-2 shape (rotary, token dropout, no dropout), as the released
    models set it; ``extra`` adds fields (e.g. ESMFold's)."""
    from transformers import EsmConfig

    from esmjax.models.alphabet import TOKENS

    return EsmConfig(
        vocab_size=33,
        mask_token_id=32,
        pad_token_id=1,
        hidden_size=embed_dim,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        intermediate_size=4 * embed_dim,
        position_embedding_type="rotary",
        token_dropout=True,
        layer_norm_eps=1e-5,
        emb_layer_norm_before=False,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        vocab_list=list(TOKENS),
        **extra,
    )


def hf_model(num_layers: int, embed_dim: int, heads: int, seed: int = 0):
    from transformers import EsmForMaskedLM

    torch.manual_seed(seed)
    cfg = hf_esm_config(num_layers, embed_dim, heads, attn_implementation="eager")
    m = EsmForMaskedLM(cfg)
    randomize(m, seed)
    return m.eval()


def to_esmjax(state_dict: dict, cfg: ESM2Config, source: str) -> ESM2:
    sd = {k: v.detach().numpy() for k, v in state_dict.items()}
    params, _ = state_dict_to_params(sd, cfg, source)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: ESM2(cfg, rngs=nnx.Rngs(0))))
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


__all__ = ["esm2_from_shape", "fair_esm_model", "hf_model", "to_esmjax", "rel_err", "randomize"]
