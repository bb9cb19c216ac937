"""The one-shot device check: every figure an accelerator day needs, in one JSON.

    bash tools/device_check.sh                      # on the GPU (or TPU) machine, ~10 minutes
    bash tools/device_check.sh --dry-run            # the same steps on a CPU at tiny shapes
    bash tools/device_check.sh --only kernels       # one step (kernels, train_650m, train_3b, fold)

Steps (each one timed, and recorded as ok / failed / timed out without stopping the others):

- ``kernels``: the packed attention kernels the backend has (GPU: ``pallas_gpu``, ``cudnn``,
  ``xla``; TPU: ``splash``, ``xla``; a dry run: ``splash`` and ``pallas_gpu`` in interpret mode)
  against the float32 reference (``attention.xla.dot_product_attention``) on the same bf16
  inputs, forward and gradient, on packed rows with 1 to 8 segments, padding and a fully padded
  row, plus a packed row against its sequences run alone; bf16 tolerances; fwd+bwd milliseconds.
- ``train_650m``: ``tools/bench_train.py`` at the 650M shape in bf16 (tokens/s, TFLOP/s, MFU).
- ``train_3b``: ``tools/bench_train.py`` at the 3B shape in bf16 with ``remat=full`` on one device.
- ``fold``: ``tools/bench_fold.py --preset esmfold_v1`` at 384 residues, HF
  ``EsmForProteinFolding`` on the same GPU (``--torch-device cuda``).

The benchmarks run as subprocesses of the existing tools (their ``--json``), each under a timeout
cut to what is left of ``--budget-s``. The JSON: ``meta`` (date, host, CPU model, device kind,
versions, command), then ``steps.<name>`` = ``{status, seconds, command, result | error}``. The
exit status is 0 only when every step passed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# This process only runs the small kernel step while the benchmarks run in children: it must not
# hold JAX's default 75% of the GPU memory (set in main, before JAX starts; the children get the
# caller's own setting back).
_PARENT_ENV = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
_CHILD_ENV = {k: os.environ[k] for k in _PARENT_ENV if k in os.environ}

# bf16 inputs against a float32 reference on the same (rounded) inputs: relative to the largest
# reference value. bf16 keeps 8 significant bits (eps 7.8e-3); the kernels also round the softmax
# probabilities to bf16 before the PV product.
BF16_TOL = {"out": 2e-2, "grad": 5e-2}


def packed_segments(counts, length: int, seed: int = 0) -> np.ndarray:
    """[len(counts), length] segment ids: row i holds counts[i] segments of random lengths, then
    padding (a row with 0 segments is fully padded)."""
    rng = np.random.default_rng(seed)
    seg = np.zeros((len(counts), length), np.int32)
    for i, n in enumerate(counts):
        if n == 0:
            continue
        cuts = np.sort(rng.choice(np.arange(1, length - 4), n, replace=False))
        off = 0
        for s, m in enumerate(np.diff(np.r_[0, cuts])):
            seg[i, off : off + m] = s + 1
            off += m
    return seg


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def check_kernels(dry_run: bool) -> dict:
    """Each available kernel against the reference (forward, gradient, packed == alone)."""
    import jax
    import jax.numpy as jnp

    from esmjax.models import attention
    from esmjax.models.attention import xla

    backend = jax.default_backend()
    if dry_run or backend == "cpu":
        kernels, (b_len, h, d), interpret = ["splash", "pallas_gpu"], (64, 2, 16), True
    elif backend == "gpu":
        kernels, (b_len, h, d), interpret = ["pallas_gpu", "cudnn", "xla"], (1024, 20, 64), False
    else:
        kernels, (b_len, h, d), interpret = ["splash", "xla"], (1024, 20, 64), False
    seg = jnp.asarray(packed_segments((1, 3, 8, 0), b_len, seed=0))
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v, g = (jax.random.normal(kk, (seg.shape[0], b_len, h, d), jnp.float32) for kk in keys)
    q = q / np.sqrt(d)
    q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
    g = g * (seg > 0)[..., None, None]  # the model's losses ignore padding queries
    mask = xla.attention_mask(seg)

    def reference(q, k, v):
        f32 = (x.astype(jnp.float32) for x in (q, k, v))
        return xla.dot_product_attention(*f32, mask, return_weights=False)[0]

    def run(name):
        path = attention.AttentionPath(name, interpret, "device check")
        return lambda q, k, v: attention.attend(path, q, k, v, mask, seg)[0]

    def fwd_bwd(fn):
        def loss(q, k, v):
            return jnp.vdot(fn(q, k, v).astype(jnp.float32), g)

        return jax.jit(lambda q, k, v: (fn(q, k, v), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)))

    real = np.asarray(seg) > 0
    want_out, want_grads = fwd_bwd(reference)(q, k, v)
    results = {"shape": dict(B=int(seg.shape[0]), L=b_len, H=h, D=d), "tolerance": BF16_TOL}
    for name in kernels:
        try:
            step = fwd_bwd(run(name))
            out, grads = jax.block_until_ready(step(q, k, v))
            reps = 1 if interpret else 10
            t0 = time.perf_counter()
            for _ in range(reps):
                jax.block_until_ready(step(q, k, v))
            ms = (time.perf_counter() - t0) / reps * 1e3
            errs = {"out": rel_err(np.asarray(out, np.float32)[real], np.asarray(want_out)[real])}
            for x, a, b in zip("qkv", grads, want_grads):
                errs[f"d{x}"] = rel_err(np.asarray(a, np.float32), np.asarray(b))
            # Row 1 (3 segments) against its second segment alone, moved to the start of a row.
            idx = np.flatnonzero(np.asarray(seg)[1] == 2)
            alone_seg = np.zeros((1, b_len), np.int32)
            alone_seg[0, : len(idx)] = 1
            alone_seg = jnp.asarray(alone_seg)

            def lift(x, idx=idx):
                return jnp.zeros_like(x[:1]).at[0, : len(idx)].set(x[1, idx])

            path = attention.AttentionPath(name, interpret, "device check")
            lifted = (lift(q), lift(k), lift(v))
            alone = attention.attend(path, *lifted, xla.attention_mask(alone_seg), alone_seg)[0]
            errs["packed_vs_alone"] = rel_err(
                np.asarray(out, np.float32)[1, idx], np.asarray(alone, np.float32)[0, : len(idx)]
            )
            ok = all(
                e < (BF16_TOL["out"] if n in ("out", "packed_vs_alone") else BF16_TOL["grad"])
                for n, e in errs.items()
            )
            results[name] = dict(ok=ok, interpret=interpret, fwd_bwd_ms=ms, rel_err=errs)
        except Exception as e:  # noqa: BLE001 (a kernel that fails is a figure, not a stop)
            results[name] = dict(ok=False, error=f"{type(e).__name__}: {e}"[:2000])
    results["ok"] = all(results[n]["ok"] for n in kernels)
    return results


def bench_commands(dry_run: bool, out_dir: Path) -> dict[str, tuple[list[str], dict, int]]:
    """name -> (argv, extra environment, timeout in seconds) of the benchmark subprocesses."""
    py, tools = sys.executable, ROOT / "tools"
    if dry_run:
        train = ["--preset", "tiny", "--rows", "2", "--seq-len", "64", "--steps", "1"]
        train3 = [*train, "--remat", "full"]
        fold = ["--preset", "cpu", "--lengths", "16", "--passes", "1", "--repeats", "1"]
        fold += ["--torch-device", "cpu"]
    else:
        train = ["--preset", "esm2_t33_650M_UR50D", "--rows", "16", "--seq-len", "1024"]
        train += ["--steps", "5"]
        train3 = ["--preset", "esm2_t36_3B_UR50D", "--rows", "8", "--seq-len", "1024"]
        train3 += ["--steps", "3", "--remat", "full"]
        fold = ["--preset", "esmfold_v1", "--lengths", "384", "--passes", "4", "--repeats", "2"]
        fold += ["--torch-device", "cuda"]
    common = ["--dtype", "bfloat16", "--no-torch", "--rounds", "1"]
    return {
        "train_650m": (
            [py, str(tools / "bench_train.py"), *train, *common, "--json"],
            {},
            240,
        ),
        "train_3b": ([py, str(tools / "bench_train.py"), *train3, *common, "--json"], {}, 240),
        # JAX and PyTorch share the GPU: JAX takes half, not its default 75%.
        "fold": (
            [py, str(tools / "bench_fold.py"), *fold, "--json"],
            {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.5"},
            300,
        ),
    }


def run_bench(argv: list[str], env: dict, timeout: float, json_path: Path) -> dict:
    proc = subprocess.run(
        [*argv, str(json_path)],
        env={**{k: v for k, v in os.environ.items() if k not in _PARENT_ENV}, **_CHILD_ENV, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"exit {proc.returncode}: {(proc.stdout + proc.stderr)[-3000:]}")
    return json.loads(json_path.read_text())


def meta(args) -> dict:
    import jax

    cpu = ""
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        cpu = next(
            (ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if "Model name" in ln), ""
        )
        avx512 = "avx512f" in lscpu
    except OSError:
        avx512 = None
    dev = jax.devices()[0]
    out = dict(
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        host=platform.node(),
        cpu=cpu,
        avx512=avx512,
        backend=jax.default_backend(),
        device_kind=dev.device_kind,
        device_count=jax.device_count(),
        python=platform.python_version(),
        jax=jax.__version__,
        dry_run=args.dry_run,
        command=" ".join(shlex.quote(a) for a in sys.argv),
    )
    for mod in ("jaxlib", "flax", "optax", "orbax.checkpoint", "torch", "transformers", "triton"):
        try:
            out[mod] = __import__(mod, fromlist=["_"]).__version__
        except Exception:  # noqa: BLE001
            out[mod] = None
    return out


STEPS = ("kernels", "train_650m", "train_3b", "fold")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes, any backend (a CPU)")
    ap.add_argument("--only", action="append", choices=STEPS, help="run only this step (repeat)")
    ap.add_argument("--out", default="device_check.json", help="the JSON written")
    ap.add_argument("--budget-s", type=float, default=570, help="stop starting steps after this")
    args = ap.parse_args(argv)
    os.environ.update(_PARENT_ENV)

    t_start = time.perf_counter()
    report = {"meta": meta(args), "steps": {}}
    out = Path(args.out)
    tmp = Path(tempfile.mkdtemp(prefix="device_check_"))
    benches = bench_commands(args.dry_run, tmp)
    for name in args.only or STEPS:
        left = args.budget_s - (time.perf_counter() - t_start)
        t0 = time.perf_counter()
        entry: dict = {}
        if left < 10:
            entry = dict(status="skipped", error="out of --budget-s")
        else:
            try:
                if name == "kernels":
                    entry["command"] = "in-process (check_kernels)"
                    entry["result"] = check_kernels(args.dry_run)
                    entry["status"] = "ok" if entry["result"]["ok"] else "failed"
                else:
                    cmd, env, timeout = benches[name]
                    entry["command"] = " ".join(shlex.quote(c) for c in cmd) + f" {name}.json"
                    entry["result"] = run_bench(cmd, env, min(timeout, left), tmp / f"{name}.json")
                    entry["status"] = "ok"
            except subprocess.TimeoutExpired:
                entry.update(status="timeout", error=f"over {min(benches[name][2], left):.0f} s")
            except Exception as e:  # noqa: BLE001 (record it; the next step still runs)
                entry.update(status="failed", error=f"{type(e).__name__}: {e}"[-3000:])
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        report["steps"][name] = entry
        print(f"{name:12s} {entry['status']:8s} {entry['seconds']:7.1f} s", flush=True)
        out.write_text(json.dumps(report, indent=2))  # partial results survive a kill
    report["total_s"] = round(time.perf_counter() - t_start, 1)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return 0 if all(s["status"] == "ok" for s in report["steps"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
