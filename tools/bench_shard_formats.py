"""The shard format of inference jobs, measured: one unit of embeddings written as Parquet (what
``esmjax.inference.shards`` writes), safetensors (arrays concatenated, offsets, ids in the
metadata) and ArrayRecord (one ``.npz`` record per protein), then read back three ways.

    python tools/bench_shard_formats.py --records 1000 --dim 320

Arrays are float32 noise with the lengths of the first ``--records`` CATH S20 records (truncated
to 1,022): per residue [L, D] and mean [D], as ``embed --include per_tok mean`` writes them. Reads:
every mean (a search index's input), one record's per-residue array by id, and every record whole.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def timed(fn, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--records", type=int, default=1000)
    p.add_argument("--dim", type=int, default=320)
    a = p.parse_args()

    from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter
    from safetensors.numpy import load_file, save_file

    from esmjax.inference import shards
    from esmjax.io.fasta import read_fasta

    recs = []
    for r in read_fasta(ROOT / "data" / "cath_s20.fa.gz"):
        recs.append((r.id, min(len(r.sequence), 1022)))
        if len(recs) == a.records:
            break
    rng = np.random.default_rng(0)
    rows = []
    for i, (rid, n) in enumerate(recs):
        rep = rng.standard_normal((n, a.dim), dtype=np.float32)
        rows.append({"id": rid, "index": i, "length": n, "mean_6": rep.mean(0), "repr_6": rep})
    want = rows[len(rows) // 2]["id"]
    d = Path(tempfile.mkdtemp())
    out = {}

    # Parquet
    pq_path = d / "unit.parquet"
    out["parquet"] = {"write_s": timed(lambda: pq_path.write_bytes(shards.shard_bytes(rows, {})))}

    def pq_means():
        return shards.to_numpy(shards.open_table(pq_path, ["mean_6"]).column("mean_6"))

    def pq_one():
        return shards.read_record(pq_path, want)["repr_6"]

    every = timed(lambda: shards.read_records(pq_path))
    out["parquet"].update(
        size=pq_path.stat().st_size, means_s=timed(pq_means), one_s=timed(pq_one), all_s=every
    )

    # safetensors: per-residue arrays concatenated, offsets, ids as JSON metadata
    st_path = d / "unit.safetensors"

    def st_write():
        offsets = np.cumsum([0] + [r["length"] for r in rows]).astype(np.int64)
        tensors = {"repr_6": np.concatenate([r["repr_6"] for r in rows]), "offsets": offsets,
                   "mean_6": np.stack([r["mean_6"] for r in rows])}  # fmt: skip
        save_file(tensors, str(st_path), metadata={"ids": json.dumps([r["id"] for r in rows])})

    out["safetensors"] = {"write_s": timed(st_write)}

    def st_one():
        from safetensors import safe_open

        with safe_open(str(st_path), "np") as f:
            i = json.loads(f.metadata()["ids"]).index(want)
            o = f.get_slice("offsets")[i : i + 2]
            return f.get_slice("repr_6")[int(o[0]) : int(o[1])]

    def st_means():
        from safetensors import safe_open

        with safe_open(str(st_path), "np") as f:
            return f.get_tensor("mean_6")

    every = timed(lambda: load_file(str(st_path)))
    out["safetensors"].update(
        size=st_path.stat().st_size, means_s=timed(st_means), one_s=timed(st_one), all_s=every
    )

    # ArrayRecord: one npz per record
    ar_path = d / "unit.array_record"

    def ar_write():
        w = ArrayRecordWriter(str(ar_path), "group_size:1")
        for r in rows:
            buf = io.BytesIO()
            np.savez(buf, id=r["id"], mean_6=r["mean_6"], repr_6=r["repr_6"])
            w.write(buf.getvalue())
        w.close()

    out["array_record"] = {"write_s": timed(ar_write)}

    def ar_all():
        rd = ArrayRecordReader(str(ar_path))
        got = [np.load(io.BytesIO(b)) for b in rd.read_all()]
        rd.close()
        return got

    def ar_means():  # every record read whole: no columns
        return [z["mean_6"] for z in ar_all()]

    def ar_one():  # no index by id: scan
        return next(z["repr_6"] for z in ar_all() if str(z["id"]) == want)

    out["array_record"].update(size=ar_path.stat().st_size, means_s=timed(ar_means),
                               one_s=timed(ar_one), all_s=timed(ar_all))  # fmt: skip
    raw = sum(r["repr_6"].nbytes + r["mean_6"].nbytes for r in rows)
    print(json.dumps({"raw_array_bytes": raw, "records": len(rows), "dim": a.dim}))
    for fmt, r in out.items():
        print(json.dumps({"format": fmt, **{k: round(v, 4) for k, v in r.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
