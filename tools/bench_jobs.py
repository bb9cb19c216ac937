"""Throughput of inference jobs (``esmjax embed`` / ``fold`` as jobs of work units) on 1 and 2
processes with the same total CPU: 1 process pinned to one core against 2 processes pinned to one
core each (1 JAX device per process), on the bundled CATH S20 sample. The PyTorch anchor is HF
``EsmModel`` at the same shape on the same records (one core, one thread, the same length-sorted
batches of at most ``--max-tokens`` tokens, mean representations).

    python tools/bench_jobs.py --records 2000 --fold-records 32

Figures per job: wall time of the whole command (start-up, compilations, reading and writing
included) and records/s over it; records/s while computing (the units' own seconds, from their
markers; the slowest process for 2); padding = 1 - tokens / padded batch slots. Each job runs
twice: with an empty compilation cache (cold: every program compiled, by each process), then with
the one it filled (warm).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ESMJAX = [sys.executable, "-m", "esmjax.cli"]


def cath(out: Path, n: int, max_len: int | None = None) -> Path:
    from esmjax.io.fasta import read_fasta

    recs = []
    for r in read_fasta(ROOT / "data" / "cath_s20.fa.gz"):
        if max_len is None or len(r.sequence) <= max_len:
            recs.append(r)
        if len(recs) == n:
            break
    out.write_text("".join(f">{r.id}\n{r.sequence}\n" for r in recs))
    return out


def esm2_checkpoint(work: Path, preset: str) -> Path:
    from flax import nnx

    from esmjax.config import ESM2_PRESETS
    from esmjax.io import checkpoint
    from esmjax.models.esm2 import ESM2

    path = work / f"ckpt_{preset}"
    if not path.exists():
        model = ESM2(ESM2_PRESETS[preset], rngs=nnx.Rngs(0))
        checkpoint.save_converted(path, model.cfg, checkpoint.params_numpy(model))
    return path


def esmfold_checkpoint(work: Path) -> Path:
    """The ``cpu`` preset of tools/bench_fold.py (ESM-2 8M stem, 4 trunk blocks), converted."""
    import torch
    from bench_fold import hf_config
    from transformers import EsmForProteinFolding

    path = work / "ckpt_esmfold_cpu"
    if not path.exists():
        torch.manual_seed(0)
        EsmForProteinFolding(hf_config("cpu", 1)).eval().save_pretrained(work / "hf_esmfold")
        subprocess.run([*ESMJAX, "convert", str(work / "hf_esmfold"), str(path)], check=True)
    return path


def run(args: list[str], out: Path, processes: int, cache: Path) -> dict:
    """The job on ``processes`` processes, each pinned to its own core, with the compilation cache
    ``cache``; its figures."""
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="1", ESMJAX_LOG="WARNING")
    env["JAX_COMPILATION_CACHE_DIR"] = str(cache)
    env.pop("XLA_FLAGS", None)
    job = " ".join([*ESMJAX, *args, "--out", str(out), "--no-progress"])
    if processes == 1:
        cmd = ["taskset", "-c", "0", "bash", "-c", job]
    else:
        cmd = [str(ROOT / "launch/local.sh"), str(processes), "1", "bash", "-c",
               f'exec taskset -c "$ESMJAX_PROCESS_ID" {job}']  # fmt: skip
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    markers = [json.loads(p.read_text()) for p in sorted((out / "done").glob("*.json"))]
    records = sum(m["records"] for m in markers)
    busy = {}
    for m in markers:
        busy[m["process"][0]] = busy.get(m["process"][0], 0.0) + m["seconds"]
    tokens = sum(m["tokens"] for m in markers)
    padded = sum(m["padded_tokens"] for m in markers)
    return {
        "processes": processes,
        "records": records,
        "wall_s": round(wall, 1),
        "records_per_s_wall": round(records / wall, 2),
        "records_per_s_computing": round(records / max(busy.values()), 2),
        "tokens_per_s_computing": round(tokens / max(busy.values()), 1),
        "padding": round(1 - tokens / padded, 3),
    }


def cold_and_warm(name: str, args: list[str], out: Path, processes: int) -> list[dict]:
    """The job with an empty compilation cache (every program compiled: a first job), then again
    with the cache it filled (a resumed job, or the next input of the same shapes)."""
    cache = out.with_name(out.name + "_cache")
    shutil.rmtree(cache, ignore_errors=True)
    rows = []
    for when in ("cold", "warm"):
        r = {"job": name, "cache": when, **run(args, out, processes, cache)}
        print(json.dumps(r), flush=True)
        rows.append(r)
    return rows


CALIBRATE = """
import os, sys, time
os.environ["OMP_NUM_THREADS"] = "1"
import numpy as np
os.sched_setaffinity(0, {int(sys.argv[1])})
if sys.argv[3] == "matmul":  # in cache: compute
    a = np.random.default_rng(0).standard_normal((512, 512), dtype=np.float32)
    work, per = (lambda: a @ a), 2 * 512**3
