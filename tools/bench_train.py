"""Training throughput of esmjax vs the PyTorch anchor (HF ``EsmForMaskedLM`` + AdamW) at equal
configuration.

    python tools/bench_train.py --preset esm2_t12_35M_UR50D --rows 8 --seq-len 256 --steps 3

Both sides train on the same masked batch (fp32 unless --dtype bfloat16 for esmjax) and are timed
over steady-state steps after warm-up, in --rounds alternating rounds (esmjax, then PyTorch), so
that both see the same machine state; the medians are reported. esmjax runs on all local devices
(FSDP mesh); torch uses its default intra-op threads. Prints tokens/s (per device for esmjax),
TFLOP/s, MFU and the esmjax/PyTorch ratio; --json writes the figures.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402


def make_batch(rows: int, seq_len: int, seed: int = 0) -> dict[str, np.ndarray]:
    from esmjax.data.masking import mask_tokens

    rng = np.random.default_rng(seed)
    toks = rng.integers(4, 24, (rows, seq_len)).astype(np.int32)
    toks[:, 0], toks[:, -1] = 0, 2
    b = mask_tokens(toks, rng)
    b["segment_ids"] = np.ones_like(toks)
    b["positions"] = np.broadcast_to(np.arange(seq_len, dtype=np.int32), toks.shape).copy()
    return b


def jax_runner(cfg_model, batch):
    """``run(steps) -> seconds per train step`` for esmjax (compiled and warmed up here)."""
    from esmjax.config import MeshConfig, OptimConfig
    from esmjax.models.esm2 import abstract_model
    from esmjax.parallel import sharding as shd
    from esmjax.train.optim import learning_rate, make_optimizer
    from esmjax.train.state import create_state, model_graphdef, state_shardings
    from esmjax.train.step import make_train_step

    mesh = shd.make_mesh(MeshConfig(ici_fsdp=-1))
    rules = shd.resolve_rules("fsdp")
    opt = OptimConfig(warmup_steps=1)
    tx = make_optimizer(opt, 1000, abstract_model(cfg_model)[1].to_pure_dict())
    shardings = state_shardings(cfg_model, tx, mesh, rules)
    bs = jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(None, *shd.batch_sharding(mesh, rules, 2).spec)
    )
    with shd.use_mesh(mesh, rules):
        box = [create_state(cfg_model, tx, shardings, 0)]
        step = jax.jit(
            make_train_step(model_graphdef(cfg_model), tx, learning_rate(opt, 1000)),
            in_shardings=(shardings, bs),
            out_shardings=(shardings, None),
            donate_argnums=0,
        )
        b = jax.device_put({k: v[None] for k, v in batch.items()}, bs)

    def run(steps: int) -> float:
        with shd.use_mesh(mesh, rules):
            t = time.perf_counter()
            for _ in range(steps):
                box[0], m = step(box[0], b)
            jax.block_until_ready(m)
        return (time.perf_counter() - t) / steps

    run(2)  # compile and warm up
    return run


def bench_jax(cfg_model, batch, steps: int) -> float:
    """Seconds per train step."""
    return jax_runner(cfg_model, batch)(steps)


def hf_masked_lm(cfg_model):
    """The PyTorch anchor: HF ``EsmForMaskedLM`` of the same shape (random weights, no dropout)."""
    from transformers import EsmConfig, EsmForMaskedLM

    from esmjax.models.alphabet import TOKENS

    hf = EsmConfig(
        vocab_size=33,
        mask_token_id=32,
        pad_token_id=1,
        hidden_size=cfg_model.embed_dim,
        num_hidden_layers=cfg_model.num_layers,
        num_attention_heads=cfg_model.num_heads,
        intermediate_size=cfg_model.mlp_dim,
        position_embedding_type="rotary",
        token_dropout=True,
        layer_norm_eps=1e-5,
        emb_layer_norm_before=False,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        vocab_list=list(TOKENS),
    )
    return EsmForMaskedLM(hf)


def torch_runner(cfg_model, batch):
    """``run(steps) -> seconds per train step`` for the PyTorch anchor (warmed up here)."""
    import torch

    model = hf_masked_lm(cfg_model).train()
    opt = torch.optim.AdamW(
        model.parameters(), lr=4e-4, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.01
    )
    ids = torch.from_numpy(batch["tokens"]).long()
    labels = torch.from_numpy(np.where(batch["loss_mask"], batch["targets"], -100)).long()

    def one():
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    def run(steps: int) -> float:
        t = time.perf_counter()
        for _ in range(steps):
            one()
        return (time.perf_counter() - t) / steps

    run(2)  # warm up
    return run


def bench_torch(cfg_model, batch, steps: int) -> float:
    return torch_runner(cfg_model, batch)(steps)


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--preset", default="esm2_t12_35M_UR50D")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per round and side")
    ap.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="rounds of esmjax then PyTorch steps, alternating (medians reported): the two sides "
        "see the same machine state, which on a shared VM drifts by 20%% within minutes",
    )
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--remat", default="none")
    ap.add_argument(
        "--attention", default="auto", help="model.attention: auto|xla|splash|cudnn|pallas_gpu"
    )
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch anchor")
    ap.add_argument("--json", help="write the figures here")
    a = ap.parse_args()
    import dataclasses

    from esmjax.config import esm2_preset
    from esmjax.train import metrics as tm

    cfg = dataclasses.replace(
        esm2_preset(a.preset), dtype=a.dtype, remat=a.remat, attention=a.attention
    )
    batch = make_batch(a.rows, a.seq_len)
    tokens = a.rows * a.seq_len
    n_dev = jax.device_count()
    run_jax = jax_runner(cfg, batch)
    run_torch = None if a.no_torch else torch_runner(cfg, batch)
    rounds_jax, rounds_torch = [], []
    for _ in range(a.rounds):
        rounds_jax.append(run_jax(a.steps))
        if run_torch:
            rounds_torch.append(run_torch(a.steps))
    t_jax = float(np.median(rounds_jax))
    flops = tm.train_flops_per_token(cfg, a.seq_len) * tokens
    peak = tm.device_peak_flops()
    res = {
        "preset": a.preset,
        "rows": a.rows,
        "seq_len": a.seq_len,
        "dtype": a.dtype,
        "remat": a.remat,
        "attention": a.attention,
        "devices": n_dev,
        "device_kind": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "machine": platform.processor() or platform.machine(),
        "rounds": a.rounds,
        "esmjax_step_s": t_jax,
        "esmjax_step_s_rounds": rounds_jax,
        "esmjax_tokens_per_s": tokens / t_jax,
        "esmjax_tokens_per_s_per_device": tokens / t_jax / n_dev,
        "esmjax_tflops_per_device": flops / t_jax / n_dev / 1e12,
        "esmjax_mfu": flops / t_jax / n_dev / peak if peak else None,
    }
    if run_torch:
        import torch

        t_torch = float(np.median(rounds_torch))
        res.update(
            torch=torch.__version__,
            torch_threads=torch.get_num_threads(),
            torch_step_s=t_torch,
            torch_step_s_rounds=rounds_torch,
            torch_tokens_per_s=tokens / t_torch,
            ratio_esmjax_over_torch=t_torch / t_jax,
        )
    for k, v in res.items():
        if isinstance(v, list):
            v = " ".join(f"{x:.4g}" for x in v)
        print(f"{k:32s} {v:.4g}" if isinstance(v, float) else f"{k:32s} {v}")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
