"""Where the time of one esmjax train step goes, per compiled XLA operation.

    python tools/profile_train.py --preset esm2_t6_8M_UR50D --rows 8 --seq-len 256 [--top 30]

Runs the bench_train.py step (same batch, optimizer and mesh), traces two steps with
``jax.profiler`` (a Perfetto trace, kept in --trace-dir), and prints the operations that took the
most time with their output shape, what a fusion computes (the matmul's operand shapes and
contracted axes, or its main ops) and the JAX source op, then a summary by kind: matmuls of the
dense layers, attention rows (operations run once per batch row and layer), zero-filling of the
stacked buffers of the layer scan, other fused element-wise work. Operation times overlap when
XLA runs independent operations on both cores at once, so their sum can exceed the step time;
run under ``taskset -c 0`` for a one-core profile whose sum is the step. BENCHMARKS.md ("CPU
training profile") shows what this found.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
from bench_train import make_batch  # noqa: E402


def compiled_step(cfg, batch):
    """The train step of bench_train.py, its state and a device batch."""
    from esmjax.config import MeshConfig, OptimConfig
    from esmjax.models.esm2 import abstract_model
    from esmjax.parallel import sharding as shd
    from esmjax.train.optim import learning_rate, make_optimizer
    from esmjax.train.state import create_state, model_graphdef, state_shardings
    from esmjax.train.step import make_train_step

    mesh = shd.make_mesh(MeshConfig(ici_fsdp=-1))
    rules = shd.resolve_rules("fsdp")
    opt = OptimConfig(warmup_steps=1)
    tx = make_optimizer(opt, 1000, abstract_model(cfg)[1].to_pure_dict())
    with shd.use_mesh(mesh, rules):
        state = create_state(cfg, tx, state_shardings(cfg, tx, mesh, rules), 0)
    step = jax.jit(
        make_train_step(model_graphdef(cfg), tx, learning_rate(opt, 1000)), donate_argnums=0
    )
    b = {k: jax.numpy.asarray(v[None]) for k, v in batch.items()}
    return step, state, b, (mesh, rules)


def hlo_index(text: str) -> tuple[dict, dict]:
    """instruction name -> (shape, rest of line); computation name -> body text."""
    defs = {
        m.group(1): (m.group(2), m.group(3))
        for m in re.finditer(r"^\s*(?:ROOT )?%(\S+) = (\S+) \S+?\((?:.*?)\)(.*)$", text, re.M)
    }
    comps = {
        m.group(1): m.group(2) for m in re.finditer(r"^%(\S+) \(.*?\n((?:.*\n)*?)\}", text, re.M)
    }
    return defs, comps


def describe(name: str, defs: dict, comps: dict) -> tuple[str, str, str]:
    """(output shape, what the fusion computes, JAX op name) of one traced operation."""
    shape, rest = defs.get(name, ("", ""))
    what = ""
    called = re.search(r"calls=%(\S+?),", rest)
    body = comps.get(called.group(1), "") if called else ""
    dot = re.search(
        r"dot\(.*?\), (.*?contracting_dims=\{[\d,]*\}.*?contracting_dims=\{[\d,]*\})", body
    )
    if dot:
        operands = re.findall(r"= (f32\[[\d,]*\]|bf16\[[\d,]*\])\S* parameter", body)
        what = "matmul " + " x ".join(operands) + " " + dot.group(1).replace(", ", " ")
    elif body:
        ops = collections.Counter(re.findall(r"= \S+ (\w[\w-]*)\(", body))
        what = " ".join(f"{k}:{v}" for k, v in ops.most_common(5))
    op = re.search(r'op_name="([^"]*)"', rest)
    return shape.split("{")[0], what, op.group(1).rsplit("/", 2)[-1] if op else ""


def kind(name: str, shape: str, what: str, per_step: int, layers: int) -> str:
    if name.startswith(("while", "call", "conditional")):
        return "loops (contain the ops below)"
    if what.startswith("matmul") and per_step <= layers + 1:
        return "dense-layer matmuls"
    if per_step > layers + 1:
        return "attention rows"
    if "broadcast" in name and "broadcast:1" in what:
        return "zero-filled scan buffers"
    return "other fused work"


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--preset", default="esm2_t6_8M_UR50D")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--top", type=int, default=30, help="operations listed")
    ap.add_argument("--trace-dir", default="runs/profile_train", help="the trace is kept here")
    a = ap.parse_args()
    from esmjax.config import esm2_preset

    cfg = esm2_preset(a.preset)
    step, state, batch, (mesh, rules) = compiled_step(cfg, make_batch(a.rows, a.seq_len))
    from esmjax.parallel import sharding as shd

    with shd.use_mesh(mesh, rules):
        for _ in range(2):
            state, m = step(state, batch)
        jax.block_until_ready(m)
        t = time.perf_counter()
        for _ in range(3):
            state, m = step(state, batch)
        jax.block_until_ready(m)
        step_s = (time.perf_counter() - t) / 3
        defs, comps = hlo_index(step.lower(state, batch).compile().as_text())
        shutil.rmtree(a.trace_dir, ignore_errors=True)
        jax.profiler.start_trace(a.trace_dir, create_perfetto_trace=True)
        for _ in range(2):
            state, m = step(state, batch)
        jax.block_until_ready(m)
        jax.profiler.stop_trace()
    trace = next(Path(a.trace_dir).rglob("*.trace.json.gz"))
    events = json.load(gzip.open(trace))
    events = events["traceEvents"] if isinstance(events, dict) else events
    total, count = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e["name"] in defs:
            total[e["name"]] += e.get("dur", 0) / 2e3  # ms per step (2 traced steps)
            count[e["name"]] += 1
    print(f"{a.preset}, {a.rows} x {a.seq_len} tokens: {step_s * 1e3:.0f} ms per step")
    print(f"{'ms/step':>8} {'runs':>5}  {'operation':34s} {'shape':22s} what / JAX op")
    by_kind: collections.Counter = collections.Counter()
    for i, (name, ms) in enumerate(total.most_common()):
        shape, what, op = describe(name, defs, comps)
        runs = count[name] // 2
        by_kind[kind(name, shape, what, runs, cfg.num_layers)] += ms
        if i < a.top:
            print(f"{ms:8.1f} {runs:5d}  {name[:34]:34s} {shape[:22]:22s} {what[:70]} {op}")
    print("\nby kind (ms per step):")
    for k, ms in by_kind.most_common():
        print(f"  {ms:8.1f}  {k}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
