"""Steady-state steps/s of the whole training loop (``esmjax train``: data pipeline, step dispatch,
preemption check, logging) for one or more source trees, e.g. before and after a change:

    python tools/bench_loop.py --tree /path/to/old/checkout --tree . --runs 3
    python tools/bench_loop.py --tree . --processes 2 --set model.preset=tiny \\
        --set data.seq_len=64 --set data.tokens_per_step=2048

Each run is a fresh ``esmjax train`` (``launch/local.sh P D`` for several processes) with
``PYTHONPATH`` set to the tree, on ``configs/demo.yaml`` (the bundled CATH S20 sample, built once
into a temporary folder unless --data is given) with ``num_steps = --steps``, ``log_every =
--log-every``, no evaluation and no checkpoint before the last step. The figure of a run is the
mean of ``step_seconds`` over its logging windows after the first (which holds compilation); runs
alternate between trees, and the median run per tree is reported with the spread. Prints one line
per run and a summary; --json writes everything.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def machine() -> str:
    model = ""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next(
            (l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name")),
            "",
        )
        avx512 = "avx512f" in out
    except OSError:
        avx512 = False
    flags = "yes" if avx512 else "no"
    return f"{model or platform.processor()}, {os.cpu_count()} cores, avx512 {flags}"


def build_data(out: Path, python: str) -> Path:
    ds = out / "cath_s20"
    subprocess.run(
        [
            python,
            "-m",
            "esmjax.cli",
            "data",
            "build",
            "--fasta",
            str(ROOT / "data" / "cath_s20.fa.gz"),
        ]
        + ["--out", str(ds), "--val-fraction", "0.05"],
        check=True,
        capture_output=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"},
    )
    return ds


def one_run(tree: Path, a, data: Path, workdir: Path) -> dict:
    cmd = [sys.executable, "-m", "esmjax.cli", "train", "--no-progress"]
    cmd += ["--config", str(ROOT / a.config), "--workdir", str(workdir)]
    sets = [
        f"data.train={data}",
        f"num_steps={a.steps}",
        f"log_every={a.log_every}",
        "eval_every=0",
        f"checkpoint.every={a.steps}",
        *a.set,
    ]
    for s in sets:
        cmd += ["--set", s]
    if a.processes > 1:
        cmd = [str(ROOT / "launch" / "local.sh"), str(a.processes), str(a.devices), *cmd]
    env = {
        **os.environ,
        "PYTHONPATH": str(tree),
        "JAX_PLATFORMS": "cpu",
        "JAX_NUM_CPU_DEVICES": str(a.devices),
        "ESMJAX_LOG": "WARNING",
    }
    env.pop("XLA_FLAGS", None)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode:
        raise SystemExit(f"run failed ({tree}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    secs = [m["step_seconds"] for m in lines if "step_seconds" in m][1:]
    return {"tree": str(tree), "step_seconds": statistics.mean(secs), "windows": secs, "wall": wall}


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--tree", action="append", type=Path, help="source tree (repeatable)")
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--steps", type=int, default=70)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--runs", type=int, default=3, help="runs per tree, alternating")
    ap.add_argument("--processes", type=int, default=1)
    ap.add_argument("--devices", type=int, default=1, help="CPU devices per process")
    ap.add_argument("--data", type=Path, help="built dataset (default: build the CATH sample)")
    ap.add_argument("--json", help="write the figures here")
    a = ap.parse_args()
    trees = [t.resolve() for t in (a.tree or [ROOT])]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = a.data or build_data(tmp, sys.executable)
        for i in range(a.runs):
            for j, tree in enumerate(trees):
                r = one_run(tree, a, data, tmp / f"run{i}_{j}")
                results.append(r)
                print(
                    f"run {i} {tree}: {r['step_seconds'] * 1e3:.1f} ms/step "
                    f"({1 / r['step_seconds']:.2f} steps/s), wall {r['wall']:.0f} s",
                    flush=True,
                )
    summary = {}
    for tree in trees:
        s = sorted(r["step_seconds"] for r in results if r["tree"] == str(tree))
        med = statistics.median(s)
        summary[str(tree)] = {"median_step_seconds": med, "steps_per_second": 1 / med, "runs": s}
        print(
            f"{tree}: median {med * 1e3:.1f} ms/step = {1 / med:.2f} steps/s "
            f"(runs {', '.join(f'{x * 1e3:.1f}' for x in s)} ms)"
        )
    info = {
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "load_average": os.getloadavg(),
    }
    print(json.dumps(info))
    if a.json:
        Path(a.json).write_text(json.dumps({**info, "summary": summary, "runs": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
