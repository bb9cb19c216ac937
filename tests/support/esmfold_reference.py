"""Random-weight HF ``EsmForProteinFolding`` references and their converted esmjax twins (cached per
process, so every ESMFold test file shares one build per configuration)."""

from __future__ import annotations

import functools

import numpy as np
import torch
from flax import nnx

from esmjax.io.convert_esmfold import config_from_hf, params_from_hf, state_dict_to_params
from esmjax.models.esmfold.model import abstract_model as esmfold_abstract_model
from support.reference import hf_esm_config

# (name, LM layers/width/heads, trunk, structure module). "small" is the default test shape; "wide"
# has 3 trunk
# blocks and head counts that differ from it; the CLI test uses "cli", a shape no other test uses.
CONFIGS = {
    "small": (
        (2, 32, 4),
        dict(
            num_blocks=2,
            sequence_state_dim=64,
            pairwise_state_dim=32,
            sequence_head_width=16,
            pairwise_head_width=16,
            max_recycles=2,
        ),
        dict(
            sequence_dim=32,
            pairwise_dim=16,
            ipa_dim=8,
            resnet_dim=16,
            num_heads_ipa=2,
            num_qk_points=2,
            num_v_points=2,
            num_blocks=3,
        ),
    ),
    "wide": (
        (3, 48, 3),
        dict(
            num_blocks=3,
            sequence_state_dim=48,
            pairwise_state_dim=24,
            sequence_head_width=16,
            pairwise_head_width=8,
            max_recycles=3,
            position_bins=8,
        ),
        dict(
            sequence_dim=24,
            pairwise_dim=12,
            ipa_dim=4,
            resnet_dim=8,
            num_heads_ipa=3,
            num_qk_points=3,
            num_v_points=2,
            num_blocks=2,
            num_transition_layers=2,
            num_resnet_blocks=1,
        ),
    ),
    "cli": (
        (2, 40, 5),
        dict(
            num_blocks=2,
            sequence_state_dim=40,
            pairwise_state_dim=20,
            sequence_head_width=8,
            pairwise_head_width=10,
            max_recycles=2,
        ),
        dict(
            sequence_dim=20,
            pairwise_dim=10,
            ipa_dim=4,
            resnet_dim=12,
            num_heads_ipa=2,
            num_qk_points=2,
            num_v_points=3,
            num_blocks=2,
        ),
    ),
}


def randomize(module: torch.nn.Module, seed: int) -> None:
    """Random values for every parameter, including LayerNorm scales/shifts, biases, the
    zero-initialised final layers, the gates and the padding row of the amino-acid embedding
    (zero inits hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            scale = 1.0 / max(1.0, p.shape[-1] ** 0.5) if p.ndim > 1 else 0.2
            noise = torch.randn(p.shape, generator=g) * scale
            is_norm = (
                p.ndim == 1
                and name.endswith("weight")
                and any(t in name for t in ("norm", "LayerNorm", "mlp.0.", "lddt_head.0."))
            )
            p.copy_(1.0 + noise if is_norm else noise)


def hf_config(name: str, chunk_size=None):
    (n, e, h), trunk, sm = CONFIGS[name]
    return hf_esm_config(
        n,
        e,
        h,
        is_folding_model=True,
        esmfold_config=dict(
            fp16_esm=False, trunk=dict(trunk, chunk_size=chunk_size, structure_module=sm)
        ),
    )


@functools.cache
def hf_model(name: str = "small", seed: int = 0, round_inv_freq: bool = True):
    """``round_inv_freq``: ESM-2's stored inv_freq is fp16-rounded; mimic that so that a recomputed
    one would not pass. (``save_pretrained`` does not store the buffer, so a model meant for a
    folder keeps the computed one.)"""
    from transformers import EsmForProteinFolding

    torch.manual_seed(seed)
    m = EsmForProteinFolding(hf_config(name))
    randomize(m, seed)
    for bname, b in m.named_buffers():
        if bname.endswith("inv_freq") and round_inv_freq:
            b.copy_(b.half().float())
    return m.eval()


def numpy_state_dict(module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in module.state_dict().items()}


@functools.cache
def converted(name: str = "small", seed: int = 0):
    """(cfg, ESMFold) converted from ``hf_model(name, seed)``'s state dict."""
    ref = hf_model(name, seed)
    cfg = config_from_hf(ref.config.to_dict())
    params = params_from_hf(numpy_state_dict(ref), cfg)
    graphdef, state = esmfold_abstract_model(cfg)
    nnx.replace_by_pure_dict(state, params)
    return cfg, nnx.merge(graphdef, state)


def load_module(ours: nnx.Module, theirs: torch.nn.Module, num_blocks: int = 0) -> nnx.Module:
    """Copies a torch submodule's weights into an esmjax module with the same parameter names."""
    graphdef, state = nnx.split(ours)
    params = state_dict_to_params(numpy_state_dict(theirs), state.to_pure_dict(), num_blocks)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))
