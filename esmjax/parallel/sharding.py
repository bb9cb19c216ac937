"""Logical axis names, rule presets and the device mesh.

Parameters carry logical axis names where they are created (``nn.param``). A rule table maps each
logical name to mesh axes of the ``(data, fsdp, tensor)`` mesh; the same table maps activation names
(prefixed ``act_``) so that FSDP on ``embed`` weights leaves activations alone (the MaxText /
big_vision convention). Rules are data, held in ``MeshConfig.rules``. A dimension whose size the
mesh axes do not divide stays replicated, and a mesh axis is used at most once per array (Flax
semantics), so every rule table is valid for every model shape.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from esmjax.config import MeshConfig

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


def resolve_rules(rules: Any) -> Rules:
    """A preset name or an explicit ``[[logical, [mesh axes]], ...]`` list, as a tuple of pairs."""
    if isinstance(rules, str):
        try:
            return RULE_PRESETS[rules]
        except KeyError:
            raise ValueError(
                f"unknown sharding rules {rules!r}; presets: {', '.join(RULE_PRESETS)}"
            ) from None
    out = []
    for item in rules:
        if len(item) != 2:
            raise ValueError(f"a sharding rule is [logical_axis, mesh_axes], got {item!r}")
        name, axes = item
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        bad = [a for a in axes if a not in MESH_AXES]
        if bad:
            raise ValueError(
                f"rule {name!r} names unknown mesh axes {bad}; mesh axes are {MESH_AXES}"
            )
        out.append((str(name), axes))
    return tuple(out)


# --------------------------------------------------------------------------------------------------
# Mesh
# --------------------------------------------------------------------------------------------------
def mesh_shape(cfg: MeshConfig, num_devices: int, num_slices: int = 1) -> tuple[int, int, int]:
    """Resolves -1 and multiplies in the across-host (dcn) sizes; returns (data, fsdp, tensor)."""
    dcn = (cfg.dcn_data, cfg.dcn_fsdp, cfg.dcn_tensor)
    ici = [cfg.ici_data, cfg.ici_fsdp, cfg.ici_tensor]
    per_slice, rem = divmod(num_devices, math.prod(dcn))
    if rem:
        raise ValueError(f"{num_devices} devices do not split into dcn sizes {dcn}")
    if ici.count(-1) > 1:
        raise ValueError(f"at most one mesh size may be -1, got ici sizes {ici}")
    if -1 in ici:
        known = math.prod(s for s in ici if s != -1)
        if per_slice % known:
            raise ValueError(f"{per_slice} devices per slice are not divisible by ici sizes {ici}")
        ici[ici.index(-1)] = per_slice // known
    if math.prod(ici) != per_slice:
        raise ValueError(
            f"mesh data={ici[0]}x{dcn[0]}, fsdp={ici[1]}x{dcn[1]}, tensor={ici[2]}x{dcn[2]} needs "
            f"{math.prod(ici) * math.prod(dcn)} devices, but {num_devices} are present"
        )
    return tuple(i * d for i, d in zip(ici, dcn))  # type: ignore[return-value]


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh with Auto axis types (JAX now defaults to Explicit)."""
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(cfg, len(devices))
    if devices is None or len(devices) == len(jax.devices()):
        return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def single_device_mesh() -> Mesh:
    return Mesh(
        np.asarray(jax.devices()[:1]).reshape(1, 1, 1), MESH_AXES, axis_types=(AxisType.Auto,) * 3
    )


# --------------------------------------------------------------------------------------------------
# Logical -> physical
# --------------------------------------------------------------------------------------------------
def logical_to_spec(
    axes: Sequence[str | None], shape: Sequence[int], rules: Rules, mesh_sizes: dict[str, int]
) -> P:
    """The PartitionSpec for an array with logical ``axes``.

    A dimension is split over the rule's mesh axes that are not yet used by this array and whose
    product divides it; otherwise it stays replicated.
    """
    table = dict(rules)
    used: set[str] = set()
    spec: list[Any] = []
    for name, size in zip(axes, shape, strict=True):
        chosen: list[str] = []
        for ax in table.get(name, ()) if name else ():
            if ax in used or mesh_sizes.get(ax, 1) == 1:
                continue
            if size % (math.prod(mesh_sizes[a] for a in chosen) * mesh_sizes[ax]) == 0:
                chosen.append(ax)
        used.update(chosen)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    while spec and spec[-1] is None:
        spec.pop()
    return P(*spec)


