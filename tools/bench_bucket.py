"""Bucket datasets: staging time against a local GCS API server, and what streaming would do.

    python tools/bench_bucket.py --data DIR        # a folder made by `esmjax data build`

Starts ``gcp-storage-emulator`` on 127.0.0.1, uploads DIR into it, then times
(1) ``esmjax.io.paths.stage`` (what every host does once when ``data.train`` is a bucket URL),
(2) the first training batches from the staged copy (``train_batches``), and
(3) TFDS's ArrayRecord source opened straight on the ``gs://`` folder (streaming), with a time-out:
array_record 0.8.6 opens paths through its own file layer and blocks on ``gs://``.
Prints one JSON object. The emulator runs on the same host, so staging speed is bounded by this
machine (and the emulator's single Python thread), not by a network: a lower bound on GCS's speed.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _stream_probe(url: str, env: dict, q) -> None:
    os.environ.update(env)
    import tensorflow_datasets as tfds

    b = tfds.builder_from_directory(f"{url}/esmjax_protein_clusters/1.0.0")
    src = b.as_data_source(split="train")
    t0 = time.time()
    src.data_source.__getitems__(list(range(64)))
    q.put(time.time() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--stream-timeout", type=float, default=60.0)
    args = ap.parse_args()

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    server = subprocess.Popen(
        [sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1"]
        + ["--port", str(port), "--in-memory", "--default-bucket", "bench"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url}
    os.environ.update(env)
    os.environ["ESMJAX_STAGE_DIR"] = tempfile.mkdtemp(prefix="bench-stage-")
    try:
        time.sleep(3)
        from esmjax.config import DataConfig
        from esmjax.data.pipeline import train_batches
        from esmjax.io import paths

        data = Path(args.data)
        size = sum(f.stat().st_size for f in data.rglob("*") if f.is_file())
        t0 = time.time()
        paths.upload(data, "gs://bench/ds", last="esmjax_dataset.json")
        upload_s = time.time() - t0
        t0 = time.time()
        local = paths.stage("gs://bench/ds")
        stage_s = time.time() - t0
        t0 = time.time()
        paths.stage("gs://bench/ds")
        restage_s = time.time() - t0

        cfg = DataConfig(train="gs://bench/ds", seq_len=512, tokens_per_step=64 * 512)
        it = train_batches(cfg, rows=64, process_index=0, process_count=1)
        t0 = time.time()
        next(it)
        first_s = time.time() - t0
        t0 = time.time()
        for _ in range(10):
            next(it)
        tok_s = 10 * 64 * 512 / (time.time() - t0)

        ctx = multiprocessing.get_context("spawn")
        q = ctx.Queue()
        p = ctx.Process(target=_stream_probe, args=("gs://bench/ds", env, q))
        p.start()
        p.join(args.stream_timeout)
        if p.is_alive():
            p.kill()
            stream = f"blocked (no record after {args.stream_timeout:.0f} s)"
        else:
            stream = f"{q.get():.3f} s for 64 records" if not q.empty() else f"exit {p.exitcode}"
        print(
            json.dumps(
                {
                    "dataset_mb": round(size / 1e6, 2),
                    "upload_s": round(upload_s, 2),
                    "stage_s": round(stage_s, 2),
                    "stage_mb_per_s": round(size / 1e6 / stage_s, 1),
                    "restage_s (reuse check)": round(restage_s, 3),
                    "staged_first_batch_s": round(first_s, 2),
                    "staged_tokens_per_s": round(tok_s),
                    "stream_gs_direct": stream,
                    "staged_to": str(local),
                    "machine": platform.processor() or platform.machine(),
                },
                indent=1,
            )
        )
    finally:
        server.terminate()


if __name__ == "__main__":
    main()
