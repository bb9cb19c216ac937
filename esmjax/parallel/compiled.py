"""What a compiled program holds, read from the compiler's own output: memory per device, FLOPs,
the attention kernel, and the collectives one call runs.

The optimized HLO text (``compiled.as_text()``) is the program the device runs. Its collectives
are counted per call of the program: an op inside a ``while`` body (the accumulation scan, the
layer scan) counts once per iteration, by the trip count XLA records (``known_trip_count``); a
loop whose count XLA does not know counts once and is flagged. An op is asynchronous when the
compiler split it into ``-start``/``-done`` halves or wrapped it in ``async-start``, which is what
lets the scheduler overlap it with compute.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from typing import Any

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")

# What each kernel leaves in a compiled program: the Mosaic TPU kernels (splash) are
# ``tpu_custom_call``s; Pallas Triton kernels ``__gpu$xla.gpu.triton``; cuDNN ``__cudnn$fmha``.
KERNEL_CALLS = {
    "splash": 'custom_call_target="tpu_custom_call"',
    "pallas_gpu": 'custom_call_target="__gpu$xla.gpu.triton"',
    "cudnn": 'custom_call_target="__cudnn$fmha',
}

_DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
    "f32": 4, "s64": 8, "u64": 8, "f64": 8, "f8e4m3fn": 1, "f8e5m2": 1,
}  # fmt: skip
_ARRAY = re.compile(r"\b([a-z]+\d*[a-z0-9]*)\[([\d,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s([a-z][\w\-]*)\((.*)$")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_CALLEE = re.compile(
    r"\b(body|condition|calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)"
)
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')


def _arrays(text: str) -> list[tuple[str, int]]:
    """(dtype, bytes) of every array type in ``text``."""
    out = []
    for dtype, dims in _ARRAY.findall(text):
        if dtype in _DTYPE_BYTES:
            n = 1
            for d in filter(None, dims.split(",")):
                n *= int(d)
            out.append((dtype, n * _DTYPE_BYTES[dtype]))
    return out


@dataclasses.dataclass
class _Computation:
    name: str
    entry: bool
    lines: list[tuple[str, str, str, str]]  # (name, result type, opcode, rest)


def _computations(hlo: str) -> list[_Computation]:
    comps: list[_Computation] = []
    for line in hlo.splitlines():
        header = _HEADER.match(line)
        if header and not line.startswith(" "):
            comps.append(_Computation(header.group(2), bool(header.group(1)), []))
            continue
        m = _INSTR.match(line)
        if m and comps:
            comps[-1].lines.append((m.group(1), m.group(2), m.group(3), m.group(4)))
    return comps


def _trip_count(rest: str, by_name: dict[str, _Computation]) -> int | None:
    """A while loop's trip count: XLA's ``known_trip_count`` when recorded, else the one integer
    constant its condition compares the counter with (``i < N``, counting from 0, as ``scan``
    writes it); None when neither is found."""
    found = _TRIP.search(rest)
    if found:
        return int(found.group(1))
    cond = re.search(r"\bcondition=%?([\w.\-]+)", rest)
    todo = [cond.group(1)] if cond else []
    values: set[int] = set()
    while todo:  # the condition and what it calls (XLA:GPU fuses the compare)
        comp = by_name.get(todo.pop())
        for _, result, opcode, args in comp.lines if comp else ():
            m = re.match(r"(-?\d+)\)", args)
            if opcode == "constant" and re.match(r"[su](32|64)\[\]", result) and m:
                values.add(int(m.group(1)))
            todo += [callee for _, callee in _CALLEE.findall(args)]
    return values.pop() if len(values) == 1 else None


def _multipliers(comps: list[_Computation]) -> tuple[dict[str, int], set[str], bool]:
    """How often one call of the program runs each computation; the computations that run an
    async collective's body; whether some loop's trip count was unknown."""
    mult: dict[str, int] = collections.defaultdict(int)
    by_name = {c.name: c for c in comps}
    async_bodies: set[str] = set()
    unknown = False
    for c in comps:
        if c.entry:
            mult[c.name] = 1
    # HLO text defines callees before callers, so reversed order visits callers first.
    for c in reversed(comps):
        m = mult.get(c.name, 0)
        if not m:
            continue
        for _, _, opcode, rest in c.lines:
            callees = list(_CALLEE.findall(rest))
            for group in _BRANCHES.findall(rest):
                callees += [("branch", b.strip().lstrip("%")) for b in group.split(",")]
            trip = 1
            if opcode == "while":
                n = _trip_count(rest, by_name)
                unknown |= n is None
                trip = n or 1
            for kind, callee in callees:
                mult[callee] += m * (trip if kind == "body" else 1)
                if ("async" in opcode and opcode.endswith("-start")) or "async_coll" in callee:
                    async_bodies.add(callee)
    return mult, async_bodies, unknown


@dataclasses.dataclass(frozen=True)
class Collective:
    """One kind of collective in one dtype: calls per program call and bytes of the full
    (gathered / unreduced) arrays they move, summed over those calls."""

    op: str
    dtype: str
    count: int
    bytes: int
    async_count: int


def collectives(hlo: str) -> tuple[list[Collective], bool]:
    """The collectives of one call of the program in ``hlo`` (optimized HLO text), largest
    first, and whether a loop's trip count was unknown (its body then counts once).

    One collective can appear twice: libtpu's async collective fusion keeps the op both in the
    computation its ``async-collective-start`` runs and in the fusion that overlaps its
    completion with compute, under one ``channel_id``; it counts once.
    """
    comps = _computations(hlo)
    mult, async_bodies, unknown = _multipliers(comps)
    seen: dict[str, tuple[str, str, int, int, bool]] = {}
    for c in comps:
        m = mult.get(c.name, 0)
        for name, result, opcode, rest in c.lines:
            base = opcode.removesuffix("-start")
            if base == "all-reduce" and c.name.startswith("all-reduce-scatter"):
                base = "reduce-scatter"  # TPU: a reduce-scatter is a fusion around an all-reduce
            if base not in COLLECTIVES or not m:
                continue
            arrays = _arrays(result) + _arrays(rest.split(")", 1)[0])
            if not arrays:
                continue
            dtype, size = max(arrays, key=lambda a: a[1])
            is_async = opcode.endswith("-start") or c.name in async_bodies
            channel = re.search(r"\bchannel_id=(\d+)", rest)
            key = f"channel {channel.group(1)}" if channel else f"{c.name}/{name}"
            old = seen.get(key)
            if old is None or old[2] < m:
                seen[key] = (base, dtype, m, size, is_async or bool(old and old[4]))
            elif is_async:
                seen[key] = (*old[:4], True)
    acc: dict[tuple[str, str], list[int]] = collections.defaultdict(lambda: [0, 0, 0])
    for base, dtype, m, size, is_async in seen.values():
        row = acc[(base, dtype)]
        row[0] += m
        row[1] += m * size
        row[2] += m if is_async else 0
    rows = [Collective(op, dt, n, b, a) for (op, dt), (n, b, a) in acc.items()]
    return sorted(rows, key=lambda r: -r.bytes), unknown


def kernel_calls(hlo: str) -> dict[str, int]:
    """How many custom calls of each attention kernel (``KERNEL_CALLS``) the program holds."""
    return {k: hlo.count(marker) for k, marker in KERNEL_CALLS.items() if marker in hlo}


def _kernel_name(name: str, rest: str) -> str:
    """A kernel custom call's name: its op name's last part (Pallas Triton calls), else the
    instruction's (libtpu names Mosaic calls after their kernel)."""
    op = re.search(r'op_name="([^"]*)"', rest)
    parts = [p for p in (op.group(1).split("/") if op else []) if p != "pallas_call"]
    return parts[-1] if parts else name