def mesh_sizes(mesh: Mesh) -> dict[str, int]:
    return dict(zip(mesh.axis_names, mesh.devices.shape))


def tree_shardings(abstract: Any, mesh: Mesh, rules: Rules) -> Any:
    """NamedShardings for a pytree of ``nnx.Variable`` (from ``nnx.eval_shape``) by their logical
    axes."""
    from flax import nnx

    sizes = mesh_sizes(mesh)

    def one(v: Any) -> NamedSharding:
        axes = v.get_metadata().get("out_sharding") or (None,) * v.ndim
        return NamedSharding(mesh, logical_to_spec(axes, v.shape, rules, sizes))

    return jax.tree.map(one, abstract, is_leaf=lambda x: isinstance(x, nnx.Variable))


def spec_table(abstract: Any, mesh_axes_sizes: dict[str, int], rules: Rules) -> str:
    """A text table ``path  shape  logical  spec`` of every parameter (device-free;
    golden-tested)."""
    from flax import nnx

    rows = []
    for path, v in nnx.to_flat_state(abstract):
        axes = v.get_metadata().get("out_sharding") or (None,) * len(v.shape)
        spec = logical_to_spec(axes, v.shape, rules, mesh_axes_sizes)
        rows.append(
            (
                ".".join(map(str, path)),
                "x".join(map(str, v.shape)),
                ",".join(a or "-" for a in axes),
                str(spec),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return (
        "\n".join(
            f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c:<{widths[2]}}  {d}" for a, b, c, d in rows
        )
        + "\n"
    )


# --------------------------------------------------------------------------------------------------
# Activation constraints
# --------------------------------------------------------------------------------------------------
_CONTEXT: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar(
    "esmjax_sharding", default=None
)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Rules) -> Iterator[None]:
    """Makes ``constrain`` active while tracing.

    It deliberately does not call ``jax.set_mesh``: under a JAX mesh, Flax would read the
    parameters' logical ``out_sharding`` names as mesh axes.
    """
    token = _CONTEXT.set((mesh, rules))
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """``with_sharding_constraint`` by logical activation names; a no-op outside ``use_mesh``."""
    ctx = _CONTEXT.get()
    if ctx is None:
        return x
    mesh, rules = ctx
    spec = logical_to_spec(axes, x.shape, rules, mesh_sizes(mesh))
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def batch_sharding(mesh: Mesh, rules: Rules, ndim: int) -> NamedSharding:
    """Sharding of a ``[batch, ...]`` input array: batch over the ``act_batch`` rule's axes."""
    axes = dict(rules).get(ACT_BATCH, ())
    axes = tuple(a for a in axes if mesh_sizes(mesh).get(a, 1) > 1)
    first = None if not axes else axes[0] if len(axes) == 1 else axes
    return NamedSharding(mesh, P(first, *([None] * (ndim - 1))))


def map_shards(fn: Any, args: Sequence[jax.Array], axes: Sequence[Sequence[str | None]]) -> Any:
    """``fn(*args)`` run per shard (``jax.shard_map``) with each argument split by its logical
    ``axes``; the output takes the first argument's split. A plain call outside ``use_mesh`` or on
    one device.

    For kernels (Pallas calls) that XLA's partitioner cannot split: it would gather them whole.
    ``fn`` must be correct on any block of the split axes (e.g. attention on whole rows and heads).
    """
    ctx = _CONTEXT.get()
    if ctx is None or ctx[0].devices.size == 1:
        return fn(*args)
    mesh, rules = ctx
    sizes = mesh_sizes(mesh)
    specs = tuple(
        logical_to_spec(a, x.shape, rules, sizes) for x, a in zip(args, axes, strict=True)
    )
    return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=specs[0], check_vma=False)(*args)
