"""Bucket datasets: streaming (range reads of the token file) against staging (a whole copy per
host), on a local GCS API server.

    python tools/bench_bucket.py                       # the bundled CATH S20 sample, built here
    python tools/bench_bucket.py --data DIR            # a folder made by `esmjax data build`
    python tools/bench_bucket.py --synthetic 200000    # UniRef-like lengths (tools/bench_data.py)

Starts ``gcp-storage-emulator`` on 127.0.0.1 and uploads the dataset into it, then measures, for
host 0 of ``--process-count`` hosts reading ``--steps`` training batches of ``--rows`` x
``--seq-len`` (``train_batches``, as the trainer reads them):

* stream: ``data.train`` = the ``gs://`` folder. The time to open it (index files downloaded), the
  first batch, tokens/s, range requests and bytes downloaded (index files + ranges; counted with
  ``--workers 0``) against the dataset's size, and the client's CPU time per range request;
* stage: ``esmjax.io.stage.stage`` (a whole copy per host) and tokens/s from the staged copy
  (memory-mapped token file);
* the read step alone (4,096 random records of the local copy) from the token file and from the
  ArrayRecord files;
* with ``--probe-array-record``: TFDS's ArrayRecord source opened straight on ``gs://``
  (array_record 0.8.6 opens paths through its own file layer and blocks; killed after
  ``--probe-timeout`` s).

Prints one JSON object. The emulator runs on the same host and serves one request at a time from
a single Python thread, so these are this machine's figures, not a network's: streaming here is
bounded by the emulator's requests per second, against GCS by round-trip latency over gcsfs's
concurrent connections (see BENCHMARKS.md "Bucket datasets").
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# gcp-storage-emulator's HTTPServer listens with a queue of 5: the connections of a batch's
# concurrent range reads beyond it would be dropped and retried by TCP after 1 s (as in
# tests/support/gcs_emulator.py).
BOOT = (
    "import sys, http.server; http.server.HTTPServer.request_queue_size = 1024; "
    "from gcp_storage_emulator.__main__ import main; main(sys.argv[1:])"
)


def _stream_probe(url: str, env: dict, q) -> None:
    os.environ.update(env)
    import tensorflow_datasets as tfds

    b = tfds.builder_from_directory(f"{url}/esmjax_protein_clusters/1.0.0")
    src = b.as_data_source(split="train")
    t0 = time.time()
    src.data_source.__getitems__(list(range(64)))
    q.put(time.time() - t0)


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def read_batches(train: str, args: argparse.Namespace) -> dict:
    """Opens ``train`` and reads ``args.steps`` batches as host 0 of ``args.process_count``."""
    from esmjax.config import DataConfig
    from esmjax.data.pipeline import train_batches

    cfg = DataConfig(
        train=train, seq_len=args.seq_len, num_workers=args.workers, prefetch=max(2, args.workers)
    )
    t0 = time.perf_counter()
    with train_batches(cfg, rows=args.rows, process_count=args.process_count) as it:
        opened = time.perf_counter() - t0
        t0 = time.perf_counter()
        next(it)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(args.steps):
            next(it)
        wall = time.perf_counter() - t0
        split = it.split
    out = {
        "open_s": round(opened, 3),
        "first_batch_s": round(first, 3),
        "tokens_per_s": round(args.steps * args.rows * args.seq_len / wall),
    }
    if getattr(split, "remote", None) and args.workers == 0:
        reader = split.token_file()
        out["range_requests"] = reader.requests  # all steps + the first batch
        out["range_bytes"] = reader.bytes_read
        out["requests_per_step"] = round(reader.requests / (args.steps + 1), 1)
    return out


def read_speed(folder: Path, repeats: int = 10) -> dict:
    """Milliseconds to read 4,096 random records of a local split, from the token file and from
    the ArrayRecord files (the read step of a batch alone, without packing and masking)."""
    import numpy as np

    from esmjax.data.source import open_split

    split = open_split(folder, "train")
    rng = np.random.default_rng(0)
    out = {}
    for name, read in [("token_file", split.read), ("array_record", split.read_array_record)]:
        read(rng.integers(0, split.num_records, 4096))  # warm-up: open files, page cache
        t0 = time.perf_counter()
        for _ in range(repeats):
            read(rng.integers(0, split.num_records, 4096))
        out[name] = round((time.perf_counter() - t0) / repeats * 1e3, 2)
    return out


def client_cost(url: str, records: int = 2048) -> str:
    """This process's CPU time per range request (gcsfs, aiohttp and esmjax's share; the
    emulator's work is in its own process): what bounds one data process's request rate whatever
    the store's latency."""
    import numpy as np

    from esmjax.data.source import open_split

    split = open_split(url, "train")
    rng = np.random.default_rng(1)
    split.read(rng.integers(0, split.num_records, 64))  # the client's start
    reader = split.token_file()
    before, cpu = reader.requests, time.process_time()
    wall = time.perf_counter()
    split.read(rng.integers(0, split.num_records, records))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    n = reader.requests - before
    return f"{cpu / n * 1e6:.0f} us over {n} requests ({wall / n * 1e3:.2f} ms wall each)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="a dataset folder (default: build the bundled CATH S20 sample)")
    ap.add_argument("--synthetic", type=int, metavar="N", help="build N UniRef-like records")
    ap.add_argument("--steps", type=int, default=20, help="timed batches after the first")
    ap.add_argument("--rows", type=int, default=64, help="this host's rows per step")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--process-count", type=int, default=8, help="hosts sharing the global batch")
    ap.add_argument("--workers", type=int, default=0, help="data worker processes per host")
    ap.add_argument(
        "--merge-gap",
        type=int,
        help="bytes between two ranges read by one request (default esmjax.io.ranges.MERGE_GAP)",
    )
    ap.add_argument("--probe-array-record", action="store_true")
    ap.add_argument("--probe-timeout", type=float, default=60.0)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-bucket-"))
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    server = subprocess.Popen(
        [sys.executable, "-c", BOOT, "start", "--host", "127.0.0.1"]
        + ["--port", str(port), "--in-memory", "--default-bucket", "bench"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url}
    os.environ.update(env)
    os.environ["ESMJAX_STAGE_DIR"] = str(tmp / "stage")
    try:
        from esmjax.data.build import build_dataset
        from esmjax.data.source import META_FILE, open_split
        from esmjax.io import paths, ranges, stage

        if args.merge_gap is not None:
            ranges.MERGE_GAP = args.merge_gap

        if args.data:
            data = Path(args.data)
        elif args.synthetic:
            sys.path.insert(0, str(ROOT / "tools"))
            from bench_data import synthetic_fasta

            fasta, tsv = synthetic_fasta(args.synthetic, tmp)
            data = tmp / "synthetic"
            with contextlib.redirect_stdout(sys.stderr):  # TFDS prints its progress to stdout
                build_dataset([fasta], data, clusters=tsv, val_fraction=0.005)
        else:
            data = tmp / "cath_s20"
            with contextlib.redirect_stdout(sys.stderr):
                build_dataset([ROOT / "data" / "cath_s20.fa.gz"], data, val_fraction=0.02)
        meta = json.loads((data / META_FILE).read_text())
        train = meta["splits"]["train"]
        if "tokens_bytes" not in train:
            raise SystemExit(f"{data} has no token files: rebuild it with `esmjax data build`")
        size = folder_bytes(data)
        time.sleep(1)  # the server's start
        t0 = time.time()
        paths.upload(data, "gs://bench/ds", last=META_FILE)
        upload_s = time.time() - t0

        stream = read_batches("gs://bench/ds", args)
        index_dir = stage.staged_path("gs://bench/ds", "index")
        index_bytes = folder_bytes(index_dir)
        t0 = time.perf_counter()
        open_split("gs://bench/ds", "train")
        reopen_s = time.perf_counter() - t0

        t0 = time.time()
        staged = stage.stage("gs://bench/ds")
        stage_s = time.time() - t0
        staged_read = read_batches(str(staged), args)

        consumed = (args.steps + 1) * args.rows * args.seq_len
        stream["reopen_s (index cached)"] = round(reopen_s, 3)
        stream["index_files_mb"] = round(index_bytes / 1e6, 3)
        if "range_bytes" in stream:  # counted in this process (workers 0)
            downloaded = index_bytes + stream["range_bytes"]
            stream["downloaded_mb"] = round(downloaded / 1e6, 3)
            stream["downloaded_of_dataset"] = round(downloaded / size, 4)
            stream["range_bytes_per_token_consumed"] = round(stream["range_bytes"] / consumed, 3)
        stream["client_cpu_per_request"] = client_cost("gs://bench/ds")
        result = {
            "dataset": str(data),
            "records": train["records"],
            "dataset_mb": round(size / 1e6, 2),
            "train_tokens_file_mb": round(train["tokens_bytes"] / 1e6, 2),
            "host": f"0 of {args.process_count}, {args.rows} rows x {args.seq_len}, "
            f"{args.steps + 1} steps, workers {args.workers}, merge gap {ranges.MERGE_GAP} B",
            "upload_s": round(upload_s, 2),
            "stream": stream,
            "stage": {
                "stage_s": round(stage_s, 2),
                "stage_mb_per_s": round(size / 1e6 / stage_s, 1),
                "downloaded_mb": round(size / 1e6, 2),
                "staged_copy": staged_read,
            },
            "local_read_ms_per_4096_records": read_speed(data),
            "machine": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
        }
        if args.probe_array_record:
            ctx = multiprocessing.get_context("spawn")
            q = ctx.Queue()
            p = ctx.Process(target=_stream_probe, args=("gs://bench/ds", env, q))
            p.start()
            p.join(args.probe_timeout)
            if p.is_alive():
                p.kill()
                probe = f"blocked (no record after {args.probe_timeout:.0f} s)"
            else:
                probe = f"{q.get():.3f} s for 64 records" if not q.empty() else f"exit {p.exitcode}"
            result["array_record_on_gs"] = probe
        print(json.dumps(result, indent=1))
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
