"""Latency of ESMFold folding per protein, esmjax (JAX/XLA) against HF ``EsmForProteinFolding``
(PyTorch) at the same configuration, with the same random weights, in one run on one machine.

Both sides fold one protein (batch 1) per call with the same number of trunk passes; esmjax's first
call per length (tracing + XLA compilation, once per length bucket in ``esmjax fold``) is reported
separately and excluded from the steady-state time. Defaults are CPU-sized (a small ESM-2 and a
4-block trunk); ``--preset esmfold_v1`` builds the published shape (ESM-2 3B, 48 blocks: an
accelerator-sized run).

    python tools/bench_fold.py                       # lengths 64, 128, 256, 384
    python tools/bench_fold.py --lengths 384 --repeats 3 --threads 2
    python tools/bench_fold.py --preset esmfold_v1 --lengths 384 --torch-device cuda   # on a GPU

With ``--torch-device cuda`` the PyTorch side runs on the same GPU as JAX (built there, timed with
``torch.cuda.synchronize``); set ``XLA_PYTHON_CLIENT_MEM_FRACTION`` so that both fit.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

AA = "ACDEFGHIKLMNPQRSTVWY"


def hf_config(preset: str, max_recycles: int):
    from transformers import EsmConfig

    from esmjax.models.alphabet import TOKENS

    if preset == "esmfold_v1":
        lm = dict(hidden_size=2560, num_hidden_layers=36, num_attention_heads=40)
        trunk = dict(num_blocks=48, sequence_state_dim=1024, pairwise_state_dim=128)
        sm = {}
    else:  # "cpu": ESM-2 8M shape, 4 trunk blocks of reduced width, the published structure module
        lm = dict(hidden_size=320, num_hidden_layers=6, num_attention_heads=20)
        trunk = dict(num_blocks=4, sequence_state_dim=256, pairwise_state_dim=64)
        sm = {}
    return EsmConfig(
        vocab_size=33,
        mask_token_id=32,
        pad_token_id=1,
        intermediate_size=4 * lm["hidden_size"],
        position_embedding_type="rotary",
        token_dropout=True,
        layer_norm_eps=1e-5,
        emb_layer_norm_before=False,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        is_folding_model=True,
        vocab_list=list(TOKENS),
        esmfold_config=dict(
            fp16_esm=False,
            trunk=dict(trunk, max_recycles=max_recycles, chunk_size=None, structure_module=sm),
        ),
        **lm,
    )


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--lengths", default="64,128,256,384", help="residues per protein, comma separated"
    )
    p.add_argument("--preset", default="cpu", choices=["cpu", "esmfold_v1"])
    p.add_argument("--passes", type=int, default=4, help="trunk passes (fair-esm default: 4)")
    p.add_argument(
        "--repeats", type=int, default=2, help="timed calls per length and side (median reported)"
    )
    p.add_argument(
        "--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)"
    )
    p.add_argument(
        "--torch-device", default="cpu", help="where HF runs: cpu (default) or cuda (same GPU)"
    )
    p.add_argument("--json", default="", help="also write the results here")
    args = p.parse_args()

    import jax
    import jax.numpy as jnp
    import torch
    from flax import nnx
    from transformers import EsmForProteinFolding

    from esmjax.io.convert_esmfold import config_from_hf, params_from_hf
    from esmjax.models.esmfold.model import abstract_model as esmfold_abstract_model
    from esmjax.models.geometry import residue_constants as rc

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = torch.device(args.torch_device)
    with dev:  # built where it runs: the 3B model initialises in seconds on a GPU
        ref = EsmForProteinFolding(hf_config(args.preset, args.passes)).eval()
    sd = {k: v.detach().cpu().numpy() for k, v in ref.state_dict().items()}
    cfg = config_from_hf(ref.config.to_dict())
    params = params_from_hf(sd, cfg)
    graphdef, state = esmfold_abstract_model(cfg)
    nnx.replace_by_pure_dict(state, params)
    fold = jax.jit(lambda st, a, m, r: nnx.merge(graphdef, st)(a, m, r)["positions"][-1])
    n_params = sum(v.numel() for k, v in ref.state_dict().items() if not k.startswith("esm."))

    rng = np.random.default_rng(0)
    rows = []
    print(
        f"# preset={args.preset} folding params={n_params / 1e6:.1f}M passes={args.passes} "
        f"jax={jax.__version__} ({jax.devices()[0].platform}) torch={torch.__version__} "
        f"threads={torch.get_num_threads()} torch_device={dev}",
        flush=True,
    )
    print(
        f"{'L':>5} {'esmjax s':>9} {'HF s':>9} {'HF/esmjax':>9} {'compile s':>9} "
        f"{'max |dCA| A':>11}",
        flush=True,
    )
    for length in [int(x) for x in args.lengths.split(",")]:
        seq = "".join(rng.choice(list(AA), length))
        aa = np.array([[rc.RESTYPE_ORDER[c] for c in seq]], np.int32)
        mask, residx = np.ones_like(aa, np.float32), np.arange(length, dtype=np.int32)[None]
        a, m, r = jnp.asarray(aa), jnp.asarray(mask), jnp.asarray(residx)
        t0 = time.perf_counter()
        ours = np.asarray(jax.block_until_ready(fold(state, a, m, r)))
        first = time.perf_counter() - t0
        jax_times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(fold(state, a, m, r))
            jax_times.append(time.perf_counter() - t0)
        hf_times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            with torch.no_grad():
                out = ref(
                    torch.from_numpy(aa.astype(np.int64)).to(dev),
                    attention_mask=torch.from_numpy(mask).long().to(dev),
                )
                hf_ca = out["positions"][-1, 0, :, 1].cpu().numpy()  # waits for the device
            hf_times.append(time.perf_counter() - t0)
        dca = float(np.abs(ours[0, :, 1] - hf_ca).max())
        tj, th = float(np.median(jax_times)), float(np.median(hf_times))
        rows.append(
            dict(
                length=length, esmjax_s=tj, hf_s=th, ratio=th / tj, first_call_s=first, max_dca=dca
            )
        )
        print(
            f"{length:>5} {tj:>9.3f} {th:>9.3f} {th / tj:>9.2f} {first - tj:>9.1f} {dca:>11.2e}",
            flush=True,
        )
    if args.json:
        meta = dict(
            machine=platform.platform(),
            processor=platform.processor(),
            jax=jax.__version__,
            torch=torch.__version__,
            preset=args.preset,
            passes=args.passes,
            device=jax.devices()[0].device_kind,
            torch_device=str(dev),
        )
        Path(args.json).write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