else:  # a 256 MB sum: memory bandwidth
    a = np.ones(64 << 20, np.float32)
    work, per = a.sum, a.nbytes
t0, n = time.perf_counter(), 0
while time.perf_counter() - t0 < float(sys.argv[2]):
    work()
    n += 1
print(n * per / (time.perf_counter() - t0) / 1e9)
"""


def calibrate(seconds: float = 8.0) -> list[dict]:
    """The machine's own ceiling for 2 processes on 2 cores: single-threaded float32 matrix
    products in cache (GFLOP/s) and sums over 256 MB (GB/s), on core 0 alone, then on cores 0 and
    1 at once (summed). Memory bandwidth shared by the cores caps what any job gains."""
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")

    def start(core: int, kind: str) -> subprocess.Popen:
        cmd = [sys.executable, "-c", CALIBRATE, str(core), str(seconds), kind]
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)

    rows = []
    for kind in ("matmul", "memory"):
        alone = float(start(0, kind).communicate()[0])
        pair = [start(0, kind), start(1, kind)]
        both = sum(float(p.communicate()[0]) for p in pair)
        rows.append({"job": f"calibration: {kind}", "one_core": round(alone, 1),
                     "two_cores": round(both, 1), "ratio": round(both / alone, 2)})  # fmt: skip
    return rows


def torch_anchor(fasta: Path, preset: str, max_tokens: int, truncation: int) -> dict:
    """HF ``EsmModel`` mean representations on one core, one thread."""
    os.sched_setaffinity(0, {0})
    import torch
    from transformers import EsmConfig, EsmModel

    from esmjax.config import ESM2_PRESETS
    from esmjax.io.fasta import read_fasta
    from esmjax.models.alphabet import PAD, TOKENS, batch_encode

    torch.set_num_threads(1)
    c = ESM2_PRESETS[preset]
    cfg = EsmConfig(
        vocab_size=33, mask_token_id=32, pad_token_id=PAD, hidden_size=c.embed_dim,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
        intermediate_size=4 * c.embed_dim, position_embedding_type="rotary", token_dropout=True,
        emb_layer_norm_before=False, vocab_list=list(TOKENS), max_position_embeddings=1026,
    )  # fmt: skip
    torch.manual_seed(0)
    model = EsmModel(cfg, add_pooling_layer=False).eval()
    seqs = sorted((r.sequence for r in read_fasta(fasta)), key=len)
    tokens = 0

    def forward(chunk: list[str]) -> int:
        toks = torch.from_numpy(batch_encode(chunk, truncation).astype("int64"))
        model(toks, attention_mask=toks != PAD).last_hidden_state.mean(1)
        return int((toks != PAD).sum())

    t0, batch = time.perf_counter(), []
    with torch.no_grad():  # length-sorted batches padded to their longest, at most max_tokens
        for s in seqs:
            if batch and (len(batch) + 1) * (min(len(s), truncation) + 2) > max_tokens:
                tokens += forward(batch)
                batch = []
            batch.append(s)
        tokens += forward(batch)
    seconds = time.perf_counter() - t0
    return {"records_per_s": round(len(seqs) / seconds, 2), "tokens_per_s": round(tokens / seconds)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--records", type=int, default=2000, help="CATH records to embed")
    p.add_argument("--fold-records", type=int, default=32, help="CATH records (<= 128) to fold")
    p.add_argument("--work", default="runs/bench_jobs")
    p.add_argument("--only", choices=["embed", "fold", "calibrate"], default=None)
    p.add_argument("--json", default="")
    a = p.parse_args()
    work = (ROOT / a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    results = calibrate()
    for r in results:
        print(json.dumps(r), flush=True)
    if a.only in (None, "embed"):
        fasta = cath(work / "embed.fa", a.records)
        for preset in ("demo", "esm2_t6_8M_UR50D"):
            ckpt = esm2_checkpoint(work, preset)
            args = ["embed", "--checkpoint", str(ckpt), "--fasta", str(fasta), "--unit-size", "250"]
            for procs in (1, 2):
                out = work / f"embed_{preset}_{procs}"
                results += cold_and_warm(f"embed {preset}", args, out, procs)
        anchor = torch_anchor(fasta, "esm2_t6_8M_UR50D", 4096, 1022)
        results.append({"job": "embed esm2_t6_8M_UR50D, HF EsmModel (torch, 1 core)", **anchor})
        print(json.dumps(results[-1]), flush=True)
    if a.only in (None, "fold"):
        fasta = cath(work / "fold.fa", a.fold_records, max_len=128)
        ckpt = esmfold_checkpoint(work)
        args = ["fold", "--checkpoint", str(ckpt), "--fasta", str(fasta), "--format", "shards"]
        args += ["--unit-size", "4", "--num-recycles", "0"]
        for procs in (1, 2):
            results += cold_and_warm("fold cpu preset", args, work / f"fold_{procs}", procs)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
