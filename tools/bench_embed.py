"""Inference throughput (tokens/s) of esmjax vs the PyTorch anchor (HF ``EsmForMaskedLM``) at equal
configuration.

    python tools/bench_embed.py --preset esm2_t12_35M_UR50D --rows 8 --seq-len 256

Same random-weight model shape and token batch on both sides; esmjax's forward is jitted (logits),
torch runs under ``torch.no_grad()`` (eager, its default attention). Prints tokens/s and the
esmjax/PyTorch ratio.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--preset", default="esm2_t12_35M_UR50D")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--json")
    a = ap.parse_args()
    from flax import nnx

    from esmjax.config import esm2_preset
    from esmjax.models.esm2 import ESM2

    cfg = dataclasses.replace(esm2_preset(a.preset), dtype=a.dtype)
    rng = np.random.default_rng(0)
    toks = rng.integers(4, 24, (a.rows, a.seq_len)).astype(np.int32)
    toks[:, 0], toks[:, -1] = 0, 2
    graphdef, state = nnx.split(ESM2(cfg, rngs=nnx.Rngs(0)))
    fwd = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t)["logits"])
    x = jax.device_put(toks)
    fwd(state, x).block_until_ready()
    t = time.perf_counter()
    for _ in range(a.iters):
        out = fwd(state, x)
    out.block_until_ready()
    t_jax = (time.perf_counter() - t) / a.iters
    tokens = a.rows * a.seq_len
    res = {
        "preset": a.preset,
        "rows": a.rows,
        "seq_len": a.seq_len,
        "dtype": a.dtype,
        "jax": jax.__version__,
        "device_kind": jax.devices()[0].device_kind,
        "machine": platform.processor() or platform.machine(),
        "esmjax_s": t_jax,
        "esmjax_tokens_per_s": tokens / t_jax,
    }
    if not a.no_torch:
        import torch
        from bench_train import hf_masked_lm

        model = hf_masked_lm(cfg).eval()
        ids = torch.from_numpy(toks).long()
        with torch.no_grad():
            model(input_ids=ids)
            t = time.perf_counter()
            for _ in range(a.iters):
                model(input_ids=ids)
            t_torch = (time.perf_counter() - t) / a.iters
        res.update(
            torch=torch.__version__,
            torch_s=t_torch,
            torch_tokens_per_s=tokens / t_torch,
            ratio_esmjax_over_torch=t_torch / t_jax,
        )
    for k, v in res.items():
        print(f"{k:28s} {v:.4g}" if isinstance(v, float) else f"{k:28s} {v}")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
