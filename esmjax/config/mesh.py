"""The mesh as config: the ``(data, fsdp, tensor)`` mesh axes, the logical axis names that
parameters and activations carry, the rules that map one onto the other (presets and
``resolve_rules``), and ``MeshConfig``. ``esmjax.parallel.sharding`` applies them to devices;
``esmjax.models`` names its axes from here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from esmjax.config.base import ConfigError, full_key

MESH_AXES = ("data", "fsdp", "tensor")

# Weight axes.
VOCAB = "vocab"
EMBED = "embed"
MLP = "mlp"
HEADS = "heads"
HEAD_DIM = "head_dim"
LAYERS = "layers"
NORM = "norm"
# Activation axes.
ACT_BATCH = "act_batch"
ACT_LEN = "act_len"
ACT_EMBED = "act_embed"
ACT_HEADS = "act_heads"
ACT_MLP = "act_mlp"
LOGICAL_AXES = (
    VOCAB,
    EMBED,
    MLP,
    HEADS,
    HEAD_DIM,
    LAYERS,
    NORM,
    ACT_BATCH,
    ACT_LEN,
    ACT_EMBED,
    ACT_HEADS,
    ACT_MLP,
)

Rules = tuple[tuple[str, tuple[str, ...]], ...]

RULE_PRESETS: dict[str, Rules] = {
    # Pure data parallelism: parameters replicated, the batch split over every mesh axis.
    "dp": ((ACT_BATCH, ("data", "fsdp", "tensor")),),
    # ZeRO-3 style: weights split on their embed axis over `fsdp`, batch over data x fsdp.
    "fsdp": (
        (EMBED, ("fsdp",)),
        (MLP, ("fsdp",)),
        (ACT_BATCH, ("data", "fsdp")),
    ),
    # FSDP plus Megatron tensor parallelism over heads and the MLP width.
    "fsdp_tp": (
        (EMBED, ("fsdp",)),
        (HEADS, ("tensor",)),
        (MLP, ("tensor",)),
        (ACT_BATCH, ("data", "fsdp")),
        (ACT_HEADS, ("tensor",)),
        (ACT_MLP, ("tensor",)),
    ),
}


def resolve_rules(rules: Any, key: str = "mesh.rules") -> Rules:
    """A preset name or an explicit ``[[logical, [mesh axes]], ...]`` list, as a tuple of pairs.

    Anything else (an unknown preset, an unknown logical or mesh axis name, a malformed pair) is a
    ``ConfigError`` naming ``key``: a misspelt rule would otherwise silently shard nothing.
    """
    if isinstance(rules, str):
        try:
            return RULE_PRESETS[rules]
        except KeyError:
            raise ConfigError(
                f"{key}: unknown sharding rules {rules!r}; presets: {', '.join(RULE_PRESETS)}, "
                "or a list of [logical_axis, [mesh_axes]] pairs"
            ) from None
    if not isinstance(rules, (list, tuple)):
        raise ConfigError(
            f"{key}: expected a preset name or a list of [logical_axis, [mesh_axes]] pairs, "
            f"got {rules!r}"
        )
    out = []
    for item in rules:
        if not isinstance(item, (list, tuple)) or len(item) != 2:
            raise ConfigError(f"{key}: a sharding rule is [logical_axis, mesh_axes], got {item!r}")
        name, axes = item
        if name not in LOGICAL_AXES:
            raise ConfigError(
                f"{key}: unknown logical axis {name!r}; logical axes: {', '.join(LOGICAL_AXES)}"
            )
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        bad = [a for a in axes if a not in MESH_AXES]
        if bad:
            raise ConfigError(
                f"{key}: rule {name!r} names unknown mesh axes {bad}; mesh axes are "
                f"{', '.join(MESH_AXES)}"
            )
        out.append((str(name), axes))
    return tuple(out)


@dataclass(frozen=True, kw_only=True)
class MeshConfig:
    """Device mesh ``(data, fsdp, tensor)`` and the logical-axis rules that map onto it.

    ``ici_*`` sizes are within a host or slice, ``dcn_*`` across hosts or slices (MaxText's split).
    One of the ``ici_*`` sizes may be -1, meaning the devices left over. ``rules`` names a preset in
    ``RULE_PRESETS`` (``dp``, ``fsdp``, ``fsdp_tp``) or is an explicit list of
    ``[logical_axis, [mesh_axis, ...]]`` pairs; it is checked when the config is built.

    A dimension that a rule maps onto mesh axes which do not divide it stays replicated over them.
    Every command resolves parameter shardings through ``sharding.tree_shardings``, which lists such
    parameters at start-up and refuses to run when they hold more than 5% of the parameter bytes
    per device (e.g. 15B on fsdp=12: 5,120 is not divisible by 12, so every layer kernel would be
    replicated). ``allow_replicated: true`` runs anyway, with a warning.
    """

    ici_data: int = 1
    ici_fsdp: int = -1
    ici_tensor: int = 1
    dcn_data: int = 1
    dcn_fsdp: int = 1
    dcn_tensor: int = 1
    rules: Any = "fsdp"
    allow_replicated: bool = False

    def __post_init__(self) -> None:
        for name in ("ici_data", "ici_fsdp", "ici_tensor"):
            if getattr(self, name) < 1 and getattr(self, name) != -1:
                raise ConfigError(
                    f"{full_key(name)}: must be a positive size or -1 (the devices left over), got "
                    f"{getattr(self, name)}"
                )
        for name in ("dcn_data", "dcn_fsdp", "dcn_tensor"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{full_key(name)}: must be positive, got {getattr(self, name)}")
        ici = (self.ici_data, self.ici_fsdp, self.ici_tensor)
        if ici.count(-1) > 1:
            raise ConfigError(f"{full_key('ici_*')}: at most one mesh size may be -1, got {ici}")
        resolve_rules(self.rules, full_key("rules"))
