"""The device mesh, logical -> physical shardings, and the check that nothing is replicated
silently.

Parameters carry logical axis names where they are created (``nn.param``). A rule table maps each
logical name to mesh axes of the ``(data, fsdp, tensor)`` mesh; the same table maps activation names
(prefixed ``act_``) so that FSDP on ``embed`` weights leaves activations alone (the MaxText /
big_vision convention). Rules are data, held in ``MeshConfig.rules``; the presets and the axis
names live in ``esmjax.config.mesh`` (validated when a config is built).

A dimension whose size the mesh axes do not divide stays replicated, and a mesh axis is used at most
once per array (Flax semantics), so every rule table gives *some* sharding for every model shape.
For parameters that fallback can cost a lot of memory (15B on fsdp=12: every layer kernel
replicated), so ``tree_shardings`` runs ``check_replication`` first: the replicated parameters are
logged, and more than 5% of the parameter bytes per device is refused unless
``mesh.allow_replicated`` is set.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import math
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from esmjax.config.mesh import (  # noqa: F401  (resolve_rules: callers resolve rules here)
    ACT_BATCH,
    MESH_AXES,
    MeshConfig,
    Rules,
    resolve_rules,
)
from esmjax.errors import InputError

log = logging.getLogger(__name__)

# Parameters left replicated by a failed rule may hold at most this share of the parameter bytes
# per device unless ``mesh.allow_replicated`` is set.
REPLICATED_LIMIT = 0.05


class ShardingError(InputError):
    """A mesh that does not fit the devices, or that cannot shard the model as the rules ask."""


# --------------------------------------------------------------------------------------------------
# Mesh
# --------------------------------------------------------------------------------------------------
def mesh_split(cfg: MeshConfig, num_devices: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The ``(ici, dcn)`` sizes of ``(data, fsdp, tensor)``: -1 resolved within one granule."""
    dcn = (cfg.dcn_data, cfg.dcn_fsdp, cfg.dcn_tensor)
    ici = [cfg.ici_data, cfg.ici_fsdp, cfg.ici_tensor]
    per_slice, rem = divmod(num_devices, math.prod(dcn))
    if rem:
        raise ShardingError(f"mesh.dcn_*: {num_devices} devices do not split into dcn sizes {dcn}")
    if ici.count(-1) > 1:
        raise ShardingError(f"mesh.ici_*: at most one mesh size may be -1, got {ici}")
    if -1 in ici:
        known = math.prod(s for s in ici if s != -1)
        if per_slice % known:
            raise ShardingError(
                f"mesh.ici_*: {per_slice} devices per slice are not divisible by ici sizes {ici}"
            )
        ici[ici.index(-1)] = per_slice // known
    if math.prod(ici) != per_slice:
        raise ShardingError(
            f"mesh.ici_*: mesh data={ici[0]}x{dcn[0]}, fsdp={ici[1]}x{dcn[1]}, "
            f"tensor={ici[2]}x{dcn[2]} needs {math.prod(ici) * math.prod(dcn)} devices, but "
            f"{num_devices} are present"
        )
    return tuple(ici), dcn


def mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    """The ``(data, fsdp, tensor)`` sizes: each axis's ici size times its dcn size."""
    ici, dcn = mesh_split(cfg, num_devices)
    return tuple(i * d for i, d in zip(ici, dcn))  # type: ignore[return-value]


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The ``(data, fsdp, tensor)`` mesh of ``cfg`` over ``devices`` (default: all), Auto axes
    (JAX's default is Explicit); ``dcn_*`` sizes span granules (:func:`hybrid_mesh`)."""
    devices = list(devices if devices is not None else jax.devices())
    ici, dcn = mesh_split(cfg, len(devices))
    return hybrid_mesh(ici, dcn, devices)


def granules(devices: Sequence[jax.Device], count: int) -> list[list[jax.Device]]:
    """``devices`` in ``count`` groups joined by the slow network (DCN), each in device order.

    TPU devices group by slice (``slice_index``), and a multi-slice job needs one group per
    slice. Other devices (GPU nodes, CPU processes) have no slice: they group as consecutive
    processes, one group per node when the processes are numbered node by node (SLURM's task
    ids, the JobSet's process ids); a single process splits its devices into ``count`` groups.
    """
    slices = sorted({getattr(d, "slice_index", 0) for d in devices})
    if devices[0].platform == "tpu" and (len(slices) > 1 or count > 1):
        if len(slices) != count:
            raise ShardingError(
                f"mesh.dcn_*: sizes multiply to {count}, but the TPU devices form "
                f"{len(slices)} slice(s); the dcn sizes must multiply to the number of slices"
            )
        by_slice = {s: [d for d in devices if d.slice_index == s] for s in slices}
        return [sorted(by_slice[s], key=lambda d: d.id) for s in slices]
    ordered = sorted(devices, key=lambda d: (d.process_index, d.id))
    processes = len({d.process_index for d in devices})
    if count % processes and processes % count:
        raise ShardingError(
            f"mesh.dcn_*: sizes multiply to {count}, which neither divides nor is a multiple "
            f"of the {processes} processes; make the product of the dcn sizes the number of "
            "hosts (nodes)"
        )
    held = {d.process_index: 0 for d in ordered}
    for d in ordered:
        held[d.process_index] += 1
    if len(set(held.values())) > 1:
        raise ShardingError(f"mesh.dcn_*: the processes hold unequal numbers of devices {held}")
    size = len(ordered) // count
    groups = [ordered[i * size : (i + 1) * size] for i in range(count)]
    return groups


def hybrid_devices(
    ici: Sequence[int], dcn: Sequence[int], devices: Sequence[jax.Device]
) -> np.ndarray:
    """The device array of :func:`hybrid_mesh`: axis ``k`` is ``dcn[k]`` granules (slices or
    nodes, :func:`granules`) by ``ici[k]`` devices of one granule, so an axis whose dcn size is 1
    never leaves a granule. Inside a granule the devices follow the physical topology
    (``mesh_utils.create_device_mesh``: a TPU's torus, a GPU node's id order); granule ``g`` takes
    dcn position ``g`` in row-major order."""
    from jax.experimental import mesh_utils

    groups = granules(devices, math.prod(dcn))
    blocks = np.stack(
        [
            mesh_utils.create_device_mesh(tuple(ici), g, allow_split_physical_axes=True)
            for g in groups
        ]
    )
    n = len(ici)
    arr = blocks.reshape(*dcn, *ici).transpose([a for k in range(n) for a in (k, n + k)])
    return arr.reshape(tuple(i * d for i, d in zip(ici, dcn)))


def hybrid_mesh(ici: Sequence[int], dcn: Sequence[int], devices: Sequence[jax.Device]) -> Mesh:
    """The ``(data, fsdp, tensor)`` mesh of :func:`hybrid_devices`, Auto axis types."""
    arr = hybrid_devices(ici, dcn, devices)
    return Mesh(arr, MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def target_mesh(sizes: dict[str, int], devices: Sequence[jax.Device], granules: int = 1) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh of ``sizes`` over ``devices`` that are ``granules`` groups
    joined by the slow network (TPU slices over DCN, GPU hosts over the datacenter network).

    The granules go on ``data`` first, then on ``fsdp``; ``tensor`` never crosses them.
    """
    shape = tuple(sizes[a] for a in MESH_AXES)
    if math.prod(shape) != len(devices):
        raise ShardingError(
            f"--mesh {_fmt_mesh(sizes)} needs {math.prod(shape)} devices; the target has "
            f"{len(devices)}"
        )
    on_data = math.gcd(sizes["data"], granules)
    on_fsdp = granules // on_data
    if sizes["fsdp"] % on_fsdp:
        raise ShardingError(
            f"--mesh {_fmt_mesh(sizes)}: {granules} hosts or slices do not split over data "
            f"x fsdp (tensor stays inside one); make data or fsdp a multiple of {granules}"
        )
    dcn = (on_data, on_fsdp, 1)
    ici = tuple(s // d for s, d in zip(shape, dcn))
    return hybrid_mesh(ici, dcn, devices)


def single_device_mesh() -> Mesh:
    """This process's first device: in a multi-process job, ``jax.devices()[0]`` is process 0's."""
    device = jax.local_devices()[:1]
    return Mesh(np.asarray(device).reshape(1, 1, 1), MESH_AXES, axis_types=(AxisType.Auto,) * 3)


# --------------------------------------------------------------------------------------------------
# Logical -> physical
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class FailedRule:
    """Dimension ``dim`` (logical ``name``, ``size``) of an array was to be split over mesh axis
    ``axis`` (``axis_size`` devices) after the rule's axes already chosen for it (product
    ``before``), but ``before * axis_size`` does not divide ``size``: it stays replicated there."""

    dim: int
    name: str
    size: int
    axis: str
    axis_size: int
    before: int


def _spec_and_failures(
    axes: Sequence[str | None], shape: Sequence[int], rules: Rules, mesh_sizes: dict[str, int]
) -> tuple[P, list[FailedRule]]:
    table = dict(rules)
    used: set[str] = set()
    spec: list[Any] = []
    failed: list[FailedRule] = []
    for dim, (name, size) in enumerate(zip(axes, shape, strict=True)):
        chosen: list[str] = []
        for ax in table.get(name, ()) if name else ():
            if ax in used or mesh_sizes.get(ax, 1) == 1:
                continue
            before = math.prod(mesh_sizes[a] for a in chosen)
            if size % (before * mesh_sizes[ax]) == 0:
                chosen.append(ax)
            else:
                failed.append(FailedRule(dim, name, size, ax, mesh_sizes[ax], before))
        used.update(chosen)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    while spec and spec[-1] is None:
        spec.pop()
    return P(*spec), failed


def logical_to_spec(
    axes: Sequence[str | None], shape: Sequence[int], rules: Rules, mesh_sizes: dict[str, int]
) -> P:
    """The PartitionSpec for an array with logical ``axes``.

    A dimension is split over the rule's mesh axes that are not yet used by this array and whose
    product divides it; otherwise it stays replicated (for parameters, ``check_replication`` then
    reports it).
    """
    return _spec_and_failures(axes, shape, rules, mesh_sizes)[0]


def mesh_sizes(mesh: Mesh) -> dict[str, int]:
    return dict(zip(mesh.axis_names, mesh.devices.shape))


# --------------------------------------------------------------------------------------------------
# No silent replication
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Replicated:
    """A parameter that a failed rule leaves (partly) replicated, and what it costs per device."""

    path: str
    shape: tuple[int, ...]
    spec: P
    bytes_per_device: int
    failed: tuple[FailedRule, ...]


def _shard_bytes(shape: Sequence[int], itemsize: int, spec: P, sizes: dict[str, int]) -> int:
    n = itemsize
    for i, size in enumerate(shape):
        entry = spec[i] if i < len(spec) else None
        names = () if entry is None else (entry,) if isinstance(entry, str) else entry
        n *= size // math.prod(sizes[a] for a in names)
    return n


def _params(abstract: Any) -> list[tuple[str, tuple[int, ...], int, tuple[str | None, ...]]]:
    """(path, shape, itemsize, logical axes) of every ``nnx.Variable`` in ``abstract``."""
    from flax import nnx

    out = []
    for path, v in nnx.to_flat_state(abstract):
        axes = v.get_metadata().get("out_sharding") or (None,) * len(v.shape)
        out.append((".".join(map(str, path)), tuple(v.shape), np.dtype(v.dtype).itemsize, axes))
    return out


def replication_report(
    abstract: Any, sizes: dict[str, int], rules: Rules
) -> tuple[list[Replicated], int]:
    """The parameters of ``abstract`` (``nnx.Variable`` leaves with logical axes, or its
    ``_params`` rows) that a rule fails to shard on a mesh of ``sizes``, and the parameter bytes one
    device holds in all.

    A rule fails when its mesh axis (size > 1, not yet used by the array) does not divide the
    dimension. Axes a rule does not name, or that another dimension of the array already uses, are
    not failures: that replication is what the rules ask for.
    """
    replicated, total = [], 0
    params = abstract if isinstance(abstract, list) else _params(abstract)
    for path, shape, itemsize, axes in params:
        spec, failed = _spec_and_failures(axes, shape, rules, sizes)
        nbytes = _shard_bytes(shape, itemsize, spec, sizes)
        total += nbytes
        if failed:
            replicated.append(Replicated(path, shape, spec, nbytes, tuple(failed)))
    return replicated, total


def _fmt_bytes(n: float) -> str:
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def _fmt_mesh(sizes: dict[str, int]) -> str:
    return ",".join(f"{a}={sizes.get(a, 1)}" for a in MESH_AXES)


def _fits(abstract: Any, sizes: dict[str, int], rules: Rules) -> bool:
    return not replication_report(abstract, sizes, rules)[0]


def suggest_meshes(
    abstract: Any, sizes: dict[str, int], rules: Rules, failure: FailedRule
) -> list[str]:
    """Meshes near ``sizes`` on which no rule fails: the failing axis one size down and one up
    (other axes kept; the device count changes), and the best shape on the same device count
    (fewest parameter bytes per device)."""
    abstract = _params(abstract)  # once, not per trial mesh
    out = []
    cur = sizes[failure.axis]
    below = [s for s in range(cur - 1, 1, -1) if failure.size % (failure.before * s) == 0]
    above = [s for s in range(cur + 1, 4 * cur + 1) if failure.size % (failure.before * s) == 0]
    for candidates in (below, above):
        for s in candidates:
            trial = {**sizes, failure.axis: s}
            if _fits(abstract, trial, rules):
                out.append(f"{_fmt_mesh(trial)} ({math.prod(trial.values())} devices)")
                break
    n = math.prod(sizes[a] for a in MESH_AXES)
    best: tuple[int, int, dict[str, int]] | None = None
    for d in range(1, n + 1):
        for f in range(1, n // d + 1):
            if n % (d * f):
                continue
            trial = {"data": d, "fsdp": f, "tensor": n // (d * f)}
            report, total = replication_report(abstract, trial, rules)
            if report:
                continue
            if best is None or (total, -d) < best[:2]:
                best = (total, -d, trial)
    if best is not None and best[2] != {a: sizes[a] for a in MESH_AXES}:
        out.append(f"{_fmt_mesh(best[2])} (the same {n} devices)")
    return out


def check_replication(
    abstract: Any, sizes: dict[str, int], rules: Rules, *, allow_replicated: bool = False
) -> list[Replicated]:
    """Lists (logs) every parameter a failed rule leaves replicated, with its bytes per device, and
    refuses a mesh on which they exceed ``REPLICATED_LIMIT`` (5%) of the parameter bytes per device.

    The refusal is one ``ShardingError`` line naming the largest offender (parameter, dimension,
    size, mesh axis and its size) and the nearest meshes that divide it. ``allow_replicated``
    (``mesh.allow_replicated``) turns it into a warning. Called by ``tree_shardings``, the one place
    parameter shardings are resolved (train state, ``plan``, checkpoint restore for ``evaluate``,
    ``embed`` and ``fold``), so no command can skip it.
    """
    replicated, total = replication_report(abstract, sizes, rules)
    if not replicated:
        return replicated
    lost = sum(r.bytes_per_device for r in replicated)
    share = lost / max(total, 1)
    if jax.process_index() == 0:
        for r in replicated:
            why = "; ".join(
                f"dim {f.dim} ({f.name}) {f.size} is not divisible by {f.axis}={f.axis_size}"
                + (f" x {f.before}" if f.before > 1 else "")
                for f in r.failed
            )
            log.warning(
                "replicated: %s %s %s, %s per device: %s",
                r.path,
                "x".join(map(str, r.shape)),
                r.spec,
                _fmt_bytes(r.bytes_per_device),
                why,
            )
    summary = (
        f"mesh {_fmt_mesh(sizes)} leaves {len(replicated)} parameter(s) replicated that the rules "
        f"ask to shard: {_fmt_bytes(lost)} of the {_fmt_bytes(total)} of parameters per device "
        f"({share:.0%})"
    )
    if share <= REPLICATED_LIMIT:
        log.warning("%s (under the %.0f%% limit)", summary, 100 * REPLICATED_LIMIT)
        return replicated
    if allow_replicated:
        log.warning("%s; accepted because mesh.allow_replicated is set", summary)
        return replicated
    worst = max(replicated, key=lambda r: r.bytes_per_device)
    f = worst.failed[0]
    divisor = f"{f.axis}={f.axis_size}" + (f" (x {f.before} already used)" if f.before > 1 else "")
    hints = suggest_meshes(abstract, sizes, rules, f)
    raise ShardingError(
        f"{summary}, over the {REPLICATED_LIMIT:.0%} limit; the largest is {worst.path} "
        f"[{'x'.join(map(str, worst.shape))}], whose dim {f.dim} ({f.name}) of size {f.size} is "
        f"not divisible by mesh axis {divisor}"
        + (f"; meshes that divide it: {'; '.join(hints)}" if hints else "")
        + "; mesh.allow_replicated=true runs anyway"
    )


def fit_mesh(abstract: Any, rules: Rules, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The inference mesh over ``devices`` (default: all): ``fsdp`` as wide as the rules can shard
    the model's parameters on, the rest on ``data`` (``tensor`` = 1).

    ``embed`` and ``evaluate`` choose no mesh of their own, so instead of refusing a device count
    that does not divide the model (8M on 6 devices: 320 % 6 != 0) they take the shape with the
    fewest parameter bytes per device among those on which no rule fails (ties: more ``data``);
    ``fsdp=1`` (plain data parallelism) always qualifies.
    """
    devices = list(devices if devices is not None else jax.devices())
    n = len(devices)
    params = _params(abstract)
    best: tuple[int, int, int] | None = None
    for f in range(1, n + 1):
        if n % f:
            continue
        sizes = {"data": n // f, "fsdp": f, "tensor": 1}
        report, total = replication_report(params, sizes, rules)
        if not report and (best is None or (total, -(n // f)) < best[:2]):
            best = (total, -(n // f), f)
    assert best is not None  # fsdp=1 has no failed rule
    fsdp = best[2]
    if fsdp < n and jax.process_index() == 0:
        log.info(
            "mesh data=%d,fsdp=%d: the model's sharded dimensions do not divide fsdp=%d",
            n // fsdp,
            fsdp,
            n,
        )
    return make_mesh(MeshConfig(ici_data=n // fsdp, ici_fsdp=fsdp, ici_tensor=1), devices)


def tree_shardings(
    abstract: Any, mesh: Mesh, rules: Rules, *, allow_replicated: bool = False
) -> Any:
    """NamedShardings for a pytree of ``nnx.Variable`` (from ``nnx.eval_shape``) by their logical
    axes, after ``check_replication`` (which may refuse the mesh)."""
    from flax import nnx

    sizes = mesh_sizes(mesh)
    check_replication(abstract, sizes, rules, allow_replicated=allow_replicated)

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


def compute_platform() -> str:
    """The platform the program being traced is for: that of the mesh in ``use_mesh`` (a plan
    compiling for a TPU or GPU from a CPU machine), else JAX's default backend. Every choice of a
    CPU-only or accelerator-only code path reads this, never ``jax.default_backend()``, so that a
    compiled plan holds the program the accelerator would run."""
    ctx = _CONTEXT.get()
    if ctx is None:
        return jax.default_backend()
    return ctx[0].devices.flat[0].platform


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
