"""Typed, frozen configuration of ESMFold (Lin et al. 2023): language-model stem, folding trunk,
structure module.

Field names follow the esmjax style (``num_*`` counts, ``*_dim`` widths); the docstrings give the
fair-esm / OpenFold / HuggingFace names each field corresponds to, and ``from_hf``/``to_hf``
translate HF's ``esmfold_config`` dict. Defaults are the published ``esmfold_3B_v1`` values
(fair-esm ``trunk.py``, ``FoldingTrunkConfig`` and OpenFold ``StructureModule`` kwargs).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from esmjax.config import ESM2_PRESETS, ConfigError, ESM2Config, from_dict, to_dict


@dataclass(frozen=True, kw_only=True)
class StructureModuleConfig:
    """OpenFold ``StructureModule`` (AF2 Suppl. Alg. 20) as ESMFold configures it.

    Attributes:
      single_dim: c_s (HF ``sequence_dim``), 384.
      pair_dim: c_z (HF ``pairwise_dim``), 128.
      ipa_dim: per-head scalar channels of IPA (c_ipa), 16.
      resnet_dim: angle-resnet width, 128.
      num_heads: IPA heads, 12.
      num_qk_points / num_v_points: IPA query/key and value points per head, 4 / 8.
      num_blocks: structure-module iterations, all sharing one set of weights, 8.
      num_transition_layers: 3-linear transition layers per iteration, 1.
      num_resnet_blocks: angle-resnet residual blocks, 2.
      num_angles: torsions predicted per residue (omega, phi, psi, chi1-4), 7.
      trans_scale_factor: translations are predicted in nm and scaled to Angstrom, 10.
      epsilon: angle-normalisation and point-norm epsilon, 1e-8.
      inf: IPA mask penalty, 1e5.
    """

    single_dim: int = 384
    pair_dim: int = 128
    ipa_dim: int = 16
    resnet_dim: int = 128
    num_heads: int = 12
    num_qk_points: int = 4
    num_v_points: int = 8
    num_blocks: int = 8
    num_transition_layers: int = 1
    num_resnet_blocks: int = 2
    num_angles: int = 7
    trans_scale_factor: float = 10.0
    epsilon: float = 1e-8
    inf: float = 1e5


@dataclass(frozen=True, kw_only=True)
class TrunkConfig:
    """fair-esm ``FoldingTrunkConfig``.

    Attributes:
      num_blocks: triangular self-attention blocks, 48.
      single_dim: sequence state width (``sequence_state_dim``), 1024.
      pair_dim: pair state width (``pairwise_state_dim``), 128.
      single_head_width: sequence attention head width, 32 (so 32 heads).
      pair_head_width: triangle attention head width, 32 (so 4 heads).
      position_bins: relative positions are clamped to +-position_bins, 32.
      max_recycles: trunk passes when ``num_recycles`` is None, 4.
      structure_module: the structure module.
    """

    num_blocks: int = 48
    single_dim: int = 1024
    pair_dim: int = 128
    single_head_width: int = 32
    pair_head_width: int = 32
    position_bins: int = 32
    max_recycles: int = 4
    structure_module: StructureModuleConfig = field(default_factory=StructureModuleConfig)

    def __post_init__(self) -> None:
        if self.single_dim % self.single_head_width or self.pair_dim % self.pair_head_width:
            raise ConfigError("trunk widths must be multiples of their head widths")
        if self.pair_dim % 2:
            raise ConfigError(f"pair_dim must be even, got {self.pair_dim}")
        if self.max_recycles < 1:
            raise ConfigError("max_recycles must be at least 1")

    @property
    def single_heads(self) -> int:
        return self.single_dim // self.single_head_width

    @property
    def pair_heads(self) -> int:
        return self.pair_dim // self.pair_head_width


@dataclass(frozen=True, kw_only=True)
class ESMFoldConfig:
    """The whole model: ESM-2 stem (frozen), trunk and heads.

    Attributes:
      esm: the language model. Its ``dtype`` is the stem's compute dtype (``fold --dtype``); trunk,
        structure module and heads always compute in float32.
      trunk: folding trunk and structure module.
      lddt_head_hid_dim: width of the pLDDT head, 128.
    """

    esm: ESM2Config
    trunk: TrunkConfig = field(default_factory=TrunkConfig)
    lddt_head_hid_dim: int = 128

    def with_esm_dtype(self, dtype: str) -> ESMFoldConfig:
        return dataclasses.replace(self, esm=dataclasses.replace(self.esm, dtype=dtype))


ESMFOLD_PRESETS: dict[str, ESMFoldConfig] = {
    "esmfold_v1": ESMFoldConfig(esm=ESM2_PRESETS["esm2_t36_3B_UR50D"]),
}


# --------------------------------------------------------------------------------------------------
# config.json (esmjax checkpoint folder) and HF EsmFoldConfig
# --------------------------------------------------------------------------------------------------
def to_json(cfg: ESMFoldConfig) -> dict[str, Any]:
    """The ``esmfold`` section of an esmjax checkpoint's config.json (the ``model`` section holds
    the stem)."""
    d = to_dict(cfg)
    d.pop("esm")
    return d


def from_json(model: dict[str, Any], esmfold: dict[str, Any]) -> ESMFoldConfig:
    return from_dict(ESMFoldConfig, {"esm": model, **esmfold}, "esmfold")


_SM_HF = {  # ours -> HF StructureModuleConfig
    "single_dim": "sequence_dim",
    "pair_dim": "pairwise_dim",
    "ipa_dim": "ipa_dim",
    "resnet_dim": "resnet_dim",
    "num_heads": "num_heads_ipa",
    "num_qk_points": "num_qk_points",
    "num_v_points": "num_v_points",
    "num_blocks": "num_blocks",
    "num_transition_layers": "num_transition_layers",
    "num_resnet_blocks": "num_resnet_blocks",
    "num_angles": "num_angles",
    "trans_scale_factor": "trans_scale_factor",
    "epsilon": "epsilon",
    "inf": "inf",
}
_TRUNK_HF = {
    "num_blocks": "num_blocks",
    "single_dim": "sequence_state_dim",
    "pair_dim": "pairwise_state_dim",
    "single_head_width": "sequence_head_width",
    "pair_head_width": "pairwise_head_width",
    "position_bins": "position_bins",
    "max_recycles": "max_recycles",
}


def from_hf(esm: ESM2Config, esmfold_config: dict[str, Any]) -> ESMFoldConfig:
    """From HF ``config.json``'s ``esmfold_config`` (missing keys take HF's defaults, which equal
    ours)."""
    trunk = dict(esmfold_config.get("trunk") or {})
    sm = dict(trunk.get("structure_module") or {})
    sm_cfg = StructureModuleConfig(
        **{ours: sm[theirs] for ours, theirs in _SM_HF.items() if theirs in sm}
    )
    trunk_cfg = TrunkConfig(
        structure_module=sm_cfg,
        **{ours: trunk[theirs] for ours, theirs in _TRUNK_HF.items() if theirs in trunk},
    )
    return ESMFoldConfig(
        esm=esm,
        trunk=trunk_cfg,
        lddt_head_hid_dim=int(esmfold_config.get("lddt_head_hid_dim", 128)),
    )


def to_hf(cfg: ESMFoldConfig) -> dict[str, Any]:
    """HF ``esmfold_config`` for ``cfg`` (fp32 stem, no chunking)."""
    sm = {theirs: getattr(cfg.trunk.structure_module, ours) for ours, theirs in _SM_HF.items()}
    trunk = {theirs: getattr(cfg.trunk, ours) for ours, theirs in _TRUNK_HF.items()}
    trunk.update(
        structure_module=sm, dropout=0.0, layer_drop=0.0, chunk_size=None, cpu_grad_checkpoint=False
    )
    return {
        "esm_type": None,
        "fp16_esm": False,
        "use_esm_attn_map": False,
        "esm_ablate_pairwise": False,
        "esm_ablate_sequence": False,
        "esm_input_dropout": 0,
        "embed_aa": True,
        "bypass_lm": False,
        "lddt_head_hid_dim": cfg.lddt_head_hid_dim,
        "trunk": trunk,
    }
