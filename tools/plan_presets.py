"""Compiles every preset's train step (and the inference jobs) for its documented TPU and GPU
targets with ``esmjax plan --target``, one plan at a time, and prints the BENCHMARKS.md tables.

    python tools/plan_presets.py --out /tmp/plans            # everything (about 40 min, 2 cores)
    python tools/plan_presets.py --out /tmp/plans --only 650m

The GPU plans need the CUDA plugin: pass its folder with ``--aot-gpu`` (``make test`` installs one
in ``.venv/aot-gpu``). Plans already in ``--out`` are read back, not compiled again.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (name, esmjax plan arguments): the targets each preset documents in its config.
TRAIN = [
    ("demo_v5p8", ["--config", "configs/demo.yaml", "--target", "v5p-8"]),
    ("demo_h100", ["--config", "configs/demo.yaml", "--target", "h100"]),
    ("8m_v5p8", ["--config", "configs/esm2_8m.yaml", "--target", "v5p-8"]),
    ("8m_h100", ["--config", "configs/esm2_8m.yaml", "--target", "h100"]),
    ("35m_v5p8", ["--config", "configs/esm2_35m.yaml", "--target", "v5p-8"]),
    ("35m_h100", ["--config", "configs/esm2_35m.yaml", "--target", "h100"]),
    ("150m_v5p8", ["--config", "configs/esm2_150m.yaml", "--target", "v5p-8"]),
    ("150m_h100", ["--config", "configs/esm2_150m.yaml", "--target", "h100"]),
    ("650m_v5p16", ["--config", "configs/esm2_650m.yaml", "--target", "v5p-16"]),
    ("650m_h100", ["--config", "configs/esm2_650m.yaml", "--target", "h100"]),
    ("3b_v5p128", ["--config", "configs/esm2_3b.yaml", "--target", "v5p-128"]),
    ("3b_h100x64", ["--config", "configs/esm2_3b.yaml", "--target", "h100-64"]),
    ("15b_v5p128", ["--config", "configs/esm2_15b.yaml", "--target", "v5p-128"]),
    ("15b_v5p256", ["--config", "configs/esm2_15b.yaml", "--target", "v5p-256"]),
    ("15b_h100x128", ["--config", "configs/esm2_15b.yaml", "--target", "h100:16x8"]),
]
_3B, _15B = "configs/esm2_3b.yaml", "configs/esm2_15b.yaml"
INFERENCE = [
    # The configs' model: bf16 compute, as `esmjax embed --dtype bfloat16` runs it.
    (
        "embed3b_v5p",
        ["--job", "embed", "--config", "configs/esm2_3b.yaml", "--target", "v5p:1x1x1"],
    ),
    ("embed3b_h100", ["--job", "embed", "--config", "configs/esm2_3b.yaml", "--target", "h100-1"]),
    (
        "embed15b_v5p",
        ["--job", "embed", "--config", "configs/esm2_15b.yaml", "--target", "v5p:1x1x1"],
    ),
    (
        "embed15b_h100",
        ["--job", "embed", "--config", "configs/esm2_15b.yaml", "--target", "h100-1"],
    ),
    ("fold384_v5p", ["--job", "fold", "--length", "384", "--target", "v5p:1x1x1"]),
    ("fold384_h100", ["--job", "fold", "--length", "384", "--target", "h100-1"]),
    ("fold1024_v5p", ["--job", "fold", "--length", "1024", "--target", "v5p:1x1x1"]),
    ("fold1024_h100", ["--job", "fold", "--length", "1024", "--target", "h100-1"]),
]


def run(name: str, args: list[str], out: Path, aot_gpu: str | None) -> dict | None:
    path = out / f"{name}.json"
    if not path.exists():
        env = dict(os.environ)
        if aot_gpu:
            env["PYTHONPATH"] = aot_gpu
        cmd = [sys.executable, "-m", "esmjax.cli", "plan", *args, "--json", str(path)]
        print("$ esmjax plan", " ".join(args), file=sys.stderr, flush=True)
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        (out / f"{name}.txt").write_text(r.stdout + r.stderr[-3000:])
        if not path.exists():
            print(f"  failed (exit {r.returncode}): {r.stderr.strip()[-300:]}", file=sys.stderr)
            return None
    return json.loads(path.read_text())


def _model(p: dict) -> str:
    from esmjax.train.plan import size_label

    return "ESMFold" if p["job"] == "fold" else f"ESM-2 {size_label(p['params'])}"


def _kernel(p: dict) -> str:
    return ", ".join(p["kernels"]) or "XLA"


def train_row(args: list[str], p: dict) -> str:
    m, c = p["mesh"], p["compiled_gb"]
    mesh = f"fsdp {m['fsdp']}" + (f" x tensor {m['tensor']}" if m["tensor"] > 1 else "")
    fits = "yes" if p["fits"] else "**no**"
    return (
        f"| {_model(p)} | {p['target']} | {mesh} | {p['rows_per_batch_shard']} x "
        f"{p['accumulation_steps']} | {c['total']:.2f} ({c['arguments']:.2f} + {c['temp']:.2f}) | "
        f"{p['analytic_gb']['total']:.2f} | {p['device_memory_gb']:.1f} | {fits} | {_kernel(p)} | "
        f"{p['compile_seconds']:.0f} | `esmjax plan {' '.join(args)}` |"
    )


def inference_row(args: list[str], p: dict) -> str:
    c = p["compiled_gb"]
    fits = "yes" if p["fits"] else "**no**"
    return (
        f"| {p['job']} {_model(p)} | {p['target']} | {p['rows']} x {p['length']} | "
        f"{c['total']:.2f} ({c['arguments']:.2f} + {c['temp']:.2f}) | "
        f"{p['device_memory_gb']:.1f} | {fits} | {_kernel(p)} | {p['compile_seconds']:.0f} | "
        f"`esmjax plan {' '.join(args)}` |"
    )


TRAIN_HEAD = (
    "model | target | mesh | rows per batch shard x accumulation | compiled GiB/device "
    "(arguments + temp) | analytic GiB | HBM GiB | fits | kernel | compile s | command"
)
INFERENCE_HEAD = (
    "job | target | rows x residues | compiled GiB/device (arguments + temp) | HBM GiB | fits | "
    "kernel | compile s | command"
)


def table(head: str, plans: list, row, a: argparse.Namespace, out: Path) -> None:
    """One markdown table: a row per plan of ``plans`` whose name matches ``--only``."""
    print(f"| {head} |")
    print("|" + "---|" * (head.count("|") + 1))
    for name, args in plans:
        if a.only and a.only not in name:
            continue
        p = run(name, args, out, a.aot_gpu)
        if p:
            print(row(args, p), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for each plan's JSON and report")
    ap.add_argument("--aot-gpu", default=str(ROOT / ".venv" / "aot-gpu"), help="CUDA plugin dir")
    ap.add_argument("--only", help="only plans whose name contains this")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    table(TRAIN_HEAD, TRAIN, train_row, a, out)
    print()
    table(INFERENCE_HEAD, INFERENCE, inference_row, a, out)


if __name__ == "__main__":
    main()
