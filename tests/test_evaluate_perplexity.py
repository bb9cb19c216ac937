"""``esmjax evaluate perplexity``: a tiny trained checkpoint gives the same masked-LM perplexity
restored on one device, on 8 devices with another sharding, and on 2 processes
(``launch/local.sh``); pseudo-perplexity equals a direct per-position computation; bad
checkpoints give clear errors; ``esmjax plot`` draws a workdir's curves."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from esmjax.cli import main as cli
from esmjax.config import ESM2_PRESETS, DataConfig, MeshConfig
from esmjax.data.masking import mask_tokens
from esmjax.data.pipeline import eval_batches
from esmjax.evaluate.perplexity import masked_lm, pseudo_perplexity
from esmjax.evaluate.plot import read_metrics, series
from esmjax.inference.engine import Engine
from esmjax.io import checkpoint
from esmjax.io.checkpoint import CheckpointError
from esmjax.io.fasta import read_fasta
from esmjax.models.alphabet import BOS, EOS, MASK, PAD, encode
from esmjax.models.esm2 import ESM2
from esmjax.parallel import sharding as shd

ROOT = Path(__file__).resolve().parents[1]
SEQ_LEN = 128


def packed_batches(seqs: list[str], rows: int, seed: int) -> list[dict[str, np.ndarray]]:
    """Two crops per row (segments 1 and 2, positions restarting), BERT-masked with a fixed seed."""
    items = [np.concatenate([[BOS], encode(s)[: SEQ_LEN // 2 - 2], [EOS]]) for s in seqs]
    tok, seg, pos = [], [], []
    for k in range(0, len(items), 2):
        t = np.full(SEQ_LEN, PAD, np.int32)
        sg = np.zeros(SEQ_LEN, np.int32)
        ps = np.zeros(SEQ_LEN, np.int32)
        col = 0
        for sid, it in enumerate(items[k : k + 2], 1):
            t[col : col + len(it)] = it
            sg[col : col + len(it)] = sid
            ps[col : col + len(it)] = np.arange(len(it))
            col += len(it)
        tok.append(t), seg.append(sg), pos.append(ps)
    tok, seg, pos = map(np.stack, (tok, seg, pos))
    extra = -len(tok) % rows
    tok = np.concatenate([tok, np.full((extra, SEQ_LEN), PAD, np.int32)])
    seg = np.concatenate([seg, np.zeros((extra, SEQ_LEN), np.int32)])
    pos = np.concatenate([pos, np.zeros((extra, SEQ_LEN), np.int32)])
    masked = mask_tokens(tok, np.random.default_rng(seed))
    return [
        {
            "tokens": masked["tokens"][i : i + rows],
            "targets": masked["targets"][i : i + rows],
            "loss_mask": masked["loss_mask"][i : i + rows],
            "segment_ids": seg[i : i + rows],
            "positions": pos[i : i + rows],
        }
        for i in range(0, len(tok), rows)
    ]


@pytest.fixture(scope="module")
def seqs(shared_data):
    return [r.sequence for r in read_fasta(shared_data / "esm_examples" / "some_proteins.fasta")]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, seqs):
    """A tiny ESM2 after 8 Adam steps of masked-LM training, saved as a checkpoint folder."""
    model = ESM2(ESM2_PRESETS["tiny"], rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)
    batches = packed_batches(seqs, 4, seed=1)

    @nnx.jit
    def step(model, opt, b):
        def loss_fn(m):
            logits = m(b["tokens"], b["segment_ids"], b["positions"])["logits"]
            nll = optax.softmax_cross_entropy_with_integer_labels(logits, b["targets"])
            return jnp.where(b["loss_mask"], nll, 0).sum() / b["loss_mask"].sum()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    losses = [
        float(step(model, opt, {k: jnp.asarray(v) for k, v in batches[i % 2].items()}))
        for i in range(8)
    ]
    assert losses[-1] < losses[0]
    path = tmp_path_factory.mktemp("ppl") / "trained"
    checkpoint.save_converted(path, model.cfg, checkpoint.params_numpy(model))
    return path


def _engine(path, mesh_cfg: MeshConfig | None, rules: str) -> Engine:
    mesh = shd.single_device_mesh() if mesh_cfg is None else shd.make_mesh(mesh_cfg)
    model, step = checkpoint.load_model(path, mesh=mesh, rules=rules)
    assert step == 0
    return Engine(model, mesh, rules)


def test_masked_lm_same_on_1_and_8_devices(trained, seqs):
    batches = packed_batches(seqs, 8, seed=7)
    one = _engine(trained, None, "fsdp")
    eight = _engine(trained, MeshConfig(ici_data=2, ici_fsdp=2, ici_tensor=2), "fsdp_tp")
    assert one.mesh.size == 1 and eight.mesh.size == 8 and eight.row_multiple == 4
    w = eight.state["layers"]["fc1"]["kernel"][...]
    assert len(w.sharding.device_set) == 8 and not w.sharding.is_fully_replicated
    a = masked_lm(one, batches)
    b = masked_lm(eight, batches)
    assert a["masked_tokens"] == b["masked_tokens"] > 100 and a["rows"] == b["rows"] == 8
    assert a["masked_accuracy"] == b["masked_accuracy"]
    assert abs(a["loss"] - b["loss"]) <= 1e-6 * a["loss"]
    # The same numbers as a plain forward pass of the model, computed here independently.
    model, _ = checkpoint.load_model(trained)
    nll, count = 0.0, 0
    for bt in batches:
        out = model(
            jnp.asarray(bt["tokens"]), jnp.asarray(bt["segment_ids"]), jnp.asarray(bt["positions"])
        )
        lp = np.asarray(jax.nn.log_softmax(out["logits"], -1))
        sel = bt["loss_mask"]
        nll -= lp[sel, bt["targets"][sel]].astype(np.float64).sum()
        count += int(sel.sum())
    assert a["masked_tokens"] == count
    assert a["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert 1 < a["unigram_perplexity"] < 25


@pytest.fixture(scope="module")
def fasta(shared_data):
    return shared_data / "esm_examples" / "some_proteins.fasta"


@pytest.fixture(scope="module")
def one_device_ppl(trained, fasta):
    """Held-out masked-LM figures of the FASTA through the data pipeline, on one device, 8 rows
    per batch."""
    cfg = DataConfig(eval=str(fasta), seq_len=SEQ_LEN, eval_tokens=0)
    return masked_lm(_engine(trained, None, "fsdp"), eval_batches(cfg, rows=8))


def test_pipeline_batches_same_on_1_and_8_devices(trained, fasta, one_device_ppl):
    cfg = DataConfig(eval=str(fasta), seq_len=SEQ_LEN, eval_tokens=0)
    eight = masked_lm(_engine(trained, MeshConfig(ici_fsdp=-1), "dp"), eval_batches(cfg, rows=16))
    assert one_device_ppl["masked_tokens"] == eight["masked_tokens"] > 200
    assert one_device_ppl["loss"] == pytest.approx(eight["loss"], rel=1e-6)
    # 8 Adam steps moved the model well below the ~33 of a random one (33 tokens); unigram baseline
    # for scale.
    assert one_device_ppl["perplexity"] < 28 and 10 < one_device_ppl["unigram_perplexity"] < 25


@pytest.mark.multiprocess
def test_two_processes(trained, fasta, one_device_ppl, tmp_path):
    out = tmp_path / "rep"
    cmd = [
        "bash",
        str(ROOT / "launch" / "local.sh"),
        "2",
        "2",
        sys.executable,
        "-m",
        "esmjax.cli",
        "evaluate",
        "perplexity",
        "--checkpoint",
        str(trained),
        "--data",
        str(fasta),
        "--seq-len",
        str(SEQ_LEN),
        "--eval-tokens",
        "0",
        "--rows",
        "8",
        "--out",
        str(out),
        "--no-progress",
    ]
    env = {**os.environ, "ESMJAX_LOG": "INFO"}  # each process's restore line, checked below
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rep = json.loads((out / "perplexity.json").read_text())
    assert rep["processes"] == 2 and rep["devices"] == 4 and rep["step"] == 0
    ml = rep["results"]["masked_lm"]
    assert ml["masked_tokens"] == one_device_ppl["masked_tokens"]
    assert ml["loss"] == pytest.approx(one_device_ppl["loss"], rel=1e-6)
    assert ml["masked_accuracy"] == one_device_ppl["masked_accuracy"]
    assert (
        "[p0] masked-LM" in proc.stdout and "[p1] masked-LM" not in proc.stdout
    )  # process 0 reports
    # Besides local.sh's status: each process restored the checkpoint (its INFO line) and none
    # printed a traceback, so that a process that crashed cannot pass.
    for i in range(2):
        restored = re.search(rf"^\[p{i}\] .*restored step 0 of ", proc.stdout, re.M)
        assert restored, proc.stdout[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stdout[-3000:]


def test_pseudo_perplexity_matches_direct(trained):
    seqs = ["MKTAYIAKQRQISFVKSH", "GSHMLEDPVAGAQKLV"]  # one length bucket (24 tokens)
    model, _ = checkpoint.load_model(trained)
    nll, n = [], 0
    for s in seqs:  # one unpadded row per masked position, all in one forward pass
        ids = np.concatenate([[BOS], encode(s), [EOS]])
        pos = np.arange(1, len(ids) - 1)
        t = np.repeat(ids[None], len(pos), 0)
        t[np.arange(len(pos)), pos] = MASK
        lp = np.asarray(jax.nn.log_softmax(model(jnp.asarray(t))["logits"], -1))
        nll.append(-lp[np.arange(len(pos)), pos, ids[pos]].astype(np.float64).sum())
        n += len(s)
    for mesh_cfg, rules in ((None, "fsdp"), (MeshConfig(ici_fsdp=-1), "dp")):
        out = pseudo_perplexity(_engine(trained, mesh_cfg, rules), seqs, max_tokens=256)
        assert out["residues"] == n and out["sequences"] == 2
        assert out["pseudo_perplexity"] == pytest.approx(math.exp(sum(nll) / n), rel=1e-5)
        assert out["per_sequence"][1]["pseudo_perplexity"] == pytest.approx(
            math.exp(nll[1] / len(seqs[1])), rel=1e-5
        )


def test_bad_checkpoints(trained, tmp_path, capsys):
    fa = tmp_path / "x.fa"
    fa.write_text(">a\nMKTAYIAKQR\n")
    base = ["evaluate", "perplexity", "--data", str(fa), "--no-progress", "--checkpoint"]
    with pytest.raises(CheckpointError, match="no step 5; available: \\[0\\]"):
        checkpoint.load_model(trained, step=5)
    assert cli([*base, str(trained), "--step", "5"]) == 2
    assert "no step 5" in capsys.readouterr().err
    empty = tmp_path / "run"
    (empty / "checkpoints").mkdir(parents=True)
    (empty / "config.json").write_text(json.dumps({"model": {"preset": "tiny"}}))
    (empty / "checkpoints" / "3.orbax-checkpoint-tmp").mkdir()  # an interrupted save: not committed
    assert cli([*base, str(empty)]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err
    assert cli([*base, str(tmp_path)]) == 2
    assert "not an esmjax checkpoint folder" in capsys.readouterr().err


def test_perplexity_reads_config_json_once(trained, tmp_path, monkeypatch, capsys):
    """One `evaluate perplexity` opens its checkpoint once: its config.json is read a single time
    (on a bucket, each read is a request), whoever needs it (the job, the mesh, the restore, the
    report)."""
    from etils import epath

    reads = []
    for cls in (Path, type(epath.Path(str(trained)))):

        def counted(self, mode="r", *args, _open=cls.open, **kwargs):
            if self.name == "config.json" and "r" in mode:
                reads.append(str(self))
            return _open(self, mode, *args, **kwargs)

        monkeypatch.setattr(cls, "open", counted)
    fa = tmp_path / "x.fa"
    fa.write_text(">a\nMKTAYIAKQR\n>b\nMSIQHFRVALIPFFAAF\n")
    argv = ["evaluate", "perplexity", "--checkpoint", str(trained), "--data", str(fa)]
    assert cli([*argv, "--out", str(tmp_path / "r"), "--no-progress"]) == 0
    assert (tmp_path / "r" / "perplexity.json").is_file()
    assert reads == [str(trained / "config.json")], reads


def test_plot_training_curves(tmp_path, capsys):
    w = tmp_path / "run"
    w.mkdir()
    lines = [
        json.dumps(
            {"step": s, "loss": 3.0 - s / 100, "perplexity": math.exp(3.0 - s / 100), "lr": 1e-3}
        )
        for s in range(10, 110, 10)
    ]
    lines.insert(5, json.dumps({"step": 50, "eval_loss": 2.7, "eval_perplexity": math.exp(2.7)}))
    lines.append(json.dumps({"step": 100, "eval_loss": 2.2, "eval_perplexity": math.exp(2.2)}))
    (w / "metrics.jsonl").write_text(
        "\n".join(lines) + '\n{"step": 110, "lo'
    )  # a line still being written
    rows = read_metrics(w)
    assert len(rows) == 12
    steps, vals = series(rows, "eval_perplexity")
    assert steps.tolist() == [50, 100] and vals[1] == pytest.approx(math.exp(2.2))
    assert cli(["plot", str(w)]) == 0
    png = w / "plots" / "training.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    out = capsys.readouterr().out
    assert "eval_perplexity" in out and "9.025" in out  # exp(2.2)
    (w / "metrics.jsonl").write_text(lines[0] + "\nnot json\n" + lines[1] + "\n")
    assert cli(["plot", str(w)]) == 2
    assert "metrics.jsonl:2: not a JSON object" in capsys.readouterr().err