def forwards_in_backward(hlo: str) -> int:
    """Kernel forwards that run again in the backward pass (remat recomputing them). A Pallas
    Triton call says where it was traced (its op name is under ``transpose(...)`` in the
    backward); a Mosaic call carries no op name, so a forward kernel (``splash_mha_fwd*``) counts
    when its computation also runs a backward kernel (``splash_mha_dq*``/``dkv*``): the backward
    loop's body."""
    n = 0
    for c in _computations(hlo):
        calls = [
            (_kernel_name(name, rest), re.search(r'op_name="([^"]*)"', rest))
            for name, _, opcode, rest in c.lines
            if opcode == "custom-call" and any(m in rest for m in KERNEL_CALLS.values())
        ]
        has_backward = any("backward" in k or "_dq" in k or "_dkv" in k for k, _ in calls)
        for kernel, op in calls:
            if "forward" in kernel or "_fwd" in kernel:
                n += ("transpose(" in op.group(1)) if op else has_backward
    return n


def memory(compiled: Any) -> dict[str, int]:
    """The compiler's memory figures per device, in bytes; ``total`` is what the program needs
    at its peak: arguments + outputs not aliased to arguments + temporaries."""
    m = compiled.memory_analysis()
    out = {
        "arguments": m.argument_size_in_bytes,
        "outputs": m.output_size_in_bytes,
        "aliased": m.alias_size_in_bytes,
        "temp": m.temp_size_in_bytes,
        "code": m.generated_code_size_in_bytes,
    }
    out["total"] = out["arguments"] + out["outputs"] - out["aliased"] + out["temp"]
    return out


def flops(compiled: Any) -> float | None:
    """FLOPs per device of one program call from the compiler's cost analysis (each loop body
    once, custom calls as 0), or None where the compiler gives none (XLA:GPU without a device)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # the deviceless GPU client does not implement it
        cost = None
    cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
    if cost and "flops" in cost:
        return float(cost["flops"])
    return None


def summary(compiled: Any) -> dict[str, Any]:
    """Memory, FLOPs, kernels and collectives of a compiled program, as plain data."""
    hlo = compiled.as_text()
    rows, unknown = collectives(hlo)
    return {
        "memory_bytes": memory(compiled),
        "flops_per_device": flops(compiled),
        "kernels": kernel_calls(hlo),
        "kernel_forwards_in_backward": forwards_in_backward(hlo),
        "collectives": [dataclasses.asdict(r) for r in rows],
        "collectives_unknown_trip_count": unknown,
    }
