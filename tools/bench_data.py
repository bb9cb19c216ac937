"""Input-pipeline throughput: packed, masked training tokens per second that one host's process
produces.

    # the bundled CATH S20 sample, built into a temp folder:
    python tools/bench_data.py
    python tools/bench_data.py --data DIR --rows 2048 --process-count 1 --workers 0 2 4
    # UniRef-like lengths (log-normal, median 250), random residues:
    python tools/bench_data.py --synthetic 300000

Each configuration runs ``esmjax.data.pipeline.train_batches`` as the trainer does (``rows`` = this
process's rows per optimizer step, ``process_count`` processes planning the same global batch) and
times ``--batches`` calls of ``next()`` after warm-up batches. Reported: tokens/s (all positions of
the [rows, seq_len] arrays, i.e. what the devices consume), non-pad tokens/s, packing efficiency and
the first-batch latency.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from esmjax.config import DataConfig  # noqa: E402
from esmjax.data.pipeline import train_batches  # noqa: E402


def bench(
    data: str, seq_len: int, rows: int, process_count: int, workers: int, batches: int
) -> dict:
    cfg = DataConfig(train=data, seq_len=seq_len, num_workers=workers, prefetch=max(2, workers))
    with train_batches(cfg, rows=rows, process_index=0, process_count=process_count) as it:
        t0 = time.perf_counter()
        next(it)
        first = time.perf_counter() - t0
        for _ in range(
            2 * workers
        ):  # worker processes start on demand: let them all start before timing
            next(it)
        t0 = time.perf_counter()
        for _ in range(batches):
            next(it)
        wall = time.perf_counter() - t0
        eff = it.packing_efficiency
    tokens = batches * rows * seq_len
    return {
        "seq_len": seq_len,
        "rows": rows,
        "process_count": process_count,
        "workers": workers,
        "tokens_per_s": round(tokens / wall),
        "nonpad_tokens_per_s": round(tokens * eff / wall),
        "packing_efficiency": round(eff, 4),
        "first_batch_s": round(first, 2),
    }


def synthetic_fasta(n: int, folder: Path) -> tuple[Path, Path]:
    """``n`` random sequences with UniRef-like lengths (log-normal, median 250 residues, 2% over
    1,022) in clusters of geometric size (mean 2.5), as a FASTA file and a membership TSV. For
    timing and packing only."""
    rng = np.random.default_rng(0)
    aa = np.frombuffer(b"ACDEFGHIKLMNPQRSTVWY", np.uint8)
    lengths = np.clip(rng.lognormal(np.log(250), 0.7, n).astype(int), 20, 5000)
    cluster = np.cumsum(rng.random(n) < 0.4)
    fasta, tsv = folder / "synthetic.fa", folder / "synthetic.tsv"
    with open(fasta, "w") as f, open(tsv, "w") as t:
        for i, length in enumerate(lengths.tolist()):
            f.write(f">S{i}\n{aa[rng.integers(0, 20, length)].tobytes().decode()}\n")
            t.write(f"C{cluster[i]}\tS{i}\n")
    return fasta, tsv


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--data",
        help="dataset folder or FASTA (default: build data/cath_s20.fa.gz into a temp folder)",
    )
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument(
        "--rows", type=int, default=256, help="this process's rows per step (default 256)"
    )
    p.add_argument(
        "--process-count",
        type=int,
        default=8,
        help="processes sharing the global batch (default 8: 8 x 256 rows)",
    )
    p.add_argument(
        "--workers", type=int, nargs="+", default=[0, 2], help="num_workers values to try"
    )
    p.add_argument("--batches", type=int, default=10, help="timed batches per configuration")
    p.add_argument(
        "--synthetic", type=int, metavar="N", help="build N synthetic UniRef-like records instead"
    )
    p.add_argument("--json", action="store_true", help="print one JSON line per configuration")
    args = p.parse_args()
    data, tmp = args.data, None
    if data is None:
        from esmjax.data.build import build_dataset

        tmp = Path(tempfile.mkdtemp(prefix="bench_data_"))
        if args.synthetic:
            fasta, tsv = synthetic_fasta(args.synthetic, tmp)
            data = str(tmp / "synthetic")
            t0 = time.perf_counter()
            build_dataset([fasta], data, clusters=tsv, val_fraction=0.005)
            print(
                f"# built {args.synthetic} records in {time.perf_counter() - t0:.1f}s",
                file=sys.stderr,
            )
        else:
            data = str(tmp / "cath_s20")
            build_dataset([ROOT / "data" / "cath_s20.fa.gz"], data, val_fraction=0.02)
    print(
        f"# {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"python {platform.python_version()}, data {data}",
        file=sys.stderr,
    )
    try:
        run(args, data)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


def run(args: argparse.Namespace, data: str) -> None:
    for w in args.workers:
        r = bench(data, args.seq_len, args.rows, args.process_count, w, args.batches)
        if args.json:
            print(json.dumps(r))
        else:
            print(
                f"seq_len {r['seq_len']} rows {r['rows']} x {r['process_count']} processes, "
                f"workers {w}: {r['tokens_per_s'] / 1e6:.2f}M tokens/s "
                f"({r['nonpad_tokens_per_s'] / 1e6:.2f}M "
                f"non-pad), packing {r['packing_efficiency']:.4f}, first batch "
                f"{r['first_batch_s']}s"
            )


if __name__ == "__main__":
    raise SystemExit(main())
