"""Continued pretraining (``esmjax train --init-from``): a run started from converted fair-esm
weights evaluates, before any step, to fair-esm's own masked-LM loss on the same masked batches;
a config naming another model is a one-line error; a restarted run resumes its own checkpoints."""

import json

import numpy as np
import pytest
import torch
from support.data_fixtures import cath_head
from support.reference import fair_esm_model
from test_convert import save_fair_esm_pt

from esmjax.cli import main as cli
from esmjax.config import load_config
from esmjax.data.pipeline import eval_batches
from esmjax.io.convert import source_model_config
from esmjax.train.loop import run

SHAPE = (2, 48, 3)  # layers, width, heads (head_dim 16)


@pytest.fixture(scope="module")
def source(tmp_path_factory, shared_data):
    d = tmp_path_factory.mktemp("init_from")
    model = fair_esm_model(*SHAPE, seed=5)
    pt = d / "esm2_t2_test_UR50D.pt"
    save_fair_esm_pt(model, pt, *SHAPE)
    fa = d / "small.fa"
    cath_head(fa, 120)
    return model, pt, fa


def _config(path, fa, **over):
    cfg = {
        "mesh": {"ici_fsdp": -1},
        "data": {
            "train": str(fa),
            "seq_len": 64,
            "tokens_per_step": 1024,
            "eval_tokens": 2048,
            "max_segments": 1,  # one sequence per row, so fair-esm can run the same rows
            "val_fraction": 0.2,
        },
        "optim": {"peak_lr": 1e-3, "warmup_steps": 2},
        "num_steps": 0,
        "log_every": 1,
        "eval_every": 0,
        "checkpoint": {"every": 2, "keep": 5},
        **over,
    }
    path.write_text(json.dumps(cfg))
    return path


def test_init_from_fair_esm_reproduces_its_masked_lm_loss(source, tmp_path):
    model, pt, fa = source
    cfg = load_config(
        _config(tmp_path / "c.yaml", fa), [f"init_from={pt}"], source_model=source_model_config
    )
    assert (cfg.model.num_layers, cfg.model.embed_dim, cfg.model.num_heads) == SHAPE
    out = run(cfg, tmp_path / "w", progress=False)

    nll, count = 0.0, 0
    for batch in eval_batches(cfg.data, rows=8):
        assert (batch["segment_ids"] <= 1).all()
        with torch.no_grad():
            logits = model(torch.from_numpy(batch["tokens"].astype(np.int64)))["logits"]
        ce = torch.nn.functional.cross_entropy(
            logits.double().reshape(-1, logits.shape[-1]),
            torch.from_numpy(batch["targets"].astype(np.int64)).reshape(-1),
            reduction="none",
        ).numpy()
        w = batch["loss_mask"].reshape(-1).astype(bool)
        nll += float(ce[w].sum())
        count += int(w.sum())
    assert count == out["eval_masked_tokens"] > 100
    np.testing.assert_allclose(out["eval_loss"], nll / count, rtol=1e-5)


def test_init_from_another_model_is_one_line_error(source, tmp_path, capsys):
    _, pt, fa = source
    c = _config(tmp_path / "c.yaml", fa, model={"preset": "tiny"})
    rc = cli(
        ["train", "--config", str(c), "--workdir", str(tmp_path / "w"), "--init-from", str(pt)]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "another model" in err[0] and "num_layers" not in err[0]


def test_restarted_run_resumes_its_own_checkpoint(source, tmp_path):
    _, pt, fa = source
    c = _config(tmp_path / "c.yaml", fa, num_steps=4)
    w = tmp_path / "w"
    args = ["train", "--config", str(c), "--workdir", str(w), "--init-from", str(pt)]
    assert cli([*args, "--stop-after", "2", "--no-progress"]) == 0
    # the second invocation starts from the run's step 2, not from SRC
    assert cli([*args, "--no-progress"]) == 0
    steps = [json.loads(x)["step"] for x in (w / "metrics.jsonl").read_text().splitlines()]
    assert steps[:2] == [1, 2] and 3 in steps and steps.count(1) == 1
    saved = json.loads((w / "config.json").read_text())
    assert saved["init_from"] == str(pt) and saved["model"]["num_layers"] == SHAPE[0]


def test_every_source_kind_gives_the_same_weights(source, tmp_path):
    """fair-esm .pt, HF folder, esmjax checkpoint and training workdir all load the same
    variables; an esmjax source's step can be chosen and a missing one is an error."""
    import jax

    from esmjax.io import checkpoint, convert_esm2
    from esmjax.io.convert import convert, load_source_params
    from esmjax.parallel import sharding as shd

    _, pt, _ = source
    cfg = source_model_config(pt)
    mesh, rules = shd.single_device_mesh(), shd.resolve_rules("fsdp")
    ref, _ = load_source_params(pt, cfg, mesh, rules)
    convert(pt, tmp_path / "ckpt")
    convert_esm2.write_hf(jax.tree.map(np.asarray, ref), cfg, tmp_path / "hf")
    for src in (tmp_path / "ckpt", tmp_path / "hf"):
        assert source_model_config(src) == cfg
        got, _ = load_source_params(src, cfg, mesh, rules)
        jax.tree.map(
            lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), got, ref
        )
    with pytest.raises(checkpoint.CheckpointError, match="no step 3"):
        load_source_params(tmp_path / "ckpt", cfg, mesh, rules, step=3)
