"""Learning rates of a fine-tuning recipe across seeds: how a recipe's defaults are chosen.

Runs ``esmjax finetune --config C`` once per (backbone rate, head rate) pair and seed, each in its
own workdir under ``--root`` (a finished run is read again, not rerun), varying ``seed`` (head
and adapters) and ``data.seed`` (batch order) together, then prints one markdown row per pair:
the validation Spearman at each evaluation (mean and spread over seeds), the test Spearman of the
best validation step, and the largest fall of the validation Spearman between two evaluations of
one seed (the instability a too-high rate shows; logged training losses are single batches, too
noisy to tell).

    python tools/finetune_sweep.py --config configs/finetune/sequence_regression.yaml \\
        --rates 1e-3:3e-3 3e-4:1e-3 1e-4:3e-4 --seeds 0 1 2 --root runs/sweep_tem1
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path


def run(config: str, root: Path, rate: str, seed: int, extra: list[str]) -> Path:
    peak, head = rate.split(":")
    workdir = root / f"lr{peak}_head{head}_seed{seed}"
    if (workdir / "report.json").exists():
        return workdir
    sets = [f"optim.peak_lr={peak}", f"head_lr={head}", f"seed={seed}", f"data.seed={seed}"]
    cmd = [sys.executable, "-m", "esmjax.cli", "finetune", "--config", config, "--no-progress"]
    cmd += ["--workdir", str(workdir)]
    for s in [*sets, *extra]:
        cmd += ["--set", s]
    print(" ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True)
    return workdir


def curves(workdir: Path) -> tuple[dict[int, float], dict]:
    """Validation Spearman by step, and report.json."""
    report = json.loads((workdir / "report.json").read_text())
    valid = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        if "valid_spearman" in m:
            valid[m["step"]] = m["valid_spearman"]
    return valid, report


def spread(xs: list[float]) -> str:
    if not xs:
        return "-"
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):.3f} ± {sd:.3f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--rates", nargs="+", required=True, help="BACKBONE:HEAD peak rates")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--root", required=True, type=Path)
    ap.add_argument("--set", action="append", default=[], help="more config overrides")
    args = ap.parse_args()
    print(
        "| backbone / head rate | valid Spearman by step (mean ± sd) | test Spearman | "
        "largest valid fall |"
    )
    print("|---|---|---|---|")
    for rate in args.rates:
        runs = [curves(run(args.config, args.root, rate, s, args.set)) for s in args.seeds]
        steps = sorted(set.intersection(*(set(v) for v, _ in runs)))
        by_step = ", ".join(f"{st}: {spread([v[st] for v, _ in runs])}" for st in steps)
        test = spread([r["test_spearman"] for _, r in runs if "test_spearman" in r])
        falls = [v[a] - v[b] for v, _ in runs for a, b in zip(steps, steps[1:])]
        fall = max(falls, default=0.0)
        print(f"| {rate.replace(':', ' / ')} | {by_step} | {test} | {fall:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
